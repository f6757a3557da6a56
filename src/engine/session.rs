//! One connected device (a WebSocket or SSE stream): its bounded queue, subscriptions with their last
//! `seq`, focus, and the client ops of the protocol. Transports own the socket and call these methods.
//!
//! No gap, no duplicate on `subscribe` with `since`: the session joins the hub *before* it reads
//! history, so every event after the read is already queued; the queue is then filtered by seq, so an
//! event both replayed and queued is sent once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::announcements::LoginSync;
use super::control::event_data;
use super::history::History;
use super::hub::{Next, Outbound, SessionHandle};
use super::limits::{MAX_USERS_PER_OP, check_users};
use super::pipeline::{PublishReply, PublishRequest};
use super::presence::PresenceOf;
use super::roompresence::Change;
use super::rooms::{Left, ReadMark};
use super::subs::Sub;
pub use super::subs::Verdict;
use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::backend::Delivery;
use crate::channels::{ChannelName, Kind, valid_id};
use crate::device::DeviceState;
use crate::event::{Epoch, FrameFormat, Position, Seq, StoredEvent, compact_or_same, replay_frame};
use crate::presence::{SessionInfo, Status, UserPresence};
use crate::rules::Source;

pub use super::hub::Transport;

/// What opening a session needs (from the verified token and the connect frame).
#[derive(Clone, Debug)]
pub struct SessionOpen {
    /// User (JWT `sub`).
    pub user: Arc<str>,
    /// Device id; a fresh one when `None`.
    pub device: Option<String>,
    /// Platform.
    pub platform: Option<String>,
    /// App state.
    pub state: DeviceState,
    /// JWT attrs.
    pub attrs: Map<String, Value>,
    /// Transport.
    pub transport: Transport,
    /// When the session's token expires (unix s); the session is closed with 4002 then.
    pub expires: Option<u64>,
    /// How its event frames are written (replayed events here; the transport writes live ones).
    pub format: FrameFormat,
}

/// The reply to `subscribe`: the channel's position (stored channels) and whether `since` could be
/// served.
#[derive(Debug, Serialize)]
pub struct Subscribed {
    /// The channel.
    pub channel: ChannelName,
    /// Its epoch, for a stored channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Its last seq, for a stored channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    /// False when the `since` position could not be served: refetch from your backend.
    pub recovered: bool,
}

/// The reply to `unsubscribe`.
#[derive(Debug, Serialize)]
pub struct Unsubscribed {
    /// The channel.
    pub channel: ChannelName,
    /// Always false.
    pub subscribed: bool,
    /// Whether it was subscribed before.
    pub was_subscribed: bool,
}

/// The reply to `ack`.
#[derive(Debug, Serialize)]
pub struct Acked {
    /// The channel.
    pub channel: ChannelName,
    /// The seq acknowledged.
    pub seq: Seq,
}

/// The reply to `focus` and `blur`.
#[derive(Debug, Serialize)]
pub struct Focused {
    /// The room.
    pub room: String,
    /// Whether it is open on this device now.
    pub focused: bool,
}

/// The reply to `typing`.
#[derive(Debug, Serialize)]
pub struct Typing {
    /// The room.
    pub room: String,
    /// False when this session's last `typing` in the room went out less than
    /// `limits.typing_interval` ago: this one was coalesced into it and not sent.
    pub sent: bool,
}

/// A session's `typing` times are pruned of the expired ones once it holds this many rooms: the
/// map stays within the rooms typed in over one interval (which the frame rate bounds).
const TYPED_PRUNE_AT: usize = 16;

/// The data of the `typing` event.
#[derive(Serialize)]
struct TypingData<'a> {
    room: &'a str,
    user: &'a str,
}

/// The reply to `status`.
#[derive(Debug, Serialize)]
pub struct StatusSet {
    /// The custom status now.
    pub status: Status,
    /// Its text.
    pub text: Option<String>,
}

/// The reply to `state`.
#[derive(Debug, Serialize)]
pub struct StateSet {
    /// The device's app state now.
    pub state: DeviceState,
}

/// The reply to `watch`.
#[derive(Debug, Serialize)]
pub struct Watching {
    /// The users watched.
    pub users: Vec<String>,
    /// Their presence now.
    pub presence: BTreeMap<String, UserPresence>,
}

