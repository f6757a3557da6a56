//! Presence: the upkeep (one batched heartbeat per node per interval for every live local session, a
//! sweep that turns expired users offline, safe to run on every node; transport pings; closing
//! sessions that stopped heartbeating; restoring what the backend lost), the `presence.changed` /
//! `presence.update` frames, the queries (users, rooms, who is online), contacts (whose presence a
//! user may watch), and the HTTP heartbeat of clients without a socket.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

use super::hub::{CloseReason, Outbound};
use super::limits::{MAX_CONTACTS, MAX_USERS_PER_OP, check_id, check_users};
use super::roompresence::{Change, Offer};
use super::{Engine, EngineResult, backend};
use crate::backend::{DeliveryFilter, OutgoingPayload};
use crate::channels::{ChannelName, Kind};
use crate::event::now_ms;
use crate::presence::{SessionInfo, UserPresence};

/// Presence of some users, by user.
#[derive(Debug, Serialize)]
pub struct PresenceOf {
    /// Each user asked for.
    pub presence: BTreeMap<String, UserPresence>,
}

/// Who is present in a room.
#[derive(Debug, Serialize)]
pub struct RoomPresence {
    /// The room.
    pub room: String,
    /// The users with a live session subscribed to it.
    pub users: Vec<String>,
}

/// A user's contacts.
#[derive(Debug, Serialize)]
pub struct Contacts {
    /// The user.
    pub user: String,
    /// Whose presence they may watch, sorted.
    pub contacts: Vec<String>,
}

/// The reply to an HTTP heartbeat.
#[derive(Debug, Serialize)]
pub struct Heartbeat {
    /// The user.
    pub user: String,
    /// Always true: they are online for `ttl` seconds.
    pub online: bool,
    /// Seconds until they go offline without another heartbeat.
    pub ttl: u64,
}

/// A page of online users.
#[derive(Debug, Serialize)]
pub struct OnlineUsers {
    /// Users in id order.
    pub users: Vec<String>,
    /// Where the next page starts; none at the end.
    pub cursor: Option<String>,
}

/// How many users are online.
#[derive(Debug, Serialize)]
pub struct OnlineCount {
    /// Users with a live session.
    pub count: u64,
}

/// The heartbeat is spread over its interval: the sessions are split in up to this many slices (by
/// their id) and one slice is refreshed per tick, so each session still heartbeats once per interval
/// but a node's pings and presence writes for thousands of sessions do not all land at once (in one
/// burst they held the events published meanwhile: 100-230 ms of extra latency every interval with
/// 1,000 sessions per node and Redis).
const HEARTBEAT_SLICES: u128 = 20;
/// The shortest tick of the spread heartbeat (a short interval gets fewer slices).
const MIN_SLICE: Duration = Duration::from_millis(50);

/// How many slices a heartbeat interval of `every` is spread over.
fn slices(every: Duration) -> u64 {
    (every.as_millis() / MIN_SLICE.as_millis()).clamp(1, HEARTBEAT_SLICES) as u64
}

/// The background loop; ends at shutdown. One slice of the sessions per tick; the presence sweep
/// once per interval.
pub(crate) async fn run(engine: Engine) {
    let slices = slices(engine.config.heartbeat);
    let mut tick = tokio::time::interval(engine.config.heartbeat / slices as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let slice = n % slices;
        engine.heartbeat_slice(slice, slices).await;
        if slice == 0 {
            engine.sweep_once().await;
            engine.room_presence.sweep(tokio::time::Instant::now());
        }
    }
}

