//! A fake Google: the OAuth token endpoint a service account's `token_uri` names and FCM HTTP v1's
//! `messages:send`, checking requests as Google does (signed RS256 assertion, HTTP/2, bearer token,
//! project id, string-only `data`) and answering in Google's error shape.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::Failure;

/// The test-only service-account key (tests/integration/fakes/keys/README.md).
pub const PRIVATE_KEY: &str = include_str!("keys/fcm-test-rsa.pem");
const PUBLIC_KEY: &str = include_str!("keys/fcm-test-rsa.pub.pem");
pub const PROJECT_ID: &str = "herald-test";
pub const CLIENT_EMAIL: &str = "herald-push@herald-test.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// One message the fake accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct FcmReceived {
    pub token: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub data: BTreeMap<String, String>,
    pub collapse_key: Option<String>,
    pub ttl: Option<String>,
    /// `message.apns.headers["apns-collapse-id"]`.
    pub apns_collapse_id: Option<String>,
    /// The whole `message`, for anything else a test wants to look at.
    pub message: Value,
}

#[derive(Default)]
struct Inner {
    valid_tokens: HashSet<String>,
    issued: usize,
    token_requests: usize,
    unregistered: HashSet<String>,
    fail_send: VecDeque<Failure>,
    fail_token: VecDeque<Failure>,
    received: Vec<FcmReceived>,
    sends: usize,
}

struct Shared {
    token_url: OnceLock<String>,
    inner: Mutex<Inner>,
}

/// A running fake FCM + token endpoint.
#[derive(Clone)]
pub struct FakeFcm {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
}

impl FakeFcm {
    pub async fn start() -> FakeFcm {
        let shared = Arc::new(Shared {
            token_url: OnceLock::new(),
            inner: Mutex::new(Inner::default()),
        });
        let router = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{op}", post(send))
            .with_state(shared.clone());
        let addr = super::spawn(router).await;
        let _ = shared.token_url.set(format!("http://{addr}/token"));
        FakeFcm { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Writes a service-account key file whose `token_uri` is this fake's.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("service-account.json");
        let v = json!({
            "type": "service_account",
            "project_id": PROJECT_ID,
            "private_key_id": "0123456789abcdef",
            "private_key": PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_url(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        path
    }

    pub fn config(&self, dir: &Path) -> herald::config::FcmConfig {
        herald::config::FcmConfig {
            endpoint: Some(self.url()),
            credentials: Some(self.credentials_file(dir)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    /// Sends to `token` get 404 UNREGISTERED from now on.
    pub fn unregister(&self, token: &str) {
        self.lock().unregistered.insert(token.to_string());
    }

    /// The next send (after auth) gets `f` instead of being accepted; queued.
    pub fn fail_next(&self, f: Failure) {
        self.lock().fail_send.push_back(f);
    }

    /// The next token request gets `f`; queued.
    pub fn fail_next_token(&self, f: Failure) {
        self.lock().fail_token.push_back(f);
    }

    /// Revokes every access token issued so far: a send with one gets 401 UNAUTHENTICATED.
    pub fn expire_tokens(&self) {
        self.lock().valid_tokens.clear();
    }

    pub fn received(&self) -> Vec<FcmReceived> {
        self.lock().received.clone()
    }

    /// Send requests that reached the fake, accepted or not.
    pub fn sends(&self) -> usize {
        self.lock().sends
    }

    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    /// Waits until `n` messages were accepted or `timeout` passed; returns what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<FcmReceived> {
        super::wait_for(n, timeout, || self.received()).await
    }
}

/// Google's error body: `{"error": {code, message, status, details: [FcmError]}}`.
fn google_error(status: u16, google_status: &str, error_code: Option<&str>, msg: &str) -> Response {
    let mut err = json!({"code": status, "message": msg, "status": google_status});
    if let Some(c) = error_code {
        err["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": c,
        }]);
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({ "error": err }))).into_response()
}

/// The status and FCM error code Google sends with an HTTP status.
fn names(status: u16) -> (&'static str, Option<&'static str>) {
    match status {
        400 => ("INVALID_ARGUMENT", Some("INVALID_ARGUMENT")),
        401 => ("UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR")),
        403 => ("PERMISSION_DENIED", Some("SENDER_ID_MISMATCH")),
        404 => ("NOT_FOUND", Some("UNREGISTERED")),
        429 => ("RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED")),
        503 => ("UNAVAILABLE", Some("UNAVAILABLE")),
        _ => ("INTERNAL", Some("INTERNAL")),
    }
}

fn failure_response(f: Failure) -> Response {
    let (status, code) = names(f.status);
    let mut r = google_error(f.status, status, code, "injected failure");
    if let Some(s) = f.retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().unwrap());
    }
    r
}

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// `POST /token`: RFC 7523 JWT-bearer grant, as oauth2.googleapis.com checks it.
async fn token(State(s): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    s.inner.lock().unwrap().token_requests += 1;
    if let Some(f) = s.inner.lock().unwrap().fail_token.pop_front() {
        let code = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, axum::Json(json!({"error": "injected"}))).into_response();
    }
    let form_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !form_type.starts_with("application/x-www-form-urlencoded") {
        return oauth_error("invalid_request", "not a form");
    }
    let form: BTreeMap<String, String> = form_urlencoded_pairs(&body);
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return oauth_error("unsupported_grant_type", "bad grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error("invalid_request", "no assertion");
    };
    if let Err(e) = check_assertion(assertion, s.token_url.get().map(String::as_str)) {
        return oauth_error("invalid_grant", &e);
    }
    let mut inner = s.inner.lock().unwrap();
    inner.issued += 1;
    let access = format!("ya29.{}", inner.issued);
    inner.valid_tokens.insert(access.clone());
    axum::Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// Decodes an `application/x-www-form-urlencoded` body (enough of it for the grant).
