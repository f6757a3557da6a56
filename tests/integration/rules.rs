//! Rules through the real wire: hot reload (editor-style rename and plain rewrite) with nothing lost
//! while publishing, refused reloads that keep the last good set (syntax errors, failing fixtures), the
//! sandbox (runaway scripts fall back to the channel defaults or reject), permission hooks over WS and
//! SSE, `drop`, decision validation, two nodes on one Redis reloading the same directory, the operator
//! tools (`herald rules check|test`, `herald simulate`, `POST /admin/rules/dry-run`), and the shipped
//! `rules/` loading and routing.
//!
//! Every test writes its own rule files into a fresh `TempDir`; every wait is bounded by `WAIT`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald::ChannelKinds;
use herald::rules::OnError;
use serde_json::{Value, json};

use crate::common::*;
use crate::redis_server::RedisServer;

// ---- helpers ----

/// Writes `text` to `dir/name` in place (truncate + write), creating parent directories.
fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Replaces `dir/name` as editors do: a temporary file beside it (not `*.rhai`), renamed over it.
fn replace(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

/// A rule file routing `ping.me` events to `user:{user}`; everything else passes on.
fn ping_to(user: &str) -> String {
    r##"// routes pings
fn route(e) {
    if e.type == "ping.me" {
        return #{to: ["user:TARGET"]};
    }
}
"##
    .replace("TARGET", user)
}

/// An engine with its rules in `dir`.
async fn start(dir: &TempDir) -> TestServer {
    let path = dir.path.clone();
    TestServer::start_with(move |c| c.rules_dir = path).await
}

/// `GET /admin/rules` with the admin key.
async fn rules_status(s: &TestServer) -> Value {
    let (st, v) = s.call("GET", "/admin/rules", None, Some(ADMIN_KEY)).await;
    assert_eq!(st, 200, "GET /admin/rules: {v}");
    v
}

fn version(v: &Value) -> u64 {
    v["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version: {v}"))
}

