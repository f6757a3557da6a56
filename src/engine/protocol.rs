//! The client protocol of two-way transports: a client frame is parsed once into a typed [`Op`], the
//! session carries it out, and the reply (then any replayed events) comes back as frames ready to
//! write. [`drive`] is the whole life of an open session over any [`Peer`] (a WebSocket today): it
//! writes the session's queue in batches, reads the client's frames under a per-connection rate
//! limit, and says why the session ended. Transports only move bytes.
//!
//! Idle connections hold [`drive`]'s future for their whole life, and a task is as large as its
//! largest await state: every step larger than the idle wait is boxed, each in a statement of its
//! own (a temporary lives to the end of its statement, so `Box::pin(f()).await` would still keep
//! room for the unboxed `f()`).

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::hub::{CloseReason, Next, Outbound};
use super::session::{Session, Verdict};
use super::{EngineError, ErrorCode};
use crate::backend::Delivery;
use crate::config::Limits;
use crate::device::DeviceState;
use crate::event::{Position, Seq};
use crate::presence::Status;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 256;

/// What a two-way transport read from its client.
#[derive(Debug)]
pub enum Inbound {
    /// A text frame (valid UTF-8: the transport checked).
    Text(Bytes),
    /// A binary frame (not part of the protocol).
    Binary,
    /// The client closes.
    Close,
    /// A transport-level ping or pong: the client is there, nothing to answer.
    Alive,
}

/// What a two-way transport writes to its client.
#[derive(Debug)]
pub enum ToClient {
    /// A live delivery: its frame is the same bytes for every local recipient.
    Delivery(std::sync::Arc<Delivery>),
    /// A frame made for this session (a reply, a replayed event, `reset`).
    Frame(Bytes),
    /// What the fan-out left of a delivery it began writing itself: its frame less the first `.1`
    /// bytes, which the socket already took. Only for peers that gave the fan-out a writer
    /// ([`crate::engine::SessionHandle::write_directly`]), and then before anything else.
    Rest(std::sync::Arc<Delivery>, usize),
    /// A transport-level ping.
    Ping,
}

/// Why reading from or writing to a peer failed.
#[derive(Debug)]
pub enum PeerError {
    /// The connection is gone.
    Gone,
    /// The client broke the transport's protocol: close with this.
    Violation(CloseReason),
}

/// A two-way connection as [`drive`] uses it: client frames in, frames out.
pub trait Peer:
    Stream<Item = Result<Inbound, PeerError>> + Sink<ToClient, Error = PeerError> + Unpin + Send
{
}

impl<T> Peer for T where
    T: Stream<Item = Result<Inbound, PeerError>> + Sink<ToClient, Error = PeerError> + Unpin + Send
{
}

/// A client op, parsed: its name chose the variant, the frame's fields fill it.
#[derive(Debug)]
pub enum Op {
    /// `ping`.
    Ping,
    /// `connect` on an open session.
    Connect,
    /// `subscribe`.
    Subscribe(SubscribeOp),
    /// `unsubscribe`.
    Unsubscribe(ChannelOp),
    /// `publish`.
    Publish(PublishOp),
    /// `ack`.
    Ack(AckOp),
    /// `read`.
    Read(ReadOp),
    /// `focus`.
    Focus(RoomOp),
    /// `blur`.
    Blur(RoomOp),
    /// `typing`.
    Typing(RoomOp),
    /// `status`.
    Status(StatusOp),
    /// `state`.
    State(StateOp),
    /// `history`.
    History(HistoryOp),
    /// `leave`.
    Leave(RoomOp),
    /// `presence`.
    Presence(UsersOp),
    /// `watch`.
    Watch(UsersOp),
    /// `unwatch`.
    Unwatch(UsersOp),
}

/// The fields of `unsubscribe`.
#[derive(Debug, Deserialize)]
pub struct ChannelOp {
    /// The channel.
    pub channel: String,
}

/// The fields of `subscribe`.
#[derive(Debug, Deserialize)]
pub struct SubscribeOp {
    /// The channel.
    pub channel: String,
    /// Replay from here.
    pub since: Option<Position>,
}

