//! `/metrics` through the wire: every exported metric has HELP text and is in the one list
//! (`herald::metrics::METRICS`), and the figures an operator alerts on move with what happens
//! (publishes and their latency, fan-out, backend calls, disconnects by code, unrecovered resumes,
//! subscriptions). The recorder is one per process and tests run side by side, so counters are
//! compared as "grew by at least", never as exact values.

use std::collections::HashMap;

use herald::metrics::{METRICS, MetricKind, Sample, parse};
use serde_json::json;

use crate::common::*;

async fn scrape(s: &TestServer) -> (String, Vec<Sample>) {
    let text = s.metrics_text().await;
    let samples = parse(&text);
    (text, samples)
}

/// The sum of `name` over the samples whose labels include every pair of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn every_exported_metric_has_help_text_and_is_in_the_list() {
    let s = TestServer::start().await;
    // Some traffic, so that most metrics exist.
    s.join("r1", "alice").await;
    let mut ws = s.ws("alice").await;
    ws.subscribed("room:r1").await;
    s.publish(json!({"event": "m", "room": "r1", "data": {}}))
        .await;
    ws.event_on("room:r1").await;
    let (text, _) = scrape(&s).await;

    let listed: HashMap<&str, MetricKind> = METRICS.iter().map(|m| (m.0, m.1)).collect();
    let mut helped = Vec::new();
    let mut typed = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("#"), Some("HELP"), Some(name)) => helped.push(name.to_string()),
            (Some("#"), Some("TYPE"), Some(name)) => {
                typed.push((name.to_string(), w.next().unwrap_or("").to_string()))
            }
            _ => {}
        }
    }
    assert!(
        typed.len() >= 8,
        "expected the publish/delivery metrics in:\n{text}"
    );
    for (name, kind) in &typed {
        if !name.starts_with("herald_") {
            continue;
        }
        assert!(
            helped.contains(name),
            "{name} is exported without HELP text:\n{text}"
        );
        let want = match listed.get(name.as_str()) {
            Some(MetricKind::Counter) => "counter",
            Some(MetricKind::Gauge) => "gauge",
            Some(MetricKind::Histogram) => "histogram",
            None => panic!("{name} is exported but not in herald::metrics::METRICS"),
        };
        assert_eq!(kind, want, "{name}: exported as {kind}, listed as {want}");
    }
    for name in [
        "herald_publish_duration_seconds",
        "herald_fanout_duration_seconds",
        "herald_backend_duration_seconds",
        "herald_deliveries_total",
        "herald_sessions",
        "herald_subscriptions",
        "herald_local_channels",
    ] {
        assert!(
            typed.iter().any(|(n, _)| n == name),
            "{name} missing after a publish:\n{text}"
        );
    }
    // A counter without labels is there from the start (0 until its first count), so an alert on
    // its rate has a series to read before anything went wrong.
    for &(name, kind, labels, _) in METRICS {
        if kind == MetricKind::Counter && labels.is_empty() {
            assert!(
                text.lines()
                    .any(|l| l.split_whitespace().next() == Some(name)),
                "{name} has no sample:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn publish_fan_out_and_backend_latency_are_recorded_per_publish() {
    let s = TestServer::start().await;
    s.join("lat", "bob").await;
    let mut ws = s.ws("bob").await;
    ws.subscribed("room:lat").await;
    let (_, before) = scrape(&s).await;
    const N: usize = 5;
    for i in 0..N {
        s.publish(json!({"event": "m", "room": "lat", "data": {"i": i}}))
            .await;
        ws.event_on("room:lat").await;
    }
    let (_, after) = scrape(&s).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert!(
        grew(
            "herald_publish_duration_seconds_count",
            &[("source", "api")]
        ) >= N as f64,
        "publish latency not recorded per publish"
    );
    assert!(grew("herald_events_published_total", &[("source", "api")]) >= N as f64);
    assert!(grew("herald_fanout_duration_seconds_count", &[]) >= N as f64);
    assert!(grew("herald_deliveries_total", &[]) >= N as f64);
    assert!(
        grew(
            "herald_backend_duration_seconds_count",
            &[("op", "broker.publish")]
        ) >= N as f64,
        "backend calls not recorded by operation"
    );
    // Buckets are cumulative and end in +Inf = _count.
    let inf = value(
        &after,
        "herald_publish_duration_seconds_bucket",
        &[("source", "api"), ("le", "+Inf")],
    );
    let count = value(
        &after,
        "herald_publish_duration_seconds_count",
        &[("source", "api")],
    );
    assert_eq!(inf, count);
    assert!(
        herald::metrics::quantile(&after, "herald_publish_duration_seconds", 0.99)
            .is_some_and(|p99| p99 > 0.0 && p99 < 5.0)
    );

    // Samples folded into buckets by the periodic upkeep (nobody scraping meanwhile) still count.
    s.publish(json!({"event": "m", "room": "lat", "data": {}}))
        .await;
    ws.event_on("room:lat").await;
    tokio::time::sleep(herald::metrics::UPKEEP_EVERY * 2).await;
    let (_, folded) = scrape(&s).await;
    assert!(
        value(
            &folded,
            "herald_publish_duration_seconds_count",
            &[("source", "api")]
        ) > count,
        "a publish timed before an upkeep was lost"
    );

    // A refused publish is recorded as an error by code, and timed too.
    let (_, before) = scrape(&s).await;
    let got = s
        .try_publish(json!({"event": "bad type!", "room": "lat", "data": {}}))
        .await;
    assert_error(&got, 400, "bad_frame");
    let (_, after) = scrape(&s).await;
    assert!(
        value(
            &after,
            "herald_publish_errors_total",
            &[("code", "bad_frame")]
        ) > value(
            &before,
            "herald_publish_errors_total",
            &[("code", "bad_frame")]
        )
    );
}

#[tokio::test]
async fn disconnects_are_counted_by_close_code() {
    let s = TestServer::start().await;
    let (_, before) = scrape(&s).await;
    // Kicked by the API: 4012.
    let mut kicked = s.ws("kicked-user").await;
    let (st, _) = s
        .api("POST", "/api/v1/users/kicked-user/disconnect", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(kicked.closed().await.disconnect, Some(4012));
    // The client goes away: `client`.
    let mut gone = s.ws("leaving-user").await;
    gone.close_client().await;
    let want = |code: &str, samples: &[Sample]| {
        value(
            samples,
            "herald_disconnects_total",
            &[("transport", "ws"), ("code", code)],
        )
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, now) = scrape(&s).await;
        if want("4012", &now) > want("4012", &before)
            && want("client", &now) > want("client", &before)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "disconnects by code not recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unrecoverable_resume_is_counted() {
    let s = TestServer::start().await;
    s.join("gone", "carol").await;
    s.publish(json!({"event": "m", "room": "gone", "data": {}}))
        .await;
    let (_, before) = scrape(&s).await;
    let mut ws = s.ws("carol").await;
    // An epoch the channel never had: recovered: false.
    let reply = ws
        .request(json!({"op": "subscribe", "channel": "room:gone", "since": {"epoch": "not-this-one", "seq": 1}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["recovered"], false, "{reply}");
    let (_, after) = scrape(&s).await;
    assert!(
        value(&after, "herald_unrecovered_total", &[("via", "ws")])
            > value(&before, "herald_unrecovered_total", &[("via", "ws")])
    );
}

#[tokio::test]
async fn metrics_behind_the_admin_key_when_configured() {
    let s = TestServer::start_with(|c| c.metrics_require_admin = true).await;
    let got = s.call("GET", "/metrics", None, None).await;
    assert_error(&got, 401, "unauthorized");
    let resp = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// The README's metric list is the metric table: every metric in a row with its type and labels,
/// and no row for a metric that does not exist.
#[test]
fn readme_lists_every_metric_with_its_type_and_labels() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rows: HashMap<&str, Vec<&str>> = readme
        .lines()
        .filter(|l| l.starts_with("| `herald_"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").map(|c| c.trim_matches(['|', ' '])).collect();
            (cells[0].trim_matches('`'), cells)
        })
        .collect();
    for &(name, kind, labels, _) in METRICS {
        let row = rows
            .get(name)
            .unwrap_or_else(|| panic!("README's metric list has no row for {name}"));
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        assert_eq!(row[1], kind, "{name}'s type in the README");
        let want: Vec<String> = labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| format!("`{l}`"))
            .collect();
        let want = if want.is_empty() {
            "—".to_string()
        } else {
            want.join(", ")
        };
        assert_eq!(row[2], want, "{name}'s labels in the README");
    }
    for name in rows.keys() {
        assert!(
            METRICS.iter().any(|m| m.0 == *name),
            "README lists {name}, which herald does not export"
        );
    }
}
