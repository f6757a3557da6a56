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
//!  "payload_bytes":100,"duration_s":5,"warmup_s":2,"setup_s":0.1,"offered_publishes_per_s":100,
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

use std::collections::HashMap;
use std::fmt::Display;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Drives herald with N room subscribers, one fixed-rate publisher and optionally K idle connections;
/// prints one JSON line of results.
#[derive(Parser, Debug)]
#[command(
    about = "Load generator for herald: N subscribers (WebSocket or SSE) in one room, a fixed-rate \
             publisher (HTTP or WebSocket), optional idle connections; prints one JSON line of results \
             (throughput, completeness, latency, CPU per delivery, RSS per idle connection) to stdout",
    after_long_help = "\
A run: check /healthz on every --url; with --idle, open the idle WebSockets and measure the engine's \
RSS; add the subscribers to the room and open them; publish for --warmup + --duration seconds; wait \
--drain seconds; print one JSON line. Progress goes to stderr (a bar on a terminal, one line a second \
otherwise, nothing with --quiet). The fields are documented at the top of examples/loadgen.rs.

Example:
  target/release/examples/loadgen --url http://127.0.0.1:7071 --subscribers 1000 --rate 500 \\
      --duration 10 --engine-pid $(pgrep -n herald)"
)]
struct Args {
    /// Engine base URL (http:// only), e.g. http://127.0.0.1:7070.
    ///
    /// Repeat for several nodes (sharing one Redis): subscribers and idle connections are spread
    /// over them round-robin and each subscriber's membership goes through the node it connects
    /// to; the publisher, its WebSockets and the SSE seq lookup use the first.
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "http://127.0.0.1:7070"
    )]
    urls: Vec<String>,
    /// The engine's backend API key (its HERALD_API_KEY).
    ///
    /// Used for memberships (PUT /api/v1/rooms/{room}/members/{user}), HTTP publishes and the SSE
    /// seq lookup. Not needed for an idle-only run (--subscribers 0).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The engine's HS256 JWT secret (its HERALD_JWT_SECRET).
    ///
    /// The loadgen mints a client token per connection with it (subscribers, WebSocket publishers,
    /// idle connections), valid for 6 hours.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Number of subscribers: users lg-0 … lg-{N-1}, one connection each (see --transport).
    ///
    /// Each is made a member of --room first. 0 skips memberships and the whole publish phase: an
    /// idle-only run, which needs --idle.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Room the subscribers join and the publisher publishes in.
    ///
    /// The bare id (1-128 characters of [A-Za-z0-9_.@-]): the channel is room:{room}.
    #[arg(long, default_value = "bench")]
    room: String,
    /// Event type of every publish (1-128 characters of [A-Za-z0-9_.:-]).
    ///
    /// The default `bench` is a type the shipped rules pass through to the channel defaults; give
    /// `chat.message` to have the shipped `route` decide every publish (with `herald serve --rules
    /// rules`), e.g. to compare publish throughput with rules on and off.
    #[arg(long, default_value = "bench")]
    event: String,
    /// Publishes per second, on a fixed schedule.
    ///
    /// Each publish is delivered to every subscriber, so the offered deliveries per second are
    /// rate × subscribers.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the measured publish phase, in seconds (after --warmup).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Approximate size of each event's `data` object, in bytes.
    ///
    /// `data` is {"t":<send time, µs since the UNIX epoch>,"pad":"xx…"}, padded with `x` to this
    /// size (at least 31 bytes: the time and the keys).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Redis URL the engine uses (redis://, unix://): report redis_commands_per_publish.
    ///
    /// The loadgen reads INFO stats total_commands_processed before and after the measured
    /// publishes: every command Redis ran in that window counts (Lua-internal commands, presence
    /// heartbeats, every node, anything else using that Redis; its own INFO is subtracted).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Seconds of publishing before the measured phase.
    ///
    /// Warmup events are delivered and checked for duplicates and order, but count in no figure
    /// (latency, completeness, CPU).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds to wait after the last publish for deliveries still in flight, before the
    /// subscribers stop.
    #[arg(long, default_value_t = 2)]
    drain: u64,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value_t = TransportKind::Ws)]
    transport: TransportKind,
    /// How the publisher publishes.
    #[arg(long, value_enum, default_value_t = PublishVia::Http)]
    publish_via: PublishVia,
    /// WebSockets the publisher spreads its publishes over (round-robin), with --publish-via ws.
    ///
    /// Users lg-pub-0 … lg-pub-{C-1}, room members, all on the first --url. The engine handles one
    /// socket's frames one at a time and allows limits.frames_per_second (100 by default) per
    /// connection: give about rate/100 connections, or raise that limit. Ignored with
    /// --publish-via http.
    #[arg(long, value_name = "C", default_value_t = 1)]
    publish_connections: usize,
    /// PID of an engine process on this machine; repeat for several nodes.
    ///
    /// Its utime + stime (/proc/PID/stat, all threads) over the CPU window give
    /// engine_cpu_us_per_delivery and engine_cpu_percent (summed over the PIDs); its VmRSS
    /// (/proc/PID/status) is what --idle measures.
    #[arg(long = "engine-pid", value_name = "PID")]
    engine_pids: Vec<u32>,
    /// PID of the redis-server the engine uses (on this machine).
    ///
    /// Gives redis_cpu_us_per_delivery and redis_cpu_percent, measured like --engine-pid.
    #[arg(long, value_name = "PID")]
    redis_pid: Option<u32>,
    /// Open K idle WebSockets first and report the engine's RSS per idle connection.
    ///
    /// Users lg-idle-0 … lg-idle-{K-1} (no memberships), each subscribed to its own user: channel,
    /// spread over the --urls like subscribers. The engine's VmRSS (summed over --engine-pid, which
    /// is required) is read before they open and 1 s after the last one's subscribe reply. They stay
    /// open, answering the engine's pings, until the run ends (so also during the publish phase).
    /// Use a freshly started engine: memory freed by earlier connections is reused without growing
    /// RSS, so a second run on the same engine reports far less.
    #[arg(long, value_name = "K", default_value_t = 0)]
    idle: usize,
    /// Connects and memberships in flight at once during setup.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Seconds a setup may take: the idle connections, and separately the subscribers (memberships,
    /// connects, subscribes, publisher sockets).
    #[arg(long, default_value_t = 120)]
    setup_timeout: u64,
    /// Most publishes in flight at once (the schedule waits beyond that, and the wait counts as
    /// latency).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// No progress on stderr (no bar, no progress lines); warnings and errors still go there.
    #[arg(long, short)]
    quiet: bool,
}

/// How subscribers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// WebSocket: GET /ws (token in ?token=), then a `subscribe` to room:{room}.
    Ws,
    /// Server-sent events: GET /sse?channels=room:{room} (token in ?token=).
    Sse,
}

impl TransportKind {
    fn as_str(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
            TransportKind::Sse => "sse",
        }
    }
}

/// How the publisher publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PublishVia {
    /// POST /api/v1/events with the API key, many requests in flight.
    Http,
    /// The `publish` op over WebSockets as room members (see --publish-connections).
    Ws,
}

impl PublishVia {
    fn as_str(self) -> &'static str {
        match self {
            PublishVia::Http => "http",
            PublishVia::Ws => "ws",
        }
    }
}

/// Largest latency the histograms track (longer ones are clamped to it).
const LATENCY_MAX_US: u64 = 60_000_000;
/// Histogram precision: 2 significant digits (1 %), ~18 KiB per subscriber.
const LATENCY_SIGFIG: u8 = 2;
/// Token lifetime: long enough for any run.
const TOKEN_TTL_SECS: u64 = 6 * 3600;
/// File descriptors kept free beyond one per connection (HTTP pools, Redis, runtime).
const FD_MARGIN: u64 = 256;
/// Bytes of `data` besides the padding: `{"t":` + 16 digits + `,"pad":"` + `"}`.
const DATA_OVERHEAD: usize = 5 + 16 + 8 + 2;
/// WebSocket read size of the publisher sockets (tungstenite). tungstenite zero-fills its whole read
/// buffer before every read attempt (even one that finds no data), so a large buffer costs a memset
/// per wake-up: 4 KiB holds ~15 reply frames.
const READ_BUFFER: usize = 4 * 1024;
/// Read buffer of idle WebSockets: they only ever read a `connected`, a reply and pings, and there
/// may be many of them (it grows for a larger frame, and shrinks back once that frame is read).
const IDLE_READ_BUFFER: usize = 1024;
/// How long the engine has to settle after the last idle connection subscribed, before its RSS is
/// read again.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// How long a publish may wait for its reply (HTTP request timeout; WebSocket reply wait).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SSE line accepted (event frames are at most the engine's 64 KiB frame limit plus the
/// envelope): a longer one means the stream is not what the loadgen expects.
const SSE_MAX_LINE: usize = 1 << 20;
/// Read buffer of each subscriber (SSE or WebSocket) at first: 16 KiB holds ~50 events of 100 B
/// data. Reads go into its spare capacity (nothing is zero-filled), so it costs memory only as far
/// as reads fill it.
const SUB_READ_BUFFER: usize = 16 * 1024;
/// A subscriber whose read filled its whole buffer (it is behind: the socket holds more) doubles
/// the buffer, up to this: fewer, larger reads while it catches up.
const SUB_READ_BUFFER_MAX: usize = 128 * 1024;
/// Largest WebSocket frame, or fragmented message, a subscriber or idle connection accepts (the
/// engine's frames are at most 64 KiB): a larger one means the stream is not what the loadgen
/// expects, and is an error rather than a buffer that grows without bound.
const WS_MAX_MESSAGE: usize = 16 << 20;
/// How long a write of a subscriber's or idle connection's WebSocket (the upgrade request, the
/// subscribe, a pong) may wait for the socket.
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long WebSocket setup waits for each frame (`connected`, the subscribe reply).
const SETUP_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an SSE or WebSocket subscriber's (or idle connection's) TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the engine may take to answer `GET /sse` or a WebSocket upgrade (its response head).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head accepted.
const HEAD_MAX: usize = 16 * 1024;
/// How much of an error response's body (e.g. a refused `GET /sse`) is shown.
const ERROR_BODY_MAX: usize = 1024;
/// USER_HZ: the unit of the CPU times in /proc/PID/stat. 100 on every mainstream Linux
/// (`getconf CLK_TCK`); the loadgen does not link libc to ask `sysconf(_SC_CLK_TCK)`.
const CLK_TCK: u64 = 100;

/// The SSE `data:` of the frame the engine sends before it ends a stream.
const DISCONNECT_HEAD: &[u8] = b"{\"type\":\"disconnect\"";

