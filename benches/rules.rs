//! Rule evaluation cost per publish: `RuleSet::route` on the shipped `rules/` for a chat message (the
//! heaviest shipped route: a push policy whose text templates are filled from the payload and the
//! sender's attrs; target: median ≤ 2 µs), a typing indicator (a light one), and an event type no
//! rule handles (it passes through every `route` to the channel defaults), with `Decision::defaults`
//! (no script at all) as the baseline and `event_map` (building the whole map scripts can see) to
//! tell the script's share from the engine's.
//!
//! The `…/evaluated` cases run the scripts every time: each iteration names one of 5,000 rooms, more
//! than the rule set's decision cache keeps, so no decision is reused. The others repeat one event, so
//! after the first they measure the cache (`RouteCache`: the key, a lookup, a clone and the templates
//! filled in), which is what a busy room's messages cost.
//!
//! `cargo bench --bench rules -- --warm-up-time 1 --measurement-time 3`; `HERALD_BENCH_RULES=DIR`
//! measures the rules in DIR instead of the shipped ones.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use herald::channels::{ChannelKinds, ChannelName};
use herald::rules::convert::{event_map, event_template};
use herald::rules::{Budget, Decision, EventFields, OnError, RouteInput, RuleSet, Source};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

fn rules(c: &mut Criterion) {
    // `HERALD_BENCH_RULES=DIR` measures another rules directory (an operator's own rules).
    let dir = std::env::var("HERALD_BENCH_RULES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/rules").to_string());
    let set = RuleSet::load(
        Path::new(&dir),
        Arc::new(ChannelKinds::default()),
        Budget::default(),
        OnError::DefaultRoute,
        1,
    )
    .expect("the shipped rules compile");
    let targets = [ChannelName::parse("room:r1").expect("valid")];
    let data =
        RawValue::from_string(json!({ "text": "Are we still on for lunch at noon?" }).to_string())
            .expect("valid JSON");
    let attrs: Arc<Map<String, Value>> = Arc::new(
        [("name".to_string(), json!("Alice Kim"))]
            .into_iter()
            .collect(),
    );
    let chat = RouteInput {
        event: "chat.message",
        id: "0190c3e4-5b6a-7c8d-9e0f-112233445566",
        targets: &targets,
        from: Some("alice"),
        data: &data,
        ts: 1_767_225_600_000,
        source: Source::Client,
        attrs: Some(&attrs),
    };
    let typing_data = RawValue::from_string("{}".into()).expect("valid JSON");
    let typing = RouteInput {
        event: "typing",
        data: &typing_data,
        ..chat
    };
    let unknown = RouteInput {
        event: "poll.created",
        ..chat
    };
    // One target per room, for the `evaluated` cases.
    let rooms: Vec<[ChannelName; 1]> = (0..5000)
        .map(|i| [ChannelName::parse(&format!("room:r{i}")).expect("valid")])
        .collect();
    let chats: Vec<RouteInput> = rooms
        .iter()
        .map(|t| RouteInput { targets: t, ..chat })
        .collect();
    let typings: Vec<RouteInput> = chats
        .iter()
        .map(|c| RouteInput {
            event: "typing",
            data: &typing_data,
            ..*c
        })
        .collect();
    // The rules must decide as the fixtures say, or the numbers measure an error path.
    let routed = set.route(&chat);
    assert!(routed.error.is_none() && routed.by.is_some(), "{routed:?}");
    // `HERALD_BENCH_CALLS=N`: route N chat messages and stop, for instruction counts on a noisy
    // machine (`valgrind --tool=callgrind`, two values of N: the difference / ΔN is the cost per call).
    if let Some(n) = std::env::var("HERALD_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        for i in 0..n {
            black_box(set.route(black_box(&chats[i as usize % chats.len()])));
        }
        std::process::exit(0);
    }

    let routed = set.route(&typing);
    assert!(routed.error.is_none() && routed.by.is_some(), "{routed:?}");
    let routed = set.route(&unknown);
    assert!(routed.error.is_none() && routed.by.is_none(), "{routed:?}");

    let mut g = c.benchmark_group("rules");
    g.bench_function("decision_defaults", |b| {
        b.iter(|| Decision::defaults(black_box(&targets)))
    });
    // Every field: what a route that uses the event as a whole (`event.keys()`, `helper(event)`) pays.
    let all = event_template(EventFields::ALL);
    g.bench_function("event_map/chat.message", |b| {
        b.iter(|| event_map(black_box(&all), black_box(&chat)))
    });
    let mut i = 0;
    g.bench_function("route/chat.message/evaluated", |b| {
        b.iter(|| {
            i = (i + 1) % chats.len();
            set.route(black_box(&chats[i]))
        })
    });
    g.bench_function("route/chat.message", |b| {
        b.iter(|| set.route(black_box(&chat)))
    });
    g.bench_function("route/typing/evaluated", |b| {
        b.iter(|| {
            i = (i + 1) % typings.len();
            set.route(black_box(&typings[i]))
        })
    });
    g.bench_function("route/typing", |b| b.iter(|| set.route(black_box(&typing))));
    g.bench_function("route/unknown", |b| {
        b.iter(|| set.route(black_box(&unknown)))
    });
    g.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
