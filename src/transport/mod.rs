//! The edges: wire frames <-> engine calls, no business logic. Assembles the axum router (one state
//! type), maps engine errors to `{"error":{"code","message"}}` with fitting statuses, and serves with
//! graceful shutdown: sessions get `disconnect` 1001 with `reconnect: true`, in-flight requests finish.

pub mod admin;
pub mod api;
pub mod auth;
pub mod sse;
pub mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::engine::{CloseReason, Engine, EngineError, ErrorCode};
use auth::{Auth, AuthError, Claims};

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
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
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

/// An operator holding the admin key.
pub struct AdminKey;

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let q = query_map(parts);
        match auth::bearer(&parts.headers, q.get("key").map(String::as_str)) {
            Some(k) if state.auth.is_admin_key(&k) => Ok(AdminKey),
            Some(_) => Err(ApiError::unauthorized("invalid admin key")),
            None => Err(ApiError::unauthorized("missing admin key")),
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

/// Builds the whole router (tests can drive it without a listener).
pub fn router(state: AppState) -> Router {
    let cors = cors(&state.engine.config.cors_origins);
    Router::new()
        .merge(ws::routes())
        .merge(sse::routes())
        .merge(api::routes())
        .merge(admin::routes())
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then drains: sessions get `disconnect` 1001 (reconnect), in-flight
/// requests finish, and the call returns once every session closed or the grace period ran out.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let app = router(state);
    let token = engine.shutdown.clone();
    let drain_engine = engine.clone();
    let graceful = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = token.cancelled() => {}
        }
        tracing::info!("Shutting down: closing sessions.");
        drain_engine.shutdown.cancel();
        drain_engine.close_all(CloseReason::Shutdown);
    };
    // No Nagle: frames are already batched per flush; waiting for ACKs only adds latency.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "Could not set TCP_NODELAY.");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(graceful)
    .await?;
    // Upgraded WebSockets are not tracked by the server: wait for their sessions to close.
    let deadline = tokio::time::Instant::now() + engine.config.shutdown_grace;
    while !engine.hub.is_empty() && tokio::time::Instant::now() < deadline {
        engine.close_all(CloseReason::Shutdown);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}
