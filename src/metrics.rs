//! Prometheus metrics: every name in one place ([`METRICS`], which also gives each its HELP text),
//! and the one function per thing recorded that the rest of the engine calls.
//!
//! Recording stays off the per-delivery path: fan-out records once per event and node (its
//! duration, its deliveries, its deepest queue), publishes and backend calls once per call. The
//! figures that are cheaper to read than to keep up to date (subscriptions, channels with local
//! subscribers) are sampled every [`SAMPLE_EVERY`] and before each scrape ([`sample`]); the queue
//! high-water mark covers one [`SAMPLE_EVERY`] window ([`roll_high_water`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

thread_local! {
    /// Each thread's handles of labelled histograms, by the addresses of their name and label value
    /// (all `&'static str`): `histogram!` with a label builds its key, hashes it and allocates on
    /// every call, and backend calls record several times per publish and per connect.
    static HISTOGRAMS: std::cell::RefCell<std::collections::HashMap<(usize, usize, usize), metrics::Histogram>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Records `value` in histogram `name` with label `label = value`, through the thread's cached
/// handle once the recorder is installed (a handle taken before would be a no-op one, kept forever).
fn record_labelled(name: &'static str, label: &'static str, value: &'static str, took: Duration) {
    if HANDLE.get().is_none() {
        metrics::histogram!(name, label => value).record(took);
        return;
    }
    HISTOGRAMS.with(|cache| {
        let mut cache = cache.borrow_mut();
        cache
            .entry((name.as_ptr() as usize, value.as_ptr() as usize, value.len()))
            .or_insert_with(|| metrics::histogram!(name, label => value))
            .record(took);
    });
}

/// How often the sampled gauges are refreshed.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The kind of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A current value.
    Gauge,
    /// A distribution (Prometheus `_bucket`, `_sum`, `_count`).
    Histogram,
}

