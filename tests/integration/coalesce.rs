//! Coalesced writes (`[http] coalesce`): fan-outs queue deliveries without waking anyone and the
//! node's flush tick writes what queued up for each connection in one write. `on` here (the default,
//! `auto`, coalesces only while the CPU is saturated, which a test cannot arrange): every event
//! once, in order, whole, with the connection's own frames (op replies, pongs) between them; fewer
//! writes than deliveries; what a full socket did not take written by the session's task first.
//! The counters are read from engines of their own (the test process's recorder is shared).

use std::time::Duration;

use futures_util::SinkExt;
use herald::config::Coalesce;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Three members of a room get a burst of events published faster than the window: each gets
/// every one once and in order, answers to its ops and pings in between, and the node made fewer
/// writes than deliveries.
#[tokio::test]
async fn coalesced_deliveries_arrive_once_in_order_in_fewer_writes() {
    let node = HeraldProcess::memory(&[
        ("HERALD_COALESCE", "on"),
        ("HERALD_COALESCE_WINDOW", "300ms"),
    ]);
    let addr = node.addr.clone();
    assert_eq!(metric_at(&addr, "herald_coalescing").await, 1.0);
    let mut members = Vec::new();
    for user in ["m1", "m2", "m3"] {
        members.push(room_member_at(&addr, "r1", user).await);
    }
    const N: u64 = 12;
    for n in 1..=N {
        let body = json!({"event": "chat.message", "room": "r1", "data": {"n": n}});
        api_at(&addr, reqwest::Method::POST, "/api/v1/events", Some(body)).await;
        if n % 4 == 0 {
            let ws = &mut members[1];
            ws.stream.send(Message::Ping(vec![4].into())).await.unwrap();
            ws.send(json!({"op": "presence", "users": ["m1"], "ref": n}))
                .await;
        }
    }
    for (i, ws) in members.iter_mut().enumerate() {
        let (mut seqs, mut replies) = (Vec::new(), 0);
        while seqs.len() < N as usize || (i == 1 && replies < 3) {
            let v = ws.next().await;
            match v["type"].as_str() {
                Some("event") if v["channel"] == "room:r1" => {
                    assert_eq!(v["data"]["n"], v["seq"], "{v}");
                    seqs.push(v["seq"].as_u64().unwrap());
                }
                Some("reply") => {
                    assert_eq!(v["ok"], true, "{v}");
                    replies += 1;
                }
                _ => {}
            }
        }
        assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "member m{}", i + 1);
        ws.assert_none(Duration::from_millis(400), |v| v["channel"] == "room:r1")
            .await;
    }
    let deliveries = metric_at(&addr, "herald_deliveries_total").await;
    let writes = metric_at(&addr, "herald_coalesced_flushes_total").await;
    assert!(deliveries >= (3 * N) as f64, "{deliveries} deliveries");
    assert!(
        writes > 0.0 && writes < deliveries,
        "{writes} flushes for {deliveries} deliveries"
    );
}

/// Off, nothing is held; and `auto` on a box with CPU to spare holds nothing either.
#[tokio::test]
async fn off_and_auto_on_an_idle_box_write_every_delivery_at_once() {
    for mode in ["off", "auto"] {
        let node = HeraldProcess::memory(&[("HERALD_COALESCE", mode)]);
        let addr = node.addr.clone();
        let mut ws = room_member_at(&addr, "r1", "a").await;
        for n in 1..=5u64 {
            let body = json!({"event": "chat.message", "room": "r1", "data": {"n": n}});
            api_at(&addr, reqwest::Method::POST, "/api/v1/events", Some(body)).await;
            assert_eq!(ws.event_on("room:r1").await["seq"].as_u64(), Some(n));
        }
        assert_eq!(metric_at(&addr, "herald_coalescing").await, 0.0, "{mode}");
        assert_eq!(
            metric_at(&addr, "herald_coalesced_flushes_total").await,
            0.0,
            "{mode}"
        );
    }
}

