//! The local registry: connection handles, channel -> local subscribers, user -> local sessions.
//!
//! Sharded by channel so fan-out on one channel does not block another; locks are `std` locks held only
//! for non-blocking work (never across `.await`). Fan-out hands the same `Arc<Delivery>` (and so the
//! same frame bytes) to every subscriber: a WebSocket whose task waits idle gets it written to its
//! socket without its task ([`DirectWrite`], while the node's [`DirectBudget`] allows: by the
//! fan-out itself for its first [`INLINE_WRITES`] sockets, by writer tasks spread over the
//! runtime's threads for the rest), the others in their bounded queue; a full queue marks that
//! session for disconnection (slow consumer) and never slows the others.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::subs::{Live, Subs};
use crate::backend::{Delivery, DeliverySink};
use crate::channels::{ChannelName, Kind};
use crate::device::{DevicePolicy, DeviceState};
use crate::event::{Epoch, FrameFormat};
use crate::presence::SessionInfo;
use crate::primitives::{lock, read, reserve_tight, write};

const SHARDS: usize = 64;

/// Something for a session's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A broker delivery (shared by every local recipient).
    Deliver(Arc<Delivery>),
    /// The rest of a delivery the fan-out began writing to the socket itself ([`DirectWrite`]):
    /// the socket took the first `.1` bytes of its frame (header included), the session's task
    /// writes the others, before anything else. Already checked: written as it is.
    Rest(Arc<Delivery>, usize),
    /// A delivery already checked (the flush tick checks several at once) that the socket did not
    /// take, behind the [`Rest`](Self::Rest) of the one it stopped in: written whole, as it is, in
    /// its turn.
    Checked(Arc<Delivery>),
    /// Time to send a transport-level ping.
    Ping,
    /// The backend no longer has this session live (it lost its data, or swept the session while
    /// this node could not heartbeat): register it again, with its room presence
    /// ([`crate::engine::Session::after_delivery`] does, once the writer has seen this).
    Restore,
}

/// What a session's task waits for: the next queued item, or the signal to close (which comes first).
#[derive(Debug)]
pub enum Next {
    /// Something to write.
    Out(Outbound),
    /// The session is asked to close.
    Close(CloseReason),
}

/// A socket the fan-out may write a session's frames to itself, when the session's task is parked
/// with nothing of its own on it (a WebSocket on plain TCP). The fan-out then writes the frame from
/// the thread it runs on, in one `send()`, instead of queueing it and waking the task on whichever
/// core it sleeps: the wake-up, the task's poll and the cache lines a queue moves between cores
/// cost a delivery more than the write itself.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// What the writer needs of itself to write, read once when the fan-out is given it and kept
    /// beside the session's queue (a TCP stream's descriptor): each write is handed it back, so
    /// a fan-out need not read the writer's own allocation, one more cold cache line per delivery.
    fn token(&self) -> u64 {
        0
    }

    /// Writes `payload` as one text frame, as much of it as the socket takes now without waiting:
    /// `None` when all of it went out, else how many bytes of the frame (its header included) did;
    /// `Some(0)` when none did (the socket is full, or broken: the session's task finds out which
    /// when it writes the rest). `token` is what [`token`](Self::token) returned.
    fn write_text(&self, token: u64, payload: &[u8]) -> Option<usize>;

    /// For a writer task that sends to many sockets in one system call ([`crate::sendbatch`]):
    /// appends the frame [`write_text`](Self::write_text) would write for `payload` to `frame`
    /// and returns the descriptor to send it on, when this writer is a plain socket and the frame
    /// small; `None` (the default, `frame` untouched) to be written with `write_text`.
    fn batch_frame(&self, token: u64, payload: &[u8], frame: &mut Vec<u8>) -> Option<RawFd> {
        let _ = (token, payload, frame);
        None
    }

    /// Writes `payloads` as text frames, one after the other, as much of them as the socket takes
    /// now without waiting (one write where the writer can): how many frames went out whole, and
    /// how many bytes (header included) of the next one did.
    fn write_texts(&self, token: u64, payloads: &[&[u8]]) -> (usize, usize) {
        for (i, p) in payloads.iter().enumerate() {
            if let Some(wrote) = self.write_text(token, p) {
                return (i, wrote);
            }
        }
        (payloads.len(), 0)
    }
}

/// How the fan-out may hand a delivery to an idle WebSocket ([`SessionHandle::hand_over`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandOver {
    /// Queue it for the session's task (the node's budget says no).
    Queue,
    /// Write it to the socket now.
    Write,
    /// Leave it for a writer task to write after the fan-out.
    Defer,
    /// Queue it without waking the task: the node's flush tick does, so that what queues up
    /// meanwhile goes out in one write ([`Hub::flush_held`]).
    Hold,
}

/// What became of a delivery handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handed {
    /// Queued for the session's task, leaving the queue this deep.
    Queued(usize),
    /// Written to the socket (or dropped, as already sent).
    Written,
    /// Left in the session's deferred slot (ahead of its queue) for a writer task.
    Deferred,
    /// Queued without a wake-up, leaving the queue this deep; true when the session was not
    /// already waiting for the flush tick (the fan-out then lists it for the tick).
    Held(usize, bool),
}

/// The fan-out's writer for a session, set once it is open ([`SessionHandle::write_directly`]).
#[derive(Debug)]
struct Direct {
    socket: Arc<dyn DirectWrite>,
    /// `socket`'s [`DirectWrite::token`].
    token: u64,
    format: FrameFormat,
}

/// Whether a delivery may be written by the fan-out: everything but what the session's task must
/// act on as well as write (on `user:` channels kicks, `room.left`, sync; on `global`
/// announcements, which the `announce` rules admit per user).
fn fan_out_may_write(d: &Delivery) -> bool {
    match d.channel.kind() {
        Kind::User => false,
        Kind::Global => &*d.event != "announcement",
        _ => true,
    }
}

/// Most held deliveries the flush tick writes to one socket in one write (the rest wait for the
/// session's task): what one vectored write takes (a header and a payload slice each), more than
/// a window's worth for anything but a flood.
const HELD_BATCH: usize = 32;

/// Capacity a drained queue keeps (a queue's first allocation); a queue a burst grew past it is given
/// back once empty, so a burst does not leave an idle session holding its peak.
const QUEUE_KEEP: usize = 4;

/// A session's bounded outbound queue. Fan-out pushes, the session's task pops. A plain deque under a
/// lock with one waker, which also carries the close signal: nothing allocated until something is
/// queued, where tokio's mpsc cost ~0.75 KiB per session (cache-padded halves, a 32-slot first
/// block), and most sessions are idle.
///
/// The fields are laid out in the order a fan-out reads them, right after the lock: what decides
/// whether it may write, the socket, then the subscription it checks (`repr(C)`, so they share the
/// lock's cache lines rather than wherever the compiler puts them).
#[derive(Debug, Default)]
#[repr(C)]
struct Queue {
    /// A delivery a fan-out left to its writer tasks ([`SessionHandle::write_deferred`]): ahead of
    /// `items`, and outside them so that deferring allocates nothing (most sessions' queues never
    /// allocate).
    deferred: Option<Arc<Delivery>>,
    /// Where the fan-out may write this session's frames itself.
    direct: Option<Direct>,
    /// The task is parked with its queue empty and nothing of its own on the socket: the fan-out
    /// may write ([`Direct`]). Cleared when anything is queued and when the transport holds the
    /// socket; set again when the task next waits on an empty queue.
    idle: bool,
    /// The transport is using the socket (reading, or writing something of its own) and has not
    /// said it is done ([`SessionHandle::hold_socket`], [`SessionHandle::release_socket`]).
    held: bool,
    /// The session is gone: nothing more is accepted.
    closed: bool,
    /// Deliveries were queued without a wake-up and the session is listed for the flush tick
    /// ([`HandOver::Hold`]).
    held_for_tick: bool,
    /// The session's subscriptions and their positions: its task checks what it writes against
    /// them, and so does the fan-out for what it writes itself.
    subs: Subs,
    items: VecDeque<Outbound>,
    /// The session task's waker while it waits.
    waker: Option<Waker>,
}

/// Lets go of the queue's lock and wakes the session's task if it waits (the wake-up outside the
/// lock, so the task does not wake only to wait for it).
fn wake_task(mut q: std::sync::MutexGuard<'_, Queue>) {
    let waker = q.waker.take();
    drop(q);
    if let Some(w) = waker {
        w.wake();
    }
}

impl Queue {
    /// The next item for the task: the deferred delivery first.
    fn pop(&mut self) -> Option<Outbound> {
        match self.deferred.take() {
            Some(d) => Some(Outbound::Deliver(d)),
            None => self.items.pop_front(),
        }
    }

    fn len(&self) -> usize {
        self.items.len() + usize::from(self.deferred.is_some())
    }

    fn register(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
    }
}

/// Which transport a session uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket `/ws`.
    Ws,
    /// An SSE stream.
    Sse,
}

