//! A backend publishing events over herald's HTTP API (`POST /api/v1/events`, API key).
//!
//! ```text
//! cargo run --example publish -- --url http://127.0.0.1:7070 --api-key dev-api-key \
//!     --room r1 --event chat.message --data '{"text":"hi"}' --from bob
//! ```
//!
//! prints one line per publish with the event id and where it was stored:
//!
//! ```text
//! #1 id 0198…  room:r1 seq 5 (epoch 7f3a…)  push planned 0
//! ```
//!
//! Targets: `--room r1` (the room's channel), `--channel user:alice` (any channel name), and `--to alice`
//! (repeatable: each user's `user:` channel); at least one. `--from` names the sending user (their own
//! sessions do not get the event live, and it never counts as unread for them).
//!
//! `--count N` publishes N times. With `--idempotency-key K` (sent as the `Idempotency-Key` header)
//! every repeat carries the same key, so herald stores the event once and answers each repeat with the
//! first reply: the same id and seq every time.
//!
//! The API key is the server's `HERALD_API_KEY` (printed at start when generated); `--api-key` also
//! reads `HERALD_API_KEY` from the environment.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};

/// Publishes events to herald over its HTTP API and prints the replies.
#[derive(Parser)]
#[command(about = "Publish events to herald over its HTTP API")]
struct Args {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    url: String,
    /// The backend API key.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Publish to this room (bare id, e.g. `r1`).
    #[arg(long)]
    room: Option<String>,
    /// Publish to this channel (e.g. `user:alice`, `global`).
    #[arg(long)]
    channel: Option<String>,
    /// Publish to these users' `user:` channels (repeatable).
    #[arg(long)]
    to: Vec<String>,
    /// Event type.
    #[arg(long, default_value = "chat.message")]
    event: String,
    /// Event data (JSON).
    #[arg(long, default_value = "{}")]
    data: String,
    /// The sending user.
    #[arg(long)]
    from: Option<String>,
    /// Idempotency key (the `Idempotency-Key` header).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// How many times to publish.
    #[arg(long, default_value_t = 1)]
    count: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    // herald's reqwest has TLS without a crypto provider of its own: pick ring, as herald does.
    herald::install_crypto_provider();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("publish: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.room.is_none() && args.channel.is_none() && args.to.is_empty() {
        anyhow::bail!("give a target: --room ROOM, --channel CHANNEL or --to USER");
    }
    let data: Value = serde_json::from_str(&args.data)
        .map_err(|e| anyhow::anyhow!("--data is not valid JSON ({e}): {}", args.data))?;
    let mut body = json!({ "event": args.event, "data": data });
    if let Some(r) = &args.room {
        body["room"] = json!(r);
    }
    if let Some(c) = &args.channel {
        body["channel"] = json!(c);
    }
    if !args.to.is_empty() {
        body["to"] = json!(args.to);
    }
    if let Some(f) = &args.from {
        body["from"] = json!(f);
    }
    let url = format!("{}/api/v1/events", args.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()?;
    for n in 1..=args.count {
        let mut req = client.post(&url).bearer_auth(&args.api_key).json(&body);
        if let Some(k) = &args.idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", causes(&e.without_url())))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            anyhow::anyhow!("reading the reply from {url}: {}", causes(&e.without_url()))
        })?;
        let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let code = reply["error"]["code"].as_str().unwrap_or("?");
            let message = reply["error"]["message"].as_str().unwrap_or(text.trim());
            anyhow::bail!("#{n}: HTTP {status}: {code}: {message}");
        }
        println!("#{n} {}", describe(&reply));
    }
    Ok(())
}

/// An error and its causes, on one line (reqwest's own message says little: "error sending request").
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `id 0198…  room:r1 seq 5 (epoch …)  push planned 0`.
fn describe(reply: &Value) -> String {
    let mut line = format!("id {}", reply["id"].as_str().unwrap_or("?"));
    for d in reply["deliveries"].as_array().into_iter().flatten() {
        let channel = d["channel"].as_str().unwrap_or("?");
        match (d["seq"].as_u64(), d["epoch"].as_str()) {
            (Some(seq), Some(epoch)) => {
                line.push_str(&format!("  {channel} seq {seq} (epoch {epoch})"))
            }
            _ => line.push_str(&format!("  {channel} (not stored)")),
        }
    }
    if let Some(p) = reply["push"]["planned"].as_u64() {
        line.push_str(&format!("  push planned {p}"));
    }
    line
}