impl MetricKind {
    /// The Prometheus type name (`# TYPE`).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Every metric herald exports: name, kind, labels, HELP text. The README's metric list is this table.
pub const METRICS: &[(&str, MetricKind, &str, &str)] = &[
    // publishing
    (
        PUBLISHED,
        Counter,
        "source",
        "Events accepted by the publish pipeline (source: api = the HTTP API, client = a WebSocket publish).",
    ),
    (
        PUBLISH_ERRORS,
        Counter,
        "code",
        "Publishes refused or failed, by error code (bad_frame, rejected, unavailable, outcome_unknown, ...).",
    ),
    (
        PUBLISH_DURATION,
        Histogram,
        "source",
        "Time from the engine receiving a publish to its reply (rules, storage on every target, fan-out handed to the broker), seconds.",
    ),
    (
        IDEMPOTENT_REPLAYS,
        Counter,
        "",
        "Publishes answered from the first result of their idempotency key.",
    ),
    // delivery
    (
        DELIVERIES,
        Counter,
        "",
        "Frames handed to local sessions (queued for their tasks, or written by the fan-out itself).",
    ),
    (
        DIRECT_WRITES,
        Counter,
        "",
        "Deliveries the fan-out wrote to an idle WebSocket's socket itself (or dropped as already sent) instead of queueing them for the session's task.",
    ),
    (
        COALESCING,
        Gauge,
        "",
        "1 while fan-outs hold deliveries for the flush tick (http.coalesce: on, or auto with the CPU busy), else 0.",
    ),
    (
        COALESCED_FLUSHES,
        Counter,
        "",
        "Sessions the flush tick took up while coalescing: each one write of what queued up for it since the last tick (or a wake-up of its task).",
    ),
    (
        FANOUT_DURATION,
        Histogram,
        "",
        "Time from the broker handing an event to this node to the event being queued for every local subscriber, seconds.",
    ),
    (
        QUEUE_HIGH_WATER,
        Gauge,
        "",
        "The deepest session outbound queue seen in the last sampling interval (5 s), in frames; sessions are closed with 4008 at limits.queue.",
    ),
    (
        SLOW_CONSUMER,
        Counter,
        "",
        "Sessions closed with 4008 because their outbound queue filled.",
    ),
    (
        BEST_EFFORT_SKIPPED,
        Counter,
        "",
        "Best-effort frames (presence, typing) skipped for sessions that were falling behind.",
    ),
    // sessions
    (
        SESSIONS,
        Gauge,
        "transport",
        "Open sessions on this node, by transport (ws, sse).",
    ),
    (
        SESSIONS_OPENED,
        Counter,
        "transport",
        "Sessions opened, by transport.",
    ),
    (
        DISCONNECTS,
        Counter,
        "transport, code",
        "Sessions ended, by transport and close code (4001-4012, 1001, 1002, 1007, 1009, 1011, 1013; client = the client went away).",
    ),
    (
        SUBSCRIPTIONS,
        Gauge,
        "transport",
        "Channel subscriptions of this node's sessions, by transport (sampled).",
    ),
    (
        LOCAL_CHANNELS,
        Gauge,
        "",
        "Channels with at least one subscriber on this node (sampled).",
    ),
    (
        CONNECTIONS_REFUSED,
        Counter,
        "",
        "Connections refused because the node held http.max_connections.",
    ),
    // recovery
    (
        UNRECOVERED,
        Counter,
        "via",
        "Resumes that could not be served, recovered: false (via: ws / sse = a subscribe or stream resuming from a position, history = a history page): the epoch changed, or the events were trimmed or aged out; the client must refetch.",
    ),
    (
        RESETS,
        Counter,
        "",
        "reset frames sent: a channel's epoch changed under a live subscription.",
    ),
    (
        GAP_REPAIRS,
        Counter,
        "",
        "Seq gaps in the Redis Pub/Sub feed repaired from the stream before delivery.",
    ),
    (
        HEALS,
        Counter,
        "outcome",
        "Checks of every subscribed channel against Redis after the subscription broke (ok, failed).",
    ),
    // backend
    (
        BACKEND_DURATION,
        Histogram,
        "op",
        "Backend calls, by operation (e.g. broker.publish, presence.connect), seconds.",
    ),
    (
        BACKEND_ERRORS,
        Counter,
        "op, kind",
        "Backend calls that failed, by operation and kind (unavailable, outcome_unknown, other).",
    ),
    (
        REDIS_UP,
        Gauge,
        "connection",
        "Whether Redis answers on this node's connection (command: its probe PUBLISH succeeds; subscriber: the probe comes back), 1 or 0.",
    ),
    (
        REDIS_RECONNECTS,
        Counter,
        "connection",
        "Times a Redis connection came back after being down.",
    ),
    // rules
    (
        RULE_DURATION,
        Histogram,
        "hook",
        "Time a rule hook call took (route, can_subscribe, can_publish, announce), seconds; cached route decisions are not counted, a reload's fixture runs are.",
    ),
    (
        RULE_ERRORS,
        Counter,
        "hook",
        "Rule hook calls that failed or ran out of budget (on_error applied).",
    ),
    (
        RULES_RELOADS,
        Counter,
        "outcome",
        "Rule reloads, by outcome (ok, refused: the last good rules stay).",
    ),
    (
        RULES_VERSION,
        Gauge,
        "",
        "Version of the rule set in use (1 at start, +1 per successful reload).",
    ),
    // push
    (
        PUSH_PLANS,
        Counter,
        "when",
        "Push plans recorded by publishes, by the rule's when (offline, background, unacked, always).",
    ),
    (
        PUSH_JOBS_PLANNED,
        Counter,
        "",
        "Push jobs (one per device) queued from plans and summaries.",
    ),
    (
        PUSH_SENT,
        Counter,
        "provider",
        "Pushes the provider accepted.",
    ),
    (
        PUSH_FAILED,
        Counter,
        "provider, reason, then",
        "Pushes that failed, by provider, reason class (an HTTP status, timeout, connect, ...) and what happened next (retry, dead_letter).",
    ),
    (
        PUSH_DEAD_TOKENS,
        Counter,
        "provider",
        "Devices removed because their provider said the token is dead.",
    ),
    (
        PUSH_QUEUED,
        Gauge,
        "",
        "Push jobs due and waiting to be sent (outbox).",
    ),
    (
        PUSH_PENDING,
        Gauge,
        "",
        "Push jobs claimed by a node and being sent.",
    ),
    (
        PUSH_TIMERS,
        Gauge,
        "",
        "Push fallback timers waiting (unacked / background delays).",
    ),
    (
        PUSH_DEAD,
        Gauge,
        "",
        "Dead letters kept (jobs that failed max_attempts times).",
    ),
    (
        PUSH_LAG,
        Gauge,
        "",
        "Age of the oldest due push job, seconds (0 when none).",
    ),
];

const PUBLISHED: &str = "herald_events_published_total";
const PUBLISH_ERRORS: &str = "herald_publish_errors_total";
const PUBLISH_DURATION: &str = "herald_publish_duration_seconds";
const IDEMPOTENT_REPLAYS: &str = "herald_idempotent_replays_total";
const DELIVERIES: &str = "herald_deliveries_total";
const DIRECT_WRITES: &str = "herald_direct_writes_total";
const COALESCING: &str = "herald_coalescing";
const COALESCED_FLUSHES: &str = "herald_coalesced_flushes_total";
const FANOUT_DURATION: &str = "herald_fanout_duration_seconds";
const QUEUE_HIGH_WATER: &str = "herald_session_queue_high_water";
const SLOW_CONSUMER: &str = "herald_slow_consumer_disconnects_total";
const BEST_EFFORT_SKIPPED: &str = "herald_best_effort_skipped_total";
const SESSIONS: &str = "herald_sessions";
const SESSIONS_OPENED: &str = "herald_sessions_opened_total";
const DISCONNECTS: &str = "herald_disconnects_total";
const SUBSCRIPTIONS: &str = "herald_subscriptions";
const LOCAL_CHANNELS: &str = "herald_local_channels";
const CONNECTIONS_REFUSED: &str = "herald_connections_refused_total";
const UNRECOVERED: &str = "herald_unrecovered_total";
const RESETS: &str = "herald_resets_total";
const GAP_REPAIRS: &str = "herald_gap_repairs_total";
const HEALS: &str = "herald_redis_heals_total";
const BACKEND_DURATION: &str = "herald_backend_duration_seconds";
const BACKEND_ERRORS: &str = "herald_backend_errors_total";
const REDIS_UP: &str = "herald_redis_up";
const REDIS_RECONNECTS: &str = "herald_redis_reconnects_total";
const RULE_DURATION: &str = "herald_rule_duration_seconds";
const RULE_ERRORS: &str = "herald_rule_errors_total";
const RULES_RELOADS: &str = "herald_rules_reloads_total";
const RULES_VERSION: &str = "herald_rules_version";
const PUSH_PLANS: &str = "herald_push_plans_total";
const PUSH_JOBS_PLANNED: &str = "herald_push_jobs_planned_total";
const PUSH_SENT: &str = "herald_push_sent_total";
const PUSH_FAILED: &str = "herald_push_failed_total";
const PUSH_DEAD_TOKENS: &str = "herald_push_dead_tokens_total";
const PUSH_QUEUED: &str = "herald_push_outbox_queued";
const PUSH_PENDING: &str = "herald_push_outbox_pending";
const PUSH_TIMERS: &str = "herald_push_timers";
const PUSH_DEAD: &str = "herald_push_dead_letters";
const PUSH_LAG: &str = "herald_push_outbox_lag_seconds";

/// Histogram buckets, seconds: 50 µs to 5 s (publish and fan-out sit in the lower half; a backend
/// call times out at 2 s).
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Installs the global recorder once per process (later calls reuse it; tests start many engines),
/// with every metric's HELP text.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            for &(name, kind, labels, help) in METRICS {
                match kind {
                    Counter => {
                        metrics::describe_counter!(name, help);
                        // An unlabelled counter exists from the start at 0, so a dashboard shows 0
                        // rather than "no data" and rate() has a series before the first event.
                        if labels.is_empty() {
                            metrics::counter!(name).increment(0);
                        }
                    }
                    Gauge => metrics::describe_gauge!(name, help),
                    Histogram => metrics::describe_histogram!(name, help),
                }
            }
            Some(handle)
        })
        .clone()
}

