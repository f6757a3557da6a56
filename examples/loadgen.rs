//! Load generator: N WebSocket subscribers in one room, one HTTP publisher at a fixed rate, and one
//! JSON line of results (throughput, completeness, end-to-end latency).
//!
//! ```text
//! # one node, memory backend
//! export HERALD_JWT_SECRET=bench-secret-0123456789 HERALD_API_KEY=bench-api-key-0123 \
//!     HERALD_ADMIN_KEY=bench-admin-key-0123
//! cargo build --release && cargo build --release --example loadgen
//! target/release/herald serve --listen 127.0.0.1:7071 &
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --subscribers 1000 --rate 500 \
//!     --duration 10
//!
//! # two nodes sharing one Redis: subscribers are spread round-robin, the publisher uses the first URL
//! target/release/herald serve --listen 127.0.0.1:7071 --redis unix:///tmp/lg/redis.sock &
//! target/release/herald serve --listen 127.0.0.1:7072 --redis unix:///tmp/lg/redis.sock &
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --url http://127.0.0.1:7072 \
//!     --rate 200 --redis unix:///tmp/lg/redis.sock
//! ```
//!
//! `--api-key` and `--secret` also read `HERALD_API_KEY` and `HERALD_JWT_SECRET`. Progress goes to
//! stderr; stdout gets exactly one JSON line, so runs can be collected with `>> results.jsonl`.
//!
//! # What a run does
//!
//! 1. **Setup.** Raises the soft open-file limit to the hard one (via `prlimit(1)` when the soft limit
//!    is too low, since std has no API for it; otherwise run `ulimit -n` first), checks `/healthz` on
//!    every node, adds users `lg-0 … lg-{N-1}` to the room with `PUT /api/v1/rooms/{room}/members/{user}`
//!    (through the node that user connects to; 64 in flight), then opens N WebSocket clients (token in
//!    `?token=`), waits for each one's `connected`, sends `subscribe` to `room:{room}` and waits for every
//!    reply. Subscribers go to the `--url`s round-robin.
//! 2. **Publish.** One publisher sends `POST /api/v1/events` at `--rate` per second for `--warmup` +
//!    `--duration` seconds, over a keep-alive HTTP client, with the body
//!    `{"event":"bench","room":ROOM,"data":{"t":<send time, µs since the UNIX epoch>,"pad":"xx…"}}` where
//!    `data` is about `--payload` bytes. The schedule is a tokio interval with
//!    [`MissedTickBehavior::Burst`]: when the loadgen itself stalls it catches up, so the offered count
//!    stays `rate × seconds` rather than silently dropping; `schedule_lag_max_us` in the output shows
//!    how late the worst tick fired (about 1 ms is tokio's timer granularity; much more means the
//!    loadgen stalled and sent a burst). `t` is taken when the tick fires, before waiting for an
//!    in-flight slot, so engine backpressure counts as latency. Each publish runs as its own task (at
//!    most `--max-in-flight` at once), so a slow reply does not hold back the schedule. Publishes sent
//!    during the warmup are delivered and checked for duplicates and order, but not counted in latency
//!    or completeness.
//! 3. **Receive.** Each subscriber parses frames lazily: a prefix check for
//!    `{"type":"event","channel":"room:{room}",`, then a byte search for `"seq":` and `"t":` (no JSON
//!    parse), so parsing is a negligible part of the tool's cost. Latency (now − `t`) goes into a
//!    per-subscriber `hdrhistogram` (2 significant digits: 1 % resolution, ~18 KiB each); seqs go into
//!    a per-subscriber bitmap. What the tool does spend per delivery is the kernel's TCP receive path
//!    and a task wake-up per read (reads are 4 KiB: tungstenite zero-fills its read buffer on every
//!    read attempt, so a larger one costs more than it saves) — about half of what the engine spends
//!    per delivery on the same machine (README, "Performance").
//! 4. **Report.** After the publish phase and `--drain` seconds of grace, subscribers stop, their
//!    histograms are merged, and each subscriber's bitmap is checked against the seqs the publisher got
//!    back for its measured publishes.
//!
//! Everything (engine, Redis, loadgen) on one machine shares the CPUs: `loadgen_cpu_percent` says how
//! much of them the loadgen itself took.
//!
//! # Output
//!
//! One JSON object on one line; [`Report`] documents every field. For example (wrapped here):
//!
//! ```text
//! {"transport":"ws","nodes":1,"subscribers":1000,"room":"bench","payload_bytes":100,"duration_s":10,
//!  "warmup_s":2,"setup_s":0.8,"offered_publishes_per_s":500,"achieved_publishes_per_s":500.0,
//!  "publishes":5000,"publish_errors":0,"publish_p50_us":6623,"publish_p99_us":46079,
//!  "schedule_lag_max_us":14207,"expected_deliveries":5000000,"delivered":5000000,"completeness":1.0,
//!  "missing":0,"gaps":0,"duplicates":0,"reorders":0,"disconnects":0,"resets":0,
//!  "deliveries_per_s":500000.0,"latency_p50_us":23039,"latency_p90_us":46335,"latency_p99_us":78335,
//!  "latency_max_us":177151,"loadgen_cpu_percent":91.0}
//! ```
//!
//! With `--redis`, `redis_commands_per_publish` is added: it counts every command Redis ran while
//! the measured publishes went through (Lua-internal commands, presence heartbeats, every node), not
//! only the publish path.
//!
//! Needs: the engine's `HERALD_JWT_SECRET` (HS256) to mint subscriber tokens, its API key, and enough
//! file descriptors on both sides (the engine keeps one per subscriber too: start it from a shell with
//! `ulimit -n` high enough).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Drives herald with N room subscribers and one fixed-rate publisher; prints one JSON line of results.
#[derive(Parser, Debug)]
#[command(
    about = "Load generator for herald: N WebSocket subscribers in one room, one HTTP publisher at a \
             fixed rate; prints one JSON line (throughput, completeness, latency) to stdout"
)]
struct Args {
    /// Engine base URL, e.g. http://127.0.0.1:7070. Repeat for several nodes: subscribers are spread
    /// round-robin over them, the publisher uses the first.
    #[arg(long = "url", default_value = "http://127.0.0.1:7070")]
    urls: Vec<String>,
    /// The engine's backend API key (for membership and publishing).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The engine's HS256 JWT secret, to mint one token per subscriber.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Number of subscribers (users lg-0 … lg-{N-1}, one WebSocket each).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Room to subscribe to and publish in (bare id: the channel is room:{room}).
    #[arg(long, default_value = "bench")]
    room: String,
    /// Publishes per second (each one is delivered to every subscriber).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the measured publish phase, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Approximate size of each event's `data` object, in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Redis URL the engine uses (redis://, unix://): report Redis commands per publish from
    /// `INFO stats` (every command in the window, heartbeats included).
    #[arg(long)]
    redis: Option<String>,
    /// Seconds of publishing before measuring (delivered and checked, not counted).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds to wait after the last publish for deliveries still in flight.
    #[arg(long, default_value_t = 2)]
    drain: u64,
    /// Client transport for subscribers.
    #[arg(long, value_enum, default_value_t = TransportKind::Ws)]
    transport: TransportKind,
    /// Memberships and WebSocket connects in flight at once during setup.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Seconds the whole setup (memberships, connects, subscribes) may take.
    #[arg(long, default_value_t = 120)]
    setup_timeout: u64,
    /// Most publishes in flight at once (the schedule waits beyond that).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
}

