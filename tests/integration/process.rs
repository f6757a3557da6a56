//! The `herald` process itself: shutting down on a signal whatever its log sink does, no secret in
//! any log line at any level, the open-file limit it runs with.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn env() -> [(&'static str, &'static str); 3] {
    [
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_API_KEY", API_KEY),
        ("HERALD_ADMIN_KEY", ADMIN_KEY),
    ]
}

/// `herald 2>&1 | tee log`, then Ctrl-C: the pipe's reader is gone before herald logs its shutdown.
/// Sessions still get 1001 and the process ends within its grace period.
#[tokio::test]
async fn ctrl_c_shuts_down_when_stdout_and_stderr_are_closed_pipes() {
    let dir = TempDir::new("closed-pipes");
    let channels = shipped_channels();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--channels", &channels])
        .current_dir(&dir.path)
        .env_clear()
        .envs(env())
        .env("HERALD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("herald starts");
    let first = {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line
        // The reader of stdout goes here, with the banner half read.
    };
    drop(child.stderr.take());
    let addr = listening_addr(&first);
    let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={}", user_token("alice"))).await;
    assert_eq!(ws.next().await["type"], "connected");
    // Something to log on both closed pipes before the signal.
    let r = ws.request(json!({"op": "ping"})).await;
    assert_eq!(r["type"], "pong");
    signal(child.id(), "-INT");
    let closed = ws.closed().await;
    assert_eq!(closed.disconnect, Some(1001), "{closed:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald did not exit after SIGINT with its stderr closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// At `HERALD_LOG=trace`, with every kind of credential in use (a JWT in the query, in a `connect`
/// frame and in an SSE URL, the API key, the admin key), none reaches the log.
#[tokio::test]
async fn no_secret_reaches_the_log_at_trace_level() {
    // Proc sets HERALD_LOG=info itself; the one given here comes later and wins.
    let mut node = HeraldProcess::memory(&[("HERALD_LOG", "trace")]);
    let (p, addr) = (&mut node.proc, node.addr.clone());
    let (in_query, in_frame, in_sse) =
        (user_token("alice"), user_token("bob"), user_token("carol"));
    let mut a = Ws::connect(&format!("ws://{addr}/ws?token={in_query}")).await;
    assert_eq!(a.next().await["type"], "connected");
    let mut b = Ws::connect(&format!("ws://{addr}/ws")).await;
    b.send(json!({"op": "connect", "token": in_frame, "ref": 1}))
        .await;
    assert_eq!(b.next().await["type"], "connected");
    let http = crate::common::http_client();
    let r = http
        .post(format!("http://{addr}/api/v1/events"))
        .bearer_auth(API_KEY)
        .json(&json!({"event":"n","to":["alice"],"data":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("http://{addr}/admin/rules"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sse = Sse::open(
        &format!("http://{addr}/sse?channels=user:carol&token={in_sse}"),
        None,
    )
    .await;
    drop(sse);
    a.close_client().await;
    b.close_client().await;
    signal(p.pid(), "-TERM");
    assert!(p.exit(Duration::from_secs(15)).success());
    let log = p.stderr();
    assert!(
        log.contains("TRACE"),
        "the log is at trace level, or this test proves nothing"
    );
    for (what, secret) in [
        ("a JWT from the query", in_query.as_str()),
        ("a JWT from a connect frame", in_frame.as_str()),
        ("a JWT from an SSE URL", in_sse.as_str()),
        ("the API key", API_KEY),
        ("the admin key", ADMIN_KEY),
        ("the JWT secret", SECRET),
    ] {
        // A token's signature alone is enough to be a leak.
        let tail = &secret[secret.len().saturating_sub(20)..];
        assert!(!log.contains(tail), "{what} is in the log");
    }
    // The limit each connection counts against is in the log, with its figure.
    assert!(
        log.lines()
            .any(|l| l.to_lowercase().contains("open file limit") && l.contains("limit=")),
        "no open file limit line"
    );
}

/// herald needs Redis to keep its keys (`noeviction`): a Redis that may evict them gets a warning
/// naming its policy, and one that will not say (its `CONFIG` renamed away, as managed services do)
/// gets a warning that the check could not be made.
#[tokio::test]
async fn a_redis_that_may_evict_herald_keys_is_warned_about() {
    let cases = [
        (vec!["--maxmemory-policy", "allkeys-lru"], "allkeys-lru"),
        (
            vec!["--rename-command", "CONFIG", ""],
            "Could not check Redis maxmemory-policy",
        ),
    ];
    for (args, expected) in cases {
        let redis = crate::redis_server::RedisServer::start_with(&args);
        let log = start_and_stop_on(&redis);
        let warning = log
            .lines()
            .find(|l| l.contains("maxmemory-policy"))
            .unwrap_or_else(|| panic!("no maxmemory-policy warning for {args:?}:\n{log}"));
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains(expected), "{warning}");
    }
    // A Redis as herald wants it: no warning.
    let log = start_and_stop_on(&crate::redis_server::RedisServer::start());
    assert!(!log.contains("maxmemory-policy"), "{log}");
}

/// Starts `herald serve` on `redis`, stops it with SIGTERM; what it logged.
fn start_and_stop_on(redis: &crate::redis_server::RedisServer) -> String {
    let mut h = HeraldProcess::spawn(&redis.url, &[]);
    signal(h.proc.pid(), "-TERM");
    assert!(h.proc.exit(Duration::from_secs(15)).success());
    h.proc.stderr()
}

/// The filter is the operator's: hiding the WebSocket library's frame traces must not switch its
/// debug lines on at `HERALD_LOG=warn`.
#[tokio::test]
async fn a_quiet_log_level_stays_quiet() {
    let mut node = HeraldProcess::memory(&[("HERALD_LOG", "warn")]);
    let (p, addr) = (&mut node.proc, node.addr.clone());
    for user in ["alice", "bob"] {
        let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={}", user_token(user))).await;
        assert_eq!(ws.next().await["type"], "connected");
        ws.close_client().await;
    }
    signal(p.pid(), "-TERM");
    assert!(p.exit(Duration::from_secs(15)).success());
    let log = p.stderr();
    assert!(
        !log.contains("DEBUG") && !log.contains("INFO") && !log.contains("tungstenite"),
        "{log}"
    );
}
