//! The FCM and APNs providers against fake Google and Apple servers (tests/integration/fakes):
//! what arrives, how tokens are fetched and reused, and how every kind of refusal maps to an
//! [`Outcome`].

use std::sync::Arc;
use std::time::Duration;

use herald::config::FcmConfig;
use herald::push::fcm::{self, Fcm};
use herald::push::{Outcome, Provider, ProviderKind, PushJob, PushReason};
use serde_json::json;

use crate::common::TempDir;
use crate::fakes::Failure;
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
    let mut push = herald::config::PushConfig::default();
    push.fcm = Some(fake.config(&dir.path));
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
