//! Shared state, one trait per concern, each stating its guarantees: [`Broker`] (fan-out to every
//! node, with the history append in the same atomic step), [`History`] (replay by seq), [`Presence`]
//! (sessions, devices, status, room presence), [`Membership`], [`Contacts`], [`Idempotency`],
//! [`Unread`] (read pointers, countable events, focus), [`Devices`] (push registrations),
//! [`Announcements`], [`Nodes`] (the node registry; in `nodes.rs`).
//!
//! No routing logic lives here, and nothing here imports `engine`, `transport` or `rules`. Every trait is
//! async and batch-friendly, designed for Redis first; `memory` is the in-process implementation (the
//! single-node product, and the reference the Redis implementation is tested against).

pub mod memory;
pub mod nodes;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::announcement::Announcement;
use crate::channels::{ChannelName, Kind};
use crate::device::{DevicePolicy, DeviceState, PushDevice};
use crate::event::{Position, Seq, StoredEvent};
use crate::presence::{SessionInfo, Status, UserPresence};
pub use nodes::{NodeInfo, NodeList, NodeSeen, Nodes};

/// A backend failure. Every operation either completes or fails with nothing half-done; what a caller
/// cannot know is whether it completed, when the backend went away after the request was sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend refused or could not be reached before the request was sent (down, loading its
    /// data, read-only, …): the operation did not happen (`unavailable`, HTTP 503).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The connection failed, or the answer did not come in time, after the request was sent: the
    /// operation may or may not have happened. Retrying a write is only safe when it is idempotent
    /// (a publish with an idempotency key: [`Outgoing::dedupe`]).
    #[error("backend outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// Anything else (`internal`).
    #[error("backend error: {0}")]
    Internal(String),
}

/// Result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;

/// How much history a channel keeps.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Most events kept (older ones are trimmed).
    pub size: usize,
    /// Oldest event replayed; enforced when reading.
    pub age: Duration,
}

/// Who a live delivery skips: filters apply to live delivery only, never to history or replay.
#[derive(Clone, Debug, Default)]
pub struct DeliveryFilter {
    /// Users whose sessions do not get the event live (e.g. the sender).
    pub except: Vec<Arc<str>>,
    /// When set, only sessions whose JWT `attrs` hold every one of these values get the event live
    /// (targeted announcements on `global`).
    pub audience: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    /// Which of a recipient's sessions get it live (the rules' `devices`).
    pub devices: DevicePolicy,
}

impl DeliveryFilter {
    /// True when `user` (with these JWT attrs) is excluded.
    pub fn excludes(&self, user: &str, attrs: &serde_json::Map<String, serde_json::Value>) -> bool {
        self.except.iter().any(|u| &**u == user)
            || self
                .audience
                .as_ref()
                .is_some_and(|a| !audience_admits(a, attrs))
    }

    /// True when the filter excludes no one.
    pub fn is_empty(&self) -> bool {
        self.except.is_empty() && self.audience.is_none() && self.devices == DevicePolicy::All
    }
}

/// True when every `audience` key equals the user's attr of the same name.
pub fn audience_admits(
    audience: &serde_json::Map<String, serde_json::Value>,
    attrs: &serde_json::Map<String, serde_json::Value>,
) -> bool {
    audience.iter().all(|(k, v)| attrs.get(k) == Some(v))
}

/// What the broker hands to every node subscribed to a channel: the encoded frame, shared by every
/// local recipient.
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: ChannelName,
    /// `Some` for stored events (the frame carries the same epoch and seq).
    pub position: Option<Position>,
    /// Event type (SSE's `event:` line), or the frame type for non-event frames.
    pub event: Arc<str>,
    /// The complete frame, as the WebSocket sends it.
    pub frame: Bytes,
    /// Live-delivery filter.
    pub filter: DeliveryFilter,
    /// The frame's compact form, made by the first local recipient that asked for it
    /// ([`Delivery::frame_for`]).
    pub compact: std::sync::OnceLock<Bytes>,
}

