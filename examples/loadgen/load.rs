//! The publish phase: the subscribers' setup, the publisher's run and the drain, and its figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::args::{Args, PublishVia, TransportKind};
use crate::procfs::{CLK_TCK, Probes, proc_cpu_ticks};
use crate::publisher::{PubCounters, PublishPlan, RedisProbe, Route, open_publisher_ws, publisher};
use crate::report::{LoadReport, report, round1};
use crate::setup::{TOKEN_TTL_SECS, add_members, await_ready, channel_seq};
use crate::subscribers::{sse_subscriber, ws_subscriber};
use crate::tally::{PaddedCounter, Shared, now_us};
use crate::ui::{PUBLISH_TEMPLATE, SETUP_TEMPLATE, Ui};
use crate::ws::ws_base;

/// Bytes of `data` besides the padding: `{"t":` + 16 digits + `,"pad":"` + `"}`.
const DATA_OVERHEAD: usize = 5 + 16 + 8 + 2;

/// Subscribers' setup, the publish phase and its figures.
pub(crate) async fn load_phase(
    args: &Args,
    urls: &[String],
    http: &reqwest::Client,
    api_key: &str,
    probes: &Arc<Probes>,
    ui: &Ui,
    stop: &CancellationToken,
) -> anyhow::Result<LoadReport> {
    let n = args.subscribers;
    let ws_publishers = if args.publish_via == PublishVia::Ws {
        args.publish_connections.max(1)
    } else {
        0
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.setup_timeout);
    let t0 = Instant::now();
    ui.note(format_args!(
        "adding {} members to room {} …",
        n + ws_publishers,
        args.room
    ));
    ui.phase("members", (n + ws_publishers) as u64, SETUP_TEMPLATE);
    tokio::time::timeout_at(
        deadline,
        add_members(http, api_key, args, urls, ws_publishers, ui),
    )
    .await
    .context("setup timed out while adding room members (--setup-timeout)")??;

    ui.note(format_args!(
        "opening {n} {} subscribers over {} node(s) …",
        args.transport.as_str(),
        urls.len()
    ));
    ui.phase("subscribers", n as u64, SETUP_TEMPLATE);
    let connecting = Instant::now();
    let channel = format!("room:{}", args.room);
    let shared = Arc::new(Shared {
        head: format!("{{\"type\":\"event\",\"channel\":\"{channel}\",").into_bytes(),
        reset_head: b"{\"type\":\"reset\"".to_vec(),
        channel: channel.clone(),
        measure_from_us: AtomicU64::new(u64::MAX),
        progress: (0..n).map(|_| PaddedCounter::default()).collect(),
    });
    // Subscribers stop at the end of this phase; idle connections (the parent token) later.
    let stop = stop.child_token();
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(n);
    let (base_tx, base_rx) = watch::channel(None::<u64>);
    let connect_slots = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let mut subscribers = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("lg-{i}");
        let token = herald::transport::auth::mint_hs256(&args.secret, &user, None, TOKEN_TTL_SECS)
            .context("minting a subscriber token")?;
        let base = &urls[i % urls.len()];
        let task = match args.transport {
            TransportKind::Ws => tokio::spawn(ws_subscriber(
                i,
                format!("{}/ws?token={token}", ws_base(base)),
                shared.clone(),
                connect_slots.clone(),
                ready_tx.clone(),
                stop.clone(),
            )),
            TransportKind::Sse => tokio::spawn(sse_subscriber(
                i,
                format!("{base}/sse?channels={channel}&token={token}"),
                shared.clone(),
                connect_slots.clone(),
                ready_tx.clone(),
                stop.clone(),
                base_rx.clone(),
            )),
        };
        subscribers.push(task);
    }
    drop(ready_tx);
    await_ready(&mut ready_rx, n, deadline, ui, "subscribers").await?;
    let connect_s = connecting.elapsed().as_secs_f64();
    if args.transport == TransportKind::Sse {
        let seq = channel_seq(http, &urls[0], api_key, &channel).await?;
        base_tx.send_replace(Some(seq));
    }

    let route = if ws_publishers > 0 {
        ui.phase("publishers", ws_publishers as u64, SETUP_TEMPLATE);
        let mut sockets = Vec::with_capacity(ws_publishers);
        for c in 0..ws_publishers {
            let token = herald::transport::auth::mint_hs256(
                &args.secret,
                &format!("lg-pub-{c}"),
                None,
                TOKEN_TTL_SECS,
            )
            .context("minting a publisher token")?;
            let url = format!("{}/ws?token={token}", ws_base(&urls[0]));
            let ws = tokio::time::timeout_at(deadline, open_publisher_ws(&url))
                .await
                .context("setup timed out while opening the publisher sockets (--setup-timeout)")?
                .map_err(|e| anyhow::anyhow!("publisher socket lg-pub-{c}: {e}"))?;
            sockets.push(ws);
            ui.bar.inc(1);
        }
        Route::Ws(sockets)
    } else {
        Route::Http {
            http: http.clone(),
            url: format!("{}/api/v1/events", urls[0]),
            api_key: api_key.to_string(),
        }
    };
    let setup_s = t0.elapsed().as_secs_f64();
    ui.note(format_args!(
        "{n} subscribers ready in {setup_s:.1}s; publishing {}/s via {} for {}s warmup + {}s",
        args.rate,
        args.publish_via.as_str(),
        args.warmup,
        args.duration
    ));

    let redis = match &args.redis {
        Some(u) => Some(RedisProbe::connect(u).await?),
        None => None,
    };

    let start_us = now_us();
    let measure_from_us = start_us + args.warmup * 1_000_000;
    let end_us = measure_from_us + args.duration * 1_000_000;
    shared
        .measure_from_us
        .store(measure_from_us, Ordering::Relaxed);
    let counters = Arc::new(PubCounters::default());
    let cpu_before = proc_cpu_ticks("self");
    let mut publisher = tokio::spawn(publisher(
        route,
        PublishPlan {
            room: args.room.clone(),
            event: args.event.clone(),
            channel: channel.clone(),
            pad: "x".repeat(args.payload.saturating_sub(DATA_OVERHEAD)),
            rate: args.rate,
            measure_from_us,
            end_us,
            max_in_flight: args.max_in_flight.max(1),
        },
        counters.clone(),
        redis,
        probes.clone(),
        ui.bar.clone(),
    ));

    // Progress, once a second, until the publisher is done.
    let total_s = args.warmup + args.duration;
    ui.phase("publish", total_s, PUBLISH_TEMPLATE);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_delivered = 0;
    let published = loop {
        tokio::select! {
            r = &mut publisher => {
                break r.context("the publisher task panicked")?.context("publisher")?;
            }
            _ = tick.tick() => {
                let d = shared.delivered();
                let secs = now_us().saturating_sub(start_us) as f64 / 1e6;
                let sent = counters.sent.load(Ordering::Relaxed);
                let errors = counters.errors.load(Ordering::Relaxed);
                ui.bar.set_position((secs as u64).min(total_s));
                ui.bar.set_message(format!(
                    "published {sent} ({errors} errors), {}/s delivered",
                    d - last_delivered
                ));
                if ui.lines() {
                    eprintln!(
                        "loadgen: [{secs:>4.0}s] published {sent} (errors {errors}), delivered {d} ({}/s)",
                        d - last_delivered
                    );
                }
                last_delivered = d;
            }
        }
    };
    let cpu_after = proc_cpu_ticks("self");
    ui.bar.set_position(total_s);
    ui.bar.set_message("draining");

    // The CPU window closes once everything sent has arrived (or at the end of the drain), so the
    // work for deliveries still queued when the last publish went out is counted.
    let drain_end = tokio::time::Instant::now() + Duration::from_secs(args.drain);
    let expected_frames = published.ok_total * n as u64;
    while shared.delivered() < expected_frames && tokio::time::Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let window_end = probes.sample();
    tokio::time::sleep_until(drain_end).await;
    stop.cancel();

    let mut tallies = Vec::with_capacity(subscribers.len());
    for s in subscribers {
        tallies.push(s.await.context("a subscriber task panicked")?);
    }
    let mut r = report(args, &published, &tallies, ui);
    r.setup_s = round1(setup_s);
    r.connect_s = (connect_s * 1000.0).round() / 1000.0;
    r.connects_per_s = round1(n as f64 / connect_s.max(1e-9));
    r.publish_connections = ws_publishers;
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        // Ticks per second of phase, × 100 / CLK_TCK: percent of one core.
        r.loadgen_cpu_percent = Some(round1(
            b.saturating_sub(a) as f64 * 100.0 / CLK_TCK as f64 / total_s as f64,
        ));
    }
    if let Some(start) = &published.window_start {
        r.set_cpu(start, &window_end);
    }
    Ok(r)
}
