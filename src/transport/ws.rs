//! WebSocket endpoint `GET /ws` (PROTOCOL.md "WebSocket"): authenticate (header, `?token=` or a
//! `connect` frame within the connect timeout), open a session, then one task per connection selects
//! over the socket, the session's queue, the close signal and the token's expiry.
//!
//! The writer drains everything queued and flushes once (many frames per syscall). Buffers are small
//! (NOTES.md: tungstenite's 128 KiB default read buffer would cost ~130 KiB per idle connection).

use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::auth::{AuthError, Claims, unix_now};
use super::{ApiError, AppState};
use crate::backend::{AppState as DeviceState, Status};
use crate::engine::{
    CloseReason, EngineError, ErrorCode, Outbound, Session, SessionOpen, Transport,
};
use crate::event::Position;

/// Read buffer per connection. tungstenite zero-fills all of it on the first read, so every byte is
/// resident for the connection's life: at 10k idle connections 4 KiB cost ~3.5 KiB more per
/// connection than this. Client frames are small and rare (ops of a few hundred bytes); a larger one
/// takes a few more reads.
const READ_BUFFER: usize = 512;
/// Write buffer per connection: small (it keeps its capacity), yet enough to batch many frames.
const WRITE_BUFFER: usize = 4096;
/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 256;
/// How long a slow consumer's socket stays open (its session already gone) for the `disconnect` 4008
/// and close frames to get through, should its client read again.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(10);

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/ws", get(upgrade))
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    device: Option<String>,
}

async fn upgrade(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let allow = &state.engine.config.ws_origins;
    if !allow.is_empty() {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !allow.iter().any(|o| o == origin) {
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden", "origin not allowed")
                .into_response();
        }
    }
    let claims = match super::auth::bearer(&headers, q.token.as_deref()) {
        Some(t) => match state.auth.verify(&t) {
            Ok(c) => Some(c),
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let limit = state.engine.config.limits.frame_bytes;
    // tungstenite closes the connection on frames over its limit; allow twice ours so an oversized
    // frame within reason gets a `too_large` reply instead.
    ws.read_buffer_size(READ_BUFFER)
        // Frames fed between flushes collect here, so a drained batch leaves in one write.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(2 * limit + 4096)
        .max_message_size(2 * limit)
        .max_frame_size(2 * limit)
        .on_upgrade(move |socket| run(socket, state, claims.map(Box::new), q.device))
}

/// Client frames of `connect`.
#[derive(Deserialize)]
struct ConnectFrame {
    token: String,
    device: Option<String>,
    platform: Option<String>,
    state: Option<DeviceState>,
}

/// A per-connection token bucket, and the count of violations that leads to 4010.
struct Limiter {
    rate: f64,
    tokens: f64,
    last: Instant,
    violations: u32,
    window: Instant,
    max_violations: u32,
}

impl Limiter {
    fn new(rate: u32, max_violations: u32) -> Self {
        Limiter {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            last: Instant::now(),
            violations: 0,
            window: Instant::now(),
            max_violations,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Records a violation; true when the connection should be closed.
    fn violation(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) > Duration::from_secs(10) {
            self.window = now;
            self.violations = 0;
        }
        self.violations += 1;
        self.violations > self.max_violations
    }
}

fn text(b: Bytes) -> Message {
    // Frames are built from JSON strings, so this never fails; fall back to an empty frame if it did.
    Message::Text(Utf8Bytes::try_from(b).unwrap_or_default())
}

fn json_msg(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error_reply(reference: &Value, e: &EngineError, rollback: bool) -> Value {
    let mut v = json!({
        "type": "reply", "ref": reference, "ok": false,
        "error": { "code": e.code.as_str(), "message": e.message },
    });
    if rollback {
        v["action"] = json!("rollback");
    }
    v
}

fn ok_reply(reference: &Value, result: Value) -> Value {
    let mut v = json!({ "type": "reply", "ref": reference, "ok": true });
    if let (Value::Object(m), Value::Object(r)) = (&mut v, result) {
        for (k, x) in r {
            if k != "type" && k != "ref" && k != "ok" {
                m.insert(k, x);
            }
        }
    }
    v
}

async fn close_with(socket: &mut WebSocket, reason: CloseReason) {
    Box::pin(close_within(socket, reason, Duration::from_secs(1))).await;
}

/// Sends `disconnect` then the close frame, giving up after `grace` (a client that stopped reading).
async fn close_within(socket: &mut WebSocket, reason: CloseReason, grace: Duration) {
    let _ = tokio::time::timeout(grace, async {
        let _ = socket.send(text(reason.frame())).await;
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: reason.code(),
                reason: reason.text().into(),
            })))
            .await;
    })
    .await;
}

