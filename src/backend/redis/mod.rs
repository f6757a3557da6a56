//! The Redis backend: many nodes share one Redis 7 (presence, Pub/Sub fan-out, Streams history,
//! counters). Same contract as [`crate::backend::memory`], checked by the same conformance suite.
//!
//! - [`keys`]: every key name (hash-tagged per channel, user or room).
//! - `broker.rs`: [`crate::backend::Broker`]: one Lua step per publish target, PUBLISH in the format
//!   of `wire.rs` (the one Rust definition of the Pub/Sub envelope); `subscriptions.rs`: the
//!   subscriber connection's channels; `healing.rs`: handing messages over in seq order, gaps
//!   healed from history; `history.rs`: [`crate::backend::History`].
//! - `presence.rs`: [`crate::backend::Presence`]: per-user sorted sets scored by expiry (Redis `TIME`).
//! - `store.rs`: membership, contacts, idempotency, unread and focus, devices, announcements.
//! - `nodes.rs`: [`crate::backend::Nodes`]: the node registry, a user's sessions on every node.
//!
//! Imports nothing of `engine`, `transport` or `rules`.

/// A Lua script made of files from `lua/`, concatenated in order: the shared libraries a script uses
/// (`channel_lib.lua`, `unread_lib.lua`, …), then the script's own text.
macro_rules! lua {
    ($($file:literal),+ $(,)?) => {
        redis::Script::new(concat!($(include_str!(concat!("lua/", $file))),+))
    };
}

mod broker;
mod healing;
mod history;
pub mod keys;
mod nodes;
mod outbox;
mod presence;
mod shared;
mod store;
mod subscriptions;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation, ServerErrorKind, Value};

use crate::backend::{BackendError, Backends};
pub use keys::Keys;

/// Deadline for one Redis command (the engine answers 503 past 2 s anyway).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Maps a Redis error to the backend contract ([`BackendError`]):
/// - Redis refused the command without running it (loading its data after a restart, a replica that
///   became read-only in a failover, a cluster or master down, an unreachable server): `Unavailable`;
/// - the connection broke, or the reply did not come in time, once the command may have been sent:
///   `OutcomeUnknown` (a script may have run: only the caller knows whether sending again is safe);
/// - anything else (a script or type error: a bug): `Internal`.
pub(crate) fn err(e: redis::RedisError) -> BackendError {
    if let Some(kind) = refused(e.kind()) {
        return BackendError::Unavailable(format!("Redis {kind}: {e}"));
    }
    if e.is_connection_refusal() {
        BackendError::Unavailable(e.to_string())
    } else if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        BackendError::OutcomeUnknown(e.to_string())
    } else {
        BackendError::Internal(e.to_string())
    }
}

/// The server errors that mean Redis did not run the command and may take it later.
fn refused(kind: redis::ErrorKind) -> Option<&'static str> {
    use redis::ErrorKind::Server;
    Some(match kind {
        Server(ServerErrorKind::BusyLoading) => "is loading its data",
        Server(ServerErrorKind::ReadOnly) => "is read-only (a replica)",
        Server(ServerErrorKind::MasterDown) => "has its master down",
        Server(ServerErrorKind::ClusterDown) => "cluster is down",
        Server(ServerErrorKind::TryAgain) => "asks to try again",
        _ => return None,
    })
}

/// Stands for an id when splitting a key name into pieces (ids never contain NUL).
const MARK: &str = "\u{0}";

/// The literal pieces of a key name built with [`MARK`] for each of its `ids` ids, so a script can
/// rebuild the key for ids it only learns inside Redis while `keys.rs` stays the one place that
/// names keys.
fn pieces(key: String, ids: usize) -> Result<Vec<String>, BackendError> {
    let p: Vec<String> = key.split(MARK).map(str::to_string).collect();
    if p.len() == ids + 1 {
        Ok(p)
    } else {
        Err(BackendError::Internal(
            "a Redis key prefix contains NUL".into(),
        ))
    }
}

