//! Engine operations behind the backend HTTP API (and shared with client ops): history, membership,
//! leave, presence queries, unread, devices, announcements, login sync.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::hub::CloseReason;
use super::pipeline::{PublishReply, PublishRequest};
use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::announcement::Announcement;
use crate::backend::{DeliveryFilter, HistoryLimits, Outgoing, OutgoingPayload, audience_admits};
use crate::channels::{ChannelName, Kind, valid_id};
use crate::device::PushDevice;
use crate::event::{EventBody, Seq, new_event_id, now_ms};
use crate::presence::SessionInfo;
use crate::rules::Source;

/// The internal event name of the cross-node "close this user's sessions" frame.
pub const KICK_EVENT: &str = "herald.kick";

/// Most events one history call returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;

fn check_id(what: &str, id: &str) -> EngineResult<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(EngineError::new(
            ErrorCode::BadChannel,
            format!("bad {what} id: 1-128 characters of [A-Za-z0-9_.@-]"),
        ))
    }
}

fn raw(v: Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(&v).expect("json value serialises")
}

impl Engine {
    /// `{channel, epoch, events, recovered}` for events with `after < seq <= to`.
    pub async fn history_json(
        &self,
        ch: &ChannelName,
        after: Seq,
        to: Option<Seq>,
        limit: Option<usize>,
    ) -> EngineResult<Value> {
        let limit = limit.unwrap_or(100);
        if limit == 0 || limit > MAX_HISTORY_LIMIT {
            return Err(EngineError::new(
                ErrorCode::BadFrame,
                format!("limit: 1-{MAX_HISTORY_LIMIT}"),
            ));
        }
        let kinds = self.kinds();
        let kind = kinds.of(ch);
        if !kind.persist {
            return Err(EngineError::new(
                ErrorCode::BadChannel,
                format!("{ch}: this channel kind keeps no history"),
            ));
        }
        let page = backend(
            self.backends
                .history
                .read(ch, after, to, limit, kind.history_age),
        )
        .await?;
        let recovered = after + 1 >= page.first_available || after >= page.position.seq;
        // Events are the stored frames, checked as JSON here; `json!` then parses them into the reply's
        // values (re-encoded, keys in sorted order: the same content as the live frame).
        let mut events = Vec::with_capacity(page.events.len());
        for ev in &page.events {
            let text = std::str::from_utf8(&ev.frame)
                .map_err(|_| EngineError::new(ErrorCode::Internal, "stored frame is not UTF-8"))?;
            let rv = RawValue::from_string(text.to_string())
                .map_err(|_| EngineError::new(ErrorCode::Internal, "stored frame is not JSON"))?;
            events.push(rv);
        }
        Ok(json!({
            "channel": ch,
            "epoch": page.position.epoch,
            "seq": page.position.seq,
            "events": events,
            "recovered": recovered,
        }))
    }

    /// Moves `user`'s read pointer in `room` to `seq`, tells the room's active viewers (`read`
    /// receipt) and the user's other devices (`read` on `user:{me}`); `{room, seq, unread}`.
    pub async fn mark_read(&self, user: &str, room: &str, seq: Seq) -> EngineResult<Value> {
        check_id("room", room)?;
        check_id("user", user)?;
        self.require_member(room, user).await?;
        let room_ch = ChannelName::of(Kind::Room, room);
        let last = backend(self.backends.history.position(&room_ch)).await?.seq;
        let seq = seq.min(last);
        let store = &self.backends.store;
        let pointer = backend(store.set_read(user, room, seq)).await?;
        let unread = backend(store.unread(user, &[room.to_string()])).await?[0];
        let from: Arc<str> = user.into();
        self.publish(PublishRequest {
            event: "read".into(),
            targets: vec![ChannelName::of(Kind::Active, room)],
            from: Some(from.clone()),
            data: raw(json!({ "room": room, "user": user, "seq": pointer })),
            idempotency_key: None,
            source: Source::Api,
            attrs: None,
        })
        .await?;
        self.publish_ephemeral(
            ChannelName::of(Kind::User, user),
            "read",
            json!({ "room": room, "seq": pointer, "unread": unread }),
            Some(from),
        )
        .await?;
        Ok(json!({ "room": room, "seq": pointer, "unread": unread }))
    }

