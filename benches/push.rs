//! The push planner on a 1,000-member room: the pure per-recipient decision (`World::plan`, what
//! the sending loop runs for each due plan after reading the shared state), and the whole planning
//! step on the memory backend (members, presence, focus, registrations read, every recipient
//! planned) through `Engine::dry_run`, which runs the same `plan_channel` the sending loop does.
//!
//! `cargo bench --bench push`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::backend::Backends;
use herald::channels::{ChannelKinds, ChannelName};
use herald::config::{Config, WebhookConfig};
use herald::device::{DevicePolicy, DeviceState, PushDevice};
use herald::engine::Engine;
use herald::engine::pushplan::{World, WorldDevice, WorldPushDevice, WorldUser};
use herald::event::EventSpec;
use herald::rules::PushWhen;
use tokio_util::sync::CancellationToken;

const MEMBERS: usize = 1_000;

/// A third offline with a phone registered, a third with a backgrounded phone (registered) and a
/// laptop in front, a third on the web only, in the foreground, nothing registered.
fn world() -> World {
    let mut users = BTreeMap::new();
    for i in 0..MEMBERS {
        let phone = || WorldPushDevice {
            device: "phone".into(),
            provider: "fcm".into(),
            platform: Some("android".into()),
        };
        let u = match i % 3 {
            0 => WorldUser {
                push: vec![phone()],
                ..Default::default()
            },
            1 => WorldUser {
                live: vec![
                    WorldDevice {
                        device: "phone".into(),
                        platform: Some("android".into()),
                        state: DeviceState::Background,
                    },
                    WorldDevice {
                        device: "laptop".into(),
                        platform: Some("web".into()),
                        state: DeviceState::Foreground,
                    },
                ],
                push: vec![phone()],
                ..Default::default()
            },
            _ => WorldUser {
                live: vec![WorldDevice {
                    device: "web".into(),
                    platform: Some("web".into()),
                    state: DeviceState::Foreground,
                }],
                ..Default::default()
            },
        };
        users.insert(format!("u{i}"), u);
    }
    World {
        members: BTreeMap::new(),
        users,
    }
}

fn engine(rt: &tokio::runtime::Runtime, rules: &std::path::Path) -> Engine {
    let mut c = Config::defaults();
    c.rules_dir = rules.into();
    c.rules_watch = false;
    // Configured so registrations are accepted; a dry run sends nothing.
    c.push.webhook = Some(WebhookConfig {
        url: Some("http://127.0.0.1:9/never".into()),
        secret: Some("bench".into()),
    });
    rt.block_on(async {
        let e = Engine::start(
            c,
            ChannelKinds::default(),
            Backends::memory(),
            CancellationToken::new(),
        )
        .expect("engine starts");
        for i in 0..MEMBERS {
            let user = format!("u{i}");
            e.add_member("bench", &user).await.expect("member");
            if i % 3 != 2 {
                let d = PushDevice {
                    device: "phone".into(),
                    provider: "webhook".into(),
                    token: Some(format!("t{i}")),
                    subscription: None,
                    platform: Some("android".into()),
                };
                e.put_device(&user, d).await.expect("device");
            }
        }
        e
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_plan");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(MEMBERS as u64));

    let w = world();
    let room = ChannelName::parse("room:bench").unwrap();
    let except = vec!["u0".to_string()];
    for (name, when, policy) in [
        ("unacked_all", PushWhen::Unacked, DevicePolicy::All),
        (
            "background_foreground",
            PushWhen::Background,
            DevicePolicy::Foreground,
        ),
    ] {
        g.bench_function(format!("plan_recipients/{name}/{MEMBERS}"), |b| {
            b.iter(|| w.plan(&room, &except, when, policy))
        });
    }

    let rules = std::env::temp_dir().join(format!("herald-bench-push-{}", std::process::id()));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("push.rhai"),
        r#"fn route(e) { #{ to: "room:" + e.room, push: #{ when: "offline", title: "t" } } }"#,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = engine(&rt, &rules);
    let spec: EventSpec = serde_json::from_value(serde_json::json!({
        "event": "chat.message", "room": "bench", "from": "u0", "data": {}
    }))
    .unwrap();
    let planned = rt.block_on(e.dry_run(&spec)).expect("dry run");
    assert_eq!(planned.push.len(), 1, "one push plan");
    g.bench_function(format!("memory_backend_plan_channel/{MEMBERS}"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    e.dry_run(&spec).await.expect("dry run");
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&rules);
}

criterion_group!(benches, bench);
criterion_main!(benches);
