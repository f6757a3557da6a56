//! Server settings: `herald.toml` + environment + flags -> [`Config`].
//!
//! Precedence: flag > env > `herald.toml` > default. The file is parsed strictly: an unknown key or a bad
//! value stops the start with an error naming the file, the line and the key. Secrets (JWT secret, API
//! keys) are generated at start when not configured, and never logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::channels::{ConfigFileError, de_duration, parse_toml};

/// JWT signing algorithm accepted for client tokens (pinned: exactly one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret (default).
    HS256,
    /// RSA PKCS#1 v1.5 SHA-256 with a public key.
    RS256,
    /// ECDSA P-256 SHA-256 with a public key.
    ES256,
}

/// Client token verification settings.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// The one accepted algorithm.
    pub algorithm: JwtAlgorithm,
    /// HS256 secret (also used by `herald token`).
    pub secret: Option<String>,
    /// PEM public key contents for RS256/ES256.
    pub public_key_pem: Option<Vec<u8>>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock leeway for `exp`/`nbf`.
    pub leeway: Duration,
    /// True when the secret was generated at start (printed with a demo token).
    pub generated_secret: bool,
}

/// Per-connection and per-user limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client frame (and publish body), bytes.
    pub frame_bytes: usize,
    /// Client frames per second per connection.
    pub frames_per_second: u32,
    /// Open sessions (WebSocket + SSE) per user on one node.
    pub connections_per_user: usize,
    /// Outbound queue per session, frames; a session whose queue fills is disconnected (4008).
    pub queue_frames: usize,
    /// Subscriptions per connection.
    pub subscriptions_per_connection: usize,
    /// Rate-limit violations tolerated (per 10 s) before the connection is closed with 4010.
    pub violations_before_disconnect: u32,
    /// Time a WebSocket has to send its `connect` frame when it brought no token.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// A session's `typing` in a room within this of its last one sent is answered
    /// `sent: false` and not sent (zero sends every one); said in the `connected` frame.
    #[serde(deserialize_with = "de_duration")]
    pub typing_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes: 64 * 1024,
            frames_per_second: 100,
            connections_per_user: 16,
            queue_frames: 1024,
            subscriptions_per_connection: 512,
            violations_before_disconnect: 20,
            connect_timeout: Duration::from_secs(5),
            typing_interval: Duration::from_secs(1),
        }
    }
}

/// Push settings: `[push]` (how jobs are sent) and the providers (`[push.*]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// After a push to a user for one collapse key (a room), later ones within this window are held
    /// and sent as one summary when it closes (`"5s"`; `"0s"` turns merging off).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub burst_window: Option<Duration>,
    /// A job a node claimed and did not finish within this is taken over by another node (`"30s"`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub reclaim_after: Option<Duration>,
    /// Sends tried before a job that keeps failing is dead-lettered (8).
    pub max_attempts: Option<u32>,
    /// The `after` of an `unacked` push whose rule gives none (`"30s"`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub default_after: Option<Duration>,
    /// Firebase Cloud Messaging (HTTP v1).
    pub fcm: Option<FcmConfig>,
    /// Apple Push Notification service (HTTP/2, provider token).
    pub apns: Option<ApnsConfig>,
    /// Web Push (VAPID, aes128gcm).
    pub webpush: Option<WebPushConfig>,
    /// Signed webhook.
    pub webhook: Option<WebhookConfig>,
}

/// `[push.fcm]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// Base URL (tests point it at a local server).
    pub endpoint: Option<String>,
    /// Service-account JSON file.
    pub credentials: Option<PathBuf>,
}

/// `[push.apns]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// Base URL.
    pub endpoint: Option<String>,
    /// The .p8 signing key file.
    pub key_file: Option<PathBuf>,
    /// Key id.
    pub key_id: Option<String>,
    /// Team id.
    pub team_id: Option<String>,
    /// Bundle id (apns-topic).
    pub topic: Option<String>,
}