impl Delivery {
    /// The frame in `format`: the compact form of an event is made once per node and delivery and
    /// shared by its compact recipients; other frames have one form.
    pub fn frame_for(&self, format: crate::event::FrameFormat) -> &Bytes {
        match format {
            crate::event::FrameFormat::Full => &self.frame,
            crate::event::FrameFormat::Compact => self
                .compact
                .get_or_init(|| crate::event::compact_or_same(&self.frame)),
        }
    }

    /// Best effort: a session that is falling behind skips it rather than queueing it (README, "best
    /// effort frames"). Room presence (`presence.update`), `presence.changed`, and what `active:` channels
    /// carry unstored (typing, read receipts): momentary signals that a later one supersedes, with no
    /// seq to leave a gap in. Stored events and anything on `user:` channels (kicks, sync) never are.
    pub fn best_effort(&self) -> bool {
        self.position.is_none()
            && (matches!(self.channel.kind(), Kind::Active | Kind::Presence)
                || (self.channel.kind() == Kind::Room && &*self.event == "presence.update"))
    }
}

/// The receiving end of a node: the broker calls it for every delivery on a channel the node subscribed
/// to, in `seq` order per channel. Must not block.
pub trait DeliverySink: Send + Sync + 'static {
    /// One delivery.
    fn deliver(&self, delivery: Arc<Delivery>);
}

/// One publish to one channel.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Target channel.
    pub channel: ChannelName,
    /// Event type (or frame type for non-event frames).
    pub event: Arc<str>,
    /// For events: the body encoded once per publish (see [`crate::event::EventBody::encode`]); the
    /// broker builds the frame with the seq it assigns. For non-event frames (`presence.changed`…): the
    /// whole frame, with `persist` `None`.
    pub payload: OutgoingPayload,
    /// Store in history and assign a seq, with these limits; `None` = ephemeral.
    pub persist: Option<HistoryLimits>,
    /// Live-delivery filter.
    pub filter: DeliveryFilter,
    /// Unread bookkeeping to do in the same atomic step as the append (see [`UnreadStep`]). Applies to
    /// stored events on `room:` channels only ([`Outgoing::unread_room`]); `None` costs nothing.
    pub unread: Option<UnreadStep>,
    /// For a stored event published under an idempotency key claimed with [`Idempotency::idem_begin`]: the
    /// key. The append and the record "stored on this channel at this position" under the key are one
    /// atomic step, and a publish to a channel the key's record already has returns that position
    /// without storing again: so a publish whose outcome was unknown can be sent again safely.
    pub dedupe: Option<Arc<str>>,
    /// A push plan recorded in the same backend step as the append (see [`PushStep`]); `None` costs
    /// nothing.
    pub push: Option<PushStep>,
}

/// A push plan to record with an append: queued in the outbox at once (`after` is `None`) or kept
/// as a timer due `after` from now (backend clock). The outbox entry or timer carries the seq the
/// append assigned ([`OutboxEntry::seq`]); the body is the engine's and opaque here. A timer with the
/// same id as a pending one is not added twice.
#[derive(Clone, Debug)]
pub struct PushStep {
    /// Timer id (unique per event and channel).
    pub id: Arc<str>,
    /// Delay; `None`: now.
    pub after: Option<Duration>,
    /// The plan.
    pub body: Bytes,
}

/// One claimed outbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The entry id (to finish it with).
    pub entry: String,
    /// What was queued.
    pub body: Bytes,
    /// The seq of the event it was queued with, when stored.
    pub seq: Option<Seq>,
}

/// The burst gate's answer for one push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// No window was open (one is now): send it.
    Send,
    /// A window is open: the push is held, merged with the others held, and a summary timer (id
    /// `sum:{key}`) is due when the window closes.
    Held,
}

/// Figures of the push outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Entries queued and not finished (claimed or not).
    pub queued: u64,
    /// Of those, claimed by a node and not finished.
    pub pending: u64,
    /// Timers not due yet.
    pub timers: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// Age of the oldest queued entry, ms (0 when none).
    pub oldest_ms: u64,
}

