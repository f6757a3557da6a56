//! The backend HTTP API (`/api/v1`, API key), seed 002's `/api/online-status/*` (client JWT), the root
//! probes, and the error shape: every endpoint of the backend HTTP API except push delivery.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// The `event` names of a history reply, in order.
fn events_of(h: &Value) -> Vec<String> {
    h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

/// The `seq`s of a history reply, in order.
fn seqs_of(h: &Value) -> Vec<u64> {
    h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// The channels of a publish reply's `deliveries`, in order.
fn channels_of(r: &Value) -> Vec<&str> {
    r["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect()
}

/// A JSON array of strings, sorted.
fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn publish_to_channel_room_and_users() {
    let t = TestServer::start().await;
    t.join("r1", "bob").await;
    let mut bob = t.ws("bob").await;
    assert_eq!(
        bob.request(json!({"op":"subscribe","channel":"room:r1"}))
            .await["ok"],
        true
    );

    // channel + from
    let r = t
        .publish(json!({"event":"chat.message","channel":"room:r1","from":"alice","data":{"text":"one"}}))
        .await;
    assert!(r["id"].is_string(), "{r}");
    assert_eq!(r["deliveries"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["deliveries"][0]["channel"], "room:r1");
    assert_eq!(r["deliveries"][0]["seq"], 1);
    assert!(
        r["deliveries"][0]["epoch"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{r}"
    );
    assert_eq!(r["push"]["planned"], 0, "{r}");
    let ev = bob.event_on("room:r1").await;
    assert_eq!(ev["data"]["text"], "one");
    assert_eq!(ev["from"], "alice");
    assert_eq!(ev["id"], r["id"]);
    assert_eq!(ev["seq"], 1);
    assert_eq!(ev["epoch"], r["deliveries"][0]["epoch"]);
    assert!(
        ev["ts"].as_i64().is_some_and(|ts| ts > 1_600_000_000_000),
        "{ev}"
    );

    // room (bare id), no from
    let r = t
        .publish(json!({"event":"chat.message","room":"r1","data":{"text":"two"}}))
        .await;
    assert_eq!(r["deliveries"][0]["channel"], "room:r1");
    assert_eq!(r["deliveries"][0]["seq"], 2);
    let ev = bob.event_on("room:r1").await;
    assert_eq!(ev["data"]["text"], "two");
    assert!(ev["from"].is_null(), "{ev}");

    // to: users
    let r = t
        .publish(json!({"event":"notice","to":["bob","carol"],"data":{"n":3}}))
        .await;
    assert_eq!(channels_of(&r), ["user:bob", "user:carol"], "{r}");
    assert_eq!(r["deliveries"][0]["seq"], 1);
    assert_eq!(r["deliveries"][1]["seq"], 1);
    let ev = bob.event_on("user:bob").await;
    assert_eq!(ev["event"], "notice");
    assert_eq!(ev["data"]["n"], 3);

    // All of it stored where it went.
    let h = t.history("room:r1", 0).await;
    assert_eq!(seqs_of(&h), [1, 2]);
    assert_eq!(h["events"][0]["from"], "alice");
    assert_eq!(h["events"][1]["data"]["text"], "two");
    let h = t.history("user:carol", 0).await;
    assert_eq!(events_of(&h), ["notice"]);
}

#[tokio::test]
async fn a_channel_named_twice_in_one_publish_gets_the_event_once() {
    let t = TestServer::start().await;
    let mut bob = t.ws("bob").await;
    for body in [
        json!({"event":"notice","to":["bob","carol","bob"],"data":{"n":1}}),
        json!({"event":"notice","channel":"user:bob","to":["carol","bob"],"data":{"n":2}}),
    ] {
        let r = t.publish(body).await;
        assert_eq!(channels_of(&r), ["user:bob", "user:carol"], "{r}");
    }
    // Each stored once, and bob's session gets each once: the next frame after n=1 is n=2.
    assert_eq!(seqs_of(&t.history("user:bob", 0).await), [1, 2]);
    assert_eq!(seqs_of(&t.history("user:carol", 0).await), [1, 2]);
    for (n, seq) in [(1, 1), (2, 2)] {
        let ev = bob.event_on("user:bob").await;
        assert_eq!(
            (ev["data"]["n"].as_i64(), ev["seq"].as_i64()),
            (Some(n), Some(seq)),
            "{ev}"
        );
    }
}

#[tokio::test]
async fn idempotency_key_in_body_or_header_returns_first_reply_and_stores_once() {
    let t = TestServer::start().await;
    let body = json!({"event":"order.paid","to":["u1"],"data":{"order":7},"idempotency_key":"k-1"});
    let first = t.publish(body.clone()).await;
    let again = t.publish(body).await;
    assert_eq!(first, again, "a repeated key returns the first reply");
    assert_eq!(seqs_of(&t.history("user:u1", 0).await), [1], "stored once");

    // The same through the `Idempotency-Key` header.
    let body = json!({"event":"order.paid","to":["u2"],"data":{"order":8}})
        .to_string()
        .into_bytes();
    let headers = [
        ("authorization", &*format!("Bearer {API_KEY}")),
        ("content-type", "application/json"),
        ("idempotency-key", "k-2"),
    ];
    let (s1, r1) = t
        .raw("POST", "/api/v1/events", Some(body.clone()), &headers)
        .await;
    let (s2, r2) = t.raw("POST", "/api/v1/events", Some(body), &headers).await;
    assert_eq!((s1, s2), (200, 200), "{r1} {r2}");
    assert_eq!(r1, r2);
    assert_eq!(seqs_of(&t.history("user:u2", 0).await), [1], "stored once");

    // A different key is a different event.
    let r3 = t
        .publish(json!({"event":"order.paid","to":["u2"],"data":{},"idempotency_key":"k-3"}))
        .await;
    assert_ne!(r3["id"], r1["id"]);
    assert_eq!(r3["deliveries"][0]["seq"], 2);
}

#[tokio::test]
async fn notifications_publish_is_an_alias_of_events() {
    let t = TestServer::start().await;
    let (s, r) = t
        .api(
            "POST",
            "/api/v1/notifications/publish",
            Some(json!({"event":"invoice.due","to":["u1"],"data":{"amount":3}})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["deliveries"][0]["channel"], "user:u1");
    assert_eq!(r["deliveries"][0]["seq"], 1);
    let h = t.history("user:u1", 0).await;
    assert_eq!(h["events"][0]["id"], r["id"]);
    assert_eq!(h["events"][0]["data"]["amount"], 3);
}

#[tokio::test]
async fn history_since_is_exclusive_and_limit_is_bounded() {
    let t = TestServer::start().await;
    let mut epoch = Value::Null;
    for i in 1..=3 {
        let r = t
            .publish(json!({"event":"m","room":"r1","data":{"i":i}}))
            .await;
        epoch = r["deliveries"][0]["epoch"].clone();
    }
    let h = t.history("room:r1", 1).await;
    assert_eq!(h["channel"], "room:r1");
    assert_eq!(h["epoch"], epoch);
    assert_eq!(h["recovered"], true);
    assert_eq!(seqs_of(&h), [2, 3], "since is exclusive");
    assert_eq!(h["events"][0]["data"]["i"], 2);
    assert_eq!(h["events"][0]["channel"], "room:r1");
    assert_eq!(seqs_of(&t.history("room:r1", 0).await), [1, 2, 3]);
    assert!(seqs_of(&t.history("room:r1", 3).await).is_empty());

    let (s, h) = t
        .api(
            "GET",
            "/api/v1/channels/room:r1/history?since=1&limit=1",
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(seqs_of(&h), [2]);
    let (s, h) = t
        .api("GET", "/api/v1/channels/room:r1/history?limit=1000", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(seqs_of(&h), [1, 2, 3]);
    assert_error(
        &t.api("GET", "/api/v1/channels/room:r1/history?limit=1001", None)
            .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api("GET", "/api/v1/channels/room:r1/history?since=abc", None)
            .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api("GET", "/api/v1/channels/nope:r1/history", None).await,
        400,
        "bad_channel",
    );

    // Seed 003 alias.
    let (s, h) = t.api("GET", "/api/v1/rooms/r1/events?since=2", None).await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(h["channel"], "room:r1");
    assert_eq!(seqs_of(&h), [3]);
    assert_error(
        &t.api("GET", "/api/v1/rooms/r1/events?limit=5000", None)
            .await,
        400,
        "bad_frame",
    );
}

#[tokio::test]
async fn members_put_get_delete_store_no_event() {
    let t = TestServer::start().await;
    let (s, v) = t.api("PUT", "/api/v1/rooms/r1/members/alice", None).await;
    assert_eq!(s, 200, "{v}");
    t.join("r1", "bob").await;
    let (s, v) = t.api("GET", "/api/v1/rooms/r1/members", None).await;
    assert_eq!(s, 200);
    assert_eq!(sorted(&v["members"]), ["alice", "bob"]);

    // A member may now subscribe from a client; a non-member may not.
    let mut bob = t.ws("bob").await;
    assert_eq!(
        bob.request(json!({"op":"subscribe","channel":"room:r1"}))
            .await["ok"],
        true
    );
    let mut carol = t.ws("carol").await;
    let r = carol
        .request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    assert_eq!(r["error"]["code"], "not_member", "{r}");

    let (s, v) = t
        .api("DELETE", "/api/v1/rooms/r1/members/alice", None)
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/members", None).await;
    assert_eq!(sorted(&v["members"]), ["bob"]);

    // Membership changes store no event.
    assert!(
        t.history("room:r1", 0).await["events"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_error(
        &t.api("PUT", "/api/v1/rooms/r%201/members/alice", None)
            .await,
        400,
        "bad_channel",
    );
}

#[tokio::test]
async fn leave_stores_member_left_and_room_left() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut alice = t.ws("alice").await;
    let mut bob = t.ws("bob").await;
    for ws in [&mut alice, &mut bob] {
        assert_eq!(
            ws.request(json!({"op":"subscribe","channel":"room:r1"}))
                .await["ok"],
            true
        );
    }

    let (s, v) = t.api("POST", "/api/v1/rooms/r1/leave/bob", None).await;
    assert_eq!(s, 200, "{v}");
    let left = alice.event_on("room:r1").await;
    assert_eq!(left["event"], "member.left");
    assert_eq!(left["data"], json!({"room":"r1","user":"bob"}));
    let mine = bob.event_on("user:bob").await;
    assert_eq!(mine["event"], "room.left");
    assert_eq!(mine["data"]["room"], "r1");

    let h = t.history("room:r1", 0).await;
    assert_eq!(events_of(&h), ["member.left"]);
    assert_eq!(h["events"][0]["data"]["user"], "bob");
    let h = t.history("user:bob", 0).await;
    assert_eq!(events_of(&h), ["room.left"]);
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/members", None).await;
    assert_eq!(sorted(&v["members"]), ["alice"]);

    assert_error(
        &t.api("POST", "/api/v1/rooms/r1/leave/bob", None).await,
        403,
        "not_member",
    );
    assert_error(
        &t.api("POST", "/api/v1/rooms/r1/leave/nobody", None).await,
        403,
        "not_member",
    );
    // Nothing more was stored by the refused leaves.
    assert_eq!(seqs_of(&t.history("room:r1", 0).await), [1]);
}

#[tokio::test]
async fn room_presence_lists_ws_subscribers_and_http_heartbeats() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "carol").await;
    let (s, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["room"], "r1");
    assert!(v["users"].as_array().unwrap().is_empty(), "{v}");

    let mut alice = t.ws("alice").await;
    assert_eq!(
        alice
            .request(json!({"op":"subscribe","channel":"room:r1"}))
            .await["ok"],
        true
    );
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(sorted(&v["users"]), ["alice"]);

    let (s, v) = t
        .api(
            "POST",
            "/api/v1/rooms/r1/presence/heartbeat",
            Some(json!({"user":"carol"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(sorted(&v["users"]), ["alice", "carol"]);
    // The heartbeat also makes carol online.
    let (_, p) = t.api("GET", "/api/v1/presence/carol", None).await;
    assert_eq!(p["online"], true, "{p}");

    // Only members can be present in a room.
    assert_error(
        &t.api(
            "POST",
            "/api/v1/rooms/r1/presence/heartbeat",
            Some(json!({"user":"mallory"})),
        )
        .await,
        403,
        "not_member",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/rooms/r1/presence/heartbeat",
            Some(json!({})),
        )
        .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/rooms/bad!room/presence/heartbeat",
            Some(json!({"user":"dave"})),
        )
        .await,
        400,
        "bad_channel",
    );
    // A refused heartbeat changes nothing: neither is online, nor present in the room.
    for user in ["mallory", "dave"] {
        let (_, p) = t
            .api("GET", &format!("/api/v1/presence/{user}"), None)
            .await;
        assert_eq!(p["online"], false, "{user}: {p}");
    }
    let (_, v) = t.api("GET", "/api/v1/rooms/r1/presence", None).await;
    assert_eq!(sorted(&v["users"]), ["alice", "carol"]);
}

#[tokio::test]
async fn contacts_and_presence_queries() {
    let t = TestServer::start().await;
    let (s, v) = t
        .api(
            "PUT",
            "/api/v1/users/alice/contacts",
            Some(json!({"contacts":["bob","carol"]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = t.api("GET", "/api/v1/users/alice/contacts", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sorted(&v["contacts"]), ["bob", "carol"]);
    // Replaced, not merged.
    t.api(
        "PUT",
        "/api/v1/users/alice/contacts",
        Some(json!({"contacts":["bob"]})),
    )
    .await;
    let (_, v) = t.api("GET", "/api/v1/users/alice/contacts", None).await;
    assert_eq!(sorted(&v["contacts"]), ["bob"]);
    // Contacts are what a user may watch.
    let mut alice = t.ws("alice").await;
    assert_eq!(
        alice.request(json!({"op":"watch","users":["bob"]})).await["ok"],
        true
    );
    let r = alice.request(json!({"op":"watch","users":["carol"]})).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    assert_error(
        &t.api(
            "PUT",
            "/api/v1/users/alice/contacts",
            Some(json!({"contacts":["bad id"]})),
        )
        .await,
        400,
        "bad_channel",
    );

    let _bob = t.ws("bob").await;
    let (s, p) = t.api("GET", "/api/v1/presence/bob", None).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["user"], "bob");
    assert_eq!(p["online"], true);
    assert_eq!(p["devices"].as_array().unwrap().len(), 1, "{p}");
    assert!(
        p.get("status").is_some() && p.get("last_seen").is_some(),
        "{p}"
    );
    assert!(p.get("type").is_none(), "without type: {p}");
    let (s, p) = t.api("GET", "/api/v1/presence/dave", None).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["online"], false);

    let (s, q) = t
        .api(
            "POST",
            "/api/v1/presence/query",
            Some(json!({"users":["alice","bob","dave"]})),
        )
        .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(q["presence"]["alice"]["online"], true);
    assert_eq!(q["presence"]["bob"]["online"], true);
    assert_eq!(q["presence"]["dave"]["online"], false);
    assert_eq!(q["presence"]["dave"]["user"], "dave");
}

#[tokio::test]
async fn online_count_and_paged_list() {
    let t = TestServer::start().await;
    let (s, v) = t.api("GET", "/api/v1/presence/online/count", None).await;
    assert_eq!((s, &v), (200, &json!({"count": 0})));
    let mut clients = Vec::new();
    for u in ["u1", "u2", "u3", "u4", "u5"] {
        clients.push(t.ws(u).await);
    }
    clients.push(t.ws("u3").await); // a second device counts once
    let (_, v) = t.api("GET", "/api/v1/presence/online/count", None).await;
    assert_eq!(v["count"], 5, "{v}");

    let mut seen = Vec::new();
    let mut cursor = String::new();
    for page in 0.. {
        assert!(page < 5, "paging does not end: {seen:?}");
        let (s, v) = t
            .api(
                "GET",
                &format!("/api/v1/presence/online?limit=2&cursor={cursor}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let users = v["users"].as_array().unwrap();
        assert!(users.len() <= 2, "{v}");
        seen.extend(users.iter().map(|u| u.as_str().unwrap().to_string()));
        match v["cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["u1", "u2", "u3", "u4", "u5"],
        "every online user once"
    );

    drop(clients);
    let (_, v) = t.api("GET", "/api/v1/presence/online", None).await;
    assert!(v["users"].is_array() && v.get("cursor").is_some(), "{v}");
}

#[tokio::test]
async fn unread_counts_per_room_and_read_moves_the_pointer() {
    let t = TestServer::start().await;
    for (room, user) in [
        ("r1", "alice"),
        ("r1", "bob"),
        ("r2", "alice"),
        ("r2", "bob"),
    ] {
        t.join(room, user).await;
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = t
            .publish(json!({"event":"chat.message","room":"r1","from":"alice","data":{"i":i}}))
            .await;
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    // A client's own message, through the WebSocket.
    let mut bob = t.ws("bob").await;
    let r = bob
        .request(
            json!({"op":"publish","channel":"room:r2","event":"chat.message","data":{"t":"b"}}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // Not a room: never unread.
    t.publish(json!({"event":"notice","to":["bob"],"data":{}}))
        .await;

    let (s, v) = t.api("GET", "/api/v1/users/bob/unread", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["unread"],
        json!({"r1": 3}),
        "sender's own r2 message does not count"
    );
    let (_, v) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    assert_eq!(
        v["unread"],
        json!({"r2": 1}),
        "alice's own r1 messages do not count"
    );

    let (s, v) = t
        .api(
            "POST",
            "/api/v1/users/bob/read",
            Some(json!({"room":"r1","seq":2})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["seq"], 2);
    assert_eq!(v["unread"], 1);
    let (_, v) = t.api("GET", "/api/v1/users/bob/unread", None).await;
    assert_eq!(v["unread"], json!({"r1": 1}));

    // Seed 003 aliases.
    let (s, v) = t
        .api("GET", "/api/v1/notifications/unread?userId=bob", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["unread"], json!({"r1": 1}));
    assert_eq!(v["total"], 1);
    let (s, v) = t
        .api(
            "PATCH",
            &format!("/api/v1/notifications/{}/read?userId=bob", ids[2]),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["room"], "r1");
    assert_eq!(v["seq"], 3);
    assert_eq!(v["unread"], 0);
    let (_, v) = t
        .api("GET", "/api/v1/notifications/unread?userId=bob", None)
        .await;
    assert_eq!(v["unread"], json!({}));
    assert_eq!(v["total"], 0);
    // The connect sync agrees.
    let bob2 = t.ws("bob").await;
    assert_eq!(bob2.connected["sync"]["unread"], json!({}));
    let alice = t.ws("alice").await;
    assert_eq!(alice.connected["sync"]["unread"], json!({"r2": 1}));

    assert_error(
        &t.api(
            "POST",
            "/api/v1/users/carol/read",
            Some(json!({"room":"r1","seq":1})),
        )
        .await,
        403,
        "not_member",
    );
    assert_error(
        &t.api("GET", "/api/v1/notifications/unread", None).await,
        400,
        "bad_frame",
    );
    let (s, v) = t
        .api(
            "PATCH",
            "/api/v1/notifications/0190aaaa-0000-7000-8000-000000000000/read?userId=bob",
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn devices_are_stored_and_validated() {
    let hook = crate::fakes::webhook::FakeWebhook::start().await;
    let hook_config = hook.config();
    let t = TestServer::start_with(move |c| c.push.webhook = Some(hook_config)).await;
    let ok = [
        (
            "d1",
            json!({"provider":"webhook","token":"hook-token","platform":"android"}),
        ),
        ("d2", json!({"provider":"webhook"})),
        (
            "d3",
            json!({"provider":"webhook","token":"t3","platform":"web"}),
        ),
    ];
    for (d, body) in &ok {
        let (s, v) = t
            .api(
                "PUT",
                &format!("/api/v1/users/u1/devices/{d}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, 200, "{d}: {v}");
    }
    let (s, v) = t.api("GET", "/api/v1/users/u1/devices", None).await;
    assert_eq!(s, 200, "{v}");
    let mut names: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d1", "d2", "d3"], "{v}");

    let (s, v) = t.api("DELETE", "/api/v1/users/u1/devices/d2", None).await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = t.api("GET", "/api/v1/users/u1/devices", None).await;
    assert_eq!(v["devices"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        t.api("DELETE", "/api/v1/users/u1/devices/d2", None).await.0,
        404
    );

    let bad = [
        json!({"provider":"carrier-pigeon","token":"x"}),
        json!({"provider":"webhook","token":""}),
        // Providers this server has no configuration for: nothing could ever be sent.
        json!({"provider":"fcm","token":"fcm-token"}),
        json!({"provider":"apns","token":"ab".repeat(32)}),
        json!({"provider":"webpush","subscription":{"endpoint":"https://fcm.googleapis.com/fcm/send/x","keys":{}}}),
        json!({"provider":"fcm"}),
        json!({"provider":"webpush"}),
        json!({"token":"x"}),
    ];
    for body in bad {
        let got = t
            .api("PUT", "/api/v1/users/u1/devices/d9", Some(body.clone()))
            .await;
        assert_error(&got, 400, "bad_frame");
    }
    let (_, v) = t.api("GET", "/api/v1/users/u1/devices", None).await;
    assert_eq!(
        v["devices"].as_array().unwrap().len(),
        2,
        "refused devices are not stored: {v}"
    );
}

#[tokio::test]
async fn announcements_reach_later_clients_once_and_live_clients_on_global() {
    let t = TestServer::start().await;
    let mut early = t.ws("early").await;
    assert!(
        early.connected["sync"]["announcements"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let (s, v) = t
        .api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"title":"Maintenance","body":"Sunday 2am","url":"https://status.example","expires":"1d"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["announcement"]["id"]
        .as_str()
        .expect("announcement id")
        .to_string();

    // Live on `global` to the connected client.
    let live = early.event_on("global").await;
    assert_eq!(live["event"], "announcement");
    assert_eq!(live["data"]["id"], id.as_str());
    assert_eq!(live["data"]["title"], "Maintenance");
    assert_eq!(live["data"]["body"], "Sunday 2am");
    assert_eq!(live["data"]["url"], "https://status.example");

    let (s, list) = t.api("GET", "/api/v1/announcements", None).await;
    assert_eq!(s, 200, "{list}");
    let list = list["announcements"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    // A client connecting afterwards gets it in its login sync, once.
    let late = t.ws("late").await;
    let sync = late.connected["sync"]["announcements"].as_array().unwrap();
    assert_eq!(sync.len(), 1, "{}", late.connected);
    assert_eq!(sync[0]["event"], "announcement");
    assert_eq!(sync[0]["channel"], "global");
    assert_eq!(sync[0]["data"]["id"], id.as_str());
    assert_eq!(sync[0]["data"]["title"], "Maintenance");
    let late2 = t.ws("late").await;
    assert!(
        late2.connected["sync"]["announcements"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a second connection of the same user does not get it again: {}",
        late2.connected
    );

    assert_error(
        &t.api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"body":"no title"})),
        )
        .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"title":"t","body":"b","expires":1})),
        )
        .await,
        400,
        "bad_frame",
    );
}

#[tokio::test]
async fn announcement_audience_filters_sync_and_live_delivery() {
    let t = TestServer::start().await;
    let with_locale = |user: &str, locale: &str| {
        let mut c = claims(user);
        c.attrs.insert("locale".into(), json!(locale));
        t.token_with(c)
    };
    let mut ko_live = t.ws_token(&with_locale("ko-live", "ko")).await;
    let mut en_live = t.ws_token(&with_locale("en-live", "en")).await;
    let mut none_live = t.ws("none-live").await;

    let (s, v) = t
        .api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"title":"안녕","body":"ko only","audience":{"locale":"ko"}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let ev = ko_live.event_on("global").await;
    assert_eq!(ev["data"]["title"], "안녕");
    let not_global = |v: &Value| v["type"] == "event" && v["channel"] == "global";
    en_live
        .assert_none(Duration::from_millis(300), not_global)
        .await;
    none_live
        .assert_none(Duration::from_millis(50), not_global)
        .await;

    let ko = t.ws_token(&with_locale("ko-late", "ko")).await;
    let sync = ko.connected["sync"]["announcements"].as_array().unwrap();
    assert_eq!(sync.len(), 1, "{}", ko.connected);
    assert_eq!(sync[0]["data"]["body"], "ko only");
    let en = t.ws_token(&with_locale("en-late", "en")).await;
    assert!(
        en.connected["sync"]["announcements"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{}",
        en.connected
    );
    let none = t.ws("none-late").await;
    assert!(
        none.connected["sync"]["announcements"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{}",
        none.connected
    );
}

#[tokio::test]
async fn disconnect_user_closes_every_session_with_a_disconnect_frame() {
    let t = TestServer::start().await;
    let mut a1 = t.ws("alice").await;
    let mut a2 = t.ws("alice").await;
    let mut bob = t.ws("bob").await;
    let (s, v) = t.api("POST", "/api/v1/users/alice/disconnect", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["closed"], 2, "{v}");
    for ws in [&mut a1, &mut a2] {
        let c = ws.closed().await;
        assert!(
            c.disconnect.is_some_and(|code| code >= 4000),
            "a disconnect frame before the close: {c:?}"
        );
        assert_eq!(c.close.map(u64::from), c.disconnect, "{c:?}");
    }
    // Others stay connected.
    assert_eq!(bob.request(json!({"op":"ping"})).await["type"], "pong");
    // Presence follows once the closed sessions have cleaned up (asynchronously).
    let p = t
        .api_until("/api/v1/presence/alice", |p| p["online"] == false)
        .await;
    assert_eq!(p["online"], false, "{p}");
}

#[tokio::test]
async fn health_ready_and_metrics_at_the_root_without_a_key() {
    let t = TestServer::start().await;
    let (s, v) = t.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = t.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "{v}");

    // Some traffic, then the Prometheus text.
    let _ws = t.ws("m1").await;
    t.publish(json!({"event":"m","to":["m1"],"data":{}})).await;
    let resp = t.http.get(t.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = resp.text().await.unwrap();
    for name in [
        "herald_events_published_total",
        "herald_sessions_opened_total",
        "herald_sessions",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("# TYPE herald_")),
        "Prometheus text format:\n{text}"
    );
}

#[tokio::test]
async fn api_errors_have_the_protocol_shape() {
    let t = TestServer::start().await;
    let body = json!({"event":"m","to":["u1"],"data":{}});

    // Credentials.
    assert_error(
        &t.call("POST", "/api/v1/events", Some(body.clone()), None)
            .await,
        401,
        "unauthorized",
    );
    assert_error(
        &t.call(
            "POST",
            "/api/v1/events",
            Some(body.clone()),
            Some("wrong-key"),
        )
        .await,
        401,
        "unauthorized",
    );
    assert_error(
        &t.call(
            "POST",
            "/api/v1/events",
            Some(body.clone()),
            Some(ADMIN_KEY),
        )
        .await,
        401,
        "unauthorized",
    );
    let jwt = t.token("u1");
    assert_error(
        &t.call("POST", "/api/v1/events", Some(body.clone()), Some(&jwt))
            .await,
        401,
        "unauthorized",
    );
    assert_error(
        &t.call("GET", "/api/v1/presence/online/count", None, Some(&jwt))
            .await,
        401,
        "unauthorized",
    );
    assert_error(
        &t.call("GET", "/api/v1/users/u1/unread", None, None).await,
        401,
        "unauthorized",
    );

    // Bodies.
    let auth = format!("Bearer {API_KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let malformed = t
        .raw(
            "POST",
            "/api/v1/events",
            Some(b"{\"event\":".to_vec()),
            &headers,
        )
        .await;
    assert_error(&malformed, 400, "bad_frame");
    let not_object = t
        .raw("POST", "/api/v1/events", Some(b"[1,2]".to_vec()), &headers)
        .await;
    assert_error(&not_object, 400, "bad_frame");
    assert_error(
        &t.api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"m","data":{}})),
        )
        .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/events",
            Some(json!({"to":["u1"],"data":{}})),
        )
        .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"bad type!","to":["u1"]})),
        )
        .await,
        400,
        "bad_frame",
    );
    assert_error(
        &t.api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"m","to":["u1"],"from":"a b"})),
        )
        .await,
        400,
        "bad_frame",
    );

    // Channel names.
    for bad in [
        json!({"event":"m","channel":"nope:x","data":{}}),
        json!({"event":"m","channel":"room:a b","data":{}}),
        json!({"event":"m","channel":"room:","data":{}}),
        json!({"event":"m","channel":format!("room:{}", "a".repeat(129)),"data":{}}),
        json!({"event":"m","room":"room:r1","data":{}}),
        json!({"event":"m","to":["u/1"],"data":{}}),
    ] {
        assert_error(
            &t.api("POST", "/api/v1/events", Some(bad.clone())).await,
            400,
            "bad_channel",
        );
    }

    // Size: data over 64 KiB.
    let big = json!({"event":"m","to":["u1"],"data":{"blob":"x".repeat(70 * 1024)}});
    assert_error(
        &t.api("POST", "/api/v1/events", Some(big)).await,
        413,
        "too_large",
    );
    let huge = json!({"event":"m","to":["u1"],"data":{"blob":"x".repeat(200 * 1024)}});
    assert_error(
        &t.api("POST", "/api/v1/events", Some(huge)).await,
        413,
        "too_large",
    );
    // Just under the limit passes.
    let fits = json!({"event":"m","to":["u1"],"data":"x".repeat(60 * 1024)});
    assert_eq!(t.api("POST", "/api/v1/events", Some(fits)).await.0, 200);

    // Unknown endpoints.
    assert_error(&t.api("GET", "/api/v1/nope", None).await, 404, "not_found");
    assert_error(&t.call("GET", "/nope", None, None).await, 404, "not_found");

    // Nothing refused was stored.
    assert_eq!(seqs_of(&t.history("user:u1", 0).await), [1]);
}

#[tokio::test]
async fn wrong_method_on_a_known_path_has_the_error_shape() {
    let t = TestServer::start().await;
    let got = t.api("DELETE", "/api/v1/events", None).await;
    assert_error(&got, 405, "method_not_allowed");
    assert_error(
        &t.api("GET", "/api/v1/users/u1/read", None).await,
        405,
        "method_not_allowed",
    );
}

// ---- seed 002: /api/online-status/* with a client JWT ----

#[tokio::test]
async fn online_status_aliases_with_a_client_jwt() {
    let t = TestServer::start().await;
    t.api(
        "PUT",
        "/api/v1/users/alice/contacts",
        Some(json!({"contacts":["bob","42"]})),
    )
    .await;
    let _bob = t.ws("bob").await;
    let jwt = t.token("alice");
    let call = |method: &'static str, path: &'static str, body: Option<Value>| {
        let jwt = jwt.clone();
        let t = &t;
        async move {
            t.call(
                method,
                &format!("/api/online-status{path}"),
                body,
                Some(&jwt),
            )
            .await
        }
    };

    let (s, v) = call("POST", "/users", Some(json!({"user_ids":["bob", 42]}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["bob"]["is_online"], true, "{v}");
    assert!(v["bob"].get("last_activity").is_some(), "{v}");
    assert_eq!(
        v["42"]["is_online"], false,
        "numbers are accepted as ids: {v}"
    );
    assert!(v["42"].get("last_seen").is_some(), "{v}");

    let (s, v) = call("GET", "/user/bob", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["is_online"], true);
    assert_eq!(v["user_id"], "bob");
    let (_, v) = call("GET", "/user/carol", None).await;
    assert_eq!(v["is_online"], false, "{v}");

    let (s, v) = call("GET", "/friends", None).await;
    assert_eq!(s, 200, "{v}");
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["42", "bob"], "{v}");
    assert_eq!(v["bob"]["is_online"], true);

    let (_, v) = call("GET", "/count", None).await;
    assert_eq!(v["count"], 1, "{v}");
    let (s, v) = call("POST", "/heartbeat", None).await;
    assert_eq!(s, 200, "{v}");
    let (_, p) = t.api("GET", "/api/v1/presence/alice", None).await;
    assert_eq!(p["online"], true, "a heartbeat makes the user online: {p}");
    let (_, v) = call("GET", "/count", None).await;
    assert_eq!(v["count"], 2, "{v}");
    let (s, v) = call("GET", "/online", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sorted(&v["users"]), ["alice", "bob"]);

    // The token may also come as ?token=.
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/online-status/count?token={jwt}"),
            None,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn online_status_refuses_missing_or_invalid_tokens() {
    let t = TestServer::start().await;
    let mut expired = claims("alice");
    expired.exp = herald::transport::auth::unix_now() - 3600;
    let expired = t.token_with(expired);
    let routes: [(&str, &str, Option<Value>); 6] = [
        (
            "POST",
            "/api/online-status/users",
            Some(json!({"user_ids":["bob"]})),
        ),
        ("GET", "/api/online-status/user/bob", None),
        ("GET", "/api/online-status/friends", None),
        ("POST", "/api/online-status/heartbeat", None),
        ("GET", "/api/online-status/count", None),
        ("GET", "/api/online-status/online", None),
    ];
    for (method, path, body) in routes {
        for bearer in [
            None,
            Some("not-a-jwt"),
            Some(API_KEY),
            Some(expired.as_str()),
        ] {
            let got = t.call(method, path, body.clone(), bearer).await;
            assert_error(&got, 401, "unauthorized");
        }
    }
    // The refused heartbeat did not make anyone online.
    let (_, v) = t.api("GET", "/api/v1/presence/online/count", None).await;
    assert_eq!(v["count"], 0, "{v}");
}

#[tokio::test]
async fn an_announcement_seen_live_is_not_synced_again_after_reconnect() {
    let t = TestServer::start().await;
    t.api(
        "PUT",
        "/api/v1/users/bob/contacts",
        Some(json!({"contacts":["alice"]})),
    )
    .await;
    let mut bob = t.ws("bob").await;
    assert_eq!(
        bob.request(json!({"op":"watch","users":["alice"]})).await["ok"],
        true
    );
    let mut alice = t.ws("alice").await;
    bob.wait_for(|v| {
        v["type"] == "presence.changed" && v["user"] == "alice" && v["online"] == true
    })
    .await;
    let (s, v) = t
        .api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"title":"live","body":"b"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(alice.event_on("global").await["data"]["title"], "live");
    drop(alice);
    // Alice's session is fully closed once her watcher hears she went offline.
    bob.wait_for(|v| {
        v["type"] == "presence.changed" && v["user"] == "alice" && v["online"] == false
    })
    .await;
    let again = t.ws("alice").await;
    assert_eq!(
        again.connected["sync"]["announcements"],
        json!([]),
        "{}",
        again.connected
    );
}

/// Regression: an announcement one device got live is not shown again to another device of the
/// same user connecting while the first is still connected (one per-user cursor across devices).
#[tokio::test]
async fn announcement_seen_live_is_not_synced_to_a_second_device() {
    let t = TestServer::start().await;
    let mut phone = t.ws("amy").await;
    let (s, v) = t
        .api(
            "POST",
            "/api/v1/announcements",
            Some(json!({"title":"Hello","body":"b"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let live = phone.event_on("global").await;
    assert_eq!(
        live["id"], v["announcement"]["id"],
        "live event id = announcement id"
    );
    // The phone's session handles what it was sent before it answers the next frame.
    assert_eq!(phone.request(json!({"op":"ping"})).await["type"], "pong");
    let laptop = t.ws("amy").await;
    assert!(
        laptop.connected["sync"]["announcements"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{}",
        laptop.connected
    );
}

/// Every JSON reply, errors included, ends with a newline (a `curl` in a terminal ends its line).
#[tokio::test]
async fn json_replies_end_with_a_newline() {
    let t = TestServer::start().await;
    let calls: [(&str, &str, Option<&str>, Option<&str>); 6] = [
        ("GET", "/healthz", None, None),
        (
            "POST",
            "/api/v1/events",
            Some(r#"{"event":"n","to":["u1"],"data":{}}"#),
            Some(API_KEY),
        ),
        ("GET", "/api/v1/presence/u1", None, Some(API_KEY)),
        ("GET", "/api/v1/presence/u1", None, Some("wrong-key")),
        ("POST", "/api/v1/events", Some("{not json"), Some(API_KEY)),
        ("GET", "/admin/rules", None, Some(ADMIN_KEY)),
    ];
    for (method, path, body, key) in calls {
        let mut req = t
            .http
            .request(method.parse().unwrap(), t.url(path))
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let text = resp.text().await.unwrap();
        assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
        assert!(text.ends_with("}\n"), "{method} {path}: {text:?}");
        serde_json::from_str::<Value>(&text).expect("still one JSON value");
    }
}

/// An offline user's presence has no custom status (they are not "online" or "busy" while away);
/// the status they set is kept and shows again when they come back.
#[tokio::test]
async fn an_offline_users_presence_carries_no_status() {
    let t = TestServer::start().await;
    let (_, p) = t.api("GET", "/api/v1/presence/dave", None).await;
    assert_eq!(p["online"], false, "{p}");
    assert!(p.get("status").is_none() && p.get("text").is_none(), "{p}");
    let mut dave = t.ws("dave").await;
    let r = dave
        .request(json!({"op": "status", "status": "busy", "text": "in a meeting"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    dave.close_client().await;
    let p = t
        .api_until("/api/v1/presence/dave", |v| v["online"] == false)
        .await;
    assert!(p.get("status").is_none() && p.get("text").is_none(), "{p}");
    let (_, q) = t
        .api(
            "POST",
            "/api/v1/presence/query",
            Some(json!({"users": ["dave"]})),
        )
        .await;
    assert!(q["presence"]["dave"].get("status").is_none(), "{q}");
    let _back = t.ws("dave").await;
    let p = t
        .api_until("/api/v1/presence/dave", |v| v["online"] == true)
        .await;
    assert_eq!(
        (p["status"].clone(), p["text"].clone()),
        (json!("busy"), json!("in a meeting"))
    );
}

/// The largest seq a client or backend can name is an empty page, not an overflow: `since` at
/// u64::MAX through the API, and `subscribe` with `since` and `history` with `from` at it over the
/// WebSocket (found by the HTTP fuzz: the recovery check added one to it).
#[tokio::test]
async fn history_after_the_largest_seq_is_an_empty_page() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.publish(json!({"channel": "room:r1", "event": "chat.message", "data": {}}))
        .await;
    let h = t.history("room:r1", u64::MAX).await;
    assert_eq!(h["events"], json!([]), "{h}");
    assert_eq!(h["seq"], 1, "{h}");
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": u64::MAX}))
        .await;
    assert_eq!(
        (r["ok"].clone(), r["events"].clone()),
        (json!(true), json!([])),
        "{r}"
    );
    let epoch = h["epoch"].clone();
    let r = ws
        .request(json!({"op": "subscribe", "channel": "room:r1",
            "since": {"epoch": epoch, "seq": u64::MAX}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["recovered"], false,
        "a position past the channel's end: {r}"
    );
    t.stop().await;
}
