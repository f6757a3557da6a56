//! The heart of herald: owns the hub, the backends, the rule set; runs the publish pipeline, sessions
//! and presence. Knows nothing of HTTP, WebSocket framing or Redis: transports call it, backends serve it.
//!
//! Layout, by concern (each file names what it owns; operations return typed results that
//! transports serialise):
//! - [`hub`]: local registry and fan-out;
//! - `coalesce`: the flush tick of coalesced writes, and when to coalesce;
//! - [`pipeline`]: the publish path (dedupe -> route -> append+publish -> unread -> reply);
//! - [`session`]: one connected device and its ops;
//! - [`protocol`]: client frames parsed into ops, replies as frames, and a session's life over a
//!   two-way transport;
//! - [`access`]: who may subscribe, publish, act as a member, watch;
//! - [`limits`]: id and list checks, one error code each;
//! - [`rooms`]: membership, the atomic leave, read pointers and unread;
//! - [`history`]: reading a channel by seq range;
//! - [`announcements`]: announcements and the login sync;
//! - [`devices`]: push device registrations;
//! - [`presence`]: heartbeats, sweeps, presence frames and queries, contacts;
//! - [`roompresence`]: room presence changes coalesced per room and interval;
//! - [`control`]: what the engine sends past the rules (`emit`), and the cross-node kick;
//! - [`pushplan`]: who gets a push and who gets an event live (device policy), per recipient;
//! - [`pushsend`]: the sending loop (outbox, timers, retries, dead letters, dead tokens);
//! - [`nodes`]: this node's record in the node registry;
//! - [`inspect`]: what an operator looks up (a user, a channel).

pub mod access;
pub mod announcements;
mod coalesce;
pub mod control;
pub mod devices;
pub mod history;
pub mod hub;
pub mod inspect;
pub mod limits;
pub mod nodes;
pub mod pipeline;
pub mod presence;
pub mod protocol;
pub mod pushplan;
pub mod pushsend;
pub mod roompresence;
pub mod rooms;
pub mod session;
mod subs;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Backends};
use crate::channels::ChannelKinds;
use crate::config::Config;
use crate::rules::reload::{Rules, RulesConfig};

pub use hub::{CloseReason, Hub, Next, Outbound, SessionHandle};
pub use pipeline::{PublishReply, PublishRequest};
pub use session::{Session, SessionOpen, Transport};

/// How long a backend operation may take before the caller gets `unavailable`.
pub const BACKEND_DEADLINE: Duration = Duration::from_secs(2);

/// Error codes of the wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Unparseable frame or body, unknown op, bad field.
    BadFrame,
    /// Invalid channel name or id.
    BadChannel,
    /// Bad or missing credentials.
    Unauthorized,
    /// Not allowed.
    Forbidden,
    /// Not a member of the room.
    NotMember,
    /// Over a rate limit.
    RateLimited,
    /// Over a size or count limit.
    TooLarge,
    /// Dropped by a rule.
    Rejected,
    /// Backend down; nothing was stored.
    Unavailable,
    /// Backend lost after a publish was sent: it may have been stored (HTTP 503). A retry with the
    /// same idempotency key finds out; without a key a retry may store it twice.
    OutcomeUnknown,
    /// Not found (HTTP only).
    NotFound,
    /// A bug or an unexpected backend answer.
    Internal,
}

impl ErrorCode {
    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotMember => "not_member",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Rejected => "rejected",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An engine error: a wire code and a message safe to show to the caller.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// Wire code.
    pub code: ErrorCode,
    /// Human-readable message (never internals or secrets).
    pub message: String,
}

impl EngineError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EngineError {
            code,
            message: message.into(),
        }
    }
}