/// How subscribers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// WebSocket `/ws`, token in `?token=`.
    Ws,
}

impl TransportKind {
    fn as_str(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
        }
    }
}

/// Largest latency the histograms track (longer ones are clamped to it).
const LATENCY_MAX_US: u64 = 60_000_000;
/// Histogram precision: 2 significant digits (1 %), ~18 KiB per subscriber.
const LATENCY_SIGFIG: u8 = 2;
/// Token lifetime: long enough for any run.
const TOKEN_TTL_SECS: u64 = 6 * 3600;
/// File descriptors kept free beyond one per subscriber (HTTP pools, Redis, runtime).
const FD_MARGIN: u64 = 256;
/// Bytes of `data` besides the padding: `{"t":` + 16 digits + `,"pad":"` + `"}`.
const DATA_OVERHEAD: usize = 5 + 16 + 8 + 2;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen: cannot encode the report: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Microseconds since the UNIX epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn valid_room(r: &str) -> bool {
    (1..=128).contains(&r.len())
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

async fn run(args: Args) -> anyhow::Result<Report> {
    if args.urls.is_empty() {
        bail!("give at least one --url");
    }
    if !valid_room(&args.room) {
        bail!("--room: 1-128 characters of [A-Za-z0-9_.@-] (the bare id, not room:…)");
    }
    if args.rate == 0 || args.duration == 0 || args.subscribers == 0 {
        bail!("--rate, --duration and --subscribers must be at least 1");
    }
    let urls: Vec<String> = args
        .urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect();
    for u in &urls {
        if !u.starts_with("http://") {
            bail!("--url {u}: only http:// base URLs are supported (e.g. http://127.0.0.1:7070)");
        }
    }
    ensure_fd_limit(args.subscribers as u64 + FD_MARGIN)?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight.max(args.setup_concurrency))
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    for u in &urls {
        let r = http
            .get(format!("{u}/healthz"))
            .send()
            .await
            .with_context(|| format!("herald is not reachable at {u} (GET /healthz)"))?;
        if !r.status().is_success() {
            bail!("GET {u}/healthz answered {}", r.status());
        }
    }

    let setup_deadline = Duration::from_secs(args.setup_timeout);
    let t0 = Instant::now();
    eprintln!(
        "loadgen: adding {} members to room {} …",
        args.subscribers, args.room
    );
    tokio::time::timeout(setup_deadline, add_members(&http, &args, &urls))
        .await
        .context("setup timed out while adding room members (--setup-timeout)")??;

    eprintln!(
        "loadgen: opening {} {} subscribers over {} node(s) …",
        args.subscribers,
        args.transport.as_str(),
        urls.len()
    );
    let shared = Arc::new(Shared {
        head: format!("{{\"type\":\"event\",\"channel\":\"room:{}\",", args.room).into_bytes(),
        reset_head: b"{\"type\":\"reset\"".to_vec(),
        channel: format!("room:{}", args.room),
        measure_from_us: AtomicU64::new(u64::MAX),
        progress: (0..args.subscribers)
            .map(|_| PaddedCounter::default())
            .collect(),
    });
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.subscribers);
    let connect_slots = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let user = format!("lg-{i}");
        let token = herald::transport::auth::mint_hs256(&args.secret, &user, None, TOKEN_TTL_SECS)
            .context("minting a subscriber token")?;
        let base = &urls[i % urls.len()];
        let ws_url = format!("ws{}/ws?token={token}", &base["http".len()..]);
        subscribers.push(tokio::spawn(subscriber(
            i,
            ws_url,
            shared.clone(),
            connect_slots.clone(),
            ready_tx.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    let mut last_note = Instant::now();
    while ready < args.subscribers {
        let left = setup_deadline.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(e))) => {
                stop.cancel();
                bail!("subscriber setup failed after {ready} were ready: {e}");
            }
            Ok(None) => {
                stop.cancel();
                bail!("subscribers ended during setup ({ready} ready)");
            }
            Err(_) => {
                stop.cancel();
                bail!(
                    "setup timed out with {ready} of {} subscribers ready (--setup-timeout)",
                    args.subscribers
                );
            }
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("loadgen: {ready}/{} subscribed", args.subscribers);
            last_note = Instant::now();
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} subscribers ready in {setup_s:.1}s; publishing {}/s for {}s warmup + {}s",
        args.subscribers, args.rate, args.warmup, args.duration
    );

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
    let cpu_before = cpu_ticks();
    let publisher = tokio::spawn(publisher(
        http.clone(),
        PublishPlan {
            url: format!("{}/api/v1/events", urls[0]),
            api_key: args.api_key.clone(),
            room: args.room.clone(),
            pad: "x".repeat(args.payload.saturating_sub(DATA_OVERHEAD)),
            rate: args.rate,
            measure_from_us,
            end_us,
            max_in_flight: args.max_in_flight.max(1),
        },
        counters.clone(),
        redis,
    ));

    // Progress, once a second, until the publisher is done.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_delivered = 0;
    while !publisher.is_finished() {
        tick.tick().await;
        let d = shared.delivered();
        eprintln!(
            "loadgen: [{:>4.0}s] published {} (errors {}), delivered {} ({}/s)",
            (now_us().saturating_sub(start_us)) as f64 / 1e6,
            counters.sent.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            d,
            d - last_delivered
        );
        last_delivered = d;
    }
    let published = publisher
        .await
        .context("the publisher task panicked")?
        .context("publisher")?;
    let cpu_after = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(args.drain)).await;
    stop.cancel();

    let mut tallies = Vec::with_capacity(subscribers.len());
    for s in subscribers {
        tallies.push(s.await.context("a subscriber task panicked")?);
    }
    let mut r = report(&args, &published, &tallies);
    r.nodes = urls.len();
    r.setup_s = round1(setup_s);
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        // USER_HZ is 100: ticks per second of phase = percent of one core.
        r.loadgen_cpu_percent = Some(round1(
            b.saturating_sub(a) as f64 / (args.warmup + args.duration) as f64,
        ));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------------
