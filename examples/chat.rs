//! A terminal chat client over herald's WebSocket (`/ws`).
//!
//! It connects, subscribes to `room:{room}`, focuses the room (joins `active:{room}`, so typing notices
//! and read receipts reach it and unread is not counted while it is open), prints what arrives and
//! publishes what you type:
//!
//! - `chat.message` events print as `name: text` (replayed ones as `[replay] name: text`);
//! - `typing` notices print as `* bob is typing...`, read receipts as `* bob read up to #4`;
//! - room presence (`presence.update`) prints as `* bob joined r1` / `* bob left r1`;
//! - a `disconnect` frame prints its code and reason; when it says not to reconnect the client exits.
//!
//! Each line you type is published to the room as `chat.message` with data `{"text": line}`. Commands:
//! `/typing` (send a typing notice), `/read` (mark everything seen as read), `/quit`. End of input
//! (Ctrl-D, or the end of a pipe) waits for the replies to what was sent, then exits.
//!
//! The client keeps the room's last `{epoch, seq}`; when the connection drops it reconnects with
//! backoff (0.5 s doubling to 10 s) and subscribes with `since`, so the server replays what it missed.
//! It keeps one device id for the whole run (`--device`, else the token's `device` claim, else one
//! made at start) and sends it on every connection: a reconnect is the same device coming back, so
//! watchers do not see it go offline and a new one come online at each network blip.
//!
//! # Two people chat in a room
//!
//! Start the server with fixed credentials (any secret of 16+ characters):
//!
//! ```text
//! export HERALD_JWT_SECRET=dev-secret-change-me-0123456789
//! export HERALD_API_KEY=dev-api-key HERALD_ADMIN_KEY=dev-admin-key
//! cargo run --release
//! ```
//!
//! Rooms need membership, set by a backend through the API:
//!
//! ```text
//! curl -X PUT -H "Authorization: Bearer dev-api-key" http://127.0.0.1:7070/api/v1/rooms/r1/members/alice
//! curl -X PUT -H "Authorization: Bearer dev-api-key" http://127.0.0.1:7070/api/v1/rooms/r1/members/bob
//! ```
//!
//! Then one terminal each (the client mints its own token with the server's secret):
//!
//! ```text
//! cargo run --example chat -- --secret dev-secret-change-me-0123456789 --user alice --room r1
//! cargo run --example chat -- --secret dev-secret-change-me-0123456789 --user bob --room r1
//! ```
//!
//! Or with a token minted elsewhere (`HERALD_JWT_SECRET=… herald token --user alice`, or the server's
//! demo token for user `demo`):
//!
//! ```text
//! cargo run --example chat -- --url ws://127.0.0.1:7070 --token "$TOKEN" --room r1
//! ```

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A terminal chat client for a herald room.
#[derive(Parser)]
#[command(about = "A terminal chat client for a herald room (WebSocket)")]
struct Args {
    /// Server URL (`ws://` or `http://`); `/ws` is appended when the path does not end with it.
    #[arg(long, default_value = "ws://127.0.0.1:7070")]
    url: String,
    /// A client JWT (`herald token --user ID`, or the server's demo token).
    #[arg(long, conflicts_with = "secret")]
    token: Option<String>,
    /// Mint the token here with this HS256 secret (the server's HERALD_JWT_SECRET); needs --user.
    #[arg(long, requires = "user")]
    secret: Option<String>,
    /// The user id to mint a token for (with --secret).
    #[arg(long)]
    user: Option<String>,
    /// Device id, the same on every reconnect (default: the token's `device` claim, else one made
    /// at start for this run).
    #[arg(long)]
    device: Option<String>,
    /// The room (bare id, e.g. `r1`).
    #[arg(long, default_value = "r1")]
    room: String,
}

/// Where tokens come from: given once, or minted for every connection (so a reconnect after hours
/// does not present an expired token).
enum TokenSource {
    Fixed(String),
    Mint { secret: String, user: String },
}

impl TokenSource {
    fn token(&self, device: Option<&str>) -> anyhow::Result<String> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Mint { secret, user } => Ok(herald::transport::auth::mint_hs256(
                secret,
                user,
                device,
                24 * 3600,
            )?),
        }
    }
}

