//! Prometheus metrics: every name in one place.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once per process (later calls reuse it; tests start many engines).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// Renders the exposition text.
pub fn render() -> String {
    install().map(|h| h.render()).unwrap_or_default()
}

/// Events accepted by the publish pipeline.
pub fn published(source: &'static str) {
    metrics::counter!("herald_events_published_total", "source" => source).increment(1);
}

/// Frames handed to local session queues.
pub fn delivered(n: u64) {
    if n > 0 {
        metrics::counter!("herald_deliveries_total").increment(n);
    }
}

/// Sessions closed because their queue filled.
pub fn slow_consumer() {
    metrics::counter!("herald_slow_consumer_disconnects_total").increment(1);
}

/// Best-effort frames (presence, typing) skipped for sessions that were falling behind.
pub fn best_effort_skipped() {
    metrics::counter!("herald_best_effort_skipped_total").increment(1);
}

/// Sessions opened, by transport.
pub fn session_opened(transport: &'static str) {
    metrics::counter!("herald_sessions_opened_total", "transport" => transport).increment(1);
    metrics::gauge!("herald_sessions", "transport" => transport).increment(1.0);
}

/// Sessions closed, by transport.
pub fn session_closed(transport: &'static str) {
    metrics::gauge!("herald_sessions", "transport" => transport).decrement(1.0);
}

/// Publishes rejected, by error code.
pub fn publish_failed(code: &'static str) {
    metrics::counter!("herald_publish_errors_total", "code" => code).increment(1);
}

/// Idempotent publishes answered from the first result.
pub fn idempotent_replay() {
    metrics::counter!("herald_idempotent_replays_total").increment(1);
}

/// Rule hook calls that failed or ran out of budget (on_error applied).
pub fn rule_error(hook: &'static str) {
    metrics::counter!("herald_rule_errors_total", "hook" => hook).increment(1);
}

/// Rule reloads, by outcome (`ok`, `refused`).
pub fn rules_reload(outcome: &'static str) {
    metrics::counter!("herald_rules_reloads_total", "outcome" => outcome).increment(1);
}

/// Connections refused because the node held its maximum (`http.max_connections`).
pub fn connection_refused() {
    metrics::counter!("herald_connections_refused_total").increment(1);
}

/// Push plans recorded by publishes, by the rule's `when`.
pub fn push_planned(when: &'static str) {
    metrics::counter!("herald_push_plans_total", "when" => when).increment(1);
}

/// Push jobs (one per device) queued from plans and summaries.
pub fn push_jobs_planned(n: u64) {
    if n > 0 {
        metrics::counter!("herald_push_jobs_planned_total").increment(n);
    }
}

/// Pushes the provider accepted.
pub fn push_sent(provider: &'static str) {
    metrics::counter!("herald_push_sent_total", "provider" => provider).increment(1);
}

/// Pushes that failed, by provider, why (an HTTP status or `timeout`/`connect`/…, from the
/// outcome's reason: a bounded set) and what happened next (`retry`, `dead_letter`).
pub fn push_failed(provider: &'static str, reason: &str, then: &'static str) {
    metrics::counter!(
        "herald_push_failed_total",
        "provider" => provider,
        "reason" => failure_class(reason),
        "then" => then
    )
    .increment(1);
}

/// The label of a provider outcome's reason (`"fcm 404 UNREGISTERED"` -> `"404"`, `"webhook
/// timeout"` -> `"timeout"`): a fixed set, whatever the provider said.
fn failure_class(reason: &str) -> &'static str {
    const KNOWN: [&str; 20] = [
        "400",
        "401",
        "403",
        "404",
        "408",
        "410",
        "413",
        "429",
        "500",
        "502",
        "503",
        "504",
        "timeout",
        "connect",
        "network",
        "request",
        "body",
        "auth",
        "malformed",
        "encode",
    ];
    let word = reason
        .split([' ', ':'])
        .filter(|w| !w.is_empty())
        .nth(1)
        .unwrap_or("");
    if let Some(k) = KNOWN.iter().find(|k| **k == word) {
        return k;
    }
    match word.as_bytes().first() {
        Some(b'4') if word.len() == 3 => "4xx",
        Some(b'5') if word.len() == 3 => "5xx",
        _ => "other",
    }
}

/// Devices removed because their provider said the token is dead.
pub fn push_dead_token(provider: &'static str) {
    metrics::counter!("herald_push_dead_tokens_total", "provider" => provider).increment(1);
}

/// The outbox figures (refreshed every few seconds by each node's sending loop).
pub fn push_outbox(queued: u64, pending: u64, timers: u64, dead: u64, oldest_ms: u64) {
    metrics::gauge!("herald_push_outbox_queued").set(queued as f64);
    metrics::gauge!("herald_push_outbox_pending").set(pending as f64);
    metrics::gauge!("herald_push_timers").set(timers as f64);
    metrics::gauge!("herald_push_dead_letters").set(dead as f64);
    metrics::gauge!("herald_push_outbox_lag_seconds").set(oldest_ms as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    #[test]
    fn push_failure_classes_are_a_fixed_set() {
        use super::failure_class as c;
        assert_eq!(c("fcm 404 UNREGISTERED"), "404");
        assert_eq!(c("webhook 400"), "400");
        assert_eq!(c("webpush timeout"), "timeout");
        assert_eq!(c("apns 418"), "4xx");
        assert_eq!(c("fcm auth 400"), "auth");
        assert_eq!(c("fcm token malformed"), "other");
        assert_eq!(c("provider webhook is not configured"), "other");
        assert_eq!(c(""), "other");
    }
}
