//! The backend contract: the same test functions run against every implementation of the backend
//! traits, grouped by trait (`conformance::GROUP::memory` and `…::redis`, one [`Factory`] per
//! backend). Each function states the guarantee of the trait doc it checks; the Redis-only tests
//! after them check what only a shared Redis can get wrong (races between nodes, round trips, keys
//! left behind).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald::backend::{
    Backends, Delivery, DeliveryFilter, DeliverySink, HistoryLimits, KeyState, NodeInfo, Outgoing,
    OutgoingPayload, UnreadStep,
};
use herald::channels::ChannelName;
use herald::device::DeviceState;
use herald::device::PushDevice;
use herald::event::{EventBody, now_ms};
use herald::presence::SessionInfo;
use herald::presence::Status;
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
    publish_counted(b, ch, n, persist, None).await
}

/// A publish carrying an unread step.
async fn publish_counted(
    b: &Backends,
    ch: &ChannelName,
    n: u64,
    persist: Option<HistoryLimits>,
    unread: Option<UnreadStep>,
) -> Option<herald::event::Position> {
    b.broker
        .publish(Outgoing {
            channel: ch.clone(),
            event: "n".into(),
            payload: OutgoingPayload::EventBody(body(n)),
            persist,
            filter: DeliveryFilter::default(),
            unread,
            dedupe: None,
            push: None,
        })
        .await
        .unwrap()
}

fn step(keep: usize, from: Option<&str>) -> Option<UnreadStep> {
    Some(UnreadStep {
        keep,
        from: from.map(Into::into),
    })
}