/// The fields of `publish`.
#[derive(Debug, Deserialize)]
pub struct PublishOp {
    /// The channel.
    pub channel: String,
    /// The event type.
    pub event: String,
    /// The payload (`null` when not given).
    pub data: Option<Box<RawValue>>,
    /// The idempotency key.
    pub idempotency_key: Option<String>,
}

/// The fields of `ack`.
#[derive(Debug, Deserialize)]
pub struct AckOp {
    /// The channel.
    pub channel: String,
    /// The seq.
    pub seq: Seq,
}

/// The fields of `read`.
#[derive(Debug, Deserialize)]
pub struct ReadOp {
    /// The room.
    pub room: String,
    /// Everything up to here is read.
    pub seq: Seq,
}

/// The fields of `focus`, `blur`, `typing` and `leave`.
#[derive(Debug, Deserialize)]
pub struct RoomOp {
    /// The room.
    pub room: String,
}

/// The fields of `status`.
#[derive(Debug, Deserialize)]
pub struct StatusOp {
    /// The custom status.
    pub status: Status,
    /// Its text.
    pub text: Option<String>,
}

/// The fields of `state`.
#[derive(Debug, Deserialize)]
pub struct StateOp {
    /// The device's app state.
    pub state: DeviceState,
}

/// The fields of `history`.
#[derive(Debug, Deserialize)]
pub struct HistoryOp {
    /// The channel.
    pub channel: String,
    /// The first seq (inclusive; default 1).
    pub from: Option<Seq>,
    /// The last seq (inclusive; default the channel's last).
    pub to: Option<Seq>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// The fields of `presence`, `watch` and `unwatch`.
#[derive(Debug, Deserialize)]
pub struct UsersOp {
    /// The users.
    pub users: Vec<String>,
}

/// The `connect` frame that opens a session when the upgrade brought no token.
#[derive(Debug, Deserialize)]
pub struct ConnectFrame {
    /// The client JWT.
    pub token: String,
    /// Device id.
    pub device: Option<String>,
    /// Platform.
    pub platform: Option<String>,
    /// App state.
    pub state: Option<DeviceState>,
    /// How event frames are written: `full` (the default) or `compact`.
    pub format: Option<String>,
}

/// A client frame's `ref`, echoed in its reply: a string or a number, else null.
fn read_ref(v: &Value) -> Value {
    v.get("ref")
        .filter(|r| r.is_string() || r.is_number())
        .cloned()
        .unwrap_or(Value::Null)
}

/// The `ref` of a frame that is not carried out (too large, over the rate limit): null when the
/// frame cannot be read.
fn ref_of_text(text: &str) -> Value {
    serde_json::from_str::<Value>(text)
        .map(|v| read_ref(&v))
        .unwrap_or(Value::Null)
}

/// The `connect` frame of `text`, with its `ref`; `None` when it is not one.
pub fn parse_connect(text: &str) -> Option<(ConnectFrame, Option<Value>)> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("op").and_then(Value::as_str) != Some("connect") {
        return None;
    }
    let reference = v.get("ref").cloned();
    let frame = serde_json::from_value(v).ok()?;
    Some((frame, reference))
}

fn fields<T: serde::de::DeserializeOwned>(op: &str, v: Value) -> Result<T, EngineError> {
    serde_json::from_value(v)
        .map_err(|e| EngineError::new(ErrorCode::BadFrame, format!("{op}: {e}")))
}

fn bad_frame(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorCode::BadFrame, message)
}

