//! The in-memory backend: the single-node product (`cargo run` with no Redis) and the reference
//! implementation of the backend traits.
//!
//! Locks are `std::sync::Mutex` (never held across `.await`: every method body is synchronous).
//! Channels are sharded so publishes to different channels do not contend; a channel's own lock makes
//! "assign seq, store, hand to the sink" one atomic step, which is what keeps live delivery in seq order.

mod broker;
mod nodes;
mod outbox;
mod presence;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::backend::{Backends, DeliverySink};
use crate::channels::ChannelName;
use broker::ChannelLog;

const SHARDS: usize = 64;

/// In-process implementation of [`crate::backend::Broker`], [`crate::backend::History`],
/// [`crate::backend::Presence`] and the other traits of [`crate::backend`].
pub struct Memory {
    sink: OnceLock<Arc<dyn DeliverySink>>,
    channels: Vec<Mutex<HashMap<ChannelName, Arc<Mutex<ChannelLog>>>>>,
    presence: Mutex<presence::PresenceState>,
    store: Mutex<store::StoreState>,
    outbox: Mutex<outbox::OutboxState>,
    nodes: Mutex<nodes::NodesState>,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory {
    /// An empty backend.
    pub fn new() -> Self {
        Memory {
            sink: OnceLock::new(),
            channels: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            presence: Mutex::new(Default::default()),
            store: Mutex::new(Default::default()),
            outbox: Mutex::new(Default::default()),
            nodes: Mutex::new(Default::default()),
        }
    }
}

impl Backends {
    /// The in-memory backend (single node).
    pub fn memory() -> Self {
        Backends::of(Arc::new(Memory::new()))
    }
}