/// Renders the exposition text.
pub fn render() -> String {
    install().map(|h| h.render()).unwrap_or_default()
}

/// Events accepted by the publish pipeline, and how long the publish took.
pub fn published(source: &'static str, took: Duration) {
    metrics::counter!(PUBLISHED, "source" => source).increment(1);
    record_labelled(PUBLISH_DURATION, "source", source, took);
}

/// Publishes rejected, by error code, and how long the publish took.
pub fn publish_failed(source: &'static str, code: &'static str, took: Duration) {
    metrics::counter!(PUBLISH_ERRORS, "code" => code).increment(1);
    record_labelled(PUBLISH_DURATION, "source", source, took);
}

/// Idempotent publishes answered from the first result.
pub fn idempotent_replay() {
    metrics::counter!(IDEMPOTENT_REPLAYS).increment(1);
}

/// The deepest queue seen since the last sample.
static HIGH_WATER: AtomicU64 = AtomicU64::new(0);

/// One fan-out from `started` to `done`: `n` frames handed over, `direct` of them written by the
/// fan-out itself, the deepest queue they left.
pub fn fanned_out(n: u64, direct: u64, deepest: usize, started: Instant, done: Instant) {
    if n > 0 {
        metrics::counter!(DELIVERIES).increment(n);
        HIGH_WATER.fetch_max(deepest as u64, Ordering::Relaxed);
    }
    if direct > 0 {
        metrics::counter!(DIRECT_WRITES).increment(direct);
    }
    metrics::histogram!(FANOUT_DURATION).record(done.saturating_duration_since(started));
}

