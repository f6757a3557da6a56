//! The Web Push provider against a fake browser push service: encryption, VAPID, headers, the
//! status mapping, and the subscription checks that keep pushes off private addresses.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::config::{PushConfig, WebPushConfig};
use herald::push::webpush::{self, WebPush, address_allowed, check_subscription, topic};
use herald::push::{Outcome, Provider, ProviderKind, Providers, PushJob, PushReason};
use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
use serde_json::{Value, json};

use crate::common::TempDir;
use crate::fakes::Failure;
use crate::fakes::webpush::FakeWebPush;

fn job(sub: &Value, reason: PushReason) -> PushJob {
    PushJob {
        id: "job-1".into(),
        user: "ada".into(),
        device: "laptop".into(),
        provider: ProviderKind::Webpush,
        token: None,
        subscription: Some(sub.clone()),
        title: Some("Grace".into()),
        body: Some("lunch at noon?".into()),
        data: Some(json!({"k": "v"})),
        collapse: "room:general".into(),
        ttl: 120,
        reason,
        channel: "chat".into(),
        room: Some("general".into()),
        seq: Some(42),
        event: "message".into(),
        event_id: "ev-1".into(),
        count: 1,
    }
}

async fn setup() -> (FakeWebPush, WebPush, Value) {
    let fake = FakeWebPush::start().await;
    let wp = WebPush::from_config(&fake.config()).expect("provider");
    let sub = fake.subscribe();
    (fake, wp, sub)
}

/// Real keys (from the fake) on an FCM endpoint: what Chrome hands a page.
async fn fcm_subscription() -> Value {
    let fake = FakeWebPush::start().await;
    let mut sub = fake.subscribe();
    sub["endpoint"] = json!(
        "https://fcm.googleapis.com/fcm/send/dGhpcyBpcyBub3QgYSByZWFsIHRva2Vu:APA91bH_example-token_1234567890"
    );
    sub
}

fn with_endpoint(sub: &Value, endpoint: &str) -> Value {
    let mut s = sub.clone();
    s["endpoint"] = json!(endpoint);
    s
}

fn expect_err(sub: &Value, cfg: &WebPushConfig, field: &str) {
    match check_subscription(sub, cfg) {
        Ok(()) => panic!("accepted {sub}, expected an error on {field}"),
        Err(e) => assert!(
            e.starts_with(&format!("{field}:")),
            "error {e:?} should name {field}"
        ),
    }
}

#[tokio::test]
async fn push_web_job_arrives_decrypted_with_ttl_topic_and_urgency() {
    let (fake, wp, sub) = setup().await;
    assert_eq!(wp.kind(), ProviderKind::Webpush);
    assert_eq!(
        wp.send(&job(&sub, PushReason::Unacked)).await,
        Outcome::Sent
    );
    // A second send reuses the cached VAPID JWT and says `normal` for a background push.
    assert_eq!(
        wp.send(&job(&sub, PushReason::Background)).await,
        Outcome::Sent
    );
    let got = fake.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let first = &got[0];
    assert_eq!(first.endpoint, sub["endpoint"].as_str().unwrap());
    assert_eq!(first.payload["title"], "Grace");
    assert_eq!(first.payload["body"], "lunch at noon?");
    assert_eq!(first.payload["data"]["room"], "general");
    assert_eq!(first.payload["data"]["seq"], 42);
    assert_eq!(first.payload["data"]["event_id"], "ev-1");
    assert_eq!(first.payload["data"]["data"], json!({"k": "v"}));
    assert_eq!(first.ttl, 120);
    assert_eq!(first.topic.as_deref(), Some(topic("room:general").as_str()));
    assert_eq!(first.urgency.as_deref(), Some("high"));
    assert_eq!(got[1].urgency.as_deref(), Some("normal"));
}