/// One connection: authenticate and open the session (a boxed step: its state is freed once done), then
/// the session loop, which is all an idle connection holds (the task is as large as its largest await
/// state for its whole life).
async fn run(
    mut socket: WebSocket,
    state: AppState,
    claims: Option<Box<Claims>>,
    query_device: Option<String>,
) {
    let Some((mut session, token_exp)) =
        Box::pin(start(&mut socket, &state, claims, query_device)).await
    else {
        return;
    };
    let reason = session_loop(&mut socket, &mut session, &state, token_exp).await;
    if let Some(r) = reason {
        tracing::debug!(conn = %session.handle.session, code = r.code(), "Closing session.");
        if r == CloseReason::SlowConsumer {
            // Its socket is full: release the session now (presence, subscriptions), then give the
            // client a grace period to read up to the `disconnect` frame before the socket is dropped.
            drop(session);
            Box::pin(close_within(&mut socket, r, SLOW_CONSUMER_GRACE)).await;
        } else {
            close_with(&mut socket, r).await;
        }
    }
}

/// Authenticates (token in the upgrade, or a `connect` frame), opens the session and sends
/// `connected`; the session and the token's expiry (unix s), or `None` when the connection was refused
/// (already closed with its reason).
async fn start(
    socket: &mut WebSocket,
    state: &AppState,
    claims: Option<Box<Claims>>,
    query_device: Option<String>,
) -> Option<(Session, u64)> {
    let engine = state.engine.clone();
    let mut connect_ref = None;
    let (claims, mut device, mut platform, mut dstate) = match claims {
        Some(c) => (*c, query_device, None, None),
        None => {
            // Wait for the `connect` frame.
            let first =
                tokio::time::timeout(engine.config.limits.connect_timeout, socket.next()).await;
            let Ok(Some(Ok(Message::Text(t)))) = first else {
                close_with(socket, CloseReason::Unauthorized).await;
                return None;
            };
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            connect_ref = v.get("ref").cloned();
            let parsed = (v.get("op").and_then(Value::as_str) == Some("connect"))
                .then(|| serde_json::from_value::<ConnectFrame>(v.clone()).ok())
                .flatten();
            let Some(cf) = parsed else {
                close_with(socket, CloseReason::Unauthorized).await;
                return None;
            };
            match state.auth.verify(&cf.token) {
                Ok(c) => (c, cf.device.or(query_device), cf.platform, cf.state),
                Err(AuthError::Expired) => {
                    close_with(socket, CloseReason::TokenExpired).await;
                    return None;
                }
                Err(_) => {
                    close_with(socket, CloseReason::Unauthorized).await;
                    return None;
                }
            }
        }
    };
    if device.is_none() {
        device = claims.device.clone();
    }
    if platform.is_none() {
        platform = claims.platform.clone();
    }
    let open = SessionOpen {
        user: claims.sub.as_str().into(),
        device: device.take(),
        platform: platform.take(),
        state: dstate.take().unwrap_or_default(),
        attrs: claims.attrs.clone(),
        transport: Transport::Ws,
    };
    let mut session = match engine.open_session(open).await {
        Ok(s) => s,
        Err(e) => {
            let reason = match e.code {
                ErrorCode::RateLimited => CloseReason::TooManyConnections,
                ErrorCode::BadFrame => {
                    let reply = json_msg(&error_reply(&Value::Null, &e, false));
                    let _ = socket.send(reply).await;
                    CloseReason::BadFrameLimit
                }
                _ => CloseReason::Shutdown,
            };
            close_with(socket, reason).await;
            return None;
        }
    };
    match session.connected_frame(connect_ref.as_ref()).await {
        Ok(f) => {
            if socket.send(json_msg(&f)).await.is_err() {
                return None;
            }
        }
        Err(e) => {
            tracing::warn!(user = %claims.sub, error = %e, "Connect sync failed.");
            close_with(socket, CloseReason::Shutdown).await;
            return None;
        }
    }
    Some((session, claims.exp))
}