impl From<BackendError> for EngineError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(m) => {
                tracing::warn!(error = %m, "Backend unavailable.");
                EngineError::new(
                    ErrorCode::Unavailable,
                    "backend unavailable; nothing was done",
                )
            }
            // Outside a publish (which says what it knows itself), an operation whose outcome is
            // unknown is one to try again: every other write is idempotent or only moves forward.
            BackendError::OutcomeUnknown(m) => {
                tracing::warn!(error = %m, "Backend lost during an operation.");
                EngineError::new(ErrorCode::Unavailable, "backend unavailable; try again")
            }
            BackendError::Internal(m) => {
                tracing::error!(error = %m, "Backend error.");
                EngineError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl From<crate::channels::ChannelError> for EngineError {
    fn from(e: crate::channels::ChannelError) -> Self {
        EngineError::new(ErrorCode::BadChannel, e.to_string())
    }
}

/// Result of an engine operation.
pub type EngineResult<T> = Result<T, EngineError>;

/// Runs the backend call `op` (its metric label, `store.method`) with the [`BACKEND_DEADLINE`]; an
/// answer that does not come in time is an unknown outcome (the call may have been carried out).
pub(crate) async fn within_deadline<T>(
    op: &'static str,
    f: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let started = std::time::Instant::now();
    let r = match tokio::time::timeout(BACKEND_DEADLINE, f).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::OutcomeUnknown("no answer in time".into())),
    };
    let failed = r.as_ref().err().map(|e| match e {
        BackendError::Unavailable(_) => "unavailable",
        BackendError::OutcomeUnknown(_) => "outcome_unknown",
        BackendError::Internal(_) => "other",
    });
    crate::metrics::backend_call(op, started.elapsed(), failed);
    r
}

/// Runs the backend call `op` with the [`BACKEND_DEADLINE`], its error as the caller sees it.
pub(crate) async fn backend<T>(
    op: &'static str,
    f: impl Future<Output = Result<T, BackendError>>,
) -> EngineResult<T> {
    within_deadline(op, f).await.map_err(EngineError::from)
}

/// The engine: cheap to clone, shared by every transport.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// What the engine owns.
pub struct Inner {
    /// Configuration.
    pub config: Config,
    /// Routing rules and channel kinds (hot-reloaded together).
    pub rules: Arc<Rules>,
    /// Shared state.
    pub backends: Backends,
    /// Local registry.
    pub hub: Arc<Hub>,
    /// This node's id.
    pub node: Arc<str>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The configured push providers.
    pub push: crate::push::Providers,
    /// Room presence changes held for their room's interval.
    pub room_presence: roompresence::Coalescer,
    next_session: AtomicU64,
    /// This node in the node registry.
    registry: nodes::Registry,
}

impl std::ops::Deref for Engine {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Engine {
    /// Builds an engine on `backends` and starts its background loops (presence heartbeats and
    /// sweeps; the rules watcher when the rules directory exists), which stop when `shutdown` is
    /// cancelled. Fails when the rules do not compile or their fixtures fail.
    pub fn start(
        config: Config,
        kinds: ChannelKinds,
        backends: Backends,
        shutdown: CancellationToken,
    ) -> Result<Engine, String> {
        let rules_config = RulesConfig {
            dir: std::path::absolute(&config.rules_dir)
                .unwrap_or_else(|_| config.rules_dir.clone()),
            channels_file: std::path::absolute(&config.channels_file)
                .unwrap_or_else(|_| config.channels_file.clone()),
            channels_required: config.channels_required,
            budget: config.rules_budget,
            on_error: config.rules_on_error,
        };
        let set = crate::rules::reload::build_with(&rules_config, Arc::new(kinds), 1)
            .map_err(|e| format!("rules: {e}"))?;
        let watch = rules_config.dir.is_dir() && config.rules_watch;
        let rules = Rules::fixed(set, rules_config);
        if watch {
            rules.watch(shutdown.clone())?;
        }
        let push = crate::push::Providers::from_config(&config.push)?;
        if push.kinds().is_empty() {
            tracing::info!("No push provider configured: rules' push decisions are not planned.");
        } else {
            let kinds: Vec<&str> = push.kinds().iter().map(|k| k.as_str()).collect();
            tracing::info!(providers = %kinds.join(","), "Push providers configured.");
        }
        if let Some(w) = push.webpush_public_key() {
            tracing::info!(application_server_key = %w, "Web Push VAPID public key (the browser's applicationServerKey).");
        }
        let hub = Arc::new(Hub::new());
        backends.broker.attach(hub.clone());
        let engine = Engine {
            inner: Arc::new(Inner {
                node: config.node_id.as_str().into(),
                rules,
                config,
                backends,
                hub,
                shutdown,
                push,
                room_presence: Default::default(),
                next_session: AtomicU64::new(1),
                registry: nodes::Registry::new(),
            }),
        };
        tokio::spawn(presence::run(engine.clone()));
        tokio::spawn(expire_tokens(engine.clone()));
        tokio::spawn(pushsend::run(engine.clone()));
        tokio::spawn(sample_metrics(engine.clone()));
        tokio::spawn(nodes::run(engine.clone()));
        tokio::spawn(coalesce::run(engine.clone()));
        crate::sendbatch::set_enabled(engine.config.io_uring);
        Ok(engine)
    }

