//! Many nodes on one Redis: cross-node delivery in seq order, replay, presence across nodes, a
//! killed node, a killed subscription, Redis losing its data, Redis down and back.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::redis_server::RedisServer;

async fn two_nodes(redis: &RedisServer) -> (TestServer, TestServer) {
    let a = TestServer::start_redis(&redis.url, "node-a", |_| {}).await;
    let b = TestServer::start_redis(&redis.url, "node-b", |_| {}).await;
    (a, b)
}

/// Collects the seqs of `channel` events until `n` arrived (bounded by WAIT per frame).
async fn seqs(ws: &mut Ws, channel: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = ws.event_on(channel).await;
        out.push(v["seq"].as_u64().expect("stored event has a seq"));
    }
    out
}

#[tokio::test]
async fn a_client_on_one_node_gets_what_a_backend_published_through_another() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    a.join("r1", "alice").await;
    b.join("r1", "bob").await;
    let mut alice = a.ws("alice").await;
    let mut bob = b.ws("bob").await;
    assert_eq!(
        bob.request(json!({"op":"subscribe","channel":"room:r1"}))
            .await["ok"],
        true
    );
    let r = alice
        .request(
            json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"t":"hi"}}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let ev = bob.event_on("room:r1").await;
    assert_eq!(ev["data"]["t"], "hi");
    assert_eq!(ev["from"], "alice");
    assert_eq!(ev["seq"], r["deliveries"][0]["seq"]);
    let epoch = ev["epoch"].clone();
    // Membership, unread and history are the same whichever node answers.
    let (_, m) = b.api("GET", "/api/v1/rooms/r1/members", None).await;
    assert_eq!(m["members"], json!(["alice", "bob"]));
    let (_, u) = b.api("GET", "/api/v1/users/bob/unread", None).await;
    assert_eq!(u["unread"]["r1"], 1);
    // Replay across nodes: bob misses three events published on A, resumes on B.
    drop(bob);
    for i in 0..3 {
        a.publish(json!({"event":"n","room":"r1","data":i})).await;
    }
    let mut bob = b.ws("bob").await;
    let r = bob
        .request(json!({"op":"subscribe","channel":"room:r1","since":{"epoch":epoch,"seq":1}}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    let got = seqs(&mut bob, "room:r1", 3).await;
    assert_eq!(got, vec![2, 3, 4]);
}

#[tokio::test]
async fn seq_order_holds_with_publishers_on_both_nodes() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    a.join("r1", "sa").await;
    a.join("r1", "sb").await;
    let mut sa = a.ws("sa").await;
    let mut sb = b.ws("sb").await;
    sa.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    sb.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    const EACH: usize = 150;
    let pa = a.publisher();
    let pb = b.publisher();
    let ta = tokio::spawn(async move {
        for i in 0..EACH {
            pa.publish(json!({"event":"n","room":"r1","data":{"a":i}}))
                .await;
        }
    });
    let tb = tokio::spawn(async move {
        for i in 0..EACH {
            pb.publish(json!({"event":"n","room":"r1","data":{"b":i}}))
                .await;
        }
    });
    let want: Vec<u64> = (1..=(2 * EACH) as u64).collect();
    assert_eq!(seqs(&mut sa, "room:r1", 2 * EACH).await, want);
    assert_eq!(seqs(&mut sb, "room:r1", 2 * EACH).await, want);
    ta.await.unwrap();
    tb.await.unwrap();
}

