//! Memory [`Nodes`]: one process, so the registry holds the node itself (and whatever else shares
//! this `Memory`, as tests do); times are this process's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use super::Memory;
use crate::backend::{BackendResult, NodeInfo, NodeList, NodeSeen, Nodes};
use crate::event::now_ms;
use crate::presence::SessionInfo;
use crate::primitives::lock;

/// The records, by node id.
#[derive(Default)]
pub(super) struct NodesState {
    nodes: BTreeMap<String, NodeSeen>,
}

#[async_trait]
impl Nodes for Memory {
    async fn node_beat(&self, node: &NodeInfo, ttl: Duration) -> BackendResult<()> {
        let now = now_ms();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let mut n = lock(&self.nodes);
        n.nodes.retain(|_, seen| seen.expires > now);
        n.nodes.insert(
            node.id.clone(),
            NodeSeen {
                info: node.clone(),
                heartbeat: now,
                expires: now.saturating_add(ttl_ms),
            },
        );
        Ok(())
    }

    async fn node_gone(&self, id: &str) -> BackendResult<()> {
        lock(&self.nodes).nodes.remove(id);
        Ok(())
    }

    async fn nodes(&self) -> BackendResult<NodeList> {
        let now = now_ms();
        let mut n = lock(&self.nodes);
        n.nodes.retain(|_, seen| seen.expires > now);
        Ok(NodeList {
            now,
            nodes: n.nodes.values().cloned().collect(),
        })
    }

    async fn sessions_of(&self, user: &str) -> BackendResult<Vec<SessionInfo>> {
        Ok(self.live_sessions(user))
    }
}