// Setup

/// Raises the soft RLIMIT_NOFILE towards `need` (up to the hard limit) and fails clearly below it.
fn ensure_fd_limit(need: u64) -> anyhow::Result<()> {
    let Some((soft, hard)) = nofile_limits() else {
        eprintln!("loadgen: cannot read /proc/self/limits; assuming the open-file limit is enough");
        return Ok(());
    };
    if soft >= need {
        return Ok(());
    }
    if hard > soft {
        // std cannot call setrlimit; prlimit(1) can set ours from outside.
        let target = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let ok = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={target}:{target}"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok && let Some((soft, _)) = nofile_limits() {
            eprintln!("loadgen: raised the open-file limit to {soft}");
            if soft >= need {
                return Ok(());
            }
        }
    }
    let soft = nofile_limits().map(|l| l.0).unwrap_or(soft);
    bail!(
        "the open-file limit is {soft} (hard {hard}) but {need} are needed for this many \
         subscribers: raise it with `ulimit -n {need}` (for herald too) or use fewer --subscribers"
    )
}

/// (soft, hard) RLIMIT_NOFILE from /proc/self/limits; `unlimited` as u64::MAX.
fn nofile_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(it.next()?)?, parse(it.next()?)?))
}

/// PUTs every subscriber user into the room, through the node it will connect to.
async fn add_members(http: &reqwest::Client, args: &Args, urls: &[String]) -> anyhow::Result<()> {
    let results = stream::iter(0..args.subscribers)
        .map(|i| {
            let url = format!(
                "{}/api/v1/rooms/{}/members/lg-{i}",
                urls[i % urls.len()],
                args.room
            );
            async move {
                let r = http
                    .put(&url)
                    .bearer_auth(&args.api_key)
                    .send()
                    .await
                    .with_context(|| format!("PUT {url}"))?;
                let status = r.status();
                if !status.is_success() {
                    let body = r.text().await.unwrap_or_default();
                    bail!("PUT {url} answered {status}: {body}");
                }
                Ok(())
            }
        })
        .buffer_unordered(args.setup_concurrency.max(1))
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    results.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------------
// Subscribers

/// What every subscriber task reads.
struct Shared {
    /// The start of every event frame on the room channel.
    head: Vec<u8>,
    /// The start of a `reset` frame.
    reset_head: Vec<u8>,
    /// `room:{room}`.
    channel: String,
    /// Events sent at or after this time (µs) are measured; `u64::MAX` until publishing starts.
    measure_from_us: AtomicU64,
    /// Event frames received so far by each subscriber, for progress lines.
    progress: Vec<PaddedCounter>,
}

/// A counter on its own cache line: each subscriber writes only its own, with a plain store.
#[repr(align(64))]
#[derive(Default)]
struct PaddedCounter(AtomicU64);

impl Shared {
    fn delivered(&self) -> u64 {
        self.progress
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// One subscriber's results.
struct Tally {
    /// The channel's seq at subscribe time: deliveries have seqs above it.
    base: u64,
    /// Bit `seq - base - 1` is set once `seq` arrived.
    seen: Vec<u64>,
    /// Highest seq seen.
    highest: u64,
    duplicates: u64,
    reorders: u64,
    resets: u64,
    /// Frames on the channel that could not be read (no `"seq":` or `"t":`).
    unreadable: u64,
    /// Why the socket ended early, if it did.
    closed: Option<String>,
    /// Delivery latency of measured events, µs.
    latency: Histogram<u64>,
    /// Event frames received on the channel.
    frames: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            base: 0,
            seen: Vec::new(),
            highest: 0,
            duplicates: 0,
            reorders: 0,
            resets: 0,
            unreadable: 0,
            closed: None,
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
                .expect("valid histogram bounds"),
            frames: 0,
        }
    }

    fn has(&self, seq: u64) -> bool {
        if seq <= self.base {
            return false;
        }
        let i = (seq - self.base - 1) as usize;
        self.seen
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Handles one text frame (the event JSON as on the wire; SSE `data:` lines are the same bytes).
    fn on_frame(&mut self, f: &[u8], shared: &Shared) {
        if !f.starts_with(&shared.head) {
            if f.starts_with(&shared.reset_head) && find(f, shared.channel.as_bytes()).is_some() {
                self.resets += 1;
            }
            return;
        }
        let rest = &f[shared.head.len()..];
        let Some((seq, after)) = number_after(rest, b"\"seq\":") else {
            self.unreadable += 1;
            return;
        };
        let Some((t, _)) = number_after(&rest[after..], b"\"t\":") else {
            self.unreadable += 1;
            return;
        };
        self.frames += 1;
        if seq > self.base {
            let i = (seq - self.base - 1) as usize;
            if self.seen.len() <= i / 64 {
                self.seen.resize(i / 64 + 1, 0);
            }
            let w = &mut self.seen[i / 64];
            let bit = 1u64 << (i % 64);
            if *w & bit != 0 {
                self.duplicates += 1;
                return;
            }
            *w |= bit;
        }
        if seq < self.highest {
            self.reorders += 1;
        }
        self.highest = self.highest.max(seq);
        if t >= shared.measure_from_us.load(Ordering::Relaxed) {
            self.latency
                .saturating_record(now_us().saturating_sub(t).max(1));
        }
    }
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The unsigned integer right after the first `key` in `hay`, and the offset just past it.
fn number_after(hay: &[u8], key: &[u8]) -> Option<(u64, usize)> {
    let start = find(hay, key)? + key.len();
    let mut n: u64 = 0;
    let mut end = start;
    while let Some(&b) = hay.get(end) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        end += 1;
    }
    (end > start).then_some((n, end))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One subscriber: connect, subscribe, report ready, then count deliveries until `stop`.
async fn subscriber(
    index: usize,
    ws_url: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::new();
    let setup = async {
        let _slot = connect_slots
            .acquire()
            .await
            .map_err(|_| "setup cancelled".to_string())?;
        open_ws(&ws_url, &shared.channel).await
    };
    let opened = tokio::select! {
        r = setup => r,
        _ = stop.cancelled() => return tally,
    };
    let mut ws = match opened {
        Ok((ws, base)) => {
            tally.base = base;
            let _ = ready.send(Ok(())).await;
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(format!("subscriber lg-{index}: {e}"))).await;
            tally.closed = Some(e);
            return tally;
        }
    };
    drop(ready);
    let progress = &shared.progress[index].0;
    // One waiter for the whole loop: `cancelled()` registers with the token (a lock) when first polled.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    tally.on_frame(t.as_bytes(), &shared);
                    progress.store(tally.frames, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(c))) => {
                    tally.closed = Some(match c {
                        Some(c) => format!("closed by the server: {} {}", u16::from(c.code), c.reason),
                        None => "closed by the server".into(),
                    });
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tally.closed = Some(format!("socket error: {e}"));
                    break;
                }
                None => {
                    tally.closed = Some("socket ended".into());
                    break;
                }
            },
            _ = &mut stopped => break,
        }
    }
    if tally.closed.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    tally
}

