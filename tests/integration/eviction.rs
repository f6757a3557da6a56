//! Sessions whose clients stop reading are removed even when their own task cannot run.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// Regression: an SSE stream whose client stops reading is never polled by the server, so it cannot
/// close itself when its queue fills; the reaper must evict it (presence offline, no more queueing).
#[tokio::test]
async fn sse_client_that_stops_reading_is_evicted() {
    let t = TestServer::start_with(|c| {
        c.limits.queue_frames = 8;
        c.heartbeat = Duration::from_secs(1);
        c.presence_ttl = Duration::from_secs(30);
    })
    .await;
    t.join("r1", "slow").await;
    t.join("r1", "watcher").await;
    let url = t.url(&format!("/sse?channels=room:r1&token={}", t.token("slow")));
    let stuck = Sse::open(&url, None).await; // never read again
    let mut w = t.ws("watcher").await;
    let r = w.request(json!({"op":"watch","users":["slow"]})).await;
    assert_eq!(r["presence"]["slow"]["online"], true, "{r}");
    let pad = "x".repeat(32 * 1024);
    for i in 0..300 {
        t.publish(json!({"event":"bulk","room":"r1","data":{"i":i,"pad":pad}}))
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let gone = loop {
        let v = tokio::time::timeout_at(deadline, w.wait_for(|v| v["type"] == "presence.changed"))
            .await
            .expect("the stuck SSE session was not evicted in time");
        if v["user"] == "slow" && v["online"] == false {
            break v;
        }
    };
    assert!(gone["last_seen"].is_i64());
    let (_, p) = t.api("GET", "/api/v1/presence/slow", None).await;
    assert_eq!(p["online"], false);
    drop(stuck);
}