    /// Publishes a non-stored event to one channel (bypasses routing: engine-generated).
    async fn publish_ephemeral(
        &self,
        channel: ChannelName,
        event: &str,
        data: Value,
        from: Option<Arc<str>>,
    ) -> EngineResult<()> {
        let id = new_event_id();
        let data = raw(data);
        let body = EventBody {
            id: &id,
            event,
            data: &data,
            from: from.as_deref(),
            ts: now_ms(),
        }
        .encode();
        backend(self.backends.broker.publish(Outgoing {
            channel,
            event: event.into(),
            payload: OutgoingPayload::EventBody(body),
            persist: None,
            filter: DeliveryFilter::default(),
            unread: None,
            dedupe: None,
        }))
        .await?;
        Ok(())
    }

    /// Adds a member; the read pointer starts at the room's current seq (history before joining is not
    /// unread). `{room, user, added}`.
    pub async fn add_member(&self, room: &str, user: &str) -> EngineResult<Value> {
        check_id("room", room)?;
        check_id("user", user)?;
        let added = backend(self.backends.store.add_member(room, user)).await?;
        if added {
            let pos = backend(
                self.backends
                    .history
                    .position(&ChannelName::of(Kind::Room, room)),
            )
            .await?;
            backend(self.backends.store.set_read(user, room, pos.seq)).await?;
        }
        Ok(json!({ "room": room, "user": user, "added": added }))
    }

    /// Removes a member (no event). `{room, user, removed}`.
    pub async fn remove_member(&self, room: &str, user: &str) -> EngineResult<Value> {
        check_id("room", room)?;
        check_id("user", user)?;
        let removed = backend(self.backends.store.remove_member(room, user)).await?;
        if removed {
            // Not stored (the backend publishes its own event if it wants one), but the user's sessions
            // on every node must stop receiving the room: they drop it on this `room.left`.
            self.publish_ephemeral(
                ChannelName::of(Kind::User, user),
                "room.left",
                json!({ "room": room, "user": user, "reason": "removed" }),
                None,
            )
            .await?;
        }
        Ok(json!({ "room": room, "user": user, "removed": removed }))
    }

    /// `{members: [...]}`.
    pub async fn members_json(&self, room: &str) -> EngineResult<Value> {
        check_id("room", room)?;
        let members = backend(self.backends.store.members(room)).await?;
        Ok(json!({ "room": room, "members": members }))
    }

    /// The atomic leave: membership removed, `member.left` stored in the room, `room.left` to the
    /// user's channel (their sessions on every node drop the room).
    pub async fn leave_room(&self, room: &str, user: &str) -> EngineResult<Value> {
        check_id("room", room)?;
        check_id("user", user)?;
        if !backend(self.backends.store.remove_member(room, user)).await? {
            return Err(EngineError::new(
                ErrorCode::NotMember,
                format!("not a member of room {room}"),
            ));
        }
        let data = json!({ "room": room, "user": user });
        let member_left = self
            .publish(PublishRequest {
                event: "member.left".into(),
                targets: vec![ChannelName::of(Kind::Room, room)],
                from: None,
                data: raw(data.clone()),
                idempotency_key: None,
                source: Source::Api,
                attrs: None,
            })
            .await?;
        let room_left = self
            .publish(PublishRequest {
                event: "room.left".into(),
                targets: vec![ChannelName::of(Kind::User, user)],
                from: None,
                data: raw(data),
                idempotency_key: None,
                source: Source::Api,
                attrs: None,
            })
            .await?;
        Ok(json!({
            "room": room,
            "user": user,
            "left": true,
            "deliveries": [member_left.deliveries[0], room_left.deliveries[0]],
        }))
    }

    /// `{presence: {user: object}}`.
    pub async fn presence_json(&self, users: &[String]) -> EngineResult<Value> {
        if users.len() > super::session::MAX_USERS_PER_OP {
            return Err(EngineError::new(ErrorCode::TooLarge, "at most 1000 users"));
        }
        for u in users {
            check_id("user", u)?;
        }
        let list = backend(self.backends.presence.get(users)).await?;
        let mut map = Map::new();
        for p in list {
            map.insert(
                p.user.clone(),
                serde_json::to_value(&p).expect("serialises"),
            );
        }
        Ok(json!({ "presence": map }))
    }