/// A client reading slowly through a small receive window while events are held and flushed: a
/// flush's write stops mid-frame (a window's frames are more than the kernel's 4 MiB send buffer
/// takes), the task writes the rest and the frames after it, and every frame arrives whole and in
/// order; then, with the client's ops and pings between slow reads, the replies too.
#[tokio::test]
async fn what_a_coalesced_write_did_not_take_is_written_by_the_session_in_order() {
    let t = TestServer::start_with(|c| {
        c.limits.queue_frames = 4096;
        c.limits.frame_bytes = 1 << 20;
        c.coalesce = Coalesce::On;
        c.coalesce_window = Duration::from_millis(300);
    })
    .await;
    t.join("r1", "slow").await;
    let mut ws = t.ws_slow_reader("slow").await;
    ws.subscribed("room:r1").await;
    let mut next = 1;
    // 16 frames of 400 KB held for one window: 6.4 MB for one write.
    const BIG: u64 = 16;
    let pad = "x".repeat(400 * 1024);
    for n in 1..=BIG {
        t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": n, "pad": pad}}))
            .await;
    }
    while next <= BIG {
        read_one(&mut ws, &mut next, pad.len()).await;
    }
    const N: u64 = BIG + 300;
    let pad = "x".repeat(30 * 1024);
    let mut replies = 0;
    for n in BIG + 1..=N {
        t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": n, "pad": pad}}))
            .await;
        if n % 10 == 0 {
            ws.send(json!({"op": "presence", "users": ["slow"], "ref": n}))
                .await;
            ws.stream.send(Message::Ping(vec![7].into())).await.unwrap();
            for _ in 0..2 {
                replies += read_one(&mut ws, &mut next, pad.len()).await;
            }
        }
    }
    while next <= N {
        replies += read_one(&mut ws, &mut next, pad.len()).await;
    }
    while replies < 30 {
        if ws.next().await["type"] == "reply" {
            replies += 1;
        }
    }
    ws.assert_none(Duration::from_millis(400), |v| v["channel"] == "room:r1")
        .await;
}

/// Reads up to the next event on `room:r1`, which must be seq `next` with its `pad`-byte pad
/// whole; returns the op replies read on the way.
async fn read_one(ws: &mut Ws, next: &mut u64, pad: usize) -> u64 {
    let mut replies = 0;
    let e = loop {
        let v = ws.next().await;
        match v["type"].as_str() {
            Some("reply") => {
                assert_eq!(v["ok"], true, "{v}");
                replies += 1;
            }
            Some("event") if v["channel"] == "room:r1" => break v,
            _ => {}
        }
    };
    assert_eq!(e["seq"].as_u64(), Some(*next), "{}", e["seq"]);
    assert_eq!(e["data"]["pad"].as_str().map(str::len), Some(pad));
    *next += 1;
    replies
}

/// A flood to one client while coalescing (more events in one window than its queue holds): the
/// queue is not left to fill up waiting for the tick, whose write would take only a part of it;
/// past a write's worth the session's task is woken and writes as it would uncoalesced. Every event
/// arrives, once and in order, and the session stays open.
#[tokio::test]
async fn a_flood_within_one_window_does_not_fill_the_queue_while_it_waits() {
    let t = TestServer::start_with(|c| {
        c.coalesce = Coalesce::On;
        c.coalesce_window = Duration::from_secs(1);
        c.limits.queue_frames = 64;
    })
    .await;
    t.join("r1", "alice").await;
    let mut ws = t.ws("alice").await;
    ws.subscribed("room:r1").await;
    // 200 events well within one 1 s window: three times what the queue holds.
    const N: u64 = 200;
    for n in 1..=N {
        t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": n}}))
            .await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < N as usize {
        let v = ws.next().await;
        assert_ne!(v["type"], "disconnect", "{v}");
        if v["type"] == "event" {
            seqs.push(v["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
}
