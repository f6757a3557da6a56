//! The FCM and APNs providers against fake Google and Apple servers (tests/integration/fakes):
//! what arrives, how tokens are fetched and reused, and how every kind of refusal maps to an
//! [`Outcome`].

use std::sync::Arc;
use std::time::Duration;

use herald::config::{ApnsConfig, FcmConfig};
use herald::push::apns::{self, Apns};
use herald::push::fcm::{self, Fcm};
use herald::push::{Outcome, Provider, ProviderKind, PushJob, PushReason};
use serde_json::json;

use crate::common::TempDir;
use crate::fakes::Failure;
use crate::fakes::apple::FakeApns;
use crate::fakes::google::FakeFcm;

const WAIT: Duration = Duration::from_secs(5);
const FCM_TOKEN: &str = "fcm-device:APA91bH_test.token-0001";

fn job(provider: ProviderKind, token: &str) -> PushJob {
    PushJob {
        id: "job-1".into(),
        user: "alice".into(),
        device: "phone".into(),
        provider,
        token: Some(token.into()),
        subscription: None,
        title: Some("Bob".into()),
        body: Some("lunch?".into()),
        data: Some(json!({"kind": "dm", "n": 2})),
        collapse: "room:lobby".into(),
        ttl: 3600,
        reason: PushReason::Offline,
        channel: "room:lobby".into(),
        room: Some("lobby".into()),
        seq: Some(42),
        event: "message".into(),
        event_id: "ev-1".into(),
        count: 1,
    }
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn fcm_setup() -> (FakeFcm, Fcm, TempDir) {
    let fake = FakeFcm::start().await;
    let dir = TempDir::new("fcm");
    let p = Fcm::from_config(&fake.config(&dir.path)).expect("fcm from_config");
    (fake, p, dir)
}

fn fcm_job() -> PushJob {
    job(ProviderKind::Fcm, FCM_TOKEN)
}

fn is_retry(o: &Outcome) -> bool {
    matches!(o, Outcome::Retry { .. })
}

#[tokio::test]
async fn push_fcm_happy_path_delivers_notification_data_and_android_options() {
    let (fake, p, _dir) = fcm_setup().await;
    assert_eq!(p.kind(), ProviderKind::Fcm);
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    let got = fake.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.token, FCM_TOKEN);
    assert_eq!(m.title.as_deref(), Some("Bob"));
    assert_eq!(m.body.as_deref(), Some("lunch?"));
    assert_eq!(m.data["room"], "lobby");
    assert_eq!(m.data["seq"], "42");
    assert_eq!(m.data["channel"], "room:lobby");
    assert_eq!(m.data["event"], "message");
    assert_eq!(m.data["event_id"], "ev-1");
    assert_eq!(m.data["count"], "1");
    assert_eq!(m.data["reason"], "offline");
    let nested: serde_json::Value = serde_json::from_str(&m.data["data"]).unwrap();
    assert_eq!(nested, json!({"kind": "dm", "n": 2}));
    assert_eq!(m.collapse_key.as_deref(), Some("room:lobby"));
    assert_eq!(m.ttl.as_deref(), Some("3600s"));
    assert_eq!(m.message["android"]["priority"], "high");
    assert_eq!(m.apns_collapse_id.as_deref(), Some("room:lobby"));
}

#[tokio::test]
async fn push_fcm_long_collapse_is_cut_to_64_bytes_for_apns() {
    let (fake, p, _dir) = fcm_setup().await;
    let mut j = fcm_job();
    j.collapse = format!("{}é", "a".repeat(63));
    assert_eq!(p.send(&j).await, Outcome::Sent);
    let got = fake.wait_for(1, WAIT).await;
    assert_eq!(got[0].collapse_key.as_deref(), Some(j.collapse.as_str()));
    assert_eq!(
        got[0].apns_collapse_id.as_deref(),
        Some("a".repeat(63).as_str())
    );
}

