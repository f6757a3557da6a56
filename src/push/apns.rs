//! Apple Push Notification service: `POST {endpoint}/3/device/{token}` over HTTP/2 with an ES256
//! provider token (a JWT signed with the team's .p8 key).
//!
//! Apple refuses a provider token older than 60 minutes (`ExpiredProviderToken`) and one replaced more
//! often than every 20 (`TooManyProviderTokenUpdates`), so one token is signed and reused for 40
//! minutes; an `ExpiredProviderToken` (clock skew, a paused process) replaces it once and the send is
//! tried again.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{Value, json};

use super::http_util::{
    MAX_COLLAPSE, base_url, network_outcome, retry_after, safe_code, truncate_utf8, unix_now,
};
use super::{Outcome, Provider, ProviderKind, PushJob};
use crate::config::ApnsConfig;
use crate::primitives::lock;

/// Apple's production base URL.
pub const DEFAULT_ENDPOINT: &str = "https://api.push.apple.com";
/// Apple's development (sandbox) base URL.
pub const SANDBOX_ENDPOINT: &str = "https://api.sandbox.push.apple.com";
/// Largest payload Apple accepts for a regular notification (bytes).
pub const MAX_PAYLOAD: usize = 4096;

/// A provider token is reused this long: past Apple's 20-minute minimum, well inside its 60-minute
/// maximum.
const TOKEN_REUSE: Duration = Duration::from_secs(40 * 60);

/// Checks the shape of an APNs device token: hex, even length, 64..=200 characters.
pub fn valid_token(token: &str) -> Result<(), String> {
    if !(64..=200).contains(&token.len()) {
        return Err("token: an APNs token has 64 to 200 hex characters".into());
    }
    if !token.len().is_multiple_of(2) {
        return Err("token: an APNs token has an even number of hex characters".into());
    }
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("token: an APNs token is hex".into());
    }
    Ok(())
}

/// A signed provider token and when it was signed.
struct ProviderToken {
    jwt: Arc<str>,
    signed: Instant,
}

