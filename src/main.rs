//! The `herald` binary: `serve` (the default), `token`, `rules check`, `rules test`, `simulate`,
//! `status`, `publish`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use herald::config::{Config, LogFormat, Overrides};
use herald::{ChannelKinds, transport::auth};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "A real-time notification engine: WebSocket + SSE + HTTP API",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `herald` serves: the same flags and environment as `herald serve`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Mint a client JWT with the configured HS256 secret (HERALD_JWT_SECRET or herald.toml).
    Token(TokenArgs),
    /// Check (compile + lint) or test (run fixtures) the Rhai rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Print the Decision the rules take for an event, and which file decided.
    /// Show a running node's health and figures (sessions, publishes, p99s, rules, push).
    Status(StatusArgs),
    /// Publish an event to a running node (the API key from HERALD_API_KEY).
    Publish(PublishArgs),
    Simulate {
        /// The event JSON file: a `POST /api/v1/events` body ({"event", "channel"|"room"|"to",
        /// "from", "data"}) plus "source" (api|client) and the sender's "attrs"; see
        /// examples/events/chat.json.
        #[arg(long)]
        event: PathBuf,
        /// A made-up world (JSON) to plan the push decision in, per recipient: `{"members": {room:
        /// [users]}, "users": {user: {"live": [{device, platform, state}], "push": [{device,
        /// provider}], "focused", "acked"}}}`; see examples/events/world.json.
        #[arg(long)]
        world: Option<PathBuf>,
        /// Rules directory.
        #[arg(long, env = "HERALD_RULES", default_value = "rules")]
        rules: PathBuf,
        /// channels.toml path.
        #[arg(long, env = "HERALD_CHANNELS", default_value = "channels.toml")]
        channels: PathBuf,
    },
}

/// The node `status` and `publish` talk to.
const DEFAULT_URL: &str = "http://127.0.0.1:7070";

#[derive(Args)]
struct StatusArgs {
    /// The node's base URL.
    #[arg(long, env = "HERALD_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["channel", "room", "to"])))]
struct PublishArgs {
    /// The node's base URL.
    #[arg(long, env = "HERALD_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Event type, e.g. chat.message.
    #[arg(long)]
    event: String,
    /// A channel, e.g. room:r1, user:alice, global.
    #[arg(long)]
    channel: Option<String>,
    /// A room id (the channel room:ID).
    #[arg(long)]
    room: Option<String>,
    /// A user to send to (user:ID); repeatable.
    #[arg(long)]
    to: Vec<String>,
    /// The event's data: JSON, @FILE for a file's JSON, or - for standard input (default: null).
    #[arg(long)]
    data: Option<String>,
    /// The sender (a user id): rules see it, and it is not sent its own event.
    #[arg(long)]
    from: Option<String>,
    /// Publish at most once under this key (a retry returns the first reply).
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Compile and lint the rules; non-zero exit with file:line:col on error.
    Check {
        /// Rules directory (default: HERALD_RULES or ./rules).
        dir: Option<PathBuf>,
        /// channels.toml path.
        #[arg(long, env = "HERALD_CHANNELS", default_value = "channels.toml")]
        channels: PathBuf,
    },
    /// Run the rule fixtures (rules/tests/*.toml); a diff per failing case.
    Test {
        /// Rules directory (default: HERALD_RULES or ./rules).
        dir: Option<PathBuf>,
        /// channels.toml path.
        #[arg(long, env = "HERALD_CHANNELS", default_value = "channels.toml")]
        channels: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address.
    #[arg(long, env = "HERALD_LISTEN")]
    listen: Option<String>,
    /// Redis URL (redis://, rediss://, unix://); none = the memory backend.
    #[arg(long, env = "HERALD_REDIS")]
    redis: Option<String>,
    /// Rules directory.
    #[arg(long, env = "HERALD_RULES")]
    rules: Option<PathBuf>,
    /// channels.toml path.
    #[arg(long, env = "HERALD_CHANNELS")]
    channels: Option<PathBuf>,
    /// herald.toml path (default: ./herald.toml if present).
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (default: hostname-pid).
    #[arg(long, env = "HERALD_NODE_ID")]
    node_id: Option<String>,
    /// Presence TTL, seconds.
    #[arg(long, env = "HERALD_PRESENCE_TTL")]
    presence_ttl: Option<u64>,
    /// Heartbeat interval, seconds (the offline sweeper runs every heartbeat).
    #[arg(long, env = "HERALD_HEARTBEAT")]
    heartbeat: Option<u64>,
    /// Log format: text or json.
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
}

#[derive(Args)]
struct TokenArgs {
    /// User id (JWT `sub`).
    #[arg(long)]
    user: String,
    /// Device id claim.
    #[arg(long)]
    device: Option<String>,
    /// Platform claim: web, ios, android or desktop.
    #[arg(long, value_parser = ["web", "ios", "android", "desktop"])]
    platform: Option<String>,
    /// An `attrs` claim, KEY=VALUE (repeatable): what rules and announcement audiences read.
    /// VALUE is JSON when it parses as JSON (`beta=true`, `level=3`), else a string (`plan=pro`).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attrs: Vec<(String, serde_json::Value)>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// herald.toml path.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
}

fn parse_attr(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: the KEY before `=` is empty"));
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
    Ok((k.to_string(), value))
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

/// The users a development start (generated JWT secret) mints tokens for, and their shared room.
const DEMO_USERS: [&str; 2] = ["demo", "guest"];
const DEMO_ROOM: &str = "demo";

/// `println!` that ignores a closed stdout (`herald | head`) instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {
        herald::logging::println_quiet(&format!($($t)*))
    };
}

/// The command line. The top-level copy of the serve arguments reads its environment only when no
/// subcommand is given: clap validates every env value of the arguments it parses, so a serve variable
/// that does not parse (`HERALD_HEARTBEAT=20s`) would otherwise stop `herald token` or `herald rules
/// test` with an error about a flag they do not have.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let without_env = Cli::command().mut_args(|a| a.env(None));
    if let Ok(m) = without_env.try_get_matches()
        && let Ok(cli) = Cli::from_arg_matches(&m)
        && cli.command.is_some()
    {
        return cli;
    }
    // No subcommand (serve: with the environment), or help, version or an error, which this parse
    // reports as usual.
    Cli::parse()
}

