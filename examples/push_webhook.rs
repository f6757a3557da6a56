//! A push arriving when the user goes offline, end to end on one machine:
//!
//! ```text
//! cargo run --example push_webhook
//! ```
//!
//! It starts a webhook receiver (checking `X-Herald-Signature` as your service should) and a herald
//! node in this process (memory backend, port 0, the repository's `channels.toml`, and one rule:
//! `notice` events to `user:{to}` are pushed when the user is `offline`). Then, through the real
//! wire:
//!
//! 1. registers bob's device `phone` with the webhook provider (`PUT /api/v1/users/bob/devices/phone`);
//! 2. connects bob's phone over WebSocket and publishes a notice: delivered live, no push;
//! 3. closes bob's socket (bob is offline) and publishes another: the receiver gets the push, with the
//!    `room`/`seq` the app would sync from.
//!
//! It prints each step and exits non-zero if a push came while bob was online or none came after.
//! Against a standalone server the same provider is two settings:
//! `HERALD_PUSH_WEBHOOK_URL=https://your.service/push HERALD_PUSH_WEBHOOK_SECRET=…`.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use futures_util::StreamExt;
use herald::channels::ChannelKinds;
use herald::config::{Config, WebhookConfig};
use herald::push::webhook::{SIGNATURE_HEADER, signature};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "example-webhook-secret";
const API_KEY: &str = "example-api-key";
const RULE: &str = r#"
fn route(e) {
    if e.type == "notice" {
        return #{ push: #{ when: "offline", title: "Notice", body_template: "{data.text}" } };
    }
}
"#;

type Received = Arc<Mutex<Vec<Value>>>;

/// The receiver: a push is accepted only with a valid signature over the raw body.
async fn receiver(received: Received) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/push",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let received = received.clone();
            async move {
                let sig = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
                if sig != Some(signature(SECRET, &body).as_str()) {
                    return StatusCode::UNAUTHORIZED;
                }
                match serde_json::from_slice::<Value>(&body) {
                    Ok(job) => {
                        received.lock().unwrap().push(job);
                        StatusCode::NO_CONTENT
                    }
                    Err(_) => StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/push", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn wait_for_push(received: &Received, n: usize, within: Duration) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if received.lock().unwrap().len() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received.lock().unwrap().len() >= n
}

async fn run() -> anyhow::Result<bool> {
    herald::install_crypto_provider();
    let received: Received = Arc::default();
    let hook_url = receiver(received.clone()).await?;

    let rules = std::env::temp_dir().join(format!("herald-push-example-{}", std::process::id()));
    std::fs::create_dir_all(&rules)?;
    std::fs::write(rules.join("10-notice.rhai"), RULE)?;
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse()?;
    c.api_key = API_KEY.into();
    c.rules_dir = rules.clone();
    c.push.webhook = Some(WebhookConfig {
        url: Some(hook_url.clone()),
        secret: Some(SECRET.into()),
    });
    let channels = concat!(env!("CARGO_MANIFEST_DIR"), "/channels.toml");
    let kinds = ChannelKinds::load(std::path::Path::new(channels), true)?;
    let listener = tokio::net::TcpListener::bind(c.listen).await?;
    let server = herald::start(c, kinds, listener, std::future::pending()).await?;
    let base = format!("http://{}", server.addr);
    println!("herald on {base}, webhook receiver on {hook_url}");

    let http = reqwest::Client::new();
    let api = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}/api/v1{path}"))
            .bearer_auth(API_KEY)
    };
    let r = api(reqwest::Method::PUT, "/users/bob/devices/phone")
        .json(&json!({"provider": "webhook", "token": "bob-phone-token", "platform": "ios"}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "register: {}", r.text().await?);
    println!("1. registered bob's phone with the webhook provider");

    let token = server.auth.mint(&herald::transport::auth::Claims {
        sub: "bob".into(),
        exp: herald::transport::auth::unix_now() + 600,
        nbf: None,
        aud: None,
        iss: None,
        device: Some("phone".into()),
        platform: Some("ios".into()),
        attrs: Default::default(),
    })?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr)).await?;
    // The session is open once `connected` arrives (always the first frame).
    let first = ws.next().await.transpose()?;
    anyhow::ensure!(
        matches!(&first, Some(Message::Text(t)) if t.contains("\"connected\"")),
        "expected `connected`, got {first:?}"
    );
    let publish = |text: &str| {
        api(reqwest::Method::POST, "/events")
            .json(&json!({"event": "notice", "to": ["bob"], "data": {"text": text}}))
            .send()
    };
    let reply: Value = publish("you are online").await?.json().await?;
    let live = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["type"] == "event" && v["event"] == "notice" {
                    return Some(v);
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let pushed_online = wait_for_push(&received, 1, Duration::from_secs(1)).await;
    println!(
        "2. bob online: delivered live {} (push planned {}), pushes received: {}",
        live.is_some(),
        reply["push"]["planned"],
        received.lock().unwrap().len()
    );

    ws.close(None).await?;
    // Presence notices the close at once; give the node a moment to record it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply: Value = publish("you were away").await?.json().await?;
    let pushed = wait_for_push(&received, 1, Duration::from_secs(5)).await;
    println!(
        "3. bob offline: push planned {}, pushes received: {}",
        reply["push"]["planned"],
        received.lock().unwrap().len()
    );
    if let Some(job) = received.lock().unwrap().first() {
        println!("   the push: {}", serde_json::to_string_pretty(job)?);
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(&rules);
    Ok(live.is_some() && !pushed_online && pushed)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("push_webhook: the push did not behave as described above");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("push_webhook: {e:#}");
            ExitCode::FAILURE
        }
    }
}
