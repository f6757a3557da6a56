//! The real `herald` binary: `serve`'s banner and demo token, `herald token`, strict config files
//! (`herald.toml`, `channels.toml`) with errors naming the file, line and key, and SIGTERM draining.

use std::path::Path;
use std::process::Command;

use herald::transport::auth::unix_now;
use serde_json::Value;

use crate::common::*;

/// The `serve` banner: the address and every printed line, up to and including the demo token line.
struct Banner {
    addr: String,
    lines: Vec<String>,
}

impl Banner {
    fn read(p: &Proc) -> Banner {
        let first = p.line();
        let addr = listening_addr(&first);
        let mut lines = vec![first];
        while !lines.last().unwrap().trim_start().starts_with("demo token") {
            assert!(lines.len() < 30, "no demo token line in {lines:#?}");
            lines.push(p.line());
        }
        Banner { addr, lines }
    }

    /// The value after `label` on its line.
    fn value(&self, label: &str) -> String {
        let l = self
            .lines
            .iter()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in {:#?}", self.lines));
        l.trim_start()[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
}

/// Runs a `serve` that must fail; its stderr.
fn serve_fails(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(dir, &args, &[]);
    let status = p.exit(WAIT);
    let err = p.stderr();
    assert!(
        !status.success(),
        "herald should refuse to start; stderr:\n{err}\nstdout:\n{}",
        p.rest_of_stdout()
    );
    err
}

#[tokio::test]
async fn serve_prints_endpoints_and_a_working_demo_token() {
    let dir = TempDir::new("cli-serve");
    let channels = shipped_channels();
    let p = Proc::spawn(
        &dir.path,
        &["serve", "--listen", "127.0.0.1:0", "--channels", &channels],
        &[],
    );
    let b = Banner::read(&p);
    let addr = &b.addr;
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert_eq!(b.value("WebSocket"), format!("ws://{addr}/ws"));
    assert!(
        b.value("SSE").starts_with(&format!("http://{addr}/sse")),
        "{:#?}",
        b.lines
    );
    assert_eq!(b.value("API "), format!("http://{addr}/api/v1"));
    assert_eq!(b.value("admin "), format!("http://{addr}/admin"));
    let token = b.value("demo token");
    let api_key = b.value("API key");
    // The hint after it is a command that can be copied as it is.
    let hint = p.line();
    assert_eq!(
        hint.trim(),
        format!("try: websocat 'ws://{addr}/ws?token={token}'"),
        "{hint}"
    );

    // Then the chat demo: two links to the example page, as demo and as guest.
    let chat: Vec<String> = (0..3).map(|_| p.line()).collect();
    let link = |i: usize| {
        chat[i]
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no link in {chat:#?}"))
            .to_string()
    };
    let page = format!("http://{addr}/client/example/?room=demo");
    assert_eq!(link(0), format!("{page}#token={token}"), "{chat:#?}");
    let guest = link(1)
        .strip_prefix(&format!("{page}#token="))
        .unwrap_or_else(|| panic!("{chat:#?}"))
        .to_string();
    assert!(chat[2].contains("open both"), "{chat:#?}");
    let resp = crate::common::http_client()
        .get(&page)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.unwrap().contains("herald chat"));

    // The demo token works on /ws, and both demo users are members of the room the links name.
    let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={token}")).await;
    let c = ws.next().await;
    assert_eq!(c["type"], "connected", "{c}");
    assert_eq!(c["user"], "demo");
    assert_eq!(
        ws.request(serde_json::json!({"op":"ping"})).await["type"],
        "pong"
    );
    let mut g = Ws::connect(&format!("ws://{addr}/ws?token={guest}")).await;
    assert_eq!(g.next().await["user"], "guest");
    for w in [&mut ws, &mut g] {
        let r = w
            .request(serde_json::json!({"op":"subscribe","channel":"room:demo"}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }

    // The printed API key works on the API (and sees the demo user online).
    let resp = crate::common::http_client()
        .get(format!("http://{addr}/api/v1/presence/online/count"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["count"], 2, "demo and guest: {v}");
}

#[test]
fn token_subcommand_mints_a_jwt_for_the_user() {
    let dir = TempDir::new("cli-token");
    let secret = "cli-test-secret-0123456789";
    let mut p = Proc::spawn(
        &dir.path,
        &["token", "--user", "u1", "--device", "d1", "--ttl", "120"],
        &[("HERALD_JWT_SECRET", secret)],
    );
    let token = p.line();
    assert!(p.exit(WAIT).success(), "{}", p.stderr());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|e| panic!("{token:?} does not verify: {e}"));
    assert_eq!(data.claims["sub"], "u1");
    assert_eq!(data.claims["device"], "d1");
    let exp = data.claims["exp"].as_u64().unwrap();
    let now = unix_now();
    assert!(
        exp > now + 100 && exp <= now + 125,
        "exp {exp} vs now {now}"
    );

    // Without a configured secret it refuses (a random secret would mint useless tokens).
    let mut p = Proc::spawn(&dir.path, &["token", "--user", "u1"], &[]);
    assert!(!p.exit(WAIT).success());
    assert!(p.stderr().contains("HERALD_JWT_SECRET"));
}

#[test]
fn unknown_key_in_herald_toml_names_file_line_and_key() {
    let dir = TempDir::new("cli-unknown");
    std::fs::write(
        dir.join("herald.toml"),
        "listen = \"127.0.0.1:0\"\n\n[auth]\napi_kee = \"x\"\n",
    )
    .unwrap();
    let err = serve_fails(&dir.path, &[]);
    assert!(err.contains("herald.toml"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("api_kee"), "{err}");

    // An explicit --config is named as given.
    std::fs::write(dir.join("other.toml"), "bogus_top = 1\n").unwrap();
    let err = serve_fails(&dir.path, &["--config", "other.toml"]);
    assert!(err.contains("other.toml"), "{err}");
    assert!(err.contains("line 1"), "{err}");
    assert!(err.contains("bogus_top"), "{err}");
}

#[test]
fn bad_duration_in_herald_toml_names_file_line_and_key() {
    let dir = TempDir::new("cli-duration");
    std::fs::write(
        dir.join("herald.toml"),
        "[presence]\nheartbeat = \"5s\"\nttl = \"5 parsecs\"\n",
    )
    .unwrap();
    let err = serve_fails(&dir.path, &[]);
    assert!(err.contains("herald.toml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("ttl"), "{err}");
    assert!(err.contains("5 parsecs"), "{err}");
}

#[test]
fn unknown_key_in_channels_toml_names_file_line_and_key() {
    let dir = TempDir::new("cli-channels");
    let shipped = std::fs::read_to_string(shipped_channels()).unwrap();
    let text = shipped.replacen("[room]\n", "[room]\nsubscrbe = \"any\"\n", 1);
    assert_ne!(text, shipped);
    let line = text
        .lines()
        .position(|l| l.starts_with("subscrbe"))
        .unwrap()
        + 1;
    let path = dir.join("my-channels.toml");
    std::fs::write(&path, text).unwrap();
    let err = serve_fails(&dir.path, &["--channels", path.to_str().unwrap()]);
    assert!(err.contains("my-channels.toml"), "{err}");
    assert!(err.contains(&format!("line {line}")), "line {line}: {err}");
    assert!(err.contains("subscrbe"), "{err}");

    // A named channels file that does not exist is an error too (not a silent default).
    let err = serve_fails(&dir.path, &["--channels", "missing.toml"]);
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test]
async fn sigterm_disconnects_clients_with_1001_and_exits_zero() {
    let dir = TempDir::new("cli-sigterm");
    let channels = shipped_channels();
    let mut p = Proc::spawn(
        &dir.path,
        &["serve", "--listen", "127.0.0.1:0", "--channels", &channels],
        &[],
    );
    let b = Banner::read(&p);
    let token = b.value("demo token");
    let mut ws = Ws::connect(&format!("ws://{}/ws?token={token}", b.addr)).await;
    assert_eq!(ws.next().await["type"], "connected");

    let kill = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let d = ws.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(d["code"], 1001, "{d}");
    assert_eq!(d["reconnect"], true, "{d}");
    let closed = ws.closed().await;
    assert_eq!(closed.close, Some(1001), "{closed:?}");

    let status = p.exit(WAIT);
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        p.stderr()
    );
}

/// A bare `herald` (no subcommand, as a container runs it) reads every `serve` setting from the
/// environment, exactly as `herald serve` does.
#[tokio::test]
async fn a_bare_herald_reads_the_serve_environment() {
    let redis = crate::redis_server::RedisServer::start();
    let dir = TempDir::new("bare-env");
    let rules = dir.join("myrules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("50-mine.rhai"), "fn route(e) { }\n").unwrap();
    std::fs::write(
        dir.join("other.toml"),
        "[limits]\nconnections_per_user = 1\n",
    )
    .unwrap();
    let (rules, config, channels) = (
        rules.display().to_string(),
        dir.join("other.toml").display().to_string(),
        shipped_channels(),
    );
    let env = [
        ("HERALD_LISTEN", "127.0.0.1:0"),
        ("HERALD_NODE_ID", "env-node"),
        ("HERALD_REDIS", redis.url.as_str()),
        ("HERALD_RULES", rules.as_str()),
        ("HERALD_CONFIG", config.as_str()),
        ("HERALD_CHANNELS", channels.as_str()),
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_API_KEY", API_KEY),
        ("HERALD_ADMIN_KEY", ADMIN_KEY),
    ];
    let p = Proc::spawn(&dir.path, &[], &env);
    let first = p.line();
    assert!(first.contains("node env-node"), "{first}");
    assert!(first.contains("Redis backend"), "{first}");
    let addr = listening_addr(&first);
    let http = crate::common::http_client();
    let st: Value = http
        .get(format!("http://{addr}/admin/rules"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["files"], serde_json::json!(["50-mine.rhai"]), "{st}");
    // HERALD_CONFIG's limit: a second connection of one user is refused.
    let token = herald::transport::auth::mint_hs256(SECRET, "u", None, 600).unwrap();
    let mut one = Ws::connect(&format!("ws://{addr}/ws?token={token}")).await;
    assert_eq!(one.next().await["type"], "connected");
    let mut two = Ws::connect(&format!("ws://{addr}/ws?token={token}")).await;
    assert_eq!(two.closed().await.disconnect, Some(4009));
    // And the presence timings: a heartbeat longer than the TTL is refused at start.
    let mut bad = Proc::spawn(
        &dir.path,
        &[],
        &[
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_PRESENCE_TTL", "5"),
            ("HERALD_HEARTBEAT", "10"),
        ],
    );
    assert!(!bad.exit(WAIT).success());
    assert!(bad.stderr().contains("heartbeat (10s)"));
}

/// `herald token --attr KEY=VALUE --platform P` puts them in the token, and a real client using it
/// is what the rules and announcement audiences see: an announcement for `plan: pro` reaches the
/// token minted with `--attr plan=pro` and not one without.
#[tokio::test]
async fn token_attrs_reach_the_rules_through_a_real_client() {
    let t = TestServer::start().await;
    let (s, v) = t
        .api(
            "POST",
            "/api/v1/announcements",
            Some(serde_json::json!({"title": "Pro feature", "body": "new", "audience": {"plan": "pro"}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let dir = TempDir::new("cli-token-attrs");
    let mint = |extra: &[&str]| {
        let mut args = vec!["token", "--user"];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(&dir.path, &args, &[("HERALD_JWT_SECRET", SECRET)]);
        let token = p.line();
        assert!(p.exit(WAIT).success(), "{}", p.stderr());
        token.trim().to_string()
    };
    let pro = mint(&[
        "ann",
        "--attr",
        "plan=pro",
        "--attr",
        "beta=true",
        "--platform",
        "ios",
    ]);
    let free = mint(&["bea", "--attr", "plan=free"]);
    let ws = t.ws_token(&pro).await;
    let got = &ws.connected["sync"]["announcements"];
    assert_eq!(got.as_array().map(Vec::len), Some(1), "{got}");
    assert_eq!(got[0]["data"]["title"], "Pro feature");
    let ws = t.ws_token(&free).await;
    assert_eq!(ws.connected["sync"]["announcements"], serde_json::json!([]));
    // The platform claim reaches presence.
    let (_, p) = t.api("GET", "/api/v1/presence/ann", None).await;
    assert_eq!(p["devices"][0]["platform"], "ios", "{p}");
    // A malformed attr is a clear error.
    let mut p = Proc::spawn(
        &dir.path,
        &["token", "--user", "x", "--attr", "plan"],
        &[("HERALD_JWT_SECRET", SECRET)],
    );
    assert!(!p.exit(WAIT).success());
    assert!(p.stderr().contains("expected KEY=VALUE"));
}

/// The serve variables are read for a bare `herald` only: one that does not parse stops the server
/// with an error, and leaves the other subcommands alone.
#[test]
fn a_bad_serve_variable_does_not_stop_the_other_subcommands() {
    let dir = TempDir::new("cli-bad-serve-env");
    let bad = [
        ("HERALD_HEARTBEAT", "20s"),
        ("HERALD_PRESENCE_TTL", "1m"),
        ("HERALD_JWT_SECRET", SECRET),
    ];
    let mut p = Proc::spawn(&dir.path, &["token", "--user", "u1"], &bad);
    let token = p.line();
    assert!(p.exit(WAIT).success(), "{}", p.stderr());
    assert_eq!(token.split('.').count(), 3, "{token}");
    let rules = format!("{}/rules", env!("CARGO_MANIFEST_DIR"));
    let channels = shipped_channels();
    let mut p = Proc::spawn(
        &dir.path,
        &["rules", "test", &rules, "--channels", &channels],
        &bad,
    );
    assert!(p.exit(WAIT).success(), "{}", p.stderr());

    // herald and herald serve still refuse them, naming the flag each stands for.
    for args in [&[][..], &["serve"]] {
        let mut p = Proc::spawn(&dir.path, args, &bad);
        assert!(!p.exit(WAIT).success(), "{args:?}");
        let err = p.stderr();
        assert!(
            err.contains("'20s'") && err.contains("--heartbeat")
                || err.contains("'1m'") && err.contains("--presence-ttl"),
            "{args:?}: {err}"
        );
    }
    // Help still shows the environment names.
    let mut p = Proc::spawn(&dir.path, &["--help"], &[]);
    assert!(p.exit(WAIT).success());
    let help = p.rest_of_stdout();
    assert!(help.contains("HERALD_REDIS"), "{help}");
}

/// `herald token` refuses to mint what the engine would refuse at connect, and says why.
#[test]
fn token_refuses_what_the_engine_would_refuse() {
    let dir = TempDir::new("cli-token-refuses");
    let pem = dir.join("jwt.pem");
    std::fs::write(&pem, &crate::auth::ec_keys().public_pem).unwrap();
    let pem = pem.display().to_string();
    let secret = [("HERALD_JWT_SECRET", SECRET)];
    let public_key = [
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_JWT_PUBLIC_KEY", pem.as_str()),
    ];
    for (args, env, says) in [
        (&["--user", "has space"][..], &secret[..], "user id"),
        (
            &["--user", "u1", "--device", "my phone"],
            &secret,
            "device id",
        ),
        (
            &["--user", "u1", "--attr", "plan=pro", "--attr", "plan=free"],
            &secret,
            "--attr plan is given more than once",
        ),
        // A leftover secret beside a public key: the engine accepts only ES256 tokens.
        (&["--user", "u1"], &public_key, "ES256"),
    ] {
        let mut all = vec!["token"];
        all.extend_from_slice(args);
        let mut p = Proc::spawn(&dir.path, &all, env);
        let status = p.exit(WAIT);
        let (out, err) = (p.rest_of_stdout(), p.stderr());
        assert!(!status.success(), "{args:?} minted {out}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A coalescing mode or window that is not one: `serve` refuses to start and says what it takes.
#[test]
fn a_coalescing_setting_must_be_a_mode_and_a_window_in_range() {
    let dir = TempDir::new("cli-coalesce");
    for (name, value, says) in [
        (
            "HERALD_COALESCE",
            "sometimes",
            "HERALD_COALESCE: auto, on or off",
        ),
        ("HERALD_COALESCE_WINDOW", "0ms", "between 1ms and 1s"),
        ("HERALD_COALESCE_WINDOW", "2s", "between 1ms and 1s"),
        (
            "HERALD_COALESCE_WINDOW",
            "fast",
            "HERALD_COALESCE_WINDOW: bad duration",
        ),
    ] {
        let args = ["serve", "--listen", "127.0.0.1:0"];
        let mut p = Proc::spawn(&dir.path, &args, &[(name, value)]);
        assert!(!p.exit(WAIT).success(), "{name}={value} was taken");
        let err = p.stderr();
        assert!(err.contains(says), "{name}={value}: {err}");
    }
}

/// A true/false setting in the environment that is neither: `serve` refuses to start and names it.
#[test]
fn a_flag_in_the_environment_must_be_true_or_false() {
    let dir = TempDir::new("cli-env-flag");
    for name in [
        "HERALD_TCP_NODELAY",
        "HERALD_DIRECT_WRITES",
        "HERALD_IO_URING",
        "HERALD_PUSH_WEBPUSH_ALLOW_LOOPBACK",
    ] {
        let args = ["serve", "--listen", "127.0.0.1:0"];
        let mut p = Proc::spawn(&dir.path, &args, &[(name, "yes")]);
        assert!(!p.exit(WAIT).success(), "{name}=yes was taken");
        let err = p.stderr();
        assert!(err.contains(&format!("{name}: true or false")), "{err}");
    }
}
