//! Firebase Cloud Messaging, HTTP v1: `POST {endpoint}/v1/projects/{project}/messages:send` with an
//! OAuth access token obtained from a service account (a signed RS256 JWT assertion exchanged at the
//! account's `token_uri`, RFC 7523).
//!
//! The access token is cached until 5 minutes before it expires and refreshed under one lock, so a
//! burst of sends after expiry costs one token request. A 401 drops the cached token and the send is
//! tried once more with a fresh one (Google revokes tokens early now and then).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::http_util::{
    MAX_COLLAPSE, base_url, network_outcome, retry_after, safe_code, truncate_utf8, unix_now,
};
use super::{Outcome, Provider, ProviderKind, PushJob};
use crate::config::FcmConfig;

/// Google's production FCM base URL.
pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
/// Google's token endpoint, used when a key file has no `token_uri`.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth scope FCM HTTP v1 requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Longest registration token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;

/// A cached token is replaced this long before Google says it expires, so a send never races
/// the expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime of the signed assertion (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;

/// Checks the shape of an FCM registration token: 1..=4096 characters of `[A-Za-z0-9_:.-]`.
/// Registration uses it so garbage never reaches Google.
pub fn valid_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("token: empty".into());
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("token: longer than {MAX_TOKEN_LEN} characters"));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
    {
        return Err("token: only A-Z a-z 0-9 _ : . - are allowed in an FCM token".into());
    }
    Ok(())
}

/// The parts of a service-account key file FCM needs.
struct ServiceAccount {
    project_id: String,
    client_email: String,
    token_uri: String,
    key: EncodingKey,
}

/// An access token and when to stop using it.
struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// The FCM HTTP v1 provider.
pub struct Fcm {
    client: reqwest::Client,
    auth_client: reqwest::Client,
    send_url: String,
    account: ServiceAccount,
    /// The current access token. Held across a refresh so concurrent sends wait for one refresh
    /// instead of each fetching a token.
    token: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("project_id", &self.account.project_id)
            .finish_non_exhaustive()
    }
}

/// Claims of the OAuth JWT assertion (RFC 7523 §3).
#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The token endpoint's reply.
#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Why no access token could be had, already as the send's outcome.
type AuthResult = Result<String, Outcome>;

impl Fcm {
    /// Builds the provider from `[push.fcm]`: reads and checks the service-account file now so a bad
    /// key fails at start, not at the first push. Errors name the key (`push.fcm.credentials: ...`).
    pub fn from_config(c: &FcmConfig) -> Result<Fcm, String> {
        let path = c
            .credentials
            .as_deref()
            .ok_or("push.fcm.credentials: missing (the service-account JSON file)")?;
        let account = read_service_account(path)?;
        let endpoint = base_url(c.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT))
            .map_err(|e| format!("push.fcm.endpoint: {e}"))?;
        let send_url = format!(
            "{endpoint}/v1/projects/{}/messages:send",
            account.project_id
        );
        let fcm = Fcm {
            client: super::http_client(true)?,
            auth_client: super::http_client(false)?,
            send_url,
            account,
            token: Mutex::new(None),
        };
        // Reading the PEM does not parse the RSA key: sign once so a damaged key fails at start.
        fcm.sign_assertion().map_err(|_| {
            format!(
                "push.fcm.credentials: {}: \"private_key\" cannot sign RS256",
                path.display()
            )
        })?;
        Ok(fcm)
    }

    /// A usable access token: the cached one, or a fresh one fetched under the lock.
    async fn access_token(&self) -> AuthResult {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    /// Forgets `stale` (a token FCM refused) unless another send already replaced it.
    async fn drop_token(&self, stale: &str) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.value == stale) {
            *slot = None;
        }
    }

    /// Exchanges a freshly signed assertion for an access token.
    async fn fetch_token(&self) -> Result<CachedToken, Outcome> {
        let assertion = self.sign_assertion()?;
        // The assertion is base64url and dots: nothing in it needs form-encoding.
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let started = Instant::now();
        let resp = self
            .auth_client
            .post(&self.account.token_uri)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| network_outcome("fcm auth", &e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            tracing::warn!(status, "fcm token endpoint refused");
            return Err(auth_failure(status, resp.headers()));
        }
        let reply: TokenReply = resp
            .json()
            .await
            .map_err(|_| retry(None, "fcm auth bad reply".into()))?;
        let lifetime = Duration::from_secs(reply.expires_in.unwrap_or(3600));
        Ok(CachedToken {
            value: reply.access_token,
            refresh_at: started + lifetime.saturating_sub(REFRESH_MARGIN),
        })
    }

    /// The RS256 JWT the token endpoint accepts in place of a client secret.
    fn sign_assertion(&self) -> Result<String, Outcome> {
        let iat = unix_now();
        let claims = Assertion {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.account.key).map_err(
            |_| Outcome::Failed {
                reason: "fcm auth cannot sign assertion".into(),
            },
        )
    }

    /// One POST of `body` with `token`; `Err` is a 401 (the caller refreshes and retries once).
    async fn post(&self, token: &str, body: &Value) -> Result<Outcome, ()> {
        let resp = match self
            .client
            .post(&self.send_url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(network_outcome("fcm", &e)),
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Outcome::Sent);
        }
        if status == 401 {
            return Err(());
        }
        let after = retry_after(resp.headers());
        let code = error_code(&resp.bytes().await.unwrap_or_default());
        Ok(classify(status, &code, after))
    }
}

