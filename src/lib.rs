//! herald: a real-time notification engine.
//!
//! Clients hold a WebSocket or SSE connection; backends publish events over an HTTP API; for every
//! event herald decides who receives it (a user's channel, a room's members, those who have the room
//! open, everyone), delivers it to every device on any node, keeps a replayable, seq-numbered history,
//! tracks presence and counts unread messages. (Push to those not there to see it is not built yet.)
//!
//! This file is the public face: [`start`] a [`Server`] on a listener with a [`Config`].
//!
//! # Layout
//! - Vocabulary, which every layer may use: [`channels`] (names, kinds, `channels.toml`), [`event`]
//!   (events, `Seq`, `Epoch`, the event frame, the SSE cursor, the event as a publisher describes
//!   it), [`device`] (app state, push registrations), [`presence`] (status, sessions, a user's
//!   presence), [`announcement`].
//! - [`config`]: `herald.toml` + environment + flags -> [`Config`].
//! - [`engine`]: the heart, one file per concern (the hub, the publish pipeline, sessions and the
//!   client protocol, rooms, history, presence, announcements, devices, access, limits, control).
//!   Knows nothing of HTTP, WebSocket framing or Redis.
//! - [`backend`]: shared state, one trait per concern, and its two implementations (memory, the
//!   single-node product; Redis, for many nodes).
//! - [`rules`]: the Rhai routing rules: sandbox, loading, the typed Decision, hot reload, fixtures.
//! - [`transport`]: the edges: connections (cap, timeouts), the WebSocket upgrade, SSE, the HTTP
//!   API, admin; they move bytes and call the engine.
//! - [`logging`]: the log sink; [`metrics`]: Prometheus metric names; `primitives`: locks and tight
//!   growth.
//!
//! Arrows point one way: `transport -> engine -> {backend, rules}`; `backend` and `rules` never import
//! `engine` or each other; the vocabulary modules import none of them.

pub mod announcement;
pub mod backend;
pub mod channels;
pub mod cli;
pub mod config;
pub mod device;
pub mod engine;
pub mod event;
pub mod logging;
pub mod metrics;
pub mod presence;
pub(crate) mod primitives;
pub mod push;
pub mod rules;
pub mod sendbatch;
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

pub use primitives::install_crypto_provider;

/// Starts a server on `listener` with `config` and `kinds`; stops when `shutdown` resolves or
/// [`Server::shutdown`] is called.
pub async fn start(
    config: Config,
    kinds: ChannelKinds,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server, StartError> {
    install_crypto_provider();
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