/// Parses one client frame (at most `max` bytes): its `ref` (null when it cannot be read) and the
/// op, or the error to reply with.
pub fn parse(text: &str, max: usize) -> (Value, Result<Op, EngineError>) {
    if text.len() > max {
        let reference = ref_of_text(text);
        let e = EngineError::new(
            ErrorCode::TooLarge,
            format!("frame is larger than {max} bytes"),
        );
        return (reference, Err(e));
    }
    let v: Value = match serde_json::from_str(text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return (Value::Null, Err(bad_frame("a frame is one JSON object"))),
        Err(err) => return (Value::Null, Err(bad_frame(format!("invalid JSON: {err}")))),
    };
    let reference = v.get("ref").cloned().unwrap_or(Value::Null);
    if !(reference.is_null() || reference.is_string() || reference.is_number()) {
        return (
            Value::Null,
            Err(bad_frame("ref must be a string or a number")),
        );
    }
    let Some(name) = v.get("op").and_then(Value::as_str).map(str::to_string) else {
        return (reference, Err(bad_frame("missing op")));
    };
    let op = op_of(&name, v);
    (reference, op)
}

fn op_of(name: &str, v: Value) -> Result<Op, EngineError> {
    Ok(match name {
        "ping" => Op::Ping,
        "connect" => Op::Connect,
        "subscribe" => Op::Subscribe(fields(name, v)?),
        "unsubscribe" => Op::Unsubscribe(fields(name, v)?),
        "publish" => Op::Publish(fields(name, v)?),
        "ack" => Op::Ack(fields(name, v)?),
        "read" => Op::Read(fields(name, v)?),
        "focus" => Op::Focus(fields(name, v)?),
        "blur" => Op::Blur(fields(name, v)?),
        "typing" => Op::Typing(fields(name, v)?),
        "status" => Op::Status(fields(name, v)?),
        "state" => Op::State(fields(name, v)?),
        "history" => Op::History(fields(name, v)?),
        "leave" => Op::Leave(fields(name, v)?),
        "presence" => Op::Presence(fields(name, v)?),
        "watch" => Op::Watch(fields(name, v)?),
        "unwatch" => Op::Unwatch(fields(name, v)?),
        other => {
            return Err(bad_frame(format!(
                "unknown op {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    })
}

/// `{"type":"reply","ref":…,"ok":true, …result}`.
#[derive(Serialize)]
struct OkReply<'a, T> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: &'a Value,
    ok: bool,
    #[serde(flatten)]
    result: T,
}

/// `{"type":"reply","ref":…,"ok":false,"error":{code,message},"action"?}`.
#[derive(Serialize)]
struct ErrorReply<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: &'a Value,
    ok: bool,
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: &'a str,
}

/// `{"type":"pong","ref":…}`.
#[derive(Serialize)]
struct Pong<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: &'a Value,
}

/// The result of `connect` on an open session.
#[derive(Serialize)]
struct AlreadyConnected {
    already: &'static str,
}

fn to_frame(v: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("reply serialises"))
}

fn ok_frame(reference: &Value, result: impl Serialize) -> Bytes {
    to_frame(&OkReply {
        kind: "reply",
        reference,
        ok: true,
        result,
    })
}

/// The error reply to a frame with `reference`; a failed `publish` tells the client to roll back its
/// optimistic message, except when the outcome is unknown (it may have been delivered).
pub fn error_frame(reference: &Value, e: &EngineError, rollback: bool) -> Bytes {
    to_frame(&ErrorReply {
        kind: "reply",
        reference,
        ok: false,
        error: ErrorBody {
            code: e.code.as_str(),
            message: &e.message,
        },
        action: (rollback && e.code != ErrorCode::OutcomeUnknown).then_some("rollback"),
    })
}

/// What handling one client frame gave.
pub struct Handled {
    /// The reply, then any replayed events, ready to write.
    pub frames: Vec<Bytes>,
    /// The frame itself was bad (`bad_frame`, `too_large`): counts toward the violation limit.
    pub violation: bool,
}

impl Session {
    /// Handles one client text frame of at most `max` bytes.
    pub async fn handle_text(&mut self, text: &str, max: usize) -> Handled {
        let (reference, op) = parse(text, max);
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                return Handled {
                    frames: vec![error_frame(&reference, &e, false)],
                    violation: true,
                };
            }
        };
        let is_publish = matches!(op, Op::Publish(_));
        match self.carry_out(op, &reference).await {
            Ok(frames) => Handled {
                frames,
                violation: false,
            },
            Err(e) => Handled {
                violation: matches!(e.code, ErrorCode::BadFrame | ErrorCode::TooLarge),
                frames: vec![error_frame(&reference, &e, is_publish)],
            },
        }
    }

    async fn carry_out(&mut self, op: Op, r: &Value) -> Result<Vec<Bytes>, EngineError> {
        let one = |frame: Bytes| Ok(vec![frame]);
        match op {
            Op::Ping => one(to_frame(&Pong {
                kind: "pong",
                reference: r,
            })),
            Op::Connect => one(ok_frame(
                r,
                AlreadyConnected {
                    already: "connected",
                },
            )),
            Op::Subscribe(o) => {
                let (reply, replay) = self.subscribe(&o.channel, o.since).await?;
                let mut frames = Vec::with_capacity(1 + replay.len());
                frames.push(ok_frame(r, reply));
                frames.extend(replay.into_iter().map(|e| e.frame));
                Ok(frames)
            }
            Op::Unsubscribe(o) => one(ok_frame(r, self.unsubscribe(&o.channel).await?)),
            Op::Publish(o) => {
                let data = o
                    .data
                    .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"));
                let reply = self
                    .publish(&o.channel, o.event, data, o.idempotency_key)
                    .await?;
                one(ok_frame(r, reply))
            }
            Op::Ack(o) => one(ok_frame(r, self.ack(&o.channel, o.seq).await?)),
            Op::Read(o) => one(ok_frame(r, self.read(&o.room, o.seq).await?)),
            Op::Focus(o) => one(ok_frame(r, self.focus(&o.room).await?)),
            Op::Blur(o) => one(ok_frame(r, self.blur(&o.room).await?)),
            Op::Typing(o) => one(ok_frame(r, self.typing(&o.room).await?)),
            Op::Status(o) => one(ok_frame(r, self.status(o.status, o.text).await?)),
            Op::State(o) => one(ok_frame(r, self.state(o.state).await?)),
            Op::History(o) => one(ok_frame(
                r,
                self.history(&o.channel, o.from, o.to, o.limit).await?,
            )),
            Op::Leave(o) => one(ok_frame(r, self.leave(&o.room).await?)),
            Op::Presence(o) => one(ok_frame(r, self.presence(&o.users).await?)),
            Op::Watch(o) => one(ok_frame(r, self.watch(&o.users).await?)),
            Op::Unwatch(o) => one(ok_frame(r, self.unwatch(&o.users).await?)),
        }
    }
}