#[async_trait::async_trait]
impl Provider for Fcm {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Fcm
    }

    fn check_registration(
        &self,
        token: Option<&str>,
        _subscription: Option<&serde_json::Value>,
    ) -> Result<(), String> {
        valid_token(token.ok_or("token: required (an FCM registration token)")?)
    }

    async fn send(&self, job: &PushJob) -> Outcome {
        let Some(device) = job.token.as_deref() else {
            return failed("fcm no token");
        };
        if valid_token(device).is_err() {
            return failed("fcm token malformed");
        }
        let body = message(device, job);
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(o) => return o,
        };
        match self.post(&token, &body).await {
            Ok(o) => o,
            Err(()) => {
                tracing::info!("fcm 401: refreshing the access token once");
                self.drop_token(&token).await;
                let token = match self.access_token().await {
                    Ok(t) => t,
                    Err(o) => return o,
                };
                match self.post(&token, &body).await {
                    Ok(o) => o,
                    Err(()) => failed("fcm 401 UNAUTHENTICATED"),
                }
            }
        }
    }
}

/// The HTTP v1 message for `job` to `device`.
fn message(device: &str, job: &PushJob) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("token".into(), device.into());
    let mut notification = serde_json::Map::new();
    if let Some(t) = &job.title {
        notification.insert("title".into(), t.clone().into());
    }
    if let Some(b) = &job.body {
        notification.insert("body".into(), b.clone().into());
    }
    if !notification.is_empty() {
        m.insert("notification".into(), notification.into());
    }
    m.insert("data".into(), json!(string_data(job)));
    let mut android = serde_json::Map::new();
    android.insert("ttl".into(), format!("{}s", job.ttl).into());
    android.insert("priority".into(), "high".into());
    if !job.collapse.is_empty() {
        android.insert("collapse_key".into(), job.collapse.clone().into());
        m.insert(
            "apns".into(),
            json!({"headers": {"apns-collapse-id": truncate_utf8(&job.collapse, MAX_COLLAPSE)}}),
        );
    }
    m.insert("android".into(), android.into());
    json!({ "message": m })
}

/// `app_data()` as FCM wants it: every value a string (Google refuses anything else with 400),
/// numbers as decimal text and the rule's nested data as JSON text.
fn string_data(job: &PushJob) -> BTreeMap<String, String> {
    job.app_data()
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect()
}

/// The outcome of a non-2xx, non-401 reply with Google error code `code`.
fn classify(status: u16, code: &str, after: Option<Duration>) -> Outcome {
    let reason = if code.is_empty() {
        format!("fcm {status}")
    } else {
        format!("fcm {status} {code}")
    };
    tracing::debug!(status, code, "fcm refused");
    match (status, code) {
        (404, _) | (_, "UNREGISTERED" | "NOT_FOUND") => Outcome::DeadToken { reason },
        (429 | 500..=599, _) | (_, "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL") => {
            Outcome::Retry { after, reason }
        }
        _ => Outcome::Failed { reason },
    }
}

/// The most specific error code of a Google error body: the FcmError `errorCode` in `details`,
/// else `error.status`; empty when the body is not Google's shape.
fn error_code(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let err = &v["error"];
    let detail = err["details"].as_array().and_then(|ds| {
        ds.iter()
            .filter_map(|d| d["errorCode"].as_str())
            .find(|c| !c.is_empty())
    });
    safe_code(detail.or(err["status"].as_str()).unwrap_or(""))
}

/// A token-endpoint refusal: worth retrying when the server (or a quota) is the problem; a 4xx means
/// the account or key is wrong and retrying will not fix it.
fn auth_failure(status: u16, headers: &reqwest::header::HeaderMap) -> Outcome {
    let reason = format!("fcm auth {status}");
    if status == 429 || status >= 500 {
        retry(retry_after(headers), reason)
    } else {
        Outcome::Failed { reason }
    }
}

fn retry(after: Option<Duration>, reason: String) -> Outcome {
    Outcome::Retry { after, reason }
}

fn failed(reason: &str) -> Outcome {
    Outcome::Failed {
        reason: reason.into(),
    }
}

/// Reads and checks a service-account key file. Messages never quote the file's contents.
fn read_service_account(path: &Path) -> Result<ServiceAccount, String> {
    let err = |m: String| format!("push.fcm.credentials: {m}");
    let text =
        std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|_| err(format!("{} is not a JSON file", path.display())))?;
    let field = |name: &str| -> Result<String, String> {
        match v.get(name).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(err(format!("{} has no \"{name}\"", path.display()))),
        }
    };
    if field("type")? != "service_account" {
        return Err(err(format!(
            "{} is not a service-account key (\"type\" is not \"service_account\")",
            path.display()
        )));
    }
    let project_id = field("project_id")?;
    if !project_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(err(
            "\"project_id\" has characters a project id cannot have".into(),
        ));
    }
    let key = EncodingKey::from_rsa_pem(field("private_key")?.as_bytes())
        .map_err(|_| err("\"private_key\" is not an RSA private key in PEM".into()))?;
    let token_uri = match v.get("token_uri") {
        None => DEFAULT_TOKEN_URI.to_string(),
        Some(_) => field("token_uri")?,
    };
    base_url(&token_uri).map_err(|e| err(format!("\"token_uri\": {e}")))?;
    Ok(ServiceAccount {
        project_id,
        client_email: field("client_email")?,
        token_uri,
        key,
    })
}
