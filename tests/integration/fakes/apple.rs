//! A fake APNs: `POST /3/device/{token}` over HTTP/2, checking the ES256 provider token (kid, iss,
//! age), the headers and the payload as Apple does, and answering with Apple's `{"reason": ...}`.

#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::Failure;

/// The test-only .p8 key (tests/integration/fakes/keys/README.md).
pub const PRIVATE_KEY: &str = include_str!("keys/apns-test-AuthKey.p8");
const PUBLIC_KEY: &str = include_str!("keys/apns-test-AuthKey.pub.pem");
pub const KEY_ID: &str = "TESTKEY123";
pub const TEAM_ID: &str = "TEAMID4567";
pub const TOPIC: &str = "dev.herald.test";

/// One notification the fake accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct ApnsReceived {
    pub token: String,
    pub topic: String,
    pub push_type: String,
    pub priority: Option<String>,
    pub expiration: Option<String>,
    pub collapse_id: Option<String>,
    pub apns_id: String,
    /// The raw body length in bytes.
    pub size: usize,
    pub payload: Value,
}

#[derive(Default)]
struct Inner {
    /// Every valid provider token seen, in order of first use.
    jwts: Vec<String>,
    /// Provider tokens treated as expired from now on.
    expired: HashSet<String>,
    unregistered: HashSet<String>,
    /// Tokens Apple would call BadDeviceToken (well-formed, but e.g. a sandbox token in production).
    bad_device: HashSet<String>,
    fail: VecDeque<Failure>,
    received: Vec<ApnsReceived>,
    requests: usize,
    counter: u64,
}

