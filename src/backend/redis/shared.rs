//! What the Redis broker's tasks share (the publisher, the subscription manager, the reader that
//! heals gaps, the probe): the command connection and scripts, the node's sink, and each subscribed
//! channel's local subscriber count and last seq handed over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Mutex, OnceLock};

use redis::Script;
use redis::aio::ConnectionManager;

use crate::backend::DeliverySink;
use crate::channels::ChannelName;
use crate::event::Position;

/// The broker's Lua steps.
pub(super) struct Scripts {
    pub(super) publish: Script,
    pub(super) position: Script,
    pub(super) read: Script,
}

/// The broker's state, shared by its tasks.
pub(super) struct Shared {
    pub(super) keys: super::Keys,
    pub(super) cmd: ConnectionManager,
    pub(super) scripts: Scripts,
    pub(super) sink: OnceLock<Arc<dyn DeliverySink>>,
    pub(super) channels: Mutex<HashMap<String, ChannelState>>,
    /// Last time the probe came back (unix ms, local clock).
    pub(super) probe_seen: AtomicI64,
    pub(super) healthy: AtomicBool,
}

/// Per subscribed channel: local subscriber count and the last seq handed to the sink.
pub(super) struct ChannelState {
    pub(super) name: ChannelName,
    pub(super) count: usize,
    pub(super) last: Option<Position>,
    /// Redis confirmed the SUBSCRIBE and the baseline is read: another local subscriber only
    /// raises `count` (see `Broker::subscribe`). False while the manager's batch is in flight.
    pub(super) live: bool,
}