/// `[push.webpush]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushConfig {
    /// VAPID private key (base64url) or file.
    pub vapid_key: Option<String>,
    /// VAPID subject (mailto: or https:).
    pub subject: Option<String>,
    /// Push-service hosts a subscription's endpoint may name (a leading `*.` matches any subdomain);
    /// `None` = the browsers' push services (see `push::webpush::DEFAULT_ALLOWED_HOSTS`).
    pub allowed_hosts: Option<Vec<String>>,
    /// Test-only: accept `http://127.0.0.1:PORT` endpoints (loopback, plain HTTP). Never in production.
    #[serde(default)]
    pub allow_loopback: bool,
}

/// `[push.webhook]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where jobs are POSTed.
    pub url: Option<String>,
    /// HMAC-SHA256 secret for `X-Herald-Signature`.
    pub secret: Option<String>,
}

impl PushConfig {
    /// [`PushConfig::burst_window`] with its default.
    pub fn burst_window(&self) -> Duration {
        self.burst_window.unwrap_or(Duration::from_secs(5))
    }

    /// [`PushConfig::reclaim_after`] with its default.
    pub fn reclaim_after(&self) -> Duration {
        self.reclaim_after
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_millis(100))
    }

    /// [`PushConfig::max_attempts`] with its default.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(8).max(1)
    }

    /// [`PushConfig::default_after`] with its default.
    pub fn default_after(&self) -> Duration {
        self.default_after.unwrap_or(Duration::from_secs(30))
    }

    /// True when any provider is configured.
    pub fn any(&self) -> bool {
        self.fcm.is_some()
            || self.apns.is_some()
            || self.webpush.is_some()
            || self.webhook.is_some()
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Redis URL; `None` = memory backend.
    pub redis: Option<String>,
    /// PEM CA certificate for `rediss://` with a private CA (`HERALD_REDIS_CA`, `redis_ca`).
    pub redis_ca: Option<PathBuf>,
    /// Rules directory.
    pub rules_dir: PathBuf,
    /// Per-call budget of rule hooks.
    pub rules_budget: crate::rules::Budget,
    /// What a failing rule does at run time.
    pub rules_on_error: crate::rules::OnError,
    /// Reload rules when files change.
    pub rules_watch: bool,
    /// `channels.toml` path.
    pub channels_file: PathBuf,
    /// Whether `channels_file` must exist (it was named explicitly).
    pub channels_required: bool,
    /// This node's id.
    pub node_id: String,
    /// Client token verification.
    pub jwt: JwtConfig,
    /// Backend API key.
    pub api_key: String,
    /// Admin key.
    pub admin_key: String,
    /// True when the keys were generated at start (printed).
    pub generated_keys: bool,
    /// Limits.
    pub limits: Limits,
    /// Presence TTL: a session that has not heartbeated for this long is offline.
    pub presence_ttl: Duration,
    /// Heartbeat interval (presence refresh, WebSocket ping, offline sweep).
    pub heartbeat: Duration,
    /// How room presence changes are coalesced.
    pub room_presence: RoomPresenceConfig,
    /// CORS origins for client endpoints (`*` = any).
    pub cors_origins: Vec<String>,
    /// WebSocket `Origin` allowlist; empty = off.
    pub ws_origins: Vec<String>,
    /// Put `/metrics` behind the admin key.
    pub metrics_require_admin: bool,
    /// `TCP_NODELAY` on accepted connections (`[http] tcp_nodelay`, HERALD_TCP_NODELAY).
    pub tcp_nodelay: bool,
    /// Let the fan-out write deliveries to idle WebSockets itself (`[http] direct_writes`,
    /// HERALD_DIRECT_WRITES; see `engine::hub::DirectWrite`).
    pub direct_writes: bool,
    /// Let writer tasks send a fan-out's frames to many sockets in one io_uring submission
    /// (`[http] io_uring`, HERALD_IO_URING; see `sendbatch`).
    pub io_uring: bool,
    /// When fan-outs hold deliveries for the flush tick, so that each connection writes what queued
    /// up in one write (`[http] coalesce`, HERALD_COALESCE; see `engine::coalesce`).
    pub coalesce: Coalesce,
    /// The flush tick's interval: the most a held delivery waits (`[http] coalesce_window`,
    /// HERALD_COALESCE_WINDOW).
    pub coalesce_window: Duration,
    /// How long a connection may take to send a request head (and a request body), and may idle
    /// between keep-alive requests, before it is closed.
    pub read_timeout: Duration,
    /// Most open connections on this node (HTTP, SSE and WebSocket); `None`: the open-file limit
    /// less a reserve.
    pub max_connections: Option<usize>,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How long a publish holds its idempotency key's claim: a retry while it is held waits or gets
    /// 503; after it lapses (the publisher crashed or lost the backend), a retry takes the key over.
    pub idempotency_lease: Duration,
    /// How long shutdown waits for in-flight work.
    pub shutdown_grace: Duration,
    /// Push providers (not delivered yet).
    pub push: PushConfig,
    /// Log format.
    pub log_format: LogFormat,
}

