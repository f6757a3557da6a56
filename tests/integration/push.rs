//! Push carried out end to end: rules' `push` and `devices` decisions, devices registered through the
//! API, live sessions on the wire, jobs arriving at a real local webhook receiver (and, in
//! `push_providers`, at fakes of Google's, Apple's and the browsers' services).

use std::time::Duration;

use herald::config::Config;
use serde_json::{Value, json};

use herald::transport::auth::Claims;

use crate::common::{ADMIN_KEY, HeraldProcess, TempDir, TestServer, assert_error, claims};
use crate::fakes::Failure;
use crate::fakes::webhook::FakeWebhook;
use crate::redis_server::RedisServer;

/// Long enough for any push that should come (the loop ticks every 100 ms).
const ARRIVE: Duration = Duration::from_secs(5);
/// How long "no push" is watched for.
const QUIET: Duration = Duration::from_millis(1500);

/// Rules: one event type per `push.when` (and per device policy), all to `room:{room}`.
const RULES: &str = r##"
fn route(e) {
    let room = e.room;
    if room == () { return; }
    switch e.type {
        "p.offline" => #{ to: "room:" + room, push: #{ when: "offline", title: "T", body: "offline body" } },
        "p.background" => #{ to: "room:" + room, push: #{ when: "background", title: "T" } },
        "p.unacked" => #{ to: "room:" + room, push: #{ when: "unacked", after: "1s", title: "T" } },
        "p.always" => #{ to: "room:" + room, push: #{ when: "always", title: "T" } },
        "p.never" => #{ to: "room:" + room, push: #{ when: "never" } },
        "p.fg" => #{ to: "room:" + room, devices: "foreground", push: #{ when: "background", title: "T" } },
        "p.mobile" => #{ to: "room:" + room, devices: "mobile", push: #{ when: "never" } },
        "p.web" => #{ to: "room:" + room, devices: "web", push: #{ when: "never" } },
        "p.latest" => #{ to: "room:" + room, devices: "latest", push: #{ when: "never" } },
        _ => ()
    }
}
"##;

/// An engine with the push rules, the webhook provider pointing at `hook`, and `f` applied.
pub async fn start(hook: &FakeWebhook, dir: &TempDir, f: impl FnOnce(&mut Config)) -> TestServer {
    std::fs::write(dir.join("push.rhai"), RULES).unwrap();
    let path = dir.path.clone();
    let hook = hook.config();
    TestServer::start_with(move |c| {
        c.rules_dir = path;
        c.push.webhook = Some(hook);
        c.push.reclaim_after = Some(Duration::from_millis(500));
        // Bursts are merged only where a test says so (a second push would wait for the summary).
        c.push.burst_window = Some(Duration::ZERO);
        f(c);
    })
    .await
}

/// Registers a webhook device `device` for `user`.
pub async fn webhook_device(t: &TestServer, user: &str, device: &str, platform: Option<&str>) {
    let mut body = json!({"provider": "webhook", "token": format!("tok-{device}")});
    if let Some(p) = platform {
        body["platform"] = p.into();
    }
    let (s, v) = t
        .api(
            "PUT",
            &format!("/api/v1/users/{user}/devices/{device}"),
            Some(body),
        )
        .await;
    assert_eq!(s, 200, "register {user}/{device}: {v}");
}

/// A receiver, and an engine sending to it with room `r1` set up as [`room_with_bob`] does (`tag`
/// names the rules directory, kept while the test runs).
async fn bob_in_r1(tag: &str) -> (FakeWebhook, TestServer, TempDir) {
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new(tag);
    let t = start(&hook, &dir, |_| {}).await;
    room_with_bob(&t).await;
    (hook, t, dir)
}

/// A room `r1` with `alice` (the sender) and `bob`, bob with push device `phone`.
async fn room_with_bob(t: &TestServer) {
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    webhook_device(t, "bob", "phone", Some("ios")).await;
}

async fn send(t: &TestServer, event: &str) -> Value {
    t.publish(json!({"event": event, "room": "r1", "from": "alice", "data": {"text": "hi"}}))
        .await
}

