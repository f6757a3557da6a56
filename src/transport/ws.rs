//! WebSocket endpoint `GET /ws`: the RFC 6455 upgrade, authentication (header, `?token=` or a
//! `connect` frame within the connect timeout), then the session's life ([`protocol::drive`]) over
//! the socket, one task per connection; this file only turns tungstenite messages into the
//! protocol's frames and back, and closes with the code the session ended with.
//!
//! Buffers are small: tungstenite's 128 KiB default read buffer would cost ~130 KiB per idle
//! connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::upgrade::OnUpgrade;
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::auth::{AuthError, Claims};
use super::conn::{self, SharedTcp};
use super::routes::Routes;
use super::wsout::Outbox;
use super::{ApiError, AppState};
use crate::engine::protocol::{self, Inbound, PeerError, ToClient};
use crate::engine::{CloseReason, ErrorCode, Session, SessionHandle, SessionOpen, Transport};
use crate::event::FrameFormat;
use crate::primitives::lock;

/// Read buffer per connection. tungstenite zero-fills all of it on the first read, so every byte is
/// resident for the connection's life: at 10k idle connections 4 KiB cost ~3.5 KiB more per
/// connection than 512 bytes, and 512 bytes ~0.4 KiB more than this. Client frames are small and
/// rare (an op is tens to a few hundred bytes); a larger one takes a few more reads.
const READ_BUFFER: usize = 128;
/// tungstenite's write buffer: it only ever holds a pong or a close frame (herald writes its own
/// frames, [`Outbox`]).
const WRITE_BUFFER: usize = 0;
/// How long a slow consumer's socket stays open (its session already gone) for the `disconnect` 4008
/// and close frames to get through, should its client read again.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(10);

pub(super) fn routes() -> Routes {
    Routes::new().get("/ws", upgrade)
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    device: Option<String>,
    format: Option<String>,
}

/// A connection's WebSocket, on the connection's own TCP stream, shared with the fan-out
/// ([`conn::shared`]). Every connection comes from [`conn`]'s listener, so there is no other kind.
type WebSocket = WebSocketStream<SharedTcp>;

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
    let format = match q.format.as_deref().map(FrameFormat::parse).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(m) => return ApiError::bad(m).into_response(),
    };
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
        format,
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
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(2 * frame_bytes + 4096)
        .max_message_size(Some(2 * frame_bytes))
        .max_frame_size(Some(2 * frame_bytes))
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
    /// `?format=`.
    format: FrameFormat,
}

async fn close_with(peer: &mut WsPeer, reason: CloseReason) {
    // Boxed in its own statement, like every boxed step here: a temporary lives to the end of its
    // statement, so `Box::pin(f()).await` would keep room for the unboxed `f()` in this future too.
    let closing = Box::pin(close_within(peer, reason, Duration::from_secs(1)));
    closing.await;
}

