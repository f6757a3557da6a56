//! Presence: first device online / last device offline, custom status and app state, who may watch,
//! expiry of a silent connection, and room presence (`presence.update`).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

fn changed(user: &str) -> impl Fn(&Value) -> bool {
    let user = user.to_string();
    move |v: &Value| v["type"] == "presence.changed" && v["user"] == user
}

async fn set_contacts(t: &TestServer, user: &str, contacts: &[&str]) {
    let (s, v) = t
        .api(
            "PUT",
            &format!("/api/v1/users/{user}/contacts"),
            Some(json!({ "contacts": contacts })),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn online_with_the_first_device_offline_with_the_last() {
    let t = TestServer::start().await;
    set_contacts(&t, "alice", &["bob"]).await;
    // carol is no contact of bob's but shares a room with him.
    t.join("r1", "bob").await;
    t.join("r1", "carol").await;

    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["bob"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["presence"]["bob"]["online"], false, "{r}");
    let mut carol = t.ws("carol").await;
    let r = carol
        .request(json!({"op": "watch", "users": ["bob"]}))
        .await;
    assert_eq!(r["ok"], true, "room mates may watch: {r}");

    let mut phone = t.ws_with("bob", "&device=phone").await;
    for w in [&mut alice, &mut carol] {
        let p = w.wait_for(changed("bob")).await;
        assert_eq!(p["online"], true, "{p}");
        assert_eq!(p["status"], "online");
        assert_eq!(
            p["devices"],
            json!([{"device": "phone", "platform": null, "state": "foreground"}]),
            "{p}"
        );
    }

    // A second device: bob was online already.
    let mut laptop = t.ws_with("bob", "&device=laptop").await;
    t.api_until("/api/v1/presence/bob", |v| {
        v["devices"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;
    // The first device goes: bob is still online on the laptop.
    phone.close_client().await;
    let v = t
        .api_until("/api/v1/presence/bob", |v| {
            v["devices"].as_array().is_some_and(|d| d.len() == 1)
        })
        .await;
    assert_eq!(v["online"], true, "{v}");
    assert_eq!(v["devices"][0]["device"], "laptop");
    // The last device goes: offline, with last_seen. Nothing came in between (the next presence frame
    // for bob is this one).
    laptop.close_client().await;
    for w in [&mut alice, &mut carol] {
        let p = w.wait_for(changed("bob")).await;
        assert_eq!(
            p["online"], false,
            "no presence.changed for the 2nd device or the 1st leaving: {p}"
        );
        assert!(p["last_seen"].is_i64(), "{p}");
        assert_eq!(p["devices"], json!([]));
        w.assert_none(Duration::from_millis(200), changed("bob"))
            .await;
    }
    let (s, v) = t.api("GET", "/api/v1/presence/bob", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["online"], false, "{v}");
    assert!(v["last_seen"].is_i64(), "{v}");
}

#[tokio::test]
async fn status_state_and_presence_ops() {
    let t = TestServer::start().await;
    set_contacts(&t, "alice", &["bob"]).await;
    let mut bob = t.ws_with("bob", "&device=phone").await;
    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["bob"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["presence"]["bob"]["online"], true, "{r}");

    let r = bob
        .request(json!({"op": "status", "status": "away", "text": "lunch"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let p = alice.wait_for(changed("bob")).await;
    assert_eq!(
        (p["online"].clone(), p["status"].clone(), p["text"].clone()),
        (json!(true), json!("away"), json!("lunch"))
    );

    let r = bob
        .request(json!({"op": "state", "state": "background"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let p = alice.wait_for(changed("bob")).await;
    assert_eq!(
        p["devices"],
        json!([{"device": "phone", "platform": null, "state": "background"}]),
        "{p}"
    );
    assert_eq!(p["status"], "away", "status is kept: {p}");

    let r = alice
        .request(json!({"op": "presence", "users": ["bob", "nobody"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let bp = &r["presence"]["bob"];
    assert_eq!(
        (
            bp["online"].clone(),
            bp["status"].clone(),
            bp["text"].clone()
        ),
        (json!(true), json!("away"), json!("lunch"))
    );
    assert_eq!(bp["devices"][0]["state"], "background");
    assert_eq!(r["presence"]["nobody"]["online"], false, "{r}");
    let (_, v) = t.api("GET", "/api/v1/presence/bob", None).await;
    assert_eq!(v["devices"][0]["state"], "background", "{v}");

    let r = bob
        .request(json!({"op": "status", "status": "sleeping"}))
        .await;
    assert_eq!(
        (r["ok"].clone(), r["error"]["code"].clone()),
        (json!(false), json!("bad_frame")),
        "{r}"
    );
    let r = bob
        .request(json!({"op": "state", "state": "minimised"}))
        .await;
    assert_eq!(
        (r["ok"].clone(), r["error"]["code"].clone()),
        (json!(false), json!("bad_frame")),
        "{r}"
    );
}

#[tokio::test]
async fn only_contacts_and_room_mates_may_watch() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r2", "mallory").await;
    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["mallory"]}))
        .await;
    assert_eq!(
        (r["ok"].clone(), r["error"]["code"].clone()),
        (json!(false), json!("forbidden")),
        "{r}"
    );
    let r = alice
        .request(json!({"op": "subscribe", "channel": "presence:mallory"}))
        .await;
    assert_eq!(
        (r["ok"].clone(), r["error"]["code"].clone()),
        (json!(false), json!("forbidden")),
        "{r}"
    );
    // Refused means not subscribed: mallory coming online tells alice nothing.
    let _m = t.ws("mallory").await;
    alice
        .assert_none(Duration::from_millis(200), changed("mallory"))
        .await;

    // Once a contact, the same subscribe is allowed and delivers presence.changed.
    set_contacts(&t, "alice", &["bob"]).await;
    alice.subscribed("presence:bob").await;
    let _b = t.ws("bob").await;
    let p = alice.wait_for(changed("bob")).await;
    assert_eq!(p["online"], true);
    // A room mate too.
    t.join("r1", "mallory").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["mallory"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["presence"]["mallory"]["online"], true, "{r}");
}

#[tokio::test]
async fn a_silent_connection_expires_after_the_ttl() {
    let t = TestServer::start_with(|c| {
        c.presence_ttl = Duration::from_secs(2);
        c.heartbeat = Duration::from_secs(1);
    })
    .await;
    set_contacts(&t, "alice", &["bob"]).await;
    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["bob"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");

    let start = tokio::time::Instant::now();
    // bob connects, then never reads or writes again (no pongs, no frames).
    let _bob = t.ws("bob").await;
    let p = alice.wait_for(changed("bob")).await;
    assert_eq!(p["online"], true, "{p}");

    // alice keeps reading (and so answers pings); bob must go offline within TTL + 2 heartbeats.
    let p = tokio::time::timeout(Duration::from_secs(8), alice.wait_for(changed("bob")))
        .await
        .expect("bob did not go offline within 8 s");
    let took = start.elapsed();
    assert_eq!(p["online"], false, "{p}");
    assert!(p["last_seen"].is_i64(), "{p}");
    assert!(
        took >= Duration::from_millis(1500),
        "offline before the TTL ran out: {took:?}"
    );
    let (_, v) = t.api("GET", "/api/v1/presence/bob", None).await;
    assert_eq!(v["online"], false, "{v}");
    // alice, who kept answering, is still online.
    let (_, v) = t.api("GET", "/api/v1/presence/alice", None).await;
    assert_eq!(v["online"], true, "{v}");
}

#[tokio::test]
async fn room_presence_joined_and_left() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let update = |user: &str, change: &str| json!({"type": "presence.update", "room": "r1", "user": user, "change": change});
    let is_update = |v: &Value| v["type"] == "presence.update";

    let mut alice = t.ws("alice").await;
    alice.subscribed("room:r1").await;

    let mut bob = t.ws("bob").await;
    bob.subscribed("room:r1").await;
    assert_eq!(alice.wait_for(is_update).await, update("bob", "joined"));
    // Nobody is told of their own join.
    bob.assert_none(std::time::Duration::from_millis(200), is_update)
        .await;
    alice
        .assert_none(std::time::Duration::from_millis(50), |v| {
            v["type"] == "presence.update" && v["user"] == "alice"
        })
        .await;
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(v["users"], json!(["alice", "bob"]), "{v}");

    let r = bob
        .request(json!({"op": "unsubscribe", "channel": "room:r1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(alice.wait_for(is_update).await, update("bob", "left"));
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(v["users"], json!(["alice"]), "{v}");

    bob.subscribed("room:r1").await;
    assert_eq!(alice.wait_for(is_update).await, update("bob", "joined"));
    bob.close_client().await;
    assert_eq!(alice.wait_for(is_update).await, update("bob", "left"));
    // Room presence is never stored: history holds none of it.
    let (_, v) = t.api("GET", "/api/v1/channels/room:r1/history", None).await;
    assert_eq!(v["events"], json!([]), "{v}");
}

/// A join storm does not cost every subscriber a frame per joiner: the first change in the room goes
/// at once, the rest are coalesced into one `presence.update` per interval naming many users (capped,
/// the rest counted in `more`); a quiet room gets one user's frame again.
#[tokio::test]
async fn room_presence_join_storm_is_coalesced() {
    let t = TestServer::start_with(|c| {
        c.room_presence.interval = Duration::from_millis(400);
        c.room_presence.batch_max = 10;
    })
    .await;
    let joiners: Vec<String> = (0..25).map(|i| format!("u{i:02}")).collect();
    t.join("r1", "alice").await;
    for u in &joiners {
        t.join("r1", u).await;
    }
    let mut alice = t.ws("alice").await;
    alice.subscribed("room:r1").await;
    let mut socks = Vec::new();
    for u in &joiners {
        let mut w = t.ws(u).await;
        w.subscribed("room:r1").await;
        socks.push(w);
    }
    // Collect alice's presence frames until every joiner is accounted for.
    let mut named = std::collections::BTreeSet::new();
    let mut more = 0;
    let mut frames = Vec::new();
    while named.len() + more < joiners.len() {
        let f = alice.wait_for(|v| v["type"] == "presence.update").await;
        assert_eq!(f["room"], "r1", "{f}");
        assert_eq!(f["change"], "joined", "{f}");
        match (&f["user"], f["users"].as_array()) {
            (Value::String(u), None) => assert!(named.insert(u.clone()), "{u} twice: {f}"),
            (Value::Null, Some(users)) => {
                assert!(users.len() <= 10, "batch over room_batch_max: {f}");
                for u in users {
                    assert!(named.insert(u.as_str().unwrap().to_string()), "twice: {f}");
                }
                more += f["more"].as_u64().unwrap_or(0) as usize;
            }
            _ => panic!("neither one user nor a list: {f}"),
        }
        frames.push(f);
    }
    assert!(
        frames.len() < joiners.len() / 2,
        "{} frames for {} joins: {frames:?}",
        frames.len(),
        joiners.len()
    );
    assert!(
        frames.iter().any(|f| f["users"].as_array().is_some()),
        "nothing was coalesced: {frames:?}"
    );
    assert!(named.iter().all(|u| joiners.contains(u)), "{named:?}");
    if more == 0 {
        assert_eq!(named.len(), joiners.len());
    }
    // The room goes quiet; the next change is one user's frame, at once, and not to that user.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut last = socks.pop().unwrap();
    let left = Instant::now();
    last.close_client().await;
    let f = alice.wait_for(|v| v["type"] == "presence.update").await;
    assert_eq!(
        f,
        json!({"type": "presence.update", "room": "r1", "user": "u24", "change": "left"})
    );
    assert!(
        left.elapsed() < Duration::from_millis(350),
        "a quiet room's change waited for the interval: {:?}",
        left.elapsed()
    );
    // Every joiner is present.
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(
        v["users"].as_array().map(Vec::len),
        Some(joiners.len()),
        "{v}"
    );
}

/// `room_interval = 0` sends every change on its own, as before coalescing.
#[tokio::test]
async fn room_presence_uncoalesced_with_a_zero_interval() {
    let t = TestServer::start_with(|c| c.room_presence.interval = Duration::ZERO).await;
    for u in ["alice", "bob", "carol", "dave"] {
        t.join("r1", u).await;
    }
    let mut alice = t.ws("alice").await;
    alice.subscribed("room:r1").await;
    let mut socks = Vec::new();
    for u in ["bob", "carol", "dave"] {
        let mut w = t.ws(u).await;
        w.subscribed("room:r1").await;
        socks.push(w);
    }
    for u in ["bob", "carol", "dave"] {
        let f = alice.wait_for(|v| v["type"] == "presence.update").await;
        assert_eq!(
            f,
            json!({"type": "presence.update", "room": "r1", "user": u, "change": "joined"})
        );
    }
}

/// Focus (who has a room open) is kept while the session lives, however long past the presence TTL:
/// the node's heartbeat refreshes it, so a message arriving a minute later still does not count as
/// unread for someone looking at the room.
#[tokio::test]
async fn focus_outlives_the_presence_ttl_while_the_session_lives() {
    let t = TestServer::start_with(|c| {
        c.presence_ttl = Duration::from_secs(2);
        c.heartbeat = Duration::from_secs(1);
    })
    .await;
    for u in ["alice", "bob", "carol"] {
        t.join("r1", u).await;
    }
    let mut alice = t.ws("alice").await;
    let r = alice.request(json!({"op": "focus", "room": "r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    // Past the TTL, reading (so answering pings) all along.
    alice
        .assert_none(Duration::from_millis(3500), |v| v["type"] == "disconnect")
        .await;
    t.publish(json!({"event":"chat.message","room":"r1","from":"bob","data":{"text":"hi"}}))
        .await;
    let (_, v) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    // (Rooms with nothing unread are left out.)
    assert_eq!(
        v["unread"]["r1"].as_u64().unwrap_or(0),
        0,
        "alice has r1 open: {v}"
    );
    let (_, v) = t.api("GET", "/api/v1/users/carol/unread", None).await;
    assert_eq!(v["unread"]["r1"], 1, "carol does not: {v}");
}
/// Asserts that a presence object of an offline user carries no `status` or `text`.
fn no_status(what: &str, p: &Value) {
    assert_eq!(p["online"], false, "{what}: {p}");
    assert!(
        p.get("status").is_none(),
        "{what}: status while offline: {p}"
    );
    assert!(p.get("text").is_none(), "{what}: text while offline: {p}");
    assert!(p.get("last_seen").is_some(), "{what}: {p}");
}

/// Offline, every presence object (API, WS replies, `presence.changed`, the presence SSE stream)
/// leaves `status` and `text` out, and seed 002 has no status either (`null`); the custom status is
/// kept and shows again once the user is back.
#[tokio::test]
async fn offline_presence_has_no_status_and_the_status_returns_with_the_user() {
    let t = TestServer::start().await;
    set_contacts(&t, "alice", &["bob", "nobody"]).await;
    let mut bob = t.ws("bob").await;
    let r = bob
        .request(json!({"op": "status", "status": "away", "text": "lunch"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let mut alice = t.ws("alice").await;
    let r = alice
        .request(json!({"op": "watch", "users": ["bob", "nobody"]}))
        .await;
    assert_eq!(r["presence"]["bob"]["status"], "away", "{r}");
    no_status("watch reply, never seen", &r["presence"]["nobody"]);
    let mut sse = RawSse::open(
        &t.url(&format!("/api/presence/stream?token={}", t.token("alice"))),
        None,
    )
    .await;
    let initial = sse.next_named("initial").await.data();
    assert_eq!(initial["bob"]["text"], "lunch", "{initial}");

    bob.close_client().await;
    let p = alice.wait_for(changed("bob")).await;
    no_status("presence.changed", &p);
    no_status(
        "SSE status_change",
        &sse.next_named("status_change").await.data(),
    );
    let (_, p) = t.api("GET", "/api/v1/presence/bob", None).await;
    no_status("GET /presence/{user}", &p);
    let (_, v) = t
        .api(
            "POST",
            "/api/v1/presence/query",
            Some(json!({"users": ["bob"]})),
        )
        .await;
    no_status("POST /presence/query", &v["presence"]["bob"]);
    let r = alice
        .request(json!({"op": "presence", "users": ["bob"]}))
        .await;
    no_status("presence op", &r["presence"]["bob"]);
    let r = alice
        .request(json!({"op": "watch", "users": ["bob"]}))
        .await;
    no_status("watch reply", &r["presence"]["bob"]);
    let mut sse = RawSse::open(
        &t.url(&format!("/api/presence/stream?token={}", t.token("alice"))),
        None,
    )
    .await;
    no_status(
        "SSE initial",
        &sse.next_named("initial").await.data()["bob"],
    );
    let (_, v) = t
        .call(
            "GET",
            "/api/online-status/user/bob",
            None,
            Some(&t.token("alice")),
        )
        .await;
    assert_eq!(v["is_online"], false, "{v}");
    assert!(v["last_seen"].is_i64(), "{v}");
    assert!(v["status"].is_null() && v["text"].is_null(), "{v}");

    let _bob = t.ws("bob").await;
    let p = alice.wait_for(changed("bob")).await;
    assert_eq!(
        (p["online"].clone(), p["status"].clone(), p["text"].clone()),
        (json!(true), json!("away"), json!("lunch")),
        "the custom status comes back with the user: {p}"
    );
}

/// The first two pings `ws` gets, as instants.
async fn two_pings(ws: &mut Ws) -> (Instant, Instant) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut at = Vec::new();
    while at.len() < 2 {
        let m = tokio::time::timeout(WAIT, ws.stream.next())
            .await
            .expect("no ping within WAIT")
            .expect("socket closed")
            .expect("socket error");
        if let Message::Ping(_) = m {
            at.push(Instant::now());
        }
    }
    (at[0], at[1])
}

#[tokio::test]
async fn a_nodes_heartbeat_is_spread_over_the_interval_and_each_session_still_beats_once_per_interval()
 {
    // Ten sessions, one heartbeat a second: pinged all at once, the node's pings and presence
    // writes would come in one burst per interval (holding the events published meanwhile).
    let every = Duration::from_secs(1);
    let t = TestServer::start_with(|c| c.heartbeat = every).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(t.ws(&format!("hb{i}")).await);
    }
    let pings = futures_util::future::join_all(clients.iter_mut().map(two_pings)).await;
    let first: Vec<Instant> = pings.iter().map(|p| p.0).collect();
    let spread = *first.iter().max().unwrap() - *first.iter().min().unwrap();
    assert!(
        spread >= every * 3 / 10,
        "the sessions' pings came within {spread:?} of each other: one burst"
    );
    for (a, b) in &pings {
        let gap = *b - *a;
        assert!(
            gap >= every / 2 && gap <= every * 2,
            "a session's pings came {gap:?} apart, its heartbeat is {every:?}"
        );
    }
}