impl Transport {
    /// Its metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// Why a session is being closed (a `disconnect` code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// 4001.
    Unauthorized,
    /// 4002.
    TokenExpired,
    /// 4003.
    Forbidden,
    /// 4008: its outbound queue filled.
    SlowConsumer,
    /// 4009.
    TooManyConnections,
    /// 4010: repeated limit violations.
    BadFrameLimit,
    /// 4011: no heartbeat within the presence TTL.
    HeartbeatTimeout,
    /// 4012: closed by the API (`/users/{user}/disconnect`).
    Kicked,
    /// 1001: the node is shutting down.
    Shutdown,
    /// 1013 (RFC 6455 "try again later"): the backend is unavailable, the node is fine.
    Unavailable,
    /// 1011: the server failed (a bug, or a backend answer it cannot read).
    Internal,
    /// 1002: the client broke the WebSocket protocol (an unmasked frame, a reserved opcode or bit,
    /// a continuation with nothing to continue).
    ProtocolError,
    /// 1007: a text message that is not UTF-8.
    InvalidPayload,
    /// 1009: a message over the size limit.
    MessageTooBig,
}

impl CloseReason {
    /// The code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Unauthorized => 4001,
            CloseReason::TokenExpired => 4002,
            CloseReason::Forbidden => 4003,
            CloseReason::SlowConsumer => 4008,
            CloseReason::TooManyConnections => 4009,
            CloseReason::BadFrameLimit => 4010,
            CloseReason::HeartbeatTimeout => 4011,
            CloseReason::Kicked => 4012,
            CloseReason::Shutdown => 1001,
            CloseReason::Unavailable => 1013,
            CloseReason::Internal => 1011,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidPayload => 1007,
            CloseReason::MessageTooBig => 1009,
        }
    }

    /// A short reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token expired",
            CloseReason::Forbidden => "forbidden",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TooManyConnections => "too many connections",
            CloseReason::BadFrameLimit => "bad frame limit exceeded",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::Kicked => "disconnected by the server",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Unavailable => "backend unavailable; try again later",
            CloseReason::Internal => "internal error",
            CloseReason::ProtocolError => "websocket protocol error",
            CloseReason::InvalidPayload => "text frame is not valid UTF-8",
            CloseReason::MessageTooBig => "message too big",
        }
    }

    /// Whether the client should reconnect.
    pub fn reconnect(self) -> bool {
        matches!(
            self,
            CloseReason::SlowConsumer
                | CloseReason::HeartbeatTimeout
                | CloseReason::Shutdown
                | CloseReason::TokenExpired
                | CloseReason::Unavailable
                | CloseReason::Internal
        )
    }

    fn from_code(c: u16) -> Option<Self> {
        Some(match c {
            4001 => CloseReason::Unauthorized,
            4002 => CloseReason::TokenExpired,
            4003 => CloseReason::Forbidden,
            4008 => CloseReason::SlowConsumer,
            4009 => CloseReason::TooManyConnections,
            4010 => CloseReason::BadFrameLimit,
            4011 => CloseReason::HeartbeatTimeout,
            4012 => CloseReason::Kicked,
            1001 => CloseReason::Shutdown,
            1013 => CloseReason::Unavailable,
            1011 => CloseReason::Internal,
            1002 => CloseReason::ProtocolError,
            1007 => CloseReason::InvalidPayload,
            1009 => CloseReason::MessageTooBig,
            _ => return None,
        })
    }

    /// The `disconnect` frame.
    pub fn frame(self) -> Bytes {
        Bytes::from(format!(
            "{{\"type\":\"disconnect\",\"code\":{},\"reason\":\"{}\",\"reconnect\":{}}}",
            self.code(),
            self.text(),
            self.reconnect()
        ))
    }
}

/// A live session as the hub sees it. What a fan-out reads comes first (`repr(C)`): the close flag,
/// then the queue and its lock.
#[derive(Debug)]
#[repr(C)]
pub struct SessionHandle {
    close: AtomicU16,
    /// The flush tick's window in which a fan-out last handed this session a delivery
    /// ([`Hub::take_window_counts`]).
    window: AtomicU32,
    queue: Mutex<Queue>,
    /// Local numeric id.
    pub id: u64,
    /// Global session id (node-qualified).
    pub session: Arc<str>,
    /// User.
    pub user: Arc<str>,
    /// Device.
    pub device: Arc<str>,
    /// Platform, when known.
    pub platform: Option<Arc<str>>,
    /// WebSocket or SSE.
    pub transport: Transport,
    /// The device's app state as last set (presence keeps it too: this copy restores it there).
    background: AtomicBool,
    /// Rooms focused on this session (`focus`), refreshed in the backend by the node's heartbeat.
    focus: Mutex<Vec<Box<str>>>,
    /// JWT attrs (announcement audiences).
    pub attrs: Arc<serde_json::Map<String, serde_json::Value>>,
    capacity: usize,
    /// When its token expires (unix s).
    pub expires: Option<u64>,
    /// When the close was asked, unix ms (the reaper evicts sessions that do not close in time).
    close_at: AtomicI64,
    /// Last inbound activity, unix ms (presence heartbeats only count live sessions).
    pub last_activity: AtomicI64,
}

impl SessionHandle {
    /// A handle for the session `info` with an empty queue of at most `queue` items, closed with 4002
    /// at `expires` (unix s; a WebSocket's token expiry) by [`Hub::expired`]'s sweep.
    pub fn new(
        id: u64,
        info: &SessionInfo,
        attrs: Arc<serde_json::Map<String, serde_json::Value>>,
        queue: usize,
        expires: Option<u64>,
        transport: Transport,
    ) -> Arc<Self> {
        Arc::new(SessionHandle {
            id,
            session: info.session.clone(),
            user: info.user.clone(),
            device: info.device.clone(),
            platform: info.platform.clone(),
            transport,
            background: AtomicBool::new(info.state == DeviceState::Background),
            focus: Mutex::default(),
            attrs,
            queue: Mutex::default(),
            capacity: queue.max(1),
            expires,
            close: AtomicU16::new(0),
            window: AtomicU32::new(u32::MAX),
            close_at: AtomicI64::new(0),
            last_activity: AtomicI64::new(crate::event::now_ms()),
        })
    }

    /// Starts loading what a fan-out reads of this session ([`primitives::prefetch`]): the `Arc`'s
    /// counts, the close flag, the queue's lock, its first fields and the inline subscriptions.
    fn prefetch(self: &Arc<Self>) {
        let at = Arc::as_ptr(self).cast::<u8>().wrapping_sub(16);
        crate::primitives::prefetch(at, 5);
    }

    /// Queues something for this session; a full queue closes it (slow consumer). A best-effort
    /// delivery is skipped instead when the queue is half full: the session is falling behind, and a
    /// burst of presence changes (thousands joining a room at once) must not disconnect it.
    pub fn send(&self, o: Outbound) -> bool {
        self.push(o).is_some()
    }

    /// Hands a fan-out's delivery over as `how` allows: written to the socket (now, or by a writer
    /// task after the fan-out) when the session is idle and its subscription can take it as it
    /// is; otherwise queued as [`send`](Self::send) does. `None` when the session took nothing.
    fn hand_over(&self, d: &Arc<Delivery>, how: HandOver) -> Option<Handed> {
        let mut guard = lock(&self.queue);
        if how == HandOver::Hold {
            return self
                .push_locked(guard, Outbound::Deliver(d.clone()), true)
                .map(|(depth, first)| Handed::Held(depth, first));
        }
        let q = &mut *guard;
        if how != HandOver::Queue && q.len() == 0 && self.socket_free(q) && fan_out_may_write(d) {
            if how == HandOver::Defer {
                // Queued without waking the task, which still counts as idle: the writer finds it
                // there ([`write_deferred`](Self::write_deferred)); anything queued behind it wakes
                // the task, which then takes it first.
                q.deferred = Some(d.clone());
                return Some(Handed::Deferred);
            }
            return Some(match Self::write_live(guard, d) {
                true => Handed::Written,
                false => Handed::Queued(1),
            });
        }
        self.push_locked(guard, Outbound::Deliver(d.clone()), false)
            .map(|(depth, _)| Handed::Queued(depth))
    }

    /// Writes `d` to the idle session's socket as its subscription has it (checked under the
    /// queue's lock, which `q` holds); true when written (or dropped, as already sent). A frame the
    /// socket did not take whole, or one the subscription must check first, goes to the front of
    /// the queue for the task, which is woken.
    fn write_live(q: std::sync::MutexGuard<'_, Queue>, d: &Arc<Delivery>) -> bool {
        match Self::check_live(q, d) {
            Ok(q) => Self::write_checked(q, d),
            Err(written) => written,
        }
    }

