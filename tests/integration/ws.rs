//! WebSocket: connect, subscribe/publish/replay, errors.

use serde_json::json;

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
        let r = ws.request(json!({"op":"subscribe","channel":"room:r1"})).await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["recovered"], true);
    }
    let r = a
        .request(json!({"op":"publish","channel":"room:r1","event":"chat.message","data":{"text":"hi"}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["deliveries"][0]["seq"], 1);
    let ev = b.event_on("room:r1").await;
    assert_eq!(ev["data"]["text"], "hi");
    assert_eq!(ev["from"], "alice");
    assert_eq!(ev["seq"], 1);
    assert_eq!(ev["epoch"], r["deliveries"][0]["epoch"]);
    a.assert_none(std::time::Duration::from_millis(300), |v| v["type"] == "event" && v["channel"] == "room:r1")
        .await;
}
