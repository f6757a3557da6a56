//! The test harness: start an engine on port 0, mint tokens, and talk to it over HTTP, WebSocket and
//! SSE with real clients. Every wait is bounded (`WAIT`), so a broken engine fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use herald::config::Config;
use herald::transport::auth::{Claims, unix_now};
use herald::{ChannelKinds, Server};
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(5);

pub const API_KEY: &str = "test-api-key-0123456789";
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const SECRET: &str = "test-jwt-secret-0123456789";

/// A running engine and an HTTP client for it.
pub struct TestServer {
    pub server: Server,
    pub http: reqwest::Client,
    /// The private redis-server of this engine when the suite runs on Redis (`HERALD_TEST_REDIS=1`).
    pub redis: Option<crate::redis_server::RedisServer>,
}

/// True when the suite runs every engine on its own Redis instead of the memory backend
/// (`HERALD_TEST_REDIS=1`; `scripts/test` runs the suite both ways).
pub fn on_redis() -> bool {
    std::env::var("HERALD_TEST_REDIS").is_ok_and(|v| v == "1")
}

/// A reqwest client for tests (herald's reqwest has TLS without a crypto provider: ring is installed
/// first, as herald does).
pub fn http_client() -> reqwest::Client {
    herald::install_crypto_provider();
    reqwest::Client::new()
}

/// The config tests start from: fixed keys, port 0, short presence timings where asked.
pub fn test_config() -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.api_key = API_KEY.into();
    c.admin_key = ADMIN_KEY.into();
    c.jwt.secret = Some(SECRET.into());
    c.jwt.generated_secret = false;
    c.generated_keys = false;
    c.shutdown_grace = Duration::from_secs(3);
    // Channel defaults only, unless a test brings rules (the shipped ones are tested on their own).
    c.rules_dir = "/nonexistent/herald-test-rules".into();
    c
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let mut c = test_config();
        f(&mut c);
        Self::start_config(c, ChannelKinds::default()).await
    }

    pub async fn start_config(mut c: Config, kinds: ChannelKinds) -> TestServer {
        let redis = (on_redis() && c.redis.is_none()).then(crate::redis_server::RedisServer::start);
        if let Some(r) = &redis {
            c.redis = Some(r.url.clone());
        }
        let listener = herald::transport::conn::listen(c.listen).unwrap();
        let server = herald::start(c, kinds, listener, std::future::pending())
            .await
            .unwrap();
        TestServer {
            server,
            http: crate::common::http_client(),
            redis,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.server.addr)
    }

    /// A valid token for `user` (1 h).
    pub fn token(&self, user: &str) -> String {
        self.token_with(claims(user))
    }

    pub fn token_with(&self, c: Claims) -> String {
        self.server.auth.mint(&c).unwrap()
    }

    /// A backend API call with the API key: (status, JSON body).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, body, Some(API_KEY)).await
    }

    /// Any HTTP call, with an optional bearer: (status, JSON body or Null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        bearer: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            self.url(path),
        );
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("HTTP timed out")
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// This engine's `/metrics` text (asserting 200).
    pub async fn metrics_text(&self) -> String {
        metrics_at(&self.url("/metrics")).await
    }

    /// Adds `user` to `room`.
    pub async fn join(&self, room: &str, user: &str) {
        let (s, _) = self
            .api("PUT", &format!("/api/v1/rooms/{room}/members/{user}"), None)
            .await;
        assert_eq!(s, 200);
    }

    /// Publishes through the API; the reply.
    pub async fn publish(&self, body: Value) -> Value {
        let (s, v) = self.try_publish(body).await;
        assert_eq!(s, 200, "publish failed: {v}");
        v
    }

    /// Publishes through the API: (status, reply or error), whatever the status.
    pub async fn try_publish(&self, body: Value) -> (u16, Value) {
        self.api("POST", "/api/v1/events", Some(body)).await
    }

    /// A connected WebSocket client for `user` (token in the query), past its `connected` frame.
    pub async fn ws(&self, user: &str) -> Ws {
        let mut ws = Ws::connect(&self.ws_url(&format!("?token={}", self.token(user)))).await;
        let c = ws.next().await;
        assert_eq!(c["type"], "connected", "first frame: {c}");
        ws.connected = c;
        ws
    }

    /// A WebSocket client for `user` that reads through a 4 KiB receive buffer (its window stays
    /// small, so the server's writes stop fitting), past its `connected` frame.
    pub async fn ws_slow_reader(&self, user: &str) -> Ws {
        let url = self.ws_url(&format!("?token={}", self.token(user)));
        ws_slow_reader_at(self.addr(), &url).await
    }

    pub async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