/// Deliveries a writer task wrote for a fan-out ([`crate::engine::hub`]'s deferred writes).
pub fn written_directly(n: u64) {
    if n > 0 {
        metrics::counter!(DIRECT_WRITES).increment(n);
    }
}

/// One flush tick's part ([`crate::engine::Hub::flush_held`]): `sessions` taken up, `wrote`
/// deliveries written to their sockets.
pub fn flushed_held(sessions: u64, wrote: u64) {
    metrics::counter!(COALESCED_FLUSHES).increment(sessions);
    if wrote > 0 {
        metrics::counter!(DIRECT_WRITES).increment(wrote);
    }
}

/// Whether fan-outs coalesce ([`crate::engine::Hub::set_coalescing`]).
pub fn coalescing(on: bool) {
    metrics::gauge!(COALESCING).set(f64::from(u8::from(on)));
}

/// Sessions closed because their queue filled.
pub fn slow_consumer() {
    metrics::counter!(SLOW_CONSUMER).increment(1);
}

/// Best-effort frames (presence, typing) skipped for sessions that were falling behind.
pub fn best_effort_skipped() {
    metrics::counter!(BEST_EFFORT_SKIPPED).increment(1);
}

/// Sessions opened, by transport.
pub fn session_opened(transport: &'static str) {
    metrics::counter!(SESSIONS_OPENED, "transport" => transport).increment(1);
    metrics::gauge!(SESSIONS, "transport" => transport).increment(1.0);
}

/// Sessions closed, by transport and close code (`None`: the client went away).
pub fn session_closed(transport: &'static str, code: Option<u16>) {
    metrics::gauge!(SESSIONS, "transport" => transport).decrement(1.0);
    metrics::counter!(DISCONNECTS, "transport" => transport, "code" => code_label(code))
        .increment(1);
}

/// The label of a close code: a fixed set.
fn code_label(code: Option<u16>) -> &'static str {
    match code {
        None => "client",
        Some(4001) => "4001",
        Some(4002) => "4002",
        Some(4003) => "4003",
        Some(4008) => "4008",
        Some(4009) => "4009",
        Some(4010) => "4010",
        Some(4011) => "4011",
        Some(4012) => "4012",
        Some(1001) => "1001",
        Some(1002) => "1002",
        Some(1007) => "1007",
        Some(1009) => "1009",
        Some(1011) => "1011",
        Some(1013) => "1013",
        Some(_) => "other",
    }
}

/// What [`sample`] reads from the hub.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sampled {
    /// Subscriptions of WebSocket sessions.
    pub ws_subscriptions: u64,
    /// Subscriptions of SSE sessions.
    pub sse_subscriptions: u64,
    /// Channels with a local subscriber.
    pub channels: u64,
}

/// Refreshes the sampled gauges (every [`SAMPLE_EVERY`], and before each scrape).
pub fn sample(s: Sampled) {
    metrics::gauge!(SUBSCRIPTIONS, "transport" => "ws").set(s.ws_subscriptions as f64);
    metrics::gauge!(SUBSCRIPTIONS, "transport" => "sse").set(s.sse_subscriptions as f64);
    metrics::gauge!(LOCAL_CHANNELS).set(s.channels as f64);
}

/// How often histogram samples are folded into their buckets ([`upkeep`]).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Folds the histogram samples recorded since the last call into their buckets. The exporter keeps
/// each recorded value until then, so without it a node nobody scrapes would hold every latency it
/// ever measured; called every [`UPKEEP_EVERY`] (and by each render).
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// Publishes the deepest queue seen since the last call and starts over (every [`SAMPLE_EVERY`]).
pub fn roll_high_water() {
    metrics::gauge!(QUEUE_HIGH_WATER).set(HIGH_WATER.swap(0, Ordering::Relaxed) as f64);
}

