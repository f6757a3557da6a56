//! Replay and history: `subscribe` with `since` (then live, no gap, no duplicate, also under concurrent
//! publishing), SSE resume under concurrent publishing, positions that cannot be served, the `history` op,
//! and the slow-consumer rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald::ChannelKinds;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::*;

fn chat(n: u64) -> Value {
    json!({"event": "chat.message", "room": "r1", "data": {"n": n}})
}

/// Publishes `n` events to room r1 from a task, as fast as it can; `progress` is the highest seq so far.
fn publish_in_background(t: &TestServer, n: u64, progress: Arc<AtomicU64>) -> JoinHandle<()> {
    let p = t.publisher();
    tokio::spawn(async move {
        for i in 1..=n {
            let r = p.publish(chat(i)).await;
            progress.fetch_max(
                r["deliveries"][0]["seq"].as_u64().unwrap(),
                Ordering::SeqCst,
            );
        }
    })
}

/// Waits (bounded) until `progress` reaches `at`.
async fn reached(progress: &AtomicU64, at: u64) {
    tokio::time::timeout(WAIT, async {
        while progress.load(Ordering::SeqCst) < at {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("publisher stalled");
}

/// The seqs of room:r1 events until `last` arrives, checking that replayed events all come first.
async fn collect_ws(ws: &mut Ws, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut live = false;
    while seqs.last() != Some(&last) {
        let e = ws.event_on("room:r1").await;
        let replay = e["replay"] == true;
        assert!(!(live && replay), "a replayed event after a live one: {e}");
        live |= !replay;
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(e["data"]["n"], seq, "{e}");
        seqs.push(seq);
        assert!(
            seqs.len() <= last as usize,
            "more events than published: {seqs:?}"
        );
    }
    seqs
}

fn epoch_of(reply: &Value) -> Value {
    reply["deliveries"][0]["epoch"].clone()
}

#[tokio::test]
async fn subscribe_since_replays_then_goes_live() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut epoch = Value::Null;
    for n in 1..=5 {
        epoch = epoch_of(&t.publish(chat(n)).await);
    }
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(
            json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": 2}}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone(), r["epoch"].clone()),
        (json!(true), json!(5), epoch.clone())
    );
    for seq in 3..=5 {
        let e = ws.next().await;
        assert_eq!(e["type"], "event", "{e}");
        assert_eq!(
            (e["channel"].clone(), e["seq"].clone(), e["replay"].clone()),
            (json!("room:r1"), json!(seq), json!(true)),
            "{e}"
        );
        assert_eq!(e["epoch"], epoch);
        assert_eq!(e["data"]["n"], seq);
    }
    t.publish(chat(6)).await;
    let e = ws.event_on("room:r1").await;
    assert_eq!(
        (e["channel"].clone(), e["seq"].clone()),
        (json!("room:r1"), json!(6)),
        "{e}"
    );
    assert!(e.get("replay").is_none(), "live events are not marked: {e}");

    // since = the channel's last seq: recovered, nothing to replay.
    let mut ws2 = t.ws("alice").await;
    let r = ws2
        .request(
            json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": 6}}),
        )
        .await;
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone()),
        (json!(true), json!(6)),
        "{r}"
    );
    t.publish(chat(7)).await;
    let e = ws2.event_on("room:r1").await;
    assert_eq!(e["seq"], 7, "{e}");
    assert!(e.get("replay").is_none());
}

#[tokio::test]
async fn ws_since_under_concurrent_publishing_has_no_gap_and_no_duplicate() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let progress = Arc::new(AtomicU64::new(0));
    let publisher = publish_in_background(&t, 300, progress.clone());
    reached(&progress, 40).await;
    // A position taken earlier; the client connects and subscribes later, while publishing goes on.
    let (_, h) = t
        .api(
            "GET",
            "/api/v1/channels/room:r1/history?since=0&limit=1",
            None,
        )
        .await;
    let epoch = h["epoch"].clone();
    let since = 25;
    reached(&progress, 120).await;
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": since}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["recovered"], true, "{r}");
    let at_subscribe = r["seq"].as_u64().unwrap();
    let seqs = collect_ws(&mut ws, 300).await;
    publisher.await.unwrap();
    assert_eq!(
        seqs,
        (since + 1..=300).collect::<Vec<_>>(),
        "subscribed at seq {at_subscribe}"
    );
    ws.assert_none(Duration::from_millis(200), |v| {
        v["type"] == "event" && v["channel"] == "room:r1"
    })
    .await;
}