    /// [`write_live`](Self::write_live)'s check: `Ok` with the lock when `d` is to be written to
    /// the socket now; else whether it counts as written (dropped, as already sent), a delivery the
    /// subscription must check first going to the front of the queue for the task, woken.
    fn check_live<'a>(
        mut q: std::sync::MutexGuard<'a, Queue>,
        d: &Arc<Delivery>,
    ) -> Result<std::sync::MutexGuard<'a, Queue>, bool> {
        match q.subs.live(d) {
            Live::Skip => Err(true),
            Live::Queue => {
                Self::left_to_task(q, Outbound::Deliver(d.clone()));
                Err(false)
            }
            Live::Write if q.direct.is_some() => Ok(q),
            Live::Write => Err(false),
        }
    }

    /// [`write_live`](Self::write_live)'s write, of a delivery [`check_live`](Self::check_live)
    /// let through: true when the socket took all of it, else the task writes the rest.
    fn write_checked(q: std::sync::MutexGuard<'_, Queue>, d: &Arc<Delivery>) -> bool {
        let Some(w) = &q.direct else {
            return false;
        };
        let Some(wrote) = w.socket.write_text(w.token, d.frame_for(w.format)) else {
            return true;
        };
        // The socket is full (or gone): the task writes the rest, before anything else.
        Self::left_to_task(q, Outbound::Rest(d.clone(), wrote));
        false
    }

    /// Puts `item`, which the fan-out could not write (the rest of a frame, or a delivery its
    /// subscription must check first), at the front of the queue, for the task, woken.
    fn left_to_task(mut q: std::sync::MutexGuard<'_, Queue>, item: Outbound) {
        q.idle = false;
        q.items.push_front(item);
        wake_task(q);
    }

    /// A writer task's turn at a delivery [`hand_over`](Self::hand_over) deferred: written when it
    /// is still in its slot and the task still idle (true when written); otherwise
    /// the task, woken, takes it (unless it already did).
    fn write_deferred(&self, d: &Arc<Delivery>) -> bool {
        self.take_deferred(lock(&self.queue), d)
            .is_some_and(|q| Self::write_live(q, d))
    }

    /// [`write_deferred`](Self::write_deferred)'s claim on the socket, under the queue's lock `q`:
    /// the lock back, `d` taken from its slot, when it is still there and the task still idle;
    /// `None` otherwise (the task, woken, takes it, unless it already did).
    fn take_deferred<'a>(
        &self,
        mut q: std::sync::MutexGuard<'a, Queue>,
        d: &Arc<Delivery>,
    ) -> Option<std::sync::MutexGuard<'a, Queue>> {
        if q.closed || !q.deferred.as_ref().is_some_and(|f| Arc::ptr_eq(f, d)) {
            return None;
        }
        if !self.socket_free(&q) {
            wake_task(q);
            return None;
        }
        q.deferred = None;
        Some(q)
    }

    /// Whether a fan-out (or the flush tick) may write to the socket now: the task waits idle with
    /// nothing of its own on it, a writer is set, and the session is not closing (its last frames
    /// are the transport's).
    fn socket_free(&self, q: &Queue) -> bool {
        q.idle && !q.closed && q.direct.is_some() && self.close_reason().is_none()
    }

    /// [`send`](Self::send), with the queue's depth once queued.
    fn push(&self, o: Outbound) -> Option<usize> {
        self.push_locked(lock(&self.queue), o, false)
            .map(|(depth, _)| depth)
    }

    /// Queues `o`, waking the task, or with `hold` leaving that to the flush tick: the depth it
    /// left, and (held) whether the session was not yet waiting for the tick.
    fn push_locked(
        &self,
        mut q: std::sync::MutexGuard<'_, Queue>,
        o: Outbound,
        hold: bool,
    ) -> Option<(usize, bool)> {
        if q.closed {
            return None;
        }
        // Held, the task still waits idle: the flush tick writes it (or wakes the task). Not past a
        // quarter of the queue: a flood (800 frames a window for a client of 20,000 events a
        // second) must not fill it while it waits for the tick, which would close the session as
        // a slow consumer; past that the task is woken and writes as it would uncoalesced.
        let hold = hold && q.len() < (self.capacity / 4).max(1);
        if !hold {
            q.idle = false;
        }
        if q.len() >= (self.capacity / 2).max(1)
            && let Outbound::Deliver(d) = &o
            && d.best_effort()
        {
            drop(q);
            crate::metrics::best_effort_skipped();
            return None;
        }
        if q.len() >= self.capacity {
            drop(q);
            if self.close(CloseReason::SlowConsumer) {
                crate::metrics::slow_consumer();
            }
            return None;
        }
        q.items.push_back(o);
        let depth = q.len();
        if hold {
            let first = !std::mem::replace(&mut q.held_for_tick, true);
            return Some((depth, first));
        }
        wake_task(q);
        Some((depth, false))
    }

    /// The flush tick's turn at what was held for it: written in one write when the task still
    /// waits idle (each delivery checked as the fan-out checks it), else left to the task, woken.
    /// Returns how many deliveries it wrote; `batch` is scratch space, left empty.
    fn release_held(&self, batch: &mut Vec<Arc<Delivery>>) -> usize {
        let mut guard = lock(&self.queue);
        let q = &mut *guard;
        q.held_for_tick = false;
        let (Some(w), true) = (&q.direct, q.deferred.is_none() && self.socket_free(q)) else {
            wake_task(guard);
            return 0;
        };
        while batch.len() < HELD_BATCH {
            let Some(Outbound::Deliver(d)) = q.items.front() else {
                break;
            };
            if !fan_out_may_write(d) {
                break;
            }
            match q.subs.live(d) {
                Live::Queue => break,
                Live::Skip => {}
                Live::Write => batch.push(d.clone()),
            }
            q.items.pop_front();
        }
        let mut frames: [&[u8]; HELD_BATCH] = [&[]; HELD_BATCH];
        for (f, d) in frames.iter_mut().zip(batch.iter()) {
            *f = d.frame_for(w.format);
        }
        let (whole, part) = match batch.len() {
            0 => (0, 0),
            n => w.socket.write_texts(w.token, &frames[..n]),
        };
        let wrote = whole.min(batch.len());
        // What the socket did not take goes back to the front, checked: the task writes it
        // first, the frame it stopped in from where it stopped.
        for (i, d) in batch.drain(..).enumerate().skip(wrote).rev() {
            q.items.push_front(match i == wrote {
                true => Outbound::Rest(d, part),
                false => Outbound::Checked(d),
            });
        }
        if q.items.is_empty() {
            if q.items.capacity() > QUEUE_KEEP {
                q.items = VecDeque::new();
            }
            return wrote;
        }
        q.idle = false;
        wake_task(guard);
        wrote
    }

    /// The next queued item or the close signal (which comes first), registering the waiting task.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        if let Some(r) = self.close_reason() {
            return Poll::Ready(Next::Close(r));
        }
        let mut q = lock(&self.queue);
        if let Some(o) = q.pop() {
            return Poll::Ready(Next::Out(o));
        }
        q.register(cx);
        q.idle = q.direct.is_some() && !q.held;
        drop(q);
        // `close` sets the reason before it takes the waker: one set after the check above either
        // shows here or finds the waker just registered.
        match self.close_reason() {
            Some(r) => Poll::Ready(Next::Close(r)),
            None => Poll::Pending,
        }
    }

    /// Takes another queued item without waiting (writers drain the queue before one flush).
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut q = lock(&self.queue);
        let o = q.pop();
        if o.is_none() && q.items.capacity() > QUEUE_KEEP {
            q.items = VecDeque::new();
        }
        o
    }

    /// The session is gone: drops what is queued and refuses more (the fan-out's writer too, so
    /// the socket closes with the connection).
    pub fn close_queue(&self) {
        let mut q = lock(&self.queue);
        q.closed = true;
        q.idle = false;
        q.items = VecDeque::new();
        q.deferred = None;
        q.waker = None;
        q.direct = None;
    }

    /// Lets the fan-out write this session's deliveries in `format` to `socket` itself while the
    /// session's task is idle. The transport then brackets its own use of the socket with
    /// [`hold_socket`](Self::hold_socket) and [`release_socket`](Self::release_socket).
    pub fn write_directly(&self, socket: Arc<dyn DirectWrite>, format: FrameFormat) {
        let mut q = lock(&self.queue);
        if !q.closed {
            let token = socket.token();
            q.direct = Some(Direct {
                socket,
                token,
                format,
            });
        }
    }

    /// The transport is about to use the socket: the fan-out stops writing to it (waiting for a
    /// write it has begun) until [`release_socket`](Self::release_socket). Returns the rest of a
    /// frame the fan-out could not finish (its delivery and the bytes written), taken off the
    /// queue: the transport writes it before anything else of its own.
    pub fn hold_socket(&self) -> Option<(Arc<Delivery>, usize)> {
        let mut q = lock(&self.queue);
        q.held = true;
        q.idle = false;
        if q.deferred.is_some() || !matches!(q.items.front(), Some(Outbound::Rest(..))) {
            return None;
        }
        match q.items.pop_front() {
            Some(Outbound::Rest(d, written)) => Some((d, written)),
            _ => None,
        }
    }

    /// The transport has nothing of its own on the socket: once the task waits on an empty queue
    /// again, the fan-out may write.
    pub fn release_socket(&self) {
        lock(&self.queue).held = false;
    }

    /// Runs `f` on the session's subscriptions (under the queue's lock: the fan-out reads them).
    pub(crate) fn subs<R>(&self, f: impl FnOnce(&mut Subs) -> R) -> R {
        f(&mut lock(&self.queue).subs)
    }

    /// Asks the session to close with `reason`; true when this call set the reason (the first wins).
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .close
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.close_at
                .store(crate::event::now_ms(), Ordering::Release);
            wake_task(lock(&self.queue));
        }
        first
    }

    /// When the close was asked (unix ms), if it was.
    pub fn close_asked_at(&self) -> Option<i64> {
        self.close_reason()
            .map(|_| self.close_at.load(Ordering::Acquire))
    }

    /// The close reason, once asked.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.close.load(Ordering::Acquire))
    }

    /// Resolves when the session is asked to close (its task's other waits share the one waker).
    pub fn closing(&self) -> impl Future<Output = CloseReason> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(r) = self.close_reason() {
                return Poll::Ready(r);
            }
            lock(&self.queue).register(cx);
            match self.close_reason() {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            }
        })
    }

    /// The session as presence records it, on node `node`.
    pub fn info(&self, node: &Arc<str>) -> SessionInfo {
        SessionInfo {
            session: self.session.clone(),
            user: self.user.clone(),
            device: self.device.clone(),
            platform: self.platform.clone(),
            state: self.state(),
            node: node.clone(),
        }
    }

    /// The device's app state.
    pub fn state(&self) -> DeviceState {
        if self.background.load(Ordering::Relaxed) {
            DeviceState::Background
        } else {
            DeviceState::Foreground
        }
    }

    /// Records the device's app state.
    pub fn set_state(&self, state: DeviceState) {
        self.background
            .store(state == DeviceState::Background, Ordering::Relaxed);
    }

    /// Rooms focused on this session.
    pub fn focused(&self) -> Vec<Box<str>> {
        lock(&self.focus).clone()
    }

    /// Adds or removes a focused room; true when that changed anything.
    pub fn set_focus(&self, room: &str, focused: bool) -> bool {
        let mut f = lock(&self.focus);
        let at = f.iter().position(|r| &**r == room);
        match (at, focused) {
            (None, true) => {
                reserve_tight(&mut f);
                f.push(room.into());
                true
            }
            (Some(i), false) => {
                f.swap_remove(i);
                true
            }
            _ => false,
        }
    }

    /// Takes every focused room (the session is closing).
    pub fn take_focus(&self) -> Vec<Box<str>> {
        std::mem::take(&mut *lock(&self.focus))
    }

    /// Records inbound activity (any frame, pong, or SSE write).
    pub fn touch(&self) {
        self.last_activity
            .store(crate::event::now_ms(), Ordering::Relaxed);
    }
}