/// The push outbox: durable, shared by every node, at-least-once.
///
/// Guarantees: an entry is handed to one claimer at a time; one claimed and not finished within the
/// claim's `idle` is handed again to the next claimer (a node that died loses nothing); a timer
/// becomes an entry once, within a poll of its due time; finishing, retrying (finish + timer) and
/// dead-lettering (finish + keep) are each one atomic step. Acks only move forward. The burst gate and
/// its held pushes are atomic per key.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Queues bodies now.
    async fn push_enqueue(&self, bodies: Vec<Bytes>) -> BackendResult<()>;
    /// Keeps `body` as a timer due `after` from now (backend clock), unless one with `id` is pending.
    async fn push_schedule(&self, id: &str, after: Duration, body: Bytes) -> BackendResult<()>;
    /// Turns timers that are due into entries (at most `limit`); returns how many.
    async fn push_due(&self, limit: usize) -> BackendResult<usize>;
    /// Claims at most `count` entries for `consumer`: first, when `idle` is given, those another
    /// claimer did not finish within it, then new ones.
    async fn push_claim(
        &self,
        consumer: &str,
        count: usize,
        idle: Option<Duration>,
    ) -> BackendResult<Vec<OutboxEntry>>;
    /// Finishes an entry.
    async fn push_done(&self, entry: &str) -> BackendResult<()>;
    /// Finishes an entry and keeps `body` as timer `id` due `after` from now (a retry).
    async fn push_retry(
        &self,
        entry: &str,
        id: &str,
        after: Duration,
        body: Bytes,
    ) -> BackendResult<()>;
    /// Finishes an entry and keeps `body` in the dead letters (the newest `keep`).
    async fn push_dead(&self, entry: &str, body: Bytes, keep: usize) -> BackendResult<()>;
    /// Dead letters, newest first, at most `limit`.
    async fn push_dead_letters(&self, limit: usize) -> BackendResult<Vec<Bytes>>;
    /// Figures.
    async fn push_stats(&self) -> BackendResult<OutboxStats>;
    /// Records that `user` has `channel` up to `seq` (an ack from any of their devices).
    async fn push_ack(&self, user: &str, channel: &str, seq: Seq) -> BackendResult<()>;
    /// The ack positions of `users` on `channel` (0: none), in order.
    async fn push_acked(&self, channel: &str, users: &[String]) -> BackendResult<Vec<Seq>>;
    /// The burst gate for `key` (a user and collapse key): [`Gate::Send`] opens a window of
    /// `window`; while it is open, pushes are held (`body` replaces the last held one, the count
    /// grows) and a summary timer `sum:{key}` with body `summary` is due when it closes.
    async fn push_gate(
        &self,
        key: &str,
        window: Duration,
        body: Bytes,
        summary: Bytes,
    ) -> BackendResult<Gate>;
    /// [`Outbox::push_gate`] for many `(key, body, summary)` at once, answers in order (one round
    /// trip where the backend has them: a room's plan gates every pushed device).
    async fn push_gates(
        &self,
        window: Duration,
        gates: Vec<(String, Bytes, Bytes)>,
    ) -> BackendResult<Vec<Gate>> {
        let mut out = Vec::with_capacity(gates.len());
        for (key, body, summary) in gates {
            out.push(self.push_gate(&key, window, body, summary).await?);
        }
        Ok(out)
    }
    /// Takes what `key` holds: how many pushes and the last one; a new window of `window` opens when
    /// there were any (so a summary starts the next window).
    async fn push_take_held(
        &self,
        key: &str,
        window: Duration,
    ) -> BackendResult<Option<(u32, Bytes)>>;
}

