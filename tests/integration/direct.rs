//! Deliveries the fan-out writes to an idle WebSocket itself (`[http] direct_writes`, on by
//! default): exactly the frames the session's queue would have written, in order, never interleaved
//! with the connection's own (op replies, pongs), and when the socket cannot take a whole frame its
//! task writes the rest before anything else. Counted in `herald_direct_writes_total`, read here
//! from engines of their own (the test process's recorder is shared by every test).

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// A member of `room` subscribed to it, reading events one publish at a time (the session idle
/// between them), with pings of its own in between: every event once, in order, whole; and how
/// many the fan-out wrote itself.
async fn one_at_a_time(direct: bool) -> f64 {
    let node = HeraldProcess::memory(&[(
        "HERALD_DIRECT_WRITES",
        if direct { "true" } else { "false" },
    )]);
    let addr = node.addr.clone();
    let mut ws = room_member_at(&addr, "r1", "alice").await;
    const N: u64 = 30;
    for n in 1..=N {
        let body = json!({"event": "chat.message", "room": "r1", "data": {"n": n}});
        api_at(&addr, reqwest::Method::POST, "/api/v1/events", Some(body)).await;
        let e = ws.event_on("room:r1").await;
        assert_eq!(
            (e["seq"].as_u64(), e["data"]["n"].as_u64()),
            (Some(n), Some(n)),
            "{e}"
        );
        if n % 5 == 0 {
            // A ping between deliveries: tungstenite's pong goes out whole, between frames.
            ws.stream
                .send(Message::Ping(vec![1, 2, 3].into()))
                .await
                .unwrap();
            let r = ws
                .request(json!({"op": "presence", "users": ["alice"]}))
                .await;
            assert_eq!(r["ok"], true, "{r}");
        }
    }
    ws.assert_none(Duration::from_millis(200), |v| v["channel"] == "room:r1")
        .await;
    metric_at(&addr, "herald_direct_writes_total").await
}

#[tokio::test]
async fn an_idle_websocket_gets_its_deliveries_from_the_fan_out_in_order() {
    let written = one_at_a_time(true).await;
    // After each op (the subscribe, the presence requests) the first delivery goes through the
    // queue, which wakes the task to wait idle again; the others are written by the fan-out.
    assert!(
        (20.0..=30.0).contains(&written),
        "fan-out wrote {written} of 30"
    );
}

#[tokio::test]
async fn with_direct_writes_off_every_delivery_goes_through_the_queue() {
    assert_eq!(one_at_a_time(false).await, 0.0);
}

/// A client that reads slowly through a small receive window: the fan-out's writes stop fitting,
/// the task writes what each left, and the frames arrive whole and in order.
#[tokio::test]
async fn what_a_full_socket_did_not_take_is_written_by_the_session_first() {
    let t = TestServer::start_with(|c| c.limits.queue_frames = 4096).await;
    t.join("r1", "slow").await;
    // A 4 KiB receive buffer on the client: its window stays small.
    let mut ws = t.ws_slow_reader("slow").await;
    ws.subscribed("room:r1").await;

    // 9 MB: past what the server's send buffer grows to (net.ipv4.tcp_wmem's 4 MiB here).
    const N: u64 = 300;
    let pad = "x".repeat(30 * 1024);
    let mut next = 1;
    let mut replies = Vec::new();
    for n in 1..=N {
        t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": n, "pad": pad}}))
            .await;
        if n % 10 == 0 {
            // An op and a ping of the client's while the socket is full: its reply and the pong
            // must wait for the frame the fan-out left half written.
            ws.send(json!({"op": "presence", "users": ["slow"], "ref": n}))
                .await;
            ws.stream.send(Message::Ping(vec![7].into())).await.unwrap();
            // A little reading now and then: the window opens and closes mid-frame.
            read_one(&mut ws, &mut next, &mut replies).await;
            read_one(&mut ws, &mut next, &mut replies).await;
        }
    }
    // The rest, each frame whole (the client's parser panics on a broken one) and in order.
    while next <= N {
        read_one(&mut ws, &mut next, &mut replies).await;
    }
    while replies.len() < (N / 10) as usize {
        let v = ws.next().await;
        if v["type"] == "reply" {
            replies.push(v);
        }
    }
    for (r, n) in replies.iter().zip((10..=N).step_by(10)) {
        assert_eq!(
            (r["ref"].as_u64(), &r["ok"]),
            (Some(n), &json!(true)),
            "{r}"
        );
    }
}

