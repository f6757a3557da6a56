//! `herald status` and `herald publish`: the real binary against a running engine, keys from the
//! environment.

use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::common::*;
use crate::redis_server::RedisServer;

/// Runs the binary with a clean environment plus `env`, off the runtime (the engine it talks to runs
/// on this test's runtime).
async fn herald(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let stdin = stdin.map(str::to_string);
    let run = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(BIN);
        c.args(&args)
            .env_clear()
            .envs(env)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("herald runs");
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    });
    tokio::time::timeout(WAIT * 3, run)
        .await
        .expect("herald did not finish")
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn status_shows_health_sessions_rules_and_figures() {
    let s = TestServer::start().await;
    let url = s.url("");
    let _ws = s.ws("watcher").await;
    s.publish(json!({"event": "m", "to": ["watcher"], "data": {}}))
        .await;

    let out = herald(
        &["status", "--url", &url],
        &[("HERALD_ADMIN_KEY", ADMIN_KEY)],
        None,
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(": ready"), "{stdout}");
    assert!(stdout.contains(&*s.server.engine.node), "{stdout}");
    for label in [
        "sessions",
        "published",
        "deliveries",
        "publish",
        "fan-out",
        "rules",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(label)),
            "no {label} line:\n{stdout}"
        );
    }
    assert!(stdout.contains("p99"), "{stdout}");

    let out = herald(
        &["status", "--url", &url, "--json"],
        &[("HERALD_ADMIN_KEY", ADMIN_KEY)],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["node"], &*s.server.engine.node);
    assert!(v["sessions"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["figures"]["published"]["api"].as_f64().unwrap() >= 1.0,
        "{v}"
    );
    assert!(v["figures"]["publish_ms"]["p99"].as_f64().is_some(), "{v}");
    assert!(v["rules"]["version"].is_u64(), "{v}");
}

#[tokio::test]
async fn status_without_the_admin_key_shows_the_public_figures_and_says_what_is_missing() {
    let s = TestServer::start().await;
    let out = herald(&["status", "--url", &s.url("")], &[], None).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains(": ready"), "{stdout}");
    assert!(stdout.contains("HERALD_ADMIN_KEY"), "{stdout}");
}

#[tokio::test]
async fn status_fails_clearly_on_a_wrong_key_or_no_node() {
    let s = TestServer::start().await;
    let out = herald(
        &["status", "--url", &s.url("")],
        &[("HERALD_ADMIN_KEY", "not-the-key-0123456789")],
        None,
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("401") && stderr.contains("HERALD_ADMIN_KEY"),
        "{stderr}"
    );

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = herald(&["status", "--url", &url], &[], None).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&url), "{stderr}");
}

#[tokio::test]
async fn status_exits_1_and_says_not_ready_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let s = TestServer::start_redis(&redis.url, "status-node", |_| {}).await;
    let url = s.url("");
    let key = [("HERALD_ADMIN_KEY", ADMIN_KEY)];
    let out = herald(&["status", "--url", &url], &key, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(redis backend)"),
        "{}",
        text(&out.stdout)
    );

    redis.stop();
    let out = herald(&["status", "--url", &url], &key, None).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "not ready is exit 1: {stdout}");
    assert!(stdout.contains("NOT READY"), "{stdout}");
    assert!(
        stdout.contains("node "),
        "the figures are still shown: {stdout}"
    );
}

#[tokio::test]
async fn publish_sends_an_event_a_subscriber_receives() {
    let s = TestServer::start().await;
    s.join("cli-room", "dana").await;
    let mut ws = s.ws("dana").await;
    ws.subscribed("room:cli-room").await;
    let url = s.url("");
    let out = herald(
        &[
            "publish",
            "--url",
            &url,
            "--room",
            "cli-room",
            "--event",
            "chat.message",
            "--data",
            r#"{"text":"from the shell"}"#,
            "--from",
            "ops",
        ],
        &[("HERALD_API_KEY", API_KEY)],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).expect("the reply is JSON");
    assert_eq!(
        reply["deliveries"][0]["channel"], "room:cli-room",
        "{reply}"
    );
    let ev = ws.event_on("room:cli-room").await;
    assert_eq!(ev["event"], "chat.message");
    assert_eq!(ev["data"]["text"], "from the shell");
    assert_eq!(ev["from"], "ops");
    assert_eq!(ev["seq"], reply["deliveries"][0]["seq"]);

    // Data from standard input, to a user.
    let mut me = s.ws("erin").await;
    let out = herald(
        &[
            "publish", "--url", &url, "--to", "erin", "--event", "note", "--data", "-",
        ],
        &[("HERALD_API_KEY", API_KEY)],
        Some(r#"{"n": 7}"#),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(me.event_on("user:erin").await["data"]["n"], 7);
}

#[tokio::test]
async fn publish_fails_clearly_and_publishes_nothing() {
    let s = TestServer::start().await;
    let url = s.url("");
    let args = [
        "publish", "--url", &url, "--room", "r-none", "--event", "m", "--data", "{}",
    ];
    // No key in the environment.
    let out = herald(&args, &[], None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("HERALD_API_KEY"),
        "{}",
        text(&out.stderr)
    );
    // A wrong key.
    let out = herald(&args, &[("HERALD_API_KEY", "wrong-key-0123456789")], None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("401 unauthorized"),
        "{}",
        text(&out.stderr)
    );
    // Data that is not JSON.
    let bad = [
        "publish", "--url", &url, "--room", "r-none", "--event", "m", "--data", "{oops",
    ];
    let out = herald(&bad, &[("HERALD_API_KEY", API_KEY)], None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not JSON"),
        "{}",
        text(&out.stderr)
    );
    // A channel name the server refuses.
    let chan = [
        "publish",
        "--url",
        &url,
        "--channel",
        "no such:channel",
        "--event",
        "m",
    ];
    let out = herald(&chan, &[("HERALD_API_KEY", API_KEY)], None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("400 bad_channel"),
        "{}",
        text(&out.stderr)
    );
    // No target at all: refused before anything is sent.
    let none = ["publish", "--url", &url, "--event", "m"];
    let out = herald(&none, &[("HERALD_API_KEY", API_KEY)], None).await;
    assert!(!out.status.success());
    // Nothing was stored on the room.
    let h = s.history("room:r-none", 0).await;
    assert_eq!(h["events"].as_array().map(Vec::len), Some(0), "{h}");
}