/// The room position the client has seen: the last `seq` such that every event up to it was received
/// (or is our own: the server does not echo a sender's messages, the publish reply carries their seq).
struct Position {
    epoch: String,
    seq: u64,
    own: BTreeSet<u64>,
}

impl Position {
    fn new(epoch: &str, seq: u64) -> Self {
        Position {
            epoch: epoch.to_string(),
            seq,
            own: BTreeSet::new(),
        }
    }

    /// An event from someone else arrived: everything before it was delivered already.
    fn received(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
        self.settle();
    }

    /// Our own publish got `seq`: it counts once every event before it was received.
    fn published(&mut self, seq: u64) {
        self.own.insert(seq);
        self.settle();
    }

    fn settle(&mut self) {
        while self.own.remove(&(self.seq + 1)) {
            self.seq += 1;
        }
        let last = self.seq;
        self.own.retain(|&s| s > last);
    }
}

/// How one connection ended.
enum End {
    /// The user is done (`/quit` or end of input).
    Quit,
    /// Reconnect after a backoff.
    Retry(String),
    /// Reconnecting cannot help.
    Fatal(String),
}

/// What survives reconnects.
struct Chat {
    room: String,
    room_channel: String,
    active_channel: String,
    /// `http://host:port`, for hints.
    http_base: String,
    me: String,
    position: Option<Position>,
    input_open: bool,
    next_ref: u64,
    /// Replies we still wait for (stdin-driven ops), by ref.
    pending: HashMap<String, String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    // herald's reqwest has TLS without a crypto provider of its own: pick ring, as herald does.
    herald::install_crypto_provider();
    let args = Args::parse();
    // tokio's stdin needs a feature this crate does not enable; a plain thread reading lines into a
    // small channel does the same (it blocks on a full channel, which is the backpressure we want).
    let (line_tx, lines) = mpsc::channel::<String>(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    match run(args, lines).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The WebSocket URL (`http(s)://` is accepted for `ws(s)://`; `/ws` appended when missing) and the
/// matching HTTP base (for hints that name API calls).
fn urls(base: &str) -> (String, String) {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/ws").unwrap_or(base);
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        base.to_string()
    };
    let http = ws
        .replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1);
    (format!("{ws}/ws"), http)
}

