//! WebSocket: connect, subscribe/publish/replay, errors.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn connected_frame_carries_own_channels_and_sync() {
    let t = TestServer::start().await;
    let ws = t.ws("alice").await;
    let c = &ws.connected;
    assert_eq!(c["user"], "alice");
    assert!(c["conn"].is_string() && c["device"].is_string() && c["node"].is_string());
    assert!(c["channels"]["user:alice"]["epoch"].is_string());
    assert_eq!(c["channels"]["global"]["seq"], 0);
    assert!(c["sync"]["unread"].is_object());
    assert!(c["sync"]["announcements"].is_array());
}

#[tokio::test]
async fn room_message_reaches_members_but_not_sender() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut a = t.ws("alice").await;
    let mut b = t.ws("bob").await;
    for ws in [&mut a, &mut b] {
        let r = ws.subscribed("room:r1").await;
        assert_eq!(r["recovered"], true);
    }
    let r = a
        .request(
            json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"text":"hi"}}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["deliveries"][0]["seq"], 1);
    let ev = b.event_on("room:r1").await;
    assert_eq!(ev["data"]["text"], "hi");
    assert_eq!(ev["from"], "alice");
    assert_eq!(ev["seq"], 1);
    assert_eq!(ev["epoch"], r["deliveries"][0]["epoch"]);
    a.assert_none(std::time::Duration::from_millis(300), |v| {
        v["type"] == "event" && v["channel"] == "room:r1"
    })
    .await;
}

use std::time::Duration;

use serde_json::Value;

fn is_event(ch: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["type"] == "event" && v["channel"] == ch
}

#[tokio::test]
async fn ping_gets_pong_with_ref() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let r = a.request(json!({"op":"ping"})).await;
    assert_eq!(r["type"], "pong");
}

#[tokio::test]
async fn ops_arriving_in_one_write_are_all_answered() {
    // The server polls the socket only when the socket woke it; frames already read into the
    // stream's buffer bring no wake of their own, and must still be handled, in order.
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    for i in 0..5 {
        let op = json!({"op":"ping","ref":i}).to_string();
        a.stream.feed(Message::Text(op.into())).await.unwrap();
    }
    a.stream.flush().await.unwrap();
    for i in 0..5 {
        let v = a.next().await;
        assert_eq!((&v["type"], &v["ref"]), (&json!("pong"), &json!(i)), "{v}");
    }
}

#[tokio::test]
async fn malformed_json_gets_bad_frame_with_null_ref() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    a.send_text("{not json").await;
    let v = a.next().await;
    assert_eq!(v["type"], "reply");
    assert_eq!(v["ok"], false);
    assert_eq!(v["ref"], Value::Null);
    assert_eq!(v["error"]["code"], "bad_frame");
    // The connection stays usable.
    assert_eq!(a.request(json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn unknown_op_and_missing_fields_get_bad_frame_with_ref() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let r = a.request(json!({"op":"teleport"})).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "bad_frame");
    let r = a.request(json!({"op":"subscribe"})).await;
    assert_eq!(r["error"]["code"], "bad_frame", "{r}");
    a.send(json!({"ref":"x1"})).await;
    let r = a.reply(json!("x1")).await;
    assert_eq!(r["error"]["code"], "bad_frame");
}