/// The Prometheus text at `url` (an engine's `/metrics`), asserting 200. Bounded by `WAIT`.
pub async fn metrics_at(url: &str) -> String {
    let resp = tokio::time::timeout(WAIT, http_client().get(url).send())
        .await
        .expect("GET /metrics timed out")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.unwrap()
}

/// An API call to the engine at `addr` (a process's address) with the API key, asserting success:
/// its JSON body (`Null` when there is none). Bounded by `WAIT`.
pub async fn api_at(addr: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = http_client()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(API_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("HTTP timed out")
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap_or(Value::Null)
}

/// `user` made a member of `room` on the engine at `addr` (a process's address), connected over
/// WebSocket and subscribed to `room:{room}`.
pub async fn room_member_at(addr: &str, room: &str, user: &str) -> Ws {
    let path = format!("/api/v1/rooms/{room}/members/{user}");
    api_at(addr, reqwest::Method::PUT, &path, None).await;
    let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={}", user_token(user))).await;
    assert_eq!(ws.next().await["type"], "connected");
    ws.subscribed(&format!("room:{room}")).await;
    ws
}

/// A WebSocket to `url` (at `addr`) whose client side reads through a 4 KiB receive buffer: the
/// server's writes stop fitting soon. Past its `connected` frame.
pub async fn ws_slow_reader_at(addr: std::net::SocketAddr, url: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (stream, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    let mut ws = Ws::from_stream(stream);
    assert_eq!(ws.next().await["type"], "connected");
    ws
}

/// The sum of metric `name` over its labels at the engine at `addr` (a process's address: the
/// test process's own recorder is shared by every in-process engine).
pub async fn metric_at(addr: &str, name: &str) -> f64 {
    herald::metrics::parse(&metrics_at(&format!("http://{addr}/metrics")).await)
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// A valid HS256 token for `user` (1 h), signed with the test secret: for engines run as a process.
pub fn user_token(user: &str) -> String {
    herald::transport::auth::mint_hs256(SECRET, user, None, 3600).unwrap()
}

/// Claims for `user`, valid for an hour.
pub fn claims(user: &str) -> Claims {
    Claims {
        sub: user.into(),
        exp: unix_now() + 3600,
        nbf: None,
        aud: None,
        iss: None,
        device: None,
        platform: None,
        attrs: Map::new(),
    }
}

/// A WebSocket client that understands the protocol's frames.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for something else.
    pub backlog: std::collections::VecDeque<Value>,
    /// The `connected` frame.
    pub connected: Value,
    next_ref: u64,
}

/// How a WebSocket ended.
#[derive(Debug, PartialEq)]
pub struct Closed {
    /// The `disconnect` frame's code, if one came.
    pub disconnect: Option<u64>,
    /// The close frame's code, if one came.
    pub close: Option<u16>,
}

impl Ws {
    /// A client over a WebSocket opened some other way (before its `connected` frame).
    pub fn from_stream(stream: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Ws {
        Ws {
            stream,
            backlog: Default::default(),
            connected: Value::Null,
            next_ref: 1,
        }
    }

    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("ws connect timed out")
            .expect("ws connect failed");
        Ws {
            stream,
            backlog: Default::default(),
            connected: Value::Null,
            next_ref: 1,
        }
    }

    /// Tries to connect; the HTTP status on refusal.
    pub async fn try_connect(url: &str) -> Result<Ws, u16> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((stream, _)) => Ok(Ws {
                stream,
                backlog: Default::default(),
                connected: Value::Null,
                next_ref: 1,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.stream
            .send(Message::Text(t.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON frame (backlog first). Panics after `WAIT`.
    pub async fn next(&mut self) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.read()
            .await
            .expect("socket closed while waiting for a frame")
    }

    /// Reads one JSON frame from the socket; `None` when closed.
    async fn read(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("no frame within WAIT")?;
            match m.ok()? {
                Message::Text(t) => {
                    return Some(serde_json::from_str(&t).expect("server frame is JSON"));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Sends an op with a fresh `ref` and returns its reply; other frames go to the backlog.
    pub async fn request(&mut self, mut op: Value) -> Value {
        let r = self.next_ref;
        self.next_ref += 1;
        op["ref"] = json!(r);
        self.send(op).await;
        self.reply(json!(r)).await
    }

    /// Subscribes to `channel`, asserts the reply is `ok` and returns it.
    pub async fn subscribed(&mut self, channel: &str) -> Value {
        let r = self
            .request(json!({"op": "subscribe", "channel": channel}))
            .await;
        assert_eq!(r["ok"], true, "subscribe {channel}: {r}");
        r
    }

    /// Waits for the reply carrying `r`.
    pub async fn reply(&mut self, r: Value) -> Value {
        loop {
            let v = self
                .read()
                .await
                .expect("socket closed while waiting for a reply");
            if (v["type"] == "reply" || v["type"] == "pong") && v["ref"] == r {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    /// Waits for a frame matching `pred` (backlog first); skips others.
    pub async fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).unwrap();
        }
        loop {
            let v = self.read().await.expect("socket closed while waiting");
            if pred(&v) {
                return v;
            }
        }
    }

    /// The next `event` frame on `channel`.
    pub async fn event_on(&mut self, channel: &str) -> Value {
        let ch = channel.to_string();
        self.wait_for(move |v| v["type"] == "event" && v["channel"] == ch)
            .await
    }

    /// Asserts that nothing matching `pred` arrives within `d`.
    pub async fn assert_none(&mut self, d: Duration, pred: impl Fn(&Value) -> bool) {
        assert!(
            !self.backlog.iter().any(&pred),
            "unexpected frame in backlog: {:?}",
            self.backlog
        );
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return,
                Ok(None) => return,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert!(!pred(&v), "unexpected frame: {v}");
                    self.backlog.push_back(v);
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Reads until the server closes; the `disconnect` code and the close code.
    pub async fn closed(&mut self) -> Closed {
        let mut out = Closed {
            disconnect: None,
            close: None,
        };
        for v in self.backlog.drain(..) {
            if v["type"] == "disconnect" {
                out.disconnect = v["code"].as_u64();
            }
        }
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("server did not close within WAIT")
            {
                None | Some(Err(_)) => return out,
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "disconnect" {
                        out.disconnect = v["code"].as_u64();
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    out.close = f.map(|f| u16::from(f.code));
                    return out;
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// An SSE client: `(id, event, data)` triples, parsed by `eventsource-stream`.
pub struct Sse {
    pub status: u16,
    stream: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<eventsource_stream::Event, String>> + Send>,
    >,
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// `GET url` for an SSE stream, with an optional `Last-Event-ID` (bounded by `WAIT`).
async fn sse_get(url: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = crate::common::http_client().get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    tokio::time::timeout(WAIT, req.send())
        .await
        .expect("SSE open timed out")
        .unwrap()
}

impl Sse {
    /// Opens `url` with optional `Last-Event-ID`; panics unless 200 (use `try_open` for failures).
    pub async fn open(url: &str, last_event_id: Option<&str>) -> Sse {
        let s = Self::try_open(url, last_event_id).await;
        assert_eq!(s.status, 200, "SSE open failed");
        s
    }

    pub async fn try_open(url: &str, last_event_id: Option<&str>) -> Sse {
        use eventsource_stream::Eventsource;
        let resp = sse_get(url, last_event_id).await;
        let status = resp.status().as_u16();
        let stream = resp
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        Sse {
            status,
            stream: Box::pin(stream),
        }
    }

    /// The next event (comments are skipped by the parser). Panics after `WAIT`.
    pub async fn next(&mut self) -> SseEvent {
        let e = tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("no SSE event within WAIT")
            .expect("SSE stream ended")
            .expect("SSE parse error");
        SseEvent {
            id: e.id,
            event: e.event,
            data: serde_json::from_str(&e.data).unwrap_or(Value::String(e.data)),
        }
    }

    /// The next event whose `event:` is `name`.
    pub async fn next_named(&mut self, name: &str) -> SseEvent {
        loop {
            let e = self.next().await;
            if e.event == name {
                return e;
            }
        }
    }
}

// ---- Helpers for the API, auth and CLI suites (api.rs, auth.rs, cli.rs). ----

/// Asserts an HTTP error reply: the status, and the body `{"error":{"code","message"}}` with `code`.
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, v) = got;
    assert_eq!(*s, status, "status (body {v})");
    assert_eq!(v["error"]["code"], code, "error code: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error message: {v}"
    );
}

impl TestServer {
    /// An HTTP call with a raw body and extra headers: (status, JSON body or Null).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            self.url(path),
        );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("HTTP timed out")
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// History of `channel` through the API (`since` exclusive): the reply.
    pub async fn history(&self, channel: &str, since: u64) -> Value {
        let (s, v) = self
            .api(
                "GET",
                &format!("/api/v1/channels/{channel}/history?since={since}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "history of {channel}: {v}");
        v
    }

    /// A connected WebSocket client with a given token (query), past its `connected` frame.
    pub async fn ws_token(&self, token: &str) -> Ws {
        let mut ws = Ws::connect(&self.ws_url(&format!("?token={token}"))).await;
        let c = ws.next().await;
        assert_eq!(c["type"], "connected", "first frame: {c}");
        ws.connected = c;
        ws
    }
}

impl Ws {
    /// Connects with a prepared request (extra headers); the HTTP status on refusal.
    pub async fn try_connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Ws, u16> {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("ws connect timed out")
        {
            Ok((stream, _)) => Ok(Ws {
                stream,
                backlog: Default::default(),
                connected: Value::Null,
                next_ref: 1,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("herald-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn join(&self, p: &str) -> std::path::PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---- Helpers of the SSE, presence and replay suites ----

/// A cloneable API publisher, for tasks that publish beside the test.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    url: String,
}

impl Publisher {
    /// Publishes through `POST /api/v1/events`; the reply. Panics unless 200.
    pub async fn publish(&self, body: Value) -> Value {
        let req = self
            .http
            .post(&self.url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.to_string());
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("publish timed out")
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null);
        assert_eq!(status, 200, "publish failed: {v}");
        v
    }
}

impl TestServer {
    /// A publisher for spawned tasks.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            http: self.http.clone(),
            url: self.url("/api/v1/events"),
        }
    }

    /// A connected WebSocket client for `user` with extra query parameters (`"&device=phone"`), past its
    /// `connected` frame.
    pub async fn ws_with(&self, user: &str, extra_query: &str) -> Ws {
        let mut ws =
            Ws::connect(&self.ws_url(&format!("?token={}{extra_query}", self.token(user)))).await;
        let c = ws.next().await;
        assert_eq!(c["type"], "connected", "first frame: {c}");
        ws.connected = c;
        ws
    }

    /// Polls an API GET until `pred` holds on its body (bounded by `WAIT`); that body.
    pub async fn api_until(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (s, v) = self.api("GET", path, None).await;
            if s == 200 && pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path}: condition not met within WAIT; last: {s} {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Ws {
    /// Closes from the client side (close frame) and reads until the server ends the connection.
    pub async fn close_client(&mut self) {
        self.stream.close(None).await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

/// An SSE reader that keeps the wire as it is: each block's field lines in order (so a missing `id:` or
/// a `retry:` line can be asserted, which an `EventSource`-style parser hides).
pub struct RawSse {
    pub status: u16,
    resp: reqwest::Response,
    buf: Vec<u8>,
}

/// One SSE block (up to a blank line): its fields in order; comment lines are counted, not kept.
#[derive(Debug, Clone)]
pub struct SseBlock {
    pub fields: Vec<(String, String)>,
}

impl SseBlock {
    /// The first value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The field names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// `data:` parsed as JSON.
    pub fn data(&self) -> Value {
        let d = self.get("data").expect("block has no data");
        serde_json::from_str(d).unwrap_or_else(|e| panic!("data is not JSON ({e}): {d}"))
    }
}

impl RawSse {
    /// Opens `url` with an optional `Last-Event-ID`; panics unless 200.
    pub async fn open(url: &str, last_event_id: Option<&str>) -> RawSse {
        let resp = sse_get(url, last_event_id).await;
        let status = resp.status().as_u16();
        assert_eq!(status, 200, "SSE open failed");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        RawSse {
            status,
            resp,
            buf: Vec::new(),
        }
    }

    /// The next block with at least one field (comment-only blocks are skipped). Panics after `WAIT`.
    pub async fn next_block(&mut self) -> SseBlock {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8(raw[..i].to_vec()).expect("SSE block is UTF-8");
                let mut fields = Vec::new();
                for line in text.split('\n') {
                    if line.is_empty() || line.starts_with(':') {
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    fields.push((k.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()));
                }
                if !fields.is_empty() {
                    return SseBlock { fields };
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("no SSE block within WAIT")
                .expect("SSE read error")
                .expect("SSE stream ended");
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// The next block whose `event:` is `name`.
    pub async fn next_named(&mut self, name: &str) -> SseBlock {
        loop {
            let b = self.next_block().await;
            if b.get("event") == Some(name) {
                return b;
            }
        }
    }
}

impl TestServer {
    /// An engine on the Redis at `url`, as node `node`, with `f` applied to its config.
    pub async fn start_redis(url: &str, node: &str, f: impl FnOnce(&mut Config)) -> TestServer {
        let url = url.to_string();
        let node = node.to_string();
        Self::start_with(move |c| {
            c.redis = Some(url);
            c.node_id = node;
            f(c);
        })
        .await
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// The repository's `channels.toml`.
pub fn shipped_channels() -> String {
    format!("{}/channels.toml", env!("CARGO_MANIFEST_DIR"))
}

/// A running `herald` process, killed (and reaped) when dropped.
pub struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    /// Kills the process with SIGKILL (no shutdown, no cleanup) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Spawns `herald args…` in `dir` with a clean environment plus `env`.
    pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(dir)
            .env_clear()
            .env("HERALD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("herald binary starts");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Proc {
            child,
            stdout: rx,
            stderr: Some(stderr),
        }
    }

    /// The next stdout line (panics after `WAIT`).
    pub fn line(&self) -> String {
        self.stdout
            .recv_timeout(WAIT)
            .expect("no stdout line within WAIT")
    }

    /// Waits for the process to exit (panics after `within`).
    pub fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "herald did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything written to stderr (after the process exited).
    pub fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default()
    }

    /// What is left of stdout, for a process that has exited: read to the end of the pipe (the
    /// reader thread may still be passing lines on when the exit is seen), bounded by `WAIT`.
    pub fn rest_of_stdout(&self) -> String {
        let deadline = Instant::now() + WAIT;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => break, // the pipe's end (or the bound)
            }
        }
        lines.join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of a `serve` from its banner's first line (`herald listening on http://ADDR …`).
    pub fn listening(&self) -> String {
        listening_addr(&self.line())
    }
}

/// The address in a `serve` banner's first line.
pub fn listening_addr(first: &str) -> String {
    first
        .strip_prefix("herald listening on http://")
        .unwrap_or_else(|| panic!("first line: {first:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A `herald serve` process on port 0 with the test keys; `addr` is read from its banner.
pub struct HeraldProcess {
    pub proc: Proc,
    pub addr: String,
    _dir: TempDir,
}

impl HeraldProcess {
    /// `herald serve --redis URL` plus `extra` flags.
    pub fn spawn(redis_url: &str, extra: &[&str]) -> HeraldProcess {
        Self::spawn_with_env(redis_url, extra, &[])
    }

    /// [`HeraldProcess::spawn`] with more environment variables.
    pub fn spawn_with_env(
        redis_url: &str,
        extra: &[&str],
        more_env: &[(&str, &str)],
    ) -> HeraldProcess {
        let mut args = vec!["--redis", redis_url];
        args.extend_from_slice(extra);
        Self::start(&args, more_env)
    }

    /// `herald serve` on the memory backend, with more environment variables (later ones win).
    pub fn memory(more_env: &[(&str, &str)]) -> HeraldProcess {
        Self::start(&[], more_env)
    }

    fn start(extra: &[&str], more_env: &[(&str, &str)]) -> HeraldProcess {
        let dir = TempDir::new("node");
        let channels = shipped_channels();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--channels", &channels];
        args.extend_from_slice(extra);
        let mut env = vec![
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEY", API_KEY),
            ("HERALD_ADMIN_KEY", ADMIN_KEY),
        ];
        env.extend_from_slice(more_env);
        let proc = Proc::spawn(&dir.path, &args, &env);
        let addr = proc.listening();
        HeraldProcess {
            proc,
            addr,
            _dir: dir,
        }
    }

    pub fn kill9(mut self) {
        self.proc.kill9();
    }
}