/// `herald.toml`, as written (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    redis: Option<String>,
    redis_ca: Option<PathBuf>,
    rules: Option<PathBuf>,
    channels: Option<PathBuf>,
    node_id: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    auth: FileAuth,
    limits: Option<Limits>,
    #[serde(default)]
    presence: FilePresence,
    #[serde(default)]
    http: FileHttp,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idempotency_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idempotency_lease: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default)]
    push: PushConfig,
    #[serde(default)]
    rules_engine: FileRules,
}

/// `[rules_engine]`: how rule hooks run.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRules {
    operations: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    wall_time: Option<Duration>,
    on_error: Option<crate::rules::OnError>,
    watch: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    algorithm: Option<JwtAlgorithm>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    audience: Option<String>,
    issuer: Option<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    leeway: Option<Duration>,
    api_key: Option<String>,
    admin_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePresence {
    #[serde(default, deserialize_with = "de_opt_duration")]
    ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    heartbeat: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    room_interval: Option<Duration>,
    room_batch_max: Option<usize>,
}

/// `[presence] room_interval`, `room_batch_max`: room presence (`presence.update`) coalescing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomPresenceConfig {
    /// After a room's first change goes out, later ones within this interval are sent together
    /// when it ends (one frame per kind of change); zero sends every change on its own.
    pub interval: Duration,
    /// Most users named in one coalesced frame; the rest are counted in its `more`.
    pub batch_max: usize,
}

impl Default for RoomPresenceConfig {
    fn default() -> Self {
        RoomPresenceConfig {
            interval: Duration::from_secs(1),
            batch_max: 100,
        }
    }
}

/// When fan-outs coalesce their writes (`[http] coalesce`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coalesce {
    /// While the CPU is saturated and deliveries come fast enough to share writes (see
    /// `engine::coalesce`).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: every delivery is written at once.
    Off,
}