/// Sends `disconnect` then the close frame, giving up after `grace` (a client that stopped reading).
async fn close_within(peer: &mut WsPeer, reason: CloseReason, grace: Duration) {
    let _ = tokio::time::timeout(grace, async {
        // Whatever was queued goes first, then `disconnect`, then tungstenite's close frame.
        let _ = peer.send(ToClient::Frame(reason.frame())).await;
        let _ = peer
            .socket
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
        let mut peer = WsPeer {
            socket: {
                let Some(pending) = upgrade.on_upgrade.take() else {
                    return;
                };
                let Ok(upgraded) = pending.await else {
                    return;
                };
                let config = ws_config(state.engine.config.limits.frame_bytes);
                let Ok((tcp, read)) = conn::shared(upgraded) else {
                    // Only a connection accepted elsewhere than `conn`'s listener gets here.
                    tracing::error!("Upgraded connection is not herald's own TCP stream; dropped.");
                    return;
                };
                Box::pin(WebSocketStream::from_partially_read(
                    tcp,
                    read.to_vec(),
                    Role::Server,
                    Some(config),
                ))
                .await
            },
            reader: SocketReader::new(),
            out: Outbox::default(),
            tungstenite_pending: false,
            format: FrameFormat::Full,
            direct: None,
            held: false,
        };
        let opening = Box::pin(start(&mut peer, &state, upgrade));
        let Some(mut session) = opening.await else {
            return;
        };
        let reason = protocol::drive(&mut peer, &mut session).await;
        if let Some(r) = reason {
            tracing::debug!(conn = %session.handle.session, code = r.code(), "Closing session.");
            // The reason the session ends with (a no-op when it was asked to close already): what
            // its metrics record.
            session.handle.close(r);
            if r == CloseReason::SlowConsumer {
                // Its socket is full: release the session now (presence, subscriptions), then give
                // the client a grace period to read up to the `disconnect` frame before the socket
                // is dropped.
                drop(session);
                let closing = Box::pin(close_within(&mut peer, r, SLOW_CONSUMER_GRACE));
                closing.await;
            } else {
                close_with(&mut peer, r).await;
            }
        }
    }
}

/// Authenticates (token in the upgrade, or a `connect` frame), opens the session (closed at the token's
/// expiry) and sends `connected`; `None` when the connection was refused (already closed with its
/// reason).
async fn start(peer: &mut WsPeer, state: &AppState, upgrade: Box<Upgrade>) -> Option<Session> {
    let engine = state.engine.clone();
    let mut connect_ref = None;
    let Upgrade {
        claims,
        device: query_device,
        format: query_format,
        ..
    } = *upgrade;
    let mut format = query_format;
    let (claims, mut device, mut platform, mut dstate) = match claims {
        Some(c) => (c, query_device, None, None),
        None => {
            // Wait for the `connect` frame.
            let first =
                tokio::time::timeout(engine.config.limits.connect_timeout, peer.socket.next())
                    .await;
            // That read may have left tungstenite a pong to write before our frames.
            peer.tungstenite_pending = true;
            let t = match first {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Err(e))) => {
                    if let Some(reason) = violation(&e) {
                        close_with(peer, reason).await;
                    }
                    return None;
                }
                _ => {
                    close_with(peer, CloseReason::Unauthorized).await;
                    return None;
                }
            };
            let Some((cf, reference)) = protocol::parse_connect(&t) else {
                close_with(peer, CloseReason::Unauthorized).await;
                return None;
            };
            connect_ref = reference;
            let refused = match cf.format.as_deref().map(FrameFormat::parse).transpose() {
                Ok(f) => {
                    format = f.unwrap_or(format);
                    // The token's platform claim is checked by auth; the frame's is checked here.
                    cf.platform
                        .as_deref()
                        .filter(|p| !crate::device::valid_platform(p))
                        .map(|_| "platform must be web, ios, android or desktop".to_string())
                }
                Err(m) => Some(m),
            };
            match refused {
                None => {}
                Some(m) => {
                    let e = crate::engine::EngineError::new(ErrorCode::BadFrame, m);
                    let reply = protocol::error_frame(
                        connect_ref.as_ref().unwrap_or(&Value::Null),
                        &e,
                        false,
                    );
                    let _ = peer.send(ToClient::Frame(reply)).await;
                    close_with(peer, CloseReason::BadFrameLimit).await;
                    return None;
                }
            }
            match state.auth.verify(&cf.token) {
                Ok(c) => (c, cf.device.or(query_device), cf.platform, cf.state),
                Err(AuthError::Expired) => {
                    close_with(peer, CloseReason::TokenExpired).await;
                    return None;
                }
                Err(_) => {
                    close_with(peer, CloseReason::Unauthorized).await;
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
        format,
    };
    peer.format = format;
    let mut session = match engine.open_session(open).await {
        Ok(s) => s,
        Err(e) => {
            let reason = match e.code {
                ErrorCode::RateLimited => CloseReason::TooManyConnections,
                ErrorCode::BadFrame => {
                    let reply = protocol::error_frame(&Value::Null, &e, false);
                    let _ = peer.send(ToClient::Frame(reply)).await;
                    CloseReason::BadFrameLimit
                }
                ErrorCode::Internal => CloseReason::Internal,
                // The backend could not register the session: the node is fine, come back later.
                _ => CloseReason::Unavailable,
            };
            close_with(peer, reason).await;
            return None;
        }
    };
    match session.connected_frame(connect_ref.as_ref()).await {
        Ok(f) => {
            if peer.send(ToClient::Frame(f)).await.is_err() {
                return None;
            }
            if engine.config.direct_writes {
                let tcp = peer.socket.get_ref().tcp.clone();
                session.handle.write_directly(tcp, format);
                peer.direct = Some(session.handle.clone());
            }
        }
        Err(e) => {
            tracing::warn!(user = %claims.sub, error = %e, "Connect sync failed.");
            close_with(peer, CloseReason::Unavailable).await;
            return None;
        }
    }
    Some(session)
}

/// The close a read error calls for: the RFC 6455 code when the client broke the protocol (it still
/// gets a close frame saying why), `None` when the connection itself is gone.
fn violation(e: &WsError) -> Option<CloseReason> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        // The client dropped the connection without a close: nobody is there to tell.
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Error::Utf8(_) => Some(CloseReason::InvalidPayload),
        Error::Protocol(_) => Some(CloseReason::ProtocolError),
        Error::Capacity(_) => Some(CloseReason::MessageTooBig),
        _ => None,
    }
}