/// Milliseconds since the process's first limiter: the limiter keeps plain numbers rather than two
/// `Instant`s (16 bytes each, in every connection's task).
fn clock_ms() -> u64 {
    static ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    ORIGIN.elapsed().as_millis() as u64
}

/// A per-connection token bucket, and the count of violations that leads to 4010. The limits
/// themselves are read from the config at each call rather than kept in every connection's task.
struct Limiter {
    /// Tokens, refilled at `frames_per_second` a second up to that.
    tokens: f32,
    /// When the bucket was last refilled, and when the violation window opened ([`clock_ms`]).
    last_ms: u64,
    window_ms: u64,
    violations: u32,
}

impl Limiter {
    fn new(limits: &Limits) -> Self {
        let now = clock_ms();
        Limiter {
            tokens: limits.frames_per_second.max(1) as f32,
            last_ms: now,
            window_ms: now,
            violations: 0,
        }
    }

    fn allow(&mut self, limits: &Limits) -> bool {
        let rate = limits.frames_per_second.max(1) as f32;
        let now = clock_ms();
        let elapsed = now.saturating_sub(self.last_ms) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last_ms = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Records a violation; true when the connection should be closed.
    fn violation(&mut self, limits: &Limits) -> bool {
        let now = clock_ms();
        if now.saturating_sub(self.window_ms) > 10_000 {
            self.window_ms = now;
            self.violations = 0;
        }
        self.violations += 1;
        self.violations > limits.violations_before_disconnect
    }
}

/// An open session's life over `peer`: until the server closes it (the reason), or the client goes
/// or the connection breaks (`None`).
pub async fn drive<P: Peer>(peer: &mut P, session: &mut Session) -> Option<CloseReason> {
    let handle = session.handle.clone();
    let engine = session.engine().clone();
    let limits = &engine.config.limits;
    let mut limiter = Limiter::new(limits);
    loop {
        tokio::select! {
            next = session.recv() => {
                let out = match next {
                    Next::Out(out) => out,
                    Next::Close(reason) => return Some(reason),
                };
                // A client that stops reading blocks the write; the close signal (slow consumer,
                // heartbeat timeout, shutdown) must still end the session.
                let writing = Box::pin(drain(peer, session, out));
                tokio::select! {
                    biased;
                    r = writing => if r.is_err() { return None },
                    reason = handle.closing() => return Some(reason),
                }
            }
            msg = peer.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(PeerError::Violation(reason))) => return Some(reason),
                    Some(Err(PeerError::Gone)) | None => return None,
                };
                handle.touch();
                if matches!(msg, Inbound::Alive) {
                    continue;
                }
                // An op (a publish runs the whole pipeline) is far larger than the idle wait.
                let step = Box::pin(on_message(peer, session, &mut limiter, msg, limits));
                if let Err(reason) = step.await {
                    return reason;
                }
            }
        }
    }
}