    /// Seed 002 / 003 heartbeat for clients without a socket: keeps `user` online (and present in
    /// `room`, when given) for one presence TTL.
    pub async fn http_heartbeat(&self, user: &str, room: Option<&str>) -> EngineResult<Value> {
        check_id("user", user)?;
        let session: Arc<str> = format!("http:{user}").into();
        let info = SessionInfo {
            session: session.clone(),
            user: user.into(),
            device: "http".into(),
            platform: None,
            state: Default::default(),
            node: self.node.clone(),
        };
        let ttl = self.config.presence_ttl;
        if backend(self.backends.presence.connect(&info, ttl)).await? {
            self.publish_presence(user).await;
        }
        if let Some(room) = room {
            check_id("room", room)?;
            self.require_member(room, user).await?;
            if backend(self.backends.presence.room_join(room, user, &session, ttl)).await? {
                self.publish_room_presence(room, user, "online").await;
            }
        }
        Ok(json!({ "user": user, "online": true, "ttl": ttl.as_secs() }))
    }

    /// `{room, users}`: who is connected in a room.
    pub async fn room_presence_json(&self, room: &str) -> EngineResult<Value> {
        check_id("room", room)?;
        let users = backend(self.backends.presence.room_users(room)).await?;
        Ok(json!({ "room": room, "users": users }))
    }

    /// `{"unread": {"r1": 3}}` for every room of the user with unread events.
    pub async fn unread_json(&self, user: &str) -> EngineResult<Value> {
        check_id("user", user)?;
        let rooms = backend(self.backends.store.rooms_of(user)).await?;
        let counts = backend(self.backends.store.unread(user, &rooms)).await?;
        let mut map = Map::new();
        for (room, n) in rooms.into_iter().zip(counts) {
            if n > 0 {
                map.insert(room, json!(n));
            }
        }
        Ok(json!({ "unread": map }))
    }

    /// The login sync of the `connected` frame: unread per room and the announcements this user has not
    /// seen (per-user cursor, shared by all devices) that their attrs admit.
    pub async fn login_sync(&self, user: &str, attrs: &Map<String, Value>) -> EngineResult<Value> {
        let unread = self.unread_json(user).await?;
        let now = now_ms();
        let all = backend(self.backends.store.announcements(now)).await?;
        let mut announcements = Vec::new();
        if let Some(newest) = all.last() {
            let cursor = backend(
                self.backends
                    .store
                    .swap_announcement_cursor(user, &newest.id),
            )
            .await?;
            for a in &all {
                if cursor.as_deref().is_some_and(|c| a.id.as_str() <= c)
                    || !self.admits_announcement(a, user, attrs)
                {
                    continue;
                }
                announcements.push(a.event());
            }
        }
        Ok(json!({ "unread": unread["unread"], "announcements": announcements }))
    }

    /// Creates an announcement: stored for login sync and published live on `global` to those its
    /// audience admits.
    pub async fn create_announcement(
        &self,
        a: Announcement,
    ) -> EngineResult<(Value, PublishReply)> {
        backend(self.backends.store.add_announcement(&a)).await?;
        let ch = ChannelName::global();
        let kinds = self.kinds();
        let kind = kinds.of(&ch);
        // The live event carries the announcement's id, as the login sync does.
        let id = a.id.as_str();
        let data = raw(a.data());
        let body = EventBody {
            id,
            event: "announcement",
            data: &data,
            from: None,
            ts: a.ts,
        }
        .encode();
        let pos = backend(
            self.backends.broker.publish(Outgoing {
                channel: ch.clone(),
                event: "announcement".into(),
                payload: OutgoingPayload::EventBody(body),
                persist: kind.persist.then_some(HistoryLimits {
                    size: kind.history_size,
                    age: kind.history_age,
                }),
                filter: DeliveryFilter {
                    except: Vec::new(),
                    // With `announce` rules each session asks them (Session::check); without, the hub
                    // filters by audience.
                    audience: (!a.audience.is_empty() && !self.rules.current().has_announce())
                        .then(|| Arc::new(a.audience.clone())),
                },
                unread: None,
                dedupe: None,
            }),
        )
        .await?;
        let reply = PublishReply {
            id: id.to_string(),
            deliveries: vec![super::pipeline::Receipt {
                channel: ch.to_string(),
                seq: pos.as_ref().map(|p| p.seq),
                epoch: pos.map(|p| p.epoch.to_string()),
            }],
            push: Default::default(),
        };
        Ok((serde_json::to_value(&a).expect("serialises"), reply))
    }