/// Polls the socket only when the socket woke the connection's task. The task is woken far more
/// often by its queue (each delivery) than by its client, and polling the WebSocket stream for
/// nothing (tungstenite's waker proxy, tokio's readiness, hyper's rewind buffer) would cost every
/// delivery that work. One pointer in the task: the task is as large as its largest await state for
/// its whole life, idle or not. (The task's waker kept here and this waker kept by the socket make a
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

    /// Whether the socket woke the task (or may hold more frames) since it was last polled.
    fn woke(&self) -> bool {
        lock(&self.0.0).socket
    }

    /// The next message, when the socket woke the task. Not while `!may_read` (the transport does
    /// not hold the socket yet, and tungstenite may write while it reads): the task is woken again
    /// to take it first.
    fn poll_next(
        &mut self,
        socket: &mut WebSocket,
        cx: &mut Context<'_>,
        may_read: bool,
    ) -> Poll<Option<Result<Message, WsError>>> {
        {
            // The task's waker is stored under the same lock that the flag is read: a wake after
            // this finds it.
            let mut w = lock(&self.0.0);
            if !w.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                w.task = Some(cx.waker().clone());
            }
            if !w.socket {
                return Poll::Pending;
            }
            if !may_read {
                // The socket woke the task after it looked: come back to hold it first.
                drop(w);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            w.socket = false;
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

/// The WebSocket as the session's [`Peer`](crate::engine::protocol::Peer): tungstenite messages
/// to and from the protocol's frames. Owns the socket so the connection's task holds it once.
struct WsPeer {
    socket: WebSocket,
    reader: SocketReader,
    /// Text frames and pings, written by herald ([`Outbox`]); tungstenite writes only what it
    /// answers itself (pongs, the close handshake) and the close frame, never while this holds a
    /// partly written frame.
    out: Outbox,
    /// A read may have left tungstenite an answer (a pong) to write: flush it before our frames.
    tungstenite_pending: bool,
    /// How deliveries are written (set once the session is open).
    format: FrameFormat,
    /// The session, once the fan-out may write to this socket itself: this peer holds the socket
    /// while it reads or writes ([`SessionHandle::hold_socket`]) and lets go when it has nothing
    /// of its own on it.
    direct: Option<Arc<SessionHandle>>,
    /// This peer holds the socket (the fan-out does not write).
    held: bool,
}

impl WsPeer {
    /// Holds the socket for the transport (see [`WsPeer::direct`]), once: the rest of a frame the
    /// fan-out left half written goes to the front of the outbox, to be written before anything
    /// else (the transport's frames, and what tungstenite writes while it reads).
    fn hold(&mut self) {
        if let Some(h) = &self.direct
            && !self.held
        {
            self.held = true;
            if let Some((d, written)) = h.hold_socket() {
                self.out
                    .rest_of_text(d.frame_for(self.format).clone(), written);
            }
        }
    }

    /// Writes what tungstenite holds, then the queued frames.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PeerError>> {
        self.hold();
        if self.tungstenite_pending {
            ready!(self.socket.poll_flush_unpin(cx)).map_err(|_| PeerError::Gone)?;
            self.tungstenite_pending = false;
        }
        ready!(self.out.poll_write_to(self.socket.get_mut(), cx)).map_err(|_| PeerError::Gone)?;
        self.release();
        Poll::Ready(Ok(()))
    }

    /// Lets the fan-out write again when nothing of this peer's is on the socket.
    fn release(&mut self) {
        if self.held
            && self.out.is_empty()
            && !self.tungstenite_pending
            && let Some(h) = &self.direct
        {
            h.release_socket();
            self.held = false;
        }
    }
}

impl Stream for WsPeer {
    type Item = Result<Inbound, PeerError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // The socket is the transport's while it reads (tungstenite may write a pong): held first,
        // and what the fan-out left half written goes out before the read.
        if this.direct.is_some() && this.reader.woke() {
            this.hold();
        }
        // tungstenite writes while it reads (a pong): never in the middle of one of our frames.
        if !this.out.is_empty()
            && let Err(e) = ready!(this.poll_write_out(cx))
        {
            return Poll::Ready(Some(Err(e)));
        }
        let may_read = this.direct.is_none() || this.held;
        let next = match this.reader.poll_next(&mut this.socket, cx, may_read) {
            Poll::Pending => {
                // tungstenite may have answered a ping: out with it before the fan-out may
                // write (it writes whole frames only between ours).
                if this.tungstenite_pending && this.socket.poll_flush_unpin(cx).is_ready() {
                    this.tungstenite_pending = false;
                }
                this.release();
                return Poll::Pending;
            }
            Poll::Ready(next) => next,
        };
        this.tungstenite_pending = true;
        Poll::Ready(next.map(|m| match m {
            Ok(Message::Text(t)) => Ok(Inbound::Text(t.into())),
            Ok(Message::Binary(_)) => Ok(Inbound::Binary),
            Ok(Message::Close(_)) => Ok(Inbound::Close),
            // tungstenite answers pings itself; either shows the client is there.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Ok(Inbound::Alive),
            Err(e) => Err(match violation(&e) {
                Some(reason) => PeerError::Violation(reason),
                None => PeerError::Gone,
            }),
        }))
    }
}

impl Sink<ToClient> for WsPeer {
    type Error = PeerError;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), PeerError>> {
        // The session's writer queues at most a batch (or one op's replies) between flushes.
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: ToClient) -> Result<(), PeerError> {
        match item {
            ToClient::Delivery(d) => {
                let frame = d.frame_for(self.format).clone();
                self.out.text(frame)
            }
            // Taken off the queue before the socket was held (nothing of ours written since).
            ToClient::Rest(d, written) => {
                let frame = d.frame_for(self.format).clone();
                self.out.rest_of_text(frame, written)
            }
            ToClient::Frame(f) => self.out.text(f),
            ToClient::Ping => self.out.ping(),
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), PeerError>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), PeerError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        // The close frame is the last thing on the socket.
        self.as_mut().get_mut().hold();
        self.socket
            .poll_close_unpin(cx)
            .map_err(|_| PeerError::Gone)
    }
}