/// The unread bookkeeping of a countable room event, folded into [`Broker::publish`] so that the
/// append and the bookkeeping are one backend step (on Redis: one round trip, one Lua script), done
/// with the seq the append assigns. Its effect is exactly that of these [`Unread`] calls, in order:
///
/// 1. [`Unread::mark_countable`]`(room, seq, keep)`;
/// 2. [`Unread::set_read`]`(from, room, seq)` when there is a sender (own events never count);
/// 3. [`Unread::set_read`]`(user, room, seq)` for every user [`Unread::focused`] on the room now (those
///    whose focus has expired are dropped, as `focused` does), except the sender.
///
/// The room is the channel's id (`room:{room}`). Nothing else is paid by publishes without one.
#[derive(Clone, Debug)]
pub struct UnreadStep {
    /// Countable seqs kept for the room (its kind's history size; at least 1).
    pub keep: usize,
    /// The sender, whose read pointer moves to the event.
    pub from: Option<Arc<str>>,
}

impl Outgoing {
    /// The room and the unread step to apply with this publish: `Some` only for a stored event
    /// (`persist` and an event body) on a `room:` channel that carries an [`UnreadStep`].
    pub fn unread_room(&self) -> Option<(&str, &UnreadStep)> {
        let step = self.unread.as_ref()?;
        let stored =
            self.persist.is_some() && matches!(self.payload, OutgoingPayload::EventBody(_));
        (stored && self.channel.kind() == Kind::Room).then(|| (self.channel.id(), step))
    }
}

/// The payload of an [`Outgoing`].
#[derive(Debug, Clone)]
pub enum OutgoingPayload {
    /// An event body; framed by [`crate::event::event_frame`].
    EventBody(Bytes),
    /// A complete frame sent as is (never stored).
    Frame(Bytes),
}

/// Fan-out to every node, and the history append in the same step.
///
/// Guarantees: for a persisted publish, the seq is assigned, the event is stored, its unread step (if
/// any, [`UnreadStep`]) is applied and it is handed to every subscribed node's sink **atomically and in
/// seq order per channel** (publishers on different nodes included): a recipient that sees the event
/// and asks for its unread counts sees the bookkeeping done. Delivery to sinks is at most once (Redis
/// Pub/Sub); the engine heals gaps from history. [`BackendError::Unavailable`] means nothing was
/// stored; [`BackendError::OutcomeUnknown`] that it may have been (send it again with
/// [`Outgoing::dedupe`] to find out).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sets the node's sink; called once at start, before any subscribe.
    fn attach(&self, sink: Arc<dyn DeliverySink>);
    /// Stores (when `persist`), applies the unread step (when [`Outgoing::unread_room`]) and fans out.
    /// Returns the event's position when stored.
    async fn publish(&self, msg: Outgoing) -> BackendResult<Option<Position>>;
    /// One more local subscriber wants deliveries for `channel`. Called once per local subscriber
    /// (the implementation reference-counts); returns once every publish that follows reaches the sink,
    /// so a caller may read history right after and miss nothing.
    async fn subscribe(&self, channel: &ChannelName) -> BackendResult<()>;
    /// One local subscriber of `channel` left (paired with a `subscribe` that returned `Ok`).
    async fn unsubscribe(&self, channel: &ChannelName) -> BackendResult<()>;
    /// Checks the backend is reachable (`/readyz`).
    async fn ping(&self) -> BackendResult<()>;
}

/// A page of history.
#[derive(Clone, Debug)]
pub struct HistoryPage {
    /// The channel's position now.
    pub position: Position,
    /// The oldest seq still served (within size and age), or `position.seq + 1` when none is.
    pub first_available: Seq,
    /// Events, oldest first.
    pub events: Vec<StoredEvent>,
}

/// Replayable, seq-numbered history per channel.
///
/// Guarantees: seqs are 1, 2, 3 … per epoch with no gap; an epoch changes only when history was lost;
/// reads enforce the age limit and return events in seq order.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// The channel's position, creating its metadata (with a fresh epoch, seq 0) when absent.
    async fn position(&self, channel: &ChannelName) -> BackendResult<Position>;
    /// Events with `after < seq <= until` (`until` = the last when `None`), at most `limit`, oldest first,
    /// none older than `max_age`.
    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<HistoryPage>;
}

/// What one sweep found expired.
#[derive(Clone, Debug, Default)]
pub struct SweepResult {
    /// Users whose last session expired, with their last_seen.
    pub offline: Vec<(String, i64)>,
    /// `(room, user)` pairs whose room presence expired.
    pub room_left: Vec<(String, String)>,
}