/// Runs the client on the typed `lines` until the user is done or reconnecting cannot help.
async fn run(args: Args, mut lines: mpsc::Receiver<String>) -> anyhow::Result<()> {
    let tokens = match (args.token, args.secret, args.user) {
        (Some(t), _, _) => TokenSource::Fixed(t),
        (None, Some(secret), Some(user)) => TokenSource::Mint { secret, user },
        _ => anyhow::bail!("give --token TOKEN, or --secret SECRET --user ID to mint one"),
    };
    let device = run_device(args.device, &tokens);
    // Fail early on a bad secret or user id rather than at the first connection.
    tokens.token(Some(&device))?;
    let (url, http_base) = urls(&args.url);
    let room_channel = format!("room:{}", args.room);
    let active_channel = format!("active:{}", args.room);
    let mut chat = Chat {
        room: args.room,
        room_channel,
        active_channel,
        http_base,
        me: String::new(),
        position: None,
        input_open: true,
        next_ref: 1,
        pending: HashMap::new(),
    };

    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let end = match connect(&url, &tokens, Some(&device)).await {
            Ok(ws) => session(ws, &mut chat, &mut lines).await,
            Err(end) => end,
        };
        match end {
            End::Quit => return Ok(()),
            End::Fatal(why) => anyhow::bail!("{why}"),
            End::Retry(why) => {
                // A connection that lived a while resets the backoff.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(500);
                }
                eprintln!("! {why}; reconnecting in {:.1}s", backoff.as_secs_f64());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The device id of this run: `--device`, else the `device` claim of a given token, else a new one.
/// Every connection of the run sends it, so the server sees one device reconnecting.
fn run_device(given: Option<String>, tokens: &TokenSource) -> String {
    given
        .or_else(|| match tokens {
            TokenSource::Fixed(t) => token_device(t),
            TokenSource::Mint { .. } => None,
        })
        .unwrap_or_else(|| format!("chat-{}", uuid::Uuid::now_v7().simple()))
}

/// The `device` claim of a JWT, read without checking it (the server checks the token).
fn token_device(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["device"].as_str().map(str::to_string)
}

/// Opens the WebSocket and sends the `connect` frame.
async fn connect(url: &str, tokens: &TokenSource, device: Option<&str>) -> Result<Ws, End> {
    let token = tokens
        .token(device)
        .map_err(|e| End::Fatal(format!("cannot mint a token: {e:#}")))?;
    let (mut ws, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(x) => x,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let why = format!("{url}: HTTP {} {}", resp.status(), body.trim());
            return Err(if resp.status().is_client_error() {
                End::Fatal(why)
            } else {
                End::Retry(why)
            });
        }
        Err(tungstenite::Error::Url(e)) => return Err(End::Fatal(format!("bad URL {url}: {e}"))),
        Err(e) => return Err(End::Retry(format!("cannot connect to {url}: {e}"))),
    };
    let mut frame = json!({ "op": "connect", "ref": "connect", "token": token });
    if let Some(d) = device {
        frame["device"] = json!(d);
    }
    send(&mut ws, &frame).await.map_err(End::Retry)?;
    Ok(ws)
}

async fn send(ws: &mut Ws, frame: &Value) -> Result<(), String> {
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

/// One connection: until it drops, the server closes it, or the user is done.
async fn session(mut ws: Ws, chat: &mut Chat, lines: &mut mpsc::Receiver<String>) -> End {
    // Ops sent before a drop never got their reply; they are not waited for again.
    chat.pending.clear();
    let mut ready = false;
    // An application-level ping every 20 s; a connection silent for 60 s is treated as dead.
    let mut ping = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(20),
        Duration::from_secs(20),
    );
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = ws.next() => {
                last_heard = Instant::now();
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame.map(|f| format!("closed by the server ({} {})", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "closed by the server".into());
                        return End::Retry(why);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return End::Retry(format!("connection lost: {e}")),
                    None => return End::Retry("connection closed".into()),
                };
                let frame: Value = match serde_json::from_str(&text) {
                    Ok(v) => v,
                    Err(_) => {
                        eprintln!("! unparseable frame: {text}");
                        continue;
                    }
                };
                match on_frame(&mut ws, chat, &frame, &mut ready).await {
                    Ok(None) => {}
                    Ok(Some(end)) => return end,
                    Err(why) => return End::Retry(why),
                }
                if !chat.input_open && chat.pending.is_empty() && ready {
                    let _ = ws.close(None).await;
                    return End::Quit;
                }
            }
            line = lines.recv(), if ready && chat.input_open => {
                let Some(line) = line else {
                    chat.input_open = false;
                    if chat.pending.is_empty() {
                        let _ = ws.close(None).await;
                        return End::Quit;
                    }
                    continue;
                };
                match on_line(&mut ws, chat, line.trim()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let _ = ws.close(None).await;
                        return End::Quit;
                    }
                    Err(why) => return End::Retry(why),
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > Duration::from_secs(60) {
                    return End::Retry("no answer from the server for 60 s".into());
                }
                if let Err(why) = send(&mut ws, &json!({ "op": "ping" })).await {
                    return End::Retry(why);
                }
            }
        }
    }
}