/// The reply to `unwatch`.
#[derive(Debug, Serialize)]
pub struct Unwatched {
    /// The users no longer watched.
    pub users: Vec<String>,
}

/// A channel's position in the `connected` frame.
#[derive(Serialize)]
struct ChannelAt {
    epoch: Option<Epoch>,
    seq: Option<Seq>,
}

/// The `connected` frame.
#[derive(Serialize)]
struct Connected<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conn: &'a str,
    user: &'a str,
    device: &'a str,
    node: &'a str,
    channels: BTreeMap<String, ChannelAt>,
    sync: LoginSync,
    /// `limits.typing_interval`, ms: a client need not send `typing` more often per room.
    typing_interval: u64,
    /// Said only when not the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'static str>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Value>,
}

/// One connected device.
pub struct Session {
    engine: Engine,
    /// The hub's handle.
    pub handle: Arc<SessionHandle>,
    transport: Transport,
    format: FrameFormat,
    /// The backend lost this session (an [`Outbound::Restore`] came): register it again after the
    /// writer's batch.
    restore: bool,
    seen_announcement: Option<Box<str>>,
    /// When this session's last `typing` went out, per room (entries older than
    /// `limits.typing_interval` are dropped as new ones come).
    typed: HashMap<Box<str>, Instant>,
}

impl Engine {
    /// Opens a session: registers it in the hub (per-user limit) and in presence (first device of a
    /// user -> `presence.changed` online).
    pub async fn open_session(&self, open: SessionOpen) -> EngineResult<Session> {
        if let Some(d) = &open.device
            && !valid_id(d)
        {
            return Err(EngineError::new(
                ErrorCode::BadFrame,
                "device: 1-128 characters of [A-Za-z0-9_.@-]",
            ));
        }
        let id = self.next_session_id();
        let session: Arc<str> = format!("{}:{id}", self.node).into();
        let device: Arc<str> = open
            .device
            .map(Into::into)
            .unwrap_or_else(|| format!("d-{}", uuid::Uuid::now_v7().simple()).into());
        let info = SessionInfo {
            session,
            user: open.user.clone(),
            device,
            platform: open.platform.map(Into::into),
            state: open.state,
            node: self.node.clone(),
        };
        let handle = SessionHandle::new(
            id,
            &info,
            Arc::new(open.attrs),
            self.config.limits.queue_frames,
            open.expires,
            open.transport,
        );
        if !self
            .hub
            .register(&handle, self.config.limits.connections_per_user)
        {
            return Err(EngineError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many connections for this user (limit {})",
                    self.config.limits.connections_per_user
                ),
            ));
        }
        let first = match backend(
            "presence.connect",
            self.backends
                .presence
                .connect(&info, self.config.presence_ttl),
        )
        .await
        {
            Ok(first) => first,
            Err(e) => {
                self.hub.unregister(&handle);
                return Err(e);
            }
        };
        crate::metrics::session_opened(open.transport.as_str());
        tracing::debug!(conn = %handle.session, user = %handle.user, "Session opened.");
        if first {
            self.publish_presence(&open.user).await;
        }
        Ok(Session {
            engine: self.clone(),
            handle,
            transport: open.transport,
            format: open.format,
            restore: false,
            seen_announcement: None,
            typed: HashMap::new(),
        })
    }
}

fn room_channel(kind: Kind, room: &str) -> EngineResult<ChannelName> {
    ChannelName::try_of(kind, room).map_err(EngineError::from)
}