#[tokio::test]
async fn presence_is_shared_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let (s, _) = a
        .api(
            "PUT",
            "/api/v1/users/watcher/contacts",
            Some(json!({"contacts":["carol"]})),
        )
        .await;
    assert_eq!(s, 200);
    let mut w = a.ws("watcher").await;
    let r = w.request(json!({"op":"watch","users":["carol"]})).await;
    assert_eq!(r["presence"]["carol"]["online"], false, "{r}");
    let carol = b.ws("carol").await;
    let on = w
        .wait_for(|v| v["type"] == "presence.changed" && v["user"] == "carol")
        .await;
    assert_eq!(on["online"], true);
    let (_, p) = a.api("GET", "/api/v1/presence/carol", None).await;
    assert_eq!(p["online"], true);
    drop(carol);
    let off = w
        .wait_for(|v| v["type"] == "presence.changed" && v["user"] == "carol")
        .await;
    assert_eq!(off["online"], false);
    assert!(off["last_seen"].is_i64());
}

#[tokio::test]
async fn the_same_idempotency_key_on_two_nodes_stores_one_event() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let body = json!({"event":"n","to":["u1"],"data":{},"idempotency_key":"race-1"});
    let (ra, rb) = tokio::join!(
        a.api("POST", "/api/v1/events", Some(body.clone())),
        b.api("POST", "/api/v1/events", Some(body))
    );
    assert_eq!(ra.0, 200, "{}", ra.1);
    assert_eq!(rb.0, 200, "{}", rb.1);
    assert_eq!(ra.1["id"], rb.1["id"]);
    let (_, h) = a.api("GET", "/api/v1/channels/user:u1/history", None).await;
    assert_eq!(h["events"].as_array().unwrap().len(), 1, "{h}");
}

#[tokio::test]
async fn killing_the_pubsub_connection_leaves_no_gap() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    b.join("r1", "sub").await;
    let mut sub = b.ws("sub").await;
    sub.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    for i in 0..20 {
        a.publish(json!({"event":"n","room":"r1","data":i})).await;
    }
    let mut all = seqs(&mut sub, "room:r1", 20).await;
    // Kill node B's subscription and publish a burst at once: Pub/Sub drops whatever is published
    // before B has reconnected and resubscribed; B must fetch it from history.
    let killed = redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    assert!(killed.starts_with(':'), "{killed}");
    let burst = (0..100).map(|i| a.publish(json!({"event":"n","room":"r1","data":100 + i})));
    futures_util::future::join_all(burst).await;
    for i in 0..80 {
        a.publish(json!({"event":"n","room":"r1","data":200 + i}))
            .await;
    }
    all.extend(seqs(&mut sub, "room:r1", 180).await);
    assert_eq!(
        all,
        (1..=200).collect::<Vec<u64>>(),
        "no gap, no duplicate, in order"
    );
    sub.assert_none(Duration::from_millis(200), |v| {
        v["channel"] == "room:r1" && v["type"] == "event"
    })
    .await;
}

#[tokio::test]
async fn redis_losing_its_data_is_never_a_silent_gap() {
    let mut redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    b.join("r1", "sub").await;
    let mut sub = b.ws("sub").await;
    sub.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    for i in 0..3 {
        a.publish(json!({"event":"n","room":"r1","data":i})).await;
    }
    let third = sub
        .wait_for(|v| v["channel"] == "room:r1" && v["seq"] == 3)
        .await;
    let old_epoch = third["epoch"].as_str().unwrap().to_string();
    redis.restart();
    // Membership is gone too: the backend restores it, as an application would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _) = a.api("PUT", "/api/v1/rooms/r1/members/sub", None).await;
        if s == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node A never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = a
        .publish(json!({"event":"n","room":"r1","data":"after"}))
        .await;
    assert_ne!(r["deliveries"][0]["epoch"].as_str().unwrap(), old_epoch);
    let reset = sub
        .wait_for(|v| v["type"] == "reset" && v["channel"] == "room:r1")
        .await;
    assert_eq!(reset["recovered"], false);
    assert_ne!(reset["epoch"].as_str().unwrap(), old_epoch);
    let ev = sub
        .wait_for(|v| v["type"] == "event" && v["data"] == "after")
        .await;
    assert_eq!(ev["seq"], 1);
    // A client resuming from the old position is told it cannot be served.
    let mut late = a.ws("sub").await;
    let r = late
        .request(json!({"op":"subscribe","channel":"room:r1","since":{"epoch":old_epoch,"seq":3}}))
        .await;
    assert_eq!(r["recovered"], false, "{r}");
}

