//! WebSocket endpoint `GET /ws` (PROTOCOL.md "WebSocket"): authenticate (header, `?token=` or a
//! `connect` frame within the connect timeout), open a session, then one task per connection selects
//! over the socket and the session's queue (which also carries the close signal: slow consumer,
//! heartbeat timeout, token expiry, shutdown).
//!
//! The writer drains everything queued and flushes once (many frames per syscall). Buffers are small
//! (NOTES.md: tungstenite's 128 KiB default read buffer would cost ~130 KiB per idle connection).

use crate::primitives::lock;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::auth::{AuthError, Claims};
use super::{ApiError, AppState};
use crate::config::Limits;
use crate::device::DeviceState;
use crate::engine::{
    CloseReason, EngineError, ErrorCode, Next, Outbound, Session, SessionOpen, Transport,
};
use crate::event::Position;
use crate::presence::Status;

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

/// A connection's WebSocket.
type WebSocket = WebSocketStream<TokioIo<Upgraded>>;
type WsError = tokio_tungstenite::tungstenite::Error;

/// Checks the RFC 6455 upgrade request: the pending upgrade and the `Sec-WebSocket-Accept` value.
fn handshake(req: &mut Request) -> Result<(OnUpgrade, String), ApiError> {
    let headers = req.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "bad_frame",
            "a WebSocket upgrade needs `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::bad("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(ApiError::bad("Sec-WebSocket-Key is missing"));
    };
    let accept = derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "bad_frame",
            "this connection cannot be upgraded (WebSocket needs HTTP/1.1)",
        ));
    };
    Ok((on_upgrade, accept))
}

/// The upgrade is herald's own rather than axum's `WebSocketUpgrade`, whose spawned task keeps the
/// socket's setup beside the connection's future for its whole life (~0.3 KiB per idle connection).
async fn upgrade(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let (on_upgrade, accept) = match handshake(&mut req) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let headers = req.headers();
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
    let claims = match super::auth::bearer(headers, q.token.as_deref()) {
        Some(t) => match state.auth.verify(&t) {
            Ok(c) => Some(c),
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let upgrade = Box::new(Upgrade {
        on_upgrade: Some(on_upgrade),
        claims,
        device: q.device,
    });
    tokio::spawn(run(state, upgrade));
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The socket's limits: small buffers, and frames up to twice ours (tungstenite closes the connection
/// on frames over its limit; within reason, an oversized frame gets a `too_large` reply instead).
fn ws_config(frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Frames fed between flushes collect here, so a drained batch leaves in one write.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(2 * frame_bytes + 4096)
        .max_message_size(Some(2 * frame_bytes))
        .max_frame_size(Some(2 * frame_bytes))
}

/// Client frames of `connect`.
#[derive(Deserialize)]
struct ConnectFrame {
    token: String,
    device: Option<String>,
    platform: Option<String>,
    state: Option<DeviceState>,
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

/// What the upgrade request brought, for the connection to start with: one box, freed once the
/// session is open, so the connection's task holds one pointer for it.
struct Upgrade {
    /// Taken when the connection starts.
    on_upgrade: Option<OnUpgrade>,
    /// From a token in the upgrade; `None`: a `connect` frame must bring one.
    claims: Option<Claims>,
    /// `?device=`.
    device: Option<String>,
}

fn text(b: Bytes) -> Message {
    // Frames are built from JSON strings, so this never fails; fall back to an empty frame if it did.
    Message::Text(Utf8Bytes::try_from(b).unwrap_or_default())
}

thread_local! {
    /// The delivery frame this thread last made a text message of. Every local recipient of an event
    /// shares its frame's bytes, and tungstenite checks UTF-8 again for each `Utf8Bytes` made from
    /// them: the recipients' writers that run here after the first reuse its check. Holding the frame
    /// keeps its storage alive, so the same pointer and length are the same text.
    static LAST_DELIVERY_TEXT: std::cell::RefCell<Utf8Bytes> = const {
        std::cell::RefCell::new(Utf8Bytes::from_static(""))
    };
}

/// [`text`] for a delivery's shared frame, checked once per thread rather than once per recipient.
fn delivery_text(frame: &Bytes) -> Message {
    LAST_DELIVERY_TEXT.with_borrow_mut(|last| {
        if last.as_ptr() != frame.as_ptr() || last.len() != frame.len() {
            *last = Utf8Bytes::try_from(frame.clone()).unwrap_or_default();
        }
        Message::Text(last.clone())
    })
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
    // Boxed in its own statement, like every boxed step here: a temporary lives to the end of its
    // statement, so `Box::pin(f()).await` would keep room for the unboxed `f()` in this future too.
    let closing = Box::pin(close_within(socket, reason, Duration::from_secs(1)));
    closing.await;
}

/// Sends `disconnect` then the close frame, giving up after `grace` (a client that stopped reading).
async fn close_within(socket: &mut WebSocket, reason: CloseReason, grace: Duration) {
    let _ = tokio::time::timeout(grace, async {
        let _ = socket.send(text(reason.frame())).await;
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: reason.code().into(),
                reason: reason.text().into(),
            })))
            .await;
    })
    .await;
}

