//! The backend contract: the same test functions run against every implementation of the backend
//! traits (memory now; Redis joins with the Redis issue by adding a factory). Each function states the
//! guarantee of the trait doc it checks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald::backend::{
    AppState, Backends, Delivery, DeliveryFilter, DeliverySink, HistoryLimits, Idempotency,
    Outgoing, OutgoingPayload, PushDevice, SessionInfo, Status,
};
use herald::channels::ChannelName;
use herald::event::{EventBody, now_ms};
use serde_json::value::RawValue;

/// Records what the broker hands to this node.
#[derive(Default)]
struct Recorder(Mutex<Vec<Arc<Delivery>>>);

impl DeliverySink for Recorder {
    fn deliver(&self, d: Arc<Delivery>) {
        self.0.lock().unwrap().push(d);
    }
}

fn limits(size: usize) -> Option<HistoryLimits> {
    Some(HistoryLimits {
        size,
        age: Duration::from_secs(3600),
    })
}

fn body(n: u64) -> Bytes {
    let data = RawValue::from_string(n.to_string()).unwrap();
    EventBody {
        id: &format!("id-{n}"),
        event: "n",
        data: &data,
        from: None,
        ts: now_ms(),
    }
    .encode()
}

async fn publish(
    b: &Backends,
    ch: &ChannelName,
    n: u64,
    persist: Option<HistoryLimits>,
) -> Option<herald::event::Position> {
    b.broker
        .publish(Outgoing {
            channel: ch.clone(),
            event: "n".into(),
            payload: OutgoingPayload::EventBody(body(n)),
            persist,
            filter: DeliveryFilter::default(),
        })
        .await
        .unwrap()
}

fn info(user: &str, session: &str) -> SessionInfo {
    SessionInfo {
        session: session.into(),
        user: user.into(),
        device: format!("dev-{session}").into(),
        platform: Some("web".into()),
        state: AppState::Foreground,
        node: "n1".into(),
    }
}

/// History: a fresh channel has an epoch and seq 0; seqs are 1, 2, 3 with no gap; reads honour
/// after/until/limit; size trims the oldest and says so through `first_available`.
async fn history_seq_and_trim(b: Backends) {
    let ch = ChannelName::parse("room:conf-h").unwrap();
    let p0 = b.history.position(&ch).await.unwrap();
    assert_eq!(p0.seq, 0);
    assert!(!p0.epoch.as_str().is_empty());
    for n in 1..=5 {
        let p = publish(&b, &ch, n, limits(3)).await.unwrap();
        assert_eq!(p.seq, n);
        assert_eq!(p.epoch, p0.epoch, "epoch is stable while data is kept");
    }
    let page = b
        .history
        .read(&ch, 0, None, 100, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(page.position.seq, 5);
    assert_eq!(page.first_available, 3, "size 3 keeps seqs 3..=5");
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    let page = b
        .history
        .read(&ch, 3, Some(4), 100, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4]
    );
    let page = b
        .history
        .read(&ch, 2, None, 1, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3]
    );
    let frame: serde_json::Value = serde_json::from_slice(&page.events[0].frame).unwrap();
    assert_eq!(frame["seq"], 3);
    assert_eq!(frame["epoch"], p0.epoch.as_str());
    assert_eq!(frame["channel"], "room:conf-h");
}

/// History: the age limit applies when reading.
async fn history_age_limit(b: Backends) {
    let ch = ChannelName::parse("room:conf-age").unwrap();
    publish(&b, &ch, 1, limits(10)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    publish(&b, &ch, 2, limits(10)).await;
    let page = b
        .history
        .read(&ch, 0, None, 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(page.first_available, 2);
}

/// Broker: stored publishes reach the sink in seq order, with the same frame history keeps;
/// ephemeral ones reach it without a position and are not stored.
async fn broker_delivers_in_order(b: Backends, rec: Arc<Recorder>) {
    let ch = ChannelName::parse("room:conf-b").unwrap();
    b.broker.subscribe(&ch).await.unwrap();
    for n in 1..=20 {
        publish(&b, &ch, n, limits(100)).await;
    }
    publish(&b, &ch, 99, None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = rec
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.channel == ch)
            .count();
        if n >= 21 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got: Vec<Arc<Delivery>> = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|d| d.channel == ch)
        .cloned()
        .collect();
    assert_eq!(got.len(), 21);
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|d| d.position.as_ref().map(|p| p.seq))
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    let page = b
        .history
        .read(&ch, 0, None, 100, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 20, "the ephemeral publish is not stored");
    assert_eq!(
        page.events[4].frame, got[4].frame,
        "one encoding, shared by history and delivery"
    );
    assert!(got[20].position.is_none());
    b.broker.unsubscribe(&ch).await.unwrap();
    b.broker.ping().await.unwrap();
}

