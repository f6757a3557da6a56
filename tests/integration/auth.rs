//! Client JWT rules through `/ws`, `/sse` and `/api/online-status`: where the token may come from, what
//! is refused (expired, bad signature, `none`, algorithm confusion, `nbf`, `aud`, `iss`, missing claims),
//! RS256/ES256 with a public key, the connect timeout, the WebSocket Origin allowlist and CORS.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use herald::config::JwtAlgorithm;
use herald::transport::auth::{Claims, unix_now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::*;

/// HS256 with `secret`, any claims.
fn hs256(claims: &impl serde::Serialize, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A token whose header says `alg: none`, with an empty signature.
fn alg_none(claims: &Claims) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(json!({"alg":"none","typ":"JWT"}).to_string());
    let payload = b64.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.")
}

/// A WebSocket upgrade request (real upgrade headers) that the server refuses: (status, JSON body).
async fn refused_upgrade(t: &TestServer, query: &str, origin: Option<&str>) -> (u16, Value) {
    let mut req = t
        .http
        .get(t.url(&format!("/ws{query}")))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("HTTP timed out")
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The refusal, seen on each client endpoint: `/ws` upgrade, `/sse`, `/api/online-status`.
async fn assert_refused(t: &TestServer, token: &str, why: &str) {
    let ws = Ws::try_connect(&t.ws_url(&format!("?token={token}"))).await;
    assert_eq!(ws.err(), Some(401), "{why}: /ws upgrade");
    let sse = Sse::try_open(&t.url(&format!("/sse?channels=global&token={token}")), None).await;
    assert_eq!(sse.status, 401, "{why}: /sse");
    let got = t
        .call("GET", "/api/online-status/count", None, Some(token))
        .await;
    assert_error(&got, 401, "unauthorized");
}

/// The acceptance, seen on each client endpoint; `user` is the expected `sub`.
async fn assert_accepted(t: &TestServer, token: &str, user: &str) {
    let ws = t.ws_token(token).await;
    assert_eq!(ws.connected["user"], user);
    let sse = Sse::try_open(
        &t.url(&format!("/sse?channels=user:{user}&token={token}")),
        None,
    )
    .await;
    assert_eq!(sse.status, 200, "/sse");
    let (s, v) = t
        .call("GET", "/api/online-status/count", None, Some(token))
        .await;
    assert_eq!(s, 200, "/api/online-status: {v}");
}

#[tokio::test]
async fn token_in_query_header_or_connect_frame() {
    let t = TestServer::start().await;
    // ?token=
    let ws = t.ws("alice").await;
    assert_eq!(ws.connected["user"], "alice");

    // Authorization: Bearer
    let mut req = t.ws_url("").into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", t.token("bob"))).unwrap(),
    );
    let mut ws = Ws::try_connect_request(req)
        .await
        .expect("bearer header accepted");
    let c = ws.next().await;
    assert_eq!(c["type"], "connected", "{c}");
    assert_eq!(c["user"], "bob");

    // The `connect` frame; `connected` carries its ref.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token":t.token("carol"),"ref":"c1","device":"phone-1","platform":"ios"}))
        .await;
    let c = ws.next().await;
    assert_eq!(c["type"], "connected", "{c}");
    assert_eq!(c["ref"], "c1");
    assert_eq!(c["user"], "carol");
    assert_eq!(c["device"], "phone-1");
    assert_eq!(ws.request(json!({"op":"ping"})).await["type"], "pong");

    // SSE with the Bearer header, and with ?token=.
    let resp = t
        .http
        .get(t.url("/sse?channels=user:dave"))
        .bearer_auth(t.token("dave"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    drop(resp);
    let sse = Sse::try_open(
        &t.url(&format!(
            "/sse?channels=user:dave&token={}",
            t.token("dave")
        )),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);

    // No token at all: 401 on SSE and the seed 002 API.
    assert_eq!(
        Sse::try_open(&t.url("/sse?channels=global"), None)
            .await
            .status,
        401
    );
    assert_error(
        &t.call("GET", "/api/online-status/count", None, None).await,
        401,
        "unauthorized",
    );
}

#[tokio::test]
async fn expired_token_is_refused_with_401_or_4002() {
    let t = TestServer::start().await;
    let mut c = claims("alice");
    c.exp = unix_now() - 3600;
    let expired = t.token_with(c);
    assert_refused(&t, &expired, "expired").await;
    // Refused on upgrade: the body has the protocol's shape.
    assert_error(
        &refused_upgrade(&t, &format!("?token={expired}"), None).await,
        401,
        "unauthorized",
    );

    // In the connect frame: `disconnect` 4002, then close.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token":expired,"ref":"c1"}))
        .await;
    let closed = ws.closed().await;
    assert_eq!(closed.disconnect, Some(4002), "{closed:?}");
}

#[tokio::test]
async fn bad_signature_and_alg_none_are_refused() {
    let t = TestServer::start().await;
    let c = claims("alice");
    assert_refused(
        &t,
        &hs256(&c, b"some-other-secret-0123456789"),
        "bad signature",
    )
    .await;
    // A valid token with its signature tampered.
    let good = t.token("alice");
    let i = good.len() - 10;
    let swap = if &good[i..=i] == "A" { "B" } else { "A" };
    let tampered = format!("{}{swap}{}", &good[..i], &good[i + 1..]);
    assert_refused(&t, &tampered, "tampered signature").await;
    // Payload swapped under a valid signature.
    let parts: Vec<&str> = good.split('.').collect();
    let other = t.token("mallory");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_refused(&t, &forged, "payload swapped").await;
    assert_refused(&t, &alg_none(&c), "alg none").await;
    assert_refused(&t, "not.a.jwt", "garbage").await;

    // In the connect frame: `disconnect` 4001.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token":alg_none(&c),"ref":"c1"}))
        .await;
    assert_eq!(ws.closed().await.disconnect, Some(4001));
    // The valid token still works.
    assert_accepted(&t, &good, "alice").await;
}

#[tokio::test]
async fn not_yet_valid_token_is_refused() {
    let t = TestServer::start().await;
    let mut c = claims("alice");
    c.nbf = Some(unix_now() + 3600);
    assert_refused(&t, &t.token_with(c), "nbf in the future").await;
    let mut c = claims("alice");
    c.nbf = Some(unix_now() - 10);
    assert_accepted(&t, &t.token_with(c), "alice").await;
}

#[tokio::test]
async fn audience_is_checked_when_configured() {
    let t = TestServer::start_with(|c| c.jwt.audience = Some("herald-app".into())).await;
    let mut c = claims("alice");
    c.aud = Some(json!("other-app"));
    assert_refused(&t, &t.token_with(c), "wrong aud").await;
    let mut c = claims("alice");
    c.aud = Some(json!(["other-app"]));
    assert_refused(&t, &t.token_with(c), "wrong aud list").await;
    assert_refused(&t, &t.token("alice"), "no aud when one is required").await;
    let mut c = claims("alice");
    c.aud = Some(json!("herald-app"));
    assert_accepted(&t, &t.token_with(c), "alice").await;
}

#[tokio::test]
async fn issuer_is_checked_when_configured() {
    let t = TestServer::start_with(|c| c.jwt.issuer = Some("https://id.example".into())).await;
    let mut c = claims("alice");
    c.iss = Some("https://evil.example".into());
    assert_refused(&t, &t.token_with(c), "wrong iss").await;
    assert_refused(&t, &t.token("alice"), "no iss when one is required").await;
    let mut c = claims("alice");
    c.iss = Some("https://id.example".into());
    assert_accepted(&t, &t.token_with(c), "alice").await;
}

#[tokio::test]
async fn audience_and_issuer_are_not_required_unless_configured() {
    let t = TestServer::start().await;
    let mut c = claims("alice");
    c.aud = Some(json!("anything"));
    c.iss = Some("anyone".into());
    assert_accepted(&t, &t.token_with(c), "alice").await;
}

#[tokio::test]
async fn missing_exp_or_sub_is_refused() {
    let t = TestServer::start().await;
    let no_exp = json!({"sub":"alice"});
    assert_refused(&t, &hs256(&no_exp, SECRET.as_bytes()), "no exp").await;
    let no_sub = json!({"exp": unix_now() + 3600});
    assert_refused(&t, &hs256(&no_sub, SECRET.as_bytes()), "no sub").await;
    let bad_sub = json!({"sub":"a b", "exp": unix_now() + 3600});
    assert_refused(&t, &hs256(&bad_sub, SECRET.as_bytes()), "bad sub").await;
    // The same map with both is fine (the harness is not hiding a difference).
    let ok = json!({"sub":"alice", "exp": unix_now() + 3600});
    assert_accepted(&t, &hs256(&ok, SECRET.as_bytes()), "alice").await;
}

// ---- RS256 / ES256 with a public key ----

pub struct KeyPair {
    pub private_pem: Vec<u8>,
    pub public_pem: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One RSA key pair per test process (generation is the slow part).
fn rsa_keys() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| {
        let d = TempDir::new("rsa");
        openssl(
            &d.path,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        openssl(
            &d.path,
            &["pkey", "-in", "key.pem", "-pubout", "-out", "pub.pem"],
        );
        KeyPair {
            private_pem: std::fs::read(d.join("key.pem")).unwrap(),
            public_pem: std::fs::read(d.join("pub.pem")).unwrap(),
        }
    })
}

/// One P-256 key pair per test process.
pub fn ec_keys() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| {
        let d = TempDir::new("ec");
        openssl(
            &d.path,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sec1.pem",
            ],
        );
        openssl(
            &d.path,
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "sec1.pem", "-out", "key.pem",
            ],
        );
        openssl(
            &d.path,
            &["ec", "-in", "sec1.pem", "-pubout", "-out", "pub.pem"],
        );
        KeyPair {
            private_pem: std::fs::read(d.join("key.pem")).unwrap(),
            public_pem: std::fs::read(d.join("pub.pem")).unwrap(),
        }
    })
}

