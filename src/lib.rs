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

pub mod announcement;
pub mod backend;
pub mod channels;
pub mod config;
pub mod device;
pub mod engine;
pub mod event;
pub mod logging;
pub mod metrics;
pub mod presence;
pub(crate) mod primitives;
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

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    /// The backend could not be opened (Redis unreachable, a bad URL or CA).
    #[error("{0}")]
    Backend(#[from] backend::BackendError),
    /// The JWT key cannot be used.
    #[error("auth: {0}")]
    Auth(#[from] transport::auth::KeyError),
    /// The rules do not compile, or their fixtures fail.
    #[error("{0}")]
    Rules(String),
}

/// Starts a server on `listener` with `config` and `kinds`; stops when `shutdown` resolves or
/// [`Server::shutdown`] is called.
pub async fn start(
    config: Config,
    kinds: ChannelKinds,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server, StartError> {
    metrics::install();
    let addr = listener.local_addr()?;
    let backends = backend::Backends::open(
        config.redis.as_deref(),
        config.redis_ca.as_deref(),
        &config.node_id,
    )
    .await?;
    let auth = transport::auth::Auth::new(&config)?;
    let token = CancellationToken::new();
    let engine =
        Engine::start(config, kinds, backends, token.clone()).map_err(StartError::Rules)?;
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