#[tokio::test]
async fn push_web_offline_is_high_urgency() {
    let (fake, wp, sub) = setup().await;
    assert_eq!(
        wp.send(&job(&sub, PushReason::Offline)).await,
        Outcome::Sent
    );
    let got = fake.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].urgency.as_deref(), Some("high"));
}

#[tokio::test]
async fn push_web_fake_refuses_what_a_push_service_refuses() {
    // The fake's checks are what the happy path relies on: unsigned, unencrypted or mis-signed
    // requests are refused and not recorded.
    let (fake, wp, sub) = setup().await;
    let endpoint = sub["endpoint"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let post = |auth: Option<String>| {
        let mut r = http
            .post(&endpoint)
            .header("TTL", "60")
            .header("Content-Encoding", "aes128gcm")
            .body(vec![0u8; 100]);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);
    let forged = format!("vapid t=e30.e30.AAAA, k={}", wp.public_key());
    assert_eq!(post(Some(forged)).await.unwrap().status().as_u16(), 403);
    // VAPID JWTs made here: right key, wrong audience / past exp / other key → 403; right
    // everything but a body that does not decrypt → 400.
    let cfg = fake.config();
    let key_bytes = URL_SAFE_NO_PAD
        .decode(cfg.vapid_key.as_deref().unwrap())
        .unwrap();
    let ours = p256::SecretKey::from_slice(&key_bytes).unwrap();
    let ours_k = WebPush::from_config(&cfg).unwrap().public_key();
    let vapid = |signer: &p256::SecretKey, aud: &str, exp: i64| {
        let der = signer.to_pkcs8_der().unwrap();
        let claims = json!({"aud": aud, "exp": exp, "sub": "mailto:ops@example.com"});
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()),
        )
        .unwrap();
        format!("vapid t={jwt}, k={ours_k}")
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let origin = format!("http://{}", fake.addr());
    let theirs = p256::SecretKey::from_slice(&[3u8; 32]).unwrap();
    for (signer, aud, exp) in [
        (&ours, "https://fcm.googleapis.com", now + 3600),
        (&ours, origin.as_str(), now - 10),
        (&ours, origin.as_str(), now + 25 * 3600),
        (&theirs, origin.as_str(), now + 3600),
    ] {
        let status = post(Some(vapid(signer, aud, exp))).await.unwrap().status();
        assert_eq!(status.as_u16(), 403, "aud {aud} exp {exp}");
    }
    let status = post(Some(vapid(&ours, &origin, now + 3600)))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 400, "garbage body accepted");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn push_web_gone_subscription_is_dead_token() {
    let (fake, wp, sub) = setup().await;
    fake.mark_gone(sub["endpoint"].as_str().unwrap());
    let out = wp.send(&job(&sub, PushReason::Offline)).await;
    assert!(matches!(out, Outcome::DeadToken { .. }), "{out:?}");
    // An id the service never issued: 404, also dead.
    let unknown = with_endpoint(&sub, &format!("http://{}/push/never-issued", fake.addr()));
    let out = wp.send(&job(&unknown, PushReason::Offline)).await;
    assert!(matches!(out, Outcome::DeadToken { .. }), "{out:?}");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn push_web_429_retries_after_its_retry_after() {
    let (fake, wp, sub) = setup().await;
    fake.fail_next(Failure {
        status: 429,
        retry_after: Some(3),
    });
    match wp.send(&job(&sub, PushReason::Offline)).await {
        Outcome::Retry { after, reason } => {
            assert_eq!(after, Some(Duration::from_secs(3)));
            assert!(reason.contains("429"), "{reason}");
            assert!(
                !reason.contains("/push/"),
                "reason leaks the endpoint: {reason}"
            );
        }
        other => panic!("expected Retry, got {other:?}"),
    }
    // The failure was for one request only.
    assert_eq!(
        wp.send(&job(&sub, PushReason::Offline)).await,
        Outcome::Sent
    );
}

#[tokio::test]
async fn push_web_503_retries() {
    let (fake, wp, sub) = setup().await;
    fake.fail_next(Failure {
        status: 503,
        retry_after: None,
    });
    let out = wp.send(&job(&sub, PushReason::Offline)).await;
    assert!(matches!(out, Outcome::Retry { after: None, .. }), "{out:?}");
}

#[tokio::test]
async fn push_web_400_fails() {
    let (fake, wp, sub) = setup().await;
    fake.fail_next(Failure {
        status: 400,
        retry_after: None,
    });
    assert_eq!(
        wp.send(&job(&sub, PushReason::Offline)).await,
        Outcome::Failed {
            reason: "webpush 400".into()
        }
    );
}

#[tokio::test]
async fn push_web_wrong_keys_are_refused_by_the_service() {
    // Keys from another subscription: the service cannot decrypt, answers 400, records nothing.
    let (fake, wp, sub) = setup().await;
    let other = fake.subscribe();
    let mut mixed = sub.clone();
    mixed["keys"] = other["keys"].clone();
    let out = wp.send(&job(&mixed, PushReason::Offline)).await;
    assert!(matches!(out, Outcome::Failed { .. }), "{out:?}");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn push_web_refused_connection_retries() {
    let (_fake, wp, sub) = setup().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let dead = with_endpoint(&sub, &format!("http://127.0.0.1:{port}/push/abc"));
    let out = wp.send(&job(&dead, PushReason::Offline)).await;
    match out {
        Outcome::Retry { reason, .. } => {
            assert!(
                !reason.contains("127.0.0.1"),
                "reason leaks the endpoint: {reason}"
            )
        }
        other => panic!("expected Retry, got {other:?}"),
    }
}

#[tokio::test]
async fn push_web_endpoint_resolving_to_private_address_fails_without_sending() {
    // `localhost` allowed by name but not as loopback: the resolved 127.0.0.1 is refused at send.
    let fake = FakeWebPush::start().await;
    let cfg = WebPushConfig {
        allowed_hosts: Some(vec!["localhost".into()]),
        allow_loopback: false,
        ..fake.config()
    };
    let wp = WebPush::from_config(&cfg).unwrap();
    let sub = with_endpoint(&fake.subscribe(), "https://localhost/push/x");
    check_subscription(&sub, &cfg).expect("passes the static checks");
    assert_eq!(
        wp.send(&job(&sub, PushReason::Offline)).await,
        Outcome::Failed {
            reason: "endpoint resolves to a private address".into()
        }
    );
}

#[tokio::test]
async fn push_web_stored_subscription_is_rechecked_at_send() {
    let (fake, wp, _) = setup().await;
    let sub = with_endpoint(&fake.subscribe(), "https://10.1.2.3/push/x");
    match wp.send(&job(&sub, PushReason::Offline)).await {
        Outcome::Failed { reason } => assert!(reason.contains("subscription.endpoint"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    let mut no_sub = job(&sub, PushReason::Offline);
    no_sub.subscription = None;
    assert!(matches!(wp.send(&no_sub).await, Outcome::Failed { .. }));
}

#[tokio::test]
async fn push_web_check_subscription_endpoint_rules() {
    let cfg = WebPushConfig::default();
    let sub = fcm_subscription().await;
    check_subscription(&sub, &cfg).expect("a realistic FCM subscription");
    for ok in [
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk",
        "https://eu.push.services.mozilla.com/wpush/v2/gAAAAABk",
        "https://wns2-db5p.notify.windows.com/w/?token=BQYAAA",
        "https://web.push.apple.com/QGuQyavXutnMH",
        "https://api.push.apple.com/x",
        "https://FCM.googleapis.com./fcm/send/x",
    ] {
        check_subscription(&with_endpoint(&sub, ok), &cfg)
            .unwrap_or_else(|e| panic!("{ok} refused: {e}"));
    }
    for bad in [
        "http://fcm.googleapis.com/fcm/send/x",
        "ftp://fcm.googleapis.com/x",
        "not a url",
        "https://evil.example.com/push",
        "https://fcm.googleapis.com.evil.com/push",
        "https://push.apple.com/x",
        "https://push.services.mozilla.com/x",
        "https://notify.windows.com/x",
        "https://user:pw@fcm.googleapis.com/fcm/send/x",
        "https://8.8.8.8/push",
    ] {
        expect_err(&with_endpoint(&sub, bad), &cfg, "subscription.endpoint");
    }
    let long = format!("https://fcm.googleapis.com/fcm/send/{}", "a".repeat(2048));
    expect_err(&with_endpoint(&sub, &long), &cfg, "subscription.endpoint");
}

#[tokio::test]
async fn push_web_check_subscription_refuses_private_literals() {
    // With every host allowed by name, the address rule alone refuses these.
    let sub = fcm_subscription().await;
    for (host, ip) in [
        ("10.0.0.1", "10.0.0.1"),
        ("172.16.5.4", "172.16.5.4"),
        ("192.168.1.1", "192.168.1.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("169.254.169.254", "169.254.169.254"),
        ("[fe80::1]", "fe80::1"),
        ("100.64.0.1", "100.64.0.1"),
        ("100.127.255.254", "100.127.255.254"),
        ("[fd00::1]", "fd00::1"),
        ("[fc00::1]", "fc00::1"),
        ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254"),
        ("0.0.0.0", "0.0.0.0"),
        ("[::]", "::"),
        ("224.0.0.1", "224.0.0.1"),
        ("255.255.255.255", "255.255.255.255"),
        ("192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
    ] {
        let cfg = WebPushConfig {
            allowed_hosts: Some(vec![host.trim_matches(['[', ']']).into(), host.into()]),
            ..WebPushConfig::default()
        };
        let s = with_endpoint(&sub, &format!("https://{host}/push/x"));
        expect_err(&s, &cfg, "subscription.endpoint");
        let ip: std::net::IpAddr = ip.parse().unwrap();
        assert!(!address_allowed(ip, false), "{ip} allowed");
    }
    for public in ["8.8.8.8", "142.250.74.106", "2a00:1450:4001:82b::200a"] {
        assert!(address_allowed(public.parse().unwrap(), false), "{public}");
    }
    assert!(address_allowed("127.0.0.1".parse().unwrap(), true));
    assert!(!address_allowed("10.0.0.1".parse().unwrap(), true));
    assert!(!address_allowed(
        "::ffff:192.168.0.1".parse().unwrap(),
        true
    ));
}

#[tokio::test]
async fn push_web_check_subscription_key_rules() {
    let cfg = WebPushConfig::default();
    let sub = fcm_subscription().await;
    let with_key = |k: &str, v: Value| {
        let mut s = sub.clone();
        s["keys"][k] = v;
        s
    };
    let b64 = |b: &[u8]| json!(URL_SAFE_NO_PAD.encode(b));
    let mut off_curve = vec![4u8];
    off_curve.extend([1u8; 64]);
    let mut compressed = URL_SAFE_NO_PAD
        .decode(sub["keys"]["p256dh"].as_str().unwrap())
        .unwrap();
    compressed.truncate(33);
    compressed[0] = 2;
    for p256dh in [
        json!("not base64!"),
        b64(&[4u8; 32]),
        b64(&compressed),
        b64(&off_curve),
        json!(5),
    ] {
        expect_err(
            &with_key("p256dh", p256dh),
            &cfg,
            "subscription.keys.p256dh",
        );
    }
    for auth in [json!("***"), b64(&[0u8; 15]), b64(&[0u8; 32]), json!(null)] {
        expect_err(&with_key("auth", auth), &cfg, "subscription.keys.auth");
    }
    let without = |path: &[&str]| {
        let mut s = sub.clone();
        match path {
            [k] => s.as_object_mut().unwrap().remove(*k),
            [o, k] => s[*o].as_object_mut().unwrap().remove(*k),
            _ => unreachable!(),
        };
        s
    };
    expect_err(&without(&["endpoint"]), &cfg, "subscription.endpoint");
    expect_err(&without(&["keys"]), &cfg, "subscription.keys");
    expect_err(
        &without(&["keys", "p256dh"]),
        &cfg,
        "subscription.keys.p256dh",
    );
    expect_err(&without(&["keys", "auth"]), &cfg, "subscription.keys.auth");
    expect_err(&json!("https://fcm.googleapis.com/x"), &cfg, "subscription");
}

#[tokio::test]
async fn push_web_loopback_only_with_allow_loopback() {
    let fake = FakeWebPush::start().await;
    let sub = fake.subscribe();
    let test_cfg = fake.config();
    check_subscription(&sub, &test_cfg).expect("loopback with allow_loopback");
    let localhost = with_endpoint(
        &sub,
        &format!("http://localhost:{}/push/x", fake.addr().port()),
    );
    check_subscription(&localhost, &test_cfg).expect("localhost with allow_loopback");
    let prod = WebPushConfig {
        allow_loopback: false,
        ..test_cfg.clone()
    };
    expect_err(&sub, &prod, "subscription.endpoint");
    expect_err(&localhost, &prod, "subscription.endpoint");
    // allow_loopback opens loopback and nothing else.
    for bad in [
        "http://10.0.0.1:8080/push/x",
        "http://127.0.0.2:8080/push/x",
        "http://fcm.googleapis.com/fcm/send/x",
        "https://evil.example.com/push/x",
    ] {
        expect_err(
            &with_endpoint(&sub, bad),
            &test_cfg,
            "subscription.endpoint",
        );
    }
}

#[tokio::test]
async fn push_web_custom_allowed_hosts_replace_the_defaults() {
    let sub = fcm_subscription().await;
    let cfg = WebPushConfig {
        allowed_hosts: Some(vec!["push.example.net".into(), "*.push.example.org".into()]),
        ..WebPushConfig::default()
    };
    expect_err(&sub, &cfg, "subscription.endpoint");
    check_subscription(&with_endpoint(&sub, "https://push.example.net/p/1"), &cfg).unwrap();
    check_subscription(
        &with_endpoint(&sub, "https://eu.push.example.org/p/1"),
        &cfg,
    )
    .unwrap();
    expect_err(
        &with_endpoint(&sub, "https://push.example.org/p/1"),
        &cfg,
        "subscription.endpoint",
    );
    assert!(webpush::DEFAULT_ALLOWED_HOSTS.contains(&"fcm.googleapis.com"));
}

#[test]
fn push_web_from_config_errors_name_the_key() {
    let good = WebPushConfig {
        vapid_key: Some(URL_SAFE_NO_PAD.encode([7u8; 32])),
        subject: Some("mailto:ops@example.com".into()),
        allowed_hosts: None,
        allow_loopback: false,
    };
    WebPush::from_config(&good).expect("good config");
    let err = |c: WebPushConfig| WebPush::from_config(&c).map(|_| ()).unwrap_err();
    for key in [
        None,
        Some(String::new()),
        Some("not-a-key".into()),
        Some(URL_SAFE_NO_PAD.encode([7u8; 31])),
        Some(URL_SAFE_NO_PAD.encode([0u8; 32])), // zero is not a valid scalar
        Some("/nonexistent/vapid.pem".into()),
    ] {
        let e = err(WebPushConfig {
            vapid_key: key,
            ..good.clone()
        });
        assert!(e.starts_with("push.webpush.vapid_key:"), "{e}");
    }
    for subject in [
        None,
        Some("ops@example.com".into()),
        Some("http://example.com".into()),
        Some("mailto:".into()),
    ] {
        let e = err(WebPushConfig {
            subject,
            ..good.clone()
        });
        assert!(e.starts_with("push.webpush.subject:"), "{e}");
    }
    WebPush::from_config(&WebPushConfig {
        subject: Some("https://example.com/contact".into()),
        ..good.clone()
    })
    .expect("https subject");
    // Through Providers: the error surfaces, and a good config registers the provider.
    let push = PushConfig {
        webpush: Some(WebPushConfig {
            subject: None,
            ..good.clone()
        }),
        ..PushConfig::default()
    };
    assert!(
        Providers::from_config(&push)
            .unwrap_err()
            .contains("push.webpush.subject")
    );
    let push = PushConfig {
        webpush: Some(good),
        ..PushConfig::default()
    };
    assert_eq!(
        Providers::from_config(&push).unwrap().kinds(),
        vec![ProviderKind::Webpush]
    );
}

#[test]
fn push_web_vapid_key_from_files() {
    let dir = TempDir::new("webpush-keys");
    let key = p256::SecretKey::from_slice(&[9u8; 32]).unwrap();
    let expected = {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        URL_SAFE_NO_PAD.encode(key.public_key().to_encoded_point(false).as_bytes())
    };
    let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let sec1 = key.to_sec1_pem(LineEnding::LF).unwrap();
    let files = [
        ("pkcs8.pem", pkcs8.to_string()),
        ("sec1.pem", sec1.to_string()),
        (
            "raw.txt",
            format!("{}\n", URL_SAFE_NO_PAD.encode([9u8; 32])),
        ),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let wp = WebPush::from_config(&WebPushConfig {
            vapid_key: Some(path.display().to_string()),
            subject: Some("mailto:ops@example.com".into()),
            ..WebPushConfig::default()
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(wp.public_key(), expected, "{name}");
    }
    let junk = dir.join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = WebPush::from_config(&WebPushConfig {
        vapid_key: Some(junk.display().to_string()),
        subject: Some("mailto:ops@example.com".into()),
        ..WebPushConfig::default()
    })
    .unwrap_err();
    assert!(e.starts_with("push.webpush.vapid_key:"), "{e}");
    let raw = URL_SAFE_NO_PAD.decode(expected).unwrap();
    assert_eq!((raw.len(), raw[0]), (65, 4));
}

#[test]
fn push_web_topic_is_32_urlsafe_chars_per_collapse_key() {
    let t = topic("room:general");
    assert_eq!(t.len(), 32);
    assert!(
        t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{t}"
    );
    assert_eq!(t, topic("room:general"));
    assert_ne!(t, topic("room:random"));
    assert_eq!(topic("").len(), 32);
}

#[test]
fn push_web_payload_of_a_long_body_fits() {
    let sub = json!({});
    let mut j = job(&sub, PushReason::Offline);
    j.body = Some(format!("{}{}", "é\"\n".repeat(3000), "x".repeat(1000)));
    let p = webpush::payload(&j);
    assert!(p.len() <= 3000, "{} bytes", p.len());
    let v: Value = serde_json::from_slice(&p).expect("valid JSON");
    let body = v["body"].as_str().unwrap();
    assert!(body.ends_with('…'), "{body}");
    assert!(body.len() > 1000, "cut too much: {} bytes", body.len());
    assert_eq!(v["title"], "Grace");
    assert_eq!(v["data"]["room"], "general");
    assert_eq!(v["data"]["seq"], 42);
    // A short one is left alone.
    let short = job(&sub, PushReason::Offline);
    let v: Value = serde_json::from_slice(&webpush::payload(&short)).unwrap();
    assert_eq!(v["body"], "lunch at noon?");
    // Huge title and data too: still bounded, still JSON, room and seq kept.
    j.title = Some("t".repeat(5000));
    j.data = Some(json!({"blob": "d".repeat(5000)}));
    let p = webpush::payload(&j);
    assert!(p.len() <= 3000, "{} bytes", p.len());
    let v: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(v["data"]["room"], "general");
}