/// Polls `GET /admin/rules` until `pred` holds (bounded by `WAIT`).
async fn rules_until(s: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = rules_status(s).await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; last /admin/rules: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a successful reload past version `after`.
async fn reloaded(s: &TestServer, after: u64) -> Value {
    rules_until(s, "a successful reload", |v| {
        version(v) > after && v["last_error"].is_null()
    })
    .await
}

/// Waits for a refused reload (`last_error` set).
async fn refused(s: &TestServer) -> Value {
    rules_until(s, "a refused reload", |v| !v["last_error"].is_null()).await
}

/// Publishes `ping.me` (data `n`) to `room:lobby` through the API; asserts the rules sent it to
/// `user:{to}` and that the WebSocket client `ws` of that user receives it.
async fn ping(s: &TestServer, ws: &mut Ws, to: &str, n: u64) {
    let r = s
        .publish(json!({"event": "ping.me", "channel": "room:lobby", "data": n}))
        .await;
    let ch = format!("user:{to}");
    assert_eq!(r["deliveries"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["deliveries"][0]["channel"], ch.as_str(), "{r}");
    let ev = ws.event_on(&ch).await;
    assert_eq!(ev["event"], "ping.me", "{ev}");
    assert_eq!(ev["data"], n, "{ev}");
}

/// Proves each of `clients` got nothing more on `channel` so far: publishes a marker there (channel
/// defaults: the rules in these tests pass `marker` on) and asserts it is the next event each gets on
/// that channel (events on one channel arrive in order).
async fn nothing_more_on(s: &TestServer, clients: &mut [&mut Ws], channel: &str) {
    static N: AtomicU64 = AtomicU64::new(0);
    let tag = format!("marker-{}", N.fetch_add(1, Ordering::Relaxed));
    let r = s
        .publish(json!({"event": "marker", "channel": channel, "data": tag}))
        .await;
    assert_eq!(r["deliveries"][0]["channel"], channel, "{r}");
    for ws in clients.iter_mut() {
        let ev = ws.event_on(channel).await;
        assert_eq!(
            ev["event"], "marker",
            "unexpected event before the marker: {ev}"
        );
        assert_eq!(ev["data"], tag.as_str(), "{ev}");
    }
}

/// The value of `herald_rule_errors_total{hook=…}` in `/metrics` (0 when absent).
async fn rule_errors(s: &TestServer, hook: &str) -> f64 {
    metric(&s.metrics_text().await, "herald_rule_errors_total", hook)
}

fn metric(text: &str, name: &str, hook: &str) -> f64 {
    let label = format!("hook=\"{hook}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the real binary in `cwd` with a clean environment: (success, stdout, stderr). Bounded by
/// `WAIT`.
fn herald_cli(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herald binary starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herald {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---- 1. hot reload ----

#[tokio::test]
async fn an_edited_rule_file_reroutes_the_next_publish() {
    let dir = TempDir::new("rules-reload");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let s = start(&dir).await;
    let mut x = s.ws("x").await;
    let mut y = s.ws("y").await;
    let st = rules_status(&s).await;
    assert_eq!(st["files"], json!(["10-route.rhai"]), "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    let v1 = version(&st);
    ping(&s, &mut x, "x", 1).await;

    // Saved the way editors do: a temporary file renamed over the rule file.
    replace(&dir.path, "10-route.rhai", &ping_to("y"));
    let v2 = version(&reloaded(&s, v1).await);
    ping(&s, &mut y, "y", 2).await;
    nothing_more_on(&s, &mut [&mut x], "user:x").await;

    // Rewritten in place.
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let st = reloaded(&s, v2).await;
    assert_eq!(st["files"], json!(["10-route.rhai"]), "{st}");
    ping(&s, &mut x, "x", 3).await;
    nothing_more_on(&s, &mut [&mut y], "user:y").await;
    s.stop().await;
}

/// Reads `channel` events from `ws` until a `done` event; the `data` of the others, in order.
async fn collect_until_done(mut ws: Ws, channel: &'static str) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        let ev = ws.event_on(channel).await;
        if ev["event"] == "done" {
            return got;
        }
        got.push(ev["data"].as_u64().unwrap_or_else(|| panic!("{ev}")));
    }
}

#[tokio::test]
async fn publishing_through_a_reload_loses_nothing() {
    let dir = TempDir::new("rules-reload-loop");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let s = start(&dir).await;
    let x = s.ws("x").await;
    let y = s.ws("y").await;
    let v1 = version(&rules_status(&s).await);
    let got_x = tokio::spawn(collect_until_done(x, "user:x"));
    let got_y = tokio::spawn(collect_until_done(y, "user:y"));

    // Publish without pause, each reply awaited, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = s.publisher();
    let pub_task = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut routed = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let r = publisher
                    .publish(json!({"event": "ping.me", "channel": "room:lobby", "data": n}))
                    .await;
                let d = r["deliveries"].as_array().unwrap();
                assert_eq!(d.len(), 1, "{r}");
                routed.push(d[0]["channel"].as_str().unwrap().to_string());
                n += 1;
                sent.store(n, Ordering::Release);
            }
            routed
        })
    };
    let at_least = |n: u64| {
        let sent = sent.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while sent.load(Ordering::Acquire) < n {
                assert!(Instant::now() < deadline, "fewer than {n} publishes");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    at_least(20).await;
    replace(&dir.path, "10-route.rhai", &ping_to("y"));
    reloaded(&s, v1).await;
    let after = sent.load(Ordering::Acquire);
    at_least(after + 20).await;
    stop.store(true, Ordering::Release);
    let routed = pub_task.await.unwrap();
    // The end marker: not a ping, so the channel defaults send it to both.
    s.publish(json!({"event": "done", "to": ["x", "y"], "data": null}))
        .await;
    let got_x = got_x.await.unwrap();
    let got_y = got_y.await.unwrap();

    // The old set routed every publish up to the swap, the new one every publish after it.
    let switch = routed
        .iter()
        .position(|c| c == "user:y")
        .expect("no publish was routed by the new rules");
    assert!(switch >= 20, "switched at {switch}");
    assert!(routed[..switch].iter().all(|c| c == "user:x"), "{routed:?}");
    assert!(
        routed[switch..].iter().all(|c| c == "user:y"),
        "a publish after the swap went back to the old rules: {routed:?}"
    );
    // Each publish was delivered exactly once, where its reply said, in order.
    let n = routed.len() as u64;
    assert_eq!(got_x, (0..switch as u64).collect::<Vec<_>>());
    assert_eq!(got_y, (switch as u64..n).collect::<Vec<_>>());
    s.stop().await;
}

// ---- 2. refused reloads ----

#[tokio::test]
async fn a_broken_edit_is_refused_and_the_last_good_rules_stay() {
    let dir = TempDir::new("rules-broken");
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let s = start(&dir).await;
    let mut x = s.ws("x").await;
    let mut y = s.ws("y").await;
    let v1 = version(&rules_status(&s).await);

    // A syntax error: refused with file:line:col, the old version stays and still routes.
    write(
        &dir.path,
        "10-route.rhai",
        "fn route(e) {\n    let x = ;\n}\n",
    );
    let st = refused(&s).await;
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("10-route.rhai:2:13"), "{err}");
    assert_eq!(version(&st), v1, "{st}");
    assert_eq!(st["files"], json!(["10-route.rhai"]), "{st}");
    ping(&s, &mut x, "x", 1).await;

    // Fixed: the error clears and the version moves on.
    write(&dir.path, "10-route.rhai", &ping_to("y"));
    let st = reloaded(&s, v1).await;
    let v2 = version(&st);
    ping(&s, &mut y, "y", 2).await;

    // A fixture whose expectation fails: refused, naming the case; the rules in force stay.
    let fixture = r#"
[[case]]
name = "pings go to zed"
event = { type = "ping.me", channel = "room:lobby" }
expect = { to = ["user:zed"] }
"#;
    write(&dir.path, "tests/x.toml", fixture);
    let st = refused(&s).await;
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("pings go to zed"), "{err}");
    assert!(
        err.contains(r#"expected ["user:zed"], got ["user:y"]"#),
        "{err}"
    );
    assert_eq!(version(&st), v2, "{st}");
    ping(&s, &mut y, "y", 3).await;

    // The fixture corrected (renamed over, as an editor saves it): accepted.
    replace(&dir.path, "tests/x.toml", &fixture.replace("zed", "y"));
    let st = reloaded(&s, v2).await;
    assert!(version(&st) > v2);
    ping(&s, &mut y, "y", 4).await;
    nothing_more_on(&s, &mut [&mut x], "user:x").await;
    s.stop().await;
}

/// A rules file slow to compile (thousands of functions: seconds) does not hold up an edit made
/// meanwhile: the edit's reload runs beside it and is in force while the slow one still compiles,
/// `GET /admin/rules` says a compile is running, and the slow one's result, older than the edit, is
/// dropped when it ends.
#[tokio::test]
async fn an_edit_made_while_a_slow_compile_runs_does_not_wait_for_it() {
    let dir = TempDir::new("rules-slow");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let s = start(&dir).await;
    let mut y = s.ws("y").await;
    let v1 = version(&rules_status(&s).await);
    let huge: String = (0..7000)
        .map(|i| format!("fn helper_{i}(x) {{ if x > {i} {{ return x * {i} + 1; }} x }}\n"))
        .collect();
    replace(&dir.path, "20-huge.rhai", &huge);
    // The huge file's compile: one that has run for a second (a small set compiles in
    // milliseconds; a reload may also have caught the directory before the rename).
    let st = rules_until(&s, "a slow compile running", |v| {
        v["compiling"] == true
            && v["compiling_since"]
                .as_i64()
                .is_some_and(|t| herald::event::now_ms() - t > 1000)
    })
    .await;
    assert_eq!(version(&st), v1, "nothing applied yet: {st}");
    // The good edit: the huge file goes, the route changes.
    std::fs::remove_file(dir.join("20-huge.rhai")).unwrap();
    replace(&dir.path, "10-route.rhai", &ping_to("y"));
    let st = reloaded(&s, v1).await;
    assert_eq!(st["files"], json!(["10-route.rhai"]), "{st}");
    assert_eq!(
        st["compiling"], true,
        "the edit is in force while the slow compile still runs: {st}"
    );
    ping(&s, &mut y, "y", 1).await;
    // The slow compile ends; its (older) result does not replace the edit's.
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let v = rules_status(&s).await;
        if v["compiling"] == false {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the slow compile never ended: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(st["files"], json!(["10-route.rhai"]), "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    assert!(st["compiling_since"].is_null(), "{st}");
    ping(&s, &mut y, "y", 2).await;
    s.stop().await;
}

// ---- 3. the sandbox ----

const RUNAWAY: &str = r##"// scripts that never finish on their own
fn blow(n) { blow(n + 1) }
fn route(e) {
    if e.type == "spin" { loop { } }
    if e.type == "grow" { let s = "x"; loop { s += s; } }
    if e.type == "deep" { return blow(0); }
}
"##;

#[tokio::test]
async fn a_runaway_route_falls_back_to_the_channel_defaults() {
    let dir = TempDir::new("rules-sandbox");
    write(&dir.path, "10-runaway.rhai", RUNAWAY);
    let s = start(&dir).await;
    let mut u = s.ws("u").await;
    let before = rule_errors(&s, "route").await;
    for ev in ["spin", "grow", "deep"] {
        let t = Instant::now();
        let r = s
            .publish(json!({"event": ev, "channel": "user:u", "data": ev}))
            .await;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "{ev}: publish took {took:?}");
        assert_eq!(r["deliveries"][0]["channel"], "user:u", "{ev}: {r}");
        assert!(r["deliveries"][0]["seq"].is_u64(), "{ev}: {r}");
        let got = u.event_on("user:u").await;
        assert_eq!(got["event"], ev, "{got}");
        assert_eq!(got["data"], ev, "{got}");
    }
    let text = s.metrics_text().await;
    assert!(text.contains("herald_rule_errors_total"), "{text}");
    let after = metric(&text, "herald_rule_errors_total", "route");
    assert!(after >= before + 3.0, "errors {before} -> {after}");
    s.stop().await;
}

#[tokio::test]
async fn a_runaway_route_rejects_with_on_error_reject() {
    let dir = TempDir::new("rules-sandbox-reject");
    write(&dir.path, "10-runaway.rhai", RUNAWAY);
    let path = dir.path.clone();
    let s = TestServer::start_with(move |c| {
        c.rules_dir = path;
        c.rules_on_error = OnError::Reject;
    })
    .await;
    for ev in ["spin", "grow", "deep"] {
        let t = Instant::now();
        let got = s
            .api(
                "POST",
                "/api/v1/events",
                Some(json!({"event": ev, "channel": "user:u", "data": ev})),
            )
            .await;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "{ev}: publish took {took:?}");
        assert_error(&got, 409, "rejected");
    }
    let h = s.history("user:u", 0).await;
    assert_eq!(h["events"], json!([]), "{h}");
    // A route that works is unaffected by the policy.
    s.publish(json!({"event": "fine", "channel": "user:u", "data": 1}))
        .await;
    s.stop().await;
}

// ---- 4. permission hooks ----

const PERMS_A: &str = r##"// 10-a: first say
fn can_subscribe(user, channel) {
    if channel == "room:secret" || channel == "room:both" { return false; }
}
fn can_publish(user, channel, event) {
    if event == "forbidden.kind" { return false; }
}
fn route(e) {
    if e.type == "a.only" { return #{to: ["user:alice"]}; }
}
"##;

const PERMS_B: &str = r##"// 20-b: second say
fn can_subscribe(user, channel) {
    if channel == "room:both" || channel == "room:open" { return true; }
    if channel == "room:closed" { return false; }
}
fn can_publish(user, channel, event) {
    if channel == "global" && event == "shout" { return true; }
}
fn route(e) {
    if e.type == "a.only" || e.type == "b.only" { return #{to: ["user:bob"]}; }
}
"##;

async fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    ws.request(json!({"op": "subscribe", "channel": channel}))
        .await
}

#[tokio::test]
async fn permission_hooks_decide_in_file_order_then_the_channel_defaults() {
    let dir = TempDir::new("rules-perms");
    write(&dir.path, "10-a.rhai", PERMS_A);
    write(&dir.path, "20-b.rhai", PERMS_B);
    let s = start(&dir).await;
    for room in ["secret", "both", "closed", "r1"] {
        s.join(room, "alice").await;
    }
    let mut alice = s.ws("alice").await;

    // can_subscribe over WebSocket.
    for (ch, want) in [
        ("room:secret", Some("forbidden")), // 10-a says no (membership would allow)
        ("room:both", Some("forbidden")),   // 10-a decides before 20-b's yes
        ("room:closed", Some("forbidden")), // 10-a passes, 20-b says no
        ("room:open", None),                // 20-b says yes (not a member)
        ("room:r1", None),                  // both pass: defaults, a member
        ("room:other", Some("not_member")), // both pass: defaults, not a member
    ] {
        let r = subscribe(&mut alice, ch).await;
        match want {
            None => assert_eq!(r["ok"], true, "{ch}: {r}"),
            Some(code) => {
                assert_eq!(r["ok"], false, "{ch}: {r}");
                assert_eq!(r["error"]["code"], code, "{ch}: {r}");
            }
        }
    }

    // can_subscribe over SSE.
    let token = s.token("alice");
    let got = s
        .call(
            "GET",
            &format!("/sse?channels=room:secret&token={token}"),
            None,
            None,
        )
        .await;
    assert_error(&got, 403, "forbidden");
    let got = s
        .call(
            "GET",
            &format!("/sse?channels=room:r1,room:closed&token={token}"),
            None,
            None,
        )
        .await;
    assert_error(&got, 403, "forbidden");
    let ok = Sse::try_open(
        &s.url(&format!("/sse?channels=room:r1,room:open&token={token}")),
        None,
    )
    .await;
    assert_eq!(ok.status, 200);
    drop(ok);

    // can_publish over WebSocket: denial is `forbidden` with a rollback.
    let r = alice
        .request(
            json!({"op": "publish", "channel": "room:r1", "event": "forbidden.kind", "data": 1}),
        )
        .await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    assert_eq!(r["action"], "rollback", "{r}");
    let h = s.history("room:r1", 0).await;
    assert_eq!(h["events"], json!([]), "{h}");
    // Passed on by both files: the defaults let a member publish.
    let r = alice
        .request(json!({"op": "publish", "channel": "room:r1", "event": "chat.message", "data": 2}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // 20-b allows what the defaults forbid (clients may not publish to `global`).
    let r = alice
        .request(json!({"op": "publish", "channel": "global", "event": "shout", "data": 3}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = alice
        .request(json!({"op": "publish", "channel": "global", "event": "whisper", "data": 4}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    assert_eq!(r["action"], "rollback", "{r}");

    // route: the first file returning a value decides; `()` passes on, then the defaults.
    for (ev, by, to) in [
        ("a.only", "10-a.rhai::route", "user:alice"),
        ("b.only", "20-b.rhai::route", "user:bob"),
        ("neither", "channel defaults", "room:r1"),
    ] {
        let (st, v) = s
            .call(
                "POST",
                "/admin/rules/dry-run",
                Some(json!({"event": ev, "channel": "room:r1", "data": {}})),
                Some(ADMIN_KEY),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["trace"]["by"], by, "{ev}: {v}");
        assert_eq!(v["decision"]["to"], json!([to]), "{ev}: {v}");
    }
    let r = s
        .publish(json!({"event": "a.only", "channel": "room:r1", "data": 5}))
        .await;
    assert_eq!(r["deliveries"][0]["channel"], "user:alice", "{r}");
    let ev = alice.event_on("user:alice").await;
    assert_eq!(ev["event"], "a.only", "{ev}");
    s.stop().await;
}

// ---- 5. drop ----

#[tokio::test]
async fn a_dropped_event_is_rejected_and_nothing_is_stored() {
    let dir = TempDir::new("rules-drop");
    write(
        &dir.path,
        "10-spam.rhai",
        "fn route(e) {\n    if e.type == \"spam.me\" { return #{drop: true, reason: \"spam\"}; }\n}\n",
    );
    let s = start(&dir).await;
    s.join("r1", "alice").await;
    s.join("r1", "bob").await;
    let mut bob = s.ws("bob").await;
    bob.subscribed("room:r1").await;
    let mut alice = s.ws("alice").await;

    let got = s
        .api(
            "POST",
            "/api/v1/events",
            Some(json!({"event": "spam.me", "channel": "room:r1", "data": {"buy": "now"}})),
        )
        .await;
    assert_eq!(got.0, 409, "{}", got.1);
    assert_eq!(
        got.1,
        json!({"error": {"code": "rejected", "message": "spam"}})
    );

    let r = alice
        .request(json!({"op": "publish", "channel": "room:r1", "event": "spam.me", "data": 1}))
        .await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "rejected", "{r}");
    assert_eq!(r["error"]["message"], "spam", "{r}");
    assert_eq!(r["action"], "rollback", "{r}");

    let h = s.history("room:r1", 0).await;
    assert_eq!(h["events"], json!([]), "{h}");
    let (_, unread) = s.api("GET", "/api/v1/users/bob/unread", None).await;
    assert!(unread["unread"]["r1"].is_null(), "{unread}");
    nothing_more_on(&s, &mut [&mut bob], "room:r1").await;
    s.stop().await;
}

// ---- 6. decision validation ----

const BAD_DECISIONS: &str = r##"// returns maps with mistakes
fn route(e) {
    if e.type == "bogus.key" { return #{to: ["room:r1"], bogus: 1}; }
    if e.type == "bad.persist" { return #{persist: "yes"}; }
}
"##;

#[tokio::test]
async fn an_invalid_decision_falls_back_to_the_defaults_and_counts_an_error() {
    let dir = TempDir::new("rules-invalid");
    write(&dir.path, "10-bad.rhai", BAD_DECISIONS);
    let s = start(&dir).await;
    s.join("r1", "bob").await;
    s.join("r2", "bob").await;
    let mut bob = s.ws("bob").await;
    bob.subscribed("room:r1").await;
    bob.subscribed("room:r2").await;
    let before = rule_errors(&s, "route").await;

    for ev in ["bogus.key", "bad.persist"] {
        let r = s
            .publish(json!({"event": ev, "channel": "room:r2", "data": ev}))
            .await;
        // The channel defaults: the named target (not the rule's `to`), stored.
        assert_eq!(r["deliveries"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["deliveries"][0]["channel"], "room:r2", "{r}");
        assert!(r["deliveries"][0]["seq"].is_u64(), "{r}");
        let got = bob.event_on("room:r2").await;
        assert_eq!(got["event"], ev, "{got}");
    }
    nothing_more_on(&s, &mut [&mut bob], "room:r1").await;
    let after = rule_errors(&s, "route").await;
    assert!(after >= before + 2.0, "errors {before} -> {after}");

    // The dry run names the file, the line of `fn route` and the key.
    for (ev, key) in [("bogus.key", "`bogus`"), ("bad.persist", "`persist`")] {
        let (st, v) = s
            .call(
                "POST",
                "/admin/rules/dry-run",
                Some(json!({"event": ev, "channel": "room:r2"})),
                Some(ADMIN_KEY),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["trace"]["by"], "channel defaults", "{v}");
        let err = v["trace"]["error"].as_str().unwrap_or_default();
        assert!(err.contains("10-bad.rhai:2:") && err.contains(key), "{v}");
    }
    s.stop().await;
}

#[test]
fn rules_test_reports_an_invalid_decision_with_file_line_and_key() {
    let dir = TempDir::new("rules-invalid-cli");
    write(&dir.path, "10-bad.rhai", BAD_DECISIONS);
    write(
        &dir.path,
        "tests/bad.toml",
        r#"
[[case]]
name = "the bogus key"
event = { type = "bogus.key", channel = "room:r2" }
expect = { to = ["room:r1"] }

[[case]]
name = "persist as a string"
event = { type = "bad.persist", channel = "room:r2" }
expect = { persist = true }
"#,
    );
    let channels = shipped_channels();
    let (ok, out, err) = herald_cli(
        &dir.path,
        &[
            "rules",
            "test",
            &path_str(&dir.path),
            "--channels",
            &channels,
        ],
    );
    assert!(
        !ok,
        "rules test should fail\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("0 passed, 2 failed"), "{out}");
    assert!(out.contains("the bogus key"), "{out}");
    assert!(out.contains("persist as a string"), "{out}");
    for key in ["`bogus`", "`persist`"] {
        assert!(
            out.lines()
                .any(|l| l.contains("10-bad.rhai:2:") && l.contains(key)),
            "no line naming 10-bad.rhai:2 and {key}:\n{out}"
        );
    }
    assert!(out.contains("expected "), "{out}");
}

// ---- 7. two nodes on one Redis ----

#[tokio::test]
async fn two_nodes_reload_the_same_rules() {
    let redis = RedisServer::start();
    let dir = TempDir::new("rules-cluster");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let (pa, pb) = (dir.path.clone(), dir.path.clone());
    let a = TestServer::start_redis(&redis.url, "rules-a", move |c| c.rules_dir = pa).await;
    let b = TestServer::start_redis(&redis.url, "rules-b", move |c| c.rules_dir = pb).await;
    let mut x = a.ws("x").await;
    let mut y = b.ws("y").await;
    let va = version(&rules_status(&a).await);
    let vb = version(&rules_status(&b).await);
    ping(&a, &mut x, "x", 1).await;
    ping(&b, &mut x, "x", 2).await;

    replace(&dir.path, "10-route.rhai", &ping_to("y"));
    reloaded(&a, va).await;
    reloaded(&b, vb).await;
    ping(&a, &mut y, "y", 3).await;
    ping(&b, &mut y, "y", 4).await;
    nothing_more_on(&a, &mut [&mut x], "user:x").await;
    a.stop().await;
    b.stop().await;
}

// ---- 8. operator tools ----

#[test]
fn rules_check_accepts_good_rules_and_names_file_line_col_of_errors() {
    let good = TempDir::new("rules-check-good");
    write(&good.path, "10-route.rhai", &ping_to("x"));
    let (ok, out, err) = herald_cli(&good.path, &["rules", "check", &path_str(&good.path)]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("10-route.rhai"), "{out}");

    let syntax = TempDir::new("rules-check-syntax");
    write(&syntax.path, "10-route.rhai", &ping_to("x"));
    write(
        &syntax.path,
        "20-broken.rhai",
        "fn route(e) {\n    let x = ;\n}\n",
    );
    let (ok, out, err) = herald_cli(&syntax.path, &["rules", "check", &path_str(&syntax.path)]);
    assert!(!ok, "check should fail\nstdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("20-broken.rhai:2:13"), "{err}");

    let arity = TempDir::new("rules-check-arity");
    write(
        &arity.path,
        "30-arity.rhai",
        "// a helper may take anything\nfn helper(a, b, c) { a }\n\n  fn route(e, extra) {\n    ()\n}\n",
    );
    let (ok, out, err) = herald_cli(&arity.path, &["rules", "check", &path_str(&arity.path)]);
    assert!(!ok, "check should fail\nstdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("30-arity.rhai:4:3"), "{err}");
    assert!(err.contains("route"), "{err}");
}

#[test]
fn rules_test_counts_cases_and_prints_a_diff() {
    let dir = TempDir::new("rules-test-cli");
    write(&dir.path, "10-route.rhai", &ping_to("y"));
    let case = |name: &str, to: &str| {
        format!(
            "[[case]]\nname = \"{name}\"\nevent = {{ type = \"ping.me\", channel = \"room:lobby\" }}\nexpect = {{ to = [\"{to}\"], by = \"10-route.rhai\" }}\n\n"
        )
    };
    write(
        &dir.path,
        "tests/ping.toml",
        &[
            case("pings go to y", "user:y"),
            case("pings go to zed", "user:zed"),
        ]
        .concat(),
    );
    let channels = shipped_channels();
    let args = [
        "rules",
        "test",
        &path_str(&dir.path),
        "--channels",
        &channels,
    ];
    let (ok, out, err) = herald_cli(&dir.path, &args);
    assert!(
        !ok,
        "rules test should fail\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    assert!(out.contains("pings go to zed"), "{out}");
    assert!(
        out.contains(r#"to: expected ["user:zed"], got ["user:y"]"#),
        "{out}"
    );

    write(
        &dir.path,
        "tests/ping.toml",
        &[case("pings go to y", "user:y"), case("still y", "user:y")].concat(),
    );
    let (ok, out, err) = herald_cli(&dir.path, &args);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");
}

#[test]
fn simulate_prints_the_decision_and_the_deciding_file() {
    let dir = TempDir::new("rules-simulate");
    let rules = dir.join("rules");
    write(&rules, "05-pass.rhai", "fn route(e) { () }\n");
    write(&rules, "10-route.rhai", &ping_to("y"));
    write(
        &dir.path,
        "event.json",
        r#"{"type": "ping.me", "channel": "room:lobby", "from": "alice", "data": {"n": 1}}"#,
    );
    let channels = shipped_channels();
    let (ok, out, err) = herald_cli(
        &dir.path,
        &[
            "simulate",
            "--event",
            &path_str(&dir.join("event.json")),
            "--rules",
            &path_str(&rules),
            "--channels",
            &channels,
        ],
    );
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["by"], "10-route.rhai::route", "{v}");
    assert_eq!(v["decision"]["to"], json!(["user:y"]), "{v}");
    assert_eq!(v["decision"]["drop"], false, "{v}");
    assert_eq!(v["decision"]["channels"][0]["channel"], "user:y", "{v}");
    assert_eq!(v["decision"]["channels"][0]["persist"], true, "{v}");
    assert!(v["error"].is_null(), "{v}");
}

/// `herald simulate` takes the event as the publish API does (`event`, `room`, …, even an
/// `idempotency_key`), like dry-run; the repository's example event routes with the shipped rules.
#[test]
fn simulate_takes_a_publish_body_like_the_example_event() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = format!("{root}/rules");
    let channels = shipped_channels();
    let dir = TempDir::new("simulate-example");
    let simulate = |event: &str| {
        let args = [
            "simulate",
            "--event",
            event,
            "--rules",
            &rules,
            "--channels",
            &channels,
        ];
        herald_cli(&dir.path, &args)
    };
    let (ok, out, err) = simulate(&format!("{root}/examples/events/chat.json"));
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["by"], "10-seeds.rhai::route", "{v}");
    assert_eq!(v["decision"]["to"], json!(["room:r1"]), "{v}");
    assert_eq!(v["decision"]["push"]["title"], "Alice Kim", "{v}");
    // A publish body with its idempotency key, as sent to POST /api/v1/events.
    let body =
        json!({"event": "ping.me", "channel": "room:lobby", "data": 1, "idempotency_key": "k"});
    write(&dir.path, "publish.json", &body.to_string());
    let (ok, out, err) = simulate(&path_str(&dir.join("publish.json")));
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    // A misspelt field is an error that names it.
    write(&dir.path, "typo.json", r#"{"event": "n", "rooom": "r1"}"#);
    let (ok, _, err) = simulate(&path_str(&dir.join("typo.json")));
    assert!(!ok && err.contains("rooom"), "{err}");
}

/// `herald simulate --world` plans the push per recipient in a made-up world (the repository's
/// example): bob's background phone is pushed if nobody acks, his foreground laptop gets it live,
/// carol (offline) is pushed on her registered phone, alice (the sender) is left out; a misspelt
/// world key is an error naming it.
#[test]
fn simulate_plans_push_per_recipient_in_a_world() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = format!("{root}/rules");
    let channels = shipped_channels();
    let dir = TempDir::new("simulate-world");
    let simulate = |world: &str| {
        let event = format!("{root}/examples/events/chat.json");
        let args = [
            "simulate",
            "--event",
            &event,
            "--world",
            world,
            "--rules",
            &rules,
            "--channels",
            &channels,
        ];
        herald_cli(&dir.path, &args)
    };
    let (ok, out, err) = simulate(&format!("{root}/examples/events/world.json"));
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let push = &v["push"][0];
    assert_eq!(push["channel"], "room:r1", "{v}");
    assert_eq!(push["when"], "unacked", "{v}");
    assert_eq!(push["after_ms"], 30000, "{v}");
    let users: Vec<&str> = push["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["bob", "carol"], "the sender is left out: {v}");
    let bob = &push["recipients"][0]["devices"];
    assert_eq!(bob[0]["device"], "laptop", "{v}");
    assert_eq!(bob[0]["live"], true, "{v}");
    assert!(bob[0].get("push").is_none(), "{v}");
    assert_eq!(bob[1]["device"], "phone", "{v}");
    assert_eq!(bob[1]["push"], "unacked", "{v}");
    assert_eq!(
        push["recipients"][1]["devices"][0]["provider"], "fcm",
        "{v}"
    );

    write(&dir.path, "typo.json", r#"{"userz": {}}"#);
    let (ok, _, err) = simulate(&path_str(&dir.join("typo.json")));
    assert!(!ok && err.contains("userz"), "{err}");
}

/// The dry run and `herald simulate` decide what the publish would: a room named twice is one
/// target, and a sender the publish API refuses is refused by them too.
#[tokio::test]
async fn dry_run_and_simulate_take_the_targets_and_senders_the_publish_takes() {
    let t = TestServer::start().await;
    let twice = json!({"event": "note", "channel": "room:r1", "room": "r1", "data": {}});
    let (s, v) = t
        .call(
            "POST",
            "/admin/rules/dry-run",
            Some(twice.clone()),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["decision"]["to"], json!(["room:r1"]), "{v}");
    let published = t.publish(twice).await;
    assert_eq!(
        published["deliveries"].as_array().map(Vec::len),
        Some(1),
        "{published}"
    );

    let bad_sender = json!({"event": "note", "room": "r1", "from": "has space"});
    let (s, v) = t
        .api("POST", "/api/v1/events", Some(bad_sender.clone()))
        .await;
    assert_error(&(s, v), 400, "bad_frame");
    let got = t
        .call(
            "POST",
            "/admin/rules/dry-run",
            Some(bad_sender.clone()),
            Some(ADMIN_KEY),
        )
        .await;
    assert_error(&got, 400, "bad_frame");
    assert!(
        got.1["error"]["message"].as_str().unwrap().contains("from"),
        "{}",
        got.1
    );

    let dir = TempDir::new("rules-simulate-sender");
    write(&dir.path, "bad.json", &bad_sender.to_string());
    let (event, channels) = (path_str(&dir.join("bad.json")), shipped_channels());
    let (ok, out, err) = herald_cli(
        &dir.path,
        &[
            "simulate",
            "--event",
            &event,
            "--rules",
            "/nonexistent/herald-rules",
            "--channels",
            &channels,
        ],
    );
    assert!(
        !ok && err.contains("from"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    t.stop().await;
}

#[tokio::test]
async fn dry_run_decides_without_storing_or_delivering() {
    let dir = TempDir::new("rules-dry-run");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let s = start(&dir).await;
    let mut x = s.ws("x").await;
    let body =
        json!({"event": "ping.me", "channel": "room:lobby", "from": "alice", "data": {"n": 1}});

    let (st, v) = s
        .call(
            "POST",
            "/admin/rules/dry-run",
            Some(body.clone()),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["decision"]["to"], json!(["user:x"]), "{v}");
    assert_eq!(v["trace"]["by"], "10-route.rhai::route", "{v}");
    assert!(v["trace"]["error"].is_null(), "{v}");
    assert_eq!(v["trace"]["files"], json!(["10-route.rhai"]), "{v}");

    for key in [None, Some(API_KEY)] {
        let got = s
            .call("POST", "/admin/rules/dry-run", Some(body.clone()), key)
            .await;
        assert_error(&got, 401, "unauthorized");
    }

    // Nothing was delivered (the marker is the first event on user:x) or stored.
    nothing_more_on(&s, &mut [&mut x], "user:x").await;
    let h = s.history("user:x", 0).await;
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{h}");
    assert_eq!(events[0]["event"], "marker", "{h}");
    let h = s.history("room:lobby", 0).await;
    assert_eq!(h["events"], json!([]), "{h}");
    s.stop().await;
}

async fn start_fails(dir: &TempDir) -> String {
    let mut c = test_config();
    c.rules_dir = dir.path.clone();
    let listener = tokio::net::TcpListener::bind(c.listen).await.unwrap();
    match herald::start(c, ChannelKinds::default(), listener, std::future::pending()).await {
        Ok(server) => {
            server.stop().await.unwrap();
            panic!("the engine started with broken rules");
        }
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn an_engine_with_broken_rules_refuses_to_start() {
    let dir = TempDir::new("rules-start-broken");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    write(
        &dir.path,
        "20-broken.rhai",
        "fn route(e) {\n    let x = ;\n}\n",
    );
    let err = start_fails(&dir).await;
    assert!(err.contains("20-broken.rhai:2:13"), "{err}");

    let dir = TempDir::new("rules-start-fixture");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    write(
        &dir.path,
        "tests/x.toml",
        "[[case]]\nname = \"pings go to zed\"\nevent = { type = \"ping.me\", channel = \"room:lobby\" }\nexpect = { to = [\"user:zed\"] }\n",
    );
    let err = start_fails(&dir).await;
    assert!(err.contains("pings go to zed"), "{err}");
}

// ---- 9. the shipped rules ----

#[tokio::test]
async fn the_shipped_rules_load_and_route_chat_and_typing() {
    let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"));
    assert!(
        shipped.join("10-seeds.rhai").is_file(),
        "rules/10-seeds.rhai is missing"
    );
    let s = TestServer::start_with(|c| c.rules_dir = shipped.to_path_buf()).await;
    let st = rules_status(&s).await;
    assert!(
        st["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "10-seeds.rhai"),
        "{st}"
    );
    assert!(st["last_error"].is_null(), "{st}");
    for u in ["alice", "bob", "carol"] {
        s.join("r1", u).await;
    }
    let mut alice = s.ws("alice").await;
    let mut bob = s.ws("bob").await;
    let mut carol = s.ws("carol").await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        ws.subscribed("room:r1").await;
    }
    for ws in [&mut alice, &mut bob] {
        let r = ws.request(json!({"op": "focus", "room": "r1"})).await;
        assert_eq!(r["ok"], true, "{r}");
    }

    // A chat message from alice reaches bob, not alice.
    let r = alice
        .request(json!({"op": "publish", "channel": "room:r1", "event": "chat.message", "data": {"text": "hi"}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["deliveries"][0]["channel"], "room:r1", "{r}");
    let ev = bob.event_on("room:r1").await;
    assert_eq!(ev["event"], "chat.message", "{ev}");
    assert_eq!(ev["from"], "alice", "{ev}");
    assert_eq!(ev["data"]["text"], "hi", "{ev}");
    assert_eq!(ev["seq"], r["deliveries"][0]["seq"], "{ev}");
    let ev = carol.event_on("room:r1").await;
    assert_eq!(ev["event"], "chat.message", "{ev}");
    // alice does not get her own message back (bob and carol get nothing else either).
    nothing_more_on(&s, &mut [&mut alice, &mut bob, &mut carol], "room:r1").await;

    // Typing (the op, and a client publish naming the room) reaches only `active:r1`, not stored,
    // not echoed to the typist.
    let r = alice.request(json!({"op": "typing", "room": "r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let ev = bob.event_on("active:r1").await;
    assert_eq!(ev["event"], "typing", "{ev}");
    assert!(ev.get("seq").is_none(), "{ev}");
    let r = alice
        .request(json!({"op": "publish", "channel": "room:r1", "event": "typing", "data": {"room": "r1"}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["deliveries"], json!([{"channel": "active:r1"}]), "{r}");
    let ev = bob.event_on("active:r1").await;
    assert_eq!(ev["event"], "typing", "{ev}");
    assert_eq!(ev["from"], "alice", "{ev}");
    nothing_more_on(&s, &mut [&mut bob, &mut carol], "room:r1").await;
    nothing_more_on(&s, &mut [&mut alice], "active:r1").await;
    let h = s.history("room:r1", 0).await;
    let types: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(!types.contains(&"typing"), "{h}");
    s.stop().await;
}

/// Regression: a reload reads every rule file, and those reads must not count as changes (they did:
/// each reload triggered the next, forever). One edit gives exactly one reload.
#[tokio::test]
async fn reading_the_rules_does_not_trigger_reloads() {
    let dir = TempDir::new("rules-quiet");
    write(&dir.path, "10-route.rhai", &ping_to("x"));
    let t = start(&dir).await;
    let v0 = version(&rules_status(&t).await);
    replace(&dir.path, "10-route.rhai", &ping_to("y"));
    let v1 = version(&reloaded(&t, v0).await);
    // Several debounce periods with no change: the version must stay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        version(&rules_status(&t).await),
        v1,
        "reloads without a change"
    );
}

// ---- push text templates and the event fields routes read ----

/// `POST /admin/rules/dry-run` of `body`.
async fn dry_run(s: &TestServer, body: Value) -> Value {
    let (st, v) = s
        .call("POST", "/admin/rules/dry-run", Some(body), Some(ADMIN_KEY))
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

const TEMPLATES: &str = r#"
fn route(e) {
    switch e.type {
        "tpl" => #{ push: #{ when: "always", title_template: "{attrs.name ?? from}",
                             body_template: "{data.text} ({data.n ?? \"-\"})" } },
        "literal" => #{ push: #{ when: "always", title: e.data.text } },
        "both" => #{ push: #{ when: "always", title: "x", title_template: "{from}" } },
        "unclosed" => #{ push: #{ when: "always", body_template: "{data.text" } },
        "unknown" => #{ push: #{ when: "always", body_template: "{data.text ?? sender}" } },
        "no_after" => #{ push: #{ when: "unacked", title_template: "{from}" } },
        _ => ()
    }
}
"#;

#[tokio::test]
async fn push_templates_are_filled_from_the_event_and_user_text_is_never_a_template() {
    let dir = TempDir::new("rules-templates");
    write(&dir.path, "10-tpl.rhai", TEMPLATES);
    let s = start(&dir).await;
    let ev = |t: &str, attrs: Value, text: &str| json!({"event": t, "channel": "room:r1", "from": "alice", "attrs": attrs, "data": {"text": text}});

    let v = dry_run(&s, ev("tpl", json!({"name": "Alice Kim"}), "hi {from}")).await;
    assert_eq!(v["trace"]["by"], "10-tpl.rhai::route", "{v}");
    assert_eq!(v["decision"]["push"]["title"], "Alice Kim", "{v}");
    // A filled-in value is not read again: the user's braces stay as they are.
    assert_eq!(v["decision"]["push"]["body"], "hi {from} (-)", "{v}");
    let v = dry_run(&s, ev("tpl", json!({}), "yo")).await;
    assert_eq!(v["decision"]["push"]["title"], "alice", "{v}");

    // Text a script builds from the payload is literal text, never a template.
    let v = dry_run(
        &s,
        ev("literal", json!({"secret": "s3"}), "{attrs.secret} }{"),
    )
    .await;
    assert_eq!(v["decision"]["push"]["title"], "{attrs.secret} }{", "{v}");

    // Mistakes are rule errors: the channel defaults route the event, and the error says why.
    for (t, why) in [
        ("both", "not both"),
        ("unclosed", "unclosed `{`"),
        ("unknown", "unknown field `sender`"),
        ("no_after", "`push.after` is required"),
    ] {
        let v = dry_run(&s, ev(t, json!({}), "x")).await;
        assert_eq!(v["trace"]["by"], "channel defaults", "{v}");
        let err = v["trace"]["error"].as_str().unwrap_or_default();
        assert!(err.contains("10-tpl.rhai") && err.contains(why), "{t}: {v}");
        assert!(v["decision"]["push"].is_null(), "{v}");
    }
    s.stop().await;
}

const NARROW: &str = r#"
fn route(e) {
    if e.type == "narrow" {
        return #{ push: #{ when: "always", title: e.from + "@" + e.room, body: e.data.text } };
    }
}
"#;

const WIDE: &str = r#"
fn route(event) {
    if event.type == "wide" {
        let keys = "";
        for k in event.keys() { keys += k + " "; }
        return #{ push: #{ when: "always", title: keys, body: event.id } };
    }
}
"#;

#[tokio::test]
async fn routes_see_every_field_they_read_whatever_the_others_read() {
    let dir = TempDir::new("rules-fields");
    write(&dir.path, "10-narrow.rhai", NARROW);
    let s = start(&dir).await;
    let body = |t: &str| json!({"event": t, "channel": "room:r1", "from": "alice", "data": {"text": "hi"}});
    let v = dry_run(&s, body("narrow")).await;
    assert_eq!(v["decision"]["push"]["title"], "alice@r1", "{v}");
    assert_eq!(v["decision"]["push"]["body"], "hi", "{v}");

    // A file that uses the event as a whole (its keys) gets all of it, and the narrow one still
    // reads what it read.
    let before = version(&rules_status(&s).await);
    write(&dir.path, "20-wide.rhai", WIDE);
    reloaded(&s, before).await;
    let v = dry_run(&s, body("wide")).await;
    assert_eq!(
        v["decision"]["push"]["title"], "attrs channel data from id room source to ts type ",
        "{v}"
    );
    assert!(
        !v["decision"]["push"]["body"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{v}"
    );
    let v = dry_run(&s, body("narrow")).await;
    assert_eq!(v["decision"]["push"]["title"], "alice@r1", "{v}");
    s.stop().await;
}

const CLOCK: &str = r#"
fn route(e) {
    if e.type == "clock" {
        return #{ push: #{ when: "always", title: stamp() } };
    }
}
fn stamp() { now_ms().to_string() }
"#;

#[tokio::test]
async fn a_route_that_reads_the_clock_is_evaluated_for_every_publish() {
    // Routes that read only repeating fields have their decisions kept per (type, targets…); one
    // that reads the clock, even through a helper, must not.
    let dir = TempDir::new("rules-clock");
    write(&dir.path, "10-clock.rhai", CLOCK);
    let s = start(&dir).await;
    let st = rules_status(&s).await;
    assert_eq!(st["event_fields"], json!(["type"]), "{st}");
    assert_eq!(st["decision_cache"], false, "{st}");
    let body = json!({"event": "clock", "channel": "room:r1", "from": "alice"});
    let first = dry_run(&s, body.clone()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = dry_run(&s, body).await;
    let (a, b) = (
        &first["decision"]["push"]["title"],
        &second["decision"]["push"]["title"],
    );
    assert!(a.is_string() && b.is_string(), "{first} {second}");
    assert_ne!(a, b, "the second publish got the first one's decision");
    s.stop().await;
}

#[tokio::test]
async fn repeated_decisions_still_fill_each_events_push_text() {
    // The shipped chat route reads only `type` and `room`: its decisions are kept per room and
    // reused, and the push text is filled in for every event from that event alone.
    let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"));
    let s = TestServer::start_with(|c| c.rules_dir = shipped.to_path_buf()).await;
    let st = rules_status(&s).await;
    assert_eq!(st["event_fields"], json!(["room", "type"]), "{st}");
    assert_eq!(st["decision_cache"], true, "{st}");
    let msg = |room: &str, from: &str, attrs: Value, text: &str| {
        json!({"event": "chat.message", "channel": format!("room:{room}"), "from": from,
               "attrs": attrs, "data": {"text": text}})
    };
    for (room, from, attrs, text, title) in [
        (
            "r1",
            "alice",
            json!({"name": "Alice Kim"}),
            "one",
            "Alice Kim",
        ),
        ("r1", "bob", json!({}), "two", "bob"),
        ("r1", "carol", json!({"name": "Carol"}), "three", "Carol"),
        ("r2", "alice", json!({}), "four", "alice"),
    ] {
        let v = dry_run(&s, msg(room, from, attrs, text)).await;
        assert_eq!(v["trace"]["by"], "10-seeds.rhai::route", "{v}");
        assert_eq!(v["decision"]["to"], json!([format!("room:{room}")]), "{v}");
        assert_eq!(v["decision"]["push"]["title"], title, "{v}");
        assert_eq!(v["decision"]["push"]["body"], text, "{v}");
    }
    s.stop().await;
}
