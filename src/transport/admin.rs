//! Operator endpoints (admin key): `/admin` (a small status page), `/admin/rules` (rule-set status),
//! `/admin/rules/dry-run` (arrives with the rules issue: answers 501 until then).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::{AdminKey, ApiError, AppState};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(page))
        .route("/admin/status", get(status))
        .route("/admin/rules", get(rules))
        .route("/admin/rules/dry-run", post(dry_run))
}

fn status_json(s: &AppState) -> serde_json::Value {
    json!({
        "node": &*s.engine.node,
        "backend": if s.engine.config.redis.is_some() { "redis" } else { "memory" },
        "sessions": s.engine.hub.len(),
    })
}

async fn status(State(s): State<AppState>, _: AdminKey) -> Json<serde_json::Value> {
    Json(status_json(&s))
}

async fn page(State(s): State<AppState>, _: AdminKey) -> Html<String> {
    let st = status_json(&s);
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>herald admin</title>\
         <h1>herald</h1><p>node <code>{}</code> &middot; backend <code>{}</code> &middot; \
         <b>{}</b> sessions</p><p><a href=\"/metrics\">metrics</a></p>",
        html_escape(st["node"].as_str().unwrap_or("")),
        st["backend"].as_str().unwrap_or(""),
        st["sessions"]
    ))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn rules(State(_s): State<AppState>, _: AdminKey) -> Json<serde_json::Value> {
    Json(json!({
        "version": 0,
        "loaded_at": null,
        "files": [],
        "last_error": null,
        "mode": "channel defaults (Rhai rules not loaded yet)",
    }))
}

async fn dry_run(_: AdminKey) -> Response {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "rule dry-run arrives with the Rhai rules; routing uses channel defaults",
    )
    .into_response()
}