/// One connection: authenticate and open the session (a boxed step: its state is freed once done), then
/// the session loop, which is all an idle connection holds (the task is as large as its largest await
/// state for its whole life). Each boxed step is boxed in its own statement: a temporary lives to the
/// end of its statement, so `Box::pin(start(..)).await` would still reserve the unboxed `start` future
/// (2.2 KiB) in this one. And it is a block, not an `async fn`, whose arguments would be kept twice
/// (as passed, and moved into the body).
#[allow(clippy::manual_async_fn)]
fn run(state: AppState, mut upgrade: Box<Upgrade>) -> impl Future<Output = ()> + Send {
    async move {
        // In a block: a named local keeps its room in the task until its scope ends, even moved out.
        let mut socket: WebSocket = {
            let Some(pending) = upgrade.on_upgrade.take() else {
                return;
            };
            let Ok(upgraded) = pending.await else {
                return;
            };
            let config = ws_config(state.engine.config.limits.frame_bytes);
            Box::pin(WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            ))
        }
        .await;
        let opening = Box::pin(start(&mut socket, &state, upgrade));
        let Some(mut session) = opening.await else {
            return;
        };
        let reason = session_loop(&mut socket, &mut session, &state).await;
        if let Some(r) = reason {
            tracing::debug!(conn = %session.handle.session, code = r.code(), "Closing session.");
            if r == CloseReason::SlowConsumer {
                // Its socket is full: release the session now (presence, subscriptions), then give
                // the client a grace period to read up to the `disconnect` frame before the socket
                // is dropped.
                drop(session);
                let closing = Box::pin(close_within(&mut socket, r, SLOW_CONSUMER_GRACE));
                closing.await;
            } else {
                close_with(&mut socket, r).await;
            }
        }
    }
}

/// Authenticates (token in the upgrade, or a `connect` frame), opens the session (closed at the token's
/// expiry) and sends `connected`; `None` when the connection was refused (already closed with its
/// reason).
async fn start(socket: &mut WebSocket, state: &AppState, upgrade: Box<Upgrade>) -> Option<Session> {
    let engine = state.engine.clone();
    let mut connect_ref = None;
    let Upgrade {
        claims,
        device: query_device,
        ..
    } = *upgrade;
    let (claims, mut device, mut platform, mut dstate) = match claims {
        Some(c) => (c, query_device, None, None),
        None => {
            // Wait for the `connect` frame.
            let first =
                tokio::time::timeout(engine.config.limits.connect_timeout, socket.next()).await;
            let t = match first {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Err(e))) => {
                    if let Some(reason) = violation(&e) {
                        close_with(socket, reason).await;
                    }
                    return None;
                }
                _ => {
                    close_with(socket, CloseReason::Unauthorized).await;
                    return None;
                }
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
        expires: Some(claims.exp),
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
                // The backend could not register the session: the node is fine, come back later.
                _ => CloseReason::Unavailable,
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
            close_with(socket, CloseReason::Unavailable).await;
            return None;
        }
    }
    Some(session)
}

/// The connection's loop; returns the reason when the server closes it.
async fn session_loop(
    socket: &mut WebSocket,
    session: &mut Session,
    state: &AppState,
) -> Option<CloseReason> {
    let handle = session.handle.clone();
    let limits = &state.engine.config.limits;
    let mut limiter = Limiter::new(limits);
    let mut reader = SocketReader::new();
    loop {
        tokio::select! {
            next = session.recv() => {
                let out = match next {
                    Next::Out(out) => out,
                    Next::Close(reason) => return Some(reason),
                };
                // A client that stops reading blocks the write; the close signal (slow consumer,
                // heartbeat timeout, shutdown) must still end the session.
                let writing = Box::pin(drain(socket, session, out));
                tokio::select! {
                    biased;
                    r = writing => if r.is_err() { return None },
                    reason = handle.closing() => return Some(reason),
                }
            }
            msg = std::future::poll_fn(|cx| reader.poll_next(socket, cx)) => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return violation(&e),
                    None => return None,
                };
                handle.touch();
                // Boxed, like every transient step here: the connection's task is as large as its
                // largest await state for its whole life, and an op (a publish runs the whole
                // pipeline) is far larger than the idle wait.
                let step = Box::pin(on_message(socket, session, &mut limiter, msg, limits));
                if let Err(reason) = step.await {
                    return reason;
                }
            }
        }
    }
}

/// The close a read error calls for: the RFC 6455 code when the client broke the protocol (it still
/// gets a close frame saying why), `None` when the connection itself is gone.
fn violation(e: &WsError) -> Option<CloseReason> {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Utf8(_) => Some(CloseReason::InvalidPayload),
        Error::Protocol(_) => Some(CloseReason::ProtocolError),
        Error::Capacity(_) => Some(CloseReason::MessageTooBig),
        _ => None,
    }
}