/// Handles one client message; `Err` ends the session (with the reason to close it with, or `None`
/// when the connection is gone).
async fn on_message<P: Peer>(
    peer: &mut P,
    session: &mut Session,
    limiter: &mut Limiter,
    msg: Inbound,
    limits: &Limits,
) -> Result<(), Option<CloseReason>> {
    let handled = match msg {
        Inbound::Text(t) => {
            let text = std::str::from_utf8(&t).unwrap_or("");
            if limiter.allow(limits) {
                session.handle_text(text, limits.frame_bytes).await
            } else {
                let reference = ref_of_text(text);
                let e = EngineError::new(ErrorCode::RateLimited, "too many frames; slow down");
                Handled {
                    frames: vec![error_frame(&reference, &e, false)],
                    violation: true,
                }
            }
        }
        Inbound::Binary => {
            let e = bad_frame("binary frames are not supported; send JSON text");
            Handled {
                frames: vec![error_frame(&Value::Null, &e, false)],
                violation: true,
            }
        }
        Inbound::Close => return Err(None),
        Inbound::Alive => return Ok(()),
    };
    for f in handled.frames {
        peer.feed(ToClient::Frame(f)).await.map_err(|_| None)?;
    }
    peer.flush().await.map_err(|_| None)?;
    if handled.violation && limiter.violation(limits) {
        return Err(Some(CloseReason::BadFrameLimit));
    }
    Ok(())
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once.
async fn drain<P: Peer>(
    peer: &mut P,
    session: &mut Session,
    first: Outbound,
) -> Result<(), PeerError> {
    write_outbound(peer, session, first).await?;
    let mut n = 0;
    while n < WRITE_BATCH {
        let Some(more) = session.try_recv() else {
            break;
        };
        write_outbound(peer, session, more).await?;
        n += 1;
    }
    peer.flush().await?;
    session.after_delivery().await;
    Ok(())
}

async fn write_outbound<P: Peer>(
    peer: &mut P,
    session: &mut Session,
    out: Outbound,
) -> Result<(), PeerError> {
    match out {
        Outbound::Deliver(d) => match session.check(&d) {
            Verdict::Skip => Ok(()),
            Verdict::Deliver => peer.feed(ToClient::Delivery(d)).await,
            Verdict::Reset(r) => {
                peer.feed(ToClient::Frame(r)).await?;
                peer.feed(ToClient::Delivery(d)).await
            }
        },
        Outbound::Rest(d, written) => peer.feed(ToClient::Rest(d, written)).await,
        Outbound::Checked(d) => peer.feed(ToClient::Delivery(d)).await,
        Outbound::Ping => peer.feed(ToClient::Ping).await,
        other => {
            session.control(other);
            Ok(())
        }
    }
}
