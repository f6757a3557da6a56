//! A browser push service (as Mozilla's autopush or FCM's Web Push endpoint): subscriptions carry a
//! user-agent P-256 key pair and auth secret made here, and `POST /push/<id>` is accepted only with a
//! valid VAPID JWT (verified against its `k`), `Content-Encoding: aes128gcm`, a numeric `TTL`, a body
//! of at most 4,096 bytes that decrypts with the subscription's private key, and a valid `Topic`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::config::WebPushConfig;
use p256::SecretKey;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use serde_json::{Value, json};

use super::Failure;

/// What the fake push service accepted.
#[derive(Clone, Debug)]
pub struct WebPushReceived {
    /// The subscription endpoint it was posted to.
    pub endpoint: String,
    /// The decrypted payload.
    pub payload: Value,
    /// `TTL` header.
    pub ttl: u64,
    /// `Topic` header.
    pub topic: Option<String>,
    /// `Urgency` header.
    pub urgency: Option<String>,
}

/// A subscription's user-agent side: what the browser keeps to decrypt.
struct UaKeys {
    secret: SecretKey,
    auth: [u8; 16],
}

#[derive(Default)]
struct FakeState {
    origin: Mutex<String>,
    subs: Mutex<HashMap<String, UaKeys>>,
    gone: Mutex<HashSet<String>>,
    fail: Mutex<Option<Failure>>,
    received: Mutex<Vec<WebPushReceived>>,
}

/// The fake push service.
pub struct FakeWebPush {
    addr: SocketAddr,
    state: Arc<FakeState>,
}

impl FakeWebPush {
    /// Starts it on 127.0.0.1:0.
    pub async fn start() -> FakeWebPush {
        let state = Arc::new(FakeState::default());
        let router = axum::Router::new()
            .route("/push/{id}", axum::routing::post(push))
            .with_state(state.clone());
        let addr = super::spawn(router).await;
        // The VAPID audience needs the port, known only now; no request comes before `subscribe`.
        *lock(&state.origin) = format!("http://{addr}");
        FakeWebPush { addr, state }
    }

    fn origin(&self) -> String {
        lock(&self.state.origin).clone()
    }

    /// The fake's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A provider config for this fake: a fresh VAPID key, loopback allowed.
    pub fn config(&self) -> WebPushConfig {
        WebPushConfig {
            vapid_key: Some(URL_SAFE_NO_PAD.encode(random_secret().to_bytes())),
            subject: Some("mailto:ops@example.com".into()),
            allowed_hosts: None,
            allow_loopback: true,
        }
    }

    /// A browser's `PushSubscription.toJSON()` for a new subscription on this fake.
    pub fn subscribe(&self) -> Value {
        let secret = random_secret();
        let auth: [u8; 16] = rand::random();
        let id = format!("{:032x}", rand::random::<u128>());
        let p256dh = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        let sub = json!({
            "endpoint": format!("{}/push/{id}", self.origin()),
            "expirationTime": null,
            "keys": { "p256dh": p256dh, "auth": URL_SAFE_NO_PAD.encode(auth) },
        });
        lock(&self.state.subs).insert(id, UaKeys { secret, auth });
        sub
    }

    /// Everything accepted so far.
    pub fn received(&self) -> Vec<WebPushReceived> {
        lock(&self.state.received).clone()
    }

    /// Waits until `n` pushes were accepted or `timeout` passes; returns what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<WebPushReceived> {
        super::wait_for(n, timeout, || self.received()).await
    }

    /// The next request gets `f` instead of being accepted.
    pub fn fail_next(&self, f: Failure) {
        *lock(&self.state.fail) = Some(f);
    }

    /// The subscription at `endpoint` answers 410 Gone from now on.
    pub fn mark_gone(&self, endpoint: &str) {
        let id = endpoint.rsplit('/').next().unwrap_or_default().to_string();
        lock(&self.state.gone).insert(id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_secret() -> SecretKey {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(k) = SecretKey::from_slice(&bytes) {
            return k;
        }
    }
}

fn status(code: u16) -> Response {
    StatusCode::from_u16(code)
        .unwrap_or(StatusCode::BAD_REQUEST)
        .into_response()
}

async fn push(
    State(state): State<Arc<FakeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(f) = lock(&state.fail).take() {
        let mut r = status(f.status);
        if let Some(s) = f.retry_after {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().expect("header"));
        }
        return r;
    }
    if lock(&state.gone).contains(&id) {
        return status(410);
    }
    let keys = {
        let subs = lock(&state.subs);
        match subs.get(&id) {
            Some(k) => (k.secret.clone(), k.auth),
            None => return status(404),
        }
    };
    let origin = lock(&state.origin).clone();
    match accept(&origin, &headers, &body, &keys.0, keys.1) {
        Ok((payload, ttl)) => {
            lock(&state.received).push(WebPushReceived {
                endpoint: format!("{origin}/push/{id}"),
                payload,
                ttl,
                topic: header(&headers, "topic"),
                urgency: header(&headers, "urgency"),
            });
            let mut r = status(201);
            r.headers_mut().insert(
                "location",
                format!("/message/{:x}", rand::random::<u64>())
                    .parse()
                    .expect("header"),
            );
            r
        }
        Err(code) => status(code),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The checks a push service makes; `Err` is the status it answers.
fn accept(
    origin: &str,
    headers: &HeaderMap,
    body: &[u8],
    secret: &SecretKey,
    auth: [u8; 16],
) -> Result<(Value, u64), u16> {
    check_vapid(origin, header(headers, "authorization").as_deref())?;
    if header(headers, "content-encoding").as_deref() != Some("aes128gcm") {
        return Err(400);
    }
    let ttl = header(headers, "ttl")
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or(400u16)?;
    if let Some(t) = header(headers, "topic") {
        let ok = t.len() <= 32
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(400);
        }
    }
    if body.len() > 4096 {
        return Err(413);
    }
    let plain = web_push_native::decrypt(body.to_vec(), secret, &web_push_native::Auth::from(auth))
        .map_err(|_| 400u16)?;
    let payload = serde_json::from_slice(&plain).map_err(|_| 400u16)?;
    Ok((payload, ttl))
}

#[derive(serde::Deserialize)]
struct VapidClaims {
    #[allow(dead_code)]
    aud: String,
    exp: u64,
    sub: String,
}

/// `Authorization: vapid t=<jwt>, k=<key>`: missing → 401, anything wrong → 403.
fn check_vapid(origin: &str, value: Option<&str>) -> Result<(), u16> {
    let rest = value.and_then(|v| v.strip_prefix("vapid ")).ok_or(401u16)?;
    let (mut t, mut k) = (None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("t=") {
            t = Some(v);
        } else if let Some(v) = part.strip_prefix("k=") {
            k = Some(v);
        }
    }
    let (t, k) = (t.ok_or(401u16)?, k.ok_or(401u16)?);
    let point = URL_SAFE_NO_PAD.decode(k).map_err(|_| 403u16)?;
    if point.len() != 65 || point[0] != 4 {
        return Err(403);
    }
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        &URL_SAFE_NO_PAD.encode(&point[1..33]),
        &URL_SAFE_NO_PAD.encode(&point[33..65]),
    )
    .map_err(|_| 403u16)?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.leeway = 0;
    v.set_audience(&[origin]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<VapidClaims>(t, &key, &v)
        .map_err(|_| 403u16)?
        .claims;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if claims.exp > now + 24 * 3600 || claims.sub.is_empty() {
        return Err(403);
    }
    Ok(())
}
