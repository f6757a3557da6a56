//! The JSON line a run prints ([`Report`]; its groups' docs explain every field), and the publish
//! phase's figures computed from the tallies.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::Args;
use crate::procfs::{CLK_TCK, CpuSample};
use crate::publisher::Published;
use crate::tally::{LATENCY_MAX_US, LATENCY_SIGFIG, Tally};
use crate::ui::Ui;

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The one JSON line a run prints (fields in this order; the flattened groups' fields in place).
#[derive(Serialize)]
pub(crate) struct Report {
    /// Subscriber transport: `ws` or `sse` (`--transport`); `ws` in an idle-only run (idle
    /// connections are always WebSockets).
    pub(crate) transport: &'static str,
    /// How the publisher published: `http` or `ws` (`--publish-via`); absent in an idle-only run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_via: Option<&'static str>,
    /// Number of `--url`s (engine nodes).
    pub(crate) nodes: usize,
    /// `--subscribers`.
    pub(crate) subscribers: usize,
    /// The publish phase's figures; absent in an idle-only run.
    #[serde(flatten)]
    pub(crate) load: Option<LoadReport>,
    /// The idle phase's figures; absent without `--idle`.
    #[serde(flatten)]
    pub(crate) idle: Option<IdleReport>,
}

/// The publish phase's figures.
#[derive(Serialize)]
pub(crate) struct LoadReport {
    /// The room (bare id).
    room: String,
    /// `--payload`: approximate bytes of each event's `data`.
    payload_bytes: usize,
    /// `--duration`: the measured publish phase, seconds.
    duration_s: u64,
    /// `--warmup`: seconds published before measuring.
    warmup_s: u64,
    /// Seconds the subscribers' setup took (memberships, connects, subscribes, publisher sockets).
    pub(crate) setup_s: f64,
    /// Seconds from the first subscriber's connect to the last one subscribed (memberships, made
    /// before, not counted): the connect storm at `--setup-concurrency` in flight.
    pub(crate) connect_s: f64,
    /// Subscribers connected and subscribed per second of `connect_s`.
    pub(crate) connects_per_s: f64,
    /// `--rate`.
    offered_publishes_per_s: u32,
    /// Successful measured publishes per second of the time they took: from the first measured
    /// tick until the last publish was answered, or `duration_s` when that was shorter (a run that
    /// kept up achieves what it offered; one that fell behind, less).
    achieved_publishes_per_s: f64,
    /// Measured publishes sent (successful or not).
    publishes: u64,
    /// Publishes that failed (HTTP error or non-2xx; WebSocket error reply, no reply within 10 s, or
    /// socket lost), warmup included.
    publish_errors: u64,
    /// Publish round trip (request sent to reply, HTTP or WebSocket), median, µs.
    publish_p50_us: u64,
    /// Publish round trip, 99th percentile, µs.
    publish_p99_us: u64,
    /// How late the publisher's latest tick fired, µs: about 1000 is tokio's timer granularity; much
    /// more means the loadgen itself stalled and sent a burst to catch up.
    schedule_lag_max_us: u64,
    /// Successful measured publishes × subscribers.
    expected_deliveries: u64,
    /// Of those, how many arrived (each subscriber and seq counted once).
    delivered: u64,
    /// `delivered / expected_deliveries`: 1.0 means nothing was lost.
    completeness: f64,
    /// `expected_deliveries - delivered`.
    missing: u64,
    /// Runs of consecutive missing seqs, summed over subscribers.
    gaps: u64,
    /// Event frames whose seq the subscriber had already seen (warmup included).
    duplicates: u64,
    /// Event frames with a seq below one the subscriber had already seen (first arrivals only).
    reorders: u64,
    /// Subscribers whose connection closed before the end (e.g. `disconnect` 4008, slow consumer).
    disconnects: u64,
    /// `reset` frames on the room channel (its epoch changed under the subscription).
    resets: u64,
    /// `delivered` per second, over the same time as `achieved_publishes_per_s`.
    deliveries_per_s: f64,
    /// Delivery latency of measured events (receipt time − the publish's send time `t`, both read
    /// from this machine's clock), median, µs.
    latency_p50_us: u64,
    /// Delivery latency, 90th percentile, µs.
    latency_p90_us: u64,
    /// Delivery latency, 99th percentile, µs.
    latency_p99_us: u64,
    /// Delivery latency, largest, µs (clamped at 60 s).
    latency_max_us: u64,
    /// This process's CPU time over warmup + publish phase, % of one core (100 = one core busy): on a
    /// shared machine, what the loadgen took away from the engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) loadgen_cpu_percent: Option<f64>,
    /// With `--redis`: growth of Redis `INFO stats` `total_commands_processed` across the measured
    /// publishes, divided by them. It counts **every command Redis ran in that window**, not only the
    /// publish path: commands run inside Lua scripts, presence heartbeats and sweeps, every node's
    /// work, anything else using that Redis (the loadgen's own `INFO` is subtracted).
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_commands_per_publish: Option<f64>,
    /// `--publish-connections` with `--publish-via ws`; 0 with `http`.
    pub(crate) publish_connections: usize,
    /// `rate × subscribers`: the deliveries per second the schedule offers (compare
    /// `deliveries_per_s`).
    offered_deliveries_per_s: u64,
    /// Length of the CPU window, seconds: from when the first measured publish was due until every
    /// expected delivery arrived (or the drain ended). The CPU fields below cover it.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_window_s: Option<f64>,
    /// This process's CPU time in the CPU window / `delivered`, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    loadgen_cpu_us_per_delivery: Option<f64>,
    /// With `--engine-pid`: the engine processes' CPU time (summed) in the CPU window /
    /// `delivered`, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_cpu_us_per_delivery: Option<f64>,
    /// With `--engine-pid`: the engine processes' CPU time in the CPU window, % of one core (summed:
    /// 200 = two cores busy).
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_cpu_percent: Option<f64>,
    /// With `--redis-pid`: Redis's CPU time in the CPU window / `delivered`, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cpu_us_per_delivery: Option<f64>,
    /// With `--redis-pid`: Redis's CPU time in the CPU window, % of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_cpu_percent: Option<f64>,
}

impl LoadReport {
    /// Fills the CPU-window fields from the samples at its start and end.
    pub(crate) fn set_cpu(&mut self, start: &CpuSample, end: &CpuSample) {
        let secs = end.at.duration_since(start.at).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        self.cpu_window_s = Some(round1(secs));
        let delivered = self.delivered;
        let ticks = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        let per_delivery = |t: Option<u64>| {
            let t = t?;
            (delivered > 0).then(|| round2(t as f64 * 1e6 / CLK_TCK as f64 / delivered as f64))
        };
        let percent = |t: Option<u64>| Some(round1(t? as f64 * 100.0 / CLK_TCK as f64 / secs));
        let loadgen = ticks(start.loadgen, end.loadgen);
        let engine = ticks(start.engine, end.engine);
        let redis = ticks(start.redis, end.redis);
        self.loadgen_cpu_us_per_delivery = per_delivery(loadgen);
        self.engine_cpu_us_per_delivery = per_delivery(engine);
        self.engine_cpu_percent = percent(engine);
        self.redis_cpu_us_per_delivery = per_delivery(redis);
        self.redis_cpu_percent = percent(redis);
    }
}

/// The idle phase's figures.
#[derive(Serialize)]
pub(crate) struct IdleReport {
    /// `--idle`: idle WebSockets opened.
    pub(crate) idle_connections: usize,
    /// Seconds until every idle connection had its subscribe reply.
    pub(crate) idle_setup_s: f64,
    /// The engine's RSS (VmRSS, summed over `--engine-pid`) before the idle connections opened, kB.
    pub(crate) rss_before_kb: u64,
    /// The engine's RSS 1 s after every idle connection was subscribed, kB.
    pub(crate) rss_after_kb: u64,
    /// `(rss_after_kb - rss_before_kb) × 1024 / idle_connections`: the engine's memory per idle
    /// connection, bytes (user space only; the kernel's socket buffers are not in RSS).
    pub(crate) rss_per_idle_connection_bytes: i64,
    /// Idle connections whose socket closed before the end of the run.
    pub(crate) idle_disconnects: u64,
}

pub(crate) fn report(args: &Args, published: &Published, tallies: &[Tally], ui: &Ui) -> LoadReport {
    let seqs = &published.measured_seqs;
    let expected = seqs.len() as u64 * tallies.len() as u64;
    let mut delivered = 0u64;
    let mut gaps = 0u64;
    let mut latency = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
        .expect("valid histogram bounds");
    let (mut duplicates, mut reorders, mut resets, mut unreadable) = (0, 0, 0, 0);
    let mut disconnects = 0u64;
    let mut first_close = None;
    for t in tallies {
        let mut in_gap = false;
        for &s in seqs {
            if t.has(s) {
                delivered += 1;
                in_gap = false;
            } else if !in_gap {
                gaps += 1;
                in_gap = true;
            }
        }
        duplicates += t.duplicates;
        reorders += t.reorders;
        resets += t.resets;
        unreadable += t.unreadable;
        if let Some(c) = &t.closed {
            disconnects += 1;
            first_close.get_or_insert(c.clone());
        }
        // Same bounds everywhere, so this cannot fail.
        let _ = latency.add(&t.latency);
    }
    if let Some(c) = first_close {
        ui.warn(format_args!(
            "{disconnects} subscribers lost their connection; the first: {c}"
        ));
    }
    if unreadable > 0 {
        ui.warn(format_args!(
            "{unreadable} event frames had no readable \"seq\" or \"t\""
        ));
    }
    // Rates over the time the measured publishes really took: a run that fell behind its schedule
    // (see `schedule_lag_max_us`) achieved less than it offered.
    let secs = published.measured_secs.max(args.duration as f64);
    let completeness = if expected == 0 {
        0.0
    } else {
        delivered as f64 / expected as f64
    };
    LoadReport {
        room: args.room.clone(),
        payload_bytes: args.payload,
        duration_s: args.duration,
        warmup_s: args.warmup,
        setup_s: 0.0,
        connect_s: 0.0,
        connects_per_s: 0.0,
        offered_publishes_per_s: args.rate,
        achieved_publishes_per_s: round1(seqs.len() as f64 / secs),
        publishes: published.measured_sent,
        publish_errors: published.errors,
        publish_p50_us: published.round_trip.value_at_quantile(0.5),
        publish_p99_us: published.round_trip.value_at_quantile(0.99),
        schedule_lag_max_us: published.schedule_lag_max_us,
        expected_deliveries: expected,
        delivered,
        completeness: (completeness * 1e6).round() / 1e6,
        missing: expected - delivered,
        gaps,
        duplicates,
        reorders,
        disconnects,
        resets,
        deliveries_per_s: round1(delivered as f64 / secs),
        latency_p50_us: latency.value_at_quantile(0.5),
        latency_p90_us: latency.value_at_quantile(0.9),
        latency_p99_us: latency.value_at_quantile(0.99),
        latency_max_us: latency.max(),
        loadgen_cpu_percent: None,
        redis_commands_per_publish: published.redis_commands.map(|c| {
            let per = c as f64 / published.measured_sent.max(1) as f64;
            (per * 100.0).round() / 100.0
        }),
        publish_connections: 0,
        offered_deliveries_per_s: u64::from(args.rate) * tallies.len() as u64,
        cpu_window_s: None,
        loadgen_cpu_us_per_delivery: None,
        engine_cpu_us_per_delivery: None,
        engine_cpu_percent: None,
        redis_cpu_us_per_delivery: None,
        redis_cpu_percent: None,
    }
}