/// Where `s` is in a channel's subscriber list. By address: a scan of the list's pointers, without
/// reading each subscriber's handle (`global` lists every session of the node).
fn index_of(list: &[Arc<SessionHandle>], s: &SessionHandle) -> Option<usize> {
    list.iter().position(|x| std::ptr::eq(&**x, s))
}

/// A channel's local subscribers.
#[derive(Debug, Default)]
struct Local {
    subs: Vec<Arc<SessionHandle>>,
    /// The channel's epoch as its subscriptions keep it: one copy for all of them (and for the
    /// deliveries that carry it), rather than one per subscription and per delivery.
    epoch: Option<Epoch>,
}

/// How long one measuring window of the [`DirectBudget`] lasts.
const BUDGET_WINDOW: Duration = Duration::from_millis(100);

/// The share of one thread the fan-out may spend writing to sockets itself. Writing from the fan-out
/// makes one `send()` per delivery on the fan-out's thread; under a load that would take more, the
/// session tasks, spread over the runtime's threads and putting every frame that queued up in one
/// write, cost less per delivery.
const BUDGET_SHARE: f64 = 0.5;

/// Whether the fan-out writes to idle sockets itself: while the deliveries of the last window, at
/// what a direct write was last seen to cost, would take at most [`BUDGET_SHARE`] of a thread. The
/// cost is the fan-out thread's CPU time (not the time that passed: on a busy box a preempted
/// fan-out would look dear); while closed, the first fan-out of each window still writes directly,
/// so the cost stays current and the budget opens again when the load falls.
#[derive(Debug)]
struct DirectBudget {
    /// When the hub was made: the windows' clock.
    origin: Instant,
    /// The current window's start, ns since `origin`.
    window: AtomicU64,
    /// Deliveries handed over in the current window, and how many the fan-out wrote itself with
    /// how much CPU time (of the fan-outs that wrote any, whole).
    handed: AtomicU64,
    direct: AtomicU64,
    direct_ns: AtomicU64,
    /// What a direct write costs, ns of CPU (the last window that made any).
    cost_ns: AtomicU64,
    open: AtomicBool,
    /// The window's probe (a direct fan-out while closed) was taken.
    probed: AtomicBool,
}

impl DirectBudget {
    fn new() -> Self {
        DirectBudget {
            origin: Instant::now(),
            window: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            direct_ns: AtomicU64::new(0),
            cost_ns: AtomicU64::new(0),
            open: AtomicBool::new(true),
            probed: AtomicBool::new(false),
        }
    }

    /// Whether this fan-out may write directly: open, or the window's probe.
    fn take(&self) -> bool {
        self.open.load(Ordering::Relaxed) || !self.probed.swap(true, Ordering::Relaxed)
    }

    /// One fan-out, ending `now`: `handed` deliveries, `direct` of them written by it with `cpu_ns`
    /// of the thread's CPU time.
    fn record(&self, now: Instant, handed: u64, direct: u64, cpu_ns: u64) {
        self.handed.fetch_add(handed, Ordering::Relaxed);
        if direct > 0 {
            self.direct.fetch_add(direct, Ordering::Relaxed);
            self.direct_ns.fetch_add(cpu_ns, Ordering::Relaxed);
        }
        let at = now.saturating_duration_since(self.origin).as_nanos() as u64;
        let start = self.window.load(Ordering::Relaxed);
        let span = BUDGET_WINDOW.as_nanos() as u64;
        if at.saturating_sub(start) < span
            || self
                .window
                .compare_exchange(start, at, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // This fan-out closes the window (the counters of fan-outs running meanwhile may land in
        // either window: an estimate).
        let handed = self.handed.swap(0, Ordering::Relaxed);
        let direct = self.direct.swap(0, Ordering::Relaxed);
        let direct_ns = self.direct_ns.swap(0, Ordering::Relaxed);
        if let Some(cost) = direct_ns.checked_div(direct) {
            self.cost_ns.store(cost, Ordering::Relaxed);
        }
        let elapsed = at - start;
        let would_take = handed.saturating_mul(self.cost_ns.load(Ordering::Relaxed));
        let open = (would_take as f64) <= BUDGET_SHARE * elapsed as f64;
        self.probed.store(false, Ordering::Relaxed);
        if self.open.swap(open, Ordering::Relaxed) != open {
            tracing::debug!(
                open,
                handed,
                cost_ns = self.cost_ns.load(Ordering::Relaxed),
                "Direct writes from the fan-out switched."
            );
        }
    }
}

/// The local registry.
pub struct Hub {
    channels: Vec<RwLock<HashMap<ChannelName, Local>>>,
    sessions: Mutex<HashMap<u64, Arc<SessionHandle>>>,
    users: Mutex<HashMap<Arc<str>, Vec<u64>>>,
    /// (token expiry unix s, session id) of sessions that expire: one sweep for the node instead of a
    /// timer per connection.
    expiries: Mutex<BTreeSet<(u64, u64)>>,
    budget: Arc<DirectBudget>,
    /// Fan-outs queue their deliveries without waking the sessions' tasks, and the flush tick
    /// wakes them ([`Hub::flush_held`]): fewer, larger writes.
    coalescing: AtomicBool,
    /// The sessions with deliveries held for the next flush tick.
    held: Mutex<Vec<Arc<SessionHandle>>>,
    /// The flush tick's window (one more each tick), and since
    /// [`take_window_counts`](Self::take_window_counts) last ran, the deliveries fan-outs handed
    /// over and to how many sessions in each window, summed over the windows.
    window: AtomicU32,
    handed: AtomicU64,
    handed_sessions: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Hub {
            channels: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            sessions: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            expiries: Mutex::new(BTreeSet::new()),
            budget: Arc::new(DirectBudget::new()),
            coalescing: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            window: AtomicU32::new(0),
            handed: AtomicU64::new(0),
            handed_sessions: AtomicU64::new(0),
        }
    }

    /// Whether fan-outs hold their deliveries for the flush tick ([`flush_held`](Self::flush_held))
    /// instead of handing each over at once.
    pub fn set_coalescing(&self, on: bool) {
        self.coalescing.store(on, Ordering::Relaxed);
    }

