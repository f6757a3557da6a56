//! The publisher: the fixed-rate schedule, publishing over HTTP or the WebSocket `publish` op
//! (tungstenite sockets), and the Redis probe.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::procfs::{CpuSample, Probes};
use crate::scan::number_after;
use crate::tally::{LATENCY_MAX_US, LATENCY_SIGFIG, now_us};
use crate::ws::SETUP_FRAME_TIMEOUT;

/// WebSocket read size of the publisher sockets (tungstenite). tungstenite zero-fills its whole read
/// buffer before every read attempt (even one that finds no data), so a large buffer costs a memset
/// per wake-up: 4 KiB holds ~15 reply frames.
const READ_BUFFER: usize = 4 * 1024;
/// How long a publish may wait for its reply (HTTP request timeout; WebSocket reply wait).
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn close_reason(c: Option<tokio_tungstenite::tungstenite::protocol::frame::CloseFrame>) -> String {
    match c {
        Some(c) => format!("closed by the server: {} {}", u16::from(c.code), c.reason),
        None => "closed by the server".into(),
    }
}

/// A publisher's socket, through tungstenite (its frames are one request and one reply per publish,
/// not per delivery): connects and waits for `connected`.
pub(crate) async fn open_publisher_ws(url: &str) -> Result<Ws, String> {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| {
            let hint = match &e {
                tokio_tungstenite::tungstenite::Error::Io(io) if io.raw_os_error() == Some(24) => {
                    " (too many open files: raise `ulimit -n`)"
                }
                tokio_tungstenite::tungstenite::Error::Io(io) if io.raw_os_error() == Some(99) => {
                    " (out of local ports)"
                }
                tokio_tungstenite::tungstenite::Error::Http(r) if r.status().as_u16() == 401 => {
                    " (is --secret the engine's HERALD_JWT_SECRET?)"
                }
                _ => "",
            };
            format!("WebSocket connect failed: {e}{hint}")
        })?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "connected" {
        return Err(format!("expected `connected`, got {first}"));
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match tokio::time::timeout(SETUP_FRAME_TIMEOUT, ws.next()).await {
            Err(_) => {
                return Err(format!(
                    "no frame from the server within {} s",
                    SETUP_FRAME_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => return Err("the server closed the socket".into()),
            Ok(Some(Err(e))) => return Err(format!("socket error: {e}")),
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("unreadable frame ({e}): {t}"));
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Err(format!("the server closed the socket: {c:?}"));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Where publishes go.
pub(crate) enum Route {
    /// `POST {url}` with the API key.
    Http {
        http: reqwest::Client,
        url: String,
        api_key: String,
    },
    /// The `publish` op, round-robin over these sockets.
    Ws(Vec<Ws>),
}

pub(crate) struct PublishPlan {
    pub(crate) room: String,
    /// Event type.
    pub(crate) event: String,
    /// `room:{room}`.
    pub(crate) channel: String,
    pub(crate) pad: String,
    pub(crate) rate: u32,
    pub(crate) measure_from_us: u64,
    pub(crate) end_us: u64,
    pub(crate) max_in_flight: usize,
}

/// Live counters for progress lines.
#[derive(Default)]
pub(crate) struct PubCounters {
    pub(crate) sent: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// One publish's outcome.
struct PubOutcome {
    measured: bool,
    result: Result<u64, String>,
    round_trip_us: u64,
}

/// What the publish phase produced.
pub(crate) struct Published {
    /// Seqs of the successful measured publishes.
    pub(crate) measured_seqs: Vec<u64>,
    /// Measured publishes sent.
    pub(crate) measured_sent: u64,
    /// Successful publishes, warmup included (each one is a delivery to every subscriber).
    pub(crate) ok_total: u64,
    /// Failed publishes (warmup included).
    pub(crate) errors: u64,
    /// Publish round trips, µs.
    pub(crate) round_trip: Histogram<u64>,
    /// Redis commands in the measured window, when probed.
    pub(crate) redis_commands: Option<u64>,
    /// How late the latest tick fired, µs.
    pub(crate) schedule_lag_max_us: u64,
    /// CPU times when the first measured publish was due: the start of the CPU window.
    pub(crate) window_start: Option<CpuSample>,
    /// From the first measured tick until every publish was answered, seconds: longer than
    /// `--duration` when the engine or the loadgen could not keep up.
    pub(crate) measured_secs: f64,
}

pub(crate) async fn publisher(
    route: Route,
    plan: PublishPlan,
    counters: Arc<PubCounters>,
    mut redis: Option<RedisProbe>,
    probes: Arc<Probes>,
    bar: ProgressBar,
) -> anyhow::Result<Published> {
    let plan = Arc::new(plan);
    let slots = Arc::new(Semaphore::new(plan.max_in_flight));
    // Unbounded: one outcome per publish, read at the end, so it holds at most rate × seconds
    // small entries.
    let (tx, mut rx) = mpsc::unbounded_channel::<PubOutcome>();
    let (http, sockets) = match route {
        Route::Http { http, url, api_key } => (Some((http, Arc::new((url, api_key)))), Vec::new()),
        Route::Ws(sockets) => {
            let senders = sockets
                .into_iter()
                .map(|ws| {
                    // Never full: every request holds one of `max_in_flight` slots.
                    let (req_tx, req_rx) = mpsc::channel(plan.max_in_flight);
                    tokio::spawn(ws_publish_connection(
                        ws,
                        req_rx,
                        tx.clone(),
                        counters.clone(),
                        plan.channel.clone(),
                        bar.clone(),
                    ));
                    req_tx
                })
                .collect::<Vec<_>>();
            (None, senders)
        }
    };
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate)));
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // Each tick's due time on the wall clock, to tell how late it fired.
    let (base, base_us) = (tokio::time::Instant::now(), now_us());
    let mut lag = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
        .expect("valid histogram bounds");
    let mut measuring = false;
    let mut redis_before = None;
    let mut window_start = None;
    let mut measured_sent = 0;
    let mut measured_t0 = None;
    let mut n: u64 = 0;
    loop {
        let due = interval.tick().await;
        let due_us = base_us + due.saturating_duration_since(base).as_micros() as u64;
        if due_us >= plan.end_us {
            break;
        }
        let t = now_us();
        lag.saturating_record(t.saturating_sub(due_us).max(1));
        // By due time, so exactly `rate × duration` publishes are measured. (Subscribers classify by
        // `t`: they differ only for ticks that fired across the boundary after a stall.)
        let measured = due_us >= plan.measure_from_us;
        if measured && !measuring {
            measuring = true;
            measured_t0 = Some(std::time::Instant::now());
            window_start = Some(probes.sample());
            if let Some(r) = &mut redis {
                redis_before = Some(r.commands().await?);
            }
        }
        measured_sent += u64::from(measured);
        let permit = slots.clone().acquire_owned().await?;
        counters.sent.fetch_add(1, Ordering::Relaxed);
        match &http {
            Some((http, target)) => {
                let (http, target, plan, tx) =
                    (http.clone(), target.clone(), plan.clone(), tx.clone());
                let counters = counters.clone();
                tokio::spawn(async move {
                    let sent = now_us();
                    let body = format!(
                        "{{\"event\":\"{}\",\"room\":\"{}\",\"data\":{{\"t\":{t},\"pad\":\"{}\"}}}}",
                        plan.event, plan.room, plan.pad
                    );
                    let result = publish_http(&http, &target.0, &target.1, body).await;
                    if result.is_err() {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = tx.send(PubOutcome {
                        measured,
                        result,
                        round_trip_us: now_us().saturating_sub(sent),
                    });
                    drop(permit);
                });
            }
            None => {
                let frame = format!(
                    "{{\"op\":\"publish\",\"ref\":{n},\"channel\":\"{}\",\"event\":\"{}\",\
                     \"data\":{{\"t\":{t},\"pad\":\"{}\"}}}}",
                    plan.channel, plan.event, plan.pad
                );
                let request = PubRequest {
                    reference: n,
                    frame,
                    measured,
                    permit,
                };
                if sockets[n as usize % sockets.len()]
                    .send(request)
                    .await
                    .is_err()
                {
                    // Only if that connection's task panicked: it reads requests until they end.
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(PubOutcome {
                        measured,
                        result: Err("the publisher socket's task ended".into()),
                        round_trip_us: 0,
                    });
                }
            }
        }
        n += 1;
    }
    // The socket tasks finish their pending replies once their requests end.
    drop(sockets);
    drop(tx);
    // Every publish is done once all the slots are free again (an outcome is queued before its
    // slot is freed).
    let _all = slots.acquire_many(plan.max_in_flight as u32).await?;
    let measured_secs = measured_t0.map_or(0.0, |t: std::time::Instant| t.elapsed().as_secs_f64());
    let redis_commands = match (&mut redis, redis_before) {
        // The `INFO` that took `before` is counted in `after`.
        (Some(r), Some(before)) => Some(r.commands().await?.saturating_sub(before + 1)),
        _ => None,
    };
    let mut out = Published {
        measured_seqs: Vec::new(),
        measured_sent,
        ok_total: 0,
        errors: 0,
        round_trip: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
            .expect("valid histogram bounds"),
        redis_commands,
        schedule_lag_max_us: lag.max(),
        window_start,
        measured_secs,
    };
    let mut first_error = None;
    while let Ok(o) = rx.try_recv() {
        out.round_trip.saturating_record(o.round_trip_us.max(1));
        match o.result {
            Ok(seq) => {
                out.ok_total += 1;
                if o.measured {
                    out.measured_seqs.push(seq);
                }
            }
            Err(e) => {
                out.errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        bar.suspend(|| eprintln!("loadgen: {} publishes failed; the first: {e}", out.errors));
    }
    out.measured_seqs.sort_unstable();
    Ok(out)
}

/// One `POST /api/v1/events`; the seq of the room delivery.
async fn publish_http(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    body: String,
) -> Result<u64, String> {
    let r = http
        .post(url)
        .bearer_auth(api_key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = r.status();
    let bytes = r
        .bytes()
        .await
        .map_err(|e| format!("reading the publish reply: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "POST {url} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    number_after(&bytes, b"\"seq\":")
        .map(|(seq, _)| seq)
        .ok_or_else(|| {
            format!(
                "publish reply without a seq: {}",
                String::from_utf8_lossy(&bytes)
            )
        })
}

/// A `publish` frame for one publisher socket, with its slot.
struct PubRequest {
    /// The frame's `ref`, unique in the run.
    reference: u64,
    frame: String,
    measured: bool,
    permit: OwnedSemaphorePermit,
}

/// A publish sent on a socket, waiting for its reply.
struct Pending {
    sent_us: u64,
    measured: bool,
    /// Freed after the outcome is queued.
    _permit: OwnedSemaphorePermit,
}

/// One publisher socket: sends the requests' frames, matches replies to them by `ref`, queues an
/// outcome for each. When the socket fails, or replies are late after the last request, every
/// publish still pending (and every later request) fails, so the publisher never waits forever.
async fn ws_publish_connection(
    mut ws: Ws,
    mut requests: mpsc::Receiver<PubRequest>,
    outcomes: mpsc::UnboundedSender<PubOutcome>,
    counters: Arc<PubCounters>,
    channel: String,
    bar: ProgressBar,
) {
    let fail = |measured: bool, sent_us: u64, reason: &str| {
        counters.errors.fetch_add(1, Ordering::Relaxed);
        let _ = outcomes.send(PubOutcome {
            measured,
            result: Err(reason.to_string()),
            round_trip_us: now_us().saturating_sub(sent_us),
        });
    };
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // When the requests ended: replies still pending get PUBLISH_TIMEOUT from then.
    let mut requests_ended: Option<tokio::time::Instant> = None;
    let failure = loop {
        if requests_ended.is_some() && pending.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            return;
        }
        let late = async {
            match requests_ended {
                Some(at) => tokio::time::sleep_until(at + PUBLISH_TIMEOUT).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            request = requests.recv(), if requests_ended.is_none() => match request {
                Some(r) => {
                    pending.insert(r.reference, Pending {
                        sent_us: now_us(),
                        measured: r.measured,
                        _permit: r.permit,
                    });
                    match tokio::time::timeout(PUBLISH_TIMEOUT, ws.send(Message::Text(r.frame.into()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break format!("sending a publish frame: {e}"),
                        Err(_) => break "the engine took no publish frame for 10 s".into(),
                    }
                }
                None => requests_ended = Some(tokio::time::Instant::now()),
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(reason) = on_publish_reply(t.as_str(), &mut pending, &outcomes, &counters, &channel) {
                        break reason;
                    }
                }
                Some(Ok(Message::Close(c))) => break format!("publisher socket {}", close_reason(c)),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("publisher socket error: {e}"),
                None => break "the publisher socket ended".into(),
            },
            _ = late => break format!("{} publishes got no reply within 10 s", pending.len()),
        }
    };
    bar.suspend(|| {
        eprintln!(
            "loadgen: a publisher socket failed ({failure}); its {} pending and all later \
             publishes fail",
            pending.len()
        )
    });
    for (_, p) in pending.drain() {
        fail(p.measured, p.sent_us, &failure);
    }
    while let Some(r) = requests.recv().await {
        fail(r.measured, now_us(), &failure);
    }
}

/// Handles one frame on a publisher socket: a reply completes its pending publish. Returns a reason
/// when the engine is closing the socket. Frames here are few (one reply per publish), so they are
/// parsed whole.
fn on_publish_reply(
    text: &str,
    pending: &mut HashMap<u64, Pending>,
    outcomes: &mpsc::UnboundedSender<PubOutcome>,
    counters: &PubCounters,
    channel: &str,
) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    match v["type"].as_str() {
        Some("reply") => {
            let p = pending.remove(&v["ref"].as_u64()?)?;
            let result = if v["ok"] == true {
                v["deliveries"]
                    .as_array()
                    .and_then(|ds| ds.iter().find(|d| d["channel"] == channel))
                    .and_then(|d| d["seq"].as_u64())
                    .ok_or_else(|| format!("publish reply without a seq for {channel}: {v}"))
            } else {
                Err(format!("publish refused: {}", v["error"]))
            };
            if result.is_err() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            let _ = outcomes.send(PubOutcome {
                measured: p.measured,
                result,
                round_trip_us: now_us().saturating_sub(p.sent_us),
            });
            None
        }
        Some("disconnect") => Some(format!("the engine disconnected the publisher: {v}")),
        _ => None,
    }
}

/// Reads Redis `INFO stats` total_commands_processed.
pub(crate) struct RedisProbe {
    con: redis::aio::MultiplexedConnection,
}

impl RedisProbe {
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("--redis {url}"))?;
        let con = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to Redis at {url}"))?;
        let mut probe = RedisProbe { con };
        probe.commands().await?;
        Ok(probe)
    }

    async fn commands(&mut self) -> anyhow::Result<u64> {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut self.con)
            .await
            .context("Redis INFO stats")?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("Redis INFO stats has no total_commands_processed")
    }
}