/// The APNs provider.
pub struct Apns {
    client: reqwest::Client,
    endpoint: String,
    topic: String,
    key_id: String,
    team_id: String,
    key: EncodingKey,
    /// The current provider token. Signing is fast (no I/O), so a plain mutex is enough; it is
    /// never held across an await.
    token: Mutex<Option<ProviderToken>>,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("endpoint", &self.endpoint)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Provider-token claims: Apple wants exactly the team and the issue time.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

/// One request's headers and body, kept so a retry after a token refresh sends the same thing.
struct Request {
    url: String,
    push_type: &'static str,
    priority: &'static str,
    expiration: String,
    collapse: Option<String>,
    apns_id: String,
    body: Vec<u8>,
}

/// What one POST came to: an outcome, or Apple saying the provider token expired.
enum Reply {
    Done(Outcome),
    ExpiredToken,
}

impl Apns {
    /// Builds the provider from `[push.apns]`; every key but `endpoint` is required and the .p8 key
    /// is read now so a bad key fails at start. Errors name the key (`push.apns.key_id: missing`).
    pub fn from_config(c: &ApnsConfig) -> Result<Apns, String> {
        let key_file = c
            .key_file
            .as_deref()
            .ok_or("push.apns.key_file: missing (the .p8 signing key)")?;
        let key = read_key(key_file)?;
        let required = |v: &Option<String>, name: &str| match v.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(format!("push.apns.{name}: missing")),
        };
        let endpoint = base_url(c.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT))
            .map_err(|e| format!("push.apns.endpoint: {e}"))?;
        let apns = Apns {
            client: super::http_client(true)?,
            endpoint,
            key_id: required(&c.key_id, "key_id")?,
            team_id: required(&c.team_id, "team_id")?,
            topic: required(&c.topic, "topic")?,
            key,
            token: Mutex::new(None),
        };
        // Reading the PEM does not parse the key: sign once so a wrong curve fails at start.
        apns.sign().map_err(|_| {
            format!(
                "push.apns.key_file: {} cannot sign ES256 (not a P-256 key?)",
                key_file.display()
            )
        })?;
        Ok(apns)
    }

    /// The provider token to use: the current one while younger than 40 minutes, else a new one.
    fn provider_token(&self) -> Result<Arc<str>, Outcome> {
        let mut slot = lock(&self.token);
        if let Some(t) = slot.as_ref().filter(|t| t.signed.elapsed() < TOKEN_REUSE) {
            return Ok(t.jwt.clone());
        }
        let jwt: Arc<str> = self.sign()?.into();
        *slot = Some(ProviderToken {
            jwt: jwt.clone(),
            signed: Instant::now(),
        });
        Ok(jwt)
    }

    /// Forgets `stale` unless another send already replaced it.
    fn drop_token(&self, stale: &str) {
        let mut slot = lock(&self.token);
        if slot.as_ref().is_some_and(|t| &*t.jwt == stale) {
            *slot = None;
        }
    }

    fn sign(&self) -> Result<String, Outcome> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: unix_now(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|_| Outcome::Failed {
            reason: "apns cannot sign provider token".into(),
        })
    }

    /// One POST of `req` with provider token `jwt`.
    async fn post(&self, jwt: &str, req: &Request) -> Reply {
        let mut b = self
            .client
            .post(&req.url)
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", req.push_type)
            .header("apns-priority", req.priority)
            .header("apns-expiration", &req.expiration)
            .header("apns-id", &req.apns_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(c) = &req.collapse {
            b = b.header("apns-collapse-id", c);
        }
        let resp = match b.body(req.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => return Reply::Done(network_outcome("apns", &e)),
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Reply::Done(Outcome::Sent);
        }
        let after = retry_after(resp.headers());
        let reason = apple_reason(&resp.bytes().await.unwrap_or_default());
        if status == 403 && reason == "ExpiredProviderToken" {
            return Reply::ExpiredToken;
        }
        Reply::Done(classify(status, &reason, after))
    }
}

#[async_trait::async_trait]
impl Provider for Apns {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Apns
    }

    fn check_registration(
        &self,
        token: Option<&str>,
        _subscription: Option<&serde_json::Value>,
    ) -> Result<(), String> {
        valid_token(token.ok_or("token: required (an APNs device token)")?)
    }

    async fn send(&self, job: &PushJob) -> Outcome {
        let Some(device) = job.token.as_deref() else {
            return Outcome::Failed {
                reason: "apns no token".into(),
            };
        };
        if valid_token(device).is_err() {
            // Apple would answer 400 BadDeviceToken: the token can never work.
            return Outcome::DeadToken {
                reason: "apns token malformed".into(),
            };
        }
        let req = match request(&self.endpoint, device, job) {
            Ok(r) => r,
            Err(o) => return o,
        };
        let jwt = match self.provider_token() {
            Ok(t) => t,
            Err(o) => return o,
        };
        match self.post(&jwt, &req).await {
            Reply::Done(o) => o,
            Reply::ExpiredToken => {
                tracing::info!("apns ExpiredProviderToken: signing a new provider token once");
                self.drop_token(&jwt);
                let jwt = match self.provider_token() {
                    Ok(t) => t,
                    Err(o) => return o,
                };
                match self.post(&jwt, &req).await {
                    Reply::Done(o) => o,
                    Reply::ExpiredToken => Outcome::Failed {
                        reason: "apns 403 ExpiredProviderToken".into(),
                    },
                }
            }
        }
    }
}