#[tokio::main]
async fn main() -> ExitCode {
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

/// `ws://host:port` of an `http://host:port` base URL.
fn ws_base(http_base: &str) -> String {
    format!("ws{}", &http_base["http".len()..])
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

// ---------------------------------------------------------------------------------------------------
// Progress

/// Progress on stderr: a bar on a terminal, plain lines otherwise, nothing with `--quiet`.
struct Ui {
    /// Hidden (every call a no-op) unless stderr is a terminal and not `--quiet`.
    bar: ProgressBar,
    visible: bool,
    quiet: bool,
}

const SETUP_TEMPLATE: &str = "{prefix:>12} [{bar:32}] {pos}/{len} {msg} ({elapsed})";
const PUBLISH_TEMPLATE: &str = "{prefix:>12} [{bar:32}] {pos}/{len} s  {msg}";

impl Ui {
    fn new(quiet: bool) -> Ui {
        let visible = !quiet && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        Ui {
            bar,
            visible,
            quiet,
        }
    }

    /// Whether to print one progress line a second (stderr is not a terminal, and not `--quiet`).
    fn lines(&self) -> bool {
        !self.visible && !self.quiet
    }

    /// A progress note (not with `--quiet`).
    fn note(&self, msg: impl Display) {
        if !self.quiet {
            self.bar.suspend(|| eprintln!("loadgen: {msg}"));
        }
    }

    /// Something the user should know about the results, even with `--quiet`.
    fn warn(&self, msg: impl Display) {
        self.bar.suspend(|| eprintln!("loadgen: {msg}"));
    }

    /// Starts a phase of `len` steps on the bar.
    fn phase(&self, prefix: &'static str, len: u64, template: &str) {
        self.bar.reset();
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid progress template")
                .progress_chars("=> "),
        );
        self.bar.set_prefix(prefix);
        self.bar.set_message("");
        self.bar.set_length(len);
        self.bar.set_position(0);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

// ---------------------------------------------------------------------------------------------------
// Setup

/// Raises the soft RLIMIT_NOFILE towards `need` (up to the hard limit) and fails clearly below it.
fn ensure_fd_limit(need: u64, ui: &Ui) -> anyhow::Result<()> {
    let Some((soft, hard)) = nofile_limits() else {
        ui.warn("cannot read /proc/self/limits; assuming the open-file limit is enough");
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
            ui.note(format_args!("raised the open-file limit to {soft}"));
            if soft >= need {
                return Ok(());
            }
        }
    }
    let soft = nofile_limits().map(|l| l.0).unwrap_or(soft);
    bail!(
        "the open-file limit is {soft} (hard {hard}) but {need} are needed for this many \
         connections: raise it with `ulimit -n {need}` (for herald too) or use fewer \
         --subscribers / --idle"
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

/// PUTs every subscriber user into the room through the node it will connect to, and the WebSocket
/// publisher users through the first node.
async fn add_members(
    http: &reqwest::Client,
    api_key: &str,
    args: &Args,
    urls: &[String],
    ws_publishers: usize,
    ui: &Ui,
) -> anyhow::Result<()> {
    let users = (0..args.subscribers)
        .map(|i| (format!("lg-{i}"), &urls[i % urls.len()]))
        .chain((0..ws_publishers).map(|c| (format!("lg-pub-{c}"), &urls[0])));
    let results = stream::iter(users)
        .map(|(user, base)| {
            let url = format!("{base}/api/v1/rooms/{}/members/{user}", args.room);
            async move {
                api_call(http.put(&url).bearer_auth(api_key), "PUT", &url).await?;
                ui.bar.inc(1);
                Ok(())
            }
        })
        .buffer_unordered(args.setup_concurrency.max(1))
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    results.into_iter().collect()
}

/// Waits until `n` connection tasks reported ready, failing on the first error or at `deadline`.
async fn await_ready(
    ready_rx: &mut mpsc::Receiver<Result<(), String>>,
    n: usize,
    deadline: tokio::time::Instant,
    ui: &Ui,
    what: &str,
) -> anyhow::Result<()> {
    let mut ready = 0;
    let mut last_note = Instant::now();
    while ready < n {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {
                ready += 1;
                ui.bar.inc(1);
            }
            Ok(Some(Err(e))) => bail!("{what} setup failed after {ready} were ready: {e}"),
            Ok(None) => bail!("{what} ended during setup ({ready} ready)"),
            Err(_) => {
                bail!("setup timed out with {ready} of {n} {what} ready (--setup-timeout)")
            }
        }
        if ui.lines() && last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("loadgen: {ready}/{n} {what} ready");
            last_note = Instant::now();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Idle phase

/// The idle connections, open, and what was measured when they opened.
struct IdlePhase {
    tasks: Vec<JoinHandle<Option<String>>>,
    setup_s: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
}

async fn idle_phase(
    args: &Args,
    urls: &[String],
    probes: &Probes,
    ui: &Ui,
    stop: &CancellationToken,
) -> anyhow::Result<IdlePhase> {
    let rss_before_kb = probes.engine_rss_kb()?;
    ui.note(format_args!(
        "opening {} idle WebSockets over {} node(s) (engine RSS {rss_before_kb} kB) …",
        args.idle,
        urls.len()
    ));
    ui.phase("idle", args.idle as u64, SETUP_TEMPLATE);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.setup_timeout);
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.idle);
    let slots = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(args.idle);
    for i in 0..args.idle {
        let user = format!("lg-idle-{i}");
        let token = herald::transport::auth::mint_hs256(&args.secret, &user, None, TOKEN_TTL_SECS)
            .context("minting an idle connection token")?;
        let url = format!("{}/ws?token={token}", ws_base(&urls[i % urls.len()]));
        tasks.push(tokio::spawn(idle_connection(
            user,
            url,
            slots.clone(),
            ready_tx.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    await_ready(&mut ready_rx, args.idle, deadline, ui, "idle connections").await?;
    let setup_s = t0.elapsed().as_secs_f64();
    ui.bar.set_message("settling");
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_after_kb = probes.engine_rss_kb()?;
    ui.note(format_args!(
        "{} idle connections open in {setup_s:.1}s; engine RSS {rss_before_kb} -> {rss_after_kb} kB",
        args.idle
    ));
    Ok(IdlePhase {
        tasks,
        setup_s,
        rss_before_kb,
        rss_after_kb,
    })
}

impl IdlePhase {
    /// Waits for the (stopped) idle connections to close; the report's idle fields.
    async fn finish(self, ui: &Ui) -> anyhow::Result<IdleReport> {
        let k = self.tasks.len();
        let mut disconnects = 0u64;
        let mut first = None;
        for t in self.tasks {
            if let Some(reason) = t.await.context("an idle connection task panicked")? {
                disconnects += 1;
                first.get_or_insert(reason);
            }
        }
        if let Some(reason) = first {
            ui.warn(format_args!(
                "{disconnects} idle connections lost their socket; the first: {reason}"
            ));
        }
        let grown_bytes = (self.rss_after_kb as i64 - self.rss_before_kb as i64) * 1024;
        Ok(IdleReport {
            idle_connections: k,
            idle_setup_s: round1(self.setup_s),
            rss_before_kb: self.rss_before_kb,
            rss_after_kb: self.rss_after_kb,
            rss_per_idle_connection_bytes: grown_bytes / k.max(1) as i64,
            idle_disconnects: disconnects,
        })
    }
}

/// One idle connection: connect, subscribe to its own `user:` channel, report ready, then read
/// (answering the engine's pings) until `stop`. Returns why the socket ended early, if it did.
async fn idle_connection(
    user: String,
    ws_url: String,
    slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Option<String> {
    // Boxed, in a statement of its own: the setup future (connect, upgrade, subscribe) is large,
    // and inline (or held in a named local) it would stay in the task for its whole life.
    let channel = format!("user:{user}");
    let setup = Box::pin(open_reported(
        &user,
        open_ws_stream(&ws_url, Some(&channel), IDLE_READ_BUFFER, IDLE_READ_BUFFER),
        &slots,
        ready,
        &stop,
    ));
    let mut ws = match setup.await? {
        Ok((ws, _)) => ws,
        Err(e) => return Some(e),
    };
    ws_receive(&mut ws, &stop, |_| {}).await
}

// ---------------------------------------------------------------------------------------------------
// Publish phase

/// Subscribers' setup, the publish phase and its figures.
async fn load_phase(
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

/// Sends a setup call to the engine's API; its body, or an error naming the call, its status and body.
async fn api_call(req: reqwest::RequestBuilder, method: &str, url: &str) -> anyhow::Result<String> {
    let r = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{method} {url} answered {status}: {body}");
    }
    Ok(body)
}

/// The channel's last seq, from its history (one event read at most).
async fn channel_seq(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    channel: &str,
) -> anyhow::Result<u64> {
    let url = format!("{base}/api/v1/channels/{channel}/history?since=0&limit=1");
    let body = api_call(http.get(&url).bearer_auth(api_key), "GET", &url).await?;
    let v: Value =
        serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON: {body}"))?;
    Ok(v["seq"].as_u64().unwrap_or(0))
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
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = find_byte(&hay[from..], first) {
        let at = from + i;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Position of the first `byte` in `hay`, 8 bytes a step (std has no public `memchr`, and a plain
/// `position` goes a byte a step): SSE lines and frame keys are found with it.
fn find_byte(hay: &[u8], byte: u8) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = u64::from_ne_bytes([byte; 8]);
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ pattern;
        // A high bit for each zero byte of `x` (the lowest one is exact; bits above it may be
        // false, which does not matter as only the lowest is used).
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(at + zero.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == byte)
        .map(|i| at + i)
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

fn close_reason(c: Option<tokio_tungstenite::tungstenite::protocol::frame::CloseFrame>) -> String {
    match c {
        Some(c) => format!("closed by the server: {} {}", u16::from(c.code), c.reason),
        None => "closed by the server".into(),
    }
}

/// One WebSocket subscriber: connect, subscribe, report ready, then count deliveries until `stop`.
async fn ws_subscriber(
    index: usize,
    ws_url: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::new();
    let open = open_ws_stream(
        &ws_url,
        Some(&shared.channel),
        SUB_READ_BUFFER,
        SUB_READ_BUFFER_MAX,
    );
    let Some((mut ws, base)) = set_up(index, open, &connect_slots, ready, &stop, &mut tally).await
    else {
        return tally;
    };
    tally.base = base;
    let progress = &shared.progress[index].0;
    let closed = ws_receive(&mut ws, &stop, |frame| {
        tally.on_frame(frame, &shared);
        progress.store(tally.frames, Ordering::Relaxed);
    })
    .await;
    tally.closed = closed;
    tally
}

/// Opens subscriber `index`'s connection with `open` (see [`open_reported`]); `None` when stopped, or
/// refused (the reason is in `tally.closed`).
async fn set_up<T>(
    index: usize,
    open: impl Future<Output = Result<T, String>>,
    connect_slots: &Semaphore,
    ready: mpsc::Sender<Result<(), String>>,
    stop: &CancellationToken,
    tally: &mut Tally,
) -> Option<T> {
    let who = format!("subscriber lg-{index}");
    match open_reported(&who, open, connect_slots, ready, stop).await? {
        Ok(conn) => Some(conn),
        Err(e) => {
            tally.closed = Some(e);
            None
        }
    }
}

/// Opens a connection with `open`, holding one of `connect_slots` meanwhile, and reports the outcome
/// on `ready` (a refusal prefixed with `who`); `None` when stopped first.
async fn open_reported<T>(
    who: &str,
    open: impl Future<Output = Result<T, String>>,
    connect_slots: &Semaphore,
    ready: mpsc::Sender<Result<(), String>>,
    stop: &CancellationToken,
) -> Option<Result<T, String>> {
    let setup = Box::pin(async {
        let _slot = connect_slots
            .acquire()
            .await
            .map_err(|_| "setup cancelled".to_string())?;
        open.await
    });
    let opened = tokio::select! {
        r = setup => r,
        _ = stop.cancelled() => return None,
    };
    let report = match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{who}: {e}")),
    };
    let _ = ready.send(report).await;
    Some(opened)
}

/// One SSE subscriber: open the stream, report ready, wait for the channel's seq at subscribe time,
/// then count deliveries until `stop`.
async fn sse_subscriber(
    index: usize,
    url: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
    mut base: watch::Receiver<Option<u64>>,
) -> Tally {
    let mut tally = Tally::new();
    let Some(mut sse) = set_up(
        index,
        open_sse(&url),
        &connect_slots,
        ready,
        &stop,
        &mut tally,
    )
    .await
    else {
        return tally;
    };
    // Nothing is published before the base is known, so the stream can wait in the socket.
    tally.base = tokio::select! {
        b = base.wait_for(Option::is_some) => match b {
            Ok(b) => (*b).unwrap_or(0),
            Err(_) => return tally,
        },
        _ = stop.cancelled() => return tally,
    };
    sse_receive(
        &mut sse,
        &mut tally,
        &shared,
        &shared.progress[index].0,
        &stop,
    )
    .await;
    tally
}

/// Reads `sse`'s events into `tally` until the body ends, the connection fails or `stop`; sets
/// `tally.closed` unless stopped.
async fn sse_receive(
    sse: &mut SseStream,
    tally: &mut Tally,
    shared: &Shared,
    progress: &AtomicU64,
    stop: &CancellationToken,
) {
    let mut lines = SseLines::default();
    let mut disconnect = None;
    // One waiter for the whole loop: `cancelled()` registers with the token (a lock) when first polled.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // The buffer holds whatever the last read (or the response head's read) brought; the body
        // decoder and the line splitter keep their partial state, so it is always consumed whole.
        if !sse.buf.is_empty() {
            let mut fits = true;
            let body = sse.body.decode(&sse.buf, |payload| {
                if fits {
                    fits = lines.feed(payload, |line| {
                        on_sse_line(line, tally, shared, &mut disconnect);
                    });
                }
            });
            let full = sse.buf.len() == sse.buf.capacity();
            sse.buf.clear();
            if full && sse.buf.capacity() < SUB_READ_BUFFER_MAX {
                sse.buf.reserve(2 * sse.buf.capacity());
            }
            progress.store(tally.frames, Ordering::Relaxed);
            if !fits {
                tally.closed = Some(format!("an SSE line longer than {SSE_MAX_LINE} bytes"));
                return;
            }
            match body {
                Ok(false) => {}
                Ok(true) => {
                    tally.closed = Some(closed_by_server(disconnect, "stream ended"));
                    return;
                }
                Err(e) => {
                    tally.closed = Some(format!("stream error: {e}"));
                    return;
                }
            }
        }
        tokio::select! {
            biased;
            r = sse.tcp.read_buf(&mut sse.buf) => match r {
                Ok(0) => {
                    tally.closed = Some(if sse.body.ends_at_eof() {
                        closed_by_server(disconnect, "stream ended")
                    } else {
                        closed_by_server(
                            disconnect,
                            "stream error: the connection closed before the body's end",
                        )
                    });
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tally.closed = Some(format!("stream error: {e}"));
                    return;
                }
            },
            _ = &mut stopped => return,
        }
    }
}

/// `closed by the server: {disconnect frame}` when the engine sent one, else `otherwise`.
fn closed_by_server(disconnect: Option<String>, otherwise: &str) -> String {
    match disconnect {
        Some(d) => format!("closed by the server: {d}"),
        None => otherwise.into(),
    }
}

/// One SSE line: a `data:` line is an event frame (or the engine's last word, a `disconnect`);
/// `id:`, `event:`, `retry:`, comments and blank lines are skipped.
fn on_sse_line(line: &[u8], tally: &mut Tally, shared: &Shared, disconnect: &mut Option<String>) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data.starts_with(DISCONNECT_HEAD) {
        *disconnect = Some(String::from_utf8_lossy(data).into_owned());
    } else {
        tally.on_frame(data, shared);
    }
}

/// An open `/sse` stream on its own TCP connection (no HTTP client library: one task per subscriber
/// reads the socket and parses everything in place).
struct SseStream {
    tcp: TcpStream,
    /// The read buffer ([`SUB_READ_BUFFER`] bytes of capacity, up to [`SUB_READ_BUFFER_MAX`];
    /// emptied after every read). Between [`open_sse`] and the first read it holds the body bytes
    /// that came with the response head.
    buf: Vec<u8>,
    /// The body's framing.
    body: BodyDecoder,
}

/// `GET /sse…` over a new TCP connection, written by hand; the stream once the engine answered 200
/// (it subscribes before answering).
async fn open_sse(url: &str) -> Result<SseStream, String> {
    let (authority, target) = split_url(url, "http")?;
    let mut tcp = connect_tcp(authority, "SSE").await?;
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending GET /sse: {e}"))?;
    let mut buf = Vec::with_capacity(SUB_READ_BUFFER);
    let mut head = read_head(&mut tcp, &mut buf, "GET /sse").await?;
    if head.status != 200 {
        return Err(refusal("GET /sse", &mut head, &mut tcp, &mut buf).await);
    }
    Ok(SseStream {
        tcp,
        buf,
        body: head.body,
    })
}

/// A TCP connection to `authority` (port 80 if it has none) within [`CONNECT_TIMEOUT`]; `what`
/// (`SSE`, `WebSocket`) names it in errors.
async fn connect_tcp(authority: &str, what: &str) -> Result<TcpStream, String> {
    let connect =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(connect_addr(authority)));
    match connect.await {
        Err(_) => Err(format!(
            "{what} connect to {authority} timed out after {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => {
            let hint = match e.raw_os_error() {
                Some(24) => " (too many open files: raise `ulimit -n`)",
                Some(99) => " (out of local ports)",
                _ => "",
            };
            Err(format!("{what} connect to {authority} failed: {e}{hint}"))
        }
        Ok(Ok(tcp)) => Ok(tcp),
    }
}

/// Reads the response head to the request `what` (e.g. `GET /sse`) into `buf` and parses it; what
/// came after the head (the first body or frame bytes) stays in `buf`.
async fn read_head(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<ResponseHead, String> {
    let head_len = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(end) = head_end(buf) {
                return Ok(end);
            }
            if buf.len() >= HEAD_MAX {
                return Err(format!(
                    "{what}: the response head is larger than {HEAD_MAX} bytes"
                ));
            }
            match tcp.read_buf(buf).await {
                Ok(0) => {
                    return Err(format!(
                        "{what}: the server closed the connection before the response head's end \
                         (got {:?})",
                        String::from_utf8_lossy(buf)
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{what}: reading the response: {e}")),
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "{what}: no response head within {} s",
            HEAD_TIMEOUT.as_secs()
        )
    })??;
    let head = parse_head(&buf[..head_len]).map_err(|e| format!("{what}: {e}"))?;
    buf.drain(..head_len);
    Ok(head)
}

/// The error for a refused request `what`: the status, the start of the body (see [`error_body`])
/// and, for a 401, a hint.
async fn refusal(
    what: &str,
    head: &mut ResponseHead,
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> String {
    let body = error_body(tcp, buf, &mut head.body).await;
    let hint = if head.status == 401 {
        " (is --secret the engine's HERALD_JWT_SECRET?)"
    } else {
        ""
    };
    format!("{what} answered {}: {body}{hint}", head.status_text)
}

/// The start of an error response's body (at most [`ERROR_BODY_MAX`] bytes, lossy UTF-8, trimmed),
/// framed by `body`, from what `buf` holds and then `tcp`: whatever arrives until the body ends, the
/// connection closes or a read waits 2 s.
async fn error_body(tcp: &mut TcpStream, buf: &mut Vec<u8>, body: &mut BodyDecoder) -> String {
    let mut out = Vec::new();
    loop {
        let ended = body
            .decode(buf, |data| {
                let room = ERROR_BODY_MAX.saturating_sub(out.len());
                out.extend_from_slice(&data[..data.len().min(room)]);
            })
            .unwrap_or(true);
        buf.clear();
        if ended || out.len() >= ERROR_BODY_MAX {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), tcp.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    let mut text = String::from_utf8_lossy(&out).trim().to_string();
    if out.len() >= ERROR_BODY_MAX {
        text.push('…');
    }
    text
}

/// `(authority, target)` of `{scheme}://authority[/path…]` (`http` or `ws`): what to connect to (and
/// send as `Host`), and the request target (at least `/`). No TLS: `https://` and `wss://` are
/// refused.
fn split_url<'a>(url: &'a str, scheme: &str) -> Result<(&'a str, &'a str), String> {
    let after_scheme = url.strip_prefix(scheme);
    let rest = after_scheme
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| {
            if after_scheme.is_some_and(|r| r.starts_with("s://")) {
                format!("{url}: {scheme}s:// (TLS) is not supported, only {scheme}://")
            } else {
                format!("{url}: not a {scheme}:// URL")
            }
        })?;
    let (authority, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((authority, target))
}

/// `authority` with port 80 added when it has none (`host`, `[v6]`).
fn connect_addr(authority: &str) -> String {
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// The length of the response head (status line, headers, the empty line) at the start of `buf`,
/// once it is all there. Lines end with `\r\n` (a bare `\n` is accepted).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = find_byte(&buf[from..], b'\n') {
        let next = from + i + 1;
        match &buf[next..] {
            [b'\n', ..] => return Some(next + 1),
            [b'\r', b'\n', ..] => return Some(next + 2),
            _ => from = next,
        }
    }
    None
}

/// What the loadgen needs from a response head.
struct ResponseHead {
    status: u16,
    /// The status line after the version, e.g. `401 Unauthorized`.
    status_text: String,
    /// How the body is framed: the last `Transfer-Encoding` coding `chunked`, else
    /// `Content-Length`, else up to the connection's end (RFC 9112 §6.3; another transfer coding
    /// also reads to the end, undecoded).
    body: BodyDecoder,
    /// `Upgrade` (a WebSocket upgrade's answer has `websocket`).
    upgrade: Option<String>,
    /// `Sec-WebSocket-Accept`.
    ws_accept: Option<String>,
}

fn parse_head(head: &[u8]) -> Result<ResponseHead, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let (version, status_text) = status_line.split_once(' ').unwrap_or((status_line, ""));
    let status = status_text
        .get(..3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let (mut chunked, mut other_coding, mut length) = (false, false, None);
    let (mut upgrade, mut ws_accept) = (None, None);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // Codings apply in order: only a `chunked` last frames the body.
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            chunked = last.eq_ignore_ascii_case("chunked");
            other_coding = !chunked;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            ws_accept = Some(value.to_string());
        }
    }
    let body = match (chunked, other_coding, length) {
        (true, _, _) => BodyDecoder::Chunked(ChunkState::default()),
        (false, true, _) | (false, false, None) => BodyDecoder::UntilClose,
        (false, false, Some(n)) => BodyDecoder::Length(n),
    };
    Ok(ResponseHead {
        status,
        status_text: status_text.to_string(),
        body,
        upgrade,
        ws_accept,
    })
}

/// An HTTP/1.1 response body's framing, decoded incrementally: the payload bytes of each read are
/// handed out in place (a chunk cut by a read boundary is handed out in pieces), so nothing is
/// copied and no read's bytes need keeping.
enum BodyDecoder {
    /// `Transfer-Encoding: chunked`, in this state.
    Chunked(ChunkState),
    /// `Content-Length`: bytes left.
    Length(u64),
    /// Everything up to the connection's end.
    UntilClose,
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk-size line's start (a hex digit must come).
    #[default]
    Size,
    /// In a chunk-size line's hex digits: the value so far and how many digits.
    SizeDigits {
        size: u64,
        digits: u8,
    },
    /// After the size: whitespace and chunk extensions (`;name=value`, ignored) to the line's end.
    Ext {
        size: u64,
    },
    /// The size line's `\r` came; its `\n` must follow.
    SizeLf {
        size: u64,
    },
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its `\r\n`.
    DataCr,
    DataLf,
    /// After the last (0-size) chunk: trailer lines, up to an empty line. `empty`: nothing but
    /// `\r` on the current line so far.
    Trailer {
        empty: bool,
    },
    /// The body ended.
    Done,
}

/// Longest chunk-size (hex digits): 15 keep it below 2^60, far beyond any real chunk.
const CHUNK_SIZE_DIGITS: u8 = 15;

impl BodyDecoder {
    /// Passes the payload bytes in `input` to `on_data` (in order, possibly in several pieces);
    /// true once the body ended (bytes after its end are ignored), an error when the framing is
    /// broken.
    fn decode(&mut self, input: &[u8], mut on_data: impl FnMut(&[u8])) -> Result<bool, String> {
        match self {
            BodyDecoder::UntilClose => {
                on_data(input);
                Ok(false)
            }
            BodyDecoder::Length(left) => {
                let take = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                on_data(&input[..take]);
                *left -= take as u64;
                Ok(*left == 0)
            }
            BodyDecoder::Chunked(state) => state.decode(input, on_data),
        }
    }

    /// Whether the connection's end is the body's end (rather than a cut).
    fn ends_at_eof(&self) -> bool {
        matches!(
            self,
            BodyDecoder::UntilClose
                | BodyDecoder::Length(0)
                | BodyDecoder::Chunked(ChunkState::Done)
        )
    }
}

impl ChunkState {
    /// [`BodyDecoder::decode`] of a chunked body. The framing (size lines, CRLFs, trailers) goes
    /// a byte at a time, a chunk's data in one piece per read.
    fn decode(&mut self, input: &[u8], mut on_data: impl FnMut(&[u8])) -> Result<bool, String> {
        let mut i = 0;
        while i < input.len() {
            if let ChunkState::Data(left) = *self {
                let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                on_data(&input[i..i + take]);
                i += take;
                *self = match left - take as u64 {
                    0 => ChunkState::DataCr,
                    left => ChunkState::Data(left),
                };
                continue;
            }
            let b = input[i];
            i += 1;
            *self = match (&*self, b) {
                (ChunkState::Done, _) => return Ok(true),
                (ChunkState::Size, _) => match hex_digit(b) {
                    Some(d) => ChunkState::SizeDigits {
                        size: u64::from(d),
                        digits: 1,
                    },
                    None => return Err(format!("chunk size expected, got byte {b:#04x}")),
                },
                (&ChunkState::SizeDigits { size, digits }, _) => match (hex_digit(b), b) {
                    (Some(_), _) if digits == CHUNK_SIZE_DIGITS => {
                        return Err(format!(
                            "a chunk size of more than {CHUNK_SIZE_DIGITS} hex digits"
                        ));
                    }
                    (Some(d), _) => ChunkState::SizeDigits {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    (None, b';' | b' ' | b'\t') => ChunkState::Ext { size },
                    (None, b'\r') => ChunkState::SizeLf { size },
                    (None, b'\n') => ChunkState::after_size(size),
                    (None, _) => {
                        return Err(format!("bad byte {b:#04x} in a chunk size line"));
                    }
                },
                (&ChunkState::Ext { size }, b'\n') => ChunkState::after_size(size),
                (&ChunkState::Ext { size }, _) => ChunkState::Ext { size },
                (&ChunkState::SizeLf { size }, b'\n') => ChunkState::after_size(size),
                (ChunkState::SizeLf { .. }, _) => {
                    return Err(format!("chunk size line: \\r then byte {b:#04x}"));
                }
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataCr | ChunkState::DataLf, b'\n') => ChunkState::Size,
                (ChunkState::DataCr | ChunkState::DataLf, _) => {
                    return Err(format!(
                        "chunk data not followed by \\r\\n (byte {b:#04x}): the size was wrong"
                    ));
                }
                (&ChunkState::Trailer { empty }, b'\n') => {
                    if empty {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailer { empty: true }
                    }
                }
                (&ChunkState::Trailer { empty }, b'\r') => ChunkState::Trailer { empty },
                (ChunkState::Trailer { .. }, _) => ChunkState::Trailer { empty: false },
                (ChunkState::Data(_), _) => unreachable!("handled above"),
            };
        }
        Ok(*self == ChunkState::Done)
    }

    /// The state after a chunk-size line: the last chunk (0) starts the trailers.
    fn after_size(size: u64) -> ChunkState {
        if size == 0 {
            ChunkState::Trailer { empty: true }
        } else {
            ChunkState::Data(size)
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an SSE byte stream into lines. Complete lines inside a chunk are handed out in place; only
/// a line cut by a chunk boundary is copied (into `carry`).
#[derive(Default)]
struct SseLines {
    carry: Vec<u8>,
}

impl SseLines {
    /// Calls `on_line` for every line `chunk` completes (without its `\n` or `\r\n`); false when a
    /// line grew past [`SSE_MAX_LINE`].
    fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) -> bool {
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match find_byte(rest, b'\n') {
                Some(i) => {
                    self.carry.extend_from_slice(&rest[..i]);
                    on_line(trim_cr(&self.carry));
                    self.carry.clear();
                    rest = &rest[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return self.carry.len() <= SSE_MAX_LINE;
                }
            }
        }
        while let Some(i) = find_byte(rest, b'\n') {
            on_line(trim_cr(&rest[..i]));
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
        self.carry.len() <= SSE_MAX_LINE
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

// ---------------------------------------------------------------------------------------------------
// WebSocket client (subscribers, idle connections)

/// An open WebSocket on its own TCP connection, read without a WebSocket library: the frames of
/// each read are parsed in place in one buffer, and a text frame's payload is handed out as a slice
/// of it (no copy, no allocation, no UTF-8 check).
struct WsStream {
    tcp: TcpStream,
    /// Bytes read and not parsed yet: between reads, part of one frame at most (kept at the start).
    /// Reads go into its spare capacity.
    buf: Vec<u8>,
    /// The capacity `buf` doubles up to while reads fill it; it grows past this only for a frame
    /// larger than itself, and shrinks back once that frame is read.
    buf_max: usize,
    /// Whether the last read filled `buf`.
    filled: bool,
    frames: WsFrames,
}

/// Connects to `url` (`ws://` only) and upgrades to a WebSocket, written by hand; waits for
/// `connected`, and subscribes to `channel` when given. Returns the stream and the channel's seq from
/// the subscribe reply (0 without a subscribe). The read buffer starts at `read_buffer` bytes and
/// doubles up to `read_buffer_max` while reads fill it.
async fn open_ws_stream(
    url: &str,
    channel: Option<&str>,
    read_buffer: usize,
    read_buffer_max: usize,
) -> Result<(WsStream, u64), String> {
    let (authority, target) = split_url(url, "ws")?;
    let what = format!("GET {}", target.split('?').next().unwrap_or(target));
    let mut tcp = connect_tcp(authority, "WebSocket").await?;
    // The subscribe and the pongs go out at once (as tungstenite's `disable_nagle` did).
    let _ = tcp.set_nodelay(true);
    let key = generate_key();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    match tokio::time::timeout(WS_WRITE_TIMEOUT, tcp.write_all(request.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("sending {what}: {e}")),
        Err(_) => return Err(format!("sending {what}: timed out")),
    }
    let mut buf = Vec::with_capacity(read_buffer);
    let mut head = read_head(&mut tcp, &mut buf, &what).await?;
    if head.status != 101 {
        return Err(refusal(&what, &mut head, &mut tcp, &mut buf).await);
    }
    if !head
        .upgrade
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return Err(format!(
            "{what} answered {} without `Upgrade: websocket` (got {:?})",
            head.status_text, head.upgrade
        ));
    }
    let accept = derive_accept_key(key.as_bytes());
    if head.ws_accept.as_deref() != Some(&accept) {
        return Err(format!(
            "{what}: wrong Sec-WebSocket-Accept {:?} (expected {accept:?})",
            head.ws_accept
        ));
    }
    // `buf` keeps the bytes that came with the head: the first frames.
    let mut ws = WsStream {
        tcp,
        buf,
        buf_max: read_buffer_max,
        filled: false,
        frames: WsFrames::new(None),
    };
    let first = ws.next_json().await?;
    if first["type"] != "connected" {
        return Err(format!("expected `connected`, got {first}"));
    }
    let Some(channel) = channel else {
        return Ok((ws, 0));
    };
    let sub = json!({"op": "subscribe", "channel": channel, "ref": 1});
    ws.send_text(&sub.to_string())
        .await
        .map_err(|e| format!("sending subscribe: {e}"))?;
    loop {
        let v = ws.next_json().await?;
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

impl WsStream {
    /// One read into `buf`'s spare capacity. Before it, `buf` doubles when a frame fills all of it,
    /// or when the last read filled it and it is below `buf_max`.
    async fn fill(&mut self) -> Result<(), String> {
        let cap = self.buf.capacity();
        if self.buf.len() == cap || (self.filled && cap < self.buf_max) {
            self.buf.reserve(2 * cap - self.buf.len());
        }
        match self.tcp.read_buf(&mut self.buf).await {
            Ok(0) => Err("socket ended".into()),
            Ok(_) => {
                self.filled = self.buf.len() == self.buf.capacity();
                Ok(())
            }
            Err(e) => Err(format!("socket error: {e}")),
        }
    }

    /// Drops the first `n` bytes of `buf` (parsed frames), moving what is left (part of a frame) to
    /// its start; a buffer grown past `buf_max` for a large frame shrinks back once empty.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        if self.buf.is_empty() && self.buf.capacity() > self.buf_max {
            self.buf = Vec::with_capacity(self.buf_max);
        }
    }

    /// Writes the frames queued in `frames.out` (pongs, a close reply, a setup frame), if any.
    async fn send_queued(&mut self) -> Result<(), String> {
        if self.frames.out.is_empty() {
            return Ok(());
        }
        let written =
            tokio::time::timeout(WS_WRITE_TIMEOUT, self.tcp.write_all(&self.frames.out)).await;
        self.frames.out.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("socket error: {e}")),
            Err(_) => Err(format!(
                "socket error: the engine took no frame for {} s",
                WS_WRITE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends `text` as one masked text frame (setup only).
    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.frames.queue(OP_TEXT, text.as_bytes());
        self.send_queued().await
    }

    /// The next text message, parsed as JSON (setup only: this allocates), each within
    /// [`SETUP_FRAME_TIMEOUT`]; pings on the way are answered.
    async fn next_json(&mut self) -> Result<Value, String> {
        let next = async {
            loop {
                let Some((len, text)) = self.frames.next(&self.buf)? else {
                    self.fill().await?;
                    continue;
                };
                let json = text.map(|t| {
                    serde_json::from_slice(t).map_err(|e| {
                        format!("unreadable frame ({e}): {}", String::from_utf8_lossy(t))
                    })
                });
                self.consume(len);
                self.send_queued().await?;
                if let Some(json) = json {
                    return json;
                }
            }
        };
        tokio::time::timeout(SETUP_FRAME_TIMEOUT, next)
            .await
            .map_err(|_| {
                format!(
                    "no frame from the server within {} s",
                    SETUP_FRAME_TIMEOUT.as_secs()
                )
            })?
    }

    /// Sends a close frame (no status), best effort: 1 s at most.
    async fn close(&mut self) {
        self.frames.out.clear();
        self.frames.queue(OP_CLOSE, &[]);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tcp.write_all(&self.frames.out))
            .await;
        self.frames.out.clear();
    }
}

/// Reads `ws`'s frames until the server closes it, the connection fails or `stop`, handing each text
/// message to `on_text` (in place: a slice of the read buffer) and answering pings. Returns why the
/// socket ended; `None` when stopped (after sending a close frame, best effort).
async fn ws_receive(
    ws: &mut WsStream,
    stop: &CancellationToken,
    mut on_text: impl FnMut(&[u8]),
) -> Option<String> {
    // One waiter for the whole loop: `cancelled()` registers with the token (a lock) when first polled.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // The buffer holds what the last read brought after the partial frame the one before left
        // (at first: whatever came with the subscribe reply). Every complete frame is handled, then
        // the rest moves to the buffer's start.
        if !ws.buf.is_empty() {
            let parsed = ws.frames.parse(&ws.buf, &mut on_text);
            let sent = ws.send_queued().await;
            match parsed {
                Ok(n) => ws.consume(n),
                Err(reason) => return Some(reason),
            }
            if let Err(e) = sent {
                return Some(e);
            }
        }
        tokio::select! {
            biased;
            r = ws.fill() => if let Err(e) = r {
                return Some(e);
            },
            _ = &mut stopped => break,
        }
    }
    ws.close().await;
    None
}

/// WebSocket opcodes (RFC 6455 §5.2).
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// The frame layer of a client WebSocket (RFC 6455 §5): parses the server's frames in place, and
/// queues the frames to send back (pongs, the close reply) in `out`.
struct WsFrames {
    /// The masking key of every frame sent, in tests; `None`: a fresh random key for each frame
    /// (RFC 6455 §5.3). Frames sent are few (the subscribe, pongs, the close).
    fixed_mask: Option<[u8; 4]>,
    /// Whether the fragmented message in progress is text (`Some(false)`: binary); `None` outside
    /// one.
    fragmented: Option<bool>,
    /// The fragmented text message so far (rare: the engine sends each message in one frame).
    fragments: Vec<u8>,
    /// Masked frames to send.
    out: Vec<u8>,
}

impl WsFrames {
    fn new(fixed_mask: Option<[u8; 4]>) -> WsFrames {
        WsFrames {
            fixed_mask,
            fragmented: None,
            fragments: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Queues a frame to send in `out`, masked with a fresh key (or the fixed one).
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.fixed_mask.unwrap_or_else(rand::random);
        masked_frame(&mut self.out, opcode, payload, mask);
    }

    /// Hands the text messages of the complete frames at the start of `buf` to `on_text`; returns
    /// how many bytes they took (the rest is part of a frame), or why the connection ends (a close
    /// frame, a protocol error).
    fn parse(&mut self, buf: &[u8], mut on_text: impl FnMut(&[u8])) -> Result<usize, String> {
        let mut at = 0;
        while let Some((len, text)) = self.next(&buf[at..])? {
            if let Some(text) = text {
                on_text(text);
            }
            at += len;
        }
        Ok(at)
    }

    /// The frame at the start of `buf`: its length and the text message it completes (`None` for a
    /// fragment, a binary message or a control frame), or `Ok(None)` when only part of it is there.
    /// A ping queues its pong. A close frame queues the reply and ends with `Err(closed by the
    /// server: CODE REASON)`; a protocol error ends with `Err` too.
    fn next<'a>(&'a mut self, buf: &'a [u8]) -> Result<Option<WsFrame<'a>>, String> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(protocol_error(
                "reserved bits set (no extension was agreed)",
            ));
        }
        if b1 & 0x80 != 0 {
            return Err(protocol_error("a masked frame from the server"));
        }
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        let (header, len) = match b1 & 0x7f {
            126 => match buf.get(2..4) {
                Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
                None => return Ok(None),
            },
            n => (2, u64::from(n)),
        };
        if len > WS_MAX_MESSAGE as u64 {
            return Err(protocol_error(format_args!(
                "a frame of {len} bytes (at most {WS_MAX_MESSAGE} accepted)"
            )));
        }
        let end = header + len as usize;
        let Some(payload) = buf.get(header..end) else {
            return Ok(None);
        };
        let text = match opcode {
            // The hot path: a whole text message in one frame.
            OP_TEXT if fin && self.fragmented.is_none() => Some(payload),
            OP_TEXT | OP_BINARY if self.fragmented.is_some() => {
                return Err(protocol_error("a new message inside a fragmented one"));
            }
            OP_BINARY if fin => None,
            OP_TEXT | OP_BINARY => {
                self.fragmented = Some(opcode == OP_TEXT);
                self.fragments.clear();
                if opcode == OP_TEXT {
                    self.add_fragment(payload)?;
                }
                None
            }
            OP_CONTINUATION => {
                let Some(is_text) = self.fragmented else {
                    return Err(protocol_error("a continuation frame outside a message"));
                };
                if is_text {
                    self.add_fragment(payload)?;
                }
                if fin {
                    self.fragmented = None;
                }
                (fin && is_text).then_some(&self.fragments[..])
            }
            OP_CLOSE | OP_PING | OP_PONG if !fin || len > 125 => {
                return Err(protocol_error("a fragmented or oversized control frame"));
            }
            OP_PING => {
                self.queue(OP_PONG, payload);
                None
            }
            OP_PONG => None,
            OP_CLOSE => return Err(self.on_close(payload)),
            _ => return Err(protocol_error(format_args!("unknown opcode {opcode:#x}"))),
        };
        Ok(Some((end, text)))
    }

    fn add_fragment(&mut self, payload: &[u8]) -> Result<(), String> {
        if self.fragments.len() + payload.len() > WS_MAX_MESSAGE {
            return Err(protocol_error(format_args!(
                "a fragmented message of more than {WS_MAX_MESSAGE} bytes"
            )));
        }
        self.fragments.extend_from_slice(payload);
        Ok(())
    }

    /// A close frame: queues the reply (echoing the status code, RFC 6455 §5.5.1) and returns why
    /// the connection ends.
    fn on_close(&mut self, payload: &[u8]) -> String {
        match *payload {
            [] => {
                self.queue(OP_CLOSE, &[]);
                "closed by the server".into()
            }
            [_] => protocol_error("a close frame with a 1-byte payload"),
            [c0, c1, ref reason @ ..] => {
                self.queue(OP_CLOSE, &[c0, c1]);
                format!(
                    "closed by the server: {} {}",
                    u16::from_be_bytes([c0, c1]),
                    String::from_utf8_lossy(reason)
                )
            }
        }
    }
}

/// A complete frame at the start of the buffer: its length, and the text message it completes.
type WsFrame<'a> = (usize, Option<&'a [u8]>);

fn protocol_error(detail: impl Display) -> String {
    format!("WebSocket protocol error: {detail}")
}

/// Appends a client frame (FIN set, one frame per message) of `opcode` with `payload` masked by
/// `mask` to `out`.
fn masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

// ---------------------------------------------------------------------------------------------------
// Publisher

/// A publisher's socket, through tungstenite (its frames are one request and one reply per publish,
/// not per delivery): connects and waits for `connected`.
async fn open_publisher_ws(url: &str) -> Result<Ws, String> {
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
enum Route {
    /// `POST {url}` with the API key.
    Http {
        http: reqwest::Client,
        url: String,
        api_key: String,
    },
    /// The `publish` op, round-robin over these sockets.
    Ws(Vec<Ws>),
}

struct PublishPlan {
    room: String,
    /// Event type.
    event: String,
    /// `room:{room}`.
    channel: String,
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
    /// Successful publishes, warmup included (each one is a delivery to every subscriber).
    ok_total: u64,
    /// Failed publishes (warmup included).
    errors: u64,
    /// Publish round trips, µs.
    round_trip: Histogram<u64>,
    /// Redis commands in the measured window, when probed.
    redis_commands: Option<u64>,
    /// How late the latest tick fired, µs.
    schedule_lag_max_us: u64,
    /// CPU times when the first measured publish was due: the start of the CPU window.
    window_start: Option<CpuSample>,
    /// From the first measured tick until every publish was answered, seconds: longer than
    /// `--duration` when the engine or the loadgen could not keep up.
    measured_secs: f64,
}

async fn publisher(
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
// /proc

/// CPU time (utime + stime, every thread) of `pid` (a number or `self`), in clock ticks
/// ([`CLK_TCK`] per second).
fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of `pid` (`VmRSS` in /proc/PID/status), kB.
fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The processes whose CPU and memory a run reports.
struct Probes {
    engine: Vec<u32>,
    redis: Option<u32>,
}

/// CPU times at one moment, in ticks; `None` for a process not given (or gone).
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    loadgen: Option<u64>,
    /// Summed over the engine PIDs.
    engine: Option<u64>,
    redis: Option<u64>,
}

impl Probes {
    /// Checks that every PID can be read now.
    fn new(engine: &[u32], redis: Option<u32>) -> anyhow::Result<Probes> {
        for (flag, pid) in engine
            .iter()
            .map(|p| ("--engine-pid", *p))
            .chain(redis.map(|p| ("--redis-pid", p)))
        {
            if proc_cpu_ticks(&pid.to_string()).is_none() {
                bail!(
                    "{flag} {pid}: cannot read /proc/{pid}/stat (no such process on this machine?)"
                );
            }
        }
        Ok(Probes {
            engine: engine.to_vec(),
            redis,
        })
    }

    fn sample(&self) -> CpuSample {
        let engine = if self.engine.is_empty() {
            None
        } else {
            self.engine
                .iter()
                .map(|p| proc_cpu_ticks(&p.to_string()))
                .sum()
        };
        CpuSample {
            at: Instant::now(),
            loadgen: proc_cpu_ticks("self"),
            engine,
            redis: self.redis.and_then(|p| proc_cpu_ticks(&p.to_string())),
        }
    }

    /// The engine's RSS, summed over its PIDs, kB.
    fn engine_rss_kb(&self) -> anyhow::Result<u64> {
        self.engine
            .iter()
            .map(|&p| {
                proc_rss_kb(p)
                    .with_context(|| format!("--engine-pid {p}: cannot read /proc/{p}/status"))
            })
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------------
// Report

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The one JSON line a run prints (fields in this order; the flattened groups' fields in place).
#[derive(Serialize)]
struct Report {
    /// Subscriber transport: `ws` or `sse` (`--transport`); `ws` in an idle-only run (idle
    /// connections are always WebSockets).
    transport: &'static str,
    /// How the publisher published: `http` or `ws` (`--publish-via`); absent in an idle-only run.
    #[serde(skip_serializing_if = "Option::is_none")]
    publish_via: Option<&'static str>,
    /// Number of `--url`s (engine nodes).
    nodes: usize,
    /// `--subscribers`.
    subscribers: usize,
    /// The publish phase's figures; absent in an idle-only run.
    #[serde(flatten)]
    load: Option<LoadReport>,
    /// The idle phase's figures; absent without `--idle`.
    #[serde(flatten)]
    idle: Option<IdleReport>,
}

/// The publish phase's figures.
#[derive(Serialize)]
struct LoadReport {
    /// The room (bare id).
    room: String,
    /// `--payload`: approximate bytes of each event's `data`.
    payload_bytes: usize,
    /// `--duration`: the measured publish phase, seconds.
    duration_s: u64,
    /// `--warmup`: seconds published before measuring.
    warmup_s: u64,
    /// Seconds the subscribers' setup took (memberships, connects, subscribes, publisher sockets).
    setup_s: f64,
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
    loadgen_cpu_percent: Option<f64>,
    /// With `--redis`: growth of Redis `INFO stats` `total_commands_processed` across the measured
    /// publishes, divided by them. It counts **every command Redis ran in that window**, not only the
    /// publish path: commands run inside Lua scripts, presence heartbeats and sweeps, every node's
    /// work, anything else using that Redis (the loadgen's own `INFO` is subtracted).
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_commands_per_publish: Option<f64>,
    /// `--publish-connections` with `--publish-via ws`; 0 with `http`.
    publish_connections: usize,
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
    fn set_cpu(&mut self, start: &CpuSample, end: &CpuSample) {
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
struct IdleReport {
    /// `--idle`: idle WebSockets opened.
    idle_connections: usize,
    /// Seconds until every idle connection had its subscribe reply.
    idle_setup_s: f64,
    /// The engine's RSS (VmRSS, summed over `--engine-pid`) before the idle connections opened, kB.
    rss_before_kb: u64,
    /// The engine's RSS 1 s after every idle connection was subscribed, kB.
    rss_after_kb: u64,
    /// `(rss_after_kb - rss_before_kb) × 1024 / idle_connections`: the engine's memory per idle
    /// connection, bytes (user space only; the kernel's socket buffers are not in RSS).
    rss_per_idle_connection_bytes: i64,
    /// Idle connections whose socket closed before the end of the run.
    idle_disconnects: u64,
}

fn report(args: &Args, published: &Published, tallies: &[Tally], ui: &Ui) -> LoadReport {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_are_split_across_chunk_boundaries() {
        let stream = b"retry: 3000\n\nid: c1\nevent: bench\ndata: {\"a\":1}\n\n: keep-alive\r\n\r\ndata: x\n";
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let mut lines = SseLines::default();
                let mut got = Vec::new();
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    assert!(lines.feed(part, |l| got.push(l.to_vec())));
                }
                let want: Vec<&[u8]> = vec![
                    b"retry: 3000",
                    b"",
                    b"id: c1",
                    b"event: bench",
                    b"data: {\"a\":1}",
                    b"",
                    b": keep-alive",
                    b"",
                    b"data: x",
                ];
                assert_eq!(got, want, "cut at {cut}, {cut2}");
            }
        }
        let mut lines = SseLines::default();
        assert!(!lines.feed(&vec![b'x'; SSE_MAX_LINE + 1], |_| {}));
    }

    /// A chunked body of `chunks` (extension text, data), a last chunk with an extension and a
    /// trailer, and the start of a next response (which is not body).
    fn chunked(chunks: &[(&str, &[u8])]) -> (Vec<u8>, usize) {
        let mut body = Vec::new();
        for (ext, data) in chunks {
            body.extend_from_slice(format!("{:X}{ext}\r\n", data.len()).as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0;last=\"yes\"\r\nX-Trailer: 1\r\n\r\n");
        let end = body.len();
        body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        (body, end)
    }

    /// Decodes `parts` in turn: the payload, and the input offset each part ended at with whether
    /// the body had ended then.
    fn decode_parts(parts: &[&[u8]]) -> (Vec<u8>, Vec<(usize, bool)>) {
        let mut d = BodyDecoder::Chunked(ChunkState::default());
        let mut payload = Vec::new();
        let mut at = 0;
        let mut ends = Vec::new();
        for p in parts {
            let ended = d.decode(p, |b| payload.extend_from_slice(b)).unwrap();
            at += p.len();
            ends.push((at, ended));
        }
        (payload, ends)
    }

    #[test]
    fn chunked_bodies_decode_split_at_every_byte_boundary() {
        let (body, end) = chunked(&[
            ("", b"retry: 3000\n\n"),
            (
                ";name=value;q=\"a;b\"",
                b"id: c1\nevent: bench\ndata: {\"a\":1}\n\n",
            ),
            (" ; x", b"data: 0123456789abcdef\n\n"),
            ("", b"\r\n: keep-alive\r\n\r\n"),
        ]);
        let want = b"retry: 3000\n\nid: c1\nevent: bench\ndata: {\"a\":1}\n\ndata: 0123456789abcdef\n\n\r\n: keep-alive\r\n\r\n";
        for cut in 0..=body.len() {
            for cut2 in cut..=body.len() {
                let parts = [&body[..cut], &body[cut..cut2], &body[cut2..]];
                let (payload, ends) = decode_parts(&parts);
                assert_eq!(payload, want, "cut at {cut}, {cut2}");
                for (at, ended) in ends {
                    assert_eq!(ended, at >= end, "cut at {cut}, {cut2}: part to {at}");
                }
            }
        }
        // A byte at a time: the payload comes a byte at a time too, and nothing is lost.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (payload, ends) = decode_parts(&bytes);
        assert_eq!(payload, want);
        assert_eq!(ends.iter().position(|&(_, e)| e), Some(end - 1));
    }

    #[test]
    fn chunk_extensions_the_last_chunk_and_broken_framing() {
        let decode = |input: &[u8]| {
            let mut d = BodyDecoder::Chunked(ChunkState::default());
            let mut payload = Vec::new();
            d.decode(input, |b| payload.extend_from_slice(b))
                .map(|ended| (String::from_utf8(payload).unwrap(), ended))
        };
        let ok = |input: &[u8], payload: &str, ended: bool| {
            assert_eq!(
                decode(input),
                Ok((payload.to_string(), ended)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        };
        ok(b"5;a=b\r\nhello\r\n0\r\n\r\n", "hello", true);
        ok(b"5 ;a=\"x;y\" ; b\r\nhello\r\n0;c\r\n\r\n", "hello", true);
        ok(b"5\t;a\r\nhello\r\n", "hello", false);
        ok(
            b"A\r\n0123456789\r\na\r\nabcdefghij\r\n",
            "0123456789abcdefghij",
            false,
        );
        ok(b"000000000000005\r\nhello\r\n", "hello", false);
        // The last chunk, its trailers and the empty line end the body; what follows is not body.
        ok(b"0\r\n\r\n", "", true);
        ok(b"000\r\n\r\n", "", true);
        ok(b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n", "", true);
        ok(b"0\r\n\r\n5\r\nhello\r\n", "", true);
        ok(b"0\r\n", "", false);
        ok(b"0\r\nX-A: 1\r\n", "", false);
        // Bare LFs are accepted.
        ok(b"5\nhello\n0\n\n", "hello", true);
        let mut d = BodyDecoder::Chunked(ChunkState::default());
        assert_eq!(d.decode(b"3\r\nabc\r\n0\r\n", |_| {}), Ok(false));
        assert!(!d.ends_at_eof());
        assert_eq!(d.decode(b"\r\n", |_| {}), Ok(true));
        assert!(d.ends_at_eof());
        assert_eq!(d.decode(b"", |_| {}), Ok(true));
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b";a\r\n",
            b"5\r\nhelloX",
            b"5\r\nhello\rX",
            b"5\rX",
            b"1000000000000000\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn identity_bodies_and_response_heads() {
        let mut d = BodyDecoder::Length(5);
        let mut payload = Vec::new();
        assert_eq!(
            d.decode(b"hel", |b| payload.extend_from_slice(b)),
            Ok(false)
        );
        assert!(!d.ends_at_eof());
        assert_eq!(
            d.decode(b"lo, more", |b| payload.extend_from_slice(b)),
            Ok(true)
        );
        assert_eq!(payload, b"hello");
        assert!(d.ends_at_eof());
        let mut d = BodyDecoder::UntilClose;
        assert_eq!(d.decode(b"any\n", |b| assert_eq!(b, b"any\n")), Ok(false));
        assert!(d.ends_at_eof());

        let response = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            Transfer-Encoding: chunked\r\ndate: x\r\n\r\nd\r\nretry: 3000\n\n\r\n";
        let end = head_end(response).unwrap();
        assert_eq!(&response[end..end + 3], b"d\r\n");
        for cut in 0..end {
            assert_eq!(head_end(&response[..cut]), None);
        }
        let head = parse_head(&response[..end]).unwrap();
        assert_eq!((head.status, head.status_text.as_str()), (200, "200 OK"));
        assert!(matches!(head.body, BodyDecoder::Chunked(ChunkState::Size)));
        let head = |text: &str| parse_head(text.as_bytes());
        let h = head("HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(
            (h.status, h.status_text.as_str()),
            (401, "401 Unauthorized")
        );
        assert!(matches!(h.body, BodyDecoder::Length(12)));
        let h = head("HTTP/1.0 200 OK\n\n").unwrap();
        assert!(matches!(h.body, BodyDecoder::UntilClose));
        assert_eq!(head_end(b"HTTP/1.0 200 OK\n\nbody"), Some(17));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, CHUNKED\r\n\r\n").unwrap();
        assert!(matches!(h.body, BodyDecoder::Chunked(_)));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert!(matches!(h.unwrap().body, BodyDecoder::UntilClose));
        assert!(head("SSH-2.0-OpenSSH_9.6\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());

        assert_eq!(
            split_url("http://127.0.0.1:7070/sse?channels=room:r&token=t", "http"),
            Ok(("127.0.0.1:7070", "/sse?channels=room:r&token=t"))
        );
        assert_eq!(split_url("http://h", "http"), Ok(("h", "/")));
        assert_eq!(
            split_url("ws://h:1/ws?token=t", "ws"),
            Ok(("h:1", "/ws?token=t"))
        );
        assert_eq!(
            split_url("wss://h/ws", "ws"),
            Err("wss://h/ws: wss:// (TLS) is not supported, only ws://".into())
        );
        assert_eq!(
            split_url("http://h/ws", "ws"),
            Err("http://h/ws: not a ws:// URL".into())
        );
        assert!(
            split_url("https://h/", "http").is_err() && split_url("http:///x", "http").is_err()
        );
        assert!(split_url("wsx://h/", "ws").is_err());
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             sec-websocket-accept:  s3pPLMBiTxaQ9kYGzzhZRbK+xOo= \r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 101);
        assert_eq!(
            (h.upgrade.as_deref(), h.ws_accept.as_deref()),
            (Some("websocket"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="))
        );
        assert_eq!(connect_addr("127.0.0.1:7070"), "127.0.0.1:7070");
        assert_eq!(connect_addr("localhost"), "localhost:80");
        assert_eq!(connect_addr("[::1]"), "[::1]:80");
        assert_eq!(connect_addr("[::1]:7070"), "[::1]:7070");
    }

    fn test_shared() -> Shared {
        Shared {
            head: b"{\"type\":\"event\",\"channel\":\"room:r\",".to_vec(),
            reset_head: b"{\"type\":\"reset\"".to_vec(),
            channel: "room:r".into(),
            measure_from_us: AtomicU64::new(0),
            progress: Vec::new(),
        }
    }

    /// A one-connection server: reads the request head and hands it to `respond`, which checks it
    /// and returns the answer; writes the answer's parts (each flushed, with a pause between), then
    /// reads until the client closes the connection. Its address, and a task returning what the
    /// client sent after the request head.
    async fn serve_once(
        respond: impl FnOnce(std::net::SocketAddr, &str) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (std::net::SocketAddr, JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let end = loop {
                if let Some(end) = head_end(&request) {
                    break end;
                }
                assert!(tcp.read_buf(&mut request).await.unwrap() > 0);
            };
            let mut sent = request.split_off(end);
            for p in respond(addr, &String::from_utf8_lossy(&request)) {
                // A client that refused the answer may be gone already.
                if tcp.write_all(&p).await.is_err() {
                    break;
                }
                tcp.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Like hyper after a keep-alive response: wait for a next request that never comes.
            while let Ok(n) = tcp.read_buf(&mut sent).await {
                if n == 0 {
                    break;
                }
            }
            sent
        });
        (addr, task)
    }

    /// [`serve_once`] for `GET /sse?channels=room:r&token=tok`: checks the request, answers `parts`.
    async fn fake_engine(parts: Vec<Vec<u8>>) -> (String, JoinHandle<Vec<u8>>) {
        let (addr, task) = serve_once(move |addr, request| {
            let want = format!(
                "GET /sse?channels=room:r&token=tok HTTP/1.1\r\nHost: {addr}\r\n\
                 Accept: text/event-stream\r\n\r\n"
            );
            assert_eq!(request, want);
            parts
        })
        .await;
        (format!("http://{addr}/sse?channels=room:r&token=tok"), task)
    }

    #[tokio::test]
    async fn a_refused_sse_request_shows_the_status_and_the_body() {
        let (url, server) = fake_engine(vec![
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 39\r\n\r\n{\"error\":".to_vec(),
            b"{\"code\":\"unauthorized\",\"m\":1}}".to_vec(),
        ])
        .await;
        let Err(e) = open_sse(&url).await else {
            panic!("a 401 opened a stream")
        };
        assert_eq!(
            e,
            "GET /sse answered 401 Unauthorized: {\"error\":{\"code\":\"unauthorized\",\"m\":1}} \
             (is --secret the engine's HERALD_JWT_SECRET?)"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_sse_stream_ends_at_the_last_chunk_with_the_disconnect_as_reason() {
        let event = |seq: u64| {
            format!(
                "id: c{seq}\nevent: bench\ndata: {{\"type\":\"event\",\"channel\":\"room:r\",\
                 \"seq\":{seq},\"epoch\":\"e\",\"data\":{{\"t\":{},\"pad\":\"x\"}}}}\n\n",
                now_us()
            )
        };
        let chunk = |payload: &str| format!("{:x}\r\n{payload}\r\n", payload.len()).into_bytes();
        let two = format!("{}{}", event(2), event(3));
        let two = chunk(&two);
        let (cut, cut2) = (two.len() / 3, two.len() / 2);
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        head.extend(chunk("retry: 3000\n\n"));
        let (url, server) = fake_engine(vec![
            head,
            chunk(&event(1)),
            two[..cut].to_vec(),
            two[cut..cut2].to_vec(),
            two[cut2..].to_vec(),
            chunk(": keep-alive\n\n"),
            chunk(
                "event: disconnect\ndata: {\"type\":\"disconnect\",\"code\":4008,\
                 \"reason\":\"slow consumer\"}\n\n",
            ),
            b"0\r\n\r\n".to_vec(),
        ])
        .await;
        let mut sse = open_sse(&url).await.unwrap();
        let (shared, progress, stop) = (test_shared(), AtomicU64::new(0), CancellationToken::new());
        let mut tally = Tally::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            sse_receive(&mut sse, &mut tally, &shared, &progress, &stop),
        )
        .await
        .expect("the stream ended at its last chunk, without waiting for the connection's end");
        assert!(tally.has(1) && tally.has(2) && tally.has(3) && !tally.has(4));
        assert_eq!((tally.frames, tally.unreadable), (3, 0));
        assert_eq!(progress.load(Ordering::Relaxed), 3);
        assert_eq!(
            tally.closed.as_deref(),
            Some(
                "closed by the server: {\"type\":\"disconnect\",\"code\":4008,\
                 \"reason\":\"slow consumer\"}"
            )
        );
        drop(sse);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_sse_stream_cut_mid_body_is_an_error_and_stop_ends_it_quietly() {
        // The connection closes in the middle of a chunk.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut kept = None;
            for i in 0..2 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                while head_end(&request).is_none() {
                    assert!(tcp.read_buf(&mut request).await.unwrap() > 0);
                }
                tcp.write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n20\r\ndata: cut",
                )
                .await
                .unwrap();
                // The first connection closes here (dropped); the second stays open.
                if i == 1 {
                    kept = Some(tcp);
                }
            }
            kept.unwrap()
        });
        let url = format!("http://{addr}/sse?channels=room:r&token=tok");
        let (shared, progress) = (test_shared(), AtomicU64::new(0));
        let mut sse = open_sse(&url).await.unwrap();
        let mut tally = Tally::new();
        sse_receive(
            &mut sse,
            &mut tally,
            &shared,
            &progress,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(
            tally.closed.as_deref(),
            Some("stream error: the connection closed before the body's end")
        );
        // Stopped while the engine is quiet: no close reason.
        let mut sse = open_sse(&url).await.unwrap();
        let open = server.await.unwrap();
        let mut tally = Tally::new();
        let stop = CancellationToken::new();
        stop.cancel();
        sse_receive(&mut sse, &mut tally, &shared, &progress, &stop).await;
        assert_eq!((tally.closed, tally.frames), (None, 0));
        drop(open);
    }

    /// A server frame (unmasked) with first byte `b0` (FIN and opcode), its length in the fewest
    /// bytes.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// [`frame`] with a 64-bit length whatever the payload's size.
    fn frame64(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0, 127];
        f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The client frames in `bytes`, each checked to be masked with `mask` (when given): the first
    /// byte and the unmasked payload.
    fn client_frames(bytes: &[u8], mask: Option<[u8; 4]>) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (b0, b1) = (bytes[at], bytes[at + 1]);
            assert!(b1 & 0x80 != 0, "an unmasked client frame: {bytes:?}");
            let (mut h, len) = match b1 & 0x7f {
                126 => (
                    4,
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                ),
                127 => {
                    let n = u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap());
                    (10, n as usize)
                }
                n => (2, usize::from(n)),
            };
            let key = &bytes[at + h..at + h + 4];
            if let Some(mask) = mask {
                assert_eq!(key, mask);
            }
            h += 4;
            let payload = bytes[at + h..at + h + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            frames.push((b0, payload));
            at += h + len;
        }
        frames
    }

    /// Feeds `reads` to a new [`WsFrames`] as successive reads into one buffer, kept and compacted
    /// as [`ws_receive`] does: the text messages, the frames queued to send, and how it ended
    /// (`Ok`: the bytes of a partial frame left).
    fn feed(reads: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>, Result<usize, String>) {
        let mut frames = WsFrames::new(Some([0x0f, 0xa0, 0x55, 0xff]));
        let (mut buf, mut texts) = (Vec::new(), Vec::new());
        for read in reads {
            buf.extend_from_slice(read);
            match frames.parse(&buf, |t| texts.push(t.to_vec())) {
                Ok(n) => drop(buf.drain(..n)),
                Err(e) => return (texts, frames.out, Err(e)),
            }
        }
        (texts, frames.out, Ok(buf.len()))
    }

    #[test]
    fn ws_frames_split_at_every_byte_boundary_are_read_whole() {
        let long16 = vec![b'm'; 300];
        let long64: Vec<u8> = (0..200u8).collect();
        let mut stream = frame(0x81, b"{\"n\":1}");
        for f in [
            frame(0x89, b"p1"),
            frame(0x81, &long16),
            frame(0x82, b"binary, ignored"),
            frame64(0x81, &long64),
            // A fragmented text message with a control frame between its fragments.
            frame(0x01, b"frag-"),
            frame(0x8a, b"pong, ignored"),
            frame(0x00, b"ment-"),
            frame(0x80, b"ed"),
            // A fragmented binary message, ignored.
            frame(0x02, b"b1"),
            frame(0x80, b"b2"),
            frame(0x81, b""),
            frame(0x01, b"again"),
            frame(0x80, b"!"),
            frame(0x81, b"last"),
            frame(0x88, b"\x03\xe8bye"),
        ] {
            stream.extend(f);
        }
        let texts: Vec<Vec<u8>> = vec![
            b"{\"n\":1}".to_vec(),
            long16,
            long64,
            b"frag-ment-ed".to_vec(),
            Vec::new(),
            b"again!".to_vec(),
            b"last".to_vec(),
        ];
        let sent = vec![(0x8a, b"p1".to_vec()), (0x88, b"\x03\xe8".to_vec())];
        let end = Err("closed by the server: 1000 bye".to_string());
        let check = |reads: &[&[u8]], what: &str| {
            let (got, out, ended) = feed(reads);
            assert_eq!(got, texts, "{what}");
            assert_eq!(
                client_frames(&out, Some([0x0f, 0xa0, 0x55, 0xff])),
                sent,
                "{what}"
            );
            assert_eq!(ended, end, "{what}");
        };
        for cut in 0..=stream.len() {
            check(&[&stream[..cut], &stream[cut..]], &format!("cut at {cut}"));
        }
        for size in [1, 2, 3, 7, 64] {
            let reads: Vec<&[u8]> = stream.chunks(size).collect();
            check(&reads, &format!("reads of {size}"));
        }
        // Without the close: the partial frame at the end stays in the buffer.
        let cut = stream.len() - 3;
        let (got, _, ended) = feed(&[&stream[..cut]]);
        assert_eq!((got.len(), ended), (texts.len(), Ok(4)));
    }

    #[test]
    fn ws_control_frames_and_protocol_errors() {
        // A ping's pong is masked (here with a fixed key).
        let mut frames = WsFrames::new(Some([0xa5, 0x5a, 0xff, 0x00]));
        assert_eq!(frames.parse(&frame(0x89, b"hey"), |_| panic!()), Ok(5));
        assert_eq!(
            frames.out,
            [
                0x8a,
                0x83,
                0xa5,
                0x5a,
                0xff,
                0x00,
                b'h' ^ 0xa5,
                b'e' ^ 0x5a,
                b'y' ^ 0xff
            ]
        );
        let mut frames = WsFrames::new(Some([1, 2, 3, 4]));
        assert_eq!(
            frames.parse(&frame(0x88, b""), |_| panic!()),
            Err("closed by the server".into())
        );
        assert_eq!(frames.out, [0x88, 0x80, 1, 2, 3, 4]);
        let mut frames = WsFrames::new(Some([1, 2, 3, 4]));
        assert_eq!(
            frames.parse(&frame(0x88, b"\x0f\xa8slow consumer"), |_| panic!()),
            Err("closed by the server: 4008 slow consumer".into())
        );
        assert_eq!(
            client_frames(&frames.out, Some([1, 2, 3, 4])),
            [(0x88, b"\x0f\xa8".to_vec())]
        );

        let error = |bytes: &[&[u8]]| feed(bytes).2.unwrap_err();
        let masked = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        assert_eq!(
            error(&[&masked]),
            "WebSocket protocol error: a masked frame from the server"
        );
        let mut oversized = vec![0x81, 127];
        oversized.extend_from_slice(&(WS_MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert_eq!(
            error(&[&oversized]),
            "WebSocket protocol error: a frame of 16777217 bytes (at most 16777216 accepted)"
        );
        // The largest frame accepted is merely incomplete; so is a 64-bit length without its payload.
        oversized[9] -= 1;
        assert_eq!(feed(&[&oversized]).2, Ok(10));
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(error(&[&huge]).contains("a frame of 18446744073709551615 bytes"));
        let big = frame64(0x01, &vec![b'x'; WS_MAX_MESSAGE]);
        assert_eq!(
            error(&[&big, &frame(0x80, b"y")]),
            "WebSocket protocol error: a fragmented message of more than 16777216 bytes"
        );
        assert!(error(&[&frame(0x80, b"x")]).contains("a continuation frame outside a message"));
        assert!(
            error(&[&frame(0x01, b"a"), &frame(0x81, b"b")])
                .contains("a new message inside a fragmented one")
        );
        assert!(error(&[&frame(0x09, b"")]).contains("a fragmented or oversized control frame"));
        assert!(error(&[&frame(0x89, &[0; 126])]).contains("oversized control frame"));
        assert!(error(&[&frame(0xc1, b"x")]).contains("reserved bits"));
        assert!(error(&[&frame(0x83, b"x")]).contains("unknown opcode 0x3"));
        assert!(error(&[&frame(0x88, b"\x03")]).contains("a 1-byte payload"));
    }

    /// [`serve_once`] for a WebSocket upgrade of `GET /ws?token=tok`: checks the request, answers
    /// `answer(key)`, the request's `Sec-WebSocket-Key`.
    async fn fake_ws_engine(
        answer: impl FnOnce(&str) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (String, JoinHandle<Vec<u8>>) {
        let (addr, task) = serve_once(move |addr, request| {
            let key = request
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .expect("a Sec-WebSocket-Key")
                .to_string();
            let want = format!(
                "GET /ws?token=tok HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            assert_eq!(request, want);
            answer(&key)
        })
        .await;
        (format!("ws://{addr}/ws?token=tok"), task)
    }

    fn switching_protocols(accept: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_refused_ws_upgrade_shows_the_status_and_the_body() {
        let (url, server) = fake_ws_engine(|_| {
            vec![
                b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 39\r\n\r\n{\"error\":".to_vec(),
                b"{\"code\":\"unauthorized\",\"m\":1}}".to_vec(),
            ]
        })
        .await;
        let Err(e) = open_ws_stream(&url, None, 1024, 1024).await else {
            panic!("a 401 opened a WebSocket")
        };
        assert_eq!(
            e,
            "GET /ws answered 401 Unauthorized: {\"error\":{\"code\":\"unauthorized\",\"m\":1}} \
             (is --secret the engine's HERALD_JWT_SECRET?)"
        );
        server.await.unwrap();
        let Err(e) = open_ws_stream("wss://127.0.0.1:1/ws", None, 1024, 1024).await else {
            panic!("a wss:// URL opened a WebSocket")
        };
        assert_eq!(
            e,
            "wss://127.0.0.1:1/ws: wss:// (TLS) is not supported, only ws://"
        );
    }

    #[tokio::test]
    async fn a_ws_upgrade_with_a_wrong_accept_is_refused() {
        let connected = frame(0x81, b"{\"type\":\"connected\"}");
        let (url, server) = fake_ws_engine(move |_| {
            let mut answer = switching_protocols(&derive_accept_key(b"another key"));
            answer.extend(connected);
            vec![answer]
        })
        .await;
        let Err(e) = open_ws_stream(&url, None, 1024, 1024).await else {
            panic!("a wrong Sec-WebSocket-Accept was taken")
        };
        assert!(
            e.starts_with("GET /ws: wrong Sec-WebSocket-Accept Some("),
            "{e}"
        );
        server.await.unwrap();
        // The right one is taken.
        let connected = frame(0x81, b"{\"type\":\"connected\"}");
        let (url, server) = fake_ws_engine(move |key| {
            let mut answer = switching_protocols(&derive_accept_key(key.as_bytes()));
            answer.extend(connected);
            vec![answer]
        })
        .await;
        let (ws, base) = open_ws_stream(&url, None, 1024, 1024).await.unwrap();
        assert_eq!((base, ws.buf.len()), (0, 0));
        drop(ws);
        server.await.unwrap();
    }

    fn event(seq: u64, pad: usize) -> Vec<u8> {
        format!(
            "{{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":{seq},\"epoch\":\"e\",\
             \"data\":{{\"t\":{},\"pad\":\"{}\"}}}}",
            now_us(),
            "x".repeat(pad)
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_ws_stream_subscribes_and_reads_frames_of_any_size() {
        let (url, server) = fake_ws_engine(|key| {
            let presence = frame(0x81, b"{\"type\":\"presence\",\"user\":\"lg-1\"}");
            let mut first = switching_protocols(&derive_accept_key(key.as_bytes()));
            // The first frames come with the head, and the presence update is cut by a read.
            first.extend(frame(
                0x81,
                b"{\"type\":\"connected\",\"connection_id\":\"c\"}",
            ));
            first.extend_from_slice(&presence[..10]);
            let mut second = presence[10..].to_vec();
            second.extend(frame(
                0x81,
                b"{\"type\":\"reply\",\"ref\":1,\"ok\":true,\"seq\":4}",
            ));
            // An event right behind the reply, in the same read.
            second.extend(frame(0x81, &event(5, 10)));
            let six = frame(0x81, &event(6, 10));
            let mut fourth = six[10..].to_vec();
            fourth.extend(frame(0x89, b"hb"));
            // Larger than the buffer can grow to by itself.
            fourth.extend(frame(0x81, &event(7, 70_000)));
            let eight = event(8, 100);
            let (a, b) = eight.split_at(50);
            vec![
                first,
                second,
                six[..10].to_vec(),
                fourth,
                [frame(0x01, a), frame(0x80, b)].concat(),
                frame(0x88, b"\x0f\xa8slow consumer"),
            ]
        })
        .await;
        let (mut ws, base) = open_ws_stream(&url, Some("room:r"), 1024, 4096)
            .await
            .unwrap();
        assert_eq!(base, 4);
        let (shared, stop) = (test_shared(), CancellationToken::new());
        let mut tally = Tally::new();
        tally.base = base;
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            ws_receive(&mut ws, &stop, |f| tally.on_frame(f, &shared)),
        )
        .await
        .expect("the stream ended at the close frame");
        assert_eq!(
            closed.as_deref(),
            Some("closed by the server: 4008 slow consumer")
        );
        assert!((5..=8).all(|s| tally.has(s)) && !tally.has(9));
        assert_eq!((tally.frames, tally.unreadable), (4, 0));
        drop(ws);
        let sent = client_frames(&server.await.unwrap(), None);
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert_eq!(sent[0].0, 0x81);
        assert_eq!(
            serde_json::from_slice::<Value>(&sent[0].1).unwrap(),
            json!({"op": "subscribe", "channel": "room:r", "ref": 1})
        );
        assert_eq!(sent[1], (0x8a, b"hb".to_vec()));
        assert_eq!(sent[2], (0x88, b"\x0f\xa8".to_vec()));
    }

    #[tokio::test]
    async fn a_refused_subscribe_is_an_error_and_stop_sends_a_close() {
        let answer = |reply: &'static [u8]| {
            move |key: &str| {
                let mut answer = switching_protocols(&derive_accept_key(key.as_bytes()));
                answer.extend(frame(0x81, b"{\"type\":\"connected\"}"));
                answer.extend(frame(0x81, reply));
                vec![answer]
            }
        };
        let (url, server) = fake_ws_engine(answer(
            b"{\"type\":\"reply\",\"ref\":1,\"ok\":false,\"error\":{\"code\":\"forbidden\"}}",
        ))
        .await;
        let Err(e) = open_ws_stream(&url, Some("room:r"), 1024, 1024).await else {
            panic!("a refused subscribe opened a subscriber")
        };
        assert_eq!(e, "subscribe room:r refused: {\"code\":\"forbidden\"}");
        server.await.unwrap();

        let (url, server) = fake_ws_engine(answer(
            b"{\"type\":\"reply\",\"ref\":1,\"ok\":true,\"seq\":0}",
        ))
        .await;
        let (mut ws, _) = open_ws_stream(&url, Some("room:r"), 1024, 1024)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(ws_receive(&mut ws, &stop, |_| panic!()).await, None);
        drop(ws);
        let sent = client_frames(&server.await.unwrap(), None);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[1], (0x88, Vec::new()));
    }

    #[test]
    fn bytes_and_keys_are_found_like_a_plain_search() {
        let naive = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
        // Every position, every length, needles next to look-alikes and high bytes (0x80, 0xff
        // around the byte sought, where a carry could go wrong).
        let mut hay = Vec::new();
        for i in 0..67u8 {
            hay.push(
                [b'a', b'\n', 0x80, 0xff, 0x0b, 0x09, b'"', 0][usize::from(i) % 8] ^ (i & 0x40),
            );
        }
        for len in 0..hay.len() {
            for start in 0..len.min(9) {
                let h = &hay[start..len];
                for b in [b'\n', 0x80, 0xff, 0, b'"', 0x0b, b'x', 0x41, 0xbf] {
                    assert_eq!(find_byte(h, b), h.iter().position(|&c| c == b), "{h:?} {b}");
                }
            }
        }
        for pos in 0..40 {
            let mut h = vec![b'x'; 40];
            h[pos] = b'\n';
            assert_eq!(find_byte(&h, b'\n'), Some(pos));
            h[pos] = 0x0b; // '\n' + 1: a borrow would turn it into a false match
            assert_eq!(find_byte(&h, b'\n'), None);
        }
        let frame: &[u8] =
            b"{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":12,\"epoch\":\"e\",\
            \"data\":{\"pad\":\"\\\"t\\\":\",\"t\":1795249035673804}}";
        for needle in [
            &b"\"seq\":"[..],
            b"\"t\":",
            b"\"",
            b"}}",
            b"\"missing\":",
            b"{",
        ] {
            for cut in 0..frame.len() {
                assert_eq!(find(&frame[cut..], needle), naive(&frame[cut..], needle));
            }
        }
        assert_eq!(find(b"", b"x"), None);
    }

    #[test]
    fn frames_are_read_lazily() {
        let shared = Shared {
            head: b"{\"type\":\"event\",\"channel\":\"room:r\",".to_vec(),
            reset_head: b"{\"type\":\"reset\"".to_vec(),
            channel: "room:r".into(),
            measure_from_us: AtomicU64::new(0),
            progress: Vec::new(),
        };
        let mut t = Tally::new();
        t.base = 4;
        let frame = |seq: u64| {
            format!(
                "{{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":{seq},\"epoch\":\"e\",\
                 \"data\":{{\"t\":{},\"pad\":\"x\"}}}}",
                now_us()
            )
        };
        for seq in [5, 7, 6, 7] {
            t.on_frame(frame(seq).as_bytes(), &shared);
        }
        t.on_frame(
            b"{\"type\":\"event\",\"channel\":\"room:other\",\"seq\":9}",
            &shared,
        );
        t.on_frame(
            b"{\"type\":\"reset\",\"channel\":\"room:r\",\"seq\":0}",
            &shared,
        );
        assert!(t.has(5) && t.has(6) && t.has(7) && !t.has(8) && !t.has(4));
        assert_eq!((t.frames, t.duplicates, t.reorders, t.resets), (4, 1, 1, 1));
        assert_eq!(t.latency.len(), 3);
        assert_eq!(number_after(b"x\"seq\":42,", b"\"seq\":"), Some((42, 9)));
        assert_eq!(number_after(b"\"seq\":,", b"\"seq\":"), None);
    }

    #[test]
    fn proc_figures_of_this_process_are_readable() {
        assert!(proc_cpu_ticks("self").is_some());
        assert!(proc_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
        let probes = Probes::new(&[std::process::id()], None).unwrap();
        assert!(probes.sample().engine.is_some());
        assert!(Probes::new(&[u32::MAX], None).is_err());
    }

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