/// A resume that could not be served (`recovered: false`), via `ws`, `sse` or `history`.
pub fn unrecovered(via: &'static str) {
    metrics::counter!(UNRECOVERED, "via" => via).increment(1);
}

/// A `reset` frame queued for a session.
pub fn reset_sent() {
    metrics::counter!(RESETS).increment(1);
}

/// A seq gap in the Pub/Sub feed repaired from the stream.
pub fn gap_repaired() {
    metrics::counter!(GAP_REPAIRS).increment(1);
}

/// A check of every subscribed channel after the Redis subscription broke.
pub fn redis_heal(ok: bool) {
    metrics::counter!(HEALS, "outcome" => if ok { "ok" } else { "failed" }).increment(1);
}

/// One backend call: its operation, how long it took, and how it failed if it did.
pub fn backend_call(op: &'static str, took: Duration, failed: Option<&'static str>) {
    record_labelled(BACKEND_DURATION, "op", op, took);
    if let Some(kind) = failed {
        metrics::counter!(BACKEND_ERRORS, "op" => op, "kind" => kind).increment(1);
    }
}

/// Whether Redis answers on `connection` (`command`, `subscriber`); `came_back` counts a reconnect.
pub fn redis_up(connection: &'static str, up: bool, came_back: bool) {
    metrics::gauge!(REDIS_UP, "connection" => connection).set(if up { 1.0 } else { 0.0 });
    if came_back {
        metrics::counter!(REDIS_RECONNECTS, "connection" => connection).increment(1);
    }
}

/// One rule hook call and how long it took.
pub fn rule_call(hook: &str, took: Duration) {
    record_labelled(RULE_DURATION, "hook", hook_label(hook), took);
}

/// The label of a hook name: a fixed set.
fn hook_label(hook: &str) -> &'static str {
    match hook {
        "route" => "route",
        "can_subscribe" => "can_subscribe",
        "can_publish" => "can_publish",
        "announce" => "announce",
        _ => "other",
    }
}

/// Rule hook calls that failed or ran out of budget (on_error applied).
pub fn rule_error(hook: &'static str) {
    metrics::counter!(RULE_ERRORS, "hook" => hook).increment(1);
}

/// Rule reloads, by outcome (`ok`, `refused`).
pub fn rules_reload(outcome: &'static str) {
    metrics::counter!(RULES_RELOADS, "outcome" => outcome).increment(1);
}

/// The version of the rule set in use.
pub fn rules_version(version: u64) {
    metrics::gauge!(RULES_VERSION).set(version as f64);
}

/// Connections refused because the node held its maximum (`http.max_connections`).
pub fn connection_refused() {
    metrics::counter!(CONNECTIONS_REFUSED).increment(1);
}

/// Push plans recorded by publishes, by the rule's `when`.
pub fn push_planned(when: &'static str) {
    metrics::counter!(PUSH_PLANS, "when" => when).increment(1);
}

/// Push jobs (one per device) queued from plans and summaries.
pub fn push_jobs_planned(n: u64) {
    if n > 0 {
        metrics::counter!(PUSH_JOBS_PLANNED).increment(n);
    }
}

/// Pushes the provider accepted.
pub fn push_sent(provider: &'static str) {
    metrics::counter!(PUSH_SENT, "provider" => provider).increment(1);
}