/// Connects, waits for `connected`, subscribes to `channel`; returns the socket and the channel's seq.
async fn open_ws(url: &str, channel: &str) -> Result<(Ws, u64), String> {
    // tungstenite zero-fills its whole read buffer before every read attempt (even one that finds no
    // data), so a large buffer costs a memset per wake-up: 4 KiB holds ~15 event frames of 100 B data.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
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
    let sub = json!({"op": "subscribe", "channel": channel, "ref": 1});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .map_err(|e| format!("sending subscribe: {e}"))?;
    loop {
        let v = next_json(&mut ws).await?;
        if v["type"] == "reply" && v["ref"] == 1 {
            if v["ok"] != true {
                return Err(format!("subscribe {channel} refused: {}", v["error"]));
            }
            return Ok((ws, v["seq"].as_u64().unwrap_or(0)));
        }
        if v["type"] == "disconnect" {
            return Err(format!("disconnected during setup: {v}"));
        }
        // Anything else (presence updates of the others joining) is skipped.
    }
}

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => return Err("no frame from the server within 30 s".into()),
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

// ---------------------------------------------------------------------------------------------------
// Publisher

struct PublishPlan {
    url: String,
    api_key: String,
    room: String,
    pad: String,
    rate: u32,
    measure_from_us: u64,
    end_us: u64,
    max_in_flight: usize,
}

