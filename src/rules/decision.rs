//! The typed routing [`Decision`]: what `route(event)` returns (today: the channel defaults).

use std::sync::Arc;
use std::time::Duration;

use crate::channels::{ChannelKinds, ChannelName};

/// Which of a recipient's devices get an event live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DevicePolicy {
    /// Every session.
    #[default]
    All,
    /// Sessions in the foreground.
    Foreground,
    /// The most recently connected session of each user.
    Latest,
    /// iOS and Android sessions.
    Mobile,
    /// Web and desktop sessions.
    Web,
}

/// When a push notification is sent (executed by the push issue; stored in the decision now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushWhen {
    /// Never.
    Never,
    /// The recipient has no live session.
    Offline,
    /// No foreground session.
    Background,
    /// Not acknowledged by any device within `after`.
    Unacked,
    /// Always.
    Always,
}

/// A push policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PushPolicy {
    /// When.
    pub when: PushWhen,
    /// Delay for `unacked`.
    pub after: Option<Duration>,
    /// Notification title.
    pub title: Option<String>,
    /// Notification body.
    pub body: Option<String>,
    /// Extra data.
    pub data: Option<serde_json::Value>,
    /// Collapse key.
    pub collapse: Option<String>,
    /// Time to live.
    pub ttl: Option<Duration>,
}

/// How one event is routed.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Target channels.
    pub to: Vec<ChannelName>,
    /// Users excluded from live delivery.
    pub except: Vec<Arc<str>>,
    /// Also exclude the sender where the channel kind says `except_sender`.
    pub except_sender: bool,
    /// Store (history, seq); `None` = each target kind's default.
    pub persist: Option<bool>,
    /// Count as unread; `None` = each target kind's default.
    pub unread: Option<bool>,
    /// Device policy for live delivery.
    pub devices: DevicePolicy,
    /// Push policy.
    pub push: Option<PushPolicy>,
    /// Rejected, with this reason.
    pub drop: Option<String>,
}

impl Decision {
    /// Whether the event is stored on `channel`.
    pub fn persist_for(&self, kinds: &ChannelKinds, channel: &ChannelName) -> bool {
        self.persist.unwrap_or_else(|| kinds.of(channel).persist)
    }

    /// Whether the event counts as unread on `channel` (only stored room events can).
    pub fn unread_for(&self, kinds: &ChannelKinds, channel: &ChannelName) -> bool {
        self.persist_for(kinds, channel) && self.unread.unwrap_or_else(|| kinds.of(channel).unread)
    }

    /// Users excluded from live delivery on `channel`, given the sender.
    pub fn except_for(
        &self,
        kinds: &ChannelKinds,
        channel: &ChannelName,
        from: Option<&str>,
    ) -> Vec<Arc<str>> {
        let mut v = self.except.clone();
        if self.except_sender
            && kinds.of(channel).except_sender
            && let Some(f) = from
            && !v.iter().any(|u| &**u == f)
        {
            v.push(f.into());
        }
        v
    }
}
