//! A webhook receiver as an app backend would run one: it checks `X-Herald-Signature` against the
//! shared secret (401 otherwise), needs `X-Herald-Job`, and records the jobs it accepted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald::config::WebhookConfig;
use herald::push::webhook::{JOB_HEADER, SIGNATURE_HEADER, signature};
use serde_json::Value;

use super::Failure;

#[derive(Default)]
struct Shared {
    received: Vec<Value>,
    failures: VecDeque<Failure>,
    rejected: usize,
    stall: usize,
    stalled: usize,
}

/// The receiver.
#[derive(Clone)]
pub struct FakeWebhook {
    url: String,
    secret: String,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Clone)]
struct App {
    secret: String,
    shared: Arc<Mutex<Shared>>,
}

impl FakeWebhook {
    /// A receiver with secret `whsec-test`.
    pub async fn start() -> FakeWebhook {
        FakeWebhook::start_with_secret("whsec-test").await
    }

    /// A receiver checking signatures with `secret`.
    pub async fn start_with_secret(secret: &str) -> FakeWebhook {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let app = App {
            secret: secret.into(),
            shared: shared.clone(),
        };
        let router = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(app);
        let addr = super::spawn(router).await;
        FakeWebhook {
            url: format!("http://{addr}/hook"),
            secret: secret.into(),
            shared,
        }
    }

    /// `[push.webhook]` pointing here.
    pub fn config(&self) -> WebhookConfig {
        WebhookConfig {
            url: Some(self.url.clone()),
            secret: Some(self.secret.clone()),
        }
    }

    /// The jobs accepted so far.
    pub fn received(&self) -> Vec<Value> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Requests refused for a bad signature.
    pub fn rejected(&self) -> usize {
        self.shared.lock().unwrap().rejected
    }

    /// Waits until `n` jobs arrived (or `timeout`), returning what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        super::wait_for(n, timeout, || self.received()).await
    }

    /// The next request is held without an answer (as a receiver that hangs), for a minute.
    pub fn stall_next(&self) {
        self.shared.lock().unwrap().stall += 1;
    }

    /// Requests held by [`FakeWebhook::stall_next`] so far.
    pub fn stalled(&self) -> usize {
        self.shared.lock().unwrap().stalled
    }

    /// The next request gets `f` instead of being accepted (queued: call twice for two).
    pub fn fail_next(&self, f: Failure) {
        self.shared.lock().unwrap().failures.push_back(f);
    }
}

async fn receive(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if sig != signature(&app.secret, &body) || !headers.contains_key(JOB_HEADER) {
        app.shared.lock().unwrap().rejected += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let stall = {
        let mut s = app.shared.lock().unwrap();
        let stall = s.stall > 0;
        if stall {
            s.stall -= 1;
            s.stalled += 1;
        }
        stall
    };
    if stall {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return (StatusCode::SERVICE_UNAVAILABLE, "stalled").into_response();
    }
    let mut s = app.shared.lock().unwrap();
    if let Some(f) = s.failures.pop_front() {
        let mut r = (StatusCode::from_u16(f.status).unwrap(), "failing").into_response();
        if let Some(secs) = f.retry_after {
            r.headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
        }
        return r;
    }
    let Ok(job) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let header_id = headers.get(JOB_HEADER).and_then(|v| v.to_str().ok());
    if header_id != job["id"].as_str() {
        return (StatusCode::BAD_REQUEST, "job header differs from body").into_response();
    }
    s.received.push(job);
    StatusCode::NO_CONTENT.into_response()
}
