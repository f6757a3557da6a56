//! SSE: `/sse?channels=…` (cursor ids, resume with `Last-Event-ID`, non-stored events, refusals),
//! `/api/v1/rooms/{room}/stream` and `/api/presence/stream`.

use std::collections::BTreeMap;

use herald::event::{Cursor, Epoch};
use serde_json::{Value, json};

use crate::common::*;

fn sse_url(t: &TestServer, user: &str, channels: &str) -> String {
    t.url(&format!("/sse?channels={channels}&token={}", t.token(user)))
}

/// The next event that is not room presence (`presence.update` comes and goes with sessions; it is
/// tested in `presence.rs`).
async fn next_event(sse: &mut Sse) -> SseEvent {
    loop {
        let e = sse.next().await;
        if e.event != "presence.update" {
            return e;
        }
    }
}

/// The same for the raw reader.
async fn next_block(raw: &mut RawSse) -> SseBlock {
    loop {
        let b = raw.next_block().await;
        if b.get("event") != Some("presence.update") {
            return b;
        }
    }
}

fn chat(room: &str, n: u64) -> Value {
    json!({"event": "chat.message", "room": room, "data": {"n": n}})
}

#[tokio::test]
async fn sse_events_carry_cursor_type_and_the_websocket_json() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut ws = t.ws("alice").await;
    ws.subscribed("room:r1").await;

    let mut raw = RawSse::open(&sse_url(&t, "alice", "room:r1,user:alice"), None).await;
    // `retry:` comes once, first, as a block of its own (no event).
    let first = raw.next_block().await;
    assert_eq!(first.names(), vec!["retry"], "{first:?}");
    assert!(
        first.get("retry").unwrap().parse::<u64>().is_ok(),
        "{first:?}"
    );

    let rep = t
        .publish(
            json!({"event": "chat.message", "room": "r1", "data": {"text": "hi", "n": [1, 2]}}),
        )
        .await;
    let b = next_block(&mut raw).await;
    assert_eq!(
        b.names(),
        vec!["id", "event", "data"],
        "fields in order: {b:?}"
    );
    assert_eq!(b.get("event"), Some("chat.message"));
    let data = b.data();
    let frame = ws.event_on("room:r1").await;
    assert_eq!(data, frame, "SSE data is the WebSocket event object");
    assert_eq!(data["type"], "event");
    assert_eq!(data["channel"], "room:r1");
    assert_eq!(data["seq"], 1);
    assert_eq!(data["epoch"], rep["deliveries"][0]["epoch"]);
    assert_eq!(data["id"], rep["id"]);
    assert_eq!(data["data"], json!({"text": "hi", "n": [1, 2]}));
    let id1 = b.get("id").unwrap().to_string();
    assert!(!id1.is_empty());

    // Another listed channel: its own event type, a new cursor.
    t.publish(json!({"event": "invoice.paid", "to": ["alice"], "data": {"amount": 3}}))
        .await;
    let b = next_block(&mut raw).await;
    assert_eq!(b.names(), vec!["id", "event", "data"]);
    assert_eq!(b.get("event"), Some("invoice.paid"));
    assert_eq!(b.data()["channel"], "user:alice");
    assert_eq!(b.data()["seq"], 1);
    assert_ne!(
        b.get("id").unwrap(),
        id1,
        "the cursor moves with every stored event"
    );

    // An EventSource-style client handles `retry:` itself: the first event it surfaces is a real one.
    let mut sse = Sse::open(&sse_url(&t, "alice", "room:r1"), None).await;
    t.publish(chat("r1", 2)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(e.event, "chat.message");
    assert_eq!(e.data["seq"], 2);
    assert!(!e.id.is_empty());
}

