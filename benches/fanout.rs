//! Hub fan-out, in process: one delivery (one encoded chat frame) handed to every local subscriber of a
//! channel, through [`Hub`]'s [`DeliverySink::deliver`] — the call every broker makes — which `try_send`s
//! the same `Arc<Delivery>` to each session's bounded queue (`Config` default capacity).
//!
//! - `hub_deliver/{1000,10000}`: sessions of distinct users on one room, no filter;
//! - `hub_deliver_except_one/10000`: the same with `except` = one user (the sender), so every session
//!   pays the filter check and one is skipped;
//! - `broker_publish/10000`: the memory broker's `publish` of an encoded body with history on and the
//!   same `except`, which frames it (seq, epoch), appends it to history and calls the hub: the whole
//!   in-process path from the pipeline to the queues;
//! - `hub_deliver_to_parked_writers/10000`: no filter, but with a task parked on every queue as the
//!   session writers are in the server, so each `try_send` also wakes a task (one tokio worker).
//!
//! Each measured iteration is one delivery; every queue is drained after it, outside the timing, so queues
//! never fill (by the bench itself, or by the parked tasks in the last variant). Throughput is the
//! number of sessions, so criterion's elements/s is deliveries per second.
//!
//! `cargo bench --bench fanout`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::backend::{
    Backends, Delivery, DeliveryFilter, DeliverySink, HistoryLimits, Outgoing, OutgoingPayload,
};
use herald::channels::{ChannelKinds, ChannelName};
use herald::config::Config;
use herald::device::DeviceState;
use herald::engine::{Hub, Next, SessionHandle, Transport};
use herald::event::{Epoch, EventBody, Position, event_frame};
use herald::presence::SessionInfo;
use serde_json::value::RawValue;

struct Local {
    hub: Arc<Hub>,
    sessions: Vec<Arc<SessionHandle>>,
}

/// `n` sessions, one per user (`u0`, `u1`, …), each subscribed to `channel`, as `Engine::open` and
/// `Session::subscribe` register them.
fn local(n: usize, channel: &ChannelName) -> Local {
    let config = Config::defaults();
    let hub = Arc::new(Hub::new());
    let attrs = Arc::new(serde_json::Map::new());
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        let info = SessionInfo {
            session: format!("bench-node:{i}").into(),
            user: format!("u{i}").into(),
            device: format!("d-{i}").into(),
            platform: None,
            state: DeviceState::Foreground,
            node: "bench-node".into(),
        };
        let handle = SessionHandle::new(
            i as u64,
            &info,
            attrs.clone(),
            config.limits.queue_frames,
            None,
            Transport::Ws,
        );
        assert!(hub.register(&handle, config.limits.connections_per_user));
        hub.subscribe(channel, &handle);
        sessions.push(handle);
    }
    Local { hub, sessions }
}

impl Local {
    /// Empties every queue; returns how many items were queued.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        for s in &self.sessions {
            while s.try_recv().is_some() {
                n += 1;
            }
        }
        n
    }

    /// Runs `deliver` `iters` times, timing only `deliver`, draining every queue after each.
    fn measure(&mut self, iters: u64, mut deliver: impl FnMut(&Hub)) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            deliver(&self.hub);
            total += start.elapsed();
            self.drain();
        }
        total
    }

    /// Runs `deliver` once and checks that `expected` sessions got it and none was closed.
    fn check(&mut self, expected: usize, deliver: impl FnOnce(&Hub)) {
        deliver(&self.hub);
        assert_eq!(self.drain(), expected);
        assert!(self.sessions.iter().all(|s| s.close_reason().is_none()));
    }
}

fn payload() -> (Box<RawValue>, bytes::Bytes) {
    let data = RawValue::from_string(
        r#"{"text":"Are we still on for lunch at noon? I booked the usual place.","mentions":["bob"]}"#
            .into(),
    )
    .expect("valid JSON");
    let body = EventBody {
        id: "0190c3e4-5b6a-7c8d-9e0f-112233445566",
        event: "chat.message",
        data: &data,
        from: Some("u0"),
        ts: 1_767_225_600_000,
    }
    .encode();
    (data, body)
}

