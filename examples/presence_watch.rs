//! Watches the presence of a user's contacts over SSE (`GET /api/presence/stream?token=…`).
//!
//! herald sends `connected` (who is watching), `initial` (each contact's presence), then a
//! `status_change` whenever a contact comes online, goes offline, changes status or switches device
//! state, and a `heartbeat` every 30 s. This prints each in one readable line. The stream itself is a
//! session: the watcher shows as online to those who watch it.
//!
//! Contacts are set by a backend through the API, before the stream opens (the stream watches the
//! contacts it finds when it starts):
//!
//! ```text
//! export HERALD_JWT_SECRET=dev-secret-change-me-0123456789
//! export HERALD_API_KEY=dev-api-key HERALD_ADMIN_KEY=dev-admin-key
//! cargo run --release &
//! curl -X PUT -H "Authorization: Bearer dev-api-key" -H "Content-Type: application/json" \
//!      -d '{"contacts":["bob"]}' http://127.0.0.1:7070/api/v1/users/alice/contacts
//! cargo run --example presence_watch -- --secret dev-secret-change-me-0123456789 --user alice
//! ```
//!
//! Then connect as bob (e.g. `cargo run --example chat -- --secret … --user bob`) and watch
//! `bob is online` appear; quit bob and `bob is offline` follows. With a token minted elsewhere:
//! `cargo run --example presence_watch -- --url http://127.0.0.1:7070 --token "$TOKEN"`.
//!
//! The watcher reconnects with backoff when the stream drops, and exits on a refused token.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;

/// Prints the presence of a user's contacts, live, from herald's SSE presence stream.
#[derive(Parser)]
#[command(about = "Watch contacts' presence over herald's SSE presence stream")]
struct Args {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    url: String,
    /// A client JWT (`herald token --user ID`).
    #[arg(long, conflicts_with = "secret")]
    token: Option<String>,
    /// Mint the token here with this HS256 secret (the server's HERALD_JWT_SECRET); needs --user.
    #[arg(long, requires = "user")]
    secret: Option<String>,
    /// The user id to mint a token for (with --secret).
    #[arg(long)]
    user: Option<String>,
}

/// Why a stream ended.
enum End {
    Retry(String),
    Fatal(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    // herald's reqwest has TLS without a crypto provider of its own: pick ring, as herald does.
    herald::install_crypto_provider();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence_watch: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mint = match (&args.token, &args.secret, &args.user) {
        (Some(_), _, _) => None,
        (None, Some(secret), Some(user)) => Some((secret.clone(), user.clone())),
        _ => anyhow::bail!("give --token TOKEN, or --secret SECRET --user ID to mint one"),
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("{}/api/presence/stream", args.url.trim_end_matches('/'));
    let mut backoff = Duration::from_millis(500);
    loop {
        let token = match (&args.token, &mint) {
            (Some(t), _) => t.clone(),
            (None, Some((secret, user))) => {
                herald::transport::auth::mint_hs256(secret, user, None, 24 * 3600)?
            }
            (None, None) => unreachable!("checked above"),
        };
        match stream(&client, &url, &token, &mut backoff).await {
            End::Fatal(why) => anyhow::bail!("{why}"),
            End::Retry(why) => {
                eprintln!("! {why}; reconnecting in {:.1}s", backoff.as_secs_f64());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn stream(client: &reqwest::Client, url: &str, token: &str, backoff: &mut Duration) -> End {
    // A JWT is URL-safe (base64url parts joined by dots), so it goes into the query as it is.
    let resp = match client.get(format!("{url}?token={token}")).send().await {
        Ok(r) => r,
        // The error would name the URL, token included: drop it.
        Err(e) => return End::Retry(format!("cannot reach {url}: {}", causes(&e.without_url()))),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        let why = format!("{url}: HTTP {status}: {message}");
        return if status.is_client_error() && status.as_u16() != 429 {
            End::Fatal(why)
        } else {
            End::Retry(why)
        };
    }
    *backoff = Duration::from_millis(500);
    let mut events = resp.bytes_stream().eventsource();
    while let Some(item) = events.next().await {
        let ev = match item {
            Ok(ev) => ev,
            Err(e) => return End::Retry(format!("stream broken: {}", causes(&e))),
        };
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_str() {
            "connected" => println!(
                "connected as {} (session {}, watching {} contacts)",
                str_of(&data, "user"),
                str_of(&data, "conn"),
                data["contacts"].as_u64().unwrap_or(0)
            ),
            "initial" => {
                let Some(map) = data.as_object() else {
                    continue;
                };
                if map.is_empty() {
                    println!(
                        "no contacts yet (PUT /api/v1/users/{{user}}/contacts, then reconnect)"
                    );
                }
                for p in map.values() {
                    println!("  {}", describe(p));
                }
            }
            "status_change" => println!("{}  {}", clock(now_ms()), describe(&data)),
            "heartbeat" => println!(
                "{}  (heartbeat)",
                clock(data["ts"].as_i64().unwrap_or_else(now_ms))
            ),
            "disconnect" => {
                let reason = str_of(&data, "reason");
                let code = data["code"].as_u64().unwrap_or(0);
                println!("! the server closed the stream: {reason} (code {code})");
                if data["reconnect"].as_bool() != Some(true) {
                    return End::Fatal(format!(
                        "not reconnecting: code {code} ({reason}) says not to"
                    ));
                }
            }
            other => println!("? {other}: {}", ev.data),
        }
    }
    End::Retry("stream ended".into())
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

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// One user's presence object as a line: `bob is online (busy: "in a call") on web, ios`.
fn describe(p: &Value) -> String {
    let user = str_of(p, "user");
    if p["online"].as_bool() != Some(true) {
        return match p["last_seen"].as_i64() {
            Some(ms) => format!("{user} is offline (last seen {} UTC)", clock(ms)),
            None => format!("{user} is offline (never seen)"),
        };
    }
    let mut line = format!("{user} is online");
    let status = str_of(p, "status");
    if !status.is_empty() && status != "online" {
        line.push_str(&format!(" ({status}"));
        if let Some(t) = p["text"].as_str() {
            line.push_str(&format!(": {t:?}"));
        }
        line.push(')');
    } else if let Some(t) = p["text"].as_str() {
        line.push_str(&format!(" ({t:?})"));
    }
    let devices: Vec<String> = p["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let name = d["platform"].as_str().unwrap_or(str_of(d, "device"));
            match d["state"].as_str() {
                Some("background") => format!("{name} (background)"),
                _ => name.to_string(),
            }
        })
        .collect();
    if !devices.is_empty() {
        line.push_str(&format!(" on {}", devices.join(", ")));
    }
    line
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `HH:MM:SS` (UTC) of a unix-ms time.
fn clock(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presence_lines_read_well() {
        assert_eq!(clock(1_700_000_000_123), "22:13:20");
        let online = json!({"user": "bob", "online": true, "status": "busy", "text": "in a call",
            "devices": [{"device": "d1", "platform": "ios", "state": "background"}, {"device": "d2"}]});
        assert_eq!(
            describe(&online),
            "bob is online (busy: \"in a call\") on ios (background), d2"
        );
        let never = json!({"user": "carol", "online": false, "last_seen": null});
        assert_eq!(describe(&never), "carol is offline (never seen)");
    }
}