impl Engine {
    /// Refreshes presence and focus for the live local sessions of slice `slice` of `slices` (by
    /// session id), pings them, closes those silent for a TTL, and asks those the backend no longer
    /// has live to register again (a Redis that restarted without its data forgot them; they are
    /// connected here).
    pub(crate) async fn heartbeat_slice(&self, slice: u64, slices: u64) {
        let now = now_ms();
        let ttl_ms = self.config.presence_ttl.as_millis() as i64;
        let grace_ms = self.config.heartbeat.as_millis() as i64;
        let mut live = Vec::new();
        let mut alive = Vec::new();
        let mut focus = Vec::new();
        for s in self.hub.sessions_in_slice(slice, slices) {
            if let Some(at) = s.close_asked_at() {
                if now - at > grace_ms {
                    self.evict(&s).await;
                }
                continue;
            }
            if now - s.last_activity.load(Ordering::Relaxed) > ttl_ms {
                s.close(CloseReason::HeartbeatTimeout);
                continue;
            }
            alive.push((s.user.clone(), s.session.clone()));
            for room in s.focused() {
                focus.push((room, s.user.clone(), s.session.clone()));
            }
            // A queued ping; a full queue means a slow consumer anyway.
            s.send(Outbound::Ping);
            live.push(s);
        }
        if alive.is_empty() {
            return;
        }
        let ttl = self.config.presence_ttl;
        match backend(
            "presence.heartbeat",
            self.backends.presence.heartbeat(&alive, ttl),
        )
        .await
        {
            Ok(missing) => {
                if !missing.is_empty() {
                    tracing::warn!(
                        sessions = missing.len(),
                        "Presence had lost live sessions of this node; restoring them."
                    );
                }
                for i in missing {
                    if let Some(s) = live.get(i) {
                        s.send(Outbound::Restore);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sessions = alive.len(), "Presence heartbeat failed.")
            }
        }
        if let Err(e) = backend(
            "unread.refresh_focus",
            self.backends.unread.refresh_focus(&focus, ttl),
        )
        .await
        {
            tracing::warn!(error = %e, entries = focus.len(), "Focus refresh failed.");
        }
    }

    /// Forcibly removes a session whose task did not close it within a heartbeat of being asked (an
    /// SSE stream whose client stopped reading is never polled, so it cannot close itself). Its
    /// later cleanup finds nothing left to do.
    async fn evict(&self, s: &Arc<super::hub::SessionHandle>) {
        tracing::info!(conn = %s.session, user = %s.user, "Evicting a session that did not close in time.");
        for ch in self.hub.evict(s) {
            let _ = backend("broker.unsubscribe", self.backends.broker.unsubscribe(&ch)).await;
        }
        if let Ok(Some(_)) = backend(
            "presence.disconnect",
            self.backends.presence.disconnect(&s.user, &s.session),
        )
        .await
        {
            self.publish_presence(&s.user).await;
        }
    }

    /// Expires what is past its TTL (any node's sessions) and announces the changes.
    pub(crate) async fn sweep_once(&self) {
        match backend("presence.sweep", self.backends.presence.sweep()).await {
            Ok(r) => {
                for (user, _) in r.offline {
                    self.publish_presence(&user).await;
                }
                for (room, user) in r.room_left {
                    self.publish_room_presence(&room, &user, Change::Left).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "Presence sweep failed."),
        }
    }

    /// Publishes `presence.changed` for `user` to `presence:{user}` (never stored). Failures are
    /// logged: presence frames are best-effort and coalesced by the next change.
    pub async fn publish_presence(&self, user: &str) {
        let Ok(ch) = ChannelName::try_of(Kind::Presence, user) else {
            return;
        };
        let p = match backend(
            "presence.get",
            self.backends.presence.get(&[user.to_string()]),
        )
        .await
        {
            Ok(mut v) if !v.is_empty() => v.remove(0),
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(user, error = %e, "Presence read failed.");
                return;
            }
        };
        let mut frame = serde_json::to_value(&p).expect("presence serialises");
        frame["type"] = json!("presence.changed");
        self.publish_frame(ch, "presence.changed", frame, DeliveryFilter::default())
            .await;
    }

    /// Announces `user`'s room presence `change` to the room's other subscribers (never stored):
    /// at once in a quiet room, else coalesced with the room's other changes until the interval
    /// ends ([`super::roompresence`]).
    pub async fn publish_room_presence(&self, room: &str, user: &str, change: Change) {
        let interval = self.config.room_presence.interval;
        if interval.is_zero() {
            return self.send_room_presence(room, user, change).await;
        }
        let now = tokio::time::Instant::now();
        match self.room_presence.offer(room, user, change, now, interval) {
            Offer::SendNow => self.send_room_presence(room, user, change).await,
            Offer::Held(None) => {}
            Offer::Held(Some(at)) => {
                let engine = self.clone();
                let room = room.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    engine.flush_room_presence(&room).await;
                });
            }
        }
    }

    /// Sends what `room` held over its interval: one user's frame when one change was held, else one
    /// frame per kind of change naming the users.
    async fn flush_room_presence(&self, room: &str) {
        let rp = &self.config.room_presence;
        let now = tokio::time::Instant::now();
        let Some(batch) = self
            .room_presence
            .flush(room, now, rp.interval, rp.batch_max)
        else {
            return;
        };
        if let Some((change, user)) = batch.single() {
            return self.send_room_presence(room, user, change).await;
        }
        let Ok(ch) = ChannelName::try_of(Kind::Room, room) else {
            return;
        };
        for (change, users, more) in batch.groups {
            let mut frame = json!({
                "type": "presence.update", "room": room, "change": change.as_str(), "users": users,
            });
            if more > 0 {
                frame["more"] = json!(more);
            }
            self.publish_frame(
                ch.clone(),
                "presence.update",
                frame,
                DeliveryFilter::default(),
            )
            .await;
        }
    }

    /// `presence.update {room, user, change}` to the room's subscribers but `user`'s own sessions.
    async fn send_room_presence(&self, room: &str, user: &str, change: Change) {
        let Ok(ch) = ChannelName::try_of(Kind::Room, room) else {
            return;
        };
        let frame = json!({
            "type": "presence.update", "room": room, "user": user, "change": change.as_str(),
        });
        // The user's own sessions know they joined or left: only the others are told.
        let filter = DeliveryFilter {
            except: vec![user.into()],
            audience: None,
            devices: Default::default(),
        };
        self.publish_frame(ch, "presence.update", frame, filter)
            .await;
    }

    async fn publish_frame(
        &self,
        channel: ChannelName,
        event: &str,
        frame: serde_json::Value,
        filter: DeliveryFilter,
    ) {
        let payload = OutgoingPayload::Frame(Bytes::from(frame.to_string()));
        if let Err(e) = self.emit(channel, event, payload, filter).await {
            tracing::warn!(error = %e, "Presence frame publish failed.");
        }
    }

    /// The presence of `users` (at most [`MAX_USERS_PER_OP`]).
    pub async fn presence_of(&self, users: &[String]) -> EngineResult<PresenceOf> {
        check_users("users", users, MAX_USERS_PER_OP)?;
        let list = backend("presence.get", self.backends.presence.get(users)).await?;
        Ok(PresenceOf {
            presence: list.into_iter().map(|p| (p.user.clone(), p)).collect(),
        })
    }

    /// Who is present in `room`.
    pub async fn room_presence(&self, room: &str) -> EngineResult<RoomPresence> {
        check_id("room", room)?;
        let users = backend(
            "presence.room_users",
            self.backends.presence.room_users(room),
        )
        .await?;
        Ok(RoomPresence {
            room: room.into(),
            users,
        })
    }

    /// Seed 002 / 003 heartbeat for clients without a socket: keeps `user` online (and present in
    /// `room`, when given) for one presence TTL.
    pub async fn http_heartbeat(&self, user: &str, room: Option<&str>) -> EngineResult<Heartbeat> {
        check_id("user", user)?;
        // A refused heartbeat changes nothing: the room is checked before the user is online.
        if let Some(room) = room {
            check_id("room", room)?;
            self.require_member(room, user).await?;
        }
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
        if backend(
            "presence.connect",
            self.backends.presence.connect(&info, ttl),
        )
        .await?
        {
            self.publish_presence(user).await;
        }
        if let Some(room) = room
            && backend(
                "presence.room_join",
                self.backends.presence.room_join(room, user, &session, ttl),
            )
            .await?
        {
            self.publish_room_presence(room, user, Change::Online).await;
        }
        Ok(Heartbeat {
            user: user.into(),
            online: true,
            ttl: ttl.as_secs(),
        })
    }

    /// Replaces `user`'s contacts (at most [`MAX_CONTACTS`]).
    pub async fn set_contacts(&self, user: &str, contacts: &[String]) -> EngineResult<Contacts> {
        check_id("user", user)?;
        check_users("contacts", contacts, MAX_CONTACTS)?;
        backend(
            "contacts.set_contacts",
            self.backends.contacts.set_contacts(user, contacts),
        )
        .await?;
        Ok(Contacts {
            user: user.into(),
            contacts: contacts.to_vec(),
        })
    }

    /// `user`'s contacts.
    pub async fn contacts(&self, user: &str) -> EngineResult<Contacts> {
        check_id("user", user)?;
        let contacts = backend("contacts.contacts", self.backends.contacts.contacts(user)).await?;
        Ok(Contacts {
            user: user.into(),
            contacts,
        })
    }

    /// How many users are online.
    pub async fn online_count(&self) -> EngineResult<OnlineCount> {
        let count = backend(
            "presence.online_count",
            self.backends.presence.online_count(),
        )
        .await?;
        Ok(OnlineCount { count })
    }

    /// A page of online users after `cursor`, at most `limit` (1-1000).
    pub async fn online_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> EngineResult<OnlineUsers> {
        let (users, cursor) = backend(
            "presence.online_page",
            self.backends
                .presence
                .online_page(cursor, limit.clamp(1, 1000)),
        )
        .await?;
        Ok(OnlineUsers { users, cursor })
    }
}