/// Presence: exactly one "came online" and one "went offline" per user, however many sessions.
async fn presence_transitions(b: Backends) {
    let ttl = Duration::from_secs(60);
    assert!(b.presence.connect(&info("pa", "s1"), ttl).await.unwrap());
    assert!(!b.presence.connect(&info("pa", "s2"), ttl).await.unwrap());
    assert!(
        !b.presence.connect(&info("pa", "s1"), ttl).await.unwrap(),
        "refresh is not a transition"
    );
    let p = &b
        .presence
        .get(&["pa".into(), "nobody".into()])
        .await
        .unwrap();
    assert!(p[0].online);
    assert_eq!(p[0].devices.len(), 2);
    assert!(!p[1].online);
    assert_eq!(b.presence.disconnect("pa", "s1").await.unwrap(), None);
    let last = b.presence.disconnect("pa", "s2").await.unwrap();
    assert!(last.is_some());
    assert_eq!(
        b.presence.disconnect("pa", "s2").await.unwrap(),
        None,
        "reported once"
    );
    let p = &b.presence.get(&["pa".into()]).await.unwrap()[0];
    assert!(!p.online);
    assert_eq!(p.last_seen, last);
}

/// Presence: a session not refreshed within its TTL expires and the next sweep reports the user
/// offline once; heartbeats keep sessions alive.
async fn presence_expiry(b: Backends) {
    let short = Duration::from_millis(200);
    b.presence.connect(&info("pe", "x1"), short).await.unwrap();
    b.presence.connect(&info("pk", "k1"), short).await.unwrap();
    b.presence
        .room_join("conf-room", "pe", "x1", short)
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.presence
            .heartbeat(&[("pk".into(), "k1".into())], short)
            .await
            .unwrap();
    }
    let r = b.presence.sweep().await.unwrap();
    assert!(r.offline.iter().any(|(u, _)| u == "pe"), "{:?}", r.offline);
    assert!(
        !r.offline.iter().any(|(u, _)| u == "pk"),
        "heartbeats keep it alive"
    );
    assert!(
        r.room_left
            .iter()
            .any(|(room, u)| room == "conf-room" && u == "pe")
    );
    let again = b.presence.sweep().await.unwrap();
    assert!(
        !again.offline.iter().any(|(u, _)| u == "pe"),
        "reported once"
    );
    assert!(!b.presence.get(&["pe".into()]).await.unwrap()[0].online);
}