    /// Whether fan-outs hold their deliveries for the flush tick.
    pub fn coalescing(&self) -> bool {
        self.coalescing.load(Ordering::Relaxed)
    }

    /// Deliveries fan-outs handed over since the last call, and the sessions they went to counted
    /// once per flush tick's window: their ratio is how many deliveries a coalesced write carries,
    /// or would carry (the flush tick makes one write per session and window).
    pub fn take_window_counts(&self) -> (u64, u64) {
        (
            self.handed.swap(0, Ordering::Relaxed),
            self.handed_sessions.swap(0, Ordering::Relaxed),
        )
    }

    /// The flush tick: writes what fan-outs held since the last one for each session (in one
    /// write per session, from writer tasks spread over the runtime's threads as a big fan-out's
    /// are), or wakes the session's task for it. Returns how many sessions it took up.
    pub fn flush_held(&self) -> usize {
        self.window.fetch_add(1, Ordering::Relaxed);
        let mut held = std::mem::take(&mut *lock(&self.held));
        let n = held.len();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            release_all(&held);
            return n;
        };
        for chunk in split_for_workers(&runtime, &mut held) {
            runtime.spawn(async move { release_all(&chunk) });
        }
        // The tick's own thread takes the share left.
        release_all(&held);
        n
    }

    fn shard(&self, ch: &ChannelName) -> &RwLock<HashMap<ChannelName, Local>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ch.hash(&mut h);
        &self.channels[(h.finish() as usize) % SHARDS]
    }

    /// Registers a session unless its user already has `max_per_user` here.
    pub fn register(&self, s: &Arc<SessionHandle>, max_per_user: usize) -> bool {
        let mut users = lock(&self.users);
        let list = users.entry(s.user.clone()).or_default();
        if list.len() >= max_per_user {
            if list.is_empty() {
                users.remove(&s.user);
            }
            return false;
        }
        reserve_tight(list);
        list.push(s.id);
        drop(users);
        lock(&self.sessions).insert(s.id, s.clone());
        if let Some(at) = s.expires {
            lock(&self.expiries).insert((at, s.id));
        }
        true
    }

    /// Removes a session (its subscriptions are removed by the caller).
    pub fn unregister(&self, s: &SessionHandle) {
        if let Some(at) = s.expires {
            lock(&self.expiries).remove(&(at, s.id));
        }
        lock(&self.sessions).remove(&s.id);
        let mut users = lock(&self.users);
        if let Some(list) = users.get_mut(&s.user) {
            list.retain(|id| *id != s.id);
            if list.is_empty() {
                users.remove(&s.user);
            }
        }
    }

    /// Adds a subscriber that is not one already (the session's own map of its subscriptions says
    /// which are new: only a session's task subscribes it, one op at a time). Returns the hub's own
    /// copy of the name (one `Arc` for every local subscriber and every delivery on the channel: the
    /// session keeps it, so finding a delivery's subscription compares pointers, not text). Every
    /// call is paired with one [`crate::backend::Broker::subscribe`] (the broker reference-counts).
    pub fn subscribe(&self, ch: &ChannelName, s: &Arc<SessionHandle>) -> ChannelName {
        let mut shard = write(self.shard(ch));
        let entry = shard.entry(ch.clone());
        let name = entry.key().clone();
        let list = &mut entry.or_default().subs;
        // No scan for a duplicate: `global` holds every session of the node, and looking at each
        // subscriber's handle made a connect storm of N sessions cost N^2/2 cold reads under the
        // shard's lock. The caller's own map is the record (see the doc above).
        debug_assert!(index_of(list, s).is_none(), "subscribed twice");
        reserve_tight(list);
        list.push(s.clone());
        name
    }

    /// The hub's copy of `epoch` for `ch` (equal to it): what a subscription keeps. The first
    /// subscription to see an epoch leaves it here for the others.
    pub fn shared_epoch(&self, ch: &ChannelName, epoch: Epoch) -> Epoch {
        let mut shard = write(self.shard(ch));
        let Some(local) = shard.get_mut(ch) else {
            return epoch;
        };
        match &local.epoch {
            Some(e) if *e == epoch => e.clone(),
            _ => {
                local.epoch = Some(epoch.clone());
                epoch
            }
        }
    }

    /// Removes a subscriber; true when it was one (pair it with one `Broker::unsubscribe`).
    pub fn unsubscribe(&self, ch: &ChannelName, s: &SessionHandle) -> bool {
        let mut shard = write(self.shard(ch));
        let Some(local) = shard.get_mut(ch) else {
            return false;
        };
        let Some(i) = index_of(&local.subs, s) else {
            return false;
        };
        local.subs.swap_remove(i);
        if local.subs.is_empty() {
            shard.remove(ch);
        }
        true
    }

    /// Removes a session from every channel and from the registry, without its task's help (a task
    /// stuck writing to a client that stopped reading). Returns the channels it was removed from.
    /// Scans every shard: only for rare evictions.
    pub fn evict(&self, s: &SessionHandle) -> Vec<ChannelName> {
        let mut left = Vec::new();
        for shard in &self.channels {
            let mut shard = write(shard);
            shard.retain(|ch, local| {
                let list = &mut local.subs;
                if let Some(i) = index_of(list, s) {
                    list.swap_remove(i);
                    left.push(ch.clone());
                }
                !list.is_empty()
            });
        }
        self.unregister(s);
        left
    }

    /// Sessions whose token expired by `now` (unix s), taken off the expiry list.
    pub fn expired(&self, now: u64) -> Vec<Arc<SessionHandle>> {
        let mut due = Vec::new();
        {
            let mut expiries = lock(&self.expiries);
            while let Some(&(at, id)) = expiries.first()
                && at <= now
            {
                expiries.pop_first();
                due.push(id);
            }
        }
        if due.is_empty() {
            return Vec::new();
        }
        let sessions = lock(&self.sessions);
        due.iter()
            .filter_map(|id| sessions.get(id).cloned())
            .collect()
    }

    /// Every local session.
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        lock(&self.sessions).values().cloned().collect()
    }

    /// The local sessions of slice `slice` of `slices`, by session id (the spread heartbeat's).
    pub fn sessions_in_slice(&self, slice: u64, slices: u64) -> Vec<Arc<SessionHandle>> {
        lock(&self.sessions)
            .iter()
            .filter(|(id, _)| *id % slices == slice)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// A user's local sessions.
    pub fn user_sessions(&self, user: &str) -> Vec<Arc<SessionHandle>> {
        let ids = lock(&self.users).get(user).cloned().unwrap_or_default();
        let sessions = lock(&self.sessions);
        ids.iter()
            .filter_map(|id| sessions.get(id).cloned())
            .collect()
    }

    /// A channel's local subscribers (the admin page's channel lookup).
    pub fn subscribers(&self, ch: &ChannelName) -> Vec<Arc<SessionHandle>> {
        read(self.shard(ch))
            .get(ch)
            .map(|l| l.subs.clone())
            .unwrap_or_default()
    }

    /// Whether the device policy `p` lets session `s` have an event live: by its app state and
    /// platform, and for `latest` whether it is its user's most recently connected session here.
    fn admits(&self, p: DevicePolicy, s: &SessionHandle) -> bool {
        match p {
            DevicePolicy::All => true,
            DevicePolicy::Latest => {
                lock(&self.users).get(&s.user).and_then(|l| l.last()) == Some(&s.id)
            }
            _ => p.admits(s.state(), s.platform.as_deref()),
        }
    }

    /// The sampled figures: subscriptions by transport and channels with a local subscriber (reads
    /// every shard: for the metrics sampler, not per event).
    pub fn sample(&self) -> crate::metrics::Sampled {
        let mut s = crate::metrics::Sampled::default();
        for shard in &self.channels {
            let shard = read(shard);
            s.channels += shard.len() as u64;
            for local in shard.values() {
                for sub in &local.subs {
                    match sub.transport {
                        Transport::Ws => s.ws_subscriptions += 1,
                        Transport::Sse => s.sse_subscriptions += 1,
                    }
                }
            }
        }
        s
    }

    /// Number of local sessions.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// True when no session is connected here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DeliverySink for Hub {
    fn deliver(&self, mut d: Arc<Delivery>) {
        let started = std::time::Instant::now();
        let shard = read(self.shard(&d.channel));
        let Some((name, local)) = shard.get_key_value(&d.channel) else {
            return;
        };
        let list = &local.subs;
        // Carry the hub's name (see `subscribe`) and epoch when the delivery is still ours alone to
        // change: the subscriptions find it by pointer.
        if let Some(only) = Arc::get_mut(&mut d) {
            only.channel = name.clone();
            if let (Some(p), Some(e)) = (&mut only.position, &local.epoch)
                && p.epoch == *e
            {
                p.epoch = e.clone();
            }
        }
        let filtered = !d.filter.is_empty();
        let hold = self.coalescing();
        let direct = !hold && self.budget.take();
        let cpu = if direct {
            crate::primitives::thread_cpu_ns()
        } else {
            0
        };
        // Past the first few sockets a big fan-out leaves its writes to writer tasks, spread over
        // the runtime's threads: the publish (or the Pub/Sub reader) does not wait for thousands
        // of sends on one thread.
        let runtime = if direct {
            tokio::runtime::Handle::try_current().ok()
        } else {
            None
        };
        // Where writer tasks batch their sends, the fan-out's own share is one batch too, made
        // once it has handed every delivery over (below).
        let batched = runtime.is_some() && crate::sendbatch::enabled();
        let mut inline = match (&runtime, batched) {
            (None, _) => usize::MAX,
            (Some(_), true) => 0,
            (Some(_), false) => INLINE_WRITES,
        };
        let mut deferred = Vec::new();
        let mut held = Vec::new();
        let window = self.window.load(Ordering::Relaxed);
        let (mut n, mut wrote, mut deepest, mut fresh) = (0u64, 0u64, 0usize, 0u64);
        for (i, s) in list.iter().enumerate() {
            if let Some(next) = list.get(i + 1) {
                next.prefetch();
            }
            if filtered
                && (d.filter.excludes(&s.user, &s.attrs) || !self.admits(d.filter.devices, s))
            {
                continue;
            }
            let how = match (direct, inline) {
                _ if hold => HandOver::Hold,
                (false, _) => HandOver::Queue,
                (true, 0) => HandOver::Defer,
                (true, _) => HandOver::Write,
            };
            match s.hand_over(&d, how) {
                None => continue,
                Some(Handed::Queued(depth)) => deepest = deepest.max(depth),
                Some(Handed::Held(depth, first)) => {
                    deepest = deepest.max(depth);
                    if first {
                        if held.is_empty() {
                            held.reserve_exact(list.len() - i);
                        }
                        held.push(s.clone());
                    }
                }
                Some(Handed::Written) => {
                    wrote += 1;
                    inline -= 1;
                }
                Some(Handed::Deferred) => {
                    // Sized once, at the first, for all that may follow (growing it by doubling
                    // moved it ~10 times in a thousand-member fan-out).
                    if deferred.is_empty() {
                        deferred.reserve_exact(list.len() - i);
                    }
                    deferred.push(s.clone());
                }
            }
            n += 1;
            // Racing fan-outs may both count a session: an estimate.
            if s.window.load(Ordering::Relaxed) != window {
                s.window.store(window, Ordering::Relaxed);
                fresh += 1;
            }
        }
        drop(shard);
        if n > 0 {
            self.handed.fetch_add(n, Ordering::Relaxed);
            self.handed_sessions.fetch_add(fresh, Ordering::Relaxed);
        }
        if !held.is_empty() {
            lock(&self.held).append(&mut held);
        }
        if batched && !deferred.is_empty() {
            let own = deferred.len().min(INLINE_WRITES);
            wrote += write_all_deferred(&deferred[..own], &d);
            deferred.drain(..own);
        }
        let done = std::time::Instant::now();
        let cpu = if wrote > 0 {
            crate::primitives::thread_cpu_ns().saturating_sub(cpu)
        } else {
            0
        };
        self.budget.record(done, n, wrote, cpu);
        crate::metrics::fanned_out(n, wrote, deepest, started, done);
        if let Some(runtime) = runtime
            && !deferred.is_empty()
        {
            spawn_writers(&runtime, &self.budget, &d, deferred);
        }
    }
}

