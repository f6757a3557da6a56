//! The edges: wire frames <-> engine calls, no business logic. Assembles the axum router (one state
//! type) from the route builders, which go through a table of routes ([`route_table`], what the
//! OpenAPI description is checked against); maps engine errors to `{"error":{"code","message"}}`
//! with fitting statuses; and serves ([`conn`]: connection cap, read timeouts) with graceful
//! shutdown: sessions get `disconnect` 1001 with `reconnect: true`, in-flight requests finish,
//! within the grace period.

pub mod admin;
pub mod api;
pub mod assets;
pub mod auth;
pub mod conn;
mod routes;
pub mod sse;
pub mod ws;
mod wsout;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::engine::{CloseReason, Engine, EngineError, ErrorCode};
use auth::{Auth, AuthError, Claims};
pub use routes::Route;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Credentials.
    pub auth: Arc<Auth>,
}

/// An HTTP error: `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 400 bad_frame.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_frame", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match e.code {
            ErrorCode::BadFrame | ErrorCode::BadChannel => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::NotMember => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Rejected => StatusCode::CONFLICT,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable | ErrorCode::OutcomeUnknown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code.as_str(), e.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::unauthorized(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// A JSON response body, ending with a newline (so `curl` output ends its line, and line-oriented
/// tools read whole replies). Every JSON reply and error goes through it.
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "A reply did not serialise.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "{\"error\":{\"code\":\"internal\",\"message\":\"internal error\"}}\n",
                )
                    .into_response()
            }
        }
    }
}

/// Result of a handler.
pub type ApiResult<T = Json<serde_json::Value>> = Result<T, ApiError>;

/// A JSON body, size-limited by `limits.frame_bytes` (plus room for the envelope), with errors in the
/// protocol's shape (`bad_frame`, `too_large`).
pub struct JsonBody<T>(pub T);

/// Room a publish body may take beyond its `data` limit (type, targets, keys).
const ENVELOPE_BYTES: usize = 16 * 1024;

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.engine.config.limits.frame_bytes + ENVELOPE_BYTES;
        let within = state.engine.config.read_timeout;
        let bytes = tokio::time::timeout(within, axum::body::to_bytes(req.into_body(), limit))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "bad_frame",
                    format!(
                        "the request body did not arrive within {} s",
                        within.as_secs_f64()
                    ),
                )
            })?
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("body is larger than {limit} bytes"),
                )
            })?;
        let bytes = if bytes.is_empty() {
            &b"{}"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))
    }
}

/// A backend caller holding the API key.
pub struct ApiKey;

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match auth::bearer(&parts.headers, None) {
            Some(k) if state.auth.is_api_key(&k) => Ok(ApiKey),
            Some(_) => Err(ApiError::unauthorized("invalid API key")),
            None => Err(ApiError::unauthorized(
                "missing API key (Authorization: Bearer <key>)",
            )),
        }
    }
}

/// An operator holding the admin key, in the `Authorization` header only: a key in a URL ends up
/// in access logs, browser history and `Referer` headers.
pub struct AdminKey;

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match auth::bearer(&parts.headers, None) {
            Some(k) if state.auth.is_admin_key(&k) => Ok(AdminKey),
            Some(_) => Err(ApiError::unauthorized("invalid admin key")),
            None => Err(ApiError::unauthorized(
                "missing admin key (Authorization: Bearer <key>)",
            )),
        }
    }
}

/// A client holding a valid JWT (header or `?token=`).
pub struct Client(pub Claims);

impl FromRequestParts<AppState> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let q = query_map(parts);
        let token = auth::bearer(&parts.headers, q.get("token").map(String::as_str))
            .ok_or(AuthError::Missing)?;
        Ok(Client(state.auth.verify(&token)?))
    }
}

/// The query string as a map (never fails; values are percent-decoded).
pub fn query_map(parts: &Parts) -> HashMap<String, String> {
    parts
        .uri
        .query()
        .and_then(|q| {
            axum::extract::Query::<HashMap<String, String>>::try_from_uri(
                &format!("http://x/?{q}").parse().ok()?,
            )
            .ok()
        })
        .map(|q| q.0)
        .unwrap_or_default()
}

