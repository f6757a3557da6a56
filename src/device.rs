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