async fn public_key_server(algorithm: JwtAlgorithm, keys: &KeyPair) -> TestServer {
    let pem = keys.public_pem.clone();
    TestServer::start_with(move |c| {
        c.jwt.algorithm = algorithm;
        c.jwt.public_key_pem = Some(pem);
    })
    .await
}

#[tokio::test]
async fn rs256_with_a_public_key_refuses_hs256_confusion() {
    let keys = rsa_keys();
    let t = public_key_server(JwtAlgorithm::RS256, keys).await;
    let c = claims("alice");
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&keys.private_pem).unwrap(),
    )
    .unwrap();
    assert_accepted(&t, &rs, "alice").await;
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token":rs,"ref":"c1"})).await;
    assert_eq!(ws.next().await["ref"], "c1");

    // Algorithm confusion: HS256 signed with the public key's PEM bytes as the HMAC secret.
    assert_refused(
        &t,
        &hs256(&c, &keys.public_pem),
        "HS256 with the public key as secret",
    )
    .await;
    // The test config's HS256 secret is no longer accepted either.
    assert_refused(
        &t,
        &hs256(&c, SECRET.as_bytes()),
        "HS256 with the old secret",
    )
    .await;
    assert_refused(&t, &alg_none(&c), "alg none").await;
    // A token signed with another algorithm's key.
    let other = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &c,
        &EncodingKey::from_ec_pem(&ec_keys().private_pem).unwrap(),
    )
    .unwrap();
    assert_refused(&t, &other, "ES256 on an RS256 server").await;
    // Expiry still applies.
    let mut old = claims("alice");
    old.exp = unix_now() - 3600;
    let old = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &old,
        &EncodingKey::from_rsa_pem(&keys.private_pem).unwrap(),
    )
    .unwrap();
    assert_refused(&t, &old, "expired RS256").await;
}