/// Who is connected: per user and per device, with expiry, status and room presence.
///
/// Guarantees: `connect` returns true for exactly one of any set of concurrent first sessions of a
/// user, and `disconnect`/`sweep` report "offline" exactly once when the last one goes. A session that
/// is not refreshed by `heartbeat` within its TTL expires and is reported by the next `sweep` (on any
/// node). Times are the backend's clock.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Registers (or refreshes) a session; true when the user was offline before.
    async fn connect(&self, info: &SessionInfo, ttl: Duration) -> BackendResult<bool>;
    /// Removes a session; `Some(last_seen)` when it was the user's last.
    async fn disconnect(&self, user: &str, session: &str) -> BackendResult<Option<i64>>;
    /// Extends the expiry of many `(user, session)`s and their room presence (one call per node per
    /// heartbeat). Returns the indexes (into `sessions`) of those it did not find live: expired (the
    /// node could not heartbeat in time; they may have been reported offline) or gone (a backend
    /// that lost its data). They are not revived here: the caller registers those still connected
    /// again with [`Presence::connect`] and [`Presence::room_join`], which report the changes.
    async fn heartbeat(
        &self,
        sessions: &[(Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<Vec<usize>>;
    /// Sets a session's app state.
    async fn set_state(&self, user: &str, session: &str, state: DeviceState) -> BackendResult<()>;
    /// Sets a user's custom status.
    async fn set_status(
        &self,
        user: &str,
        status: Status,
        text: Option<String>,
    ) -> BackendResult<()>;
    /// Presence of many users (in the given order).
    async fn get(&self, users: &[String]) -> BackendResult<Vec<UserPresence>>;
    /// Expires what is past its TTL and reports it.
    async fn sweep(&self) -> BackendResult<SweepResult>;
    /// Number of online users.
    async fn online_count(&self) -> BackendResult<u64>;
    /// Online users after `cursor` (ordered by id), at most `limit`; the next cursor when there are more.
    async fn online_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> BackendResult<(Vec<String>, Option<String>)>;
    /// Adds (or refreshes) a session to a room's presence; true when the user was not present before.
    async fn room_join(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<bool>;
    /// Removes a session from a room's presence; true when it was the user's last there.
    async fn room_leave(&self, room: &str, user: &str, session: &str) -> BackendResult<bool>;
    /// Users present in a room.
    async fn room_users(&self, room: &str) -> BackendResult<Vec<String>>;
}

/// The state of an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// This caller holds the key's lease: publish under the event id `id` (the key's first claim's:
    /// a caller that takes over from a publish that stopped uses the same id) with [`Outgoing::dedupe`],
    /// then `idem_complete` or `idem_release`.
    Claimed {
        /// The event id every attempt under this key publishes with.
        id: String,
    },
    /// Another publish with the key holds a live lease.
    Pending,
    /// Done before: the stored first reply.
    Done(Bytes),
}

/// Room membership, with its reverse index (the rooms of a user).
///
/// Guarantees: each call is atomic, the two directions included (a member is in the room's set and
/// the room in theirs, or neither); removing a member also drops their read pointer for the room.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Adds a member; true when new.
    async fn add_member(&self, room: &str, user: &str) -> BackendResult<bool>;
    /// Removes a member; true when they were one.
    async fn remove_member(&self, room: &str, user: &str) -> BackendResult<bool>;
    /// Members of a room, sorted.
    async fn members(&self, room: &str) -> BackendResult<Vec<String>>;
    /// Whether `user` is a member of `room`.
    async fn is_member(&self, room: &str, user: &str) -> BackendResult<bool>;
    /// Rooms of a user, sorted.
    async fn rooms_of(&self, user: &str) -> BackendResult<Vec<String>>;
}

/// Contacts: whose presence a user may watch.
///
/// Guarantees: a replacement is atomic (a reader sees the old list or the new one).
#[async_trait]
pub trait Contacts: Send + Sync + 'static {
    /// Replaces a user's contacts.
    async fn set_contacts(&self, user: &str, contacts: &[String]) -> BackendResult<()>;
    /// A user's contacts, sorted.
    async fn contacts(&self, user: &str) -> BackendResult<Vec<String>>;
}