/// The next event on `room:r1`, which must be seq `next` with its 30 KiB pad; the op replies read
/// on the way go to `replies`.
async fn read_one(ws: &mut Ws, next: &mut u64, replies: &mut Vec<Value>) {
    let e = loop {
        let v = ws.next().await;
        match v["type"].as_str() {
            Some("reply") => replies.push(v),
            Some("event") if v["channel"] == "room:r1" => break v,
            _ => {}
        }
    };
    assert_eq!(e["seq"].as_u64(), Some(*next), "{}", e["seq"]);
    assert_eq!(e["data"]["pad"].as_str().map(str::len), Some(30 * 1024));
    *next += 1;
}

/// A room bigger than what one fan-out writes itself: the sockets past the first few are written
/// by writer tasks after the publish returns. Every member gets every event once, in order, both
/// one publish at a time (the sessions idle between them) and in a burst (the writers' turns
/// racing the next publish, and the pings and ops of a few members).
#[tokio::test]
async fn a_big_room_gets_every_event_once_in_order_from_the_writer_tasks() {
    const MEMBERS: usize = 300;
    let node = HeraldProcess::memory(&[]);
    let addr = node.addr.clone();
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        members.push(room_member_at(&addr, "big", &format!("m{i}")).await);
    }
    let publish = |n: u64| {
        let addr = addr.clone();
        async move {
            let body = json!({"event": "chat.message", "room": "big", "data": {"n": n}});
            api_at(&addr, reqwest::Method::POST, "/api/v1/events", Some(body)).await;
        }
    };
    let before = metric_at(&addr, "herald_direct_writes_total").await;
    const ONE_BY_ONE: u64 = 5;
    for n in 1..=ONE_BY_ONE {
        publish(n).await;
        for ws in &mut members {
            let e = ws.event_on("room:big").await;
            assert_eq!(
                (e["seq"].as_u64(), e["data"]["n"].as_u64()),
                (Some(n), Some(n)),
                "{e}"
            );
        }
    }
    // More than the fan-outs' own share (at most 64 sockets each) was written directly.
    let written = metric_at(&addr, "herald_direct_writes_total").await - before;
    assert!(
        written > (64 * ONE_BY_ONE) as f64,
        "{written} direct writes for {} deliveries",
        MEMBERS as u64 * ONE_BY_ONE
    );
    const BURST: u64 = 20;
    for n in ONE_BY_ONE + 1..=ONE_BY_ONE + BURST {
        publish(n).await;
        if n % 4 == 0 {
            for ws in members.iter_mut().step_by(37) {
                ws.stream.send(Message::Ping(vec![9].into())).await.unwrap();
                ws.send(json!({"op": "presence", "users": ["m0"], "ref": n}))
                    .await;
            }
        }
    }
    let expected: Vec<u64> = (ONE_BY_ONE + 1..=ONE_BY_ONE + BURST).collect();
    for (i, ws) in members.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        while seqs.len() < expected.len() {
            let v = ws.next().await;
            if v["type"] == "event" && v["channel"] == "room:big" {
                seqs.push(v["seq"].as_u64().unwrap());
            } else if v["type"] == "reply" {
                assert_eq!(v["ok"], true, "{v}");
            }
        }
        assert_eq!(seqs, expected, "member m{i}");
    }
    // And nothing twice: no event after the last (on the members that sent ops, and the last one).
    for i in (0..MEMBERS).step_by(37).chain([MEMBERS - 1]) {
        members[i]
            .assert_none(Duration::from_millis(200), |v| v["channel"] == "room:big")
            .await;
    }
}