/// The request for `job` to `device` (a checked hex token, so safe in the path).
fn request(endpoint: &str, device: &str, job: &PushJob) -> Result<Request, Outcome> {
    let alert = job.title.is_some() || job.body.is_some();
    let collapse = Some(truncate_utf8(&job.collapse, MAX_COLLAPSE))
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Ok(Request {
        url: format!("{endpoint}/3/device/{device}"),
        // Without title and body it is a silent (background) push: Apple requires push type
        // `background` and priority 5 for those.
        push_type: if alert { "alert" } else { "background" },
        priority: if alert { "10" } else { "5" },
        expiration: match job.ttl {
            0 => "0".to_string(),
            ttl => unix_now().saturating_add(ttl).to_string(),
        },
        collapse,
        apns_id: apns_id(&job.id),
        body: payload(job)?,
    })
}

/// The JSON payload, at most 4096 bytes: the body is shortened first, then the title, then the
/// rule's data is left out; past that the job cannot be sent.
fn payload(job: &PushJob) -> Result<Vec<u8>, Outcome> {
    let mut title = job.title.clone();
    let mut body = job.body.clone();
    let mut data = job.app_data();
    for _ in 0..8 {
        let bytes = render(job, title.as_deref(), body.as_deref(), &data);
        let Some(over) = bytes.len().checked_sub(MAX_PAYLOAD).filter(|o| *o > 0) else {
            return Ok(bytes);
        };
        if let Some(b) = body.as_mut().filter(|b| !b.is_empty()) {
            let keep = truncate_utf8(b, b.len().saturating_sub(over)).len();
            b.truncate(keep);
        } else if let Some(t) = title.as_mut().filter(|t| !t.is_empty()) {
            let keep = truncate_utf8(t, t.len().saturating_sub(over)).len();
            t.truncate(keep);
        } else if data.remove("data").is_none() {
            break;
        }
    }
    Err(Outcome::Failed {
        reason: "apns payload too large".into(),
    })
}

/// `{"aps": {...}, "herald": app_data}` serialised.
fn render(
    job: &PushJob,
    title: Option<&str>,
    body: Option<&str>,
    data: &serde_json::Map<String, Value>,
) -> Vec<u8> {
    let thread = job.room.as_deref().unwrap_or(&job.channel);
    let aps = if job.title.is_some() || job.body.is_some() {
        let mut alert = serde_json::Map::new();
        if let Some(t) = title {
            alert.insert("title".into(), t.into());
        }
        if let Some(b) = body {
            alert.insert("body".into(), b.into());
        }
        json!({"alert": alert, "sound": "default", "thread-id": thread})
    } else {
        json!({"content-available": 1, "thread-id": thread})
    };
    serde_json::to_vec(&json!({"aps": aps, "herald": data})).unwrap_or_default()
}

/// A UUID derived from the job id (FNV-1a 128 as a version-8 UUID), so a retried job keeps its
/// `apns-id` and Apple's logs line up across attempts.
fn apns_id(job_id: &str) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let h = job_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    uuid::Builder::from_custom_bytes(h.to_be_bytes())
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// The outcome of a non-2xx reply with Apple reason `reason` (not ExpiredProviderToken).
fn classify(status: u16, reason: &str, after: Option<Duration>) -> Outcome {
    let text = if reason.is_empty() {
        format!("apns {status}")
    } else {
        format!("apns {status} {reason}")
    };
    tracing::debug!(status, reason, "apns refused");
    match (status, reason) {
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") | (_, "Unregistered") => {
            Outcome::DeadToken { reason: text }
        }
        (429 | 500..=599, _) => Outcome::Retry {
            after,
            reason: text,
        },
        _ => Outcome::Failed { reason: text },
    }
}

/// The `reason` of Apple's error body, made safe for logs; empty when absent.
fn apple_reason(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(safe_code))
        .unwrap_or_default()
}

/// Reads the .p8 key (PKCS#8 P-256 PEM). Messages never quote the file's contents.
fn read_key(path: &Path) -> Result<EncodingKey, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("push.apns.key_file: cannot read {}: {e}", path.display()))?;
    EncodingKey::from_ec_pem(&pem).map_err(|_| {
        format!(
            "push.apns.key_file: {} is not a P-256 private key in PKCS#8 PEM (.p8)",
            path.display()
        )
    })
}