/// Presence: status, state, counts, pages, rooms.
async fn presence_queries(b: Backends) {
    let ttl = Duration::from_secs(60);
    for u in ["qa", "qb", "qc"] {
        b.presence
            .connect(&info(u, &format!("{u}-1")), ttl)
            .await
            .unwrap();
    }
    b.presence
        .set_status("qa", Status::Dnd, Some("focus".into()))
        .await
        .unwrap();
    b.presence
        .set_state("qa", "qa-1", AppState::Background)
        .await
        .unwrap();
    let p = &b.presence.get(&["qa".into()]).await.unwrap()[0];
    assert_eq!(p.status, Status::Dnd);
    assert_eq!(p.text.as_deref(), Some("focus"));
    assert_eq!(p.devices[0].state, AppState::Background);
    assert!(b.presence.online_count().await.unwrap() >= 3);
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = b.presence.online_page(cursor.as_deref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        seen.extend(page);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    for u in ["qa", "qb", "qc"] {
        assert_eq!(
            seen.iter().filter(|s| s.as_str() == u).count(),
            1,
            "{u} once in {seen:?}"
        );
    }
    assert!(
        b.presence
            .room_join("qroom", "qa", "qa-1", ttl)
            .await
            .unwrap()
    );
    assert!(
        !b.presence
            .room_join("qroom", "qa", "qa-2", ttl)
            .await
            .unwrap()
    );
    assert_eq!(
        b.presence.room_users("qroom").await.unwrap(),
        vec!["qa".to_string()]
    );
    assert!(!b.presence.room_leave("qroom", "qa", "qa-1").await.unwrap());
    assert!(b.presence.room_leave("qroom", "qa", "qa-2").await.unwrap());
    assert!(b.presence.room_users("qroom").await.unwrap().is_empty());
}

/// Store: membership with its reverse index, contacts.
async fn store_membership(b: Backends) {
    let s = &b.store;
    assert!(s.add_member("m1", "bob").await.unwrap());
    assert!(s.add_member("m1", "amy").await.unwrap());
    assert!(!s.add_member("m1", "amy").await.unwrap());
    assert!(s.add_member("m2", "amy").await.unwrap());
    assert_eq!(s.members("m1").await.unwrap(), vec!["amy", "bob"]);
    assert_eq!(s.rooms_of("amy").await.unwrap(), vec!["m1", "m2"]);
    assert!(s.is_member("m1", "bob").await.unwrap());
    assert!(s.remove_member("m1", "bob").await.unwrap());
    assert!(!s.remove_member("m1", "bob").await.unwrap());
    assert!(!s.is_member("m1", "bob").await.unwrap());
    assert!(s.rooms_of("bob").await.unwrap().is_empty());
    s.set_contacts("amy", &["zed".into(), "bob".into(), "bob".into()])
        .await
        .unwrap();
    assert_eq!(s.contacts("amy").await.unwrap(), vec!["bob", "zed"]);
    s.set_contacts("amy", &[]).await.unwrap();
    assert!(s.contacts("amy").await.unwrap().is_empty());
}

/// Store: an idempotency key is claimed once; duplicates see it pending, then the first reply; a
/// released key can be claimed again; keys expire.
async fn store_idempotency(b: Backends) {
    let s = &b.store;
    let ttl = Duration::from_secs(60);
    assert_eq!(s.idem_begin("k1", ttl).await.unwrap(), Idempotency::Claimed);
    assert_eq!(s.idem_begin("k1", ttl).await.unwrap(), Idempotency::Pending);
    s.idem_complete("k1", Bytes::from_static(b"first"), ttl)
        .await
        .unwrap();
    assert_eq!(
        s.idem_begin("k1", ttl).await.unwrap(),
        Idempotency::Done(Bytes::from_static(b"first"))
    );
    assert_eq!(s.idem_begin("k2", ttl).await.unwrap(), Idempotency::Claimed);
    s.idem_release("k2").await.unwrap();
    assert_eq!(s.idem_begin("k2", ttl).await.unwrap(), Idempotency::Claimed);
    assert_eq!(
        s.idem_begin("k3", Duration::from_millis(100))
            .await
            .unwrap(),
        Idempotency::Claimed
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        s.idem_begin("k3", ttl).await.unwrap(),
        Idempotency::Claimed,
        "expired"
    );
}

/// Store: unread = countable seqs after the read pointer; pointers only move forward; countable seqs
/// are bounded.
async fn store_unread(b: Backends) {
    let s = &b.store;
    for seq in [1, 2, 4, 5] {
        s.mark_countable("u1", seq, 3).await.unwrap();
    }
    // Bounded to 3: seq 1 was dropped.
    assert_eq!(
        s.unread("ann", &["u1".into(), "none".into()])
            .await
            .unwrap(),
        vec![3, 0]
    );
    assert_eq!(s.set_read("ann", "u1", 4).await.unwrap(), 4);
    assert_eq!(s.set_read("ann", "u1", 2).await.unwrap(), 4, "never back");
    assert_eq!(s.unread("ann", &["u1".into()]).await.unwrap(), vec![1]);
}

/// Store: focus expires; devices; announcements filtered by expiry; the cursor only moves forward.
async fn store_focus_devices_announcements(b: Backends) {
    let s = &b.store;
    s.set_focus("f1", "ann", "s1", Duration::from_secs(60))
        .await
        .unwrap();
    s.set_focus("f1", "bo", "s2", Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.focused("f1").await.unwrap(), vec!["ann"]);
    s.clear_focus("f1", "ann", "s1").await.unwrap();
    assert!(s.focused("f1").await.unwrap().is_empty());

    let d = PushDevice {
        device: "phone".into(),
        provider: "fcm".into(),
        token: Some("tok".into()),
        subscription: None,
        platform: Some("android".into()),
    };
    s.put_device("ann", d.clone()).await.unwrap();
    assert_eq!(s.devices("ann").await.unwrap(), vec![d]);
    assert!(s.delete_device("ann", "phone").await.unwrap());
    assert!(!s.delete_device("ann", "phone").await.unwrap());

    let now = now_ms();
    let mk = |id: &str, expires: Option<i64>| herald::backend::Announcement {
        id: id.into(),
        title: "t".into(),
        body: "b".into(),
        url: None,
        image: None,
        expires,
        audience: Default::default(),
        ts: now,
    };
    s.add_announcement(&mk("a1", None)).await.unwrap();
    s.add_announcement(&mk("a2", Some(now + 50))).await.unwrap();
    s.add_announcement(&mk("a3", Some(now + 60_000)))
        .await
        .unwrap();
    let ids =
        |v: Vec<herald::backend::Announcement>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.announcements(now).await.unwrap()),
        vec!["a1", "a2", "a3"]
    );
    assert_eq!(
        ids(s.announcements(now + 100).await.unwrap()),
        vec!["a1", "a3"]
    );
    assert_eq!(s.swap_announcement_cursor("ann", "a2").await.unwrap(), None);
    assert_eq!(
        s.swap_announcement_cursor("ann", "a1").await.unwrap(),
        Some("a2".into())
    );
    assert_eq!(
        s.swap_announcement_cursor("ann", "a3").await.unwrap(),
        Some("a2".into()),
        "a1 did not move it back"
    );
}

/// Runs the whole contract against backends made by `make`.
async fn contract(make: impl Fn() -> Backends) {
    history_seq_and_trim(make()).await;
    history_age_limit(make()).await;
    let b = make();
    let rec = Arc::new(Recorder::default());
    b.broker.attach(rec.clone());
    broker_delivers_in_order(b, rec).await;
    presence_transitions(make()).await;
    presence_expiry(make()).await;
    presence_queries(make()).await;
    store_membership(make()).await;
    store_idempotency(make()).await;
    store_unread(make()).await;
    store_focus_devices_announcements(make()).await;
}

#[tokio::test]
async fn memory_backend_meets_the_contract() {
    contract(Backends::memory).await;
}