fn main() -> std::process::ExitCode {
    let cli = parse_cli();
    let result = match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(a) => serve(a),
        Command::Token(t) => token(t),
        Command::Rules { command } => rules_command(command),
        Command::Status(a) => status(a),
        Command::Publish(a) => publish(a),
        Command::Simulate {
            event,
            world,
            rules,
            channels,
        } => simulate(&event, world.as_deref(), rules, channels),
    };
    herald::logging::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `herald status` reached the node and printed its figures: only the verdict is left to say.
        Err(e) if e.is::<NotReady>() => std::process::ExitCode::from(1),
        Err(e) => {
            herald::logging::eprintln_quiet(&format!("herald: {e:#}"));
            std::process::ExitCode::from(2)
        }
    }
}

/// A small runtime for the commands that talk to a node.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// A key from the environment, when set and not empty.
fn env_key(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|k| !k.is_empty())
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let key = env_key("HERALD_ADMIN_KEY");
    let v = block_on(herald::cli::status(&a.url, key.as_deref()))??;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        out!("{}", herald::cli::status_text(&v).trim_end());
    }
    if v["ready"] != true {
        return Err(NotReady.into());
    }
    Ok(())
}

/// `herald status` found the node not ready: exit 1 (2 is for "could not ask").
#[derive(Debug)]
struct NotReady;

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the node is not ready")
    }
}

impl std::error::Error for NotReady {}

fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let key = env_key("HERALD_API_KEY")
        .context("set HERALD_API_KEY to the node's API key (the banner of `herald serve` shows a generated one)")?;
    let data: serde_json::Value = match a.data.as_deref() {
        None => serde_json::Value::Null,
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the data from standard input")?;
            serde_json::from_str(&text).context("--data -: standard input is not JSON")?
        }
        Some(d) if d.starts_with('@') => {
            let path = &d[1..];
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?
        }
        Some(d) => serde_json::from_str(d)
            .with_context(|| format!("--data {d:?}: not JSON (quote strings: --data '\"hi\"')"))?,
    };
    let mut body = serde_json::json!({ "event": a.event, "data": data });
    if let Some(c) = a.channel {
        body["channel"] = c.into();
    }
    if let Some(r) = a.room {
        body["room"] = r.into();
    }
    if !a.to.is_empty() {
        body["to"] = a.to.into();
    }
    if let Some(f) = a.from {
        body["from"] = f.into();
    }
    if let Some(k) = a.idempotency_key {
        body["idempotency_key"] = k.into();
    }
    let reply = block_on(herald::cli::publish(&a.url, &key, &body))??;
    out!("{}", serde_json::to_string(&reply)?);
    Ok(())
}

fn rules_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.or_else(|| std::env::var_os("HERALD_RULES").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("rules"))
}

fn load_kinds(path: &std::path::Path) -> anyhow::Result<std::sync::Arc<ChannelKinds>> {
    Ok(std::sync::Arc::new(ChannelKinds::load(path, false)?))
}

/// The rules in `dir` as the operator tools load them: default budget, channel defaults on error.
fn load_rules(
    dir: &std::path::Path,
    kinds: std::sync::Arc<ChannelKinds>,
) -> anyhow::Result<herald::rules::RuleSet> {
    use herald::rules::{Budget, OnError, RuleSet};
    Ok(RuleSet::load(
        dir,
        kinds,
        Budget::default(),
        OnError::DefaultRoute,
        1,
    )?)
}