/// The flush tick's part for `sessions` ([`Hub::flush_held`]).
fn release_all(sessions: &[Arc<SessionHandle>]) {
    let mut batch = Vec::with_capacity(HELD_BATCH);
    let mut wrote = 0;
    for (i, s) in sessions.iter().enumerate() {
        if let Some(next) = sessions.get(i + 1) {
            next.prefetch();
        }
        wrote += s.release_held(&mut batch) as u64;
    }
    crate::metrics::flushed_held(sessions.len() as u64, wrote);
}

/// How many sockets a fan-out writes to itself before it leaves the rest to writer tasks (with
/// io_uring, in one batch once it handed every delivery over; else as it goes).
const INLINE_WRITES: usize = 64;

/// The fewest sockets a writer task takes.
const WRITER_CHUNK: usize = 128;

/// Splits `sessions` into one share per runtime thread (each at least [`WRITER_CHUNK`]), taken off
/// its end: the first share left in `sessions` itself, the others yielded.
fn split_for_workers<'a>(
    runtime: &tokio::runtime::Handle,
    sessions: &'a mut Vec<Arc<SessionHandle>>,
) -> impl Iterator<Item = Vec<Arc<SessionHandle>>> + 'a {
    let tasks = runtime
        .metrics()
        .num_workers()
        .clamp(1, sessions.len().div_ceil(WRITER_CHUNK).max(1));
    let per_task = sessions.len().div_ceil(tasks).max(1);
    std::iter::from_fn(move || {
        (sessions.len() > per_task).then(|| sessions.split_off(sessions.len() - per_task))
    })
}

/// Writes the deliveries a fan-out deferred: in one task per runtime thread (each at least
/// [`WRITER_CHUNK`] sockets), which the idle threads take up.
fn spawn_writers(
    runtime: &tokio::runtime::Handle,
    budget: &Arc<DirectBudget>,
    d: &Arc<Delivery>,
    mut sessions: Vec<Arc<SessionHandle>>,
) {
    let spawn = |chunk: Vec<Arc<SessionHandle>>| {
        let (budget, d) = (budget.clone(), d.clone());
        runtime.spawn(async move {
            let cpu = crate::primitives::thread_cpu_ns();
            let wrote = write_all_deferred(&chunk, &d);
            let cpu = crate::primitives::thread_cpu_ns().saturating_sub(cpu);
            budget.record(Instant::now(), 0, wrote, cpu);
            crate::metrics::written_directly(wrote);
        });
    };
    for chunk in split_for_workers(runtime, &mut sessions) {
        spawn(chunk);
    }
    spawn(sessions);
}

/// A writer task's scratch space, kept by its thread.
#[derive(Default)]
struct SendScratch {
    /// The frames of one batch, one after the other.
    frames: Vec<u8>,
    /// Each send's descriptor and frame (in `frames`).
    jobs: Vec<(RawFd, std::ops::Range<usize>)>,
    /// What each send wrote ([`crate::sendbatch::send_all`]).
    sent: Vec<isize>,
    /// Sessions whose queue was locked when the batch came to them: written after it, one by one.
    later: Vec<usize>,
}

thread_local! {
    static SEND_SCRATCH: std::cell::RefCell<SendScratch> = std::cell::RefCell::default();
}

