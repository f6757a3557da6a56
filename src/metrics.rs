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