    /// Whether `user` is shown announcement `a`: the `announce` rules decide; without one, the audience
    /// (every key equal to the user's attr).
    pub fn admits_announcement(
        &self,
        a: &Announcement,
        user: &str,
        attrs: &Map<String, Value>,
    ) -> bool {
        let rules = self.rules.current();
        rules
            .announce(&a.data(), user, attrs)
            .unwrap_or_else(|| audience_admits(&a.audience, attrs))
    }

    /// Unexpired announcements.
    pub async fn announcements_json(&self) -> EngineResult<Value> {
        let all = backend(self.backends.store.announcements(now_ms())).await?;
        Ok(json!({ "announcements": all }))
    }

    /// Registers a push device.
    pub async fn put_device(&self, user: &str, device: PushDevice) -> EngineResult<Value> {
        check_id("user", user)?;
        check_id("device", &device.device)?;
        backend(self.backends.store.put_device(user, device.clone())).await?;
        Ok(json!({ "user": user, "device": device }))
    }

    /// Removes a push device.
    pub async fn delete_device(&self, user: &str, device: &str) -> EngineResult<Value> {
        check_id("user", user)?;
        check_id("device", device)?;
        let removed = backend(self.backends.store.delete_device(user, device)).await?;
        if !removed {
            return Err(EngineError::new(ErrorCode::NotFound, "no such device"));
        }
        Ok(json!({ "user": user, "device": device, "removed": true }))
    }

    /// A user's push devices.
    pub async fn devices_json(&self, user: &str) -> EngineResult<Value> {
        check_id("user", user)?;
        let devices = backend(self.backends.store.devices(user)).await?;
        Ok(json!({ "user": user, "devices": devices }))
    }

    /// Replaces a user's contacts.
    pub async fn set_contacts(&self, user: &str, contacts: &[String]) -> EngineResult<Value> {
        check_id("user", user)?;
        if contacts.len() > 10_000 {
            return Err(EngineError::new(
                ErrorCode::TooLarge,
                "at most 10000 contacts",
            ));
        }
        for c in contacts {
            check_id("user", c)?;
        }
        backend(self.backends.store.set_contacts(user, contacts)).await?;
        Ok(json!({ "user": user, "contacts": contacts }))
    }

    /// A user's contacts.
    pub async fn contacts(&self, user: &str) -> EngineResult<Vec<String>> {
        backend(self.backends.store.contacts(user)).await
    }

    /// `{count}` of online users.
    pub async fn online_count(&self) -> EngineResult<u64> {
        backend(self.backends.presence.online_count()).await
    }

    /// A page of online users.
    pub async fn online_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> EngineResult<(Vec<String>, Option<String>)> {
        backend(
            self.backends
                .presence
                .online_page(cursor, limit.clamp(1, 1000)),
        )
        .await
    }

    /// Closes every session of `user` on this node; `{user, closed}`.
    pub async fn disconnect_user(&self, user: &str) -> EngineResult<Value> {
        check_id("user", user)?;
        let sessions = self.hub.user_sessions(user);
        for s in &sessions {
            s.close(CloseReason::Kicked);
        }
        // Sessions on other nodes: a control frame on `user:{user}` (never shown to clients; see
        // `Session::check`) makes every node close that user's sessions.
        let frame = Bytes::from_static(b"{\"type\":\"kick\"}");
        backend(self.backends.broker.publish(Outgoing {
            channel: ChannelName::of(Kind::User, user),
            event: KICK_EVENT.into(),
            payload: OutgoingPayload::Frame(frame),
            persist: None,
            filter: DeliveryFilter::default(),
            unread: None,
            dedupe: None,
        }))
        .await?;
        Ok(json!({ "user": user, "closed": sessions.len() }))
    }

    /// Finds a stored event by id in the rooms of `user` (seed 003's `PATCH /notifications/{id}/read`):
    /// `(room, seq)`. Scans the retained history of the user's rooms.
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
        for room in backend(self.backends.store.rooms_of(user)).await? {
            let ch = ChannelName::of(Kind::Room, &room);
            let kinds = self.kinds();
            let kind = kinds.of(&ch);
            let page = backend(self.backends.history.read(
                &ch,
                0,
                None,
                kind.history_size,
                kind.history_age,
            ))
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
