//! Load generator: N subscribers (WebSocket or SSE) in one room over one or more engine nodes, one
//! fixed-rate publisher (HTTP API or WebSocket `publish`), an optional phase of K idle WebSockets, and
//! one JSON line of results: throughput, completeness, end-to-end latency, the CPU each process (the
//! loadgen, the engine, Redis) spent per delivery, and the engine's memory per idle connection.
//!
//! ```text
//! # one node, memory backend
//! export HERALD_JWT_SECRET=bench-secret-0123456789 HERALD_API_KEY=bench-api-key-0123 \
//!     HERALD_ADMIN_KEY=bench-admin-key-0123
//! cargo build --release && cargo build --release --example loadgen
//! target/release/herald serve --listen 127.0.0.1:7071 & ENGINE=$!
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --subscribers 1000 --rate 500 \
//!     --duration 10 --engine-pid $ENGINE
//!
//! # the same room over SSE, published through a WebSocket
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --transport sse --publish-via ws \
//!     --rate 100 --engine-pid $ENGINE
//!
//! # engine memory per idle connection, nothing published
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --subscribers 0 --idle 10000 \
//!     --engine-pid $ENGINE
//!
//! # two nodes sharing one Redis: subscribers are spread round-robin, the publisher uses the first URL
//! redis-server --port 0 --unixsocket /tmp/lg/redis.sock --save '' --appendonly no & REDIS=$!
//! target/release/herald serve --listen 127.0.0.1:7071 --redis unix:///tmp/lg/redis.sock & E1=$!
//! target/release/herald serve --listen 127.0.0.1:7072 --redis unix:///tmp/lg/redis.sock & E2=$!
//! target/release/examples/loadgen --url http://127.0.0.1:7071 --url http://127.0.0.1:7072 \
//!     --rate 200 --redis unix:///tmp/lg/redis.sock --engine-pid $E1 --engine-pid $E2 \
//!     --redis-pid $REDIS
//! ```
//!
//! `--api-key` and `--secret` also read `HERALD_API_KEY` and `HERALD_JWT_SECRET`; `--help` explains
//! every flag. Progress goes to stderr (a progress bar on a terminal, one line a second otherwise,
//! nothing with `--quiet`); stdout gets exactly one JSON line, so runs can be collected with
//! `>> results.jsonl`.
//!
//! # What a run does
//!
//! 1. **Setup.** Raises the soft open-file limit to the hard one (via `prlimit(1)` when the soft limit
//!    is too low, since std has no API for it; otherwise run `ulimit -n` first) and checks `/healthz`
//!    on every node.
//! 2. **Idle phase** (`--idle K`). Reads the engine's RSS (`VmRSS` in `/proc/PID/status`, summed
//!    over the `--engine-pid`s), opens K WebSockets as users `lg-idle-0 … lg-idle-{K-1}`, each of
//!    which sends one `subscribe` to its own `user:` channel (no memberships needed), waits for every
//!    reply and one more second for the engine to settle, and reads the RSS again. The idle sockets
//!    stay open (reading, so the engine's pings get their pongs) until the run ends, so they are
//!    also present during the publish phase. They use the subscribers' hand-rolled WebSocket client
//!    (see 5.) with a 1 KiB read buffer, so they cost the loadgen little (kernel socket buffers
//!    aside). `--subscribers 0` makes a run of this phase alone. Measure on a freshly started
//!    engine: memory that earlier connections or load left to the allocator is reused without
//!    growing RSS, so a second run on the same engine reports far less (it can be 0). On a fresh engine the figure includes the first-use growth
//!    of per-thread allocator arenas and tables, which a larger K amortises.
//! 3. **Subscribers.** Adds users `lg-0 … lg-{N-1}` to the room with
//!    `PUT /api/v1/rooms/{room}/members/{user}` (through the node that user connects to;
//!    `--setup-concurrency` in flight), then opens N subscribers (token in `?token=`), spread over the `--url`s round-robin:
//!    - `--transport ws`: `GET /ws`, wait for `connected`, `subscribe` to `room:{room}` and wait for
//!      the reply, whose `seq` is where this subscriber's deliveries start;
//!    - `--transport sse`: `GET /sse?channels=room:{room}`; the engine subscribes before it answers,
//!      so a 200 means subscribed. The stream carries no subscribe reply, so once every stream is
//!      open one `GET /api/v1/channels/room:{room}/history?since=0&limit=1` (first node) gives the
//!      channel's seq (nothing is published before that).
//!
//!    With `--publish-via ws`, users `lg-pub-0 …` are made members too and each opens one
//!    WebSocket to the first node.
//! 4. **Publish.** One publisher sends at `--rate` per second for `--warmup` + `--duration` seconds
//!    an event `bench` in the room with `data` `{"t":<send time, µs since the UNIX epoch>,
//!    "pad":"xx…"}` of about `--payload` bytes:
//!    - `--publish-via http`: `POST /api/v1/events` (`{"event":"bench","room":ROOM,"data":…}`) over
//!      a keep-alive HTTP client, each request as its own task; the reply's `seq` is recorded.
//!    - `--publish-via ws`: the `publish` op (`{"op":"publish","ref":n,"channel":"room:ROOM",
//!      "event":"bench","data":…}`) round-robin over `--publish-connections` sockets; the reply with
//!      the same `ref` carries the seq (`deliveries[].seq` of the room channel). The engine handles
//!      one socket's frames one at a time and allows 100 frames/s per connection by default
//!      (`[limits] frames_per_second`), so give about rate/100 connections or raise that limit.
//!
//!    The schedule is a tokio interval with [`MissedTickBehavior::Burst`]: when the loadgen itself
//!    stalls it catches up, so the offered count stays `rate × seconds` rather than silently
//!    dropping; `schedule_lag_max_us` in the output shows how late the worst tick fired (about 1 ms
//!    is tokio's timer granularity; much more means the loadgen stalled and sent a burst). `t` is
//!    taken when the tick fires, before waiting for an in-flight slot (`--max-in-flight`), so engine
//!    backpressure counts as latency. Publishes sent during the warmup are delivered and checked for
//!    duplicates and order, but not counted in latency, completeness or CPU.
//! 5. **Receive.** Each subscriber parses frames lazily: a prefix check for
//!    `{"type":"event","channel":"room:{room}",`, then a byte search for `"seq":` and `"t":` (no JSON
//!    parse), so parsing is a negligible part of the tool's cost. No WebSocket, SSE or HTTP client
//!    library either: each subscriber is one task on its own `TcpStream` that writes its request by
//!    hand, parses the response head, and then reads into one read buffer (16 KiB, doubled up to
//!    128 KiB while reads fill it; reads go into its spare capacity, nothing is zero-filled), parsing
//!    each read's bytes in place:
//!    - WebSocket: `GET /ws` with the upgrade headers, a `101` with the right
//!      `Sec-WebSocket-Accept`, then RFC 6455 frames. A text frame's payload is handed to the frame
//!      check as a slice of the buffer (no copy, no allocation, no UTF-8 check); a frame cut by a
//!      read stays at the buffer's start for the next one (a frame larger than the buffer grows it,
//!      up to 16 MiB); a fragmented message is reassembled; pings get their (masked) pongs; a
//!      close frame ends the subscriber (`closed by the server: CODE REASON`). The setup frames
//!      (`connected`, the subscribe and its reply) are the only ones parsed as JSON.
//!    - SSE: `GET /sse`; the body's framing (chunked, or Content-Length / to the connection's end)
//!      is decoded incrementally and its payload bytes split into lines in place: `data:` lines
//!      carry the same bytes as WebSocket frames, `id:` and `event:` lines are skipped, and no line
//!      is copied unless it straddles two reads.
//!
//!    Latency (now − `t`, both from this machine's clock) goes into a per-subscriber `hdrhistogram`
//!    (2 significant digits: 1 % resolution, ~18 KiB each); seqs go into a per-subscriber bitmap.
//!    What the tool does spend per delivery is the kernel's TCP receive path and a task wake-up per
//!    read; `loadgen_cpu_us_per_delivery` reports it. (Only the `--publish-via ws` sockets use
//!    tungstenite: their frames are per publish, not per delivery.)
//! 6. **Report.** After the last publish the tool waits until every expected delivery arrived (or
//!    `--drain` seconds passed) to close the CPU window, then for the rest of `--drain`; subscribers
//!    stop, their histograms are merged, and each subscriber's bitmap is checked against the seqs
//!    the publisher got back for its measured publishes.
//!
//! # CPU
//!
//! CPU figures come from `/proc/PID/stat` (utime + stime, all threads) read when the first measured
//! publish is due and again once every expected delivery has arrived (the *CPU window*,
//! `cpu_window_s`). `/proc` counts in clock ticks (USER_HZ); the loadgen assumes 100 per second, the
//! value on every mainstream Linux (`getconf CLK_TCK`), as it does not link libc to ask `sysconf`.
//! A tick is 10 ms, so windows of a few seconds or more give figures to about 1 %. Per delivery
//! means divided by `delivered` (the measured deliveries). Everything (engine, Redis, loadgen) on
//! one machine shares the CPUs: the loadgen's own figures say how much it took from the others.
//!
//! # Output
//!
//! One JSON object on one line; [`Report`], [`LoadReport`] and [`IdleReport`] document every field.
//! The publish-phase fields are absent in an idle-only run, the idle fields without `--idle`, and
//! the CPU and Redis fields without the flags that enable them. For example, 200 subscribers at 100
//! publishes/s with `--idle 2000 --engine-pid …` on a freshly started engine (wrapped here):
//!
//! ```text
//! {"transport":"ws","publish_via":"http","nodes":1,"subscribers":200,"room":"bench",
//!  "payload_bytes":100,"duration_s":5,"warmup_s":2,"setup_s":0.1,"connect_s":0.054,
//!  "connects_per_s":3703.7,"offered_publishes_per_s":100,
//!  "achieved_publishes_per_s":100.0,"publishes":500,"publish_errors":0,"publish_p50_us":887,
//!  "publish_p99_us":2303,"schedule_lag_max_us":3263,"expected_deliveries":100000,
//!  "delivered":100000,"completeness":1.0,"missing":0,"gaps":0,"duplicates":0,"reorders":0,
//!  "disconnects":0,"resets":0,"deliveries_per_s":19997.4,"latency_p50_us":1455,
//!  "latency_p90_us":2335,"latency_p99_us":2975,"latency_max_us":4479,"loadgen_cpu_percent":14.6,
//!  "publish_connections":0,"offered_deliveries_per_s":20000,"cpu_window_s":5.0,
//!  "loadgen_cpu_us_per_delivery":7.4,"engine_cpu_us_per_delivery":9.0,"engine_cpu_percent":18.0,
//!  "idle_connections":2000,"idle_setup_s":0.2,"rss_before_kb":12200,"rss_after_kb":20168,
//!  "rss_per_idle_connection_bytes":4079,"idle_disconnects":0}
//! ```
//!
//! At a low rate like this one every event costs each subscriber a wake-up and a `read` of its own
//! (and the engine a `write` per subscriber), so the loadgen's CPU per delivery is close to the
//! engine's. As the rate grows, the engine writes several frames per `write` and the loadgen takes
//! them in one read, so both costs per delivery fall; compare `loadgen_cpu_us_per_delivery` with
//! `engine_cpu_us_per_delivery` to see which process limits a run.
//! An idle-only run prints `transport`, `nodes`, `subscribers` (0) and the idle fields.
//!
//! With `--redis`, `redis_commands_per_publish` is added: it counts every command Redis ran while
//! the measured publishes went through (Lua-internal commands, presence heartbeats, every node), not
//! only the publish path. With `--redis-pid`, Redis's CPU per delivery and percent are added.
//!
//! Needs: the engine's `HERALD_JWT_SECRET` (HS256) to mint client tokens, its API key (unless the run
//! is idle-only), the engine's PIDs for the CPU and memory figures (so the engine must run on this
//! machine), and enough file descriptors on both sides (the engine keeps one per connection too:
//! start it from a shell with `ulimit -n` high enough).
//!
//! [`MissedTickBehavior::Burst`]: tokio::time::MissedTickBehavior::Burst
//! [`LoadReport`]: report::LoadReport
//! [`IdleReport`]: report::IdleReport