/// Idempotency keys of publishes.
///
/// Guarantees: a key's record holds the event id of its first claim, a lease (who is publishing
/// now, until when: backend clock), the channels stored under it with their positions
/// ([`Outgoing::dedupe`]), and once done, the first reply. Each call is atomic. A lease that lapses
/// (its publisher crashed, or lost the backend) is taken over by the next claim, which publishes the
/// same event id; the dedupe records make the takeover store nothing twice, so a key always ends in
/// one stored event per target however its publishers failed. The record expires `ttl` after its
/// first claim (and again after completion).
#[async_trait]
pub trait Idempotency: Send + Sync + 'static {
    /// Claims an idempotency key with a `lease`: a new key records `id` as its event id and lives for
    /// `ttl`; a key whose lease lapsed is taken over (its first id returned); a live lease is
    /// `Pending`; a completed key returns its reply.
    async fn idem_begin(
        &self,
        key: &str,
        id: &str,
        lease: Duration,
        ttl: Duration,
    ) -> BackendResult<KeyState>;
    /// Stores the first reply for a claimed key (kept for `ttl` from now).
    async fn idem_complete(&self, key: &str, reply: Bytes, ttl: Duration) -> BackendResult<()>;
    /// Ends a claimed key's lease after a failed publish: the next claim takes it over at once (what
    /// was stored under the key stays, so the retry does not store it twice).
    async fn idem_release(&self, key: &str) -> BackendResult<()>;
}