    /// The channel kinds in force (they reload with the rules).
    pub fn kinds(&self) -> Arc<ChannelKinds> {
        self.rules.current().kinds().clone()
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Closes every local session with `reason` (shutdown: 1001, reconnect).
    pub fn close_all(&self, reason: CloseReason) {
        for s in self.hub.sessions() {
            s.close(reason);
        }
    }

    /// The rules in force and their reloads (`GET /admin/rules`).
    pub fn rules_status(&self) -> crate::rules::reload::RulesStatus {
        self.rules.status()
    }

    /// Whether the backend answers (`/readyz`).
    pub async fn ready(&self) -> bool {
        backend("broker.ping", self.backends.broker.ping())
            .await
            .is_ok()
    }
}

/// Refreshes the sampled gauges (subscriptions, local channels, the queue high-water mark) every
/// [`crate::metrics::SAMPLE_EVERY`]; folds histogram samples and gives the allocator's free memory
/// back to the system every [`crate::metrics::UPKEEP_EVERY`] (a trim took 0.1-1.1 ms at 1M
/// deliveries/s; one that takes longer is followed by a longer pause), off the runtime's workers.
async fn sample_metrics(engine: Engine) {
    let mut tick = tokio::time::interval(crate::metrics::UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = (crate::metrics::SAMPLE_EVERY.as_millis()
        / crate::metrics::UPKEEP_EVERY.as_millis())
    .max(1) as u64;
    let mut next_trim = tokio::time::Instant::now();
    for n in 0u64.. {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        crate::metrics::upkeep();
        if tokio::time::Instant::now() >= next_trim {
            // On a blocking-pool thread: a runtime worker never waits for it (only an allocation
            // from the arena being trimmed does, for that arena's part).
            let started = tokio::time::Instant::now();
            let _ = tokio::task::spawn_blocking(crate::primitives::give_back_free_memory).await;
            // At most 1 % of a thread's time, however large and fragmented the heap grows.
            next_trim = started + (started.elapsed() * 100).max(crate::metrics::UPKEEP_EVERY);
        }
        if n % every == 0 {
            crate::metrics::sample(engine.hub.sample());
            crate::metrics::roll_high_water();
        }
    }
}

/// Closes sessions whose token expired with 4002: one sweep a second for the node, rather than a timer
/// in every connection (most of an idle connection's memory is what its task holds while it waits).
async fn expire_tokens(engine: Engine) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A token is valid until `exp` plus the clock leeway, the same allowance it got at connect:
        // without it a token accepted inside the leeway would be closed at the next sweep.
        let now = (crate::event::now_ms() / 1000) as u64;
        let leeway = engine.config.jwt.leeway.as_secs();
        for s in engine.hub.expired(now.saturating_sub(leeway)) {
            s.close(CloseReason::TokenExpired);
        }
    }
}