/// The connection's loop; returns the reason when the server closes it.
async fn session_loop(
    socket: &mut WebSocket,
    session: &mut Session,
    state: &AppState,
    token_exp: u64,
) -> Option<CloseReason> {
    let handle = session.handle.clone();
    let limits = &state.engine.config.limits;
    let mut limiter = Limiter::new(
        limits.frames_per_second,
        limits.violations_before_disconnect,
    );
    let expires = Instant::now() + Duration::from_secs(token_exp.saturating_sub(unix_now()));
    let expiry = tokio::time::sleep_until(expires);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            reason = handle.closing() => return Some(reason),
            _ = &mut expiry => return Some(CloseReason::TokenExpired),
            out = session.recv() => {
                let Some(out) = out else { return Some(CloseReason::Shutdown) };
                // A client that stops reading blocks the write; the close signal (slow consumer,
                // heartbeat timeout, shutdown) must still end the session.
                tokio::select! {
                    r = Box::pin(drain(socket, session, out)) => if r.is_err() { return None },
                    reason = handle.closing() => return Some(reason),
                }
            }
            msg = socket.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    _ => return None,
                };
                handle.touch();
                match msg {
                    Message::Text(t) => {
                        if !limiter.allow() {
                            let e = EngineError::new(ErrorCode::RateLimited, "too many frames; slow down");
                            let r = read_ref(&t);
                            if socket.send(json_msg(&error_reply(&r, &e, false))).await.is_err() {
                                return None;
                            }
                            if limiter.violation() {
                                return Some(CloseReason::BadFrameLimit);
                            }
                            continue;
                        }
                        // Boxed, like every transient step here: the connection's task is as large
                        // as its largest await state for its whole life, and an op (a publish runs
                        // the whole pipeline) is far larger than the idle wait.
                        let replies =
                            Box::pin(handle_frame(session, t.as_str(), limits.frame_bytes)).await;
                        let bad = replies.first().is_some_and(|r| {
                            r.get("ok") == Some(&Value::Bool(false))
                                && matches!(r["error"]["code"].as_str(), Some("bad_frame" | "too_large"))
                        });
                        for m in replies_to_messages(replies) {
                            if socket.feed(m).await.is_err() {
                                return None;
                            }
                        }
                        if socket.flush().await.is_err() {
                            return None;
                        }
                        if bad && limiter.violation() {
                            return Some(CloseReason::BadFrameLimit);
                        }
                    }
                    Message::Binary(_) => {
                        let e = EngineError::new(ErrorCode::BadFrame, "binary frames are not supported; send JSON text");
                        if socket.send(json_msg(&error_reply(&Value::Null, &e, false))).await.is_err() {
                            return None;
                        }
                        if limiter.violation() {
                            return Some(CloseReason::BadFrameLimit);
                        }
                    }
                    Message::Close(_) => return None,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        }
    }
}