/// A writer task's turn at the sessions a fan-out deferred `d` for ([`SessionHandle::write_deferred`]
/// for each), with the sends of up to [`crate::sendbatch::MOST`] sockets at a time in one system
/// call. Each socket is written under its queue's lock, as a single write is: the batch takes the
/// locks it can without waiting (it holds others meanwhile: waiting could deadlock with another
/// batch), and writes the sessions whose lock was taken after it, one by one. Returns how many
/// deliveries were written (or dropped, as already sent).
fn write_all_deferred(chunk: &[Arc<SessionHandle>], d: &Arc<Delivery>) -> u64 {
    let one_by_one = |sessions: &[Arc<SessionHandle>]| {
        let mut wrote = 0;
        for (i, s) in sessions.iter().enumerate() {
            if let Some(next) = sessions.get(i + 1) {
                next.prefetch();
            }
            wrote += u64::from(s.write_deferred(d));
        }
        wrote
    };
    if !crate::sendbatch::enabled() {
        return one_by_one(chunk);
    }
    SEND_SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return one_by_one(chunk);
        };
        let b = &mut *scratch;
        let mut wrote = 0;
        for part in chunk.chunks(crate::sendbatch::MOST) {
            b.frames.clear();
            b.jobs.clear();
            b.later.clear();
            let mut locked: smallvec::SmallVec<
                [std::sync::MutexGuard<'_, Queue>; crate::sendbatch::MOST],
            > = smallvec::SmallVec::new();
            for (i, s) in part.iter().enumerate() {
                if let Some(next) = part.get(i + 1) {
                    next.prefetch();
                }
                let q = match s.queue.try_lock() {
                    Ok(q) => q,
                    Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        b.later.push(i);
                        continue;
                    }
                };
                let Some(q) = s.take_deferred(q, d) else {
                    continue;
                };
                let q = match SessionHandle::check_live(q, d) {
                    Ok(q) => q,
                    Err(written) => {
                        wrote += u64::from(written);
                        continue;
                    }
                };
                let start = b.frames.len();
                let fd = q.direct.as_ref().and_then(|w| {
                    w.socket
                        .batch_frame(w.token, d.frame_for(w.format), &mut b.frames)
                });
                match fd {
                    Some(fd) => {
                        b.jobs.push((fd, start..b.frames.len()));
                        locked.push(q);
                    }
                    None => wrote += u64::from(SessionHandle::write_checked(q, d)),
                }
            }
            crate::sendbatch::send_all(&b.jobs, &b.frames, &mut b.sent);
            for ((q, (_, frame)), &sent) in locked.drain(..).zip(&b.jobs).zip(&b.sent) {
                if usize::try_from(sent) == Ok(frame.len()) {
                    wrote += 1;
                } else {
                    // The socket is full (or gone): the task writes the rest, before anything else.
                    let took = usize::try_from(sent).unwrap_or(0);
                    SessionHandle::left_to_task(q, Outbound::Rest(d.clone(), took));
                }
            }
            for &i in &b.later {
                wrote += u64::from(part[i].write_deferred(d));
            }
        }
        wrote
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceState;

    fn session(hub: &Hub, id: u64, transport: Transport) -> Arc<SessionHandle> {
        let info = SessionInfo {
            session: format!("n:{id}").into(),
            user: format!("u{id}").into(),
            device: format!("d{id}").into(),
            platform: None,
            state: DeviceState::Foreground,
            node: "n".into(),
        };
        let s = SessionHandle::new(id, &info, Arc::default(), 8, None, transport);
        assert!(hub.register(&s, 16));
        s
    }

    #[test]
    fn the_sample_counts_subscriptions_by_transport_and_channels() {
        let hub = Hub::new();
        let ws = session(&hub, 1, Transport::Ws);
        let sse = session(&hub, 2, Transport::Sse);
        let a = ChannelName::parse("room:a").unwrap();
        let b = ChannelName::parse("room:b").unwrap();
        hub.subscribe(&a, &ws);
        hub.subscribe(&b, &ws);
        hub.subscribe(&a, &sse);
        let s = hub.sample();
        assert_eq!(
            (s.ws_subscriptions, s.sse_subscriptions, s.channels),
            (2, 1, 2)
        );
        hub.unsubscribe(&b, &ws);
        let s = hub.sample();
        assert_eq!(
            (s.ws_subscriptions, s.sse_subscriptions, s.channels),
            (1, 1, 1)
        );
    }

    /// A socket taking at most `.1` bytes per write; what it took.
    #[derive(Debug)]
    struct Takes(Mutex<Vec<u8>>, usize);

    impl DirectWrite for Takes {
        fn write_text(&self, _: u64, payload: &[u8]) -> Option<usize> {
            let mut frame = vec![0x81, payload.len() as u8];
            frame.extend_from_slice(payload);
            let n = frame.len().min(self.1);
            lock(&self.0).extend_from_slice(&frame[..n]);
            (n < frame.len()).then_some(n)
        }
    }

    fn delivery(ch: &ChannelName, epoch: &Epoch, seq: u64, frame: &'static [u8]) -> Arc<Delivery> {
        Arc::new(Delivery {
            channel: ch.clone(),
            position: Some(crate::event::Position {
                epoch: epoch.clone(),
                seq,
            }),
            event: "m".into(),
            frame: Bytes::from_static(frame),
            filter: Default::default(),
            compact: Default::default(),
        })
    }

    #[test]
    fn the_fan_out_writes_to_an_idle_session_once_and_hands_what_did_not_fit_to_the_transport() {
        let hub = Hub::new();
        let ch = ChannelName::parse("room:a").unwrap();
        let e = Epoch::new("e1");
        let (s, socket) = writer(&hub, 1, &ch, &e, 12);
        let mut cx = Context::from_waker(Waker::noop());
        // Not idle before the task waits on its empty queue.
        let first = delivery(&ch, &e, 1, b"one");
        assert_eq!(
            s.hand_over(&first, HandOver::Write),
            Some(Handed::Queued(1))
        );
        assert!(matches!(
            s.poll_next(&mut cx),
            Poll::Ready(Next::Out(Outbound::Deliver(_)))
        ));
        assert!(s.poll_next(&mut cx).is_pending());
        // Idle: written by the fan-out, and a second copy of seq 1 dropped.
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 2, b"two"), HandOver::Write),
            Some(Handed::Written)
        );
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 2, b"two"), HandOver::Write),
            Some(Handed::Written)
        );
        assert_eq!(lock(&socket.0).as_slice(), b"\x81\x03two");
        // Not when the node's budget says no.
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 3, b"three"), HandOver::Queue),
            Some(Handed::Queued(1))
        );
        assert!(matches!(
            s.poll_next(&mut cx),
            Poll::Ready(Next::Out(Outbound::Deliver(_)))
        ));
        assert!(s.poll_next(&mut cx).is_pending());
        // Half written: the rest is the transport's to write first, taken when it holds the socket.
        let long = delivery(&ch, &e, 4, b"a frame too long for one write");
        assert_eq!(s.hand_over(&long, HandOver::Write), Some(Handed::Queued(1)));
        let after = delivery(&ch, &e, 5, b"five");
        assert_eq!(
            s.hand_over(&after, HandOver::Write),
            Some(Handed::Queued(2))
        );
        let (rest, written) = s.hold_socket().expect("the rest of seq 4");
        assert!(Arc::ptr_eq(&rest, &long));
        assert_eq!(written, 12);
        // Held: queued behind it, whatever the queue's state.
        assert!(
            matches!(s.poll_next(&mut cx), Poll::Ready(Next::Out(Outbound::Deliver(d))) if Arc::ptr_eq(&d, &after))
        );
        assert!(s.poll_next(&mut cx).is_pending());
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 6, b"six"), HandOver::Write),
            Some(Handed::Queued(1))
        );
        s.release_socket();
        assert!(s.poll_next(&mut cx).is_ready());
        assert!(s.poll_next(&mut cx).is_pending());
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 7, b"seven"), HandOver::Write),
            Some(Handed::Written)
        );
        // Closing: the transport's last frames only.
        s.close(CloseReason::Shutdown);
        assert_eq!(
            s.hand_over(&delivery(&ch, &e, 8, b"eight"), HandOver::Write),
            Some(Handed::Queued(1))
        );
    }

    /// WebSocket session `id`, subscribed to `ch` at epoch `e`, whose socket the fan-out may write
    /// to (taking `takes` bytes a write).
    fn writer(
        hub: &Hub,
        id: u64,
        ch: &ChannelName,
        e: &Epoch,
        takes: usize,
    ) -> (Arc<SessionHandle>, Arc<Takes>) {
        let s = session(hub, id, Transport::Ws);
        s.subs(|subs| {
            let mut sub = super::super::subs::Sub::new();
            sub.epoch = Some(e.clone());
            subs.insert(ch.clone(), sub);
        });
        let socket = Arc::new(Takes(Mutex::default(), takes));
        s.write_directly(socket.clone(), FrameFormat::Full);
        (s, socket)
    }

    /// The session's task waits on its empty queue: idle.
    fn park(s: &SessionHandle) {
        assert!(
            s.poll_next(&mut Context::from_waker(Waker::noop()))
                .is_pending()
        );
    }

    #[test]
    fn held_deliveries_wait_for_the_tick_and_go_out_together_checked_and_in_order() {
        let hub = Hub::new();
        let ch = ChannelName::parse("room:a").unwrap();
        let e = Epoch::new("e1");
        let mut cx = Context::from_waker(Waker::noop());
        let (s, socket) = writer(&hub, 1, &ch, &e, 64);
        park(&s);
        // Held: nothing written, the task not woken (it still waits idle).
        let one = delivery(&ch, &e, 1, b"one");
        let two = delivery(&ch, &e, 2, b"two");
        assert_eq!(
            s.hand_over(&one, HandOver::Hold),
            Some(Handed::Held(1, true))
        );
        assert_eq!(
            s.hand_over(&two, HandOver::Hold),
            Some(Handed::Held(2, false))
        );
        assert!(lock(&socket.0).is_empty());
        // The tick writes both in order; the task finds nothing left.
        let mut batch = Vec::new();
        assert_eq!(s.release_held(&mut batch), 2);
        assert_eq!(lock(&socket.0).as_slice(), b"\x81\x03one\x81\x03two");
        assert!(s.poll_next(&mut cx).is_pending());
        // What was sent already is dropped by the tick's check, the next one written.
        let three = delivery(&ch, &e, 3, b"three");
        assert_eq!(
            s.hand_over(&two, HandOver::Hold),
            Some(Handed::Held(1, true))
        );
        assert_eq!(
            s.hand_over(&three, HandOver::Hold),
            Some(Handed::Held(2, false))
        );
        assert_eq!(s.release_held(&mut batch), 1);
        assert!(lock(&socket.0).ends_with(b"\x81\x03two\x81\x05three"));
        // The socket stops mid-frame: the rest of that frame, then the frame after it whole, are
        // the task's, in order, written as they are.
        let long = delivery(
            &ch,
            &e,
            4,
            b"a frame far too long for the sixty-four bytes this socket takes in one write",
        );
        let five = delivery(&ch, &e, 5, b"five");
        s.hand_over(&long, HandOver::Hold);
        s.hand_over(&five, HandOver::Hold);
        assert_eq!(s.release_held(&mut batch), 0);
        let (rest, written) = s.hold_socket().expect("the rest of seq 4");
        assert!(Arc::ptr_eq(&rest, &long));
        assert_eq!(written, 64);
        assert!(matches!(
            s.poll_next(&mut cx),
            Poll::Ready(Next::Out(Outbound::Checked(d))) if Arc::ptr_eq(&d, &five)
        ));
        s.release_socket();
        assert!(s.poll_next(&mut cx).is_pending());
        // While the transport holds the socket, the tick leaves the held ones to the task.
        let six = delivery(&ch, &e, 6, b"six");
        assert!(s.hold_socket().is_none());
        s.hand_over(&six, HandOver::Hold);
        assert_eq!(s.release_held(&mut batch), 0);
        assert!(matches!(
            s.poll_next(&mut cx),
            Poll::Ready(Next::Out(Outbound::Deliver(d))) if Arc::ptr_eq(&d, &six)
        ));
        s.release_socket();
        assert!(batch.is_empty());
    }

    #[test]
    fn while_coalescing_fan_outs_hold_and_each_tick_writes_once_per_session() {
        let hub = Hub::new();
        let ch = ChannelName::parse("room:a").unwrap();
        let e = Epoch::new("e1");
        let (a, wa) = writer(&hub, 1, &ch, &e, 1024);
        let (b, wb) = writer(&hub, 2, &ch, &e, 1024);
        for s in [&a, &b] {
            hub.subscribe(&ch, s);
            park(s);
        }
        hub.set_coalescing(true);
        hub.deliver(delivery(&ch, &e, 1, b"one"));
        hub.deliver(delivery(&ch, &e, 2, b"two"));
        assert!(lock(&wa.0).is_empty() && lock(&wb.0).is_empty());
        assert_eq!(hub.flush_held(), 2);
        for w in [&wa, &wb] {
            assert_eq!(lock(&w.0).as_slice(), b"\x81\x03one\x81\x03two");
        }
        // Four deliveries to two sessions in one window: two writes.
        assert_eq!(hub.take_window_counts(), (4, 2));
        assert_eq!(hub.flush_held(), 0);
        // Off again: the next fan-out writes at once.
        hub.set_coalescing(false);
        hub.deliver(delivery(&ch, &e, 3, b"three"));
        assert!(lock(&wa.0).ends_with(b"\x81\x05three"));
        assert_eq!(hub.flush_held(), 0);
        assert_eq!(hub.take_window_counts(), (2, 2));
    }

    #[test]
    fn a_deferred_delivery_is_written_once_by_whoever_comes_first() {
        let hub = Hub::new();
        let ch = ChannelName::parse("room:a").unwrap();
        let e = Epoch::new("e1");
        let mut cx = Context::from_waker(Waker::noop());
        let (s, socket) = writer(&hub, 1, &ch, &e, 64);
        park(&s);
        // The writer finds it still in its slot and the task still parked.
        let one = delivery(&ch, &e, 1, b"one");
        assert_eq!(s.hand_over(&one, HandOver::Defer), Some(Handed::Deferred));
        assert!(s.write_deferred(&one));
        assert!(!s.write_deferred(&one));
        assert!(s.poll_next(&mut cx).is_pending());
        assert_eq!(lock(&socket.0).as_slice(), b"\x81\x03one");
        // The task woke first (for anything) and took it: the writer leaves it.
        let two = delivery(&ch, &e, 2, b"two");
        assert_eq!(s.hand_over(&two, HandOver::Defer), Some(Handed::Deferred));
        assert!(
            matches!(s.poll_next(&mut cx), Poll::Ready(Next::Out(Outbound::Deliver(d))) if Arc::ptr_eq(&d, &two))
        );
        assert!(!s.write_deferred(&two));
        assert!(s.poll_next(&mut cx).is_pending());
        // Something queued behind it: the task takes both, in order; the writer writes nothing.
        let three = delivery(&ch, &e, 3, b"three");
        let four = delivery(&ch, &e, 4, b"four");
        assert_eq!(s.hand_over(&three, HandOver::Defer), Some(Handed::Deferred));
        assert_eq!(s.hand_over(&four, HandOver::Write), Some(Handed::Queued(2)));
        assert!(!s.write_deferred(&three));
        for d in [&three, &four] {
            assert!(
                matches!(s.poll_next(&mut cx), Poll::Ready(Next::Out(Outbound::Deliver(x))) if Arc::ptr_eq(&x, d))
            );
        }
        assert!(s.poll_next(&mut cx).is_pending());
        // The transport holds the socket (its reader woke): the writer leaves it to the task.
        let five = delivery(&ch, &e, 5, b"five");
        assert_eq!(s.hand_over(&five, HandOver::Defer), Some(Handed::Deferred));
        assert!(s.hold_socket().is_none());
        assert!(!s.write_deferred(&five));
        assert!(s.poll_next(&mut cx).is_ready());
        s.release_socket();
        assert!(s.poll_next(&mut cx).is_pending());
        assert_eq!(lock(&socket.0).as_slice(), b"\x81\x03one");
        // Half written by the writer: the rest goes to the front, for the transport.
        let long = delivery(
            &ch,
            &e,
            6,
            b"a frame far too long for the sixty-four bytes this socket takes in one write",
        );
        assert_eq!(s.hand_over(&long, HandOver::Defer), Some(Handed::Deferred));
        assert!(!s.write_deferred(&long));
        let (rest, written) = s.hold_socket().expect("the rest of seq 6");
        assert!(Arc::ptr_eq(&rest, &long));
        assert_eq!(written, 64);
        // Closed meanwhile: nothing written.
        s.release_socket();
        assert!(s.poll_next(&mut cx).is_pending());
        let seven = delivery(&ch, &e, 7, b"seven");
        assert_eq!(s.hand_over(&seven, HandOver::Defer), Some(Handed::Deferred));
        s.close_queue();
        assert!(!s.write_deferred(&seven));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_big_fan_out_leaves_its_writes_past_the_first_sockets_to_writer_tasks() {
        let hub = Hub::new();
        let ch = ChannelName::parse("room:a").unwrap();
        let e = Epoch::new("e1");
        let mut sockets = Vec::new();
        let mut sessions = Vec::new();
        for id in 0..(INLINE_WRITES + 2 * WRITER_CHUNK) as u64 {
            let (s, socket) = writer(&hub, id + 1, &ch, &e, 64);
            park(&s);
            hub.subscribe(&ch, &s);
            sockets.push(socket);
            sessions.push(s);
        }
        hub.deliver(delivery(&ch, &e, 1, b"one"));
        let written = |range: std::ops::Range<usize>| {
            sockets[range]
                .iter()
                .filter(|s| lock(&s.0).as_slice() == b"\x81\x03one")
                .count()
        };
        // The first sockets are written by the fan-out itself, before it returns.
        assert_eq!(written(0..INLINE_WRITES), INLINE_WRITES);
        let deadline = Instant::now() + Duration::from_secs(10);
        while written(0..sockets.len()) < sockets.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(written(0..sockets.len()), sockets.len());
        // Once each: the queues are empty and the tasks were never needed.
        for s in &sessions {
            park(s);
        }
    }

    #[test]
    fn push_reports_the_depth_it_left() {
        let hub = Hub::new();
        let s = session(&hub, 1, Transport::Ws);
        assert_eq!(s.push(Outbound::Ping), Some(1));
        assert_eq!(s.push(Outbound::Ping), Some(2));
        s.try_recv();
        assert_eq!(s.push(Outbound::Ping), Some(2));
    }

    #[test]
    fn the_budget_closes_when_direct_writes_would_take_half_a_thread_and_opens_again() {
        let b = DirectBudget::new();
        let t0 = b.origin;
        let ms = Duration::from_millis;
        let ns = |d: Duration| d.as_nanos() as u64;
        assert!(b.take());
        // 1,000 direct writes in 2 ms of CPU per 100 ms window: 2 %.
        b.record(t0 + ms(1), 1000, 1000, ns(ms(2)));
        b.record(t0 + ms(101), 0, 0, 0);
        assert!(b.take());
        // 30,000 deliveries in the next window at 2 µs each: 60 ms of 100.
        for i in 0..30 {
            b.record(t0 + ms(102 + i), 1000, 1000, ns(ms(2)));
        }
        b.record(t0 + ms(202), 0, 0, 0);
        // Closed: one probe per window, then the queues.
        assert!(b.take());
        assert!(!b.take());
        assert!(!b.take());
        // The probe found writes cheaper (0.5 µs): the window's 30,000 would take 15 ms.
        b.record(t0 + ms(203), 1000, 1000, ns(ms(1) / 2));
        b.record(t0 + ms(250), 29_000, 0, 0);
        b.record(t0 + ms(303), 0, 0, 0);
        assert!(b.take());
        assert!(b.take());
    }
}
