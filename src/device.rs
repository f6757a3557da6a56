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
    /// A registration, checked: `provider` is one of fcm, apns, webpush, webhook; fcm and apns need a
    /// token (at most 4096 characters), webpush a subscription object with an `endpoint`, a webhook
    /// may carry a token. The error names the field. (`platform` is kept as given.)
    pub fn register(
        device: String,
        provider: String,
        token: Option<String>,
        subscription: Option<Value>,
        platform: Option<String>,
    ) -> Result<PushDevice, String> {
        let token_ok = token
            .as_deref()
            .is_some_and(|t| !t.is_empty() && t.len() <= MAX_TOKEN);
        match provider.as_str() {
            "fcm" | "apns" if token_ok => {}
            "webhook" if token.is_none() || token_ok => {}
            "webpush"
                if subscription
                    .as_ref()
                    .is_some_and(|v| v.get("endpoint").is_some_and(Value::is_string)) => {}
            "fcm" | "apns" | "webhook" => {
                return Err(format!(
                    "token: required for fcm and apns (at most {MAX_TOKEN} characters)"
                ));
            }
            "webpush" => {
                return Err("subscription: a Web Push subscription object with an endpoint".into());
            }
            _ => return Err("provider: fcm, apns, webpush or webhook".into()),
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