#[tokio::test]
async fn sse_resume_under_concurrent_publishing_has_no_gap_and_no_duplicate() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let url = t.url(&format!(
        "/sse?channels=room:r1,user:alice&token={}",
        t.token("alice")
    ));
    let mut sse = Sse::open(&url, None).await;
    let progress = Arc::new(AtomicU64::new(0));
    let publisher = publish_in_background(&t, 300, progress.clone());

    let mut seqs = Vec::new();
    let mut last_id = String::new();
    while seqs.len() < 80 {
        let e = sse.next().await;
        if e.event == "presence.update" {
            continue;
        }
        assert_eq!(e.data["channel"], "room:r1", "{e:?}");
        seqs.push(e.data["seq"].as_u64().unwrap());
        last_id = e.id.clone();
    }
    drop(sse);
    // Reconnect while publishing continues (some events are published while disconnected).
    let cut = *seqs.last().unwrap();
    reached(&progress, (cut + 20).min(300)).await;
    let mut sse = Sse::open(&url, Some(&last_id)).await;
    while seqs.last() != Some(&300) {
        let e = sse.next().await;
        if e.event == "presence.update" {
            continue;
        }
        assert_eq!(e.data["channel"], "room:r1", "{e:?}");
        let seq = e.data["seq"].as_u64().unwrap();
        assert_eq!(e.data["data"]["n"], seq);
        seqs.push(seq);
        assert!(
            seqs.len() <= 300,
            "more events than published (cut at {cut})"
        );
    }
    publisher.await.unwrap();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "cut at {cut}");
}

#[tokio::test]
async fn since_with_a_wrong_epoch_is_not_recovered() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let mut epoch = Value::Null;
    for n in 1..=3 {
        epoch = epoch_of(&t.publish(chat(n)).await);
    }
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": "0000000000ff", "seq": 1}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone(), r["epoch"].clone()),
        (json!(false), json!(3), epoch)
    );
    // No replay: the next event is the live one.
    t.publish(chat(4)).await;
    let e = ws.event_on("room:r1").await;
    assert_eq!(e["seq"], 4, "{e}");
    assert!(e.get("replay").is_none(), "{e}");
}