/// Sends script calls in one pipeline as `EVALSHA` only, and returns one reply per call, in order.
///
/// redis-rs loads a script by itself only for a single `invoke_async`; in a pipeline it sends the bare
/// `EVALSHA`. When Redis does not know a script (a restart, a failover, `SCRIPT FLUSH`), the calls
/// that failed with `NOSCRIPT` did nothing: this loads their scripts and sends those calls (and only
/// those, so none runs twice) once more. Any other error fails the whole call, as a pipeline does.
async fn eval_pipeline(
    con: &mut ConnectionManager,
    calls: &[(&Script, ScriptInvocation<'_>)],
) -> Result<Vec<Value>, BackendError> {
    async fn send(
        con: &mut ConnectionManager,
        calls: &[(&Script, ScriptInvocation<'_>)],
        which: &[usize],
    ) -> Result<Vec<Value>, BackendError> {
        let mut pipe = redis::pipe();
        // Per-call replies, errors included, so a NOSCRIPT can be told from the rest.
        pipe.ignore_errors();
        for &i in which {
            pipe.invoke_script(&calls[i].1);
        }
        let replies: Vec<Value> = pipe.query_async(con).await.map_err(err)?;
        if replies.len() == which.len() {
            Ok(replies)
        } else {
            Err(BackendError::Internal(format!(
                "{} replies to a pipeline of {} script calls",
                replies.len(),
                which.len()
            )))
        }
    }
    fn noscript(v: &Value) -> bool {
        matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
    }
    let all: Vec<usize> = (0..calls.len()).collect();
    let mut replies = send(con, calls, &all).await?;
    let missing: Vec<usize> = all.into_iter().filter(|&i| noscript(&replies[i])).collect();
    if !missing.is_empty() {
        let mut loaded: Vec<&str> = Vec::new();
        for &i in &missing {
            let script = calls[i].0;
            if !loaded.contains(&script.get_hash()) {
                script.load_async(con).await.map_err(err)?;
                loaded.push(script.get_hash());
            }
        }
        let again = send(con, calls, &missing).await?;
        for (i, reply) in missing.into_iter().zip(again) {
            replies[i] = reply;
        }
    }
    if let Some(Value::ServerError(e)) = replies.iter().find(|v| matches!(v, Value::ServerError(_)))
    {
        return Err(
            match e.kind().and_then(|k| refused(redis::ErrorKind::Server(k))) {
                Some(why) => BackendError::Unavailable(format!("Redis {why}: {e}")),
                None => BackendError::Internal(format!("Redis script error: {e}")),
            },
        );
    }
    Ok(replies)
}

/// One Redis deployment as herald's backend.
pub struct RedisBackend {
    /// Command connection (multiplexed; reconnects by itself).
    pub(crate) cmd: ConnectionManager,
    /// Key names.
    pub(crate) keys: Keys,
    /// Fan-out and history.
    broker: broker::RedisBroker,
}

fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

impl RedisBackend {
    /// Connects to `url` (`redis://`, `rediss://`, `unix://`) with keys under `prefix`, as node `node`.
    /// Fails when Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str, node: &str) -> Result<Arc<Self>, BackendError> {
        Self::connect_with_ca(url, None, prefix, node).await
    }

    /// Like [`RedisBackend::connect`]; `ca_pem` (PEM) replaces the system roots for `rediss://`
    /// (a private CA).
    pub async fn connect_with_ca(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        prefix: &str,
        node: &str,
    ) -> Result<Arc<Self>, BackendError> {
        crate::primitives::install_crypto_provider(); // rustls needs one for `rediss://`
        let bad_url = |e: redis::RedisError| {
            BackendError::Internal(format!(
                "bad Redis URL: {}",
                e.detail().unwrap_or("invalid")
            ))
        };
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                resp3(url),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            None => redis::Client::open(resp3(url)),
        }
        .map_err(bad_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let cmd = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(err)?;
        let keys = Keys::new(prefix);
        let broker =
            broker::RedisBroker::start(client, config, cmd.clone(), keys.clone(), node).await?;
        Ok(Arc::new(RedisBackend { cmd, keys, broker }))
    }

    /// Redis's `maxmemory-policy` (herald's keys need `noeviction`). An error when Redis will not
    /// say (a managed Redis that renamed or disabled `CONFIG`).
    pub async fn eviction_policy(&self) -> Result<String, BackendError> {
        let mut con = self.cmd.clone();
        let reply: Value = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut con)
            .await
            .map_err(err)?;
        // RESP3 answers a map, RESP2 a flat [name, value] array.
        let value = match reply {
            Value::Map(pairs) => pairs.into_iter().next().map(|(_, v)| v),
            Value::Array(items) => items.into_iter().nth(1),
            _ => None,
        };
        match value {
            Some(v) => redis::from_redis_value::<String>(v)
                .map_err(|e| BackendError::Internal(format!("maxmemory-policy: {e}"))),
            None => Err(BackendError::Internal(
                "CONFIG GET maxmemory-policy gave no value".into(),
            )),
        }
    }
}

/// Key prefix of herald's keys in a shared Redis.
pub const PREFIX: &str = "herald:";

/// A Redis URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A node's backends on the Redis at `url` (keys under [`PREFIX`]), warning when Redis may evict
/// them. Errors name the URL without its password.
pub(super) async fn open(
    url: &str,
    ca: Option<&std::path::Path>,
    node: &str,
) -> Result<Backends, BackendError> {
    let ca = match ca {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            BackendError::Internal(format!("redis CA {}: cannot read: {e}", path.display()))
        })?),
        None => None,
    };
    let named = |e: BackendError| {
        let why = match e {
            BackendError::Unavailable(m)
            | BackendError::OutcomeUnknown(m)
            | BackendError::Internal(m) => m,
        };
        BackendError::Unavailable(format!("cannot use Redis at {}: {why}", redact_url(url)))
    };
    let r = RedisBackend::connect_with_ca(url, ca, PREFIX, node)
        .await
        .map_err(named)?;
    match r.eviction_policy().await {
        Ok(policy) if policy == "noeviction" => {}
        Ok(policy) => tracing::warn!(
            policy,
            "Redis maxmemory-policy is not noeviction: Redis may evict herald's state (history, presence, idempotency, membership)."
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "Could not check Redis maxmemory-policy; it must be noeviction, or Redis may evict herald's state."
        ),
    }
    r.ensure_push_group().await.map_err(named)?;
    Ok(Backends::of(r))
}

impl Backends {
    /// The Redis backend for `url`, keys under `prefix`.
    pub async fn redis(url: &str, prefix: &str, node: &str) -> Result<Self, BackendError> {
        Ok(Self::of(RedisBackend::connect(url, prefix, node).await?))
    }
}