/// A line typed by the user. `Ok(false)` = quit.
async fn on_line(ws: &mut Ws, chat: &mut Chat, line: &str) -> Result<bool, String> {
    let reference = format!("r{}", chat.next_ref);
    chat.next_ref += 1;
    let frame = match line {
        "" => return Ok(true),
        "/quit" | "/exit" => return Ok(false),
        "/help" => {
            println!("commands: /typing, /read, /quit; anything else is sent to the room");
            return Ok(true);
        }
        "/typing" => json!({ "op": "typing", "ref": reference, "room": chat.room }),
        "/read" => {
            let seq = chat.position.as_ref().map_or(0, |p| p.seq);
            json!({ "op": "read", "ref": reference, "room": chat.room, "seq": seq })
        }
        l if l.starts_with('/') => {
            println!("unknown command {l}; try /help");
            return Ok(true);
        }
        text => json!({
            "op": "publish", "ref": reference, "channel": chat.room_channel,
            "event": "chat.message", "data": { "text": text },
        }),
    };
    let op = frame["op"].as_str().unwrap_or("").to_string();
    send(ws, &frame).await?;
    chat.pending.insert(reference, op);
    Ok(true)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A frame from the server; `Ok(Some(end))` ends the connection.
async fn on_frame(
    ws: &mut Ws,
    chat: &mut Chat,
    f: &Value,
    ready: &mut bool,
) -> Result<Option<End>, String> {
    match str_of(f, "type") {
        "connected" => {
            chat.me = str_of(f, "user").to_string();
            println!(
                "connected as {} (device {}, node {})",
                chat.me,
                str_of(f, "device"),
                str_of(f, "node")
            );
            let sync = &f["sync"];
            if let Some(unread) = sync["unread"].as_object() {
                for (room, n) in unread.iter().filter(|(_, n)| n.as_u64().unwrap_or(0) > 0) {
                    println!("  {n} unread in {room}");
                }
            }
            for a in sync["announcements"].as_array().into_iter().flatten() {
                print_announcement(&a["data"]);
            }
            // Subscribe with `since` when we were here before: the server replays what we missed.
            let mut sub =
                json!({ "op": "subscribe", "ref": "subscribe", "channel": chat.room_channel });
            if let Some(p) = &chat.position {
                sub["since"] = json!({ "epoch": p.epoch, "seq": p.seq });
            }
            send(ws, &sub).await?;
        }
        "reply" => return on_reply(ws, chat, f, ready).await,
        "event" => on_event(chat, f),
        "presence.update" => {
            let who = str_of(f, "user");
            if who == chat.me {
                return Ok(None);
            }
            match str_of(f, "change") {
                "joined" => println!("* {who} joined {}", str_of(f, "room")),
                "left" => println!("* {who} left {}", str_of(f, "room")),
                other => println!("* {who} is {other} in {}", str_of(f, "room")),
            }
        }
        "presence.changed" => {
            let state = if f["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            };
            println!("* {} is {state}", str_of(f, "user"));
        }
        "reset" => {
            if str_of(f, "channel") == chat.room_channel {
                println!(
                    "! the room's history was reset (epoch changed); earlier messages may be missing"
                );
                chat.position = Some(Position::new(str_of(f, "epoch"), 0));
            }
        }
        "disconnect" => {
            let code = f["code"].as_u64().unwrap_or(0);
            let reason = str_of(f, "reason");
            println!("! the server closed the connection: {reason} (code {code})");
            let reconnect = f["reconnect"].as_bool().unwrap_or(false);
            return Ok(Some(if reconnect {
                End::Retry(format!("server said: {reason}"))
            } else {
                End::Fatal(format!(
                    "not reconnecting: code {code} ({reason}) says not to"
                ))
            }));
        }
        "pong" => {}
        other => println!("? {other}: {f}"),
    }
    Ok(None)
}

async fn on_reply(
    ws: &mut Ws,
    chat: &mut Chat,
    f: &Value,
    ready: &mut bool,
) -> Result<Option<End>, String> {
    let reference = f["ref"].as_str().unwrap_or("").to_string();
    let ok = f["ok"].as_bool() == Some(true);
    if !ok {
        let code = str_of(&f["error"], "code");
        let message = str_of(&f["error"], "message");
        if reference == "subscribe" || reference == "focus" {
            let hint = if code == "not_member" {
                format!(
                    "\n  add the member first: curl -X PUT -H 'Authorization: Bearer API_KEY' \
                     {}/api/v1/rooms/{}/members/{}",
                    chat.http_base, chat.room, chat.me
                )
            } else {
                String::new()
            };
            return Ok(Some(End::Fatal(format!(
                "cannot join {}: {code}: {message}{hint}",
                chat.room_channel
            ))));
        }
        let op = chat.pending.remove(&reference).unwrap_or_default();
        println!("! {op} failed: {code}: {message}");
        return Ok(None);
    }
    match reference.as_str() {
        "subscribe" => {
            let epoch = str_of(f, "epoch");
            let seq = f["seq"].as_u64().unwrap_or(0);
            let recovered = f["recovered"].as_bool().unwrap_or(true);
            match &mut chat.position {
                // Resumed: the replayed events follow this reply and advance the position.
                Some(p) if p.epoch == epoch && recovered => {
                    let missed = seq.saturating_sub(p.seq);
                    println!(
                        "rejoined {} (missed {missed}; replaying)",
                        chat.room_channel
                    );
                }
                Some(_) => {
                    println!(
                        "rejoined {}: the missed messages could not be replayed (history reset or trimmed)",
                        chat.room_channel
                    );
                    chat.position = Some(Position::new(epoch, seq));
                }
                None => {
                    println!(
                        "joined {} (last message #{seq}); type to chat, /help for commands",
                        chat.room_channel
                    );
                    chat.position = Some(Position::new(epoch, seq));
                }
            }
            send(
                ws,
                &json!({ "op": "focus", "ref": "focus", "room": chat.room }),
            )
            .await?;
            *ready = true;
        }
        "focus" | "connect" => {}
        _ => match chat.pending.remove(&reference).as_deref() {
            Some("publish") => {
                let seq = f["deliveries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| str_of(d, "channel") == chat.room_channel)
                    .and_then(|d| d["seq"].as_u64());
                if let (Some(seq), Some(p)) = (seq, chat.position.as_mut()) {
                    p.published(seq);
                    println!("  (sent #{seq})");
                }
            }
            Some("read") => println!(
                "  (read up to #{}; {} unread)",
                f["seq"].as_u64().unwrap_or(0),
                f["unread"].as_u64().unwrap_or(0)
            ),
            _ => {}
        },
    }
    Ok(None)
}

fn on_event(chat: &mut Chat, f: &Value) {
    let channel = str_of(f, "channel");
    let event = str_of(f, "event");
    let from = f.get("from").and_then(Value::as_str).unwrap_or("(system)");
    let data = &f["data"];
    if channel == chat.room_channel
        && let (Some(seq), Some(p)) = (f["seq"].as_u64(), chat.position.as_mut())
        && str_of(f, "epoch") == p.epoch
    {
        p.received(seq);
    }
    let replay = if f["replay"].as_bool() == Some(true) {
        "[replay] "
    } else {
        ""
    };
    match event {
        "chat.message" => {
            let text = data.get("text").and_then(Value::as_str).unwrap_or("");
            println!("{replay}{from}: {text}");
        }
        "typing" if channel == chat.active_channel => println!("* {from} is typing..."),
        "read" if channel == chat.active_channel => {
            println!("* {from} read up to #{}", data["seq"].as_u64().unwrap_or(0));
        }
        // Our other devices marked something read.
        "read" => {}
        "member.left" => println!("{replay}* {} left the room", str_of(data, "user")),
        "room.left" => println!("* you left {}", str_of(data, "room")),
        "announcement" => print_announcement(data),
        _ => println!("{replay}[{channel}] {event} from {from}: {data}"),
    }
}

fn print_announcement(a: &Value) {
    println!(
        "[announcement] {}: {}",
        str_of(a, "title"),
        str_of(a, "body")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_publishes_count_once_everything_before_them_arrived() {
        let mut p = Position::new("e", 3);
        // Our publish got #5 before #4 (someone else's) was delivered: not yet contiguous.
        p.published(5);
        assert_eq!(p.seq, 3);
        p.received(4);
        assert_eq!(p.seq, 5);
        p.published(6);
        assert_eq!(p.seq, 6);
        p.received(8);
        assert_eq!(p.seq, 8);
        assert!(p.own.is_empty());
    }

    /// One device for the run: a reconnect is the same device (the server says so in `connected`),
    /// whether the id came from `--device`, the token, or was made at start.
    #[tokio::test]
    async fn every_connection_of_a_run_is_the_same_device() {
        let secret = "chat-test-secret-0123456789";
        let mut config = herald::Config::defaults();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.jwt.secret = Some(secret.into());
        config.rules_dir = "/nonexistent/chat-test-rules".into();
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let server = herald::start(
            config,
            herald::ChannelKinds::default(),
            listener,
            std::future::pending(),
        )
        .await
        .unwrap();
        let (url, _) = urls(&format!("ws://{}", server.addr));
        let with_claim =
            herald::transport::auth::mint_hs256(secret, "ann", Some("ann-phone"), 600).unwrap();
        let cases = [
            (
                Some("laptop".to_string()),
                TokenSource::Fixed(with_claim.clone()),
                Some("laptop"),
            ),
            (None, TokenSource::Fixed(with_claim), Some("ann-phone")),
            (
                None,
                TokenSource::Mint {
                    secret: secret.into(),
                    user: "ann".into(),
                },
                None,
            ),
        ];
        for (given, tokens, want) in cases {
            let device = run_device(given, &tokens);
            if let Some(w) = want {
                assert_eq!(device, w);
            }
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut ws = connect(&url, &tokens, Some(&device)).await.ok().unwrap();
                let connected = loop {
                    let Some(Ok(Message::Text(t))) = ws.next().await else {
                        panic!("no connected frame")
                    };
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "connected" {
                        break v;
                    }
                };
                seen.push(connected["device"].as_str().unwrap().to_string());
                let _ = ws.close(None).await;
            }
            assert_eq!(
                seen,
                vec![device.clone(), device],
                "a reconnect is the same device"
            );
        }
        server.stop().await.unwrap();
    }

    const SECRET: &str = "chat-test-secret-0123456789";
    const API_KEY: &str = "chat-test-api-key";

    /// A TCP relay to `upstream` that can cut its first connection (a network blip) and holds later
    /// ones until told to go on, so the test sees the old session end before the new one opens.
    async fn blip_proxy(
        upstream: std::net::SocketAddr,
    ) -> (String, tokio::sync::watch::Sender<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        // 0: the first connection is relayed; 1: it is cut; 2: later connections are relayed.
        let (phase_tx, phase) = tokio::sync::watch::channel(0u8);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut client, _)) = listener.accept().await {
                let mut phase = phase.clone();
                let is_first = std::mem::replace(&mut first, false);
                tokio::spawn(async move {
                    if !is_first && phase.wait_for(|p| *p >= 2).await.is_err() {
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = phase.wait_for(|p| is_first && *p >= 1) => {}
                    }
                });
            }
        });
        (url, phase_tx)
    }

    /// `GET /api/v1/presence/{user}`, polled until `pred` holds (bounded); that body.
    async fn presence_until(base: &str, user: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v: Value = http
                .get(format!("{base}/api/v1/presence/{user}"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "presence never matched: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_reconnect_comes_back_as_the_same_device() {
        let mut c = herald::config::Config::defaults();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.jwt.secret = Some(SECRET.into());
        c.jwt.generated_secret = false;
        c.api_key = API_KEY.into();
        c.generated_keys = false;
        c.rules_dir = "/nonexistent/herald-chat-test-rules".into();
        let listener = tokio::net::TcpListener::bind(c.listen).await.unwrap();
        let server = herald::start(
            c,
            herald::ChannelKinds::default(),
            listener,
            std::future::pending(),
        )
        .await
        .unwrap();
        let base = format!("http://{}", server.addr);
        let put = reqwest::Client::new()
            .put(format!("{base}/api/v1/rooms/r1/members/alice"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);

        let (url, phase) = blip_proxy(server.addr).await;
        let args = Args::parse_from([
            "chat", "--url", &url, "--secret", SECRET, "--user", "alice", "--room", "r1",
        ]);
        let (_typing, lines) = mpsc::channel(1);
        let client = tokio::spawn(run(args, lines));
        let online = |v: &Value| {
            v["online"] == true && v["devices"].as_array().is_some_and(|d| d.len() == 1)
        };
        let before = presence_until(&base, "alice", online).await;

        phase.send(1).unwrap();
        presence_until(&base, "alice", |v| v["online"] == false).await;
        phase.send(2).unwrap();
        let after = presence_until(&base, "alice", online).await;
        let device = |v: &Value| v["devices"][0]["device"].as_str().unwrap().to_string();
        assert_eq!(
            device(&after),
            device(&before),
            "before {before}, after {after}"
        );
        assert!(device(&before).starts_with("chat-"), "{before}");

        client.abort();
        server.stop().await.unwrap();
    }

    #[test]
    fn urls_accept_ws_and_http_forms() {
        let want = (
            "ws://127.0.0.1:7070/ws".to_string(),
            "http://127.0.0.1:7070".to_string(),
        );
        assert_eq!(urls("ws://127.0.0.1:7070"), want);
        assert_eq!(urls("ws://127.0.0.1:7070/ws/"), want);
        assert_eq!(urls("http://127.0.0.1:7070/"), want);
        assert_eq!(urls("https://h.example/ws").0, "wss://h.example/ws");
    }
}