/// A running fake APNs.
#[derive(Clone)]
pub struct FakeApns {
    pub addr: std::net::SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeApns {
    pub async fn start() -> FakeApns {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let router = Router::new()
            .route("/3/device/{token}", post(push))
            .with_state(inner.clone());
        let addr = super::spawn(router).await;
        FakeApns { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes the test .p8 key into `dir`.
    pub fn key_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&path, PRIVATE_KEY).unwrap();
        path
    }

    pub fn config(&self, dir: &Path) -> herald::config::ApnsConfig {
        herald::config::ApnsConfig {
            endpoint: Some(self.url()),
            key_file: Some(self.key_file(dir)),
            key_id: Some(KEY_ID.into()),
            team_id: Some(TEAM_ID.into()),
            topic: Some(TOPIC.into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Pushes to `token` get 410 Unregistered from now on.
    pub fn unregister(&self, token: &str) {
        self.lock().unregistered.insert(token.to_string());
    }

    /// Pushes to `token` get 400 BadDeviceToken from now on.
    pub fn bad_device(&self, token: &str) {
        self.lock().bad_device.insert(token.to_string());
    }

    /// The next push (after auth) gets `f`; queued.
    pub fn fail_next(&self, f: Failure) {
        self.lock().fail.push_back(f);
    }

    /// Every provider token seen so far is refused with 403 ExpiredProviderToken from now on (as
    /// if an hour had passed).
    pub fn expire_provider_tokens(&self) {
        let mut i = self.lock();
        let seen = i.jwts.clone();
        i.expired.extend(seen);
    }

    pub fn received(&self) -> Vec<ApnsReceived> {
        self.lock().received.clone()
    }

    /// Requests that reached the fake, accepted or not.
    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    /// Distinct valid provider tokens seen.
    pub fn provider_tokens_seen(&self) -> usize {
        self.lock().jwts.len()
    }

    /// Waits until `n` notifications were accepted or `timeout` passed; returns what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ApnsReceived> {
        super::wait_for(n, timeout, || self.received()).await
    }
}

fn apple_error(status: u16, reason: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({ "reason": reason });
    if status == 410 {
        body["timestamp"] = json!(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        );
    }
    (code, axum::Json(body)).into_response()
}

fn reason_for(status: u16) -> &'static str {
    match status {
        400 => "BadTopic",
        403 => "Forbidden",
        404 => "BadPath",
        410 => "Unregistered",
        413 => "PayloadTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Checks the provider token: ES256, our kid, our team, signed by the key, not older than an hour.
fn check_jwt(h: &HeaderMap, inner: &Mutex<Inner>) -> Result<(), &'static str> {
    let jwt = header(h, "authorization")
        .and_then(|v| v.strip_prefix("bearer "))
        .ok_or("MissingProviderToken")?;
    let head = jsonwebtoken::decode_header(jwt).map_err(|_| "InvalidProviderToken")?;
    if head.alg != Algorithm::ES256 {
        return Err("InvalidProviderToken");
    }
    if head.kid.as_deref() != Some(KEY_ID) {
        return Err("InvalidProviderToken");
    }
    let key = DecodingKey::from_ec_pem(PUBLIC_KEY.as_bytes()).map_err(|_| "InternalServerError")?;
    let mut v = Validation::new(Algorithm::ES256);
    v.validate_exp = false;
    v.set_required_spec_claims(&["iss"]);
    v.set_issuer(&[TEAM_ID]);
    let data = jsonwebtoken::decode::<Value>(jwt, &key, &v).map_err(|_| "InvalidProviderToken")?;
    let iat = data.claims["iat"].as_u64().ok_or("InvalidProviderToken")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut i = inner.lock().unwrap();
    if now.saturating_sub(iat) > 3600 || i.expired.contains(jwt) {
        return Err("ExpiredProviderToken");
    }
    if !i.jwts.iter().any(|j| j == jwt) {
        i.jwts.push(jwt.to_string());
    }
    Ok(())
}

/// Checks the apns-* headers as Apple does.
fn check_headers(h: &HeaderMap) -> Result<(), &'static str> {
    match header(h, "apns-topic") {
        None => return Err("MissingTopic"),
        Some(t) if t != TOPIC => return Err("BadTopic"),
        _ => {}
    }
    let push_type = header(h, "apns-push-type").ok_or("InvalidPushType")?;
    if ![
        "alert",
        "background",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
    ]
    .contains(&push_type)
    {
        return Err("InvalidPushType");
    }
    if header(h, "apns-priority").is_some_and(|p| !["1", "5", "10"].contains(&p)) {
        return Err("BadPriority");
    }
    if header(h, "apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return Err("BadExpirationDate");
    }
    if header(h, "apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err("BadCollapseId");
    }
    if header(h, "apns-id").is_some_and(|id| uuid::Uuid::parse_str(id).is_err()) {
        return Err("BadMessageId");
    }
    Ok(())
}

/// `POST /3/device/{token}`.
async fn push(
    State(inner): State<Arc<Mutex<Inner>>>,
    UrlPath(token): UrlPath<String>,
    req: Request,
) -> Response {
    inner.lock().unwrap().requests += 1;
    if req.version() != Version::HTTP_2 {
        return (
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "APNs requires HTTP/2",
        )
            .into_response();
    }
    let headers = req.headers().clone();
    if let Err(r) = check_jwt(&headers, &inner) {
        return apple_error(403, r);
    }
    if let Err(r) = check_headers(&headers) {
        return apple_error(400, r);
    }
    let malformed =
        token.len() < 64 || token.len() % 2 != 0 || !token.bytes().all(|b| b.is_ascii_hexdigit());
    if malformed || inner.lock().unwrap().bad_device.contains(&token) {
        return apple_error(400, "BadDeviceToken");
    }
    if let Some(f) = inner.lock().unwrap().fail.pop_front() {
        let mut r = apple_error(f.status, reason_for(f.status));
        if let Some(s) = f.retry_after {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().unwrap());
        }
        return r;
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return apple_error(400, "PayloadEmpty");
    };
    if body.len() > 4096 {
        return apple_error(413, "PayloadTooLarge");
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) if v.get("aps").is_some_and(Value::is_object) => v,
        _ => return apple_error(400, "PayloadEmpty"),
    };
    let mut i = inner.lock().unwrap();
    if i.unregistered.contains(&token) {
        return apple_error(410, "Unregistered");
    }
    i.counter += 1;
    let apns_id = header(&headers, "apns-id")
        .map(str::to_string)
        .unwrap_or_else(|| format!("00000000-0000-4000-8000-{:012x}", i.counter));
    let s = |n: &str| header(&headers, n).map(str::to_string);
    i.received.push(ApnsReceived {
        token,
        topic: s("apns-topic").unwrap_or_default(),
        push_type: s("apns-push-type").unwrap_or_default(),
        priority: s("apns-priority"),
        expiration: s("apns-expiration"),
        collapse_id: s("apns-collapse-id"),
        apns_id: apns_id.clone(),
        size: body.len(),
        payload,
    });
    let mut r = StatusCode::OK.into_response();
    r.headers_mut().insert("apns-id", apns_id.parse().unwrap());
    r
}