/// Writer tasks send a fan-out's small frames to many sockets at once (`[http] io_uring`, on by
/// default; one `send()` each with it off): a member whose socket fills up mid-batch gets the
/// rest of the frame from its task, before anything else, while the batch goes on for the others.
/// Every member gets every event once, in order, whole, and the op replies and pong of the full
/// one come after the frame the batch left half written.
async fn a_full_socket_in_a_batch(io_uring: bool) {
    // The slow member's queue holds what its socket does not (the frames past ~4 MiB).
    let dir = TempDir::new("batch-full");
    let config = dir.path.join("herald.toml");
    std::fs::write(&config, "[limits]\nqueue_frames = 8192\n").unwrap();
    let node = HeraldProcess::memory(&[
        ("HERALD_IO_URING", if io_uring { "true" } else { "false" }),
        ("HERALD_CONFIG", config.to_str().unwrap()),
    ]);
    let addr = node.addr.clone();
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut ws = room_member_at(&addr, "r1", &format!("fast{i}")).await;
        // Read all along, so that their sockets never fill.
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < N as usize {
                let v = ws.next().await;
                if v["type"] == "event" {
                    assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(PAD), "{v}");
                    seqs.push(v["seq"].as_u64().unwrap());
                }
            }
            seqs
        }));
    }
    api_at(
        &addr,
        reqwest::Method::PUT,
        "/api/v1/rooms/r1/members/slow",
        None,
    )
    .await;
    let url = format!("ws://{addr}/ws?token={}", user_token("slow"));
    let mut slow = ws_slow_reader_at(addr.parse().unwrap(), &url).await;
    slow.subscribed("room:r1").await;

    // 2.9 MB of 960-byte frames (the batches' largest), none read by the slow member until the
    // end: past what its socket holds (a 4 KiB window; here the send buffer stopped growing at
    // 1.9 MB, short of net.ipv4.tcp_wmem's 4 MiB).
    const N: u64 = 3000;
    const PAD: usize = 900;
    let pad = "x".repeat(PAD);
    let before = metric_at(&addr, "herald_direct_writes_total").await;
    // Ten publishes at a time (the seqs are the store's order, whatever the requests' order).
    for n in (10..=N).step_by(10) {
        futures_util::future::join_all((0..10).map(|_| {
            let body = json!({"event": "chat.message", "room": "r1", "data": {"pad": pad}});
            api_at(&addr, reqwest::Method::POST, "/api/v1/events", Some(body))
        }))
        .await;
        if n == N / 2 {
            slow.send(json!({"op": "presence", "users": ["slow"], "ref": 77}))
                .await;
            slow.stream
                .send(Message::Ping(vec![7].into()))
                .await
                .unwrap();
        }
    }
    let expected: Vec<u64> = (1..=N).collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), expected);
    }
    let (mut seqs, mut reply) = (Vec::new(), None);
    while seqs.len() < N as usize || reply.is_none() {
        let v = slow.next().await;
        match v["type"].as_str() {
            Some("event") => {
                assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(PAD), "{v}");
                seqs.push(v["seq"].as_u64().unwrap());
            }
            Some("reply") => {
                assert_eq!(
                    (v["ref"].as_u64(), &v["ok"]),
                    (Some(77), &json!(true)),
                    "{v}"
                );
                reply = Some(seqs.len());
            }
            _ => {}
        }
    }
    assert_eq!(seqs, expected);
    // The slow member's socket did fill: its later deliveries went through its queue, not the
    // fan-out's writes (which took every delivery of the others).
    let written = metric_at(&addr, "herald_direct_writes_total").await - before;
    assert!(
        written < (4 * N) as f64 && written >= (3 * N) as f64,
        "{written} direct writes of {} deliveries",
        4 * N
    );
    slow.assert_none(Duration::from_millis(200), |v| v["channel"] == "room:r1")
        .await;
}

#[tokio::test]
async fn a_socket_that_fills_up_in_a_batched_send_gets_the_rest_from_its_task() {
    a_full_socket_in_a_batch(true).await;
}

#[tokio::test]
async fn a_socket_that_fills_up_with_one_send_each_gets_the_rest_from_its_task() {
    a_full_socket_in_a_batch(false).await;
}
