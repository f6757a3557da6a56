//! Presence as every layer speaks of it: a user's custom status, one live session, a device in
//! `presence.changed`, a user's presence. Vocabulary: transports, the engine and the backends all use
//! these; it imports nothing of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::DeviceState;

/// A user's custom status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Available.
    #[default]
    Online,
    /// Away.
    Away,
    /// Busy.
    Busy,
    /// Do not disturb.
    Dnd,
}

/// One live session as presence records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Globally unique session id.
    pub session: Arc<str>,
    /// User id.
    pub user: Arc<str>,
    /// Device id.
    pub device: Arc<str>,
    /// `web|ios|android|desktop`, when known.
    pub platform: Option<Arc<str>>,
    /// App state.
    pub state: DeviceState,
    /// Node the session is on.
    pub node: Arc<str>,
}

/// A device as shown in `presence.changed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePresence {
    /// Device id.
    pub device: String,
    /// Platform, when known.
    pub platform: Option<String>,
    /// App state.
    pub state: DeviceState,
}

impl DevicePresence {
    /// A user's devices from their live sessions, one entry per device in device order: a device is
    /// in the foreground when any of its sessions is. Both backends build [`UserPresence::devices`] so.
    pub fn of_sessions<'a>(sessions: impl IntoIterator<Item = &'a SessionInfo>) -> Vec<Self> {
        let mut devices: BTreeMap<&str, DevicePresence> = BTreeMap::new();
        for info in sessions {
            let d = devices
                .entry(&info.device)
                .or_insert_with(|| DevicePresence {
                    device: info.device.to_string(),
                    platform: info.platform.as_deref().map(str::to_string),
                    state: info.state,
                });
            if info.state == DeviceState::Foreground {
                d.state = DeviceState::Foreground;
            }
        }
        devices.into_values().collect()
    }
}

/// A user's presence: the `presence.changed` object without `type`. `status` and `text` are the
/// custom status the user last set, on the wire only while they are online (an offline user is
/// not "online" or "busy"); they are kept meanwhile and come back with the user.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct UserPresence {
    /// User id.
    pub user: String,
    /// Any live session.
    pub online: bool,
    /// Custom status.
    #[serde(default)]
    pub status: Status,
    /// Custom status text.
    #[serde(default)]
    pub text: Option<String>,
    /// Live devices (one entry per device, even with several sessions).
    pub devices: Vec<DevicePresence>,
    /// Unix ms: when last seen (now-ish while online; when they went offline otherwise). `None` = never.
    pub last_seen: Option<i64>,
}

impl Serialize for UserPresence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("UserPresence", if self.online { 6 } else { 4 })?;
        m.serialize_field("user", &self.user)?;
        m.serialize_field("online", &self.online)?;
        if self.online {
            m.serialize_field("status", &self.status)?;
            m.serialize_field("text", &self.text)?;
        }
        m.serialize_field("devices", &self.devices)?;
        m.serialize_field("last_seen", &self.last_seen)?;
        m.end()
    }
}
