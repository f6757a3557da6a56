//! A device as herald knows it: its app state (foreground or background), its platform, and the push
//! registration of a device (`PUT /api/v1/users/{user}/devices/{device}`), with the checks a
//! registration must pass. Vocabulary: transports, the engine and the backends all use these; it
//! imports nothing of them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A device's app state: on screen or not (device and push policies read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// On screen.
    #[default]
    Foreground,
    /// Backgrounded (push policies may still notify it).
    Background,
}

/// The platforms a device may name (`platform` in a token or a registration).
pub const PLATFORMS: [&str; 4] = ["web", "ios", "android", "desktop"];

/// True when `p` is one of [`PLATFORMS`].
pub fn valid_platform(p: &str) -> bool {
    PLATFORMS.contains(&p)
}

/// Which of a recipient's devices get an event live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl DevicePolicy {
    /// Parses `all|foreground|latest|mobile|web`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "all" => DevicePolicy::All,
            "foreground" => DevicePolicy::Foreground,
            "latest" => DevicePolicy::Latest,
            "mobile" => DevicePolicy::Mobile,
            "web" => DevicePolicy::Web,
            _ => return None,
        })
    }

    /// As written in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            DevicePolicy::All => "all",
            DevicePolicy::Foreground => "foreground",
            DevicePolicy::Latest => "latest",
            DevicePolicy::Mobile => "mobile",
            DevicePolicy::Web => "web",
        }
    }

    /// Whether a session in `state` on `platform` gets an event live. `web` admits sessions that named
    /// no platform (browsers rarely do); `latest` is decided where a user's sessions are known (the
    /// hub), so it admits here.
    pub fn admits(self, state: DeviceState, platform: Option<&str>) -> bool {
        let mobile = matches!(platform, Some("ios" | "android"));
        match self {
            DevicePolicy::All | DevicePolicy::Latest => true,
            DevicePolicy::Foreground => state == DeviceState::Foreground,
            DevicePolicy::Mobile => mobile,
            DevicePolicy::Web => !mobile,
        }
    }
}

/// Longest provider token accepted.
const MAX_TOKEN: usize = 4096;

/// A registered push device: where a push for it goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushDevice {
    /// Device id.
    pub device: String,
    /// `fcm|apns|webpush|webhook`.
    pub provider: String,
    /// Provider token (fcm, apns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Web Push subscription object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<serde_json::Value>,
    /// Platform, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

impl PushDevice {
    /// A registration with the checks no provider needs to make: a token, when given, is 1-4096
    /// characters. The error names the field. The provider name and the shape of its token or
    /// subscription are checked by the configured provider itself when the engine stores it
    /// (`Provider::check_registration`). (`platform` is kept as given.)
    pub fn register(
        device: String,
        provider: String,
        token: Option<String>,
        subscription: Option<Value>,
        platform: Option<String>,
    ) -> Result<PushDevice, String> {
        if token
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.len() > MAX_TOKEN)
        {
            return Err(format!("token: 1 to {MAX_TOKEN} characters"));
        }
        Ok(PushDevice {
            device,
            provider,
            token,
            subscription,
            platform,
        })
    }
}
