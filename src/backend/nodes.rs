//! [`Nodes`]: the registry of the nodes sharing a backend (what the admin page lists), and the live
//! sessions of one user on every node (the admin page's user lookup).
//!
//! Like the rest of `backend/`, it imports nothing of `engine`, `transport` or `rules`.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::BackendResult;
use crate::presence::SessionInfo;

/// What a node says of itself on each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id (`--node-id`).
    pub id: String,
    /// When it started, unix ms (its own clock).
    pub started: i64,
    /// herald's version on it.
    pub version: String,
    /// `memory` or `redis`.
    pub backend: String,
    /// Sessions connected to it at this heartbeat.
    pub sessions: u64,
}

/// A node as the registry last heard of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeSeen {
    /// What it said.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its last heartbeat, unix ms (the backend's clock).
    pub heartbeat: i64,
    /// When its record lapses without another heartbeat, unix ms (the backend's clock).
    pub expires: i64,
}

/// The registry now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeList {
    /// The backend's clock, unix ms (what `heartbeat` and `expires` compare with).
    pub now: i64,
    /// The live nodes, by id.
    pub nodes: Vec<NodeSeen>,
}

/// The nodes sharing the backend, and the sessions they hold.
///
/// Guarantees: a node's record is live from a `node_beat` until `ttl` later (the backend's clock),
/// or until `node_gone`; a lapsed record is never listed, and nothing is kept for it (its keys go at
/// the next beat of any node, and all of them expire once the last record lapses). Each call is
/// atomic. `sessions_of` lists the live sessions presence holds ([`super::Presence`]), expired ones
/// left out as `Presence::get` leaves them out.
#[async_trait]
pub trait Nodes: Send + Sync + 'static {
    /// Records (or refreshes) a node, live for `ttl`.
    async fn node_beat(&self, node: &NodeInfo, ttl: Duration) -> BackendResult<()>;
    /// Removes a node's record (a clean shutdown).
    async fn node_gone(&self, id: &str) -> BackendResult<()>;
    /// The live nodes, by id.
    async fn nodes(&self) -> BackendResult<NodeList>;
    /// A user's live sessions on every node, by session id.
    async fn sessions_of(&self, user: &str) -> BackendResult<Vec<SessionInfo>>;
}