/// The shipped channels.toml with room history_size = `size`.
fn kinds_with_room_history(size: usize) -> ChannelKinds {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/channels.toml")).unwrap();
    let mut section = String::new();
    let mut changed = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let tl = l.trim();
            if tl.starts_with('[') {
                section = tl.to_string();
            }
            if section == "[room]" && tl.starts_with("history_size") {
                changed = true;
                format!("history_size = {size}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(changed, "channels.toml has no [room] history_size");
    ChannelKinds::parse("channels.toml", &out.join("\n")).unwrap()
}

#[tokio::test]
async fn since_trimmed_past_history_is_not_recovered() {
    let t = TestServer::start_config(test_config(), kinds_with_room_history(5)).await;
    t.join("r1", "alice").await;
    let mut epoch = Value::Null;
    for n in 1..=10 {
        epoch = epoch_of(&t.publish(chat(n)).await);
    }
    // 6..=10 are kept: since 2 needs 3, which is gone.
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(
            json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": 2}}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone()),
        (json!(false), json!(10)),
        "{r}"
    );
    t.publish(chat(11)).await;
    let e = ws.event_on("room:r1").await;
    assert_eq!(e["seq"], 11, "no replay, then live: {e}");
    assert!(e.get("replay").is_none(), "{e}");

    // since 6 needs 7, the oldest kept: recovered.
    let mut ws = t.ws("alice").await;
    let r = ws
        .request(
            json!({"op": "subscribe", "channel": "room:r1", "since": {"epoch": epoch, "seq": 6}}),
        )
        .await;
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone()),
        (json!(true), json!(11)),
        "{r}"
    );
    let seqs = collect_ws(&mut ws, 11).await;
    assert_eq!(seqs, (7..=11).collect::<Vec<_>>());

    // The history op says the same about a trimmed range.
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 1}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["recovered"], false, "{r}");
    let got: Vec<u64> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (7..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_op_takes_inclusive_ranges_and_bounded_limits() {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r2", "bob").await;
    let mut epoch = Value::Null;
    for n in 1..=10 {
        epoch = epoch_of(&t.publish(chat(n)).await);
    }
    let mut ws = t.ws("alice").await;
    let seqs = |r: &Value| -> Vec<u64> {
        r["events"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"))
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };

    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 3, "to": 6}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (
            r["channel"].clone(),
            r["epoch"].clone(),
            r["recovered"].clone()
        ),
        (json!("room:r1"), epoch, json!(true))
    );
    assert_eq!(seqs(&r), vec![3, 4, 5, 6]);
    let e = &r["events"][0];
    assert_eq!(
        (
            e["type"].clone(),
            e["channel"].clone(),
            e["data"]["n"].clone()
        ),
        (json!("event"), json!("room:r1"), json!(3))
    );

    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 3, "to": 6, "limit": 2}))
        .await;
    assert_eq!(seqs(&r), vec![3, 4]);
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 8}))
        .await;
    assert_eq!(seqs(&r), vec![8, 9, 10]);
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "to": 2}))
        .await;
    assert_eq!(seqs(&r), vec![1, 2]);
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 5, "to": 5}))
        .await;
    assert_eq!(seqs(&r), vec![5]);
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": 11}))
        .await;
    assert_eq!(seqs(&r), Vec::<u64>::new());
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "limit": 1000}))
        .await;
    assert_eq!(seqs(&r), (1..=10).collect::<Vec<_>>());

    let err = |r: &Value| (r["ok"].clone(), r["error"]["code"].clone());
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "limit": 1001}))
        .await;
    assert_eq!(err(&r), (json!(false), json!("bad_frame")), "{r}");
    let r = ws
        .request(json!({"op": "history", "channel": "room:r1", "from": "x"}))
        .await;
    assert_eq!(err(&r), (json!(false), json!("bad_frame")), "{r}");
    let r = ws
        .request(json!({"op": "history", "channel": "room:r2"}))
        .await;
    assert_eq!(err(&r), (json!(false), json!("not_member")), "{r}");
    let r = ws
        .request(json!({"op": "history", "channel": "room:a!b"}))
        .await;
    assert_eq!(err(&r), (json!(false), json!("bad_channel")), "{r}");
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_others_get_everything() {
    let t = TestServer::start_with(|c| c.limits.queue_frames = 8).await;
    t.join("r1", "slow").await;
    t.join("r1", "reader").await;
    let mut slow = t.ws("slow").await;
    slow.subscribed("room:r1").await;
    let mut reader = t.ws("reader").await;
    reader.subscribed("room:r1").await;

    const N: u64 = 300;
    let reading = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < N as usize {
            let e = reader.event_on("room:r1").await;
            seqs.push(e["seq"].as_u64().unwrap());
        }
        seqs
    });
    // ~30 KB each: fills the slow socket's buffers, then its queue of 8.
    let pad = "x".repeat(30 * 1024);
    for n in 1..=N {
        t.publish(json!({"event": "chat.message", "room": "r1", "data": {"n": n, "pad": pad}}))
            .await;
    }
    let seqs = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the reading client fell behind")
        .unwrap();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());

    // The slow session is gone without the slow client doing anything (the server ends it).
    let v = t
        .api_until("/api/v1/presence/slow", |v| v["online"] == false)
        .await;
    assert_eq!(v["online"], false);
    let (s, _) = t.api("GET", "/api/v1/presence/reader", None).await;
    assert_eq!(s, 200);
    let text = t.metrics_text().await;
    assert!(
        text.contains("herald_slow_consumer_disconnects_total"),
        "{text}"
    );

    // What reaches the slow client in the end: `disconnect` 4008, then close 4008.
    let closed = slow.closed().await;
    assert_eq!(
        closed,
        Closed {
            disconnect: Some(4008),
            close: Some(4008)
        }
    );
}