/// Live counters for progress lines.
#[derive(Default)]
struct PubCounters {
    sent: AtomicU64,
    errors: AtomicU64,
}

/// One publish's outcome.
struct PubOutcome {
    measured: bool,
    result: Result<u64, String>,
    round_trip_us: u64,
}

/// What the publish phase produced.
struct Published {
    /// Seqs of the successful measured publishes.
    measured_seqs: Vec<u64>,
    /// Measured publishes sent.
    measured_sent: u64,
    /// Failed publishes (warmup included).
    errors: u64,
    /// Publish round trips, µs.
    round_trip: Histogram<u64>,
    /// Redis commands in the measured window, when probed.
    redis_commands: Option<u64>,
    /// How late the latest tick fired, µs.
    schedule_lag_max_us: u64,
}

async fn publisher(
    http: reqwest::Client,
    plan: PublishPlan,
    counters: Arc<PubCounters>,
    mut redis: Option<RedisProbe>,
) -> anyhow::Result<Published> {
    let plan = Arc::new(plan);
    let slots = Arc::new(Semaphore::new(plan.max_in_flight));
    let (tx, mut rx) = mpsc::unbounded_channel::<PubOutcome>();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate)));
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // Each tick's due time on the wall clock, to tell how late it fired.
    let (base, base_us) = (tokio::time::Instant::now(), now_us());
    let mut lag = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
        .expect("valid histogram bounds");
    let mut measuring = false;
    let mut redis_before = None;
    let mut measured_sent = 0;
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
            if let Some(r) = &mut redis {
                redis_before = Some(r.commands().await?);
            }
        }
        measured_sent += u64::from(measured);
        let permit = slots.clone().acquire_owned().await?;
        let (http, plan, tx) = (http.clone(), plan.clone(), tx.clone());
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let counters = counters.clone();
        tokio::spawn(async move {
            let sent = now_us();
            let body = format!(
                "{{\"event\":\"bench\",\"room\":\"{}\",\"data\":{{\"t\":{t},\"pad\":\"{}\"}}}}",
                plan.room, plan.pad
            );
            let result = publish_once(&http, &plan, body).await;
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
    drop(tx);
    // Every publish is done once all the slots are free again.
    let _all = slots.acquire_many(plan.max_in_flight as u32).await?;
    let redis_commands = match (&mut redis, redis_before) {
        // The `INFO` that took `before` is counted in `after`.
        (Some(r), Some(before)) => Some(r.commands().await?.saturating_sub(before + 1)),
        _ => None,
    };
    let mut out = Published {
        measured_seqs: Vec::new(),
        measured_sent,
        errors: 0,
        round_trip: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
            .expect("valid histogram bounds"),
        redis_commands,
        schedule_lag_max_us: lag.max(),
    };
    let mut first_error = None;
    while let Some(o) = rx.recv().await {
        out.round_trip.saturating_record(o.round_trip_us.max(1));
        match o.result {
            Ok(seq) if o.measured => out.measured_seqs.push(seq),
            Ok(_) => {}
            Err(e) => {
                out.errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("loadgen: {} publishes failed; the first: {e}", out.errors);
    }
    out.measured_seqs.sort_unstable();
    Ok(out)
}

/// One `POST /api/v1/events`; the seq of the room delivery.
async fn publish_once(
    http: &reqwest::Client,
    plan: &PublishPlan,
    body: String,
) -> Result<u64, String> {
    let r = http
        .post(&plan.url)
        .bearer_auth(&plan.api_key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {}: {e}", plan.url))?;
    let status = r.status();
    let bytes = r
        .bytes()
        .await
        .map_err(|e| format!("reading the publish reply: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "POST {} answered {status}: {}",
            plan.url,
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

/// Reads Redis `INFO stats` total_commands_processed.
struct RedisProbe {
    con: redis::aio::MultiplexedConnection,
}

impl RedisProbe {
    async fn connect(url: &str) -> anyhow::Result<Self> {
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

// ---------------------------------------------------------------------------------------------------
// Report

/// CPU time of this process (user + system), in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The one JSON line a run prints (fields in this order).
#[derive(Serialize)]
struct Report {
    /// Subscriber transport: `ws` (SSE arrives later).
    transport: &'static str,
    /// Number of `--url`s (engine nodes).
    nodes: usize,
    /// Subscribers that took part.
    subscribers: usize,
    /// The room (bare id).
    room: String,
    /// `--payload`: approximate bytes of each event's `data`.
    payload_bytes: usize,
    /// `--duration`: the measured publish phase, seconds.
    duration_s: u64,
    /// `--warmup`: seconds published before measuring.
    warmup_s: u64,
    /// Seconds the setup took (memberships, connects, subscribes).
    setup_s: f64,
    /// `--rate`.
    offered_publishes_per_s: u32,
    /// Successful measured publishes / `duration_s`.
    achieved_publishes_per_s: f64,
    /// Measured publishes sent (successful or not).
    publishes: u64,
    /// Publishes that failed (HTTP error or non-2xx), warmup included.
    publish_errors: u64,
    /// Publish round trip (HTTP request to reply), median, µs.
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
    /// Subscribers whose socket closed before the end (e.g. `disconnect` 4008, slow consumer).
    disconnects: u64,
    /// `reset` frames on the room channel (its epoch changed under the subscription).
    resets: u64,
    /// `delivered / duration_s`.
    deliveries_per_s: f64,
    /// Delivery latency of measured events (receipt time − the publish's send time `t`), median, µs.
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
    loadgen_cpu_percent: Option<f64>,
    /// With `--redis`: growth of Redis `INFO stats` `total_commands_processed` across the measured
    /// publishes, divided by them. It counts **every command Redis ran in that window**, not only the
    /// publish path: commands run inside Lua scripts, presence heartbeats and sweeps, every node's
    /// work, anything else using that Redis (the loadgen's own `INFO` is subtracted).
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_commands_per_publish: Option<f64>,
}

fn report(args: &Args, published: &Published, tallies: &[Tally]) -> Report {
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
        eprintln!("loadgen: {disconnects} subscribers lost their socket; the first: {c}");
    }
    if unreadable > 0 {
        eprintln!("loadgen: {unreadable} event frames had no readable \"seq\" or \"t\"");
    }
    let secs = args.duration as f64;
    let completeness = if expected == 0 {
        0.0
    } else {
        delivered as f64 / expected as f64
    };
    Report {
        transport: args.transport.as_str(),
        nodes: 0,
        subscribers: tallies.len(),
        room: args.room.clone(),
        payload_bytes: args.payload,
        duration_s: args.duration,
        warmup_s: args.warmup,
        setup_s: 0.0,
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
    }
}