fn info(user: &str, session: &str) -> SessionInfo {
    SessionInfo {
        session: session.into(),
        user: user.into(),
        device: format!("dev-{session}").into(),
        platform: Some("web".into()),
        state: DeviceState::Foreground,
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
    // A heartbeat names the sessions it did not find live (expired, swept, never there), by index,
    // and revives none of them.
    let missing = b
        .presence
        .heartbeat(
            &[
                ("pe".into(), "x1".into()),
                ("pk".into(), "k1".into()),
                ("pn".into(), "never".into()),
            ],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(missing, vec![0, 2]);
    assert!(!b.presence.get(&["pe".into()]).await.unwrap()[0].online);
    assert!(b.presence.get(&["pk".into()]).await.unwrap()[0].online);
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
        .set_state("qa", "qa-1", DeviceState::Background)
        .await
        .unwrap();
    let p = &b.presence.get(&["qa".into()]).await.unwrap()[0];
    assert_eq!(p.status, Status::Dnd);
    assert_eq!(p.text.as_deref(), Some("focus"));
    assert_eq!(p.devices[0].state, DeviceState::Background);
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

/// Membership: members with their reverse index, both directions at once.
async fn membership(b: Backends) {
    let s = &b.membership;
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
}

/// Contacts: replaced whole, sorted, without duplicates.
async fn contacts(b: Backends) {
    let s = &b.contacts;
    s.set_contacts("amy", &["zed".into(), "bob".into(), "bob".into()])
        .await
        .unwrap();
    assert_eq!(s.contacts("amy").await.unwrap(), vec!["bob", "zed"]);
    s.set_contacts("amy", &[]).await.unwrap();
    assert!(s.contacts("amy").await.unwrap().is_empty());
}

fn claimed(id: &str) -> KeyState {
    KeyState::Claimed { id: id.into() }
}

/// Idempotency: a key is claimed once, with the event id of its first claim; duplicates see the
/// lease held, then the first reply; a released or lapsed lease is taken over with the first id;
/// records expire.
async fn idempotency(b: Backends) {
    let s = &b.idempotency;
    let ttl = Duration::from_secs(60);
    let lease = Duration::from_secs(60);
    assert_eq!(
        s.idem_begin("k1", "id-1", lease, ttl).await.unwrap(),
        claimed("id-1")
    );
    assert_eq!(
        s.idem_begin("k1", "id-2", lease, ttl).await.unwrap(),
        KeyState::Pending
    );
    s.idem_complete("k1", Bytes::from_static(b"first"), ttl)
        .await
        .unwrap();
    let done = KeyState::Done(Bytes::from_static(b"first"));
    assert_eq!(s.idem_begin("k1", "id-3", lease, ttl).await.unwrap(), done);
    s.idem_release("k1").await.unwrap();
    assert_eq!(
        s.idem_begin("k1", "id-4", lease, ttl).await.unwrap(),
        done,
        "a done key stays done"
    );
    // Released after a failed publish: the retry takes over at once, under the first id.
    assert_eq!(
        s.idem_begin("k2", "id-a", lease, ttl).await.unwrap(),
        claimed("id-a")
    );
    s.idem_release("k2").await.unwrap();
    assert_eq!(
        s.idem_begin("k2", "id-b", lease, ttl).await.unwrap(),
        claimed("id-a")
    );
    assert_eq!(
        s.idem_begin("k2", "id-c", lease, ttl).await.unwrap(),
        KeyState::Pending,
        "the takeover holds the lease"
    );
    // A publisher that died: its lease lapses within seconds, not with the key's ttl.
    let short = Duration::from_millis(100);
    assert_eq!(
        s.idem_begin("k3", "id-x", short, ttl).await.unwrap(),
        claimed("id-x")
    );
    assert_eq!(
        s.idem_begin("k3", "id-y", short, ttl).await.unwrap(),
        KeyState::Pending
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        s.idem_begin("k3", "id-y", lease, ttl).await.unwrap(),
        claimed("id-x"),
        "lapsed lease taken over"
    );
    // The record itself expires with its ttl.
    assert_eq!(
        s.idem_begin("k4", "id-1", short, Duration::from_millis(150))
            .await
            .unwrap(),
        claimed("id-1")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.idem_begin("k4", "id-2", lease, ttl).await.unwrap(),
        claimed("id-2"),
        "expired"
    );
}

/// Broker + store: a stored publish under a claimed idempotency key is recorded with its append, and
/// the same channel published again under the key returns the recorded position without storing or
/// delivering again (what makes a publish whose outcome was unknown safe to send again). Other
/// channels under the key, and publishes under a key never claimed, store as usual.
async fn broker_dedupes_under_an_idempotency_key(b: Backends) {
    let rec = Arc::new(Recorder::default());
    b.broker.attach(rec.clone());
    let a = ChannelName::parse("room:conf-dedupe-a").unwrap();
    let c = ChannelName::parse("room:conf-dedupe-c").unwrap();
    b.broker.subscribe(&a).await.unwrap();
    b.broker.subscribe(&c).await.unwrap();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        b.idempotency
            .idem_begin("dk", "id-1", ttl, ttl)
            .await
            .unwrap(),
        claimed("id-1")
    );
    let send = |ch: &ChannelName, key: Option<&str>, n: u64| Outgoing {
        channel: ch.clone(),
        event: "n".into(),
        payload: OutgoingPayload::EventBody(body(n)),
        persist: limits(100),
        filter: DeliveryFilter::default(),
        unread: None,
        dedupe: key.map(Into::into),
        push: None,
    };
    let first = b.broker.publish(send(&a, Some("dk"), 1)).await.unwrap();
    let again = b.broker.publish(send(&a, Some("dk"), 2)).await.unwrap();
    assert_eq!(
        again, first,
        "the same channel under the key: the first position"
    );
    let other = b
        .broker
        .publish(send(&c, Some("dk"), 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.seq, 1, "another channel under the key is stored");
    assert_eq!(
        b.broker
            .publish(send(&c, Some("dk"), 4))
            .await
            .unwrap()
            .unwrap(),
        other
    );
    // A key never claimed records nothing: both are stored.
    let x = b
        .broker
        .publish(send(&a, Some("never"), 5))
        .await
        .unwrap()
        .unwrap();
    let y = b
        .broker
        .publish(send(&a, Some("never"), 6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((x.seq, y.seq), (2, 3));
    let page = b
        .history
        .read(&a, 0, None, 100, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 3, "one event under the key, two without");
    // Delivered once per stored event (Redis hands over asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = rec.0.lock().unwrap().len();
        if n >= 4 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got: Vec<(String, u64)> = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|d| (d.channel.to_string(), d.position.as_ref().unwrap().seq))
        .collect();
    assert_eq!(
        got,
        vec![
            ("room:conf-dedupe-a".to_string(), 1),
            ("room:conf-dedupe-c".to_string(), 1),
            ("room:conf-dedupe-a".to_string(), 2),
            ("room:conf-dedupe-a".to_string(), 3),
        ]
    );
}

/// Unread: countable seqs after the read pointer; pointers only move forward; countable seqs are
/// bounded.
async fn unread(b: Backends) {
    let s = &b.unread;
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

/// Each user's (read pointer, unread count) in `room`. `set_read` to 0 moves nothing and returns the
/// pointer.
async fn pointers(b: &Backends, room: &str, users: &[&str]) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for user in users {
        let pointer = b.unread.set_read(user, room, 0).await.unwrap();
        let unread = b.unread.unread(user, &[room.to_string()]).await.unwrap()[0];
        out.push((user.to_string(), pointer, unread));
    }
    out
}

/// Broker + Unread: a countable room event's unread step happens in its append (`UnreadStep`): the
/// seq is recorded as countable (the newest `keep` kept), the sender's read pointer moves to it, and
/// so do the pointers of the users focused on the room now (an expired focus does not count; several
/// sessions of a user are one user); pointers never move back. The result is exactly that of the
/// Unread calls the step stands for, made one by one.
async fn unread_step_with_the_append(b: Backends) {
    let s = &b.unread;
    let ttl = Duration::from_secs(60);
    // conf-u1 gets the folded step, conf-u2 the separate Unread calls; same focus and pointers.
    for room in ["conf-u1", "conf-u2"] {
        s.set_focus(room, "bo", "b1", ttl).await.unwrap();
        s.set_focus(room, "cy", "c1", ttl).await.unwrap();
        s.set_focus(room, "cy", "c2", ttl).await.unwrap();
        // The sender has the room open too.
        s.set_focus(room, "ann", "a1", ttl).await.unwrap();
        s.set_focus(room, "dee", "d1", Duration::from_millis(100))
            .await
            .unwrap();
        // Ahead of what is published here: stays.
        assert_eq!(s.set_read("eve", room, 10).await.unwrap(), 10);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // dee's focus expires
    let u1 = ChannelName::parse("room:conf-u1").unwrap();
    let u2 = ChannelName::parse("room:conf-u2").unwrap();
    for n in 1..=4 {
        let p = publish_counted(&b, &u1, n, limits(100), step(3, Some("ann")))
            .await
            .unwrap();
        assert_eq!(p.seq, n);
        let p = publish(&b, &u2, n, limits(100)).await.unwrap();
        s.mark_countable("conf-u2", p.seq, 3).await.unwrap();
        s.set_read("ann", "conf-u2", p.seq).await.unwrap();
        for user in s.focused("conf-u2").await.unwrap() {
            if user != "ann" {
                s.set_read(&user, "conf-u2", p.seq).await.unwrap();
            }
        }
    }
    let users = ["ann", "bo", "cy", "dee", "eve", "fay"];
    let folded = pointers(&b, "conf-u1", &users).await;
    let expected: Vec<(String, u64, u64)> = [
        ("ann", 4, 0),
        ("bo", 4, 0),
        ("cy", 4, 0),
        // Not focused (expired) and not the sender: seqs 2..=4 count (`keep` 3 dropped seq 1).
        ("dee", 0, 3),
        ("eve", 10, 0),
        ("fay", 0, 3),
    ]
    .into_iter()
    .map(|(u, p, n)| (u.to_string(), p, n))
    .collect();
    assert_eq!(folded, expected);
    assert_eq!(
        folded,
        pointers(&b, "conf-u2", &users).await,
        "the folded step equals the separate Store calls"
    );
    assert_eq!(
        s.focused("conf-u1").await.unwrap(),
        vec!["ann", "bo", "cy"],
        "the expired focus entry is gone"
    );

    // No sender (a backend publishing for nobody): only the focused users' pointers move. ann's
    // focus is gone now, so the event counts for her.
    s.clear_focus("conf-u1", "ann", "a1").await.unwrap();
    let p = publish_counted(&b, &u1, 5, limits(100), step(3, None))
        .await
        .unwrap();
    assert_eq!(p.seq, 5);
    let after: Vec<(String, u64, u64)> = pointers(&b, "conf-u1", &["ann", "bo", "cy", "dee"]).await;
    assert_eq!(
        after,
        vec![
            ("ann".to_string(), 4, 1),
            ("bo".to_string(), 5, 0),
            ("cy".to_string(), 5, 0),
            ("dee".to_string(), 0, 3),
        ]
    );

    // Nothing of it without a step, for an ephemeral publish, or on a channel that is not a room
    // (`user:conf-u3` has the same id as the room conf-u3).
    s.set_focus("conf-u3", "bo", "b1", ttl).await.unwrap();
    let u3 = ChannelName::parse("room:conf-u3").unwrap();
    assert_eq!(publish(&b, &u3, 1, limits(100)).await.unwrap().seq, 1);
    assert!(
        publish_counted(&b, &u3, 2, None, step(3, Some("ann")))
            .await
            .is_none()
    );
    let user_ch = ChannelName::parse("user:conf-u3").unwrap();
    publish_counted(&b, &user_ch, 3, limits(100), step(3, Some("ann")))
        .await
        .unwrap();
    assert_eq!(
        pointers(&b, "conf-u3", &["ann", "bo", "fay"]).await,
        vec![
            ("ann".to_string(), 0, 0),
            ("bo".to_string(), 0, 0),
            ("fay".to_string(), 0, 0),
        ]
    );
}

/// Unread: focus expires.
async fn focus(b: Backends) {
    let s = &b.unread;
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
}

/// Devices: put, list (one user, many in one call), delete.
async fn devices(b: Backends) {
    let s = &b.devices;
    let d = PushDevice {
        device: "phone".into(),
        provider: "fcm".into(),
        token: Some("tok".into()),
        subscription: None,
        platform: Some("android".into()),
    };
    s.put_device("ann", d.clone()).await.unwrap();
    assert_eq!(s.devices("ann").await.unwrap(), vec![d.clone()]);
    let users = ["ann".to_string(), "nobody".into(), "ann".into()];
    assert_eq!(
        s.devices_of(&users).await.unwrap(),
        vec![vec![d.clone()], vec![], vec![d]],
        "in order, one list per user"
    );
    assert!(s.devices_of(&[]).await.unwrap().is_empty());
    assert!(s.delete_device("ann", "phone").await.unwrap());
    assert!(!s.delete_device("ann", "phone").await.unwrap());
}

/// Announcements: filtered by expiry; the cursor only moves forward.
async fn announcements(b: Backends) {
    let s = &b.announcements;
    let now = now_ms();
    let mk = |id: &str, expires: Option<i64>| herald::announcement::Announcement {
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
    let ids = |v: Vec<herald::announcement::Announcement>| {
        v.into_iter().map(|a| a.id).collect::<Vec<_>>()
    };
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

/// Fresh backends for each contract check: the memory backend, or a new key prefix on one
/// redis-server (fresh, empty state on the same server).
enum Factory {
    Memory,
    Redis {
        server: crate::redis_server::RedisServer,
        next: std::sync::atomic::AtomicU64,
    },
}

impl Factory {
    fn memory() -> Factory {
        Factory::Memory
    }

    fn redis() -> Factory {
        Factory::Redis {
            server: crate::redis_server::RedisServer::start(),
            next: Default::default(),
        }
    }

    async fn make(&self) -> Backends {
        match self {
            Factory::Memory => Backends::memory(),
            Factory::Redis { server, next } => {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Backends::redis(&server.url, &format!("conf{n}:"), "conformance")
                    .await
                    .expect("connect to the test redis-server")
            }
        }
    }
}

/// The contract, one group per backend trait (the order of the traits in `backend/mod.rs`).
mod contract {
    use std::sync::Arc;

    use super::*;

    pub(super) async fn history(f: Factory) {
        history_seq_and_trim(f.make().await).await;
        history_age_limit(f.make().await).await;
    }

    pub(super) async fn broker(f: Factory) {
        let b = f.make().await;
        let rec = Arc::new(Recorder::default());
        b.broker.attach(rec.clone());
        broker_delivers_in_order(b, rec).await;
        broker_dedupes_under_an_idempotency_key(f.make().await).await;
        unread_step_with_the_append(f.make().await).await;
    }

    pub(super) async fn presence(f: Factory) {
        presence_transitions(f.make().await).await;
        presence_expiry(f.make().await).await;
        presence_queries(f.make().await).await;
    }

    pub(super) async fn membership(f: Factory) {
        super::membership(f.make().await).await;
        super::contacts(f.make().await).await;
    }

    pub(super) async fn idempotency(f: Factory) {
        super::idempotency(f.make().await).await;
    }

    pub(super) async fn unread(f: Factory) {
        super::unread(f.make().await).await;
        super::focus(f.make().await).await;
    }

    pub(super) async fn devices(f: Factory) {
        super::devices(f.make().await).await;
        super::announcements(f.make().await).await;
    }

    pub(super) async fn outbox(f: Factory) {
        super::outbox_entries(f.make().await).await;
        super::outbox_timers_with_the_append(f.make().await).await;
        super::outbox_acks_and_gate(f.make().await).await;
    }

    pub(super) async fn nodes(f: Factory) {
        super::node_registry(f.make().await).await;
        super::sessions_of_a_user_on_every_node(f.make().await).await;
    }
}

/// Each group of the contract, on memory and on Redis (`conformance::GROUP::memory|redis`).
macro_rules! contract_tests {
    ($($group:ident),+) => {$(
        mod $group {
            #[tokio::test]
            async fn memory() {
                super::contract::$group(super::Factory::memory()).await;
            }

            #[tokio::test]
            async fn redis() {
                super::contract::$group(super::Factory::redis()).await;
            }
        }
    )+};
}

contract_tests!(
    history,
    broker,
    presence,
    membership,
    idempotency,
    unread,
    devices,
    outbox,
    nodes
);

fn node(id: &str, sessions: u64) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        started: 1_700_000_000_000,
        version: "9.9.9".into(),
        backend: "conformance".into(),
        sessions,
    }
}

fn node_ids(l: &herald::backend::NodeList) -> Vec<&str> {
    l.nodes.iter().map(|n| n.info.id.as_str()).collect()
}

/// Nodes: a record is listed from its beat until its ttl lapses or it is removed; a beat replaces
/// what the node said and moves its expiry; the list is by id.
async fn node_registry(b: Backends) {
    let n = &b.nodes;
    assert!(n.nodes().await.unwrap().nodes.is_empty());
    let long = Duration::from_secs(60);
    n.node_beat(&node("nb", 1), long).await.unwrap();
    n.node_beat(&node("na", 2), Duration::from_millis(300))
        .await
        .unwrap();
    let l = n.nodes().await.unwrap();
    assert_eq!(node_ids(&l), ["na", "nb"]);
    let na = &l.nodes[0];
    assert_eq!(na.info, node("na", 2));
    assert!(na.heartbeat <= l.now && l.now < na.expires, "{l:?}");
    assert_eq!(na.expires - na.heartbeat, 300, "{l:?}");
    n.node_beat(&node("nb", 7), long).await.unwrap();
    let l = n.nodes().await.unwrap();
    assert_eq!(l.nodes[1].info.sessions, 7);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(node_ids(&n.nodes().await.unwrap()), ["nb"], "na lapsed");
    n.node_gone("nb").await.unwrap();
    n.node_gone("never-there").await.unwrap();
    assert!(n.nodes().await.unwrap().nodes.is_empty());
}

/// Nodes: a user's live sessions, whichever node recorded them, by session id; an expired one is
/// left out; an unknown user has none.
async fn sessions_of_a_user_on_every_node(b: Backends) {
    let ttl = Duration::from_secs(60);
    let mut on_b = info("su", "su-2");
    on_b.node = "node-b".into();
    b.presence.connect(&on_b, ttl).await.unwrap();
    b.presence.connect(&info("su", "su-1"), ttl).await.unwrap();
    b.presence
        .connect(&info("su", "su-3"), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = b.nodes.sessions_of("su").await.unwrap();
    let got: Vec<(&str, &str)> = s.iter().map(|i| (&*i.session, &*i.node)).collect();
    assert_eq!(got, [("su-1", "n1"), ("su-2", "node-b")]);
    assert_eq!(&*s[1].device, "dev-su-2");
    assert!(b.nodes.sessions_of("nobody").await.unwrap().is_empty());
}

/// Redis runs with `noeviction`: the registry's keys expire with the last live record, and go once
/// it is removed.
#[tokio::test]
async fn redis_node_registry_leaves_no_keys_behind() {
    let server = crate::redis_server::RedisServer::start();
    let (a, b) = redis_nodes(&server, "nleak:").await;
    a.nodes
        .node_beat(&node("na", 0), Duration::from_secs(30))
        .await
        .unwrap();
    b.nodes
        .node_beat(&node("nb", 0), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(node_ids(&a.nodes.nodes().await.unwrap()), ["na", "nb"]);
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys = |pattern: &'static str| {
        let con = client.clone();
        async move {
            let mut con = con.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("KEYS")
                .arg(pattern)
                .query_async::<Vec<String>>(&mut con)
                .await
                .unwrap()
        }
    };
    let found = keys("nleak:*").await;
    assert_eq!(found.len(), 2, "{found:?}");
    for key in found {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(
            ttl > 30_000 && ttl <= 60_000,
            "{key}: PTTL {ttl} (the last record's)"
        );
    }
    a.nodes.node_gone("na").await.unwrap();
    b.nodes.node_gone("nb").await.unwrap();
    assert!(keys("nleak:*").await.is_empty());
}

/// Outbox: entries are claimed once, an unfinished one is handed again after `idle`, retry and dead
/// letter finish them in one step, and the figures say so.
async fn outbox_entries(b: Backends) {
    let o = &b.outbox;
    let idle = Duration::from_millis(300);
    o.push_enqueue(vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")])
        .await
        .unwrap();
    let first = o.push_claim("node-a", 10, Some(idle)).await.unwrap();
    let bodies: Vec<&[u8]> = first.iter().map(|e| &e.body[..]).collect();
    assert_eq!(bodies, [&b"one"[..], b"two"]);
    assert!(first.iter().all(|e| e.seq.is_none()));
    assert!(
        o.push_claim("node-b", 10, Some(idle))
            .await
            .unwrap()
            .is_empty(),
        "a claimed entry is not handed to another claimer before idle"
    );
    let stats = o.push_stats().await.unwrap();
    assert_eq!((stats.queued, stats.pending), (2, 2), "{stats:?}");
    o.push_done(&first[0].entry).await.unwrap();
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let again = o.push_claim("node-b", 10, Some(idle)).await.unwrap();
    assert_eq!(
        again.len(),
        1,
        "the unfinished entry is handed again: {again:?}"
    );
    assert_eq!(&again[0].body[..], b"two");
    o.push_dead(&again[0].entry, Bytes::from_static(b"gone"), 2)
        .await
        .unwrap();
    assert_eq!(
        o.push_dead_letters(10).await.unwrap(),
        vec![Bytes::from_static(b"gone")]
    );
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    assert!(
        o.push_claim("node-a", 10, Some(idle))
            .await
            .unwrap()
            .is_empty()
    );
    // A retry finishes the entry and comes back as a new one when due.
    o.push_enqueue(vec![Bytes::from_static(b"three")])
        .await
        .unwrap();
    let e = o.push_claim("node-a", 10, Some(idle)).await.unwrap();
    o.push_retry(
        &e[0].entry,
        "retry:3",
        Duration::from_millis(200),
        Bytes::from_static(b"three'"),
    )
    .await
    .unwrap();
    assert_eq!(o.push_due(10).await.unwrap(), 0, "not due yet");
    assert_eq!(o.push_stats().await.unwrap().timers, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(o.push_due(10).await.unwrap(), 1);
    let e = o.push_claim("node-a", 10, Some(idle)).await.unwrap();
    assert_eq!(&e[0].body[..], b"three'");
    o.push_done(&e[0].entry).await.unwrap();
    // Dead letters keep the newest `keep`.
    for n in 0..3u8 {
        o.push_enqueue(vec![Bytes::from(vec![b'a' + n])])
            .await
            .unwrap();
        let e = o.push_claim("node-a", 10, Some(idle)).await.unwrap();
        o.push_dead(&e[0].entry, e[0].body.clone(), 2)
            .await
            .unwrap();
    }
    assert_eq!(
        o.push_dead_letters(10).await.unwrap(),
        vec![Bytes::from_static(b"c"), Bytes::from_static(b"b")]
    );
    let stats = o.push_stats().await.unwrap();
    assert_eq!(
        (stats.queued, stats.timers, stats.dead),
        (0, 0, 2),
        "{stats:?}"
    );
}

/// Outbox: a push step rides with the append: queued at once with the seq the append assigned, or
/// kept as a timer (once per id) that becomes an entry when due; an idempotent re-publish adds none.
async fn outbox_timers_with_the_append(b: Backends) {
    let ch = ChannelName::parse("room:pushy").unwrap();
    let send = |n: u64, after: Option<Duration>, key: Option<&str>| Outgoing {
        channel: ch.clone(),
        event: "n".into(),
        payload: OutgoingPayload::EventBody(body(n)),
        persist: limits(100),
        filter: DeliveryFilter::default(),
        unread: None,
        dedupe: key.map(Into::into),
        push: Some(herald::backend::PushStep {
            id: format!("plan:{n}").into(),
            after,
            body: Bytes::from(format!("plan {n}")),
        }),
    };
    let p1 = b
        .broker
        .publish(send(1, None, None))
        .await
        .unwrap()
        .unwrap();
    let e = b
        .outbox
        .push_claim("n", 10, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!((&e[0].body[..], e[0].seq), (&b"plan 1"[..], Some(p1.seq)));
    b.outbox.push_done(&e[0].entry).await.unwrap();

    let ttl = Duration::from_secs(60);
    b.idempotency
        .idem_begin("pk", "id-2", ttl, ttl)
        .await
        .unwrap();
    let after = Some(Duration::from_millis(200));
    let p2 = b
        .broker
        .publish(send(2, after, Some("pk")))
        .await
        .unwrap()
        .unwrap();
    // The same publish again under its key: stored once, planned once.
    b.broker.publish(send(2, after, Some("pk"))).await.unwrap();
    assert_eq!(b.outbox.push_stats().await.unwrap().timers, 1);
    assert_eq!(b.outbox.push_due(10).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.outbox.push_due(10).await.unwrap(), 1);
    let e = b
        .outbox
        .push_claim("n", 10, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!((&e[0].body[..], e[0].seq), (&b"plan 2"[..], Some(p2.seq)));
}

/// Outbox: acks only move forward, per user and channel; the burst gate lets the first push through,
/// holds the rest with a summary timer due when the window closes, and hands them over once.
async fn outbox_acks_and_gate(b: Backends) {
    let o = &b.outbox;
    o.push_ack("ann", "room:a", 5).await.unwrap();
    o.push_ack("ann", "room:a", 3).await.unwrap();
    let users = ["ann".to_string(), "bob".to_string()];
    assert_eq!(o.push_acked("room:a", &users).await.unwrap(), vec![5, 0]);
    assert_eq!(o.push_acked("room:b", &users).await.unwrap(), vec![0, 0]);

    let w = Duration::from_millis(300);
    let sum = Bytes::from_static(b"summary");
    let gate = |n: &'static str| {
        o.push_gate(
            "ann|room:a",
            w,
            Bytes::from_static(n.as_bytes()),
            sum.clone(),
        )
    };
    assert_eq!(gate("1").await.unwrap(), herald::backend::Gate::Send);
    assert_eq!(gate("2").await.unwrap(), herald::backend::Gate::Held);
    assert_eq!(gate("3").await.unwrap(), herald::backend::Gate::Held);
    assert_eq!(
        o.push_gate("bob|room:a", w, Bytes::from_static(b"b"), sum.clone())
            .await
            .unwrap(),
        herald::backend::Gate::Send,
        "another key has its own window"
    );
    assert_eq!(o.push_stats().await.unwrap().timers, 1, "one summary timer");
    assert_eq!(o.push_due(10).await.unwrap(), 0);
    tokio::time::sleep(w + Duration::from_millis(100)).await;
    assert_eq!(o.push_due(10).await.unwrap(), 1);
    let e = o
        .push_claim("n", 10, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(&e[0].body[..], b"summary");
    let held = o.push_take_held("ann|room:a", w).await.unwrap();
    assert_eq!(held, Some((2, Bytes::from_static(b"3"))));
    assert_eq!(o.push_take_held("ann|room:a", w).await.unwrap(), None);
    // The summary opened the next window: a push right after is held again.
    assert_eq!(gate("4").await.unwrap(), herald::backend::Gate::Held);

    // Many at once (a room's plan): answers in order, each key its own window, and a key named
    // twice in one call is held the second time.
    use herald::backend::Gate::{Held, Send};
    let call = |key: &str, body: &'static str| {
        (
            key.to_string(),
            Bytes::from_static(body.as_bytes()),
            sum.clone(),
        )
    };
    let got = o
        .push_gates(
            w,
            vec![
                call("cy|room:a", "c1"),
                call("ann|room:a", "5"),
                call("cy|room:a", "c2"),
                call("dee|room:a", "d1"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(got, vec![Send, Held, Held, Send]);
    assert!(o.push_gates(w, Vec::new()).await.unwrap().is_empty());
}

/// Redis: the same idempotency key raced from two nodes (two connections, one prefix) is claimed by
/// exactly one; the other sees it pending.
#[tokio::test]
async fn redis_idempotency_race_between_nodes() {
    let server = crate::redis_server::RedisServer::start();
    let a = Backends::redis(&server.url, "race:", "node-a")
        .await
        .expect("connect node a");
    let b = Backends::redis(&server.url, "race:", "node-b")
        .await
        .expect("connect node b");
    let ttl = Duration::from_secs(60);
    for i in 0..50 {
        let key = format!("race-{i}");
        let (ra, rb) = tokio::join!(
            a.idempotency.idem_begin(&key, "id-a", ttl, ttl),
            b.idempotency.idem_begin(&key, "id-b", ttl, ttl)
        );
        let results = [ra.unwrap(), rb.unwrap()];
        assert_eq!(
            results
                .iter()
                .filter(|r| matches!(r, KeyState::Claimed { .. }))
                .count(),
            1,
            "{key}: {results:?}"
        );
        assert!(results.contains(&KeyState::Pending), "{key}: {results:?}");
    }
}

/// Two "nodes" (two Redis backends sharing one prefix) on one test redis-server.
async fn redis_nodes(
    server: &crate::redis_server::RedisServer,
    prefix: &str,
) -> (Backends, Backends) {
    let a = Backends::redis(&server.url, prefix, "node-a")
        .await
        .expect("connect node a");
    let b = Backends::redis(&server.url, prefix, "node-b")
        .await
        .expect("connect node b");
    (a, b)
}

/// Redis: the first sessions of a user connecting at once on two nodes produce exactly one "online";
/// their disconnecting at once produces exactly one "offline".
#[tokio::test]
async fn redis_presence_connect_race_between_nodes() {
    let server = crate::redis_server::RedisServer::start();
    let (a, b) = redis_nodes(&server, "prace:").await;
    let ttl = Duration::from_secs(60);
    for i in 0..50 {
        let user = format!("racer-{i}");
        let (sa, sb) = (format!("{user}-a"), format!("{user}-b"));
        let (ia, ib) = (info(&user, &sa), info(&user, &sb));
        let (ra, rb) = tokio::join!(a.presence.connect(&ia, ttl), b.presence.connect(&ib, ttl));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "{user}: exactly one online, got {ra} and {rb}");
        let (ra, rb) = tokio::join!(
            a.presence.disconnect(&user, &sa),
            b.presence.disconnect(&user, &sb)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra.is_some() ^ rb.is_some(),
            "{user}: exactly one offline, got {ra:?} and {rb:?}"
        );
    }
    assert_eq!(a.presence.online_count().await.unwrap(), 0);
}

/// Redis: sweepers running at once on two nodes report each expired user, and each expired room
/// presence, exactly once in total.
#[tokio::test]
async fn redis_presence_sweep_race_between_nodes() {
    let server = crate::redis_server::RedisServer::start();
    let (a, b) = redis_nodes(&server, "psweep:").await;
    // Warm both nodes (scripts loaded), so the two sweeps below really overlap in Redis.
    a.presence.sweep().await.unwrap();
    b.presence.sweep().await.unwrap();
    let short = Duration::from_millis(100);
    let users: Vec<String> = (0..30).map(|i| format!("gone-{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        node.presence
            .connect(&info(u, &format!("{u}-1")), short)
            .await
            .unwrap();
        node.presence
            .room_join("sweep-room", u, &format!("{u}-1"), short)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (ra, rb) = tokio::join!(a.presence.sweep(), b.presence.sweep());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    for u in &users {
        let offline = ra
            .offline
            .iter()
            .chain(&rb.offline)
            .filter(|(x, _)| x == u)
            .count();
        assert_eq!(offline, 1, "{u} offline once: {ra:?} {rb:?}");
        let left = ra
            .room_left
            .iter()
            .chain(&rb.room_left)
            .filter(|(room, x)| room == "sweep-room" && x == u)
            .count();
        assert_eq!(left, 1, "{u} left the room once: {ra:?} {rb:?}");
    }
    let again = a.presence.sweep().await.unwrap();
    assert!(
        again.offline.is_empty() && again.room_left.is_empty(),
        "{again:?}"
    );
    let p = a.presence.get(&users[..1]).await.unwrap();
    assert!(!p[0].online);
    assert!(p[0].last_seen.is_some(), "the sweep recorded last_seen");
}

/// Redis: a session past its TTL is offline at once, before any sweep: `get`, counts, pages and room
/// presence ignore it, a heartbeat does not revive it, and disconnecting it reports nothing (the
/// sweeper reports the user, once).
#[tokio::test]
async fn redis_presence_expired_before_sweep_is_offline() {
    let server = crate::redis_server::RedisServer::start();
    let (a, _b) = redis_nodes(&server, "punswept:").await;
    let short = Duration::from_millis(300);
    a.presence.connect(&info("ex", "e1"), short).await.unwrap();
    a.presence
        .room_join("ex-room", "ex", "e1", short)
        .await
        .unwrap();
    assert!(a.presence.get(&["ex".into()]).await.unwrap()[0].online);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let p = &a.presence.get(&["ex".into()]).await.unwrap()[0];
    assert!(!p.online, "{p:?}");
    assert!(p.devices.is_empty());
    assert_eq!(a.presence.online_count().await.unwrap(), 0);
    assert!(a.presence.online_page(None, 10).await.unwrap().0.is_empty());
    assert!(a.presence.room_users("ex-room").await.unwrap().is_empty());
    a.presence
        .heartbeat(&[("ex".into(), "e1".into())], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        !a.presence.get(&["ex".into()]).await.unwrap()[0].online,
        "a heartbeat does not revive an expired session"
    );
    assert!(a.presence.room_users("ex-room").await.unwrap().is_empty());
    assert_eq!(a.presence.disconnect("ex", "e1").await.unwrap(), None);
    assert!(!a.presence.room_leave("ex-room", "ex", "e1").await.unwrap());
    let r = a.presence.sweep().await.unwrap();
    assert_eq!(
        r.offline.iter().filter(|(u, _)| u == "ex").count(),
        1,
        "{r:?}"
    );
    assert_eq!(r.room_left, vec![("ex-room".to_string(), "ex".to_string())]);
    assert!(
        a.presence.connect(&info("ex", "e2"), short).await.unwrap(),
        "back online"
    );
}

/// Redis: heartbeats from any node keep a session and its room presence alive past their first TTL,
/// and keep the devices listed.
#[tokio::test]
async fn redis_presence_heartbeat_keeps_rooms() {
    let server = crate::redis_server::RedisServer::start();
    let (a, b) = redis_nodes(&server, "phb:").await;
    let short = Duration::from_millis(500);
    a.presence.connect(&info("hb", "h1"), short).await.unwrap();
    a.presence
        .room_join("hb-room", "hb", "h1", short)
        .await
        .unwrap();
    a.presence
        .room_join("hb-room2", "hb", "h1", short)
        .await
        .unwrap();
    // One node's heartbeat for many sessions (several script calls in one pipeline); unknown
    // sessions are ignored, not created.
    let mut batch: Vec<(Arc<str>, Arc<str>)> = (0..600)
        .map(|i| (format!("ghost-{i}").into(), format!("g-{i}").into()))
        .collect();
    batch.insert(300, ("hb".into(), "h1".into()));
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.presence.heartbeat(&batch, short).await.unwrap();
    }
    let r = a.presence.sweep().await.unwrap();
    assert!(r.offline.is_empty() && r.room_left.is_empty(), "{r:?}");
    let p = &a.presence.get(&["hb".into()]).await.unwrap()[0];
    assert!(p.online);
    assert_eq!(p.devices.len(), 1);
    assert_eq!(a.presence.room_users("hb-room").await.unwrap(), vec!["hb"]);
    assert!(!a.presence.get(&["ghost-1".into()]).await.unwrap()[0].online);
    assert_eq!(a.presence.online_count().await.unwrap(), 1);
    assert!(a.presence.room_leave("hb-room", "hb", "h1").await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = a.presence.sweep().await.unwrap();
    assert_eq!(r.offline.len(), 1, "{r:?}");
    assert_eq!(
        r.room_left,
        vec![("hb-room2".to_string(), "hb".to_string())],
        "the room left explicitly is not reported again"
    );
}

/// Redis: a heartbeat of a live session in one room runs seven commands inside its script (the
/// session's and the entry's check and extension, the user's online and room scores, the rooms set),
/// not the fourteen it ran when every beat re-read the latest scores and moved every key's expiry: the
/// keys' safety-net expiries end on a whole hour, after their latest entry plus the key grace (a day),
/// and move only when that hour changes.
#[tokio::test]
async fn redis_heartbeat_moves_scores_not_key_expiries() {
    const HOUR_MS: i64 = 3_600_000;
    const GRACE_MS: i64 = 86_400_000;
    let server = crate::redis_server::RedisServer::start();
    let (a, _b) = redis_nodes(&server, "hbc:").await;
    let ttl = Duration::from_secs(60);
    let p = &a.presence;
    p.connect(&info("hc", "hc-1"), ttl).await.unwrap();
    p.room_join("hc-room", "hc", "hc-1", ttl).await.unwrap();
    let beat = [("hc".into(), "hc-1".into())];
    p.heartbeat(&beat, ttl).await.unwrap(); // Redis learns the script
    reset_command_stats(&server.url).await;
    assert_eq!(p.heartbeat(&beat, ttl).await.unwrap(), Vec::<usize>::new());
    let calls = command_calls(&server.url).await;
    let count = |c: &str| calls.get(c).copied().unwrap_or(0);
    assert_eq!(count("evalsha"), 1, "{calls:?}");
    // Seven for the session, then the room settled once per call: its earliest and latest user
    // (ZRANGE twice), its score in the rooms set (ZADD) and its key's expiry (PEXPIREAT). Before:
    // fourteen for the session (each score re-read with ZRANGE, four expiries moved).
    let inside: u64 = calls
        .iter()
        .filter(|(c, _)| !["evalsha", "time", "config|resetstat"].contains(&c.as_str()))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(inside, 7 + 4, "{calls:?}");
    assert_eq!(
        (
            count("zscore"),
            count("zadd"),
            count("smembers"),
            count("zrange")
        ),
        (2, 4 + 1, 1, 2),
        "{calls:?}"
    );
    assert_eq!(count("pexpireat"), 1, "{calls:?}");

    let (mut con, keys) = keys_matching(&server.url, "hbc:*").await;
    let now: (i64, i64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
    let now_ms = now.0 * 1000 + now.1 / 1000;
    let mut with_entries = 0;
    for key in &keys {
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        if at == -1 {
            continue; // the global sets (online users, rooms with presence), and the status hash
        }
        with_entries += 1;
        assert_eq!(at % HOUR_MS, 0, "{key}: expires at {at}, not on the hour");
        let past_entry = at - (now_ms + 60_000 + GRACE_MS);
        assert!(
            (-1_000..=HOUR_MS).contains(&past_entry),
            "{key}: expires {past_entry} ms after its entry + the grace"
        );
    }
    // The user's sessions and devices, the session's rooms, the room's users, the user's entries.
    assert_eq!(with_entries, 5, "{keys:?}");
}

/// Redis runs with `noeviction`: after users come and go (orderly or by expiry), every presence key
/// left either expires or is gone.
#[tokio::test]
async fn redis_presence_leaves_no_keys_behind() {
    let server = crate::redis_server::RedisServer::start();
    let (a, _b) = redis_nodes(&server, "pleak:").await;
    let ttl = Duration::from_secs(60);
    let short = Duration::from_millis(100);
    let p = &a.presence;
    p.connect(&info("la", "la-1"), ttl).await.unwrap();
    p.connect(&info("la", "la-2"), ttl).await.unwrap();
    p.room_join("leak-room", "la", "la-1", ttl).await.unwrap();
    p.room_join("leak-room", "la", "la-2", ttl).await.unwrap();
    p.set_status("la", Status::Away, Some("brb".into()))
        .await
        .unwrap();
    p.set_state("la", "la-1", DeviceState::Background)
        .await
        .unwrap();
    p.heartbeat(&[("la".into(), "la-1".into())], ttl)
        .await
        .unwrap();
    p.room_leave("leak-room", "la", "la-1").await.unwrap();
    p.room_leave("leak-room", "la", "la-2").await.unwrap();
    p.disconnect("la", "la-1").await.unwrap();
    p.disconnect("la", "la-2").await.unwrap();
    p.connect(&info("lb", "lb-1"), short).await.unwrap();
    p.room_join("leak-room", "lb", "lb-1", short).await.unwrap();
    p.set_status("never-online", Status::Busy, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = p.sweep().await.unwrap();
    assert_eq!(r.offline.len(), 1, "{r:?}");

    let (mut con, keys) = keys_matching(&server.url, "pleak:*").await;
    assert!(!keys.is_empty(), "status and last_seen are kept a while");
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} never expires (PTTL {ttl})");
    }
}

/// Calls per command since the last [`reset_command_stats`] (`INFO commandstats`; commands run by
/// scripts count too, under their own names).
async fn command_calls(url: &str) -> std::collections::HashMap<String, u64> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

async fn reset_command_stats(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .exec_async(&mut con)
        .await
        .unwrap();
}

/// A connection to the Redis at `url`, and its keys matching `pattern`.
async fn keys_matching(
    url: &str,
    pattern: &str,
) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut con)
        .await
        .unwrap();
    (con, keys)
}

async fn pttl(url: &str, key: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap()
}

/// Redis: a publish whose event counts unread is one round trip, one `EVALSHA`, however many users
/// have the room open (before: the append, a MULTI for the countable mark, one script for the
/// sender's pointer, one to list the focused users, one per focused user); a publish without an
/// unread step runs the same single script and nothing more. The keys the step writes keep the TTLs
/// the Store calls give them: the countable set an idle expiry, read pointers none, focus untouched.
#[tokio::test]
async fn redis_counted_publish_is_one_round_trip() {
    let server = crate::redis_server::RedisServer::start();
    let b = Backends::redis(&server.url, "rt:", "rt")
        .await
        .expect("connect to the test redis-server");
    let s = &b.unread;
    let ttl = Duration::from_secs(60);
    for (user, session) in [("bo", "b1"), ("cy", "c1"), ("cy", "c2"), ("ann", "a1")] {
        s.set_focus("rt1", user, session, ttl).await.unwrap();
    }
    let ch = ChannelName::parse("room:rt1").unwrap();
    // Redis learns the script on the first call.
    publish_counted(&b, &ch, 1, limits(100), step(100, Some("ann"))).await;
    reset_command_stats(&server.url).await;
    for n in 2..=6 {
        publish_counted(&b, &ch, n, limits(100), step(100, Some("ann"))).await;
    }
    for n in 7..=9 {
        publish(&b, &ch, n, limits(100)).await;
    }
    let calls = command_calls(&server.url).await;
    let count = |c: &str| calls.get(c).copied().unwrap_or(0);
    assert_eq!(
        count("evalsha"),
        8,
        "one script call per publish: {calls:?}"
    );
    for c in [
        "multi",
        "exec",
        "eval",
        "script|load",
        "zrange",
        "zremrangebyrank",
    ] {
        // zrange and zremrangebyrank only run inside the script: one per counted publish.
        let inside = if c.starts_with('z') { 5 } else { 0 };
        assert_eq!(count(c), inside, "{c}: {calls:?}");
    }
    assert_eq!(count("zadd"), 5, "one countable mark per counted publish");
    assert_eq!(
        count("hset"),
        15,
        "ann, bo and cy move once per counted publish"
    );
    assert_eq!(
        pointers(&b, "rt1", &["ann", "bo", "cy", "dee"]).await,
        vec![
            ("ann".to_string(), 6, 0),
            ("bo".to_string(), 6, 0),
            ("cy".to_string(), 6, 0),
            // Seqs 7..=9 had no unread step: they do not count.
            ("dee".to_string(), 0, 6),
        ]
    );

    let keys = herald::backend::redis::Keys::new("rt:");
    let countable = pttl(&server.url, &keys.room_countable("rt1")).await;
    assert!(
        countable > 29 * 86_400_000 && countable <= 30 * 86_400_000,
        "countable seqs: idle expiry of 30 days, got {countable} ms"
    );
    assert_eq!(
        pttl(&server.url, &keys.user_read("bo")).await,
        -1,
        "read pointers have no expiry, as set_read leaves them"
    );
    let focus = pttl(&server.url, &keys.room_focus("rt1")).await;
    assert!(
        focus > 0 && focus <= 65_000,
        "focus keeps the expiry set_focus gave it, got {focus} ms"
    );
}

/// Redis: the presence pipelines (heartbeat, get, sweep) send `EVALSHA` only — no `SCRIPT LOAD` per
/// call. After Redis forgets its scripts (`SCRIPT FLUSH`, as after a restart) they load what they
/// miss, and a pipeline in which one script is known and another is not re-sends only the calls that
/// failed: a user going offline is still reported exactly once.
#[tokio::test]
async fn redis_presence_pipelines_send_evalsha_only() {
    let server = crate::redis_server::RedisServer::start();
    let b = Backends::redis(&server.url, "pl:", "pl")
        .await
        .expect("connect to the test redis-server");
    let p = &b.presence;
    let ttl = Duration::from_secs(60);
    let short = Duration::from_millis(100);
    let beat: Vec<(Arc<str>, Arc<str>)> = vec![("pa".into(), "pa-1".into())];
    let offline = |r: herald::backend::SweepResult| -> Vec<String> {
        r.offline.into_iter().map(|(u, _)| u).collect()
    };
    p.connect(&info("pa", "pa-1"), ttl).await.unwrap();
    p.connect(&info("pb", "pb-1"), short).await.unwrap();
    // Redis learns the scripts on the first calls.
    p.heartbeat(&beat, ttl).await.unwrap();
    p.get(&["pa".into()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(offline(p.sweep().await.unwrap()), vec!["pb"]);

    reset_command_stats(&server.url).await;
    p.connect(&info("pc", "pc-1"), short).await.unwrap();
    for _ in 0..3 {
        p.heartbeat(&beat, ttl).await.unwrap();
        let got = p.get(&["pa".into(), "pc".into()]).await.unwrap();
        assert!(got[0].online && got[1].online);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(offline(p.sweep().await.unwrap()), vec!["pc"]);
    let calls = command_calls(&server.url).await;
    let count = |c: &str| calls.get(c).copied().unwrap_or(0);
    assert_eq!(count("script|load"), 0, "{calls:?}");
    assert_eq!(count("eval"), 0, "{calls:?}");
    // connect 1 + heartbeats 3 + gets 3 x 2 users + the sweep's due list 1 + its user step 1.
    assert_eq!(count("evalsha"), 12, "{calls:?}");

    server.command(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    p.connect(&info("pd", "pd-1"), short).await.unwrap();
    p.heartbeat(&beat, ttl).await.unwrap();
    let got = p.get(&["pa".into(), "pd".into()]).await.unwrap();
    assert!(got[0].online && got[1].online);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Loads the due list and the user step again (not the room step: no room is due).
    assert_eq!(offline(p.sweep().await.unwrap()), vec!["pd"]);
    p.connect(&info("pe", "pe-1"), short).await.unwrap();
    p.room_join("pl-room", "pe", "pe-1", short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One pipeline: the user step (known) and the room step (NOSCRIPT, loaded, sent again alone).
    let r = p.sweep().await.unwrap();
    assert_eq!(r.room_left, vec![("pl-room".to_string(), "pe".to_string())]);
    assert_eq!(offline(r), vec!["pe"], "reported once, by the first send");
    let r = p.sweep().await.unwrap();
    assert!(r.offline.is_empty() && r.room_left.is_empty(), "{r:?}");
    assert!(
        p.get(&["pa".into()]).await.unwrap()[0].online,
        "heartbeats after the flush took effect"
    );
}

/// The wire format has one owner: the frame of an event is the bytes `event::event_frame` makes,
/// whether the memory backend builds it in Rust or Redis builds it in `publish.lua`, and the Pub/Sub
/// envelope Lua writes is the one `wire.rs` reads (position, event type, filter, frame). Same event,
/// same seq, id and ts: the two frames differ only in the epoch each backend gave the channel.
#[tokio::test]
async fn redis_frames_are_the_bytes_the_memory_backend_makes() {
    let server = crate::redis_server::RedisServer::start();
    let redis = Backends::redis(&server.url, "wire:", "wire").await.unwrap();
    let memory = Backends::memory();
    let data = RawValue::from_string(r#"{"text":"héllo \"you\"","n":[1,2]}"#.into()).unwrap();
    let body = EventBody {
        id: "0190aaaa-bbbb-7ccc-8ddd-eeeeeeeeeeee",
        event: "chat.message",
        data: &data,
        from: Some("ann"),
        ts: 1_700_000_000_123,
    }
    .encode();
    let ch = ChannelName::parse("room:wire-1").unwrap();
    let mut frames = Vec::new();
    for b in [&redis, &memory] {
        let rec = Arc::new(Recorder::default());
        b.broker.attach(rec.clone());
        b.broker.subscribe(&ch).await.unwrap();
        let send = |persist| Outgoing {
            channel: ch.clone(),
            event: "chat.message".into(),
            payload: OutgoingPayload::EventBody(body.clone()),
            persist,
            filter: DeliveryFilter {
                except: vec!["ann".into()],
                audience: None,
                devices: Default::default(),
            },
            unread: None,
            dedupe: None,
            push: None,
        };
        let stored = b.broker.publish(send(limits(10))).await.unwrap().unwrap();
        b.broker.publish(send(None)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rec.0.lock().unwrap().len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "deliveries did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = rec.0.lock().unwrap().clone();
        let page = b
            .history
            .read(&ch, 0, None, 10, Duration::from_secs(3600))
            .await
            .unwrap();
        let expected = herald::event::event_frame(&ch, Some((&stored.epoch, stored.seq)), &body);
        assert_eq!(page.events[0].frame, expected, "stored frame");
        assert_eq!(got[0].frame, expected, "delivered frame");
        assert_eq!(got[0].position.as_ref(), Some(&stored));
        assert_eq!(&*got[0].event, "chat.message");
        assert_eq!(got[0].filter.except, vec![Arc::<str>::from("ann")]);
        assert!(got[1].position.is_none());
        assert_eq!(got[1].frame, herald::event::event_frame(&ch, None, &body));
        assert_eq!(got[1].filter.except, vec![Arc::<str>::from("ann")]);
        frames.push((stored.epoch, got[0].frame.clone(), got[1].frame.clone()));
    }
    let (redis_epoch, redis_stored, redis_unstored) = &frames[0];
    let (memory_epoch, memory_stored, memory_unstored) = &frames[1];
    let memory_as_redis = String::from_utf8(memory_stored.to_vec())
        .unwrap()
        .replace(memory_epoch.as_str(), redis_epoch.as_str());
    assert_eq!(memory_as_redis.as_bytes(), &redis_stored[..]);
    assert_eq!(memory_unstored, redis_unstored);
}
