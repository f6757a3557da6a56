//! Operator endpoints. `GET /admin` is the admin page: one self-contained HTML file
//! (`admin/page.html`, compiled in; inline CSS and JS, no external asset) that holds no data, so it
//! is served without a key; its login form keeps the admin key in the tab's `sessionStorage` and
//! sends it as `Authorization: Bearer` to the JSON endpoints, which all take the admin key (header
//! only, see [`AdminKey`]):
//! - `/admin/status`: the node, its backend's health and every metric by name
//!   (the Prometheus text read back by [`crate::metrics::parse`]), for the page's live figures;
//! - `/admin/nodes`: the node registry;
//! - `/admin/users/{user}`, `/admin/channels/{channel}`: lookups;
//! - `/admin/push`: providers, outbox figures and the newest dead letters;
//! - `/admin/rules` (rule-set status) and `/admin/rules/dry-run` (an event in, the Decision and
//!   which rule file decided out).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use sha2::Digest;

use super::{AdminKey, ApiError, ApiResult, AppState, Json, JsonBody};
use crate::channels::ChannelName;
use crate::event::EventSpec;

/// A handler's reply: a typed result, serialised as JSON.
type Reply<T> = ApiResult<Json<T>>;

pub(super) fn routes() -> super::routes::Routes {
    super::routes::Routes::new()
        .get("/admin", page)
        .get("/admin/status", status)
        .get("/admin/nodes", nodes)
        .get("/admin/users/{user}", user)
        .get("/admin/channels/{channel}", channel)
        .get("/admin/push", push)
        .get("/admin/rules", rules)
        .post("/admin/rules/dry-run", dry_run)
}

/// The page, as compiled in.
const PAGE: &str = include_str!("admin/page.html");

/// The text of `page` between `open` and the next `close` (an inline script's or style's body).
pub(super) fn inline<'a>(page: &'a str, open: &str, close: &str) -> &'a str {
    let start = page.find(open).map(|i| i + open.len());
    let end = start.and_then(|s| page[s..].find(close).map(|e| s + e));
    match (start, end) {
        (Some(s), Some(e)) => &page[s..e],
        _ => "",
    }
}

/// A CSP source allowing the inline script or style `text`, by its hash.
pub(super) fn sha256_source(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The page's Content-Security-Policy: its one inline script and one inline style (by hash) and
/// requests to this origin, nothing else: no other host, no form submission (the login form is
/// handled by the script, so a key never goes into a URL even without it), no framing.
static PAGE_CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_source(inline(PAGE, "<script>", "</script>")),
        sha256_source(inline(PAGE, "<style>", "</style>")),
    )
});

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP.as_str()),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

/// A path segment, or `bad_frame` when it does not decode (invalid percent-encoding or UTF-8).
fn segment(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|e| ApiError::bad(format!("bad path: {}", e.body_text())))
}

/// `GET /admin/status`: this node, whether its backend answers, and every metric of the process
/// by sample name (`metrics`) with the type of each family (`types`).
async fn status(State(s): State<AppState>, _: AdminKey) -> Json<serde_json::Value> {
    let e = &s.engine;
    let now = crate::event::now_ms();
    let started = e.started_at();
    let providers: Vec<&str> = e.push.kinds().iter().map(|k| k.as_str()).collect();
    let ready = e.ready().await;
    crate::metrics::sample(e.hub.sample());
    let (metrics, types) = exposition();
    Json(json!({
        "node": &*e.node,
        "backend": e.backend_name(),
        "version": env!("CARGO_PKG_VERSION"),
        "started": started,
        "now": now,
        "uptime_s": (now - started).max(0) / 1000,
        "sessions": e.hub.len(),
        "ready": ready,
        "push_providers": providers,
        "metrics": metrics,
        "types": types,
    }))
}

/// One sample for the page: its labels and value (NaN and infinities serialise as `null`).
#[derive(Serialize)]
struct PageSample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Every sample of this process's exposition by sample name (`x`, `x_bucket`, `x_sum`, …), and the
/// type of each family from the metric table (`herald_publish_duration_seconds: histogram`): the page
/// sums, differentiates and reads buckets itself.
fn exposition() -> (
    BTreeMap<String, Vec<PageSample>>,
    BTreeMap<&'static str, &'static str>,
) {
    let mut samples: BTreeMap<String, Vec<PageSample>> = BTreeMap::new();
    for s in crate::metrics::parse(&crate::metrics::render()) {
        samples.entry(s.name).or_default().push(PageSample {
            labels: s.labels.into_iter().collect(),
            value: s.value,
        });
    }
    let types = crate::metrics::METRICS
        .iter()
        .map(|&(name, kind, _, _)| (name, kind.as_str()))
        .collect();
    (samples, types)
}

/// `GET /admin/nodes`: the nodes sharing the backend and their last heartbeat.
async fn nodes(State(s): State<AppState>, _: AdminKey) -> Reply<impl Serialize> {
    Ok(Json(s.engine.nodes().await?))
}

/// `GET /admin/users/{user}`.
async fn user(
    State(s): State<AppState>,
    _: AdminKey,
    user: Result<Path<String>, PathRejection>,
) -> Reply<impl Serialize> {
    let user = segment(user)?;
    Ok(Json(s.engine.user_overview(&user).await?))
}

/// `GET /admin/channels/{channel}`.
async fn channel(
    State(s): State<AppState>,
    _: AdminKey,
    channel: Result<Path<String>, PathRejection>,
) -> Reply<impl Serialize> {
    let ch = ChannelName::parse(&segment(channel)?).map_err(crate::engine::EngineError::from)?;
    Ok(Json(s.engine.channel_overview(&ch).await?))
}

/// Dead letters `/admin/push` lists.
const PAGE_DEAD: usize = 20;

/// `GET /admin/push`: the providers, the outbox figures and the newest dead letters (no token).
async fn push(State(s): State<AppState>, _: AdminKey) -> Reply<serde_json::Value> {
    let providers: Vec<&str> = s.engine.push.kinds().iter().map(|k| k.as_str()).collect();
    let d = s.engine.push_dead_letters(PAGE_DEAD).await?;
    Ok(Json(json!({
        "providers": providers,
        "outbox": d.outbox,
        "dead": d.dead,
    })))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_style_and_the_policy_hashes_them() {
        assert_eq!(PAGE.matches("<script").count(), 1, "one script, no src");
        assert_eq!(PAGE.matches("<style").count(), 1);
        let script = inline(PAGE, "<script>", "</script>");
        let style = inline(PAGE, "<style>", "</style>");
        assert!(script.len() > 1000 && style.len() > 100);
        assert!(PAGE_CSP.contains(&sha256_source(script)));
        assert!(PAGE_CSP.contains(&sha256_source(style)));
        assert!(PAGE_CSP.contains("connect-src 'self'"));
        assert!(PAGE_CSP.contains("form-action 'none'"));
    }

    /// No external asset: nothing the browser would fetch from another host, and no inline
    /// handler attribute (the policy would block it).
    #[test]
    fn the_page_names_no_other_host() {
        let lower = PAGE.to_ascii_lowercase();
        for bad in [
            "http://",
            "https://",
            "//cdn",
            "src=",
            "@import",
            " onclick=",
            " onload=",
        ] {
            assert!(!lower.contains(bad), "the page contains {bad:?}");
        }
        assert!(
            !lower.contains("innerhtml"),
            "data is set as text, never as HTML"
        );
    }
}
