//! Operator endpoints (admin key): `/admin` (a small status page), `/admin/rules` (rule-set status),
//! `/admin/rules/dry-run` (an event in, the Decision and which rule file decided out).

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use super::{AdminKey, ApiError, AppState, Json, JsonBody};
use crate::event::EventSpec;

pub(super) fn routes() -> super::routes::Routes {
    super::routes::Routes::new()
        .get("/admin", page)
        .get("/admin/status", status)
        .get("/admin/rules", rules)
        .post("/admin/rules/dry-run", dry_run)
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

/// Dead letters shown on the page.
const PAGE_DEAD: usize = 20;

async fn page(State(s): State<AppState>, _: AdminKey) -> Html<String> {
    let st = status_json(&s);
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>herald admin</title>\
         <h1>herald</h1><p>node <code>{}</code> &middot; backend <code>{}</code> &middot; \
         <b>{}</b> sessions</p><p><a href=\"/metrics\">metrics</a></p>{}",
        html_escape(st["node"].as_str().unwrap_or("")),
        st["backend"].as_str().unwrap_or(""),
        st["sessions"],
        push_section(&s).await,
    ))
}

/// Providers, the outbox figures and the newest dead letters (no token, no text).
async fn push_section(s: &AppState) -> String {
    let kinds: Vec<&str> = s.engine.push.kinds().iter().map(|k| k.as_str()).collect();
    if kinds.is_empty() {
        return "<h2>push</h2><p>no provider configured</p>".into();
    }
    let d = match s.engine.push_dead_letters(PAGE_DEAD).await {
        Ok(d) => d,
        Err(e) => return format!("<h2>push</h2><p>{}</p>", html_escape(&e.message)),
    };
    let o = &d.outbox;
    let mut out = format!(
        "<h2>push</h2><p>providers <code>{}</code> &middot; queued <b>{}</b> (claimed {}) &middot; \
         timers <b>{}</b> &middot; oldest {} ms &middot; dead letters <b>{}</b> \
         (<a href=\"/api/v1/push/dead\">JSON</a>, API key)</p>",
        kinds.join(", "),
        o.queued,
        o.pending,
        o.timers,
        o.oldest_ms,
        o.dead
    );
    if !d.dead.is_empty() {
        out.push_str(
            "<table><tr><th>at (unix ms)<th>user<th>device<th>provider<th>event<th>attempts<th>reason",
        );
        for l in &d.dead {
            out.push_str(&format!(
                "<tr><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{}",
                l.at,
                html_escape(&l.job.user),
                html_escape(&l.job.device),
                l.job.provider.as_str(),
                html_escape(&l.job.event),
                l.attempts,
                html_escape(&l.reason)
            ));
        }
        out.push_str("</table>");
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn rules(State(s): State<AppState>, _: AdminKey) -> Json<serde_json::Value> {
    Json(serde_json::to_value(s.engine.rules_status()).expect("status serialises"))
}

/// `POST /admin/rules/dry-run`: the body of `POST /events` (plus optional `source` and the sender's
/// `attrs`: an [`EventSpec`]); nothing is stored or delivered.
async fn dry_run(
    State(s): State<AppState>,
    _: AdminKey,
    JsonBody(spec): JsonBody<EventSpec>,
) -> Response {
    match s.engine.dry_run(&spec).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