fn cors(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("last-event-id"),
            header::HeaderName::from_static("idempotency-key"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        base.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
        base.allow_origin(AllowOrigin::list(list))
    }
}

/// A known path with another method: 405 in the protocol's error shape.
async fn method_not_allowed() -> ApiError {
    let message = "method not allowed on this endpoint";
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
}

/// A path no route serves: 404 in the protocol's error shape.
async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Every route of every part of the router.
fn all_routes() -> routes::Routes {
    routes::Routes::new()
        .merge(ws::routes())
        .merge(sse::routes())
        .merge(api::routes())
        .merge(admin::routes())
        .merge(assets::routes())
}

/// Every (method, path) the router serves, in the order the route builders add them: what
/// `docs/openapi.json` must describe, one operation each.
pub fn route_table() -> Vec<Route> {
    all_routes().into_parts().1
}

/// The OpenAPI 3.1 description of the HTTP API, served at `GET /api/v1/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// Builds the whole router (tests can drive it without a listener).
pub fn router(state: AppState) -> Router {
    let cors = cors(&state.engine.config.cors_origins);
    let (routes, _) = all_routes().into_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_hygiene))
        .layer(cors)
        .with_state(state)
}

/// What every request gets before and after its handler: a head over [`conn::MAX_HEADERS`] fields
/// or [`conn::MAX_HEADER_BYTES`] is refused with 431 in the error shape; and a response sent
/// before the request's body was read says `Connection: close`, since the connection cannot carry
/// another request (the unread body is in the way): a pooling client would otherwise send its next
/// request into a connection about to close.
async fn request_hygiene(req: Request, next: axum::middleware::Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > conn::MAX_HEADERS || bytes > conn::MAX_HEADER_BYTES {
        let mut resp = ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_large",
            format!(
                "request headers: at most {} fields and {} bytes",
                conn::MAX_HEADERS,
                conn::MAX_HEADER_BYTES
            ),
        )
        .into_response();
        close_after(&mut resp);
        return resp;
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    if !has_body {
        return next.run(req).await;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let req = req.map(|b| {
        axum::body::Body::new(ReadToEnd {
            inner: b,
            done: read.clone(),
        })
    });
    let mut resp = next.run(req).await;
    if !read.load(std::sync::atomic::Ordering::Acquire) {
        close_after(&mut resp);
    }
    resp
}

fn close_after(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// A request body that records when it was read to its end.
struct ReadToEnd {
    inner: axum::body::Body,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves until `shutdown` resolves, then drains: sessions get `disconnect` 1001 (reconnect), open
/// connections finish their request, and the call returns once every connection closed or the grace
/// period ran out, whatever the clients (or the log sink) do.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let config = &engine.config;
    let connections = conn::Connections::new(conn::max_connections(config.max_connections));
    tracing::info!(
        max_connections = connections.max(),
        read_timeout_s = config.read_timeout.as_secs_f64(),
        "Accepting connections."
    );
    let stop = CancellationToken::new();
    let accepting = tokio::spawn(conn::accept(
        listener,
        router(state),
        connections.clone(),
        config.read_timeout,
        config.tcp_nodelay,
        stop.clone(),
    ));
    tokio::select! {
        _ = shutdown => {}
        _ = engine.shutdown.cancelled() => {}
    }
    tracing::info!("Shutting down: closing sessions.");
    engine.shutdown.cancel();
    stop.cancel();
    let _ = accepting.await;
    // Sessions are told first (1001), then their sockets close; upgraded WebSockets and SSE
    // streams hold their connection until then.
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    while (connections.open() > 0 || !engine.hub.is_empty())
        && tokio::time::Instant::now() < deadline
    {
        engine.close_all(CloseReason::Shutdown);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if connections.open() > 0 {
        tracing::info!(
            open = connections.open(),
            "Grace period over: leaving the connections still open."
        );
    }
    engine.leave_registry().await;
    Ok(())
}