/// Pushes that failed, by provider, why (an HTTP status or `timeout`/`connect`/…, from the
/// outcome's reason: a bounded set) and what happened next (`retry`, `dead_letter`).
pub fn push_failed(provider: &'static str, reason: &str, then: &'static str) {
    metrics::counter!(
        PUSH_FAILED,
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
    metrics::counter!(PUSH_DEAD_TOKENS, "provider" => provider).increment(1);
}

/// The outbox figures (refreshed every few seconds by each node's sending loop).
pub fn push_outbox(queued: u64, pending: u64, timers: u64, dead: u64, oldest_ms: u64) {
    metrics::gauge!(PUSH_QUEUED).set(queued as f64);
    metrics::gauge!(PUSH_PENDING).set(pending as f64);
    metrics::gauge!(PUSH_TIMERS).set(timers as f64);
    metrics::gauge!(PUSH_DEAD).set(dead as f64);
    metrics::gauge!(PUSH_LAG).set(oldest_ms as f64 / 1000.0);
}

/// One sample of the exposition text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` for histograms).
    pub name: String,
    /// Labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus exposition text (what [`render`] writes: comments skipped, label values with
/// `\\`, `\"` and `\n` escapes); a line that does not parse is skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `name{l="v",…} value [timestamp]`.
fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = label_set(after, &mut labels)?;
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Reads `l="v",…}` into `labels`; the text after the closing brace.
fn label_set<'a>(mut s: &'a str, labels: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some(after);
        }
        let end = s.find(|c: char| !is_name_char(c))?;
        let key = &s[..end];
        s = s[end..].trim_start().strip_prefix('=')?;
        s = s.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if key.is_empty() {
            return None;
        }
        labels.push((key.to_string(), value));
        s = s[close + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

/// The sum of every sample named `name` (all label sets).
pub fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .fold(0.0, |sum, s| sum + s.value)
}

/// The `q` quantile (0..1) of histogram `name` over all its label sets, estimated from its
/// cumulative buckets as Prometheus' `histogram_quantile` does (linear within the bucket; the
/// highest finite bound when it falls in `+Inf`). `None` when it has no observations.
pub fn quantile(samples: &[Sample], name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut bounds: Vec<(f64, f64)> = Vec::new();
    for s in samples.iter().filter(|s| s.name == bucket) {
        let le = match s.label("le")? {
            "+Inf" => f64::INFINITY,
            v => v.parse().ok()?,
        };
        match bounds.iter_mut().find(|(b, _)| *b == le) {
            Some((_, n)) => *n += s.value,
            None => bounds.push((le, s.value)),
        }
    }
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = bounds.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * count;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, n) in &bounds {
        if n >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let within = n - below;
            let f = if within > 0.0 {
                (rank - below) / within
            } else {
                1.0
            };
            return Some(lo + (le - lo) * f);
        }
        (lo, below) = (le, n);
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::{parse, quantile, total};

    #[test]
    fn exposition_text_parses_with_labels_and_escapes() {
        let text = "# HELP x_total help\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"uote\"} 3\nx_total 4\ny 2.5e-3\nbad line\n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].label("a"), Some("1"));
        assert_eq!(s[0].label("b"), Some("q\"uote"));
        assert_eq!(total(&s, "x_total"), 7.0);
        assert_eq!(s[2].value, 0.0025);
    }

    #[test]
    fn escapes_trailing_commas_timestamps_and_nan_are_read() {
        let text = "x_total 12345 1700000000000\nodd{q=\"a \\\"quoted\\\" \\\\ \\n line\",} NaN\n";
        let s = parse(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].value, 12345.0);
        assert_eq!(s[1].label("q"), Some("a \"quoted\" \\ \n line"));
        assert!(s[1].value.is_nan());
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped_without_a_panic() {
        let text = "garbage\n{x=\"1\"} 2\nm{unclosed=\"v} 1\nm{a=b} 1\nm{a=\"1\" b=\"2\"} 1\n\
                    1m 3\nm notanumber\nm{a=\"1\"}\nok 7\n# TYPE\nm{\u{e9}=\"x\"} 1\n";
        let s = parse(text);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].name.as_str(), s[0].value), ("ok", 7.0));
    }

    #[test]
    fn quantiles_come_from_cumulative_buckets() {
        let text = "h_bucket{le=\"0.001\"} 90\nh_bucket{le=\"0.01\"} 99\nh_bucket{le=\"0.1\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        let s = parse(text);
        let p50 = quantile(&s, "h", 0.5).unwrap();
        assert!((p50 - 0.001 * 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p99 = quantile(&s, "h", 0.99).unwrap();
        assert!((p99 - 0.01).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&s, "missing", 0.99), None);
        let inf = parse("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n");
        assert_eq!(quantile(&inf, "h", 0.99), Some(1.0));
    }

    #[test]
    fn every_metric_has_a_unique_name_and_help() {
        let mut names: Vec<&str> = super::METRICS.iter().map(|m| m.0).collect();
        for &(name, _, _, help) in super::METRICS {
            assert!(name.starts_with("herald_"), "{name}");
            assert!(help.len() > 20, "{name}: HELP too short");
        }
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a name is listed twice");
    }

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
