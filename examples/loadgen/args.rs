//! The command line: [`Args`], and the transport and publish-via choices.

use clap::{Parser, ValueEnum};

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
otherwise, nothing with --quiet). The fields are documented at the top of examples/loadgen/main.rs.

Example:
  target/release/examples/loadgen --url http://127.0.0.1:7071 --subscribers 1000 --rate 500 \\
      --duration 10 --engine-pid $(pgrep -n herald)"
)]
pub(crate) struct Args {
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
    pub(crate) urls: Vec<String>,
    /// The engine's backend API key (its HERALD_API_KEY).
    ///
    /// Used for memberships (PUT /api/v1/rooms/{room}/members/{user}), HTTP publishes and the SSE
    /// seq lookup. Not needed for an idle-only run (--subscribers 0).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// The engine's HS256 JWT secret (its HERALD_JWT_SECRET).
    ///
    /// The loadgen mints a client token per connection with it (subscribers, WebSocket publishers,
    /// idle connections), valid for 6 hours.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub(crate) secret: String,
    /// Number of subscribers: users lg-0 … lg-{N-1}, one connection each (see --transport).
    ///
    /// Each is made a member of --room first. 0 skips memberships and the whole publish phase: an
    /// idle-only run, which needs --idle.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Room the subscribers join and the publisher publishes in.
    ///
    /// The bare id (1-128 characters of [A-Za-z0-9_.@-]): the channel is room:{room}.
    #[arg(long, default_value = "bench")]
    pub(crate) room: String,
    /// Event type of every publish (1-128 characters of [A-Za-z0-9_.:-]).
    ///
    /// The default `bench` is a type the shipped rules pass through to the channel defaults; give
    /// `chat.message` to have the shipped `route` decide every publish (with `herald serve --rules
    /// rules`), e.g. to compare publish throughput with rules on and off.
    #[arg(long, default_value = "bench")]
    pub(crate) event: String,
    /// Publishes per second, on a fixed schedule.
    ///
    /// Each publish is delivered to every subscriber, so the offered deliveries per second are
    /// rate × subscribers.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u32,
    /// Length of the measured publish phase, in seconds (after --warmup).
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Approximate size of each event's `data` object, in bytes.
    ///
    /// `data` is {"t":<send time, µs since the UNIX epoch>,"pad":"xx…"}, padded with `x` to this
    /// size (at least 31 bytes: the time and the keys).
    #[arg(long, default_value_t = 100)]
    pub(crate) payload: usize,
    /// Redis URL the engine uses (redis://, unix://): report redis_commands_per_publish.
    ///
    /// The loadgen reads INFO stats total_commands_processed before and after the measured
    /// publishes: every command Redis ran in that window counts (Lua-internal commands, presence
    /// heartbeats, every node, anything else using that Redis; its own INFO is subtracted).
    #[arg(long, value_name = "URL")]
    pub(crate) redis: Option<String>,
    /// Seconds of publishing before the measured phase.
    ///
    /// Warmup events are delivered and checked for duplicates and order, but count in no figure
    /// (latency, completeness, CPU).
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Seconds to wait after the last publish for deliveries still in flight, before the
    /// subscribers stop.
    #[arg(long, default_value_t = 2)]
    pub(crate) drain: u64,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value_t = TransportKind::Ws)]
    pub(crate) transport: TransportKind,
    /// How the publisher publishes.
    #[arg(long, value_enum, default_value_t = PublishVia::Http)]
    pub(crate) publish_via: PublishVia,
    /// WebSockets the publisher spreads its publishes over (round-robin), with --publish-via ws.
    ///
    /// Users lg-pub-0 … lg-pub-{C-1}, room members, all on the first --url. The engine handles one
    /// socket's frames one at a time and allows limits.frames_per_second (100 by default) per
    /// connection: give about rate/100 connections, or raise that limit. Ignored with
    /// --publish-via http.
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub(crate) publish_connections: usize,
    /// PID of an engine process on this machine; repeat for several nodes.
    ///
    /// Its utime + stime (/proc/PID/stat, all threads) over the CPU window give
    /// engine_cpu_us_per_delivery and engine_cpu_percent (summed over the PIDs); its VmRSS
    /// (/proc/PID/status) is what --idle measures.
    #[arg(long = "engine-pid", value_name = "PID")]
    pub(crate) engine_pids: Vec<u32>,
    /// PID of the redis-server the engine uses (on this machine).
    ///
    /// Gives redis_cpu_us_per_delivery and redis_cpu_percent, measured like --engine-pid.
    #[arg(long, value_name = "PID")]
    pub(crate) redis_pid: Option<u32>,
    /// Open K idle WebSockets first and report the engine's RSS per idle connection.
    ///
    /// Users lg-idle-0 … lg-idle-{K-1} (no memberships), each subscribed to its own user: channel,
    /// spread over the --urls like subscribers. The engine's VmRSS (summed over --engine-pid, which
    /// is required) is read before they open and 1 s after the last one's subscribe reply. They stay
    /// open, answering the engine's pings, until the run ends (so also during the publish phase).
    /// Use a freshly started engine: memory freed by earlier connections is reused without growing
    /// RSS, so a second run on the same engine reports far less.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub(crate) idle: usize,
    /// Connects and memberships in flight at once during setup.
    #[arg(long, default_value_t = 64)]
    pub(crate) setup_concurrency: usize,
    /// Seconds a setup may take: the idle connections, and separately the subscribers (memberships,
    /// connects, subscribes, publisher sockets).
    #[arg(long, default_value_t = 120)]
    pub(crate) setup_timeout: u64,
    /// Most publishes in flight at once (the schedule waits beyond that, and the wait counts as
    /// latency).
    #[arg(long, default_value_t = 256)]
    pub(crate) max_in_flight: usize,
    /// No progress on stderr (no bar, no progress lines); warnings and errors still go there.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

/// How subscribers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportKind {
    /// WebSocket: GET /ws (token in ?token=), then a `subscribe` to room:{room}.
    Ws,
    /// Server-sent events: GET /sse?channels=room:{room} (token in ?token=).
    Sse,
}

impl TransportKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
            TransportKind::Sse => "sse",
        }
    }
}

/// How the publisher publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PublishVia {
    /// POST /api/v1/events with the API key, many requests in flight.
    Http,
    /// The `publish` op over WebSockets as room members (see --publish-connections).
    Ws,
}

impl PublishVia {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PublishVia::Http => "http",
            PublishVia::Ws => "ws",
        }
    }
}