impl Session {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The next item of the session's queue, or the signal to close (which comes first).
    pub fn recv(&mut self) -> impl Future<Output = Next> + '_ {
        std::future::poll_fn(|cx| self.handle.poll_next(cx))
    }

    /// Takes another queued item without waiting (writers drain the queue before one flush).
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.handle.try_recv()
    }

    /// Decides what to do with a delivery: drop duplicates of what was replayed, send `reset` when the
    /// epoch changed under the subscription.
    pub fn check(&mut self, d: &Delivery) -> Verdict {
        if d.channel.kind() == Kind::User && &*d.event == super::control::KICK_EVENT {
            // POST /users/{user}/disconnect, possibly through another node.
            self.handle.close(super::hub::CloseReason::Kicked);
            return Verdict::Skip;
        }
        let verdict = self.handle.subs(|subs| subs.check(d));
        if matches!(verdict, Verdict::Skip) {
            return verdict;
        }
        match (d.channel.kind(), &*d.event) {
            (Kind::User, "room.left") => self.on_room_left(&d.frame),
            (Kind::Global, "announcement") if !self.on_announcement(&d.frame) => {
                return Verdict::Skip;
            }
            _ => {}
        }
        verdict
    }

    /// An announcement arrived live: false when the `announce` rules do not admit this user. When
    /// delivered, remember it so [`Session::after_delivery`] moves the user's announcement cursor and
    /// no device of theirs is shown it again at login sync. (Announcements are rare: evaluating the
    /// hook per recipient here is not the event hot path.)
    fn on_announcement(&mut self, frame: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<Value>(frame) else {
            return true;
        };
        let data = &v["data"];
        if let Some(false) =
            self.engine
                .rules
                .current()
                .announce(data, &self.handle.user, &self.handle.attrs)
        {
            return false;
        }
        self.seen_announcement = data["id"].as_str().map(Box::from);
        true
    }

    /// Bookkeeping the deliveries just written asked for (backend writes stay off the fan-out path;
    /// writers call this after each batch). Announcements are rare, so this is usually a no-op.
    pub async fn after_delivery(&mut self) {
        if std::mem::take(&mut self.restore) {
            self.restore().await;
        }
        if let Some(id) = self.seen_announcement.take() {
            let cursors = &self.engine.backends.announcements;
            if let Err(e) = backend(
                "announcements.swap_announcement_cursor",
                cursors.swap_announcement_cursor(&self.handle.user, &id),
            )
            .await
            {
                tracing::warn!(user = %self.handle.user, error = %e, "Announcement cursor update failed.");
            }
        }
    }

    /// Takes a control item of the session's queue (the writer hands over everything it does not
    /// write itself): [`Outbound::Restore`] is carried out by the next [`Session::after_delivery`].
    pub fn control(&mut self, item: Outbound) {
        if matches!(item, Outbound::Restore) {
            self.restore = true;
        }
    }

    /// Registers this session in presence again, with its room presence, after the backend lost it
    /// (a Redis that restarted without its data, or a sweep while this node could not heartbeat);
    /// its focus comes back with the node's next heartbeat. Announced as if it had just connected.
    async fn restore(&mut self) {
        let e = self.engine.clone();
        let info = self.handle.info(&e.node);
        match backend(
            "presence.connect",
            e.backends.presence.connect(&info, e.config.presence_ttl),
        )
        .await
        {
            Ok(first) => {
                tracing::info!(conn = %self.handle.session, user = %self.handle.user, "Session restored in presence (the backend had lost it).");
                if first {
                    e.publish_presence(&self.handle.user).await;
                }
            }
            Err(err) => {
                // The next heartbeat finds it missing again and asks once more.
                tracing::warn!(conn = %self.handle.session, error = %err, "Presence restore failed.");
                return;
            }
        }
        let rooms: Vec<ChannelName> = self.handle.subs(|subs| {
            subs.iter()
                .filter(|(_, s)| s.room_presence)
                .map(|(c, _)| c.clone())
                .collect()
        });
        for ch in rooms {
            let joined = e.backends.presence.room_join(
                ch.id(),
                &self.handle.user,
                &self.handle.session,
                e.config.presence_ttl,
            );
            match backend("presence.room_join", joined).await {
                Ok(true) => {
                    e.publish_room_presence(ch.id(), &self.handle.user, Change::Joined)
                        .await
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(channel = %ch, error = %err, "Room presence restore failed.")
                }
            }
        }
    }

    /// Another device of this user left a room: drop this session's subscriptions to it.
    fn on_room_left(&mut self, frame: &[u8]) {
        let room = serde_json::from_slice::<Value>(frame)
            .ok()
            .and_then(|v| v["data"]["room"].as_str().map(str::to_string));
        let Some(room) = room else { return };
        for kind in [Kind::Room, Kind::Active] {
            if let Ok(ch) = ChannelName::try_of(kind, &room)
                && let Some(sub) = self.handle.subs(|subs| subs.remove(&ch))
            {
                let engine = self.engine.clone();
                let handle = self.handle.clone();
                tokio::spawn(
                    async move { release(&engine, &handle, &ch, sub.room_presence).await },
                );
            }
        }
        self.handle.set_focus(&room, false);
    }

    /// `subscribe`: join a channel; with `since`, the missed events to send after the reply.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<Position>,
    ) -> EngineResult<(Subscribed, Vec<StoredEvent>)> {
        let ch = ChannelName::parse(channel)?;
        self.engine
            .can_subscribe(&self.handle.user, &self.handle.attrs, &ch)
            .await?;
        self.subscribe_checked(ch, since).await
    }

    /// Subscribes without the permission check (own `user:` and `global` at connect, checked callers).
    pub async fn subscribe_checked(
        &mut self,
        ch: ChannelName,
        since: Option<Position>,
    ) -> EngineResult<(Subscribed, Vec<StoredEvent>)> {
        let e = self.engine.clone();
        let kind = e.kinds().of(&ch).clone();
        let (new, count) = self
            .handle
            .subs(|subs| (!subs.contains_key(&ch), subs.len()));
        if new {
            if count >= e.config.limits.subscriptions_per_connection {
                return Err(EngineError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "at most {} subscriptions per connection",
                        e.config.limits.subscriptions_per_connection
                    ),
                ));
            }
            // Join the hub first: from here on every new event is queued (see the module doc).
            // The hub's own name for the channel: deliveries carry it, so `check` finds the
            // subscription by pointer.
            let name = e.hub.subscribe(&ch, &self.handle);
            if let Err(err) = backend("broker.subscribe", e.backends.broker.subscribe(&ch)).await {
                e.hub.unsubscribe(&ch, &self.handle);
                return Err(err);
            }
            self.handle.subs(|subs| subs.insert(name, Sub::new()));
        }
        let mut replay = Vec::new();
        let mut reply = Subscribed {
            channel: ch.clone(),
            epoch: None,
            seq: None,
            recovered: true,
        };
        if kind.persist {
            let page = match &since {
                Some(s) => {
                    backend(
                        "history.read",
                        e.backends.history.read(
                            &ch,
                            s.seq,
                            None,
                            kind.history_size,
                            kind.history_age,
                        ),
                    )
                    .await
                }
                None => backend("history.position", e.backends.history.position(&ch))
                    .await
                    .map(|position| crate::backend::HistoryPage {
                        first_available: position.seq + 1,
                        position,
                        events: Vec::new(),
                    }),
            };
            let page = match page {
                Ok(p) => p,
                Err(err) => {
                    if new {
                        self.drop_sub(&ch).await;
                    }
                    return Err(err);
                }
            };
            let recovered = match &since {
                None => true,
                Some(s) => {
                    s.epoch == page.position.epoch
                        && s.seq <= page.position.seq
                        && s.seq.saturating_add(1) >= page.first_available
                }
            };
            let moved = new
                || self.handle.subs(|subs| {
                    let sub = subs.get_mut(&ch).expect("inserted above");
                    sub.epoch.as_ref() != Some(&page.position.epoch)
                });
            // The hub's copy of the epoch is taken outside the subscriptions' lock (the fan-out
            // takes the hub's, then a session's).
            let epoch = moved.then(|| e.hub.shared_epoch(&ch, page.position.epoch.clone()));
            let format = self.format;
            replay = self.handle.subs(|subs| {
                let sub = subs.get_mut(&ch).expect("inserted above");
                if let Some(epoch) = epoch {
                    // Everything up to the position read is either replayed now or predates the
                    // subscription; what comes after is (or will be) in the queue.
                    sub.epoch = Some(epoch);
                    sub.lo = page.position.seq;
                    sub.last = page.position.seq;
                }
                let (true, Some(s)) = (recovered, &since) else {
                    return Vec::new();
                };
                let hi = sub.lo;
                sub.lo = sub.lo.min(s.seq);
                page.events
                    .into_iter()
                    .filter(|ev| ev.seq <= hi)
                    .map(|ev| StoredEvent {
                        frame: match format {
                            FrameFormat::Full => replay_frame(&ev.frame),
                            FrameFormat::Compact => compact_or_same(&ev.frame),
                        },
                        ..ev
                    })
                    .collect()
            });
            if !recovered {
                crate::metrics::unrecovered(self.transport.as_str());
            }
            reply.epoch = Some(page.position.epoch);
            reply.seq = Some(page.position.seq);
            reply.recovered = recovered;
        }
        if kind.presence && ch.kind() == Kind::Room {
            let first = self.handle.subs(|subs| {
                let sub = subs.get_mut(&ch).expect("inserted above");
                !std::mem::replace(&mut sub.room_presence, true)
            });
            if first {
                let joined = backend(
                    "presence.room_join",
                    e.backends.presence.room_join(
                        ch.id(),
                        &self.handle.user,
                        &self.handle.session,
                        e.config.presence_ttl,
                    ),
                )
                .await?;
                if joined {
                    e.publish_room_presence(ch.id(), &self.handle.user, Change::Joined)
                        .await;
                }
            }
        }
        Ok((reply, replay))
    }

    async fn drop_sub(&mut self, ch: &ChannelName) -> Option<()> {
        let sub = self.handle.subs(|subs| subs.remove(ch))?;
        release(&self.engine, &self.handle, ch, sub.room_presence).await;
        Some(())
    }

    /// `unsubscribe`.
    pub async fn unsubscribe(&mut self, channel: &str) -> EngineResult<Unsubscribed> {
        let ch = ChannelName::parse(channel)?;
        let was_subscribed = self.drop_sub(&ch).await.is_some();
        Ok(Unsubscribed {
            channel: ch,
            subscribed: false,
            was_subscribed,
        })
    }

    /// `publish` from the client.
    pub async fn publish(
        &mut self,
        channel: &str,
        event: String,
        data: Box<serde_json::value::RawValue>,
        idempotency_key: Option<String>,
    ) -> EngineResult<PublishReply> {
        let ch = ChannelName::parse(channel)?;
        self.engine
            .can_publish(&self.handle.user, &self.handle.attrs, &ch, &event)
            .await?;
        self.engine
            .publish(PublishRequest {
                event,
                targets: vec![ch],
                from: Some(self.handle.user.clone()),
                data,
                idempotency_key,
                source: Source::Client,
                attrs: Some(self.handle.attrs.clone()),
            })
            .await
    }

    /// `ack`: this device has the event, and those before it on the channel: the user's `unacked`
    /// push fallbacks up to `seq` on the channel are not sent, whichever node planned them and
    /// whichever device of the user they were for (acks are a position per user and channel).
    /// The position is capped at the last seq this session was given on the channel: an ack of a
    /// seq it never saw (a buggy client, a seq from another epoch) cannot silence later fallbacks.
    pub async fn ack(&mut self, channel: &str, seq: Seq) -> EngineResult<Acked> {
        let ch = ChannelName::parse(channel)?;
        let Some(last) = self
            .handle
            .subs(|subs| subs.get_mut(&ch).map(|sub| sub.last))
        else {
            return Err(EngineError::new(
                ErrorCode::Forbidden,
                format!("{ch}: not subscribed"),
            ));
        };
        let upto = seq.min(last);
        let e = &self.engine;
        if e.push_enabled() && upto > 0 {
            backend(
                "outbox.push_ack",
                e.backends
                    .outbox
                    .push_ack(&self.handle.user, ch.as_str(), upto),
            )
            .await?;
        }
        Ok(Acked { channel: ch, seq })
    }

    /// `read`: everything up to `seq` in `room` is read.
    pub async fn read(&mut self, room: &str, seq: Seq) -> EngineResult<ReadMark> {
        let e = self.engine.clone();
        e.mark_read(&self.handle.user, room, seq).await
    }

    /// `focus`: the room is open on this device.
    pub async fn focus(&mut self, room: &str) -> EngineResult<Focused> {
        let e = self.engine.clone();
        let active = room_channel(Kind::Active, room)?;
        e.require_member(room, &self.handle.user).await?;
        self.subscribe_checked(active, None).await?;
        backend(
            "unread.set_focus",
            e.backends.unread.set_focus(
                room,
                &self.handle.user,
                &self.handle.session,
                e.config.presence_ttl,
            ),
        )
        .await?;
        self.handle.set_focus(room, true);
        Ok(Focused {
            room: room.into(),
            focused: true,
        })
    }

    /// `blur`: the room is no longer open.
    pub async fn blur(&mut self, room: &str) -> EngineResult<Focused> {
        let e = self.engine.clone();
        let active = room_channel(Kind::Active, room)?;
        self.drop_sub(&active).await;
        self.handle.set_focus(room, false);
        backend(
            "unread.clear_focus",
            e.backends
                .unread
                .clear_focus(room, &self.handle.user, &self.handle.session),
        )
        .await?;
        Ok(Focused {
            room: room.into(),
            focused: false,
        })
    }

    /// `typing`: an ephemeral event to `active:{room}`, at most one per room per
    /// `limits.typing_interval` (the coalesced ones are answered `sent: false`, and cost no
    /// backend call: the room's last one already passed the member check).
    pub async fn typing(&mut self, room: &str) -> EngineResult<Typing> {
        let e = self.engine.clone();
        let active = room_channel(Kind::Active, room)?;
        let interval = e.config.limits.typing_interval;
        let now = Instant::now();
        if self
            .typed
            .get(room)
            .is_some_and(|at| now.duration_since(*at) < interval)
        {
            return Ok(Typing {
                room: room.into(),
                sent: false,
            });
        }
        e.require_member(room, &self.handle.user).await?;
        let data = event_data(&TypingData {
            room,
            user: &self.handle.user,
        });
        e.publish(PublishRequest {
            event: "typing".into(),
            targets: vec![active],
            from: Some(self.handle.user.clone()),
            data,
            idempotency_key: None,
            source: Source::Client,
            attrs: Some(self.handle.attrs.clone()),
        })
        .await?;
        if !interval.is_zero() {
            if self.typed.len() >= TYPED_PRUNE_AT {
                self.typed
                    .retain(|_, at| now.duration_since(*at) < interval);
            }
            self.typed.insert(room.into(), now);
        }
        Ok(Typing {
            room: room.into(),
            sent: true,
        })
    }

    /// `status`: custom status, broadcast as `presence.changed`.
    pub async fn status(
        &mut self,
        status: Status,
        text: Option<String>,
    ) -> EngineResult<StatusSet> {
        if text.as_ref().is_some_and(|t| t.chars().count() > 256) {
            return Err(EngineError::new(
                ErrorCode::TooLarge,
                "text: at most 256 characters",
            ));
        }
        let e = self.engine.clone();
        backend(
            "presence.set_status",
            e.backends
                .presence
                .set_status(&self.handle.user, status, text.clone()),
        )
        .await?;
        e.publish_presence(&self.handle.user).await;
        Ok(StatusSet { status, text })
    }

    /// `state`: foreground or background.
    pub async fn state(&mut self, state: DeviceState) -> EngineResult<StateSet> {
        let e = self.engine.clone();
        self.handle.set_state(state);
        backend(
            "presence.set_state",
            e.backends
                .presence
                .set_state(&self.handle.user, &self.handle.session, state),
        )
        .await?;
        e.publish_presence(&self.handle.user).await;
        Ok(StateSet { state })
    }

    /// `history`: events by seq range, inclusive.
    pub async fn history(
        &mut self,
        channel: &str,
        from: Option<Seq>,
        to: Option<Seq>,
        limit: Option<usize>,
    ) -> EngineResult<History> {
        let h = &self.handle;
        self.engine
            .client_history(&h.user, &h.attrs, channel, (from, to), limit)
            .await
    }

    /// `leave`: the atomic leave (membership removed, `member.left` to the room, `room.left` to me).
    pub async fn leave(&mut self, room: &str) -> EngineResult<Left> {
        let e = self.engine.clone();
        e.leave_room(room, &self.handle.user).await
    }

    /// `presence`: current presence of users.
    pub async fn presence(&mut self, users: &[String]) -> EngineResult<PresenceOf> {
        self.engine.presence_of(users).await
    }

    /// `watch`: receive these users' `presence.changed`.
    pub async fn watch(&mut self, users: &[String]) -> EngineResult<Watching> {
        check_users("users", users, MAX_USERS_PER_OP)?;
        let e = self.engine.clone();
        e.require_watch(&self.handle.user, users).await?;
        for u in users {
            let ch = ChannelName::of(Kind::Presence, u);
            self.subscribe_checked(ch, None).await?;
        }
        let presence = e.presence_of(users).await?.presence;
        Ok(Watching {
            users: users.to_vec(),
            presence,
        })
    }

    /// `unwatch`.
    pub async fn unwatch(&mut self, users: &[String]) -> EngineResult<Unwatched> {
        check_users("users", users, MAX_USERS_PER_OP)?;
        for u in users {
            self.drop_sub(&ChannelName::of(Kind::Presence, u)).await;
        }
        Ok(Unwatched {
            users: users.to_vec(),
        })
    }

    /// The `connected` frame, ready to write (`reference`: the `connect` frame's `ref`): own
    /// channels' positions and the login sync.
    pub async fn connected_frame(&mut self, reference: Option<&Value>) -> EngineResult<Bytes> {
        let e = self.engine.clone();
        let mut channels = BTreeMap::new();
        for ch in [
            ChannelName::of(Kind::User, &self.handle.user),
            ChannelName::global(),
        ] {
            let (reply, _) = self.subscribe_checked(ch.clone(), None).await?;
            channels.insert(
                ch.to_string(),
                ChannelAt {
                    epoch: reply.epoch,
                    seq: reply.seq,
                },
            );
        }
        let sync = e.login_sync(&self.handle.user, &self.handle.attrs).await?;
        let frame = Connected {
            kind: "connected",
            conn: &self.handle.session,
            user: &self.handle.user,
            device: &self.handle.device,
            node: &e.node,
            channels,
            sync,
            typing_interval: u64::try_from(e.config.limits.typing_interval.as_millis())
                .unwrap_or(u64::MAX),
            format: (self.format != FrameFormat::Full).then(|| self.format.as_str()),
            reference,
        };
        Ok(Bytes::from(
            serde_json::to_vec(&frame).expect("connected frame serialises"),
        ))
    }
}

