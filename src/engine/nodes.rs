//! The node registry as the engine keeps it: each node records itself (id, start time, version,
//! backend, sessions) on every heartbeat tick, with an expiry of a few heartbeats, and removes its
//! record on a clean shutdown; `GET /admin/nodes` lists the records of every node sharing the
//! backend (on the memory backend, the node itself).

use std::time::Duration;

use serde::Serialize;

use super::{Engine, EngineResult, backend};
use crate::backend::{NodeInfo, NodeSeen};
use crate::event::now_ms;

/// A record lapses after this many heartbeats without a beat: a node that misses two is gone.
const BEATS_TO_LAPSE: u32 = 3;

/// This node's side of the registry.
pub(crate) struct Registry {
    /// When the engine started, unix ms.
    started: i64,
    /// Set once the record was removed at shutdown: a beat still under way then must not put it
    /// back, so beats and the removal take turns under this lock.
    gone: tokio::sync::Mutex<bool>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Registry {
            started: now_ms(),
            gone: tokio::sync::Mutex::new(false),
        }
    }
}

/// The nodes sharing the backend now (`GET /admin/nodes`).
#[derive(Debug, Serialize)]
pub struct NodesNow {
    /// The node answering.
    pub node: String,
    /// The backend's clock, unix ms (what each `heartbeat` compares with).
    pub now: i64,
    /// The live records, by id.
    pub nodes: Vec<NodeView>,
}

/// One node's record.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// What it said, and when the registry heard it.
    #[serde(flatten)]
    pub seen: NodeSeen,
    /// Milliseconds since its last heartbeat.
    pub age_ms: i64,
    /// True for the node answering.
    pub this: bool,
}

/// The background loop: a beat at start and on every heartbeat tick; ends at shutdown (the record
/// is removed by [`Engine::leave_registry`], once the node has drained).
pub(crate) async fn run(engine: Engine) {
    let mut tick = tokio::time::interval(engine.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        engine.node_beat_once().await;
    }
}

impl Engine {
    /// `memory` or `redis`.
    pub fn backend_name(&self) -> &'static str {
        if self.config.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }

    /// When this engine started, unix ms.
    pub fn started_at(&self) -> i64 {
        self.registry.started
    }

    /// How long a record lives without another beat.
    fn record_ttl(&self) -> Duration {
        self.config.heartbeat * BEATS_TO_LAPSE
    }

    /// Records this node in the registry (unless it already left it).
    pub(crate) async fn node_beat_once(&self) {
        let gone = self.registry.gone.lock().await;
        if *gone {
            return;
        }
        let info = NodeInfo {
            id: self.node.to_string(),
            started: self.registry.started,
            version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend_name().to_string(),
            sessions: self.hub.len() as u64,
        };
        if let Err(e) = backend(
            "nodes.node_beat",
            self.backends.nodes.node_beat(&info, self.record_ttl()),
        )
        .await
        {
            tracing::warn!(error = %e, "Node registry heartbeat failed.");
        }
    }

    /// Removes this node's record (a clean shutdown); later beats record nothing.
    pub async fn leave_registry(&self) {
        let mut gone = self.registry.gone.lock().await;
        if *gone {
            return;
        }
        *gone = true;
        if let Err(e) = backend("nodes.node_gone", self.backends.nodes.node_gone(&self.node)).await
        {
            tracing::warn!(error = %e, "Could not remove this node from the registry; it lapses by itself.");
        }
    }

    /// The nodes sharing the backend (`GET /admin/nodes`).
    pub async fn nodes(&self) -> EngineResult<NodesNow> {
        let list = backend("nodes.nodes", self.backends.nodes.nodes()).await?;
        Ok(NodesNow {
            node: self.node.to_string(),
            now: list.now,
            nodes: list
                .nodes
                .into_iter()
                .map(|seen| NodeView {
                    age_ms: (list.now - seen.heartbeat).max(0),
                    this: *seen.info.id == *self.node,
                    seen,
                })
                .collect(),
        })
    }
}