mod args;
mod http;
mod idle;
mod load;
mod procfs;
mod publisher;
mod report;
mod scan;
mod setup;
mod sse;
mod subscribers;
mod tally;
mod ui;
mod ws;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::args::{Args, PublishVia};
use crate::idle::idle_phase;
use crate::load::load_phase;
use crate::procfs::{Probes, ensure_fd_limit};
use crate::publisher::PUBLISH_TIMEOUT;
use crate::report::Report;
use crate::ui::Ui;

/// File descriptors kept free beyond one per connection (HTTP pools, Redis, runtime).
const FD_MARGIN: u64 = 256;

#[tokio::main]
async fn main() -> ExitCode {
    // herald's reqwest has TLS without a crypto provider of its own: pick ring, as herald does.
    herald::install_crypto_provider();
    let args = Args::parse();
    let ui = Ui::new(args.quiet);
    let result = run(args, &ui).await;
    ui.finish();
    match result {
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

fn valid_room(r: &str) -> bool {
    (1..=128).contains(&r.len())
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

async fn run(args: Args, ui: &Ui) -> anyhow::Result<Report> {
    if args.urls.is_empty() {
        bail!("give at least one --url");
    }
    if !valid_room(&args.room) {
        bail!("--room: 1-128 characters of [A-Za-z0-9_.@-] (the bare id, not room:…)");
    }
    if args.subscribers == 0 && args.idle == 0 {
        bail!("nothing to do: give --subscribers N (a publish phase) and/or --idle K (idle phase)");
    }
    if args.subscribers > 0 && (args.rate == 0 || args.duration == 0) {
        bail!("--rate and --duration must be at least 1 (or --subscribers 0 for an idle-only run)");
    }
    if args.idle > 0 && args.engine_pids.is_empty() {
        bail!(
            "--idle measures the engine's memory: give its process id with --engine-pid PID \
             (repeat for several nodes), e.g. --engine-pid $(pgrep -n herald)"
        );
    }
    let api_key = match (&args.api_key, args.subscribers) {
        (Some(k), _) => k.clone(),
        (None, 0) => String::new(),
        (None, _) => bail!("give the engine's API key with --api-key or HERALD_API_KEY"),
    };
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
    let probes = Arc::new(Probes::new(&args.engine_pids, args.redis_pid)?);
    let ws_publishers = if args.subscribers > 0 && args.publish_via == PublishVia::Ws {
        args.publish_connections.max(1)
    } else {
        0
    };
    if ws_publishers > 0 && u64::from(args.rate) > 100 * ws_publishers as u64 {
        ui.warn(format_args!(
            "--rate {} over {ws_publishers} publisher socket(s) is more than 100 frames/s per \
             connection, the engine's default limit (limits.frames_per_second): expect \
             rate_limited replies unless the engine's limit is raised; or use \
             --publish-connections {}",
            args.rate,
            u64::from(args.rate).div_ceil(90)
        ));
    }
    ensure_fd_limit(
        (args.subscribers + args.idle + ws_publishers) as u64 + FD_MARGIN,
        ui,
    )?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight.max(args.setup_concurrency))
        .timeout(PUBLISH_TIMEOUT)
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
    // Every task started below ends with this token, also when the run fails half-way.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();

    let idle = if args.idle > 0 {
        Some(idle_phase(&args, &urls, &probes, ui, &stop).await?)
    } else {
        None
    };
    let load = if args.subscribers > 0 {
        Some(load_phase(&args, &urls, &http, &api_key, &probes, ui, &stop).await?)
    } else {
        None
    };
    stop.cancel();
    let idle = match idle {
        Some(phase) => Some(phase.finish(ui).await?),
        None => None,
    };
    Ok(Report {
        // Idle connections are WebSockets whatever --transport says.
        transport: if args.subscribers > 0 {
            args.transport.as_str()
        } else {
            "ws"
        },
        publish_via: (args.subscribers > 0).then(|| args.publish_via.as_str()),
        nodes: urls.len(),
        subscribers: args.subscribers,
        load,
        idle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

    /// An engine in this process (its PID is ours), on port 0.
    async fn engine() -> herald::Server {
        let mut c = herald::Config::defaults();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.api_key = "loadgen-test-api-key".into();
        c.admin_key = "loadgen-test-admin-key".into();
        c.jwt.secret = Some("loadgen-test-secret-0123456789".into());
        c.jwt.generated_secret = false;
        c.generated_keys = false;
        c.rules_dir = "/nonexistent/loadgen-test-rules".into();
        let listener = tokio::net::TcpListener::bind(c.listen).await.unwrap();
        herald::start(
            c,
            herald::ChannelKinds::default(),
            listener,
            std::future::pending(),
        )
        .await
        .unwrap()
    }

    async fn tiny_run(server: &herald::Server, subscribers: &str, extra: &[&str]) -> Value {
        let url = format!("http://{}", server.addr);
        let pid = std::process::id().to_string();
        let mut argv = vec![
            "loadgen",
            "--url",
            &url,
            "--api-key",
            "loadgen-test-api-key",
            "--secret",
            "loadgen-test-secret-0123456789",
            "--subscribers",
            subscribers,
            "--rate",
            "20",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--drain",
            "1",
            "--engine-pid",
            &pid,
            "--quiet",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).unwrap();
        let report = tokio::time::timeout(Duration::from_secs(20), run(args, &Ui::new(true)))
            .await
            .expect("the run finished in time")
            .unwrap();
        serde_json::to_value(&report).unwrap()
    }

    fn assert_complete(r: &Value) {
        assert_eq!(r["completeness"], 1.0, "{r}");
        assert_eq!(r["expected_deliveries"], 80, "{r}");
        for k in ["duplicates", "reorders", "disconnects", "publish_errors"] {
            assert_eq!(r[k], 0, "{k}: {r}");
        }
        assert!(r["engine_cpu_us_per_delivery"].is_number(), "{r}");
        assert!(r["loadgen_cpu_us_per_delivery"].is_number(), "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_ws_run_with_idle_connections_and_ws_publishing() {
        let server = engine().await;
        let r = tiny_run(&server, "4", &["--publish-via", "ws", "--idle", "10"]).await;
        assert_complete(&r);
        assert_eq!(
            (r["transport"].as_str(), r["publish_via"].as_str()),
            (Some("ws"), Some("ws"))
        );
        assert_eq!(r["publish_connections"], 1);
        assert_eq!(r["idle_connections"], 10, "{r}");
        assert_eq!(r["idle_disconnects"], 0, "{r}");
        assert!(r["rss_per_idle_connection_bytes"].is_i64(), "{r}");
        server.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_sse_run_and_an_idle_only_run() {
        let server = engine().await;
        let r = tiny_run(&server, "4", &["--transport", "sse"]).await;
        assert_complete(&r);
        assert_eq!(
            (r["transport"].as_str(), r["publish_via"].as_str()),
            (Some("sse"), Some("http"))
        );
        assert!(r.get("idle_connections").is_none(), "{r}");
        let r = tiny_run(&server, "0", &["--idle", "5"]).await;
        assert_eq!(r["idle_connections"], 5, "{r}");
        assert!(
            r.get("completeness").is_none() && r.get("publish_via").is_none(),
            "{r}"
        );
        server.stop().await.unwrap();
    }
}