fn form_urlencoded_pairs(body: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let (b'%', Some(v)) = (b[i], hex) {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// The assertion must be RS256 by the service account's key, for FCM's scope, addressed to this
/// token endpoint, and live at most an hour.
fn check_assertion(jwt: &str, token_url: Option<&str>) -> Result<(), String> {
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_issuer(&[CLIENT_EMAIL]);
    v.set_audience(&[token_url.ok_or("no token url")?]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Value>(jwt, &key, &v).map_err(|e| e.to_string())?;
    let c = data.claims;
    if c["scope"].as_str() != Some(SCOPE) {
        return Err("wrong scope".into());
    }
    let (iat, exp) = (c["iat"].as_u64(), c["exp"].as_u64());
    match (iat, exp) {
        (Some(iat), Some(exp)) if exp > iat && exp - iat <= 3600 => Ok(()),
        _ => Err("assertion lifetime over an hour".into()),
    }
}

/// `POST /v1/projects/{project}/messages:send`.
async fn send(
    State(s): State<Arc<Shared>>,
    UrlPath((project, op)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    s.inner.lock().unwrap().sends += 1;
    if op != "messages:send" {
        return google_error(404, "NOT_FOUND", None, "no such method");
    }
    if req.version() != Version::HTTP_2 {
        return (
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "FCM HTTP v1 is served over HTTP/2 here",
        )
            .into_response();
    }
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let authed = bearer.is_some_and(|b| s.inner.lock().unwrap().valid_tokens.contains(&b));
    if !authed {
        return google_error(
            401,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials.",
        );
    }
    if project != PROJECT_ID {
        return google_error(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "project",
        );
    }
    if let Some(f) = s.inner.lock().unwrap().fail_send.pop_front() {
        return failure_response(f);
    }
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return google_error(400, "INVALID_ARGUMENT", None, "body");
    };
    let received = match parse_message(&bytes) {
        Ok(r) => r,
        Err(msg) => return google_error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), &msg),
    };
    let mut inner = s.inner.lock().unwrap();
    if inner.unregistered.contains(&received.token) {
        return google_error(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        );
    }
    inner.received.push(received);
    let n = inner.received.len();
    axum::Json(json!({"name": format!("projects/{PROJECT_ID}/messages/{n}")})).into_response()
}

/// Checks a v1 message as Google does and pulls out what tests look at.
fn parse_message(bytes: &[u8]) -> Result<FcmReceived, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|_| "Invalid JSON payload".to_string())?;
    let m = v.get("message").ok_or("no message")?;
    let token = m["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("message.token missing")?
        .to_string();
    let mut data = BTreeMap::new();
    if let Some(d) = m.get("data") {
        let d = d.as_object().ok_or("data is not a map")?;
        for (k, v) in d {
            let s = v
                .as_str()
                .ok_or_else(|| format!("Invalid value at 'message.data[{k}]' (TYPE_STRING)"))?;
            data.insert(k.clone(), s.to_string());
        }
    }
    let ttl = m["android"]["ttl"].as_str().map(str::to_string);
    if let Some(t) = &ttl {
        let ok = t
            .strip_suffix('s')
            .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok());
        if !ok {
            return Err("Invalid value at 'message.android.ttl' (google.protobuf.Duration)".into());
        }
    }
    let apns_collapse_id = m["apns"]["headers"]["apns-collapse-id"]
        .as_str()
        .map(str::to_string);
    if apns_collapse_id.as_ref().is_some_and(|c| c.len() > 64) {
        return Err("apns-collapse-id over 64 bytes".into());
    }
    let s = |p: &Value| p.as_str().map(str::to_string);
    Ok(FcmReceived {
        token,
        title: s(&m["notification"]["title"]),
        body: s(&m["notification"]["body"]),
        data,
        collapse_key: s(&m["android"]["collapse_key"]),
        ttl,
        apns_collapse_id,
        message: m.clone(),
    })
}