fn fanout(c: &mut Criterion) {
    // As in the server: deliveries are counted by the Prometheus recorder.
    herald::metrics::install();
    let channel = ChannelName::parse("room:bench").expect("valid");
    let (_data, body) = payload();
    let epoch = Epoch::new("5f3a9c0d12ab");
    let delivery = |filter: DeliveryFilter| {
        Arc::new(Delivery {
            channel: channel.clone(),
            position: Some(Position {
                epoch: epoch.clone(),
                seq: 7,
            }),
            event: Arc::from("chat.message"),
            frame: event_frame(&channel, Some((&epoch, 7)), &body),
            filter,
            compact: Default::default(),
        })
    };
    let except_sender = DeliveryFilter {
        except: vec![Arc::from("u0")],
        audience: None,
        devices: Default::default(),
    };

    let mut g = c.benchmark_group("fanout");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    // 100 samples of a 10k fan-out (plus the untimed drain) do not fit in 3 s.
    g.sample_size(50);

    for n in [1_000, 10_000] {
        let mut l = local(n, &channel);
        let d = delivery(DeliveryFilter::default());
        l.check(n, |hub| hub.deliver(d.clone()));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("hub_deliver/{n}"), |b| {
            b.iter_custom(|iters| l.measure(iters, |hub| hub.deliver(d.clone())))
        });
    }

    let n = 10_000;
    let mut l = local(n, &channel);
    let d = delivery(except_sender.clone());
    l.check(n - 1, |hub| hub.deliver(d.clone()));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("hub_deliver_except_one/{n}"), |b| {
        b.iter_custom(|iters| l.measure(iters, |hub| hub.deliver(d.clone())))
    });

    // The memory broker never waits inside `publish`; a current-thread runtime just drives it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let backends = Backends::memory();
    backends.broker.attach(l.hub.clone());
    // The history limits of a room, as `channels.toml`'s defaults give them.
    let kinds = ChannelKinds::default();
    let room = kinds.of(&channel);
    let limits = HistoryLimits {
        size: room.history_size,
        age: room.history_age,
    };
    let publish = |_: &Hub| {
        rt.block_on(backends.broker.publish(Outgoing {
            channel: channel.clone(),
            event: Arc::from("chat.message"),
            payload: OutgoingPayload::EventBody(body.clone()),
            persist: Some(limits),
            filter: except_sender.clone(),
            unread: None,
            dedupe: None,
            push: None,
        }))
        .expect("publish")
        .expect("stored");
    };
    l.check(n - 1, publish);
    g.bench_function(format!("broker_publish/{n}"), |b| {
        b.iter_custom(|iters| l.measure(iters, publish))
    });

    // Every queue has a writer task parked on it, as in the server: each `send` now also wakes a
    // task (onto the delivering worker's run queue). `deliver` runs on the runtime's one worker, inside a
    // task, as it does under `publish`; the woken tasks drain their queues after it, outside the timing.
    let l = local(n, &channel);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let received = Arc::new(AtomicU64::new(0));
    for s in &l.sessions {
        let (s, received) = (s.clone(), received.clone());
        rt.spawn(async move {
            while let Next::Out(_) = std::future::poll_fn(|cx| s.poll_next(cx)).await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let d = delivery(DeliveryFilter::default());
    g.bench_function(format!("hub_deliver_to_parked_writers/{n}"), |b| {
        b.iter_custom(|iters| {
            let (hub, d, received) = (l.hub.clone(), d.clone(), received.clone());
            rt.block_on(rt.spawn(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let target = received.load(Ordering::Relaxed) + n as u64;
                    let start = Instant::now();
                    hub.deliver(d.clone());
                    total += start.elapsed();
                    while received.load(Ordering::Relaxed) < target {
                        tokio::task::yield_now().await;
                    }
                }
                total
            }))
            .expect("bench task")
        })
    });
    assert!(l.sessions.iter().all(|s| s.close_reason().is_none()));
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