/// Leaves a channel in the hub and the broker, and room presence.
async fn release(engine: &Engine, handle: &SessionHandle, ch: &ChannelName, room_presence: bool) {
    if engine.hub.unsubscribe(ch, handle)
        && let Err(e) = backend("broker.unsubscribe", engine.backends.broker.unsubscribe(ch)).await
    {
        tracing::warn!(channel = %ch, error = %e, "Broker unsubscribe failed.");
    }
    if room_presence {
        match backend(
            "presence.room_leave",
            engine
                .backends
                .presence
                .room_leave(ch.id(), &handle.user, &handle.session),
        )
        .await
        {
            Ok(true) => {
                engine
                    .publish_room_presence(ch.id(), &handle.user, Change::Left)
                    .await
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(channel = %ch, error = %e, "Room presence leave failed."),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.handle.close_queue();
        // Cleanup needs the backends (async); the task outlives the socket task that dropped us.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.engine.clone();
        let handle = self.handle.clone();
        let subs: Vec<(ChannelName, bool)> = self
            .handle
            .subs(|subs| subs.take())
            .into_iter()
            .map(|(c, s)| (c, s.room_presence))
            .collect();
        let focus = self.handle.take_focus();
        let transport = self.transport;
        let code = self.handle.close_reason().map(|r| r.code());
        rt.spawn(async move {
            for (ch, rp) in &subs {
                release(&engine, &handle, ch, *rp).await;
            }
            for room in &focus {
                let _ = backend("unread.clear_focus", engine.backends.unread.clear_focus(room, &handle.user, &handle.session)).await;
            }
            engine.hub.unregister(&handle);
            crate::metrics::session_closed(transport.as_str(), code);
            match backend("presence.disconnect", engine.backends.presence.disconnect(&handle.user, &handle.session)).await {
                Ok(Some(_)) => engine.publish_presence(&handle.user).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(conn = %handle.session, error = %e, "Presence disconnect failed."),
            }
            tracing::debug!(conn = %handle.session, user = %handle.user, "Session closed.");
        });
    }
}