impl Coalesce {
    fn parse(s: &str) -> Option<Coalesce> {
        match s {
            "auto" => Some(Coalesce::Auto),
            "on" => Some(Coalesce::On),
            "off" => Some(Coalesce::Off),
            _ => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    cors_origins: Option<Vec<String>>,
    ws_origins: Option<Vec<String>>,
    metrics_require_admin: Option<bool>,
    tcp_nodelay: Option<bool>,
    direct_writes: Option<bool>,
    io_uring: Option<bool>,
    coalesce: Option<Coalesce>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    coalesce_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    read_timeout: Option<Duration>,
    max_connections: Option<usize>,
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// What flags (and their env twins, read by clap) set for `serve`.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen` / HERALD_LISTEN.
    pub listen: Option<String>,
    /// `--redis` / HERALD_REDIS.
    pub redis: Option<String>,
    /// `--rules` / HERALD_RULES.
    pub rules: Option<PathBuf>,
    /// `--channels` / HERALD_CHANNELS.
    pub channels: Option<PathBuf>,
    /// `--config` / HERALD_CONFIG.
    pub config: Option<PathBuf>,
    /// `--node-id` / HERALD_NODE_ID.
    pub node_id: Option<String>,
    /// `--presence-ttl` / HERALD_PRESENCE_TTL (seconds).
    pub presence_ttl: Option<u64>,
    /// `--heartbeat` / HERALD_HEARTBEAT (seconds).
    pub heartbeat: Option<u64>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

/// A configuration error: what, and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A value (from a flag, env or file) is invalid.
    #[error("{0}")]
    Invalid(String),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A true/false environment variable (`1`/`true`, `0`/`false`); `None` when unset.
fn env_flag(name: &str) -> Result<Option<bool>, ConfigError> {
    match env(name).as_deref() {
        None => Ok(None),
        Some("1" | "true") => Ok(Some(true)),
        Some("0" | "false") => Ok(Some(false)),
        Some(_) => Err(ConfigError::Invalid(format!("{name}: true or false"))),
    }
}

/// A random key: 32 alphanumeric characters (~190 bits).
pub fn random_key() -> String {
    // Alphanumeric only: a key starting with `-` could not be passed as a separate CLI argument.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..32)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".into());
    format!("{host}-{}", std::process::id())
}

impl Config {
    /// Builds the configuration from flags/env (`o`), the environment and `herald.toml`.
    pub fn load(o: Overrides) -> Result<Config, ConfigError> {
        let file = match &o.config {
            Some(p) => read_file_config(p)?,
            None => {
                let p = Path::new("herald.toml");
                if p.exists() {
                    read_file_config(p)?
                } else {
                    FileConfig::default()
                }
            }
        };
        let mut c = Config::defaults();

        if let Some(l) = o.listen.or(file.listen) {
            c.listen = l.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "listen: bad address {l:?} (expected e.g. 127.0.0.1:7070)"
                ))
            })?;
        }
        c.redis = o.redis.or(file.redis);
        c.redis_ca = env("HERALD_REDIS_CA").map(PathBuf::from).or(file.redis_ca);
        if let Some(r) = &c.redis
            && !(r.starts_with("redis://")
                || r.starts_with("rediss://")
                || r.starts_with("unix://"))
        {
            return Err(ConfigError::Invalid(format!(
                "redis: URL must start with redis://, rediss:// or unix:// (got {:?})",
                r.split('@').next_back().unwrap_or("")
            )));
        }
        if let Some(r) = o.rules.or(file.rules) {
            c.rules_dir = r;
        }
        match o.channels.or(file.channels) {
            Some(ch) => {
                c.channels_file = ch;
                c.channels_required = true;
            }
            None => c.channels_required = false,
        }
        if let Some(n) = o.node_id.or(file.node_id) {
            if n.is_empty() || n.len() > 64 || n.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid(format!(
                    "node-id: {n:?} must be 1-64 non-space characters"
                )));
            }
            c.node_id = n;
        }
        if let Some(f) = o.log_format.or(file.log_format) {
            c.log_format = f;
        }
        if let Some(l) = file.limits {
            c.limits = l;
        }
        if let Some(t) = o
            .presence_ttl
            .map(Duration::from_secs)
            .or(file.presence.ttl)
        {
            c.presence_ttl = t;
        }
        if let Some(h) = o
            .heartbeat
            .map(Duration::from_secs)
            .or(file.presence.heartbeat)
        {
            c.heartbeat = h;
        }
        if let Some(i) = file.presence.room_interval {
            c.room_presence.interval = i;
        }
        if let Some(m) = file.presence.room_batch_max {
            if m == 0 {
                return Err(ConfigError::Invalid(
                    "presence: room_batch_max must be at least 1".into(),
                ));
            }
            c.room_presence.batch_max = m;
        }
        if c.heartbeat.is_zero() || c.presence_ttl < c.heartbeat {
            return Err(ConfigError::Invalid(format!(
                "presence: heartbeat ({}s) must be > 0 and not longer than the presence TTL ({}s)",
                c.heartbeat.as_secs_f64(),
                c.presence_ttl.as_secs_f64()
            )));
        }
        if let Some(t) = file.idempotency_ttl {
            c.idempotency_ttl = t;
        }
        if let Some(t) = file.idempotency_lease {
            c.idempotency_lease = t;
        }
        if c.idempotency_lease.is_zero() || c.idempotency_lease > c.idempotency_ttl {
            return Err(ConfigError::Invalid(format!(
                "idempotency_lease ({}s) must be > 0 and not longer than idempotency_ttl ({}s)",
                c.idempotency_lease.as_secs_f64(),
                c.idempotency_ttl.as_secs_f64()
            )));
        }
        if let Some(t) = file.shutdown_grace {
            c.shutdown_grace = t;
        }

        // Auth.
        let a = file.auth;
        let public_key = env("HERALD_JWT_PUBLIC_KEY")
            .map(PathBuf::from)
            .or(a.jwt_public_key);
        let secret = env("HERALD_JWT_SECRET").or(a.jwt_secret);
        let algorithm = match env("HERALD_JWT_ALGORITHM") {
            Some(s) => Some(parse_alg(&s)?),
            None => a.algorithm,
        };
        c.jwt.audience = env("HERALD_JWT_AUDIENCE").or(a.audience);
        c.jwt.issuer = env("HERALD_JWT_ISSUER").or(a.issuer);
        if let Some(l) = a.leeway {
            c.jwt.leeway = l;
        }
        match public_key {
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "jwt public key {}: cannot read: {e}",
                        path.display()
                    ))
                })?;
                let alg = match algorithm {
                    Some(JwtAlgorithm::HS256) => {
                        return Err(ConfigError::Invalid(
                            "auth.algorithm = HS256 cannot be used with a public key (use RS256 or ES256)".into(),
                        ));
                    }
                    Some(a) => a,
                    None => guess_alg(&pem).ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "jwt public key {}: not an RSA or EC PEM public key; set auth.algorithm",
                            path.display()
                        ))
                    })?,
                };
                c.jwt.algorithm = alg;
                c.jwt.public_key_pem = Some(pem);
                c.jwt.secret = secret;
                c.jwt.generated_secret = false;
            }
            None => {
                if let Some(a) = algorithm
                    && a != JwtAlgorithm::HS256
                {
                    return Err(ConfigError::Invalid(format!(
                        "auth.algorithm = {a:?} needs a public key (HERALD_JWT_PUBLIC_KEY or auth.jwt_public_key)"
                    )));
                }
                if let Some(s) = secret {
                    if s.len() < 16 {
                        return Err(ConfigError::Invalid(
                            "jwt secret must be at least 16 characters".into(),
                        ));
                    }
                    c.jwt.secret = Some(s);
                    c.jwt.generated_secret = false;
                }
            }
        }
        let api = env("HERALD_API_KEY").or(a.api_key);
        let admin = env("HERALD_ADMIN_KEY").or(a.admin_key);
        c.generated_keys = api.is_none() || admin.is_none();
        if let Some(k) = api {
            c.api_key = k;
        }
        if let Some(k) = admin {
            c.admin_key = k;
        }
        if c.api_key == c.admin_key {
            return Err(ConfigError::Invalid(
                "the API key and the admin key must differ".into(),
            ));
        }

        // HTTP.
        if let Some(o) = env("HERALD_CORS_ORIGINS")
            .map(|v| split_list(&v))
            .or(file.http.cors_origins)
        {
            c.cors_origins = o;
        }
        if let Some(o) = env("HERALD_WS_ORIGINS")
            .map(|v| split_list(&v))
            .or(file.http.ws_origins)
        {
            c.ws_origins = o;
        }
        if let Some(t) = file.http.read_timeout {
            if t.is_zero() {
                return Err(ConfigError::Invalid("http.read_timeout must be > 0".into()));
            }
            c.read_timeout = t;
        }
        let max = match env("HERALD_MAX_CONNECTIONS") {
            Some(v) => Some(v.parse::<usize>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "HERALD_MAX_CONNECTIONS: {v:?} is not a number of connections"
                ))
            })?),
            None => file.http.max_connections,
        };
        if max == Some(0) {
            return Err(ConfigError::Invalid(
                "http.max_connections must be > 0".into(),
            ));
        }
        c.max_connections = max;
        if let Some(m) = file.http.metrics_require_admin {
            c.metrics_require_admin = m;
        }
        c.tcp_nodelay =
            env_flag("HERALD_TCP_NODELAY")?.unwrap_or(file.http.tcp_nodelay.unwrap_or(true));
        c.direct_writes =
            env_flag("HERALD_DIRECT_WRITES")?.unwrap_or(file.http.direct_writes.unwrap_or(true));
        c.io_uring = env_flag("HERALD_IO_URING")?.unwrap_or(file.http.io_uring.unwrap_or(true));
        c.coalesce = match env("HERALD_COALESCE") {
            Some(v) => Coalesce::parse(&v)
                .ok_or_else(|| ConfigError::Invalid("HERALD_COALESCE: auto, on or off".into()))?,
            None => file.http.coalesce.unwrap_or_default(),
        };
        c.coalesce_window = match env("HERALD_COALESCE_WINDOW") {
            Some(v) => crate::channels::parse_duration(&v)
                .map_err(|e| ConfigError::Invalid(format!("HERALD_COALESCE_WINDOW: {e}")))?,
            None => file.http.coalesce_window.unwrap_or(c.coalesce_window),
        };
        if c.coalesce_window < Duration::from_millis(1)
            || c.coalesce_window > Duration::from_secs(1)
        {
            return Err(ConfigError::Invalid(
                "http.coalesce_window must be between 1ms and 1s".into(),
            ));
        }

        // Rules.
        let r = file.rules_engine;
        if let Some(ops) = r.operations {
            if ops == 0 {
                return Err(ConfigError::Invalid(
                    "rules_engine.operations must be > 0".into(),
                ));
            }
            c.rules_budget.operations = ops;
        }
        if let Some(w) = r.wall_time {
            c.rules_budget.wall = w;
        }
        if let Some(o) = r.on_error {
            c.rules_on_error = o;
        }
        if let Some(w) = r.watch {
            c.rules_watch = w;
        }

        // Push (env overrides per key).
        c.push = file.push;
        apply_push_env(&mut c.push)?;
        Ok(c)
    }

    /// Every default, with fresh random secrets: what `cargo run` gets with no config.
    pub fn defaults() -> Config {
        Config {
            listen: "127.0.0.1:7070".parse().expect("valid address"),
            redis: None,
            redis_ca: None,
            rules_dir: "rules".into(),
            rules_budget: crate::rules::Budget::default(),
            rules_on_error: crate::rules::OnError::DefaultRoute,
            rules_watch: true,
            channels_file: "channels.toml".into(),
            channels_required: false,
            node_id: default_node_id(),
            jwt: JwtConfig {
                algorithm: JwtAlgorithm::HS256,
                secret: Some(random_key()),
                public_key_pem: None,
                audience: None,
                issuer: None,
                leeway: Duration::from_secs(5),
                generated_secret: true,
            },
            api_key: random_key(),
            admin_key: random_key(),
            generated_keys: true,
            limits: Limits::default(),
            presence_ttl: Duration::from_secs(60),
            heartbeat: Duration::from_secs(20),
            room_presence: RoomPresenceConfig::default(),
            cors_origins: vec!["*".into()],
            ws_origins: Vec::new(),
            metrics_require_admin: false,
            tcp_nodelay: true,
            direct_writes: true,
            io_uring: true,
            coalesce: Coalesce::Auto,
            coalesce_window: Duration::from_millis(40),
            read_timeout: Duration::from_secs(10),
            max_connections: None,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_lease: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            push: PushConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

fn read_file_config(p: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(p).map_err(|e| ConfigFileError {
        file: p.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    Ok(parse_toml(&p.display().to_string(), &text)?)
}

fn parse_alg(s: &str) -> Result<JwtAlgorithm, ConfigError> {
    match s.to_ascii_uppercase().as_str() {
        "HS256" => Ok(JwtAlgorithm::HS256),
        "RS256" => Ok(JwtAlgorithm::RS256),
        "ES256" => Ok(JwtAlgorithm::ES256),
        other => Err(ConfigError::Invalid(format!(
            "jwt algorithm {other:?} is not supported (HS256, RS256 or ES256)"
        ))),
    }
}

fn guess_alg(pem: &[u8]) -> Option<JwtAlgorithm> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("BEGIN RSA PUBLIC KEY") {
        return Some(JwtAlgorithm::RS256);
    }
    if text.contains("BEGIN PUBLIC KEY") {
        // SubjectPublicKeyInfo: RSA and EC keys share the armour; try both parsers.
        if jsonwebtoken::DecodingKey::from_ec_pem(pem).is_ok() {
            return Some(JwtAlgorithm::ES256);
        }
        if jsonwebtoken::DecodingKey::from_rsa_pem(pem).is_ok() {
            return Some(JwtAlgorithm::RS256);
        }
    }
    None
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn apply_push_env(p: &mut PushConfig) -> Result<(), ConfigError> {
    for (name, slot) in [
        ("HERALD_PUSH_BURST_WINDOW", &mut p.burst_window),
        ("HERALD_PUSH_RECLAIM_AFTER", &mut p.reclaim_after),
        ("HERALD_PUSH_DEFAULT_AFTER", &mut p.default_after),
    ] {
        if let Some(v) = env(name) {
            let d = crate::channels::parse_duration(&v)
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            *slot = Some(d);
        }
    }
    if let Some(v) = env("HERALD_PUSH_MAX_ATTEMPTS") {
        p.max_attempts = Some(v.parse().map_err(|_| {
            ConfigError::Invalid("HERALD_PUSH_MAX_ATTEMPTS: a whole number".into())
        })?);
    }
    if env("HERALD_PUSH_FCM_ENDPOINT").is_some() || env("HERALD_PUSH_FCM_CREDENTIALS").is_some() {
        let f = p.fcm.get_or_insert_with(Default::default);
        if let Some(v) = env("HERALD_PUSH_FCM_ENDPOINT") {
            f.endpoint = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_FCM_CREDENTIALS") {
            f.credentials = Some(v.into());
        }
    }
    let apns_keys = ["ENDPOINT", "KEY_FILE", "KEY_ID", "TEAM_ID", "TOPIC"];
    if apns_keys
        .iter()
        .any(|k| env(&format!("HERALD_PUSH_APNS_{k}")).is_some())
    {
        let a = p.apns.get_or_insert_with(Default::default);
        if let Some(v) = env("HERALD_PUSH_APNS_ENDPOINT") {
            a.endpoint = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_APNS_KEY_FILE") {
            a.key_file = Some(v.into());
        }
        if let Some(v) = env("HERALD_PUSH_APNS_KEY_ID") {
            a.key_id = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_APNS_TEAM_ID") {
            a.team_id = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_APNS_TOPIC") {
            a.topic = Some(v);
        }
    }
    let webpush_keys = ["VAPID_KEY", "SUBJECT", "ALLOWED_HOSTS", "ALLOW_LOOPBACK"];
    if webpush_keys
        .iter()
        .any(|k| env(&format!("HERALD_PUSH_WEBPUSH_{k}")).is_some())
    {
        let w = p.webpush.get_or_insert_with(Default::default);
        if let Some(v) = env("HERALD_PUSH_WEBPUSH_VAPID_KEY") {
            w.vapid_key = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_WEBPUSH_SUBJECT") {
            w.subject = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_WEBPUSH_ALLOWED_HOSTS") {
            w.allowed_hosts = Some(split_list(&v));
        }
        if let Some(v) = env_flag("HERALD_PUSH_WEBPUSH_ALLOW_LOOPBACK")? {
            w.allow_loopback = v;
        }
    }
    if env("HERALD_PUSH_WEBHOOK_URL").is_some() || env("HERALD_PUSH_WEBHOOK_SECRET").is_some() {
        let w = p.webhook.get_or_insert_with(Default::default);
        if let Some(v) = env("HERALD_PUSH_WEBHOOK_URL") {
            w.url = Some(v);
        }
        if let Some(v) = env("HERALD_PUSH_WEBHOOK_SECRET") {
            w.secret = Some(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_in_herald_toml_names_file_line_key() {
        let err = parse_toml::<FileConfig>(
            "herald.toml",
            "listen = \"127.0.0.1:1\"\n[auth]\nsecrte = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("herald.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("secrte"), "{err}");
    }

    #[test]
    fn bad_duration_names_line() {
        let err = parse_toml::<FileConfig>("herald.toml", "[presence]\nttl = \"5 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