/// A reply and the frames that follow it (replayed events), as JSON values or raw bytes.
enum Out {
    Raw(Bytes),
}

fn replies_to_messages(v: Vec<Value>) -> impl Iterator<Item = Message> {
    v.into_iter().map(|x| match x {
        Value::String(s) => Message::Text(s.into()),
        other => json_msg(&other),
    })
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once.
async fn drain(
    socket: &mut WebSocket,
    session: &mut Session,
    first: Outbound,
) -> Result<(), axum::Error> {
    write_outbound(socket, session, first).await?;
    let mut n = 0;
    while n < WRITE_BATCH {
        let Some(more) = session.try_recv() else {
            break;
        };
        write_outbound(socket, session, more).await?;
        n += 1;
    }
    socket.flush().await?;
    session.after_delivery().await;
    Ok(())
}

async fn write_outbound(
    socket: &mut WebSocket,
    session: &mut Session,
    out: Outbound,
) -> Result<(), axum::Error> {
    match out {
        Outbound::Deliver(d) => match session.check(&d) {
            crate::engine::session::Verdict::Skip => Ok(()),
            crate::engine::session::Verdict::Deliver => socket.feed(text(d.frame.clone())).await,
            crate::engine::session::Verdict::Reset(r) => {
                socket.feed(text(r)).await?;
                socket.feed(text(d.frame.clone())).await
            }
        },
        Outbound::Ping => socket.feed(Message::Ping(Bytes::new())).await,
    }
}

fn read_ref(t: &str) -> Value {
    serde_json::from_str::<Value>(t)
        .ok()
        .and_then(|v| v.get("ref").cloned())
        .filter(|r| r.is_string() || r.is_number())
        .unwrap_or(Value::Null)
}

#[derive(Deserialize)]
struct ChannelOp {
    channel: String,
}
#[derive(Deserialize)]
struct SubscribeOp {
    channel: String,
    since: Option<Position>,
}
#[derive(Deserialize)]
struct PublishOp {
    channel: String,
    event: String,
    #[serde(default)]
    data: Value,
    idempotency_key: Option<String>,
}
#[derive(Deserialize)]
struct SeqOp {
    channel: String,
    seq: u64,
}
#[derive(Deserialize)]
struct ReadOp {
    room: String,
    seq: u64,
}
#[derive(Deserialize)]
struct RoomOp {
    room: String,
}
#[derive(Deserialize)]
struct StatusOp {
    status: Status,
    text: Option<String>,
}
#[derive(Deserialize)]
struct StateOp {
    state: DeviceState,
}
#[derive(Deserialize)]
struct HistoryOp {
    channel: String,
    from: Option<u64>,
    to: Option<u64>,
    limit: Option<usize>,
}
#[derive(Deserialize)]
struct UsersOp {
    users: Vec<String>,
}

fn parse<T: serde::de::DeserializeOwned>(op: &str, v: Value) -> Result<T, EngineError> {
    serde_json::from_value(v)
        .map_err(|e| EngineError::new(ErrorCode::BadFrame, format!("{op}: {e}")))
}

/// Handles one client frame; returns the reply and any frames that follow it (as JSON values; raw
/// frames as JSON strings holding the frame text).
async fn handle_frame(session: &mut Session, t: &str, max: usize) -> Vec<Value> {
    if t.len() > max {
        let e = EngineError::new(
            ErrorCode::TooLarge,
            format!("frame is larger than {max} bytes"),
        );
        return vec![error_reply(&read_ref(t), &e, false)];
    }
    let v: Value = match serde_json::from_str(t) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            let e = EngineError::new(ErrorCode::BadFrame, "a frame is one JSON object");
            return vec![error_reply(&Value::Null, &e, false)];
        }
        Err(err) => {
            let e = EngineError::new(ErrorCode::BadFrame, format!("invalid JSON: {err}"));
            return vec![error_reply(&Value::Null, &e, false)];
        }
    };
    let reference = v.get("ref").cloned().unwrap_or(Value::Null);
    if !(reference.is_null() || reference.is_string() || reference.is_number()) {
        let e = EngineError::new(ErrorCode::BadFrame, "ref must be a string or a number");
        return vec![error_reply(&Value::Null, &e, false)];
    }
    let Some(op) = v.get("op").and_then(Value::as_str).map(str::to_string) else {
        let e = EngineError::new(ErrorCode::BadFrame, "missing op");
        return vec![error_reply(&reference, &e, false)];
    };
    let is_publish = op == "publish";
    let result: Result<(Value, Vec<Out>), EngineError> = async {
        let none = Vec::new;
        Ok(match op.as_str() {
            "ping" => return Ok((json!({ "type": "pong", "ref": reference }), none())),
            "connect" => (json!({ "already": "connected" }), none()),
            "subscribe" => {
                let o: SubscribeOp = parse(&op, v)?;
                let (reply, replay) = session.subscribe(&o.channel, o.since).await?;
                (
                    reply,
                    replay.into_iter().map(|e| Out::Raw(e.frame)).collect(),
                )
            }
            "unsubscribe" => {
                let o: ChannelOp = parse(&op, v)?;
                (session.unsubscribe(&o.channel).await?, none())
            }
            "publish" => {
                let o: PublishOp = parse(&op, v)?;
                let data = serde_json::value::to_raw_value(&o.data).expect("json value serialises");
                (
                    session
                        .publish(&o.channel, o.event, data, o.idempotency_key)
                        .await?,
                    none(),
                )
            }
            "ack" => {
                let o: SeqOp = parse(&op, v)?;
                (session.ack(&o.channel, o.seq).await?, none())
            }
            "read" => {
                let o: ReadOp = parse(&op, v)?;
                (session.read(&o.room, o.seq).await?, none())
            }
            "focus" => {
                let o: RoomOp = parse(&op, v)?;
                (session.focus(&o.room).await?, none())
            }
            "blur" => {
                let o: RoomOp = parse(&op, v)?;
                (session.blur(&o.room).await?, none())
            }
            "typing" => {
                let o: RoomOp = parse(&op, v)?;
                (session.typing(&o.room).await?, none())
            }
            "status" => {
                let o: StatusOp = parse(&op, v)?;
                (session.status(o.status, o.text).await?, none())
            }
            "state" => {
                let o: StateOp = parse(&op, v)?;
                (session.state(o.state).await?, none())
            }
            "history" => {
                let o: HistoryOp = parse(&op, v)?;
                (
                    session.history(&o.channel, o.from, o.to, o.limit).await?,
                    none(),
                )
            }
            "leave" => {
                let o: RoomOp = parse(&op, v)?;
                (session.leave(&o.room).await?, none())
            }
            "presence" => {
                let o: UsersOp = parse(&op, v)?;
                (session.presence(&o.users).await?, none())
            }
            "watch" => {
                let o: UsersOp = parse(&op, v)?;
                (session.watch(&o.users).await?, none())
            }
            "unwatch" => {
                let o: UsersOp = parse(&op, v)?;
                (session.unwatch(&o.users).await?, none())
            }
            other => {
                return Err(EngineError::new(
                    ErrorCode::BadFrame,
                    format!(
                        "unknown op {:?}",
                        other.chars().take(40).collect::<String>()
                    ),
                ));
            }
        })
    }
    .await;
    match result {
        Ok((reply, follow)) => {
            let first = if reply.get("type").and_then(Value::as_str) == Some("pong") {
                reply
            } else {
                ok_reply(&reference, reply)
            };
            let mut out = vec![first];
            for f in follow {
                let Out::Raw(b) = f;
                out.push(Value::String(String::from_utf8_lossy(&b).into_owned()));
            }
            out
        }
        Err(e) => vec![error_reply(&reference, &e, is_publish)],
    }
}
