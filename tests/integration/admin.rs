//! The admin page and its JSON endpoints: the page served without a key (it holds no data), every
//! endpoint refusing a missing, wrong or query-string key, the live figures moving with traffic, the
//! node registry (one node; two nodes on one Redis seeing each other and a clean stop leaving it),
//! and the user and channel lookups with their bad-input and unknown-id answers. Runs on both
//! backends (`HERALD_TEST_REDIS=1`); the two-node test brings its own redis-server.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::fakes::webhook::FakeWebhook;
use crate::redis_server::RedisServer;

/// A GET with the admin key: (status, body).
async fn admin(t: &TestServer, path: &str) -> (u16, Value) {
    t.call("GET", path, None, Some(ADMIN_KEY)).await
}

/// GETs `path` with the admin key until `pred` holds (bounded by `WAIT`); the last body.
async fn admin_until(t: &TestServer, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (s, v) = admin(t, path).await;
        if s == 200 && pred(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET {path}: condition not met within WAIT; last: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of a metric's samples in a `/admin/status` reply (None when absent).
fn metric_sum(status: &Value, name: &str) -> Option<f64> {
    let samples = status["metrics"][name].as_array()?;
    Some(samples.iter().filter_map(|s| s["value"].as_f64()).sum())
}

fn node_ids(v: &Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_page_is_served_without_a_key_and_holds_no_data() {
    let t = TestServer::start().await;
    let resp = t.http.get(t.url("/admin")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert!(
        h["content-type"].to_str().unwrap().starts_with("text/html"),
        "{h:?}"
    );
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("form-action 'none'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["cache-control"], "no-store");
    let page = resp.text().await.unwrap();
    assert!(page.contains("id=\"login\""), "the login form");
    // The same bytes for everyone: nothing of this node, nor a key, is in the page.
    assert!(
        !page.contains(&*t.server.engine.node),
        "node id in the page"
    );
    assert!(!page.contains(ADMIN_KEY) && !page.contains(API_KEY));
    let with_key = t
        .http
        .get(t.url("/admin"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, with_key);
}

#[tokio::test]
async fn every_admin_endpoint_refuses_a_missing_wrong_or_query_key() {
    let t = TestServer::start().await;
    let dry = json!({"event": "n", "to": ["u1"]});
    let endpoints: [(&str, &str, Option<Value>); 8] = [
        ("GET", "/admin/status", None),
        ("GET", "/admin/nodes", None),
        ("GET", "/admin/users/alice", None),
        ("GET", "/admin/channels/room:r1", None),
        ("GET", "/admin/push", None),
        ("GET", "/admin/rules", None),
        ("POST", "/admin/rules/dry-run", Some(dry.clone())),
        ("GET", "/admin/channels/global", None),
    ];
    for (method, path, body) in endpoints {
        for key in [None, Some("wrong-key"), Some(API_KEY)] {
            let got = t.call(method, path, body.clone(), key).await;
            assert_error(&got, 401, "unauthorized");
        }
        // The key in the query string is not accepted (it would end up in logs and history).
        let got = t
            .call(
                method,
                &format!("{path}?key={ADMIN_KEY}"),
                body.clone(),
                None,
            )
            .await;
        assert_error(&got, 401, "unauthorized");
        let (s, v) = t.call(method, path, body.clone(), Some(ADMIN_KEY)).await;
        assert_eq!(s, 200, "{method} {path}: {v}");
    }
}

#[tokio::test]
async fn status_carries_the_node_and_live_figures_that_move_with_traffic() {
    let t = TestServer::start().await;
    let (s, before) = admin(&t, "/admin/status").await;
    assert_eq!(s, 200, "{before}");
    assert_eq!(before["node"], &*t.server.engine.node);
    let backend = if on_redis() { "redis" } else { "memory" };
    assert_eq!(before["backend"], backend);
    assert_eq!(before["ready"], true);
    assert_eq!(before["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(before["sessions"], 0);
    assert!(before["started"].as_i64().unwrap() <= before["now"].as_i64().unwrap());
    assert!(before["metrics"].is_object() && before["types"].is_object());
    let published = metric_sum(&before, "herald_events_published_total").unwrap_or(0.0);

    let _alice = t.ws("alice").await;
    for i in 0..3 {
        t.publish(json!({"event": "n", "to": ["alice"], "data": i}))
            .await;
    }
    let (_, after) = admin(&t, "/admin/status").await;
    assert_eq!(after["sessions"], 1, "{after}");
    // The recorder is per process and other tests publish too: at least this test's three.
    let now = metric_sum(&after, "herald_events_published_total").expect("counted");
    assert!(now >= published + 3.0, "{published} -> {now}");
    assert_eq!(after["types"]["herald_events_published_total"], "counter");
    assert_eq!(after["types"]["herald_sessions"], "gauge");
    let sessions = after["metrics"]["herald_sessions"].as_array().unwrap();
    assert!(
        sessions.iter().any(|s| s["labels"]["transport"] == "ws"),
        "{sessions:?}"
    );
    assert!(metric_sum(&after, "herald_deliveries_total").unwrap() >= 3.0);
}

#[tokio::test]
async fn nodes_lists_this_node_with_its_heartbeat_and_sessions() {
    let t = TestServer::start_with(|c| c.heartbeat = Duration::from_millis(300)).await;
    let v = admin_until(&t, "/admin/nodes", |v| !node_ids(v).is_empty()).await;
    assert_eq!(v["node"], &*t.server.engine.node);
    assert_eq!(node_ids(&v), vec![t.server.engine.node.to_string()]);
    let me = &v["nodes"][0];
    assert_eq!(me["this"], true);
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(me["backend"], if on_redis() { "redis" } else { "memory" });
    let (now, beat, expires) = (
        v["now"].as_i64().unwrap(),
        me["heartbeat"].as_i64().unwrap(),
        me["expires"].as_i64().unwrap(),
    );
    assert!(beat <= now && now < expires, "{v}");
    assert_eq!(me["age_ms"].as_i64().unwrap(), now - beat);
    // The record follows the node: a session shows at its next heartbeat.
    let _alice = t.ws("alice").await;
    admin_until(&t, "/admin/nodes", |v| v["nodes"][0]["sessions"] == 1).await;
}

/// Two engines on one redis-server list each other; a user's sessions show on either node with
/// the node they are on; a node that stops cleanly leaves the registry at once.
#[tokio::test]
async fn two_nodes_on_one_redis_see_each_other_and_a_stopped_one_leaves() {
    let redis = RedisServer::start();
    let fast = |c: &mut herald::config::Config| c.heartbeat = Duration::from_millis(300);
    let a = TestServer::start_redis(&redis.url, "node-a", fast).await;
    let b = TestServer::start_redis(&redis.url, "node-b", fast).await;
    let both = |v: &Value| node_ids(v) == ["node-a", "node-b"];
    let v = admin_until(&a, "/admin/nodes", both).await;
    let this: Vec<bool> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["this"].as_bool().unwrap())
        .collect();
    assert_eq!(this, [true, false], "{v}");
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["backend"] == "redis")
    );
    let v = admin_until(&b, "/admin/nodes", both).await;
    assert_eq!(v["node"], "node-b");
    assert_eq!(v["nodes"][1]["this"], true);

    // alice is connected to B; A's lookup shows her session there.
    let mut claims = claims("alice");
    claims.device = Some("phone-1".into());
    let _alice = b.ws_token(&b.token_with(claims)).await;
    let u = admin_until(&a, "/admin/users/alice", |v| {
        v["presence"]["online"] == true
    })
    .await;
    let s = &u["sessions"][0];
    assert_eq!(s["node"], "node-b", "{u}");
    assert_eq!(s["here"], false);
    assert_eq!(s["device"], "phone-1");
    assert!(
        s.get("last_activity").is_none(),
        "only known where it is: {u}"
    );
    let u = admin_until(&b, "/admin/users/alice", |v| {
        v["presence"]["online"] == true
    })
    .await;
    assert_eq!(u["sessions"][0]["here"], true, "{u}");
    assert!(u["sessions"][0]["last_activity"].as_i64().is_some());

    b.stop().await;
    let (s, v) = admin(&a, "/admin/nodes").await;
    assert_eq!(s, 200);
    assert_eq!(
        node_ids(&v),
        ["node-a"],
        "B left the registry when it stopped: {v}"
    );
}

#[tokio::test]
async fn user_lookup_shows_presence_sessions_rooms_unread_and_devices_without_tokens() {
    let hook = FakeWebhook::start().await;
    let webhook = hook.config();
    let t = TestServer::start_with(move |c| c.push.webhook = Some(webhook)).await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let (s, v) = t
        .api(
            "PUT",
            "/api/v1/users/alice/devices/phone-1",
            Some(json!({"provider": "webhook", "token": "secret-token-123", "platform": "ios"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut c = claims("alice");
    c.device = Some("phone-1".into());
    c.platform = Some("ios".into());
    let _alice = t.ws_token(&t.token_with(c)).await;
    t.publish(json!({"event": "chat.message", "room": "r1", "from": "bob", "data": {"t": 1}}))
        .await;
    t.publish(json!({"event": "chat.message", "room": "r1", "from": "bob", "data": {"t": 2}}))
        .await;

    let u = admin_until(&t, "/admin/users/alice", |v| v["unread_total"] == 2).await;
    assert_eq!(u["user"], "alice");
    let p = &u["presence"];
    assert_eq!(p["online"], true, "{u}");
    assert_eq!(
        p["devices"],
        json!([{"device": "phone-1", "platform": "ios", "state": "foreground"}])
    );
    let sessions = u["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{u}");
    assert_eq!(sessions[0]["node"], &*t.server.engine.node);
    assert_eq!(sessions[0]["here"], true);
    assert_eq!(sessions[0]["in_presence"], true);
    assert_eq!(sessions[0]["device"], "phone-1");
    assert_eq!(u["rooms"], json!(["r1"]));
    assert_eq!(u["unread"], json!({"r1": 2}));
    assert_eq!(
        u["devices"],
        json!([{"device": "phone-1", "provider": "webhook", "platform": "ios"}])
    );
    assert!(!u.to_string().contains("secret-token-123"), "no token: {u}");
}

#[tokio::test]
async fn an_unknown_user_has_empty_figures_and_a_bad_id_is_400() {
    let t = TestServer::start().await;
    let (s, u) = admin(&t, "/admin/users/nobody").await;
    assert_eq!(s, 200, "{u}");
    assert_eq!(u["presence"]["online"], false);
    assert_eq!(u["presence"]["last_seen"], Value::Null);
    assert_eq!(u["sessions"], json!([]));
    assert_eq!(u["rooms"], json!([]));
    assert_eq!(u["unread"], json!({}));
    assert_eq!(u["unread_total"], 0);
    assert_eq!(u["devices"], json!([]));
    let long = "x".repeat(129);
    for bad in ["bad%20id", "a%2Fb", "%3Cscript%3E", long.as_str()] {
        assert_error(
            &admin(&t, &format!("/admin/users/{bad}")).await,
            400,
            "bad_channel",
        );
    }
    // Not even UTF-8 once decoded: the error shape still.
    assert_error(&admin(&t, "/admin/users/%FF").await, 400, "bad_frame");
}

#[tokio::test]
async fn channel_lookup_shows_position_recent_history_and_subscribers() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "subscribe", "channel": "room:r1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    for i in 1..=25 {
        t.publish(json!({"event": "chat.message", "room": "r1", "from": "bob", "data": {"n": i}}))
            .await;
    }
    let (s, c) = admin(&t, "/admin/channels/room:r1").await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["channel"], "room:r1");
    assert_eq!(c["kind"], "room");
    assert_eq!(c["persist"], true);
    assert_eq!(c["seq"], 25);
    assert!(c["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    let recent = c["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 20, "the newest twenty");
    assert_eq!(recent[0]["seq"], 6);
    assert_eq!(recent[19]["seq"], 25);
    assert_eq!(recent[19]["data"], json!({"n": 25}));
    assert_eq!(recent[19]["from"], "bob");
    assert_eq!(c["subscribers"], 1);
    assert_eq!(c["subscriber_sessions"][0]["user"], "alice");
    assert_eq!(c["room"]["member_count"], 2);
    assert_eq!(c["room"]["members"], json!(["alice", "bob"]));
    assert_eq!(c["room"]["present"], json!(["alice"]));

    // Percent-encoded as the page sends it; every WebSocket is on its own user channel.
    let (s, c) = admin(&t, "/admin/channels/user%3Aalice").await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["kind"], "user");
    assert_eq!(c["subscribers"], 1);
    assert!(c.get("room").is_none());
    // A kind that keeps no history has no position.
    let (s, c) = admin(&t, "/admin/channels/active:r1").await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["persist"], false);
    assert!(c.get("seq").is_none() && c.get("epoch").is_none(), "{c}");
    assert_eq!(c["recent"], json!([]));
    // A channel nobody used: position zero, nobody subscribed.
    let (s, c) = admin(&t, "/admin/channels/room:empty").await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["seq"], 0);
    assert_eq!(c["subscribers"], 0);
    assert_eq!(c["room"]["member_count"], 0);

    for bad in ["nochannel", "room:", "room:bad%20id", "planet:x"] {
        assert_error(
            &admin(&t, &format!("/admin/channels/{bad}")).await,
            400,
            "bad_channel",
        );
    }
}

#[tokio::test]
async fn push_lists_providers_and_the_outbox() {
    let t = TestServer::start().await;
    let (s, p) = admin(&t, "/admin/push").await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["providers"], json!([]));
    assert_eq!(p["dead"], json!([]));
    assert_eq!(p["outbox"]["queued"], 0, "{p}");
    assert_eq!(p["outbox"]["dead"], 0, "{p}");

    let hook = FakeWebhook::start().await;
    let webhook = hook.config();
    let t = TestServer::start_with(move |c| c.push.webhook = Some(webhook)).await;
    let (_, p) = admin(&t, "/admin/push").await;
    assert_eq!(p["providers"], json!(["webhook"]), "{p}");
}