#[tokio::test]
async fn es256_with_a_public_key_refuses_hs256_confusion() {
    let keys = ec_keys();
    let t = public_key_server(JwtAlgorithm::ES256, keys).await;
    let c = claims("alice");
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &c,
        &EncodingKey::from_ec_pem(&keys.private_pem).unwrap(),
    )
    .unwrap();
    assert_accepted(&t, &es, "alice").await;
    assert_refused(
        &t,
        &hs256(&c, &keys.public_pem),
        "HS256 with the public key as secret",
    )
    .await;
    assert_refused(
        &t,
        &hs256(&c, SECRET.as_bytes()),
        "HS256 with the old secret",
    )
    .await;
    assert_refused(&t, &alg_none(&c), "alg none").await;
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&rsa_keys().private_pem).unwrap(),
    )
    .unwrap();
    assert_refused(&t, &rs, "RS256 on an ES256 server").await;
}

// ---- the connect frame's deadline, Origin, CORS ----

#[tokio::test]
async fn no_connect_frame_within_the_timeout_gets_4001() {
    let t = TestServer::start_with(|c| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let started = tokio::time::Instant::now();
    let mut ws = Ws::connect(&t.ws_url("")).await;
    let closed = ws.closed().await;
    assert_eq!(closed.disconnect, Some(4001), "{closed:?}");
    assert_eq!(closed.close, Some(4001), "{closed:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the timeout"
    );

    // A first frame that is not `connect` is refused the same way.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"ping","ref":1})).await;
    assert_eq!(ws.closed().await.disconnect, Some(4001));
}

#[tokio::test]
async fn ws_origin_allowlist() {
    let t = TestServer::start_with(|c| c.ws_origins = vec!["https://ok.example".into()]).await;
    let request = |origin: &str| {
        let mut req = t
            .ws_url(&format!("?token={}", t.token("alice")))
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
        req
    };
    assert_eq!(
        Ws::try_connect_request(request("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        Ws::try_connect_request(request("https://ok.example.evil"))
            .await
            .err(),
        Some(403)
    );
    let mut ws = Ws::try_connect_request(request("https://ok.example"))
        .await
        .expect("listed origin accepted");
    assert_eq!(ws.next().await["type"], "connected");
    // The refusal has the protocol's shape.
    let token = format!("?token={}", t.token("alice"));
    assert_error(
        &refused_upgrade(&t, &token, Some("https://evil.example")).await,
        403,
        "forbidden",
    );
}

#[tokio::test]
async fn origin_is_not_checked_by_default() {
    let t = TestServer::start().await;
    let mut req = t
        .ws_url(&format!("?token={}", t.token("alice")))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "origin",
        HeaderValue::from_static("https://anywhere.example"),
    );
    let mut ws = Ws::try_connect_request(req)
        .await
        .expect("no allowlist: any origin");
    assert_eq!(ws.next().await["type"], "connected");
}

#[tokio::test]
async fn cors_preflight_on_client_endpoints() {
    let t = TestServer::start().await;
    for path in ["/sse", "/api/online-status/count"] {
        let resp = t
            .http
            .request(reqwest::Method::OPTIONS, t.url(path))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,last-event-id,idempotency-key",
            )
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        let h = resp.headers();
        let origin = h
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            matches!(origin.as_deref(), Some("*" | "https://app.example")),
            "{path}: allow-origin {origin:?}"
        );
        let methods = h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .to_ascii_uppercase();
        assert!(methods.contains("GET"), "{methods}");
        let headers = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(
            headers.contains("authorization")
                && headers.contains("last-event-id")
                && headers.contains("idempotency-key"),
            "{headers}"
        );
    }

    // With a configured list, other origins get no allow-origin.
    let t = TestServer::start_with(|c| c.cors_origins = vec!["https://app.example".into()]).await;
    let preflight = |origin: &'static str| {
        t.http
            .request(reqwest::Method::OPTIONS, t.url("/sse"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers()
    );
}
