//! Rooms: membership (joining starts the read pointer at the room's current seq), the atomic leave,
//! read pointers and unread counts, and finding a stored room event by id (seed 003's
//! `PATCH /notifications/{id}/read`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::control::event_data;
use super::limits::check_id;
use super::pipeline::{PublishRequest, Receipt};
use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::channels::{ChannelName, Kind};
use crate::event::Seq;
use crate::rules::Source;

/// The reply to adding a member.
#[derive(Debug, Serialize)]
pub struct MemberAdded {
    /// The room.
    pub room: String,
    /// The user.
    pub user: String,
    /// False when they were a member already.
    pub added: bool,
}

/// The reply to removing a member.
#[derive(Debug, Serialize)]
pub struct MemberRemoved {
    /// The room.
    pub room: String,
    /// The user.
    pub user: String,
    /// False when they were not a member.
    pub removed: bool,
}

/// A room's members.
#[derive(Debug, Serialize)]
pub struct Members {
    /// The room.
    pub room: String,
    /// Its members, sorted.
    pub members: Vec<String>,
}

/// The reply to the atomic leave.
#[derive(Debug, Serialize)]
pub struct Left {
    /// The room.
    pub room: String,
    /// The user.
    pub user: String,
    /// Always true (a non-member's leave is `not_member`).
    pub left: bool,
    /// Where `member.left` (the room) and `room.left` (the user's channel) were stored.
    pub deliveries: Vec<Receipt>,
}

/// A read pointer after `read`: also the data of the `read` sync to the user's other devices.
#[derive(Debug, Serialize)]
pub struct ReadMark {
    /// The room.
    pub room: String,
    /// The pointer: everything up to it is read.
    pub seq: Seq,
    /// What is still unread after it.
    pub unread: u64,
}

/// The `read` receipt to the room's active viewers.
#[derive(Serialize)]
struct ReadReceipt<'a> {
    room: &'a str,
    user: &'a str,
    seq: Seq,
}

/// A user's unread counts.
#[derive(Debug, Serialize)]
pub struct Unread {
    /// Rooms with something unread, and how much.
    pub unread: BTreeMap<String, u64>,
}

/// The data of `member.left` and `room.left`.
#[derive(Serialize)]
struct Membership<'a> {
    room: &'a str,
    user: &'a str,
}

/// The data of the `room.left` that tells a removed member's sessions to drop the room.
#[derive(Serialize)]
struct Removed<'a> {
    room: &'a str,
    user: &'a str,
    reason: &'a str,
}

impl Engine {
    /// Adds a member; their read pointer starts at the room's current seq (history before joining is
    /// not unread).
    pub async fn add_member(&self, room: &str, user: &str) -> EngineResult<MemberAdded> {
        check_id("room", room)?;
        check_id("user", user)?;
        let added = backend(
            "membership.add_member",
            self.backends.membership.add_member(room, user),
        )
        .await?;
        if added {
            let pos = backend(
                "history.position",
                self.backends
                    .history
                    .position(&ChannelName::of(Kind::Room, room)),
            )
            .await?;
            backend(
                "unread.set_read",
                self.backends.unread.set_read(user, room, pos.seq),
            )
            .await?;
        }
        Ok(MemberAdded {
            room: room.into(),
            user: user.into(),
            added,
        })
    }

    /// Removes a member (no event is stored: the backend publishes its own if it wants one).
    pub async fn remove_member(&self, room: &str, user: &str) -> EngineResult<MemberRemoved> {
        check_id("room", room)?;
        check_id("user", user)?;
        let removed = backend(
            "membership.remove_member",
            self.backends.membership.remove_member(room, user),
        )
        .await?;
        if removed {
            // The user's sessions on every node must stop receiving the room: they drop it on
            // this `room.left`.
            let data = Removed {
                room,
                user,
                reason: "removed",
            };
            self.emit_event(ChannelName::of(Kind::User, user), "room.left", &data, None)
                .await?;
        }
        Ok(MemberRemoved {
            room: room.into(),
            user: user.into(),
            removed,
        })
    }

    /// A room's members.
    pub async fn members(&self, room: &str) -> EngineResult<Members> {
        check_id("room", room)?;
        let members = backend("membership.members", self.backends.membership.members(room)).await?;
        Ok(Members {
            room: room.into(),
            members,
        })
    }

