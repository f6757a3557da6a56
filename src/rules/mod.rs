//! Routing decisions. For now every event is routed by its channel's defaults in `channels.toml`; the
//! Rhai rule set (hot-reloaded `rules/*.rhai`) arrives with the rules issue and returns the same
//! [`Decision`] type, so the publish pipeline does not change when it does.
//!
//! Imports only the vocabulary (`channels`, `event`); never `engine`, `backend` or `transport`.

pub mod decision;

pub use decision::{Decision, DevicePolicy, PushPolicy, PushWhen};

use std::sync::Arc;

use crate::channels::{ChannelKinds, ChannelName};

/// Where an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A backend through the HTTP API.
    Api,
    /// A client connection.
    Client,
}

impl Source {
    /// As scripts will see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Client => "client",
        }
    }
}

/// What routing sees of an event.
#[derive(Debug)]
pub struct RouteInput<'a> {
    /// Event type.
    pub event: &'a str,
    /// Target channels the publisher named.
    pub targets: &'a [ChannelName],
    /// Sender user, when any.
    pub from: Option<&'a str>,
    /// API or client.
    pub source: Source,
}

/// The channel-default route: deliver to the named targets; the sender is excluded where the kind says
/// `except_sender`; persist and unread per target kind (left to [`Decision::persist_for`]).
pub fn default_route(_kinds: &ChannelKinds, input: &RouteInput<'_>) -> Decision {
    Decision {
        to: input.targets.to_vec(),
        except: Vec::new(),
        except_sender: true,
        persist: None,
        unread: None,
        devices: DevicePolicy::All,
        push: None,
        drop: None,
    }
}

/// The rule set an engine routes with. Today: channel defaults only.
#[derive(Clone)]
pub struct RuleSet {
    kinds: Arc<ChannelKinds>,
}

impl RuleSet {
    /// Channel defaults only.
    pub fn defaults(kinds: Arc<ChannelKinds>) -> Self {
        RuleSet { kinds }
    }

    /// Evaluates `route` once for a publish.
    pub fn route(&self, input: &RouteInput<'_>) -> Decision {
        default_route(&self.kinds, input)
    }
}