#[tokio::test]
async fn push_fcm_oauth_token_is_fetched_once_for_concurrent_sends() {
    let (fake, p, _dir) = fcm_setup().await;
    let p = Arc::new(p);
    let sends = (0..5).map(|i| {
        let p = p.clone();
        tokio::spawn(async move {
            let mut j = fcm_job();
            j.id = format!("job-{i}");
            p.send(&j).await
        })
    });
    for s in sends.collect::<Vec<_>>() {
        assert_eq!(s.await.unwrap(), Outcome::Sent);
    }
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    assert_eq!(fake.received().len(), 6);
    assert_eq!(fake.token_requests(), 1);
}

#[tokio::test]
async fn push_fcm_401_refreshes_the_token_once_and_sends() {
    let (fake, p, _dir) = fcm_setup().await;
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    assert_eq!(fake.token_requests(), 1);
    fake.expire_tokens();
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.received().len(), 2);
    // The fresh token is cached again.
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn push_fcm_401_twice_fails_after_one_refresh() {
    let (fake, p, _dir) = fcm_setup().await;
    for _ in 0..2 {
        fake.fail_next(Failure {
            status: 401,
            retry_after: None,
        });
    }
    assert_eq!(
        p.send(&fcm_job()).await,
        Outcome::Failed {
            reason: "fcm 401 UNAUTHENTICATED".into()
        }
    );
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.sends(), 2);
}