#[tokio::test]
async fn redis_down_means_not_ready_and_503_then_recovery() {
    let mut redis = RedisServer::start();
    let (a, _b) = two_nodes(&redis).await;
    let (s, _) = a.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 200);
    redis.stop();
    let (s, v) = a.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 503, "{v}");
    let (s, v) = a
        .api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"n","to":["u1"],"data":1})),
        )
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "unavailable");
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, _) = a.call("GET", "/readyz", None, None).await;
        if s == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = a
        .api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"n","to":["u1"],"data":2})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // The failed publish stored nothing: the first stored event of the new epoch is seq 1.
    assert_eq!(v["deliveries"][0]["seq"], 1);
}

/// A node killed with SIGKILL stops heartbeating; another node's sweeper turns its users offline within
/// the presence TTL plus one sweep.
#[tokio::test]
async fn a_killed_node_has_its_users_offline_within_ttl() {
    let redis = RedisServer::start();
    let a = TestServer::start_redis(&redis.url, "node-a", |c| {
        c.presence_ttl = Duration::from_secs(2);
        c.heartbeat = Duration::from_secs(1);
    })
    .await;
    let (s, _) = a
        .api(
            "PUT",
            "/api/v1/users/watcher/contacts",
            Some(json!({"contacts":["dora"]})),
        )
        .await;
    assert_eq!(s, 200);
    let mut w = a.ws("watcher").await;
    w.request(json!({"op":"watch","users":["dora"]})).await;
    let node = HeraldProcess::spawn(&redis.url, &["--presence-ttl", "2", "--heartbeat", "1"]);
    let token = a.token("dora");
    let _dora = Ws::connect(&format!("ws://{}/ws?token={token}", node.addr)).await;
    let on = w
        .wait_for(|v| v["type"] == "presence.changed" && v["user"] == "dora")
        .await;
    assert_eq!(on["online"], true);
    node.kill9();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let off = loop {
        let v = tokio::time::timeout_at(
            deadline,
            w.wait_for(|v| v["type"] == "presence.changed" && v["user"] == "dora"),
        )
        .await
        .expect("dora still online long after her node died");
        if v["online"] == false {
            break v;
        }
    };
    assert!(off["last_seen"].is_i64());
    let _: Value = off;
}

/// `rediss://` with a private CA (`redis_ca` / HERALD_REDIS_CA): delivery across two nodes over TLS.
#[tokio::test]
async fn rediss_with_a_private_ca_works() {
    let redis = RedisServer::start_tls();
    let (port, ca) = redis.tls.clone().unwrap();
    let url = format!("rediss://localhost:{port}");
    let a = TestServer::start_redis(&url, "tls-a", |c| c.redis_ca = Some(ca.clone())).await;
    let b = TestServer::start_redis(&url, "tls-b", |c| c.redis_ca = Some(ca.clone())).await;
    let mut bob = b.ws("bob").await;
    a.publish(json!({"event":"n","to":["bob"],"data":"over tls"}))
        .await;
    let ev = bob.event_on("user:bob").await;
    assert_eq!(ev["data"], "over tls");
    // Without the CA the certificate is refused: the start fails with a clear error.
    let mut c = test_config();
    c.redis = Some(url);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = herald::start(
        c,
        herald::ChannelKinds::default(),
        listener,
        std::future::pending(),
    )
    .await
    .err()
    .expect("an unknown CA must be refused");
    assert!(err.to_string().contains("cannot use Redis"), "{err}");
}

