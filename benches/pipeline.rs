//! The publish pipeline on the memory backend, with the channel defaults and with the shipped rules
//! (`rules/`): the cost of rules per publish, and its ratio to the defaults (the aim: ≥ 90 %).
//!
//! `cargo bench --bench pipeline`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use herald::backend::Backends;
use herald::channels::{ChannelKinds, ChannelName};
use herald::config::Config;
use herald::engine::{Engine, PublishRequest};
use herald::rules::Source;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

fn engine(rt: &tokio::runtime::Runtime, rules_dir: &str) -> Engine {
    let mut c = Config::defaults();
    c.rules_dir = rules_dir.into();
    c.rules_watch = false;
    rt.block_on(async {
        Engine::start(
            c,
            ChannelKinds::default(),
            Backends::memory(),
            CancellationToken::new(),
        )
        .expect("engine starts")
    })
}

fn request(room: &ChannelName, data: &RawValue) -> PublishRequest {
    PublishRequest {
        event: "chat.message".into(),
        targets: vec![room.clone()],
        from: Some(Arc::from("alice")),
        data: data.to_owned(),
        idempotency_key: None,
        source: Source::Client,
        attrs: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let room = ChannelName::parse("room:bench").unwrap();
    let data = RawValue::from_string(
        r#"{"text":"hello, this is a chat message of ordinary length"}"#.into(),
    )
    .unwrap();
    let mut g = c.benchmark_group("publish");
    g.measurement_time(Duration::from_secs(3));
    for (name, dir) in [
        ("channel_defaults", "/nonexistent/herald-bench-rules"),
        (
            "shipped_rules",
            concat!(env!("CARGO_MANIFEST_DIR"), "/rules"),
        ),
    ] {
        let e = engine(&rt, dir);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        e.publish(request(&room, &data)).await.expect("publish");
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