#[tokio::test]
async fn oversized_frame_gets_too_large() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let big = "x".repeat(70 * 1024);
    a.send(json!({"op":"ping","ref":"big","pad":big})).await;
    let r = a.reply(json!("big")).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "too_large");
    assert_eq!(a.request(json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn bad_channel_forbidden_and_not_member() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let r = a
        .request(json!({"op":"subscribe","channel":"room:has space"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_channel");
    let r = a
        .request(json!({"op":"subscribe","channel":"nope:1"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_channel");
    let r = a
        .request(json!({"op":"subscribe","channel":"user:bob"}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = a
        .request(json!({"op":"subscribe","channel":"room:secret"}))
        .await;
    assert_eq!(r["error"]["code"], "not_member");
    // Publishing: backends only on user: and global; members only on rooms. Failures say rollback.
    let r = a
        .request(json!({"op":"publish","channel":"global","event":"x","data":{}}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden");
    assert_eq!(r["action"], "rollback");
    let r = a
        .request(json!({"op":"publish","channel":"room:secret","event":"chat.message","data":{}}))
        .await;
    assert_eq!(r["error"]["code"], "not_member");
    assert_eq!(r["action"], "rollback");
    let r = a
        .request(json!({"op":"publish","channel":"user:alice","event":"x","data":{}}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut a = t.ws("alice").await;
    a.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    t.publish(json!({"event":"note","room":"r1","data":1}))
        .await;
    assert_eq!(a.event_on("room:r1").await["data"], 1);
    let r = a
        .request(json!({"op":"unsubscribe","channel":"room:r1"}))
        .await;
    assert_eq!(r["ok"], true);
    t.publish(json!({"event":"note","room":"r1","data":2}))
        .await;
    a.assert_none(Duration::from_millis(300), is_event("room:r1"))
        .await;
}

#[tokio::test]
async fn user_and_global_channels_are_joined_on_connect() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    t.publish(json!({"event":"notice","to":["alice"],"data":{"n":1}}))
        .await;
    let ev = a.event_on("user:alice").await;
    assert_eq!(ev["event"], "notice");
    assert_eq!(ev["seq"], 1);
    t.publish(json!({"event":"maintenance","channel":"global","data":{}}))
        .await;
    assert_eq!(a.event_on("global").await["event"], "maintenance");
}

#[tokio::test]
async fn idempotent_client_publish_stores_once() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut a = t.ws("alice").await;
    let op = json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"t":1},"idempotency_key":"k1"});
    let r1 = a.request(op.clone()).await;
    let r2 = a.request(op).await;
    assert_eq!(r1["ok"], true);
    assert_eq!(r1["id"], r2["id"]);
    assert_eq!(r1["deliveries"], r2["deliveries"]);
    let (_, h) = t.api("GET", "/api/v1/channels/room:r1/history", None).await;
    assert_eq!(h["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn typing_reaches_focused_members_only_and_is_not_stored() {
    // Every typing sent (no coalescing), so the one after the blur would reach bob if it could.
    let t = TestServer::start_with(|c| c.limits.typing_interval = Duration::ZERO).await;
    for u in ["alice", "bob", "carol"] {
        t.join("r1", u).await;
    }
    let mut a = t.ws("alice").await;
    let mut b = t.ws("bob").await;
    let mut c = t.ws("carol").await;
    assert_eq!(
        b.request(json!({"op":"focus","room":"r1"})).await["ok"],
        true
    );
    c.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    a.request(json!({"op":"focus","room":"r1"})).await;
    let r = a.request(json!({"op":"typing","room":"r1"})).await;
    assert_eq!((&r["ok"], &r["sent"]), (&json!(true), &json!(true)), "{r}");
    let ev = b.event_on("active:r1").await;
    assert_eq!(ev["event"], "typing");
    assert_eq!(ev["data"]["user"], "alice");
    assert!(ev.get("seq").is_none(), "typing is not stored: {ev}");
    // Carol has the room but not open; alice is the sender.
    c.assert_none(Duration::from_millis(300), |v| v["event"] == "typing")
        .await;
    a.assert_none(Duration::from_millis(100), |v| v["event"] == "typing")
        .await;
    // Blur: no more typing for bob.
    b.request(json!({"op":"blur","room":"r1"})).await;
    let r = a.request(json!({"op":"typing","room":"r1"})).await;
    assert_eq!(r["sent"], true, "interval 0: every typing is sent: {r}");
    b.assert_none(Duration::from_millis(300), |v| v["event"] == "typing")
        .await;
    // Not a member: no focus, no typing.
    let mut d = t.ws("dave").await;
    assert_eq!(
        d.request(json!({"op":"focus","room":"r1"})).await["error"]["code"],
        "not_member"
    );
    assert_eq!(
        d.request(json!({"op":"typing","room":"r1"})).await["error"]["code"],
        "not_member"
    );
}

/// A session's typing in a room goes out once per `limits.typing_interval` (said in `connected`):
/// the ones in between are answered `sent: false` and reach nobody, another room has its own
/// interval, and once the interval has passed the next one goes out again.
#[tokio::test]
async fn typing_is_sent_once_per_interval_per_room_and_the_interval_is_announced() {
    let interval = Duration::from_millis(600);
    let t = TestServer::start_with(move |c| c.limits.typing_interval = interval).await;
    for room in ["r1", "r2"] {
        for u in ["alice", "bob"] {
            t.join(room, u).await;
        }
    }
    let mut a = t.ws("alice").await;
    assert_eq!(a.connected["typing_interval"], 600, "{}", a.connected);
    let mut b = t.ws("bob").await;
    for room in ["r1", "r2"] {
        b.request(json!({"op":"focus","room":room})).await;
    }
    let typing = |room: &str| json!({"op":"typing","room":room});
    let started = std::time::Instant::now();
    assert_eq!(a.request(typing("r1")).await["sent"], true);
    let mut coalesced = 0;
    for _ in 0..5 {
        let r = a.request(typing("r1")).await;
        assert_eq!(r["ok"], true, "{r}");
        if r["sent"] == false {
            coalesced += 1;
        }
    }
    let within = started.elapsed() < interval;
    assert_eq!(
        a.request(typing("r2")).await["sent"],
        true,
        "r2 has its own interval"
    );
    b.event_on("active:r1").await;
    b.event_on("active:r2").await;
    if within {
        assert_eq!(coalesced, 5, "typing inside the interval is coalesced");
        b.assert_none(Duration::from_millis(200), |v| v["event"] == "typing")
            .await;
    }
    tokio::time::sleep(interval).await;
    assert_eq!(
        a.request(typing("r1")).await["sent"],
        true,
        "the interval has passed"
    );
    let ev = b.event_on("active:r1").await;
    assert_eq!(ev["data"]["user"], "alice", "{ev}");
}

/// A countable room event moves, in its own publish, the read pointers of its sender and of the
/// members who have the room open (`focus`), and is counted for everyone else before anyone receives
/// it: a member who gets it live and asks for unread at once sees it counted.
#[tokio::test]
async fn countable_event_moves_focused_readers_and_is_counted_on_arrival() {
    let t = TestServer::start().await;
    for u in ["alice", "bob", "carol", "dave"] {
        t.join("r1", u).await;
    }
    let mut alice = t.ws("alice").await;
    let mut bob = t.ws("bob").await;
    let mut carol = t.ws("carol").await;
    for ws in [&mut alice, &mut bob] {
        let r = ws.request(json!({"op":"focus","room":"r1"})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    carol.subscribed("room:r1").await;
    let unread = |user: &'static str| {
        let t = &t;
        async move {
            let (s, v) = t
                .api("GET", &format!("/api/v1/users/{user}/unread"), None)
                .await;
            assert_eq!(s, 200, "{v}");
            v["unread"].clone()
        }
    };

    // alice (the sender, focused too) publishes from her socket; bob has the room open.
    for i in 1..=2 {
        let r = alice
            .request(
                json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"i":i}}),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        let ev = carol.event_on("room:r1").await;
        assert_eq!(ev["seq"], r["deliveries"][0]["seq"], "{ev}");
        assert_eq!(
            unread("carol").await,
            json!({"r1": i}),
            "counted on arrival"
        );
    }
    assert_eq!(unread("alice").await, json!({}), "own messages never count");
    assert_eq!(unread("bob").await, json!({}), "bob has the room open");
    assert_eq!(unread("dave").await, json!({"r1": 2}));

    // bob closes the room: the next one counts for him. A backend publish for nobody moves no
    // sender's pointer, but alice still has the room open.
    let r = bob.request(json!({"op":"blur","room":"r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    t.publish(json!({"event":"chat.message","room":"r1","data":{"i":3}}))
        .await;
    carol.event_on("room:r1").await;
    assert_eq!(unread("alice").await, json!({}));
    assert_eq!(unread("bob").await, json!({"r1": 1}));
    assert_eq!(unread("carol").await, json!({"r1": 3}));
    assert_eq!(unread("dave").await, json!({"r1": 3}));
    // A new device sees the same counts in its login sync.
    let dave = t.ws("dave").await;
    assert_eq!(dave.connected["sync"]["unread"], json!({"r1": 3}));
}

#[tokio::test]
async fn read_moves_pointer_tells_other_devices_and_active_viewers() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    for i in 0..3 {
        t.publish(json!({"event":"chat.message","room":"r1","from":"bob","data":{"i":i}}))
            .await;
    }
    let (_, u) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    assert_eq!(u["unread"]["r1"], 3);
    let mut phone = t.ws("alice").await;
    assert_eq!(phone.connected["sync"]["unread"]["r1"], 3);
    let mut laptop = t.ws("alice").await;
    let mut b = t.ws("bob").await;
    b.request(json!({"op":"focus","room":"r1"})).await;
    let r = phone
        .request(json!({"op":"read","room":"r1","seq":2}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["unread"], 1);
    let sync = laptop
        .wait_for(|v| v["event"] == "read" && v["channel"] == "user:alice")
        .await;
    assert_eq!(sync["data"]["room"], "r1");
    assert_eq!(sync["data"]["seq"], 2);
    assert_eq!(sync["data"]["unread"], 1);
    let receipt = b.event_on("active:r1").await;
    assert_eq!(receipt["event"], "read");
    assert_eq!(receipt["data"]["user"], "alice");
    assert_eq!(receipt["data"]["seq"], 2);
    let (_, u) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    assert_eq!(u["unread"]["r1"], 1);
    // Not a member.
    let mut d = t.ws("dave").await;
    assert_eq!(
        d.request(json!({"op":"read","room":"r1","seq":1})).await["error"]["code"],
        "not_member"
    );
}

#[tokio::test]
async fn focused_member_does_not_accumulate_unread_and_own_messages_never_count() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut a = t.ws("alice").await;
    a.request(json!({"op":"focus","room":"r1"})).await;
    let mut b = t.ws("bob").await;
    b.request(json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{}}))
        .await;
    b.request(json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{}}))
        .await;
    let (_, ua) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    let (_, ub) = t.api("GET", "/api/v1/users/bob/unread", None).await;
    assert!(ua["unread"].get("r1").is_none(), "focused: {ua}");
    assert!(ub["unread"].get("r1").is_none(), "own messages: {ub}");
    a.request(json!({"op":"blur","room":"r1"})).await;
    b.request(json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{}}))
        .await;
    let (_, ua) = t.api("GET", "/api/v1/users/alice/unread", None).await;
    assert_eq!(ua["unread"]["r1"], 1);
}

#[tokio::test]
async fn history_op_returns_inclusive_range() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    for i in 1..=5 {
        t.publish(json!({"event":"n","room":"r1","data":i})).await;
    }
    let mut a = t.ws("alice").await;
    let r = a
        .request(json!({"op":"history","channel":"room:r1","from":2,"to":4}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let seqs: Vec<u64> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(r["recovered"], true);
    assert!(r["epoch"].is_string());
    let r = a
        .request(json!({"op":"history","channel":"room:r1","from":1,"limit":2}))
        .await;
    assert_eq!(r["events"].as_array().unwrap().len(), 2);
    let r = a
        .request(json!({"op":"history","channel":"room:r1","limit":1001}))
        .await;
    assert_eq!(r["error"]["code"], "bad_frame");
    let r = a
        .request(json!({"op":"history","channel":"room:other"}))
        .await;
    assert_eq!(r["error"]["code"], "not_member");
}

#[tokio::test]
async fn leave_is_atomic_and_reaches_every_device() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut a1 = t.ws("alice").await;
    let mut a2 = t.ws("alice").await;
    let mut b = t.ws("bob").await;
    for ws in [&mut a1, &mut a2, &mut b] {
        assert_eq!(
            ws.request(json!({"op":"subscribe","channel":"room:r1"}))
                .await["ok"],
            true
        );
    }
    let r = a1.request(json!({"op":"leave","room":"r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let sys = b.wait_for(|v| v["event"] == "member.left").await;
    assert_eq!(sys["data"]["user"], "alice");
    assert!(sys["seq"].is_u64(), "member.left is stored: {sys}");
    let left = a2.wait_for(|v| v["event"] == "room.left").await;
    assert_eq!(left["channel"], "user:alice");
    assert_eq!(left["data"]["room"], "r1");
    // Alice's other device no longer gets the room.
    t.publish(json!({"event":"chat.message","room":"r1","from":"bob","data":{}}))
        .await;
    a2.assert_none(Duration::from_millis(300), |v| {
        v["channel"] == "room:r1" && v["event"] == "chat.message"
    })
    .await;
    let (_, m) = t.api("GET", "/api/v1/rooms/r1/members", None).await;
    assert_eq!(m["members"], json!(["bob"]));
    assert_eq!(
        a1.request(json!({"op":"leave","room":"r1"})).await["error"]["code"],
        "not_member"
    );
}

#[tokio::test]
async fn ack_requires_a_subscription() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let r = a
        .request(json!({"op":"ack","channel":"user:alice","seq":1}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = a
        .request(json!({"op":"ack","channel":"room:r9","seq":1}))
        .await;
    assert_eq!(r["ok"], false);
}

#[tokio::test]
async fn rate_limit_then_disconnect_4010() {
    let t = TestServer::start_with(|c| {
        c.limits.frames_per_second = 5;
        c.limits.violations_before_disconnect = 3;
    })
    .await;
    let mut a = t.ws("alice").await;
    for i in 0..30 {
        a.send(json!({"op":"ping","ref":i})).await;
    }
    let mut limited = 0;
    loop {
        let v = a.next().await;
        if v["type"] == "reply" && v["error"]["code"] == "rate_limited" {
            limited += 1;
        }
        if v["type"] == "disconnect" {
            assert_eq!(v["code"], 4010);
            break;
        }
    }
    assert!(limited >= 1);
    let end = a.closed().await;
    assert_eq!(end.close, Some(4010));
}

#[tokio::test]
async fn too_many_connections_per_user_gets_4009() {
    let t = TestServer::start_with(|c| c.limits.connections_per_user = 2).await;
    let _a = t.ws("alice").await;
    let _b = t.ws("alice").await;
    let mut c = Ws::connect(&t.ws_url(&format!("?token={}", t.token("alice")))).await;
    let v = c.next().await;
    assert_eq!(v["type"], "disconnect");
    assert_eq!(v["code"], 4009);
    // Another user is unaffected.
    let _d = t.ws("bob").await;
}

#[tokio::test]
async fn binary_frame_gets_bad_frame() {
    use futures_util::SinkExt;
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    a.stream
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![1, 2, 3].into(),
        ))
        .await
        .unwrap();
    let v = a.next().await;
    assert_eq!(v["error"]["code"], "bad_frame");
}

#[tokio::test]
async fn status_and_presence_ops() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    let r = a
        .request(json!({"op":"status","status":"busy","text":"in a meeting"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = a.request(json!({"op":"status","status":"sleeping"})).await;
    assert_eq!(r["error"]["code"], "bad_frame");
    let r = a
        .request(json!({"op":"presence","users":["alice","nobody"]}))
        .await;
    assert_eq!(r["presence"]["alice"]["online"], true);
    assert_eq!(r["presence"]["alice"]["status"], "busy");
    assert_eq!(r["presence"]["alice"]["text"], "in a meeting");
    assert_eq!(r["presence"]["nobody"]["online"], false);
    let r = a.request(json!({"op":"state","state":"background"})).await;
    assert_eq!(r["ok"], true);
    let r = a.request(json!({"op":"presence","users":["alice"]})).await;
    assert_eq!(r["presence"]["alice"]["devices"][0]["state"], "background");
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let r = a.request(json!({"op":"presence","users":many})).await;
    assert_eq!(r["error"]["code"], "too_large");
}

#[tokio::test]
async fn shutdown_sends_1001_with_reconnect() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    t.server.shutdown();
    let v = a.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(v["code"], 1001);
    assert_eq!(v["reconnect"], true);
}

#[tokio::test]
async fn token_expiry_closes_with_4002() {
    let t = TestServer::start_with(|c| c.jwt.leeway = Duration::ZERO).await;
    let mut claims = claims("alice");
    claims.exp = herald::transport::auth::unix_now() + 2;
    let mut a = Ws::connect(&t.ws_url(&format!("?token={}", t.token_with(claims)))).await;
    assert_eq!(a.next().await["type"], "connected");
    let v = a.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(v["code"], 4002);
    assert_eq!(v["reconnect"], true);
}

/// A token accepted inside the clock leeway is not closed by the next expiry sweep: the session
/// lasts until `exp` plus the leeway, as the connect's check allowed.
#[tokio::test]
async fn token_inside_the_leeway_lasts_until_the_leeway_ends() {
    let t = TestServer::start_with(|c| c.jwt.leeway = Duration::from_secs(4)).await;
    let mut claims = claims("alice");
    claims.exp = herald::transport::auth::unix_now() - 1;
    let opened = std::time::Instant::now();
    let mut a = Ws::connect(&t.ws_url(&format!("?token={}", t.token_with(claims)))).await;
    assert_eq!(a.next().await["type"], "connected");
    let v = a.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(v["code"], 4002);
    let lasted = opened.elapsed();
    // exp + 4 s is at least 2 s away when the token was made (unix seconds are whole); a sweep that
    // ignored the leeway closes it within the first second.
    assert!(
        lasted >= Duration::from_millis(1800),
        "closed after {lasted:?}"
    );
}

/// Regression: a client that reconnects is already subscribed to `user:me`; subscribing again with
/// `since` must replay what it missed while away, once, and never what it already got live.
#[tokio::test]
async fn resubscribe_own_channel_with_since_replays_missed_once() {
    let t = TestServer::start().await;
    let mut a = t.ws("alice").await;
    for i in 1..=3 {
        t.publish(json!({"event":"n","to":["alice"],"data":i}))
            .await;
    }
    let third = a
        .wait_for(|v| v["channel"] == "user:alice" && v["seq"] == 3)
        .await;
    let epoch = third["epoch"].clone();
    drop(a);
    for i in 4..=5 {
        t.publish(json!({"event":"n","to":["alice"],"data":i}))
            .await;
    }
    let mut a = t.ws("alice").await;
    assert_eq!(a.connected["channels"]["user:alice"]["seq"], 5);
    t.publish(json!({"event":"n","to":["alice"],"data":6}))
        .await;
    assert_eq!(a.event_on("user:alice").await["seq"], 6);
    let r = a
        .request(json!({"op":"subscribe","channel":"user:alice","since":{"epoch":epoch,"seq":3}}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    let mut seqs = vec![];
    for _ in 0..2 {
        let e = a.event_on("user:alice").await;
        assert_eq!(e["replay"], true);
        seqs.push(e["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![4, 5]);
    a.assert_none(Duration::from_millis(300), is_event("user:alice"))
        .await;
}

/// Regression: a member removed through the API stops receiving the room live at once.
#[tokio::test]
async fn removed_member_stops_receiving_the_room() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut a = t.ws("alice").await;
    a.request(json!({"op":"subscribe","channel":"room:r1"}))
        .await;
    let (s, _) = t
        .api("DELETE", "/api/v1/rooms/r1/members/alice", None)
        .await;
    assert_eq!(s, 200);
    let left = a.wait_for(|v| v["event"] == "room.left").await;
    assert!(left.get("seq").is_none(), "removal stores no event: {left}");
    t.publish(json!({"event":"chat.message","room":"r1","from":"bob","data":{}}))
        .await;
    a.assert_none(Duration::from_millis(300), is_event("room:r1"))
        .await;
    let (_, h) = t
        .api("GET", "/api/v1/channels/user:alice/history", None)
        .await;
    assert_eq!(h["events"].as_array().unwrap().len(), 0);
}

/// The upgrade is checked as RFC 6455 asks, with the protocol's error body: a plain GET is told to
/// upgrade (426), a wrong version or a missing key is a bad request.
#[tokio::test]
async fn upgrade_requests_are_checked() {
    let t = TestServer::start().await;
    let get = |headers: &[(&'static str, &'static str)]| {
        let mut req = t
            .http
            .get(t.url(&format!("/ws?token={}", t.token("alice"))));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            let resp = tokio::time::timeout(WAIT, req.send())
                .await
                .expect("HTTP timed out")
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_error(&get(&[]).await, 426, "bad_frame");
    let upgrade = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
    ];
    let v12 = [
        upgrade[0],
        upgrade[1],
        ("sec-websocket-version", "12"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    assert_error(&get(&v12).await, 400, "bad_frame");
    let no_key = [upgrade[0], upgrade[1], ("sec-websocket-version", "13")];
    assert_error(&get(&no_key).await, 400, "bad_frame");
    // The same headers with a key upgrade (token lists and case as browsers send them).
    let mut a = Ws::connect(&t.ws_url(&format!("?token={}", t.token("alice")))).await;
    assert_eq!(a.next().await["type"], "connected");
}

/// A WebSocket client that stops reading: its queue fills while its writer is blocked on the socket,
/// and the session is closed as a slow consumer (presence goes offline) without waiting for it.
#[tokio::test]
async fn websocket_client_that_stops_reading_is_closed_as_slow_consumer() {
    let t = TestServer::start_with(|c| c.limits.queue_frames = 8).await;
    t.join("r1", "slow").await;
    let mut stuck = t.ws("slow").await;
    stuck.subscribed("room:r1").await;
    // From here on it never reads.
    let (_, p) = t.api("GET", "/api/v1/presence/slow", None).await;
    assert_eq!(p["online"], true, "{p}");
    let pad = "x".repeat(32 * 1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    loop {
        // Publish until the socket's buffers are full and the queue overflows.
        t.publish(json!({"event":"bulk","room":"r1","data":{"i":i,"pad":pad}}))
            .await;
        i += 1;
        let (_, p) = t.api("GET", "/api/v1/presence/slow", None).await;
        if p["online"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck WebSocket session was not closed after {i} events"
        );
    }
    drop(stuck);
}

/// Best-effort frames (unstored events on `active:`, presence) are skipped for a session that is
/// falling behind, instead of closing it as a slow consumer; what is stored still arrives.
#[tokio::test]
async fn lagging_session_skips_best_effort_frames_instead_of_being_closed() {
    let t = TestServer::start_with(|c| c.limits.queue_frames = 8).await;
    t.join("r1", "lag").await;
    let mut lag = t.ws("lag").await;
    let r = lag.request(json!({"op":"focus","room":"r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    lag.subscribed("room:r1").await;
    // From here it does not read: 300 unstored 32 KiB frames on `active:r1` fill its socket, then its
    // queue (8 frames: the same flood of stored events closes it, see the test above).
    let pad = "x".repeat(32 * 1024);
    let published = 300;
    for i in 0..published {
        t.publish(json!({"event":"cursor.moved","channel":"active:r1","data":{"i":i,"pad":pad}}))
            .await;
    }
    let (_, p) = t.api("GET", "/api/v1/presence/lag", None).await;
    assert_eq!(p["online"], true, "the lagging session was closed: {p}");
    t.publish(json!({"event":"note","room":"r1","data":{"after":"the flood"}}))
        .await;
    // It reads again: fewer cursor frames than were published, in order, then the stored event.
    let mut got = Vec::new();
    let note = loop {
        let v = lag.next().await;
        if v["type"] != "event" {
            continue;
        }
        if v["channel"] == "active:r1" {
            got.push(v["data"]["i"].as_u64().expect("i"));
        } else if v["channel"] == "room:r1" {
            break v;
        }
    };
    assert_eq!(note["data"]["after"], "the flood", "{note}");
    assert!(note["seq"].is_u64(), "{note}");
    assert!(
        (got.len() as u64) < published,
        "every cursor frame arrived ({}), none was skipped",
        got.len()
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
}

/// A WebSocket spoken by hand over TCP, to send what no well-behaved client library would.
struct RawWs(tokio::net::TcpStream);

impl RawWs {
    /// Upgrades with a token in the query and reads up to the `connected` frame.
    async fn open(t: &TestServer, user: &str) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
        let req = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            t.token(user)
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut ws = RawWs(tcp);
        let (op, payload) = ws.frame().await.expect("connected frame");
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&payload).contains("\"connected\""));
        ws
    }

    /// A frame as given: first byte (FIN, RSV, opcode), masked or not.
    async fn send(&mut self, first: u8, payload: &[u8], masked: bool) {
        use tokio::io::AsyncWriteExt;
        let mut f = vec![first, (payload.len() as u8) | if masked { 0x80 } else { 0 }];
        if masked {
            let key = [0x12u8, 0x34, 0x56, 0x78];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.0.write_all(&f).await.unwrap();
    }

    /// The next server frame: (opcode, payload); `None` at EOF.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut h = [0u8; 2];
            self.0.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    self.0.read_exact(&mut l).await.ok()?;
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    self.0.read_exact(&mut l).await.ok()?;
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.0.read_exact(&mut payload).await.ok()?;
            Some((h[0] & 0x0f, payload))
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("no frame within WAIT")
    }

    /// Reads to the close frame: its code, and the `disconnect` frame's code before it.
    async fn close_code(&mut self) -> (Option<u64>, Option<u16>) {
        let mut disconnect = None;
        while let Some((op, payload)) = self.frame().await {
            match op {
                1 => {
                    let v: Value = serde_json::from_slice(&payload).unwrap();
                    if v["type"] == "disconnect" {
                        disconnect = v["code"].as_u64();
                    }
                }
                8 => {
                    return (
                        disconnect,
                        payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                    );
                }
                _ => {}
            }
        }
        (disconnect, None)
    }
}

/// A client breaking RFC 6455 gets the close frame that says how (1007 for text that is not UTF-8,
/// 1002 for protocol errors), not a dropped TCP connection.
#[tokio::test]
async fn protocol_violations_get_the_rfc_6455_close_code() {
    let t = TestServer::start().await;
    let cases: [(&str, u8, &[u8], bool, u16); 5] = [
        (
            "invalid UTF-8 in a text frame",
            0x81,
            &[0xff, 0xfe, 0x41],
            true,
            1007,
        ),
        ("an unmasked client frame", 0x81, b"{}", false, 1002),
        ("a reserved opcode", 0x83, b"x", true, 1002),
        ("a reserved bit (RSV1)", 0xC1, b"{}", true, 1002),
        (
            "a continuation with nothing to continue",
            0x80,
            b"x",
            true,
            1002,
        ),
    ];
    for (what, first, payload, masked, code) in cases {
        let mut ws = RawWs::open(&t, "alice").await;
        ws.send(first, payload, masked).await;
        let (disconnect, close) = ws.close_code().await;
        assert_eq!(close, Some(code), "{what}");
        assert_eq!(disconnect, Some(code as u64), "{what}");
    }
    // The server is fine, and so is a well-behaved client.
    let mut ws = t.ws("alice").await;
    assert_eq!(ws.request(json!({"op": "ping"})).await["type"], "pong");
}

/// Herald writes its frames itself (several per vectored write, resumed mid-frame when a full socket
/// cuts a write short) while tungstenite answers the client's pings on the same socket: a client that
/// pings all through a burst of 40 KB events it does not read meanwhile (6 MB: more than the socket
/// buffers hold) gets every pong and every event whole, in seq order.
#[tokio::test]
async fn pongs_and_a_burst_of_large_frames_share_the_socket_intact() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut alice = t.ws("alice").await;
    alice.subscribed("room:r1").await;
    let text = "x".repeat(40_000);
    let mut pings = 0u32;
    for i in 0..150u32 {
        let body = json!({"event":"chat.message","room":"r1","data":{"i": i, "text": text}});
        t.publish(body).await;
        if i % 3 == 0 {
            alice
                .stream
                .send(Message::Ping(i.to_be_bytes().to_vec().into()))
                .await
                .unwrap();
            pings += 1;
        }
    }
    let (mut pongs, mut next) = (0u32, 0u64);
    while next < 150 || pongs < pings {
        let m = tokio::time::timeout(Duration::from_secs(10), alice.stream.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("a valid frame");
        match m {
            Message::Pong(p) => {
                assert_eq!(p.len(), 4);
                pongs += 1;
            }
            Message::Text(s) => {
                let v: Value = serde_json::from_str(&s).expect("whole JSON frame");
                if v["type"] == "event" {
                    next += 1;
                    assert_eq!(v["seq"], next, "in order, none missing");
                    assert_eq!(v["data"]["i"], next - 1);
                    assert_eq!(v["data"]["text"].as_str().map(str::len), Some(40_000));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, pings);
}

/// The next text frame as it came off the wire.
async fn raw_text(ws: &mut Ws) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.stream.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("a valid frame");
        if let Message::Text(t) = m {
            return t.to_string();
        }
    }
}

/// `?format=compact`: event frames are `[channel, seq, event, data, ts, from]` with a room event's
/// envelope under 60 bytes, live and replayed; other frames and other sessions keep the full form.
#[tokio::test]
async fn compact_event_frames_on_request() {
    let t = TestServer::start().await;
    for u in ["alice", "bob", "carol"] {
        t.join("r1", u).await;
    }
    let mut alice = t.ws_with("alice", "&format=compact").await;
    assert_eq!(alice.connected["format"], "compact", "{}", alice.connected);
    let mut carol = t.ws("carol").await;
    assert!(
        carol.connected.get("format").is_none(),
        "{}",
        carol.connected
    );
    let r = alice.subscribed("room:r1").await;
    let epoch = r["epoch"].clone();
    assert!(epoch.is_string(), "the reply carries the epoch: {r}");
    carol.subscribed("room:r1").await;
    let data = json!({"text": "hello there"});
    let p = t
        .publish(json!({"event":"chat.message","room":"r1","from":"bob","data":data}))
        .await;
    let seq = p["deliveries"][0]["seq"].clone();
    let text = raw_text(&mut alice).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0], "room:r1", "{text}");
    assert_eq!(v[1], seq, "{text}");
    assert_eq!(v[2], "chat.message", "{text}");
    assert_eq!(v[3], data, "{text}");
    assert!(v[4].as_i64().unwrap() > 1_700_000_000_000, "{text}");
    assert_eq!(v[5], "bob", "{text}");
    assert_eq!(v.as_array().unwrap().len(), 6, "{text}");
    let envelope = text.len() - data.to_string().len();
    assert!(envelope <= 60, "envelope {envelope} bytes: {text}");
    // The default stays the full object.
    let full = carol.event_on("room:r1").await;
    assert_eq!(full["seq"], seq);
    assert!(
        full["epoch"].is_string() && full["id"].is_string(),
        "{full}"
    );
    // Replies stay objects.
    let r = alice.request(json!({"op": "ping"})).await;
    assert_eq!(r["type"], "pong", "{r}");

    // Replay on resubscribe comes compact too.
    let r = alice
        .request(json!({"op": "unsubscribe", "channel": "room:r1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    t.publish(json!({"event":"chat.message","room":"r1","from":"bob","data":{"n":2}}))
        .await;
    let r = alice
        .request(
            json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": seq}}),
        )
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    let replayed = loop {
        let v = alice.next().await;
        if v.is_array() {
            break v;
        }
    };
    assert_eq!(replayed[0], "room:r1", "{replayed}");
    assert_eq!(replayed[3], json!({"n": 2}), "{replayed}");
}

/// The compact form asked for in the `connect` frame; an unknown format is refused at the upgrade
/// (400) and in the `connect` frame (a `bad_frame` error, then 4010).
#[tokio::test]
async fn compact_format_in_connect_and_bad_formats_refused() {
    let t = TestServer::start().await;
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token": t.token("alice"),"format":"compact","ref":1}))
        .await;
    let c = ws.next().await;
    assert_eq!(c["type"], "connected", "{c}");
    assert_eq!(c["format"], "compact", "{c}");

    let (status, body) = {
        let url = t.ws_url(&format!("?token={}&format=xml", t.token("alice")));
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => (
                r.status().as_u16(),
                String::from_utf8(r.body().clone().unwrap_or_default()).unwrap_or_default(),
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    assert_eq!(status, 400);
    assert!(body.contains("format"), "{body}");

    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token": t.token("alice"),"format":"xml","ref":7}))
        .await;
    let e = ws.next().await;
    assert_eq!(e["ok"], false, "{e}");
    assert_eq!(e["ref"], 7, "{e}");
    assert_eq!(e["error"]["code"], "bad_frame", "{e}");
    let closed = ws.closed().await;
    assert_eq!(closed.close, Some(4010), "{closed:?}");
}

#[tokio::test]
async fn connect_frame_platform_is_checked_like_the_token_claim() {
    let t = TestServer::start().await;
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token": t.token("alice"),"platform":"toaster","ref":3}))
        .await;
    let e = ws.next().await;
    assert_eq!(e["ok"], false, "{e}");
    assert_eq!(e["ref"], 3, "{e}");
    assert_eq!(e["error"]["code"], "bad_frame", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("platform"),
        "{e}"
    );
    assert_eq!(ws.closed().await.close, Some(4010));
    let (_, v) = t.api("GET", "/api/v1/presence/alice", None).await;
    assert_eq!(v["online"], false, "a refused connect opens nothing: {v}");

    // A valid one is kept and shown in presence.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op":"connect","token": t.token("alice"),"device":"p1","platform":"ios"}))
        .await;
    assert_eq!(ws.next().await["type"], "connected");
    let (_, v) = t.api("GET", "/api/v1/presence/alice", None).await;
    assert_eq!(v["devices"][0]["platform"], "ios", "{v}");
}