/// `POST /users/{user}/disconnect` through one node closes that user's sessions on every node.
#[tokio::test]
async fn disconnecting_a_user_reaches_every_node() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let mut on_b = b.ws("erin").await;
    let mut other = b.ws("frank").await;
    let (s, v) = a.api("POST", "/api/v1/users/erin/disconnect", None).await;
    assert_eq!(s, 200, "{v}");
    let c = on_b.closed().await;
    assert_eq!(c.disconnect, Some(4012), "{c:?}");
    assert_eq!(other.request(json!({"op":"ping"})).await["type"], "pong");
}

/// A Redis that restarted without its data forgets who is connected: the node's next heartbeat
/// finds its sessions gone and registers them again (online, the device, room presence, focus), and
/// watchers are told, while the users stay connected.
#[tokio::test]
async fn presence_comes_back_when_redis_loses_its_data_under_connected_users() {
    let mut redis = RedisServer::start();
    let t = TestServer::start_redis(&redis.url, "node-a", |c| {
        c.heartbeat = Duration::from_secs(1);
        c.presence_ttl = Duration::from_secs(10);
    })
    .await;
    for u in ["alice", "carol"] {
        t.join("r1", u).await;
    }
    let mut alice = t.ws_with("alice", "&device=phone").await;
    alice.subscribed("room:r1").await;
    let r = alice.request(json!({"op": "focus", "room": "r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = alice
        .request(json!({"op": "state", "state": "background"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let mut carol = t.ws("carol").await;
    carol.subscribed("room:r1").await;
    redis.restart();
    // Membership is gone too: the backend restores it, as an application would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for u in ["alice", "carol"] {
        loop {
            let (s, _) = t
                .api("PUT", &format!("/api/v1/rooms/r1/members/{u}"), None)
                .await;
            if s == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Within a heartbeat or two: online again, on the same device in the same state, in the room.
    let p = t
        .api_until("/api/v1/presence/alice", |v| v["online"] == true)
        .await;
    assert_eq!(
        p["devices"],
        json!([{"device": "phone", "platform": null, "state": "background"}]),
        "{p}"
    );
    t.api_until("/api/v1/rooms/r1/presence", |v| {
        v["users"]
            .as_array()
            .is_some_and(|u| u.contains(&json!("alice")))
    })
    .await;
    // Focus too: a message carol sends now does not count as unread for alice, who has r1 open.
    let focused = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (s, v) = t
            .api(
                "POST",
                "/api/v1/events",
                Some(json!({"event":"chat.message","room":"r1","from":"carol","data":{}})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let (_, u) = t.api("GET", "/api/v1/users/alice/unread", None).await;
        if u["unread"]["r1"].as_u64().unwrap_or(0) == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < focused,
            "focus never came back: {u}"
        );
        // Catch up before the next try (countable events before the focus came back stay unread).
        let seq = v["deliveries"][0]["seq"].as_u64().unwrap();
        t.api(
            "POST",
            "/api/v1/users/alice/read",
            Some(json!({"room": "r1", "seq": seq})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // alice never saw a disconnect through all this.
    alice
        .assert_none(Duration::from_millis(100), |v| v["type"] == "disconnect")
        .await;
}

/// A WebSocket opened while Redis is down is told to come back later (1013, reconnect), not that
/// the node is shutting down; once Redis is back it connects.
#[tokio::test]
async fn a_websocket_opened_while_redis_is_down_gets_try_again_later() {
    let mut redis = RedisServer::start();
    let t = TestServer::start_redis(&redis.url, "node-a", |_| {}).await;
    redis.stop();
    let mut ws = Ws::connect(&t.ws_url(&format!("?token={}", t.token("alice")))).await;
    let d = ws.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(d["code"], 1013, "{d}");
    assert_eq!(d["reconnect"], true, "{d}");
    let closed = ws.closed().await;
    assert_eq!(closed.close, Some(1013), "{closed:?}");
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut ws = Ws::connect(&t.ws_url(&format!("?token={}", t.token("alice")))).await;
        let first = ws.next().await;
        if first["type"] == "connected" {
            break;
        }
        assert_eq!(first["code"], 1013, "{first}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never connected again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