#[tokio::test]
async fn sse_resume_replays_exactly_the_missed_events_on_every_channel_then_goes_live() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r2", "alice").await;
    let url = sse_url(&t, "alice", "room:r1,room:r2");

    let mut sse = Sse::open(&url, None).await;
    t.publish(chat("r1", 1)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(
        (e.data["channel"].as_str(), e.data["seq"].as_u64()),
        (Some("room:r1"), Some(1))
    );
    t.publish(chat("r2", 1)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(
        (e.data["channel"].as_str(), e.data["seq"].as_u64()),
        (Some("room:r2"), Some(1))
    );
    let last = e.id.clone();
    drop(sse);

    // Missed while disconnected: two on each channel, interleaved.
    for n in 2..=3 {
        t.publish(chat("r1", n)).await;
        t.publish(chat("r2", n)).await;
    }

    let mut sse = Sse::open(&url, Some(&last)).await;
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut last = String::new();
    for _ in 0..4 {
        let e = next_event(&mut sse).await;
        assert_eq!(e.event, "chat.message", "{e:?}");
        assert_eq!(e.data["replay"], true, "replayed events are marked: {e:?}");
        assert_eq!(e.data["data"]["n"], e.data["seq"]);
        got.entry(e.data["channel"].as_str().unwrap().to_string())
            .or_default()
            .push(e.data["seq"].as_u64().unwrap());
        last = e.id.clone();
    }
    let want: BTreeMap<String, Vec<u64>> = [
        ("room:r1".to_string(), vec![2, 3]),
        ("room:r2".to_string(), vec![2, 3]),
    ]
    .into();
    assert_eq!(got, want);

    // Then live: the next event is the new one (nothing replayed twice in between).
    t.publish(chat("r2", 4)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(e.data["channel"], "room:r2");
    assert_eq!(e.data["seq"], 4);
    assert!(
        e.data.get("replay").is_none(),
        "live events are not marked: {e:?}"
    );
    drop(sse);

    // The cursor of the last replayed event covers both channels: resuming from it replays only r2's 4.
    let mut sse = Sse::open(&url, Some(&last)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(
        (e.data["channel"].as_str(), e.data["seq"].as_u64()),
        (Some("room:r2"), Some(4))
    );
    assert_eq!(e.data["replay"], true);
    t.publish(chat("r1", 4)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(
        (e.data["channel"].as_str(), e.data["seq"].as_u64()),
        (Some("room:r1"), Some(4))
    );
    assert!(e.data.get("replay").is_none());
}

#[tokio::test]
async fn sse_non_stored_events_carry_no_id() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let mut raw = RawSse::open(&sse_url(&t, "alice", "room:r1,active:r1"), None).await;
    assert_eq!(raw.next_block().await.names(), vec!["retry"]);
    // bob joins r1 (room presence, not stored): no id. alice's own join is not echoed to her.
    let mut bob = t.ws("bob").await;
    bob.subscribed("room:r1").await;
    let b = raw.next_block().await;
    assert_eq!(b.names(), vec!["event", "data"], "{b:?}");
    assert_eq!(b.get("event"), Some("presence.update"));
    assert_eq!(
        b.data(),
        json!({"type": "presence.update", "room": "r1", "user": "bob", "change": "joined"})
    );

    t.publish(chat("r1", 1)).await;
    let stored = raw.next_block().await;
    assert_eq!(stored.names(), vec!["id", "event", "data"]);

    let r = bob.request(json!({"op": "typing", "room": "r1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let b = raw.next_block().await;
    assert_eq!(
        b.names(),
        vec!["event", "data"],
        "a non-stored event has no id: {b:?}"
    );
    assert_eq!(b.get("event"), Some("typing"));
    let d = b.data();
    assert_eq!(d["type"], "event");
    assert_eq!(d["channel"], "active:r1");
    assert_eq!(d["from"], "bob");
    assert_eq!(d["data"], json!({"room": "r1", "user": "bob"}));
    assert!(d.get("seq").is_none() && d.get("epoch").is_none(), "{d}");

    // Stored events after it still carry a cursor.
    t.publish(chat("r1", 2)).await;
    let b = raw.next_block().await;
    assert_eq!(b.names(), vec!["id", "event", "data"]);
    assert_eq!(b.data()["seq"], 2);
}

#[tokio::test]
async fn sse_refuses_forbidden_bad_and_unauthenticated_requests() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r9", "bob").await;
    let tok = t.token("alice");
    let get = |path: String| {
        let t = &t;
        async move { t.raw("GET", &path, None, &[]).await }
    };

    let (s, v) = get(format!("/sse?channels=room:r1,room:r9&token={tok}")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("not_member")),
        "{v}"
    );
    let (s, v) = get(format!("/sse?channels=user:bob&token={tok}")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    for bad in [
        "room:a!b",
        "nosuchkind:x",
        "room:",
        "user:alice,room:r1%20x",
    ] {
        let (s, v) = get(format!("/sse?channels={bad}&token={tok}")).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("bad_channel")),
            "{bad}: {v}"
        );
    }
    let (s, v) = get(format!("/sse?token={tok}")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_frame")),
        "no channels: {v}"
    );
    let (s, v) = get("/sse?channels=room:r1".to_string()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (s, v) = get("/sse?channels=room:r1&token=not-a-jwt".to_string()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );

    // A bearer header works like ?token=.
    let auth = format!("Bearer {tok}");
    let (s, v) = t
        .raw(
            "GET",
            "/sse?channels=user:bob",
            None,
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );

    // Garbage Last-Event-ID.
    for garbage in ["garbage!!", "bm90IGEgY3Vyc29y", "12345"] {
        let (s, v) = t
            .raw(
                "GET",
                &format!("/sse?channels=room:r1&token={tok}"),
                None,
                &[("last-event-id", garbage)],
            )
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("bad_frame")),
            "{garbage}: {v}"
        );
    }
}

/// alice's stream of `room:r1`, closed after one event: its URL, the cursor that event carried and
/// the publish's reply.
async fn cursor_after_one_event(t: &TestServer) -> (String, Cursor, Value) {
    t.join("r1", "alice").await;
    let url = sse_url(t, "alice", "room:r1");
    let mut sse = Sse::open(&url, None).await;
    let rep = t.publish(chat("r1", 1)).await;
    let e = next_event(&mut sse).await;
    let c = Cursor::decode(&e.id).expect("the id is a herald cursor");
    (url, c, rep)
}

#[tokio::test]
async fn sse_last_event_id_with_a_wrong_epoch_gets_reset() {
    let t = TestServer::start().await;
    let (url, mut c, rep) = cursor_after_one_event(&t).await;
    t.publish(chat("r1", 2)).await;

    // The same cursor under another epoch.
    let p = c
        .positions
        .get_mut("room:r1")
        .expect("cursor covers room:r1");
    assert_eq!(p.seq, 1);
    p.epoch = Epoch::new("0000000000ff");
    let stale = c.encode();

    let mut raw = RawSse::open(&url, Some(&stale)).await;
    assert_eq!(raw.next_block().await.names(), vec!["retry"]);
    let b = next_block(&mut raw).await;
    assert_eq!(b.get("event"), Some("reset"), "{b:?}");
    assert!(b.get("id").is_none(), "{b:?}");
    assert_eq!(
        b.data(),
        json!({"type": "reset", "channel": "room:r1", "epoch": rep["deliveries"][0]["epoch"], "seq": 2, "recovered": false})
    );
    // Nothing is replayed; the next event is live.
    t.publish(chat("r1", 3)).await;
    let b = next_block(&mut raw).await;
    assert_eq!(b.names(), vec!["id", "event", "data"]);
    let d = b.data();
    assert_eq!(d["seq"], 3);
    assert!(d.get("replay").is_none(), "{d}");
}

#[tokio::test]
async fn room_stream_carries_one_rooms_events_and_needs_membership() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r2", "alice").await;
    let tok = t.token("alice");
    let url = t.url(&format!("/api/v1/rooms/r1/stream?token={tok}"));
    let mut sse = Sse::open(&url, None).await;
    t.publish(chat("r2", 1)).await;
    t.publish(json!({"event": "note", "to": ["alice"], "data": {}}))
        .await;
    t.publish(chat("r1", 1)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(e.event, "chat.message");
    assert_eq!(e.data["channel"], "room:r1", "only r1's events: {e:?}");
    assert_eq!(e.data["seq"], 1);
    let last = e.id.clone();
    drop(sse);

    // Resume works here too.
    t.publish(chat("r1", 2)).await;
    let mut sse = Sse::open(&url, Some(&last)).await;
    let e = next_event(&mut sse).await;
    assert_eq!(
        (e.data["seq"].as_u64(), &e.data["replay"]),
        (Some(2), &json!(true))
    );

    let (s, v) = t
        .raw(
            "GET",
            &format!("/api/v1/rooms/r9/stream?token={tok}"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("not_member")),
        "{v}"
    );
    let (s, v) = t
        .raw(
            "GET",
            &format!("/api/v1/rooms/a!b/stream?token={tok}"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_channel")),
        "{v}"
    );
    let (s, v) = t.raw("GET", "/api/v1/rooms/r1/stream", None, &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
}

#[tokio::test]
async fn presence_stream_sends_connected_initial_and_status_changes() {
    let t = TestServer::start().await;
    let (s, v) = t
        .api(
            "PUT",
            "/api/v1/users/alice/contacts",
            Some(json!({"contacts": ["bob", "carol"]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let _carol = t.ws("carol").await;

    let mut sse = Sse::open(
        &t.url(&format!("/api/presence/stream?token={}", t.token("alice"))),
        None,
    )
    .await;
    let e = sse.next().await;
    assert_eq!(e.event, "connected", "{e:?}");
    assert_eq!(e.data["user"], "alice");
    let e = sse.next().await;
    assert_eq!(e.event, "initial", "{e:?}");
    let initial = e
        .data
        .as_object()
        .expect("initial is a map user -> presence");
    assert_eq!(initial.len(), 2, "{e:?}");
    assert_eq!(initial["bob"]["online"], false);
    assert_eq!(initial["bob"]["user"], "bob");
    assert_eq!(initial["carol"]["online"], true);
    assert_eq!(
        initial["carol"]["devices"].as_array().map(Vec::len),
        Some(1)
    );

    let mut bob = t.ws("bob").await;
    let e = sse.next().await;
    assert_eq!(e.event, "status_change", "{e:?}");
    assert_eq!(e.data["user"], "bob");
    assert_eq!(e.data["online"], true);
    assert_eq!(e.data["devices"][0]["device"], bob.connected["device"]);

    bob.close_client().await;
    let e = sse.next().await;
    assert_eq!(e.event, "status_change", "{e:?}");
    assert_eq!(e.data["user"], "bob");
    assert_eq!(e.data["online"], false);
    assert!(e.data["last_seen"].is_i64(), "{e:?}");
    assert_eq!(e.data["devices"], json!([]));

    // Missing token.
    let (s, v) = t.raw("GET", "/api/presence/stream", None, &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
}

/// `?event_name=message`: event frames (live and replayed) are named `message`, so an EventSource
/// gets every app event from `onmessage` without listing the types; protocol frames keep their names.
#[tokio::test]
async fn event_name_message_names_every_event_frame_message() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": 1}}))
        .await;
    let url = format!("{}&event_name=message", sse_url(&t, "alice", "room:r1"));
    let mut raw = RawSse::open(&url, None).await;
    assert_eq!(raw.next_block().await.names(), vec!["retry"]);

    // Live events of any type.
    t.publish(json!({"event": "invoice.paid", "room": "r1", "data": {"n": 2}}))
        .await;
    let b = next_block(&mut raw).await;
    assert_eq!(b.get("event"), Some("message"), "{b:?}");
    assert_eq!(b.data()["event"], "invoice.paid", "the type is in the JSON");
    assert_eq!(b.data()["seq"], 2);
    let cursor = b.get("id").unwrap().to_string();

    // Replayed ones too, after a resume.
    t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": 3}}))
        .await;
    let mut again = RawSse::open(&url, Some(&cursor)).await;
    assert_eq!(again.next_block().await.names(), vec!["retry"]);
    let b = next_block(&mut again).await;
    assert_eq!(b.get("event"), Some("message"), "{b:?}");
    assert_eq!(
        (b.data()["seq"].as_u64(), b.data()["replay"].as_bool()),
        (Some(3), Some(true))
    );

    // A protocol frame keeps its name: the disconnect when the backend ends the session.
    t.api("POST", "/api/v1/users/alice/disconnect", None).await;
    let b = next_block(&mut again).await;
    assert_eq!(b.get("event"), Some("disconnect"), "{b:?}");

    // Only `type` (the default) and `message` are names.
    let (s, v) = t
        .raw(
            "GET",
            &format!(
                "/sse?channels=room:r1&event_name=kind&token={}",
                t.token("alice")
            ),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_frame")),
        "{v}"
    );
}

/// `GET /history`, the `history` op over HTTP for clients without a socket: with a client JWT
/// (header or `?token=`) it answers what the op answers; the gap an SSE client sees when its own
/// user publishes from another device is filled by it; and it refuses what the op refuses.
#[tokio::test]
async fn history_over_http_fills_an_sse_clients_live_gap_and_refuses_like_the_op() {
    let t = TestServer::start().await;
    for u in ["alice", "bob"] {
        t.join("r1", u).await;
    }
    let mut sse = Sse::open(&sse_url(&t, "alice", "room:r1"), None).await;
    let mut tab = t.ws("alice").await; // alice's other device
    tab.subscribed("room:r1").await;
    t.publish(chat("r1", 1)).await;
    let own = tab
        .request(json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"n":2}}))
        .await;
    assert_eq!(own["ok"], true, "{own}");
    t.publish(chat("r1", 3)).await;
    // Live, the stream skips seq 2: alice sent it.
    let seqs: Vec<u64> = [next_event(&mut sse).await, next_event(&mut sse).await]
        .iter()
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 3]);

    let jwt = t.token("alice");
    let bearer = format!("Bearer {jwt}");
    let auth = [("authorization", bearer.as_str())];
    let (s, gap) = t
        .raw("GET", "/history?channel=room:r1&from=2&to=2", None, &auth)
        .await;
    assert_eq!(s, 200, "{gap}");
    assert_eq!(gap["recovered"], true);
    assert_eq!(gap["seq"], 3);
    let events = gap["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{gap}");
    assert_eq!(events[0]["seq"], 2);
    assert_eq!(events[0]["data"]["n"], 2);
    assert_eq!(events[0]["from"], "alice");
    // The op's reply, field for field; and the token may come in the query.
    let op = tab
        .request(json!({"op":"history","channel":"room:r1","from":2,"to":2}))
        .await;
    for k in ["channel", "epoch", "seq", "events", "recovered"] {
        assert_eq!(gap[k], op[k], "{k}");
    }
    let (s, all) = t
        .raw(
            "GET",
            &format!("/history?channel=room:r1&token={jwt}"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["events"].as_array().unwrap().len(), 3);

    // Refusals: (query, credential, status, code).
    let carol = format!("Bearer {}", t.token("carol"));
    let refused: [(&str, Option<&str>, u16, &str); 7] = [
        ("?channel=room:r1", None, 401, "unauthorized"),
        ("", Some(&bearer), 400, "bad_frame"),
        ("?channel=room:r1&from=x", Some(&bearer), 400, "bad_frame"),
        ("?channel=room:", Some(&bearer), 400, "bad_channel"),
        ("?channel=active:r1", Some(&bearer), 400, "bad_channel"),
        ("?channel=room:r1", Some(&carol), 403, "not_member"),
        ("?channel=user:bob", Some(&bearer), 403, "forbidden"),
    ];
    for (query, credential, status, code) in refused {
        let headers: Vec<(&str, &str)> = credential
            .map(|c| ("authorization", c))
            .into_iter()
            .collect();
        let got = t
            .raw("GET", &format!("/history{query}"), None, &headers)
            .await;
        assert_error(&got, status, code);
    }
}

/// A cursor naming a seq past the channel's end (at most u64::MAX) is a position that cannot be
/// served, like a wrong epoch: `reset`, then live, rather than an overflow.
#[tokio::test]
async fn sse_last_event_id_past_the_channels_end_gets_reset() {
    let t = TestServer::start().await;
    let (url, mut c, rep) = cursor_after_one_event(&t).await;
    c.positions.get_mut("room:r1").expect("covers room:r1").seq = u64::MAX;
    let mut raw = RawSse::open(&url, Some(&c.encode())).await;
    assert_eq!(raw.next_block().await.names(), vec!["retry"]);
    let b = next_block(&mut raw).await;
    assert_eq!(b.get("event"), Some("reset"), "{b:?}");
    assert_eq!(b.data()["seq"], 1, "{b:?}");
    assert_eq!(b.data()["epoch"], rep["deliveries"][0]["epoch"], "{b:?}");
    t.publish(chat("r1", 2)).await;
    assert_eq!(next_block(&mut raw).await.data()["seq"], 2);
}
