//! herald: a real-time notification engine.
//!
//! Clients hold a WebSocket or SSE connection; backends publish events over an HTTP API; for every
//! event herald decides who receives it (a user's channel, a room's members, those who have the room
//! open, everyone), delivers it to every device on any node, keeps a replayable, seq-numbered history,
//! tracks presence, counts unread messages, and (with the push issue) notifies those not there to see it.
//!
//! # Layout
//! - [`config`]: `herald.toml` + env + flags -> [`Config`].
//! - [`channels`]: channel names and the kinds of `channels.toml`.
//! - [`event`]: events, `Seq`, `Epoch`, the encoded frame, the SSE cursor.
//! - [`engine`]: the hub, the publish pipeline, sessions, presence. Knows nothing of HTTP or Redis.
//! - [`backend`]: the shared-state traits and the in-memory implementation.
//! - [`rules`]: the routing `Decision` (channel defaults today; Rhai scripts with the rules issue).
//! - [`transport`]: axum router: WebSocket, SSE, HTTP API, admin.
//! - [`metrics`]: Prometheus metric names.
//!
//! Arrows point one way: `transport -> engine -> {backend, rules}`; `channels` and `event` are shared
//! vocabulary.

pub mod backend;
pub mod channels;
pub mod config;
pub mod engine;
pub mod event;
pub mod logging;
pub mod metrics;
pub mod rules;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

pub use channels::ChannelKinds;
pub use config::Config;
pub use engine::Engine;

/// A running server (what tests and embedders hold).
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    /// The engine.
    pub engine: Engine,
    /// Credentials (mint tokens in tests with [`transport::auth::Auth::mint`]).
    pub auth: std::sync::Arc<transport::auth::Auth>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts shutting down (sessions get `disconnect` 1001).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server stops (its shutdown future resolved) and has drained.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.unwrap_or(Ok(()))
    }

    /// Shuts down and waits until the server has drained.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Locks a mutex, recovering from poisoning: the state behind herald's locks is kept consistent by each
/// critical section (no panics inside them), so a poisoned lock is still usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes room for one more item in `v`, exactly while it is short: a `Vec`'s first allocation holds
/// four items, and the per-connection lists (a user's sessions, a session's subscriptions) mostly hold
/// one or two, for every idle connection.
pub(crate) fn reserve_tight<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        if v.len() < 4 {
            v.reserve_exact(1);
        } else {
            v.reserve(1);
        }
    }
}

/// Key prefix of herald's keys in a shared Redis.
pub const REDIS_PREFIX: &str = "herald:";

/// Builds the backends for `config`: memory, or Redis when `config.redis` is set (connects now, so a
/// Redis that cannot be reached stops the start with a clear error).
pub async fn backends(config: &Config) -> anyhow::Result<backend::Backends> {
    match &config.redis {
        None => Ok(backend::Backends::memory()),
        Some(url) => {
            let ca = match &config.redis_ca {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("redis CA {}: cannot read: {e}", path.display())
                })?),
                None => None,
            };
            let r = backend::redis::RedisBackend::connect_with_ca(
                url,
                ca,
                REDIS_PREFIX,
                &config.node_id,
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot use Redis at {}: {e}", redact_url(url)))?;
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
            Ok(backend::Backends::from_redis(r))
        }
    }
}

/// A Redis URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Starts a server on `listener` with `config` and `kinds`; stops when `shutdown` resolves or
/// [`Server::shutdown`] is called.
pub async fn start(
    config: Config,
    kinds: ChannelKinds,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Server> {
    metrics::install();
    let addr = listener.local_addr()?;
    let backends = backends(&config).await?;
    let auth = transport::auth::Auth::new(&config)?;
    let token = CancellationToken::new();
    let engine =
        Engine::start(config, kinds, backends, token.clone()).map_err(|e| anyhow::anyhow!(e))?;
    let state = transport::AppState {
        engine: engine.clone(),
        auth: auth.clone(),
    };
    let task = tokio::spawn(transport::serve(listener, state, shutdown));
    Ok(Server {
        addr,
        engine,
        auth,
        shutdown: token,
        task,
    })
}