/// Unread counts and focus (who has a room open, whose read pointer a countable event moves).
///
/// Guarantees: each call is atomic; read pointers only move forward; countable seqs are kept per
/// room up to a bound (the history size); focus entries expire with their `ttl` (so a node that
/// crashed never leaves anyone focused). The publish path's own bookkeeping rides in
/// [`Broker::publish`] ([`UnreadStep`]), with the same effect as these calls.
#[async_trait]
pub trait Unread: Send + Sync + 'static {
    /// Records `seq` of `room` as countable for unread, keeping at most `keep` of them.
    async fn mark_countable(&self, room: &str, seq: Seq, keep: usize) -> BackendResult<()>;
    /// Moves a user's read pointer in a room forward to `seq` (never back); returns the pointer after.
    async fn set_read(&self, user: &str, room: &str, seq: Seq) -> BackendResult<Seq>;
    /// Unread counts for `rooms` of a user (countable seqs after the read pointer), in the given order.
    async fn unread(&self, user: &str, rooms: &[String]) -> BackendResult<Vec<u64>>;
    /// Marks a user as focused on a room (one entry per session) until `ttl`.
    async fn set_focus(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<()>;
    /// Refreshes many focus entries `(room, user, session)` until `ttl` (one call per node per
    /// heartbeat): [`Unread::set_focus`] for each, so an entry the backend lost comes back.
    async fn refresh_focus(
        &self,
        entries: &[(Box<str>, Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<()>;
    /// Clears a session's focus.
    async fn clear_focus(&self, room: &str, user: &str, session: &str) -> BackendResult<()>;
    /// Users focused on a room now.
    async fn focused(&self, room: &str) -> BackendResult<Vec<String>>;
}

/// Push device registrations.
///
/// Guarantees: each call is atomic; one registration per (user, device id), replaced by a newer one.
#[async_trait]
pub trait Devices: Send + Sync + 'static {
    /// Registers or replaces a push device.
    async fn put_device(&self, user: &str, device: PushDevice) -> BackendResult<()>;
    /// Removes a push device; true when it existed.
    async fn delete_device(&self, user: &str, device: &str) -> BackendResult<bool>;
    /// A user's push devices, by device id.
    async fn devices(&self, user: &str) -> BackendResult<Vec<PushDevice>>;
    /// Each user's push devices, in `users` order, in one round trip (a room's push plan).
    async fn devices_of(&self, users: &[String]) -> BackendResult<Vec<Vec<PushDevice>>>;
}

/// Announcements and each user's cursor through them.
///
/// Guarantees: each call is atomic; expired announcements are never returned, and the number kept
/// is bounded (the oldest go first); a cursor only moves to greater ids.
#[async_trait]
pub trait Announcements: Send + Sync + 'static {
    /// Stores an announcement.
    async fn add_announcement(&self, a: &Announcement) -> BackendResult<()>;
    /// Unexpired announcements at `now` (unix ms), oldest first.
    async fn announcements(&self, now: i64) -> BackendResult<Vec<Announcement>>;
    /// Moves a user's announcement cursor to `id` (never back); returns the previous cursor.
    async fn swap_announcement_cursor(&self, user: &str, id: &str)
    -> BackendResult<Option<String>>;
}

/// The backends of one engine, one per concern (one implementation usually serves them all).
#[derive(Clone)]
pub struct Backends {
    /// Fan-out + history append.
    pub broker: Arc<dyn Broker>,
    /// History reads.
    pub history: Arc<dyn History>,
    /// Presence.
    pub presence: Arc<dyn Presence>,
    /// Room membership.
    pub membership: Arc<dyn Membership>,
    /// Contacts.
    pub contacts: Arc<dyn Contacts>,
    /// Idempotency keys.
    pub idempotency: Arc<dyn Idempotency>,
    /// Unread and focus.
    pub unread: Arc<dyn Unread>,
    /// Push devices.
    pub devices: Arc<dyn Devices>,
    /// Announcements.
    pub announcements: Arc<dyn Announcements>,
    /// The push outbox, timers, acks and burst gates.
    pub outbox: Arc<dyn Outbox>,
    /// The node registry.
    pub nodes: Arc<dyn Nodes>,
}

impl Backends {
    /// Every concern served by one implementation.
    pub fn of<B>(b: Arc<B>) -> Backends
    where
        B: Broker
            + History
            + Presence
            + Membership
            + Contacts
            + Idempotency
            + Unread
            + Devices
            + Announcements
            + Outbox
            + Nodes,
    {
        Backends {
            broker: b.clone(),
            history: b.clone(),
            presence: b.clone(),
            membership: b.clone(),
            contacts: b.clone(),
            idempotency: b.clone(),
            unread: b.clone(),
            devices: b.clone(),
            announcements: b.clone(),
            outbox: b.clone(),
            nodes: b,
        }
    }

    /// The backends a node runs on: Redis at `redis` (connected now, so a Redis that cannot be reached
    /// stops the start with a clear error; `ca` is a PEM file replacing the system roots for
    /// `rediss://`), or the memory backend without one.
    pub async fn open(
        redis: Option<&str>,
        ca: Option<&std::path::Path>,
        node: &str,
    ) -> Result<Backends, BackendError> {
        match redis {
            None => Ok(Backends::memory()),
            Some(url) => redis::open(url, ca, node).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Epoch;

    fn delivery(channel: &str, event: &str, stored: bool) -> Delivery {
        Delivery {
            channel: ChannelName::parse(channel).expect("valid"),
            position: stored.then(|| Position {
                epoch: Epoch::new("e1"),
                seq: 1,
            }),
            event: Arc::from(event),
            frame: bytes::Bytes::new(),
            filter: DeliveryFilter::default(),
            compact: Default::default(),
        }
    }

    #[test]
    fn only_momentary_unstored_frames_are_best_effort() {
        assert!(delivery("room:r1", "presence.update", false).best_effort());
        assert!(delivery("presence:u1", "presence.changed", false).best_effort());
        assert!(delivery("active:r1", "typing", false).best_effort());
        // Stored, or a room event that is not presence, or anything on a user's own channel: never.
        assert!(!delivery("active:r1", "typing", true).best_effort());
        assert!(!delivery("room:r1", "chat.message", false).best_effort());
        assert!(!delivery("user:u1", "herald.kick", false).best_effort());
        assert!(!delivery("global", "announcement", false).best_effort());
    }
}