#[tokio::test]
async fn push_fcm_fake_refuses_http1_and_bad_data() {
    let (fake, p, _dir) = fcm_setup().await;
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    let url = format!("{}/v1/projects/herald-test/messages:send", fake.url());
    let h1 = reqwest::Client::new();
    let r = h1.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 505);
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
        "not-a-jwt"
    );
    let r = h1
        .post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "an unsigned assertion is refused");
    // Over h2 with a good token, a non-string data value is refused as Google does.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(&url)
        .bearer_auth("ya29.1")
        .json(&json!({"message": {"token": "t", "data": {"seq": 42}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    let r = h2
        .post(&url)
        .bearer_auth("ya29.999")
        .json(&json!({"message": {"token": "t"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "a token it never issued");
}

#[tokio::test]
async fn push_fcm_unregistered_token_is_dead() {
    let (fake, p, _dir) = fcm_setup().await;
    fake.unregister(FCM_TOKEN);
    let o = p.send(&fcm_job()).await;
    assert_eq!(
        o,
        Outcome::DeadToken {
            reason: "fcm 404 UNREGISTERED".into()
        }
    );
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn push_fcm_429_retries_after_retry_after() {
    let (fake, p, _dir) = fcm_setup().await;
    fake.fail_next(Failure {
        status: 429,
        retry_after: Some(2),
    });
    match p.send(&fcm_job()).await {
        Outcome::Retry { after, reason } => {
            assert_eq!(after, Some(Duration::from_secs(2)));
            assert_eq!(reason, "fcm 429 QUOTA_EXCEEDED");
        }
        o => panic!("expected retry, got {o:?}"),
    }
    // The next one goes through.
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
}

#[tokio::test]
async fn push_fcm_503_and_500_retry() {
    let (fake, p, _dir) = fcm_setup().await;
    for status in [503, 500] {
        fake.fail_next(Failure {
            status,
            retry_after: None,
        });
        let o = p.send(&fcm_job()).await;
        assert!(
            matches!(&o, Outcome::Retry { after: None, reason } if reason.starts_with(&format!("fcm {status}"))),
            "{status}: {o:?}"
        );
    }
}

#[tokio::test]
async fn push_fcm_400_and_403_fail() {
    let (fake, p, _dir) = fcm_setup().await;
    fake.fail_next(Failure {
        status: 400,
        retry_after: None,
    });
    assert_eq!(
        p.send(&fcm_job()).await,
        Outcome::Failed {
            reason: "fcm 400 INVALID_ARGUMENT".into()
        }
    );
    fake.fail_next(Failure {
        status: 403,
        retry_after: None,
    });
    let o = p.send(&fcm_job()).await;
    assert!(
        matches!(&o, Outcome::Failed { reason } if reason.starts_with("fcm 403")),
        "{o:?}"
    );
}

#[tokio::test]
async fn push_fcm_reasons_never_carry_token_or_text() {
    let (fake, p, _dir) = fcm_setup().await;
    fake.unregister(FCM_TOKEN);
    fake.fail_next(Failure {
        status: 400,
        retry_after: None,
    });
    for o in [p.send(&fcm_job()).await, p.send(&fcm_job()).await] {
        let r = format!("{o:?}");
        assert!(
            !r.contains(FCM_TOKEN) && !r.contains("lunch") && !r.contains("Bob"),
            "{r}"
        );
    }
}

#[tokio::test]
async fn push_fcm_connection_refused_retries() {
    let fake = FakeFcm::start().await;
    let dir = TempDir::new("fcm");
    let mut c = fake.config(&dir.path);
    c.endpoint = Some(format!("http://127.0.0.1:{}", dead_port().await));
    let p = Fcm::from_config(&c).unwrap();
    let o = p.send(&fcm_job()).await;
    assert!(matches!(&o, Outcome::Retry { after: None, .. }), "{o:?}");
}

#[tokio::test]
async fn push_fcm_token_endpoint_failures_retry_on_5xx_and_fail_on_4xx() {
    let (fake, p, _dir) = fcm_setup().await;
    fake.fail_next_token(Failure {
        status: 503,
        retry_after: None,
    });
    let o = p.send(&fcm_job()).await;
    assert!(is_retry(&o), "{o:?}");
    fake.fail_next_token(Failure {
        status: 400,
        retry_after: None,
    });
    assert_eq!(
        p.send(&fcm_job()).await,
        Outcome::Failed {
            reason: "fcm auth 400".into()
        }
    );
    assert_eq!(p.send(&fcm_job()).await, Outcome::Sent);
    assert_eq!(fake.sends(), 1, "no send without a token");
}

#[tokio::test]
async fn push_fcm_token_endpoint_unreachable_retries() {
    let fake = FakeFcm::start().await;
    let dir = TempDir::new("fcm");
    let path = fake.credentials_file(&dir.path);
    let mut sa: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    sa["token_uri"] = format!("http://127.0.0.1:{}/token", dead_port().await).into();
    std::fs::write(&path, sa.to_string()).unwrap();
    let p = Fcm::from_config(&FcmConfig {
        endpoint: Some(fake.url()),
        credentials: Some(path),
    })
    .unwrap();
    let o = p.send(&fcm_job()).await;
    assert!(is_retry(&o), "{o:?}");
}

#[tokio::test]
async fn push_fcm_from_config_errors_name_the_key() {
    let err = |c: &FcmConfig| Fcm::from_config(c).map(|_| ()).unwrap_err();
    let e = err(&FcmConfig::default());
    assert!(e.starts_with("push.fcm.credentials:"), "{e}");
    let dir = TempDir::new("fcm-bad");
    let e = err(&FcmConfig {
        endpoint: None,
        credentials: Some(dir.join("nope.json")),
    });
    assert!(
        e.starts_with("push.fcm.credentials:") && e.contains("nope.json"),
        "{e}"
    );
    let fake = FakeFcm::start().await;
    let path = fake.credentials_file(&dir.path);
    let sa: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for field in ["project_id", "private_key", "client_email"] {
        let mut bad = sa.clone();
        bad.as_object_mut().unwrap().remove(field);
        std::fs::write(&path, bad.to_string()).unwrap();
        let e = err(&FcmConfig {
            endpoint: None,
            credentials: Some(path.clone()),
        });
        assert!(
            e.starts_with("push.fcm.credentials:") && e.contains(field),
            "{e}"
        );
    }
    let mut bad = sa.clone();
    bad["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
    std::fs::write(&path, bad.to_string()).unwrap();
    let e = err(&FcmConfig {
        endpoint: None,
        credentials: Some(path.clone()),
    });
    assert!(e.contains("private_key") && !e.contains("AAAA"), "{e}");
    std::fs::write(&path, sa.to_string()).unwrap();
    let e = err(&FcmConfig {
        endpoint: Some("ftp://x".into()),
        credentials: Some(path),
    });
    assert!(e.starts_with("push.fcm.endpoint:"), "{e}");
}

#[tokio::test]
async fn push_fcm_from_config_via_providers() {
    let fake = FakeFcm::start().await;
    let dir = TempDir::new("fcm");
    let mut push = herald::config::PushConfig {
        fcm: Some(fake.config(&dir.path)),
        ..Default::default()
    };
    let ps = herald::push::Providers::from_config(&push).unwrap();
    assert_eq!(ps.kinds(), vec![ProviderKind::Fcm]);
    push.fcm = Some(FcmConfig::default());
    let e = herald::push::Providers::from_config(&push).unwrap_err();
    assert!(e.starts_with("push.fcm.credentials"), "{e}");
}

#[test]
fn push_fcm_valid_token_accepts_and_rejects_shapes() {
    assert!(fcm::valid_token(FCM_TOKEN).is_ok());
    assert!(fcm::valid_token("a").is_ok());
    assert!(fcm::valid_token(&"A".repeat(4096)).is_ok());
    for bad in ["", "has space", "slash/x", "é", "q?x"] {
        let e = fcm::valid_token(bad).unwrap_err();
        assert!(e.starts_with("token:"), "{bad}: {e}");
    }
    assert!(fcm::valid_token(&"A".repeat(4097)).is_err());
}

// ---- APNs ----

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

async fn apns_setup() -> (FakeApns, Apns, TempDir) {
    let fake = FakeApns::start().await;
    let dir = TempDir::new("apns");
    let p = Apns::from_config(&fake.config(&dir.path)).expect("apns from_config");
    (fake, p, dir)
}

fn apns_job() -> PushJob {
    job(ProviderKind::Apns, APNS_TOKEN)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn push_apns_happy_path_headers_and_payload() {
    let (fake, p, _dir) = apns_setup().await;
    assert_eq!(p.kind(), ProviderKind::Apns);
    let before = unix_now();
    assert_eq!(p.send(&apns_job()).await, Outcome::Sent);
    let got = fake.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.token, APNS_TOKEN);
    assert_eq!(r.topic, crate::fakes::apple::TOPIC);
    assert_eq!(r.push_type, "alert");
    assert_eq!(r.priority.as_deref(), Some("10"));
    let exp: u64 = r.expiration.as_deref().unwrap().parse().unwrap();
    assert!(exp >= before + 3600 && exp <= unix_now() + 3600, "{exp}");
    assert_eq!(r.collapse_id.as_deref(), Some("room:lobby"));
    assert!(uuid::Uuid::parse_str(&r.apns_id).is_ok(), "{}", r.apns_id);
    let aps = &r.payload["aps"];
    assert_eq!(aps["alert"]["title"], "Bob");
    assert_eq!(aps["alert"]["body"], "lunch?");
    assert_eq!(aps["sound"], "default");
    assert_eq!(aps["thread-id"], "lobby");
    let h = &r.payload["herald"];
    assert_eq!(h["room"], "lobby");
    assert_eq!(h["seq"], 42);
    assert_eq!(h["event_id"], "ev-1");
    assert_eq!(h["data"], json!({"kind": "dm", "n": 2}));
}

#[tokio::test]
async fn push_apns_id_is_stable_per_job_and_ttl_zero_means_expiration_zero() {
    let (fake, p, _dir) = apns_setup().await;
    let mut j = apns_job();
    j.ttl = 0;
    assert_eq!(p.send(&j).await, Outcome::Sent);
    assert_eq!(p.send(&j).await, Outcome::Sent);
    j.id = "job-2".into();
    assert_eq!(p.send(&j).await, Outcome::Sent);
    let got = fake.wait_for(3, WAIT).await;
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].apns_id, got[1].apns_id,
        "a retried job keeps its apns-id"
    );
    assert_ne!(got[0].apns_id, got[2].apns_id);
    assert_eq!(got[0].expiration.as_deref(), Some("0"));
}

#[tokio::test]
async fn push_apns_without_title_or_body_is_a_background_push() {
    let (fake, p, _dir) = apns_setup().await;
    let mut j = apns_job();
    j.title = None;
    j.body = None;
    j.room = None;
    assert_eq!(p.send(&j).await, Outcome::Sent);
    let r = &fake.wait_for(1, WAIT).await[0];
    assert_eq!(r.priority.as_deref(), Some("5"));
    assert_eq!(r.push_type, "background");
    assert_eq!(r.payload["aps"]["content-available"], 1);
    assert!(r.payload["aps"].get("alert").is_none());
    assert_eq!(
        r.payload["aps"]["thread-id"], "room:lobby",
        "channel when no room"
    );
}

#[tokio::test]
async fn push_apns_long_body_and_collapse_are_cut_to_apples_limits() {
    let (fake, p, _dir) = apns_setup().await;
    let mut j = apns_job();
    j.body = Some("ü".repeat(5000));
    j.collapse = format!("{}é", "c".repeat(63));
    assert_eq!(p.send(&j).await, Outcome::Sent);
    let r = &fake.wait_for(1, WAIT).await[0];
    assert!(r.size <= 4096, "{}", r.size);
    let body = r.payload["aps"]["alert"]["body"].as_str().unwrap();
    assert!(
        body.len() > 3000 && body.chars().all(|c| c == 'ü'),
        "{}",
        body.len()
    );
    assert_eq!(r.collapse_id.as_deref(), Some("c".repeat(63).as_str()));
}

#[tokio::test]
async fn push_apns_provider_token_is_reused_across_sends() {
    let (fake, p, _dir) = apns_setup().await;
    for i in 0..5 {
        let mut j = apns_job();
        j.id = format!("job-{i}");
        assert_eq!(p.send(&j).await, Outcome::Sent);
    }
    assert_eq!(fake.received().len(), 5);
    assert_eq!(fake.provider_tokens_seen(), 1);
}

#[tokio::test]
async fn push_apns_expired_provider_token_is_replaced_once() {
    let (fake, p, _dir) = apns_setup().await;
    assert_eq!(p.send(&apns_job()).await, Outcome::Sent);
    fake.expire_provider_tokens();
    // ES256 here is deterministic (RFC 6979): a token signed in the same second would be the
    // same token. Apple's expiry is an hour, so a real refresh always has a later `iat`.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(p.send(&apns_job()).await, Outcome::Sent);
    assert_eq!(fake.provider_tokens_seen(), 2);
    assert_eq!(fake.requests(), 3, "one refused, one retried");
    assert_eq!(p.send(&apns_job()).await, Outcome::Sent);
    assert_eq!(fake.provider_tokens_seen(), 2, "the new token is reused");
}

#[tokio::test]
async fn push_apns_unregistered_410_is_dead() {
    let (fake, p, _dir) = apns_setup().await;
    fake.unregister(APNS_TOKEN);
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::DeadToken {
            reason: "apns 410 Unregistered".into()
        }
    );
}

#[tokio::test]
async fn push_apns_bad_device_token_is_dead() {
    let (fake, p, _dir) = apns_setup().await;
    fake.bad_device(APNS_TOKEN);
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::DeadToken {
            reason: "apns 400 BadDeviceToken".into()
        }
    );
    // A token that is not even hex never leaves the process.
    let o = p.send(&job(ProviderKind::Apns, &"zz".repeat(32))).await;
    assert!(matches!(o, Outcome::DeadToken { .. }), "{o:?}");
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn push_apns_429_retries_after_retry_after() {
    let (fake, p, _dir) = apns_setup().await;
    fake.fail_next(Failure {
        status: 429,
        retry_after: Some(2),
    });
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::Retry {
            after: Some(Duration::from_secs(2)),
            reason: "apns 429 TooManyRequests".into()
        }
    );
    assert_eq!(p.send(&apns_job()).await, Outcome::Sent);
}

#[tokio::test]
async fn push_apns_503_and_500_retry() {
    let (fake, p, _dir) = apns_setup().await;
    for status in [503, 500] {
        fake.fail_next(Failure {
            status,
            retry_after: None,
        });
        let o = p.send(&apns_job()).await;
        assert!(
            matches!(&o, Outcome::Retry { after: None, reason } if reason.starts_with(&format!("apns {status}"))),
            "{status}: {o:?}"
        );
    }
}

#[tokio::test]
async fn push_apns_400_and_403_fail() {
    let (fake, p, _dir) = apns_setup().await;
    fake.fail_next(Failure {
        status: 400,
        retry_after: None,
    });
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::Failed {
            reason: "apns 400 BadTopic".into()
        }
    );
    fake.fail_next(Failure {
        status: 403,
        retry_after: None,
    });
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::Failed {
            reason: "apns 403 Forbidden".into()
        }
    );
}

#[tokio::test]
async fn push_apns_wrong_topic_or_team_fails() {
    let fake = FakeApns::start().await;
    let dir = TempDir::new("apns");
    let mut c = fake.config(&dir.path);
    c.topic = Some("com.other.app".into());
    let p = Apns::from_config(&c).unwrap();
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::Failed {
            reason: "apns 400 BadTopic".into()
        }
    );
    let mut c = fake.config(&dir.path);
    c.team_id = Some("OTHERTEAM1".into());
    let p = Apns::from_config(&c).unwrap();
    assert_eq!(
        p.send(&apns_job()).await,
        Outcome::Failed {
            reason: "apns 403 InvalidProviderToken".into()
        }
    );
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn push_apns_fake_refuses_http1_and_missing_provider_token() {
    let fake = FakeApns::start().await;
    let url = format!("{}/3/device/{APNS_TOKEN}", fake.url());
    let r = reqwest::Client::new().post(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 505);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(&url)
        .header("apns-topic", crate::fakes::apple::TOPIC)
        .body(r#"{"aps":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["reason"], "MissingProviderToken");
}

#[tokio::test]
async fn push_apns_connection_refused_retries() {
    let fake = FakeApns::start().await;
    let dir = TempDir::new("apns");
    let mut c = fake.config(&dir.path);
    c.endpoint = Some(format!("http://127.0.0.1:{}", dead_port().await));
    let p = Apns::from_config(&c).unwrap();
    let o = p.send(&apns_job()).await;
    assert!(
        matches!(&o, Outcome::Retry { after: None, reason } if !reason.contains(APNS_TOKEN)),
        "{o:?}"
    );
}

#[tokio::test]
async fn push_apns_from_config_errors_name_the_missing_key() {
    let fake = FakeApns::start().await;
    let dir = TempDir::new("apns");
    let full = fake.config(&dir.path);
    let err = |c: &ApnsConfig| Apns::from_config(c).map(|_| ()).unwrap_err();
    type Edit = fn(&mut ApnsConfig);
    let cases: [(&str, Edit); 4] = [
        ("push.apns.key_file", |c| c.key_file = None),
        ("push.apns.key_id", |c| c.key_id = None),
        ("push.apns.team_id", |c| c.team_id = None),
        ("push.apns.topic", |c| c.topic = Some(" ".into())),
    ];
    for (key, f) in cases {
        let mut c = full.clone();
        f(&mut c);
        let e = err(&c);
        assert!(e.starts_with(key), "{key}: {e}");
    }
    let mut c = full.clone();
    c.key_file = Some(dir.join("AuthKey_NOPE.p8"));
    let e = err(&c);
    assert!(
        e.starts_with("push.apns.key_file") && e.contains("AuthKey_NOPE.p8"),
        "{e}"
    );
    // An RSA key is not a .p8 key.
    let rsa = dir.join("rsa.pem");
    std::fs::write(&rsa, crate::fakes::google::PRIVATE_KEY).unwrap();
    c.key_file = Some(rsa);
    let e = err(&c);
    assert!(
        e.starts_with("push.apns.key_file") && !e.contains("BEGIN"),
        "{e}"
    );
    let mut c = full.clone();
    c.endpoint = Some("api.push.apple.com".into());
    assert!(err(&c).starts_with("push.apns.endpoint"));
    let push = herald::config::PushConfig {
        apns: Some(full),
        ..Default::default()
    };
    let ps = herald::push::Providers::from_config(&push).unwrap();
    assert_eq!(ps.kinds(), vec![ProviderKind::Apns]);
}

#[test]
fn push_apns_valid_token_accepts_and_rejects_shapes() {
    assert!(apns::valid_token(APNS_TOKEN).is_ok());
    assert!(apns::valid_token(&APNS_TOKEN.to_uppercase()).is_ok());
    assert!(apns::valid_token(&"ab".repeat(100)).is_ok());
    for bad in [
        String::new(),
        "ab".repeat(31),
        "ab".repeat(101),
        format!("{APNS_TOKEN}a"),
        format!("{}zz", &APNS_TOKEN[2..]),
    ] {
        let e = apns::valid_token(&bad).unwrap_err();
        assert!(e.starts_with("token:"), "{bad}: {e}");
    }
}