/// A WebSocket for `user` as device `device` (platform `platform`), subscribed to `room:r1`.
async fn device_ws(t: &TestServer, user: &str, device: &str, platform: &str) -> crate::common::Ws {
    let c = Claims {
        device: Some(device.into()),
        platform: Some(platform.into()),
        ..claims(user)
    };
    let mut ws = t.ws_token(&t.token_with(c)).await;
    let r = ws
        .request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    assert_eq!(r["ok"], true, "subscribe: {r}");
    ws
}

/// Seed 000's bob: his phone connected in the background, his laptop in the foreground.
async fn phone_behind_laptop(t: &TestServer) -> (crate::common::Ws, crate::common::Ws) {
    let mut phone = device_ws(t, "bob", "phone", "ios").await;
    set_state(&mut phone, "background").await;
    let mut laptop = device_ws(t, "bob", "laptop", "web").await;
    set_state(&mut laptop, "foreground").await;
    (phone, laptop)
}

/// Sets a session's app state.
async fn set_state(ws: &mut crate::common::Ws, state: &str) {
    let r = ws.request(json!({"op":"state","state":state})).await;
    assert_eq!(r["ok"], true, "state {state}: {r}");
}

#[tokio::test]
async fn push_offline_user_gets_exactly_one_push_with_room_and_seq() {
    let (hook, t, _dir) = bob_in_r1("push-offline").await;

    let reply = send(&t, "p.offline").await;
    assert_eq!(reply["push"]["planned"], 1, "{reply}");
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "one push: {got:?}");
    let job = &got[0];
    assert_eq!(job["user"], "bob");
    assert_eq!(job["device"], "phone");
    assert_eq!(job["room"], "r1");
    assert_eq!(job["seq"], seq);
    assert_eq!(job["reason"], "offline");
    assert_eq!(job["title"], "T");
    assert_eq!(job["body"], "offline body");
    assert_eq!(job["collapse"], "room:r1");
    assert_eq!(job["token"], "tok-phone");
    let metrics = t.metrics_text().await;
    assert!(
        metrics.contains("herald_push_sent_total{provider=\"webhook\"}"),
        "{metrics}"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(hook.received().len(), 1, "no second push");
    assert_eq!(hook.rejected(), 0, "every request was signed");
}

#[tokio::test]
async fn push_online_user_gets_no_offline_push_and_never_means_never() {
    let (hook, t, _dir) = bob_in_r1("push-online").await;
    let mut bob = device_ws(&t, "bob", "laptop", "web").await;

    send(&t, "p.offline").await;
    bob.event_on("room:r1").await;
    let reply = send(&t, "p.never").await;
    assert_eq!(reply["push"]["planned"], 0, "{reply}");
    tokio::time::sleep(QUIET).await;
    assert!(hook.received().is_empty(), "{:?}", hook.received());
}

#[tokio::test]
async fn push_unacked_fires_after_the_delay_unless_any_device_acks() {
    let (hook, t, _dir) = bob_in_r1("push-unacked").await;
    let mut laptop = device_ws(&t, "bob", "laptop", "web").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;

    // Not acked: pushed, but not before `after` (1 s).
    let started = std::time::Instant::now();
    let reply = send(&t, "p.unacked").await;
    assert_eq!(reply["push"]["planned"], 1, "{reply}");
    laptop.event_on("room:r1").await;
    phone.event_on("room:r1").await;
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "pushed after {:?}, before `after`",
        started.elapsed()
    );
    assert_eq!(got[0]["reason"], "unacked");

    // Acked on the laptop: no push to any device.
    let reply = send(&t, "p.unacked").await;
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    let e = laptop.event_on("room:r1").await;
    assert_eq!(e["seq"], seq);
    let r = laptop
        .request(json!({"op":"ack","channel":"room:r1","seq":seq}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(hook.received().len(), 1, "the ack cancelled the fallback");
}

/// An ack of a seq the session never got (ahead of the channel) silences nothing.
#[tokio::test]
async fn push_an_ack_ahead_of_the_channel_does_not_cancel_later_fallbacks() {
    let (hook, t, _dir) = bob_in_r1("push-ack-ahead").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;
    let r = phone
        .request(json!({"op":"ack","channel":"room:r1","seq":1_000_000}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    send(&t, "p.unacked").await;
    phone.event_on("room:r1").await;
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "the fallback still fires: {got:?}");
}

#[tokio::test]
async fn push_unacked_when_the_socket_drops_before_the_ack() {
    let (hook, t, _dir) = bob_in_r1("push-drop").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;
    send(&t, "p.unacked").await;
    phone.event_on("room:r1").await;
    drop(phone);
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["device"], "phone");
}

#[tokio::test]
async fn push_background_devices_get_a_push_foreground_ones_do_not() {
    let (hook, t, _dir) = bob_in_r1("push-bg").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;
    set_state(&mut phone, "background").await;

    // Only a background device: pushed.
    send(&t, "p.background").await;
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["reason"], "background");

    // A foreground laptop too: no push.
    let mut laptop = device_ws(&t, "bob", "laptop", "web").await;
    set_state(&mut laptop, "foreground").await;
    send(&t, "p.background").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(hook.received().len(), 1, "{:?}", hook.received());
}