    /// The atomic leave: membership removed, `member.left` stored in the room, `room.left` to the
    /// user's channel (their sessions on every node drop the room).
    pub async fn leave_room(&self, room: &str, user: &str) -> EngineResult<Left> {
        check_id("room", room)?;
        check_id("user", user)?;
        if !backend(
            "membership.remove_member",
            self.backends.membership.remove_member(room, user),
        )
        .await?
        {
            return Err(EngineError::new(
                ErrorCode::NotMember,
                format!("not a member of room {room}"),
            ));
        }
        let data = Membership { room, user };
        let mut deliveries = Vec::with_capacity(2);
        for (event, target) in [
            ("member.left", ChannelName::of(Kind::Room, room)),
            ("room.left", ChannelName::of(Kind::User, user)),
        ] {
            let reply = self
                .publish(PublishRequest {
                    event: event.into(),
                    targets: vec![target],
                    from: None,
                    data: event_data(&data),
                    idempotency_key: None,
                    source: Source::Api,
                    attrs: None,
                })
                .await?;
            deliveries.extend(reply.deliveries.into_iter().take(1));
        }
        Ok(Left {
            room: room.into(),
            user: user.into(),
            left: true,
            deliveries,
        })
    }

    /// Moves `user`'s read pointer in `room` to `seq`, tells the room's active viewers (a `read`
    /// receipt) and the user's other devices (`read` on `user:{me}`).
    pub async fn mark_read(&self, user: &str, room: &str, seq: Seq) -> EngineResult<ReadMark> {
        check_id("room", room)?;
        check_id("user", user)?;
        self.require_member(room, user).await?;
        let room_ch = ChannelName::of(Kind::Room, room);
        let last = backend("history.position", self.backends.history.position(&room_ch))
            .await?
            .seq;
        let seq = seq.min(last);
        let counts = &self.backends.unread;
        let pointer = backend("unread.set_read", counts.set_read(user, room, seq)).await?;
        // Read is seen: an `unacked` push fallback for what was read is not sent.
        if self.push_enabled() {
            backend(
                "outbox.push_ack",
                self.backends
                    .outbox
                    .push_ack(user, room_ch.as_str(), pointer),
            )
            .await?;
        }
        let unread = backend("unread.unread", counts.unread(user, &[room.to_string()])).await?[0];
        let from: Arc<str> = user.into();
        let receipt = ReadReceipt {
            room,
            user,
            seq: pointer,
        };
        self.publish(PublishRequest {
            event: "read".into(),
            targets: vec![ChannelName::of(Kind::Active, room)],
            from: Some(from.clone()),
            data: event_data(&receipt),
            idempotency_key: None,
            source: Source::Api,
            attrs: None,
        })
        .await?;
        let mark = ReadMark {
            room: room.into(),
            seq: pointer,
            unread,
        };
        self.emit_event(ChannelName::of(Kind::User, user), "read", &mark, Some(from))
            .await?;
        Ok(mark)
    }

    /// A user's unread counts, for every room of theirs with something unread.
    pub async fn unread(&self, user: &str) -> EngineResult<Unread> {
        check_id("user", user)?;
        let rooms = backend(
            "membership.rooms_of",
            self.backends.membership.rooms_of(user),
        )
        .await?;
        let counts = backend("unread.unread", self.backends.unread.unread(user, &rooms)).await?;
        Ok(Unread {
            unread: rooms
                .into_iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .collect(),
        })
    }

    /// Finds a stored event by id in the rooms of `user`: `(room, seq)`. Scans the retained history
    /// of the user's rooms.
    pub async fn find_room_event(
        &self,
        user: &str,
        id: &str,
    ) -> EngineResult<Option<(String, Seq)>> {
        check_id("user", user)?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            return Err(EngineError::new(ErrorCode::BadFrame, "bad event id"));
        }
        let needle = format!("\"id\":\"{id}\"");
        for room in backend(
            "membership.rooms_of",
            self.backends.membership.rooms_of(user),
        )
        .await?
        {
            let ch = ChannelName::of(Kind::Room, &room);
            let kinds = self.kinds();
            let kind = kinds.of(&ch);
            let page = backend(
                "history.read",
                self.backends
                    .history
                    .read(&ch, 0, None, kind.history_size, kind.history_age),
            )
            .await?;
            if let Some(ev) = page.events.iter().find(|e| {
                e.frame
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
            }) {
                return Ok(Some((room, ev.seq)));
            }
        }
        Ok(None)
    }
}