fn rules_command(command: RulesCommand) -> anyhow::Result<()> {
    use herald::rules::fixtures;
    match command {
        RulesCommand::Check { dir, channels } => {
            let dir = rules_dir(dir);
            let set = load_rules(&dir, load_kinds(&channels)?)?;
            let files = set.files();
            if files.is_empty() {
                out!(
                    "{}: no rule files (*.rhai); channel defaults route every event",
                    dir.display()
                );
            } else {
                out!(
                    "{}: {} file(s) compiled: {}",
                    dir.display(),
                    files.len(),
                    files.join(", ")
                );
            }
            Ok(())
        }
        RulesCommand::Test { dir, channels } => {
            let dir = rules_dir(dir);
            let set = load_rules(&dir, load_kinds(&channels)?)?;
            let report = fixtures::run(&dir, &set)?;
            for f in &report.failures {
                out!("FAIL {f}");
            }
            out!(
                "{} passed, {} failed",
                report.cases - report.failures.len(),
                report.failures.len()
            );
            if report.failures.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} fixture case(s) failed", report.failures.len())
            }
        }
    }
}

fn simulate(
    event: &std::path::Path,
    world: Option<&std::path::Path>,
    rules: PathBuf,
    channels: PathBuf,
) -> anyhow::Result<()> {
    use herald::rules::fixtures::EventSpec;
    let text = std::fs::read_to_string(event)
        .with_context(|| format!("cannot read {}", event.display()))?;
    let spec: EventSpec = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an event", event.display()))?;
    let world: Option<herald::engine::pushplan::World> = match world {
        Some(w) => {
            let text = std::fs::read_to_string(w)
                .with_context(|| format!("cannot read {}", w.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a world", w.display()))?,
            )
        }
        None => None,
    };
    let kinds = load_kinds(&channels)?;
    let set = load_rules(&rules, kinds.clone())?;
    let routed = spec
        .route(&set)
        .map_err(|e| anyhow::anyhow!("{}: {e}", event.display()))?;
    let push = simulate_push(
        &routed.decision,
        &kinds,
        spec.from.as_deref(),
        world.as_ref(),
    );
    let out = serde_json::json!({
        "decision": routed.decision.to_json(&kinds, spec.from.as_deref()),
        "by": routed.decided_by(),
        "error": routed.error,
        "push": push,
    });
    out!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The push decision per `user:`/`room:` target: when, the `unacked` delay, and, in `world`, per
/// recipient which devices get it live and which get a push.
fn simulate_push(
    decision: &herald::rules::Decision,
    kinds: &herald::channels::ChannelKinds,
    from: Option<&str>,
    world: Option<&herald::engine::pushplan::World>,
) -> Vec<serde_json::Value> {
    let default_after = herald::config::PushConfig::default().default_after();
    herald::engine::pushplan::push_targets(decision, kinds, from, default_after)
        .into_iter()
        .map(|t| {
            let mut v = serde_json::json!({"channel": t.channel.as_str(), "when": t.when});
            if let Some(after) = t.after {
                v["after_ms"] = (after.as_millis() as u64).into();
            }
            if let Some(w) = world {
                v["recipients"] =
                    serde_json::to_value(w.plan(&t.channel, &t.except, t.when, decision.devices))
                        .unwrap_or_default();
            }
            v
        })
        .collect()
}

fn token(t: TokenArgs) -> anyhow::Result<()> {
    let config = Config::load(Overrides {
        config: t.config,
        ..Default::default()
    })?;
    if config.jwt.generated_secret {
        anyhow::bail!(
            "no JWT secret configured: set HERALD_JWT_SECRET (or auth.jwt_secret in herald.toml)"
        );
    }
    if config.jwt.algorithm != herald::config::JwtAlgorithm::HS256 {
        anyhow::bail!(
            "the engine accepts only {:?} tokens (a public key is configured); herald token can only sign HS256",
            config.jwt.algorithm
        );
    }
    let secret = config
        .jwt
        .secret
        .as_deref()
        .context("herald token needs an HS256 secret (a public key cannot sign)")?;
    // What the engine would refuse is an error here, not a token that fails at connect.
    if !herald::channels::valid_id(&t.user) {
        anyhow::bail!(
            "--user {:?}: a user id is 1-128 characters of [A-Za-z0-9_.@-]",
            t.user
        );
    }
    if let Some(d) = &t.device
        && !herald::channels::valid_id(d)
    {
        anyhow::bail!("--device {d:?}: a device id is 1-128 characters of [A-Za-z0-9_.@-]");
    }
    let mut attrs = serde_json::Map::new();
    for (key, value) in t.attrs {
        if attrs.insert(key.clone(), value).is_some() {
            anyhow::bail!("--attr {key} is given more than once");
        }
    }
    let claims = auth::Claims {
        sub: t.user,
        exp: auth::unix_now() + t.ttl,
        nbf: None,
        aud: config.jwt.audience.clone().map(serde_json::Value::String),
        iss: config.jwt.issuer.clone(),
        device: t.device,
        platform: t.platform,
        attrs,
    };
    out!("{}", auth::sign_hs256(secret, &claims)?);
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(Overrides {
        listen: a.listen,
        redis: a.redis,
        rules: a.rules,
        channels: a.channels,
        config: a.config,
        node_id: a.node_id,
        presence_ttl: a.presence_ttl,
        heartbeat: a.heartbeat,
        log_format: a.log_format,
    })?;
    let kinds = ChannelKinds::load(&config.channels_file, config.channels_required)?;
    herald::logging::init(config.log_format);
    match herald::transport::conn::raise_open_file_limit() {
        Ok((before, after)) if before < after => {
            tracing::info!(limit = after, was = before, "Raised the open file limit.")
        }
        Ok((_, limit)) => tracing::info!(limit, "Open file limit."),
        Err(e) => tracing::warn!(error = %e, "Could not raise the open file limit."),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let listener = herald::transport::conn::listen(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        if !config.rules_dir.exists() {
            tracing::debug!(dir = %config.rules_dir.display(), "Rules directory not found; channel defaults route every event.");
        }
        // A generated secret is a development start: tokens for two demo users, who share the
        // room `demo`, so the chat example opens ready to use.
        let demo = match config.jwt.secret.as_deref() {
            Some(s) if config.jwt.generated_secret => Some((
                auth::mint_hs256(s, DEMO_USERS[0], None, 24 * 3600)?,
                auth::mint_hs256(s, DEMO_USERS[1], None, 24 * 3600)?,
            )),
            _ => None,
        };
        let banner_keys = config.generated_keys.then(|| (config.api_key.clone(), config.admin_key.clone()));
        let generated_secret = config.jwt.generated_secret.then(|| config.jwt.secret.clone()).flatten();
        let server = herald::start(config, kinds, listener, shutdown_signal()).await?;
        let backend = match &server.engine.config.redis {
            Some(url) => format!("Redis backend at {}", herald::backend::redis::redact_url(url)),
            None => "memory backend".to_string(),
        };
        out!("herald listening on http://{addr}  (node {}, {backend})", server.engine.node);
        out!("  WebSocket  ws://{addr}/ws");
        out!("  SSE        http://{addr}/sse?channels=user:demo,global");
        out!("  API        http://{addr}/api/v1");
        out!("  admin      http://{addr}/admin");
        if let Some((api, admin)) = banner_keys {
            out!("  API key    {api}   (generated; set HERALD_API_KEY to keep one)");
            out!("  admin key  {admin}   (generated; set HERALD_ADMIN_KEY)");
        }
        if let Some(secret) = generated_secret {
            out!("  JWT secret {secret}   (generated; set HERALD_JWT_SECRET)");
        }
        if let Some((t, guest)) = demo {
            out!("  demo token {t}");
            out!("  try: websocat 'ws://{addr}/ws?token={t}'");
            let mut joined = true;
            for user in DEMO_USERS {
                if let Err(e) = server.engine.add_member(DEMO_ROOM, user).await {
                    tracing::warn!(user, room = DEMO_ROOM, error = %e, "Could not add a demo user to the demo room; no chat demo links.");
                    joined = false;
                }
            }
            if joined {
                let chat = format!("http://{addr}/client/example/?room={DEMO_ROOM}#token=");
                out!("  chat demo  {chat}{t}");
                out!("             {chat}{guest}");
                out!("             (users {} and {}, members of the room {DEMO_ROOM}: open both to chat)", DEMO_USERS[0], DEMO_USERS[1]);
            }
        }
        server.wait().await?;
        tracing::info!("Stopped.");
        Ok(())
    });
    // Whatever is still running (a rules compile, a connection past the grace period) does not
    // hold the exit up.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// The next signal of `s`; never, when its handler could not be installed.
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed now, not when the future is
/// first polled: a signal that comes right after the banner must start a shutdown, not kill the
/// process with the default action. (Must be called inside the runtime.)
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async move {
        tokio::select! {
            _ = recv(&mut interrupt) => {}
            _ = recv(&mut terminate) => {}
        }
        // A second Ctrl-C during the drain ends the process at once.
        if let Some(mut again) = interrupt {
            tokio::spawn(async move {
                again.recv().await;
                herald::logging::eprintln_quiet("herald: second interrupt; exiting now");
                std::process::exit(130);
            });
        }
    }
}