/// Seed 000: phone in background, laptop in foreground: a `foreground` event reaches the laptop live
/// and the phone by push (and the phone has it in history).
#[tokio::test]
async fn push_foreground_policy_goes_live_to_the_laptop_and_by_push_to_the_phone() {
    let (hook, t, _dir) = bob_in_r1("push-fg").await;
    let (mut phone, mut laptop) = phone_behind_laptop(&t).await;

    let reply = send(&t, "p.fg").await;
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    assert_eq!(laptop.event_on("room:r1").await["seq"], seq);
    phone
        .assert_none(Duration::from_millis(500), |f| f["type"] == "event")
        .await;
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["device"], "phone");
    assert_eq!(got[0]["seq"], seq);
    let h = t.history("room:r1", 0).await;
    assert_eq!(h["events"].as_array().unwrap().len(), 1, "{h}");
}

/// `mobile`, `web` and `latest` filter live delivery: the phone, the laptop, the newest session.
#[tokio::test]
async fn push_device_policies_filter_live_delivery() {
    let (hook, t, _dir) = bob_in_r1("push-policies").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;
    let mut laptop = device_ws(&t, "bob", "laptop", "web").await;
    let is_event = |f: &Value| f["type"] == "event";

    send(&t, "p.mobile").await;
    assert_eq!(phone.event_on("room:r1").await["event"], "p.mobile");
    laptop
        .assert_none(Duration::from_millis(400), is_event)
        .await;

    send(&t, "p.web").await;
    assert_eq!(laptop.event_on("room:r1").await["event"], "p.web");
    phone
        .assert_none(Duration::from_millis(400), is_event)
        .await;

    // The laptop connected last: the latest session.
    send(&t, "p.latest").await;
    assert_eq!(laptop.event_on("room:r1").await["event"], "p.latest");
    phone
        .assert_none(Duration::from_millis(400), is_event)
        .await;
    assert!(
        hook.received().is_empty(),
        "push: never: {:?}",
        hook.received()
    );
}