/// Polls the socket only when the socket woke the connection's task. The task is woken far more
/// often by its queue (each delivery) than by its client, and polling the WebSocket stream for
/// nothing (tungstenite's waker proxy, tokio's readiness, hyper's rewind buffer) was most of the
/// 13–15 % of the engine's instructions that this and two smaller changes saved (README,
/// "Performance"). One pointer in the task: the task is as large as its largest await state for its
/// whole life, idle or not. (The task's waker kept here and this waker kept by the socket make a
/// cycle only while the task's future lives: both go when it ends.)
struct SocketReader(Arc<SocketWake>);

/// What the socket is polled with: records that the socket woke the task, then wakes it.
struct SocketWake(std::sync::Mutex<Woken>);

struct Woken {
    /// The socket woke the task, or the stream may hold more buffered frames: poll it.
    socket: bool,
    /// The task's waker. Kept when woken (unlike an `AtomicWaker`), so it is stored once rather
    /// than at every poll.
    task: Option<Waker>,
}

impl Wake for SocketWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut w = lock(&self.0);
        w.socket = true;
        if let Some(t) = &w.task {
            t.wake_by_ref();
        }
    }
}

impl SocketReader {
    fn new() -> Self {
        SocketReader(Arc::new(SocketWake(std::sync::Mutex::new(Woken {
            socket: true,
            task: None,
        }))))
    }

    fn poll_next(
        &mut self,
        socket: &mut WebSocket,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        {
            // The task's waker is stored under the same lock that the flag is read: a wake after
            // this finds it.
            let mut w = lock(&self.0.0);
            if !w.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                w.task = Some(cx.waker().clone());
            }
            if !std::mem::take(&mut w.socket) {
                return Poll::Pending;
            }
        }
        let waker = Waker::from(self.0.clone());
        let next = socket.poll_next_unpin(&mut Context::from_waker(&waker));
        if next.is_ready() {
            // More frames may wait in the stream's buffer, and no wake comes for those.
            lock(&self.0.0).socket = true;
        }
        next
    }
}

/// Handles one client message; `Err` ends the session (with the reason to close it with, or `None`
/// when the socket is gone).
async fn on_message(
    socket: &mut WebSocket,
    session: &mut Session,
    limiter: &mut Limiter,
    msg: Message,
    limits: &Limits,
) -> Result<(), Option<CloseReason>> {
    let refuse = |e: &EngineError, r: &Value| json_msg(&error_reply(r, e, false));
    match msg {
        Message::Text(t) => {
            if !limiter.allow(limits) {
                let e = EngineError::new(ErrorCode::RateLimited, "too many frames; slow down");
                let reply = refuse(&e, &read_ref(&t));
                socket.send(reply).await.map_err(|_| None)?;
                if limiter.violation(limits) {
                    return Err(Some(CloseReason::BadFrameLimit));
                }
                return Ok(());
            }
            let replies = handle_frame(session, t.as_str(), limits.frame_bytes).await;
            let bad = replies.first().is_some_and(|r| {
                r.get("ok") == Some(&Value::Bool(false))
                    && matches!(r["error"]["code"].as_str(), Some("bad_frame" | "too_large"))
            });
            for m in replies_to_messages(replies) {
                socket.feed(m).await.map_err(|_| None)?;
            }
            socket.flush().await.map_err(|_| None)?;
            if bad && limiter.violation(limits) {
                return Err(Some(CloseReason::BadFrameLimit));
            }
        }
        Message::Binary(_) => {
            let e = EngineError::new(
                ErrorCode::BadFrame,
                "binary frames are not supported; send JSON text",
            );
            socket
                .send(refuse(&e, &Value::Null))
                .await
                .map_err(|_| None)?;
            if limiter.violation(limits) {
                return Err(Some(CloseReason::BadFrameLimit));
            }
        }
        Message::Close(_) => return Err(None),
        // Frame is write-only (raw frames); reads never yield it.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
    }
    Ok(())
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
) -> Result<(), WsError> {
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
) -> Result<(), WsError> {
    match out {
        Outbound::Deliver(d) => match session.check(&d) {
            crate::engine::session::Verdict::Skip => Ok(()),
            crate::engine::session::Verdict::Deliver => socket.feed(delivery_text(&d.frame)).await,
            crate::engine::session::Verdict::Reset(r) => {
                socket.feed(text(r)).await?;
                socket.feed(delivery_text(&d.frame)).await
            }
        },
        Outbound::Ping => socket.feed(Message::Ping(Bytes::new())).await,
        other => {
            session.control(other);
            Ok(())
        }
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
        // A publish whose outcome is unknown may have been delivered: not one to roll back (the
        // client retries it with the same idempotency key to find out).
        Err(e) => vec![error_reply(
            &reference,
            &e,
            is_publish && e.code != ErrorCode::OutcomeUnknown,
        )],
    }
}