#[tokio::test]
async fn push_none_while_the_user_has_the_room_open() {
    let (hook, t, _dir) = bob_in_r1("push-focus").await;
    let mut phone = device_ws(&t, "bob", "phone", "ios").await;
    set_state(&mut phone, "background").await;
    let r = phone.request(json!({"op":"focus","room":"r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    send(&t, "p.always").await;
    tokio::time::sleep(QUIET).await;
    assert!(hook.received().is_empty(), "{:?}", hook.received());
}

#[tokio::test]
async fn push_a_burst_is_one_push_then_one_summary() {
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new("push-burst");
    let t = start(&hook, &dir, |c| {
        c.push.burst_window = Some(Duration::from_secs(1));
    })
    .await;
    room_with_bob(&t).await;
    for _ in 0..10 {
        send(&t, "p.offline").await;
    }
    let got = hook.wait_for(2, ARRIVE).await;
    tokio::time::sleep(QUIET).await;
    let got_all = hook.received();
    assert_eq!(got_all.len(), 2, "first + summary: {got_all:?}");
    assert_eq!(got[0]["count"], 1, "the first is not delayed");
    assert_eq!(got[1]["count"], 9, "{:?}", got[1]);
    assert!(
        got[1]["body"].as_str().unwrap_or("").contains("9"),
        "{:?}",
        got[1]
    );
    assert_eq!(got[1]["room"], "r1");
}

#[tokio::test]
async fn push_retry_after_is_honoured_and_a_gone_device_is_removed() {
    let (hook, t, _dir) = bob_in_r1("push-retry").await;

    hook.fail_next(Failure {
        status: 503,
        retry_after: Some(1),
    });
    let started = std::time::Instant::now();
    send(&t, "p.offline").await;
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "retried after the 503: {got:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After honoured"
    );

    hook.fail_next(Failure {
        status: 410,
        retry_after: None,
    });
    send(&t, "p.always").await;
    let v = t
        .api_until("/api/v1/users/bob/devices", |v| {
            v["devices"].as_array().is_some_and(|d| d.is_empty())
        })
        .await;
    assert_eq!(v["devices"], json!([]));
}

#[tokio::test]
async fn push_a_permanent_failure_is_dead_lettered() {
    let (hook, t, _dir) = bob_in_r1("push-dead").await;
    hook.fail_next(Failure {
        status: 400,
        retry_after: None,
    });
    send(&t, "p.offline").await;
    let v = t
        .api_until("/api/v1/push/dead", |v| {
            v["dead"].as_array().is_some_and(|d| !d.is_empty())
        })
        .await;
    let d = &v["dead"][0];
    assert_eq!(d["job"]["user"], "bob", "{v}");
    assert!(d["reason"].as_str().unwrap().contains("400"), "{v}");
    assert!(
        d["job"].get("token").is_none(),
        "no token in dead letters: {v}"
    );
    // The admin page's push panel lists it too (without the token); the metrics count it.
    let (s, admin) = t.call("GET", "/admin/push", None, Some(ADMIN_KEY)).await;
    assert_eq!(s, 200, "{admin}");
    assert_eq!(admin["outbox"]["dead"], 1, "{admin}");
    assert_eq!(admin["dead"][0]["job"]["user"], "bob", "{admin}");
    assert!(
        admin["dead"][0]["reason"].as_str().unwrap().contains("400"),
        "{admin}"
    );
    assert!(
        !admin.to_string().contains("tok-phone"),
        "no token: {admin}"
    );
    let metrics = t.metrics_text().await;
    // The recorder is per process (other tests count too): present, not an exact figure.
    assert!(
        metrics.contains(
            r#"herald_push_failed_total{provider="webhook",reason="400",then="dead_letter"}"#
        ),
        "{metrics}"
    );
    tokio::time::sleep(QUIET).await;
    assert!(
        hook.received().is_empty(),
        "not retried: {:?}",
        hook.received()
    );
}

#[tokio::test]
async fn push_dry_run_shows_live_and_push_per_recipient() {
    let (hook, t, _dir) = bob_in_r1("push-dry").await;
    let (_phone, _laptop) = phone_behind_laptop(&t).await;
    let (s, v) = t
        .call(
            "POST",
            "/admin/rules/dry-run",
            Some(json!({"event":"p.fg","room":"r1","from":"alice","data":{}})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let push = &v["push"][0];
    assert_eq!(push["channel"], "room:r1", "{v}");
    let bob = push["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == "bob")
        .unwrap_or_else(|| panic!("bob in {v}"));
    let dev = |id: &str| {
        bob["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} in {bob}"))
    };
    assert_eq!(dev("laptop")["live"], true, "{bob}");
    assert_eq!(dev("phone")["live"], false, "{bob}");
    assert_eq!(dev("phone")["push"], "background", "{bob}");
    assert!(dev("phone")["why"].is_string(), "{bob}");
    assert!(hook.received().is_empty(), "a dry run sends nothing");
}

#[tokio::test]
async fn push_registration_is_validated() {
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new("push-reg");
    let t = start(&hook, &dir, |_| {}).await;
    let put = |body: Value| {
        let t = &t;
        async move {
            t.api("PUT", "/api/v1/users/u1/devices/d1", Some(body))
                .await
        }
    };
    let got = put(json!({"provider":"fcm","token":"abc"})).await;
    assert_error(&got, 400, "bad_frame");
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("provider: fcm"), "{msg}");
    let got = put(json!({"provider":"pigeon","token":"abc"})).await;
    assert_error(&got, 400, "bad_frame");
    assert_eq!(put(json!({"provider":"webhook"})).await.0, 200);
}

// ---------------------------------------------------------------------------------------------
// Across nodes (Redis): acks, focus and the outbox are shared; a node that dies loses nothing.
// ---------------------------------------------------------------------------------------------

/// Two nodes on one Redis, both sending to `hook`.
async fn two_nodes(
    hook: &FakeWebhook,
    dir: &TempDir,
    redis: &RedisServer,
) -> (TestServer, TestServer) {
    std::fs::write(dir.join("push.rhai"), RULES).unwrap();
    let node = |name: &'static str| {
        let path = dir.path.clone();
        let hook = hook.config();
        TestServer::start_redis(&redis.url, name, move |c| {
            c.rules_dir = path;
            c.push.webhook = Some(hook);
            c.push.reclaim_after = Some(Duration::from_millis(500));
            c.push.burst_window = Some(Duration::ZERO);
        })
    };
    (node("push-a").await, node("push-b").await)
}

#[tokio::test]
async fn push_an_ack_on_another_node_cancels_the_fallback() {
    let redis = RedisServer::start();
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new("push-x-ack");
    let (a, b) = two_nodes(&hook, &dir, &redis).await;
    room_with_bob(&a).await;
    webhook_device(&a, "bob", "laptop", Some("web")).await;
    // The phone on node B, the laptop on node A (where the fallback timer is planned).
    let mut phone = device_ws(&b, "bob", "phone", "ios").await;
    let mut laptop = device_ws(&a, "bob", "laptop", "web").await;

    let reply = send(&a, "p.unacked").await;
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    phone.event_on("room:r1").await;
    laptop.event_on("room:r1").await;
    let r = phone
        .request(json!({"op":"ack","channel":"room:r1","seq":seq}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        hook.received().is_empty(),
        "the phone's ack cancelled the laptop's fallback too: {:?}",
        hook.received()
    );

    // Not acked anywhere: one push per registered device, once (not once per node).
    send(&a, "p.unacked").await;
    let got = hook.wait_for(2, ARRIVE).await;
    tokio::time::sleep(QUIET).await;
    let mut devices: Vec<String> = hook
        .received()
        .iter()
        .map(|j| j["device"].as_str().unwrap().to_string())
        .collect();
    devices.sort();
    assert_eq!(devices, ["laptop", "phone"], "{got:?}");
}

#[tokio::test]
async fn push_none_while_the_user_has_the_room_open_on_another_node() {
    let redis = RedisServer::start();
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new("push-x-focus");
    let (a, b) = two_nodes(&hook, &dir, &redis).await;
    room_with_bob(&a).await;
    let mut phone = device_ws(&b, "bob", "phone", "ios").await;
    let r = phone.request(json!({"op":"focus","room":"r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    send(&a, "p.always").await;
    tokio::time::sleep(QUIET).await;
    assert!(hook.received().is_empty(), "{:?}", hook.received());
}

/// A node killed after planning an `unacked` push, and a node killed while sending one: the push
/// still goes out, once, from the node that is left.
#[tokio::test]
async fn push_survives_a_node_killed_mid_way() {
    let redis = RedisServer::start();
    let hook = FakeWebhook::start().await;
    let dir = TempDir::new("push-x-kill");
    std::fs::write(dir.join("push.rhai"), RULES).unwrap();
    let rules = dir.path.to_str().unwrap().to_string();
    let cfg = hook.config();
    let (url, secret) = (cfg.url.unwrap(), cfg.secret.unwrap());
    let env = [
        ("HERALD_PUSH_WEBHOOK_URL", url.as_str()),
        ("HERALD_PUSH_WEBHOOK_SECRET", secret.as_str()),
        ("HERALD_PUSH_RECLAIM_AFTER", "500ms"),
        ("HERALD_PUSH_BURST_WINDOW", "0s"),
    ];
    let spawn = || HeraldProcess::spawn_with_env(&redis.url, &["--rules", &rules], &env);
    let api = |addr: &str, path: &str| format!("http://{addr}{path}");
    let http = crate::common::http_client();
    let post = |addr: String, path: &'static str, body: Value| {
        let http = http.clone();
        async move {
            let r = http
                .request(
                    if body.is_null() {
                        reqwest::Method::PUT
                    } else {
                        reqwest::Method::POST
                    },
                    api(&addr, path),
                )
                .bearer_auth(crate::common::API_KEY);
            let r = if body.is_null() { r } else { r.json(&body) };
            let r = r.send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.json::<Value>().await.unwrap_or(Value::Null)
        }
    };

    // 1. Planned (a timer due in 1 s), then the node dies before it is due.
    let doomed = spawn();
    for (path, body) in [
        ("/api/v1/rooms/r1/members/alice", Value::Null),
        ("/api/v1/rooms/r1/members/bob", Value::Null),
        (
            "/api/v1/users/bob/devices/phone",
            json!({"provider":"webhook","token":"t"}),
        ),
    ] {
        let r = http
            .put(api(&doomed.addr, path))
            .bearer_auth(crate::common::API_KEY);
        let r = if body.is_null() { r } else { r.json(&body) };
        assert!(r.send().await.unwrap().status().is_success(), "{path}");
    }
    let reply = post(
        doomed.addr.clone(),
        "/api/v1/events",
        json!({"event":"p.unacked","room":"r1","from":"alice","data":{}}),
    )
    .await;
    assert_eq!(reply["push"]["planned"], 1, "{reply}");
    doomed.kill9();
    let survivor = spawn();
    let got = hook.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "the surviving node fired the timer: {got:?}");

    // 2. Claimed and in flight (the receiver hangs), then the node dies: taken over and sent.
    hook.stall_next();
    let doomed = spawn();
    survivor.kill9();
    post(
        doomed.addr.clone(),
        "/api/v1/events",
        json!({"event":"p.offline","room":"r1","from":"alice","data":{}}),
    )
    .await;
    let deadline = std::time::Instant::now() + ARRIVE;
    while hook.stalled() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hook.stalled(), 1, "the job was in flight");
    doomed.kill9();
    let _survivor = spawn();
    let got = hook.wait_for(2, ARRIVE).await;
    assert_eq!(got.len(), 2, "taken over after the node died: {got:?}");
    assert_eq!(got[1]["event"], "p.offline");
}

// ---------------------------------------------------------------------------------------------
// Through the engine to the fakes of Google's and Apple's services.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn push_fcm_and_apns_devices_get_it_and_a_dead_token_is_removed() {
    use crate::fakes::apple::FakeApns;
    use crate::fakes::google::FakeFcm;
    let hook = FakeWebhook::start().await;
    let (fcm, apns) = (FakeFcm::start().await, FakeApns::start().await);
    let dir = TempDir::new("push-mobile");
    let (fcm_config, apns_config) = (fcm.config(&dir.path), apns.config(&dir.path));
    let t = start(&hook, &dir, move |c| {
        c.push.fcm = Some(fcm_config);
        c.push.apns = Some(apns_config);
    })
    .await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let apns_token = "ab".repeat(32);
    for (device, body) in [
        (
            "pixel",
            json!({"provider":"fcm","token":"fcm-tok:bob_1","platform":"android"}),
        ),
        (
            "iphone",
            json!({"provider":"apns","token":apns_token,"platform":"ios"}),
        ),
    ] {
        let (s, v) = t
            .api(
                "PUT",
                &format!("/api/v1/users/bob/devices/{device}"),
                Some(body),
            )
            .await;
        assert_eq!(s, 200, "{device}: {v}");
    }
    // Shapes the providers would refuse are refused at registration, naming the field.
    for body in [
        json!({"provider":"fcm","token":"has spaces in it"}),
        json!({"provider":"apns","token":"not-hex"}),
        json!({"provider":"apns"}),
    ] {
        let got = t
            .api("PUT", "/api/v1/users/bob/devices/bad", Some(body))
            .await;
        assert_error(&got, 400, "bad_frame");
        assert!(
            got.1["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("token"),
            "{:?}",
            got.1
        );
    }

    let reply = send(&t, "p.offline").await;
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    let f = fcm.wait_for(1, ARRIVE).await;
    let a = apns.wait_for(1, ARRIVE).await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(f[0].token, "fcm-tok:bob_1");
    assert_eq!(f[0].title.as_deref(), Some("T"));
    assert_eq!(f[0].data["room"], "r1");
    assert_eq!(f[0].data["seq"], seq.to_string());
    assert_eq!(f[0].collapse_key.as_deref(), Some("room:r1"));
    assert_eq!(a[0].token, apns_token);
    assert_eq!(a[0].collapse_id.as_deref(), Some("room:r1"));
    assert_eq!(a[0].payload["herald"]["room"], "r1", "{:?}", a[0].payload);
    assert_eq!(a[0].payload["herald"]["seq"], seq, "{:?}", a[0].payload);
    assert!(hook.received().is_empty(), "bob has no webhook device");

    // Google says the token is gone: the device is removed, the iPhone stays.
    fcm.unregister("fcm-tok:bob_1");
    send(&t, "p.always").await;
    let v = t
        .api_until("/api/v1/users/bob/devices", |v| {
            v["devices"].as_array().is_some_and(|d| d.len() == 1)
        })
        .await;
    assert_eq!(v["devices"][0]["device"], "iphone", "{v}");
    assert_eq!(apns.wait_for(2, ARRIVE).await.len(), 2);
}

/// A browser's subscription through the engine: registered (private endpoints refused), the push
/// arrives encrypted for it with the room and seq, and a gone subscription is removed.
#[tokio::test]
async fn push_webpush_subscription_gets_it_private_endpoints_are_refused() {
    use crate::fakes::webpush::FakeWebPush;
    let hook = FakeWebhook::start().await;
    let browser = FakeWebPush::start().await;
    let dir = TempDir::new("push-web");
    let web_config = browser.config();
    let t = start(&hook, &dir, move |c| c.push.webpush = Some(web_config)).await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;

    let sub = browser.subscribe();
    let keys = sub["keys"].clone();
    for endpoint in [
        "https://10.0.0.7/push/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/push",
        "http://fcm.googleapis.com/fcm/send/x",
        "https://push.evil.example/x",
    ] {
        let body = json!({"provider":"webpush","subscription":{"endpoint":endpoint,"keys":keys}});
        let got = t
            .api("PUT", "/api/v1/users/bob/devices/evil", Some(body))
            .await;
        assert_error(&got, 400, "bad_frame");
        let msg = got.1["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("subscription.endpoint"),
            "{endpoint}: {msg}"
        );
    }
    let body = json!({"provider":"webpush","subscription":sub,"platform":"web"});
    let (s, v) = t
        .api("PUT", "/api/v1/users/bob/devices/chrome", Some(body))
        .await;
    assert_eq!(s, 200, "{v}");

    let reply = send(&t, "p.offline").await;
    let seq = reply["deliveries"][0]["seq"].as_u64().unwrap();
    let got = browser.wait_for(1, ARRIVE).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload["title"], "T", "{:?}", got[0].payload);
    assert_eq!(got[0].payload["data"]["room"], "r1", "{:?}", got[0].payload);
    assert_eq!(got[0].payload["data"]["seq"], seq, "{:?}", got[0].payload);
    assert_eq!(
        got[0].topic.as_deref(),
        Some(herald::push::webpush::topic("room:r1").as_str())
    );

    browser.mark_gone(sub["endpoint"].as_str().unwrap());
    send(&t, "p.always").await;
    let v = t
        .api_until("/api/v1/users/bob/devices", |v| {
            v["devices"].as_array().is_some_and(|d| d.is_empty())
        })
        .await;
    assert_eq!(v["devices"], json!([]));
}
