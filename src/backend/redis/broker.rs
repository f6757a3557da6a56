//! Redis fan-out and history.
//!
//! Publishing: one Lua step per stored target (`lua/publish.lua`): seq from the meta hash, XADD `seq-0`,
//! MAXLEN trim, the unread step of a countable room event ([`crate::backend::UnreadStep`]: countable
//! mark, the sender's and the focused users' read pointers), PUBLISH of
//! `1 <seq> <epoch> <event>\n<filter>\n<frame>`: one round trip per publish. Ephemeral frames are a
//! plain PUBLISH of `0 - - <event>\n<filter>\n<frame>`.
//!
//! Receiving: a dedicated connection (RESP3 push, automatic resubscription) subscribes to the channels
//! this node has local subscribers for. A manager task reference-counts and batches SUBSCRIBE /
//! UNSUBSCRIBE; a reader task hands messages to the node's sink in seq order and **heals gaps**: Redis
//! Pub/Sub is at-most-once, so a seq that is not last+1 makes the reader fetch the missing range from
//! the stream first, and a `Disconnection` push or a missed self-addressed probe makes it check every
//! subscribed channel against Redis and replay what it missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::store::{COUNTABLE_TTL, countable_keep};
use super::{MARK, RedisBackend, err, pieces};
use crate::backend::{
    BackendError, BackendResult, Broker, Delivery, DeliveryFilter, DeliverySink, History,
    HistoryPage, Outgoing, OutgoingPayload,
};
use crate::channels::ChannelName;
use crate::event::{Epoch, Position, Seq, StoredEvent, event_frame_head, now_ms};
use crate::primitives::lock;

/// Idle expiry of channel metadata created by a read (publishes set their kind's own).
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How often a node probes its own subscriber connection.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not seen for this long means the subscription is broken.
const PROBE_DEADLINE_MS: i64 = 3_000;
/// Page size when healing a gap from history.
const HEAL_PAGE: usize = 1000;

struct Scripts {
    publish: Script,
    position: Script,
    read: Script,
}

/// The live-delivery filter as it travels in a Pub/Sub payload and is kept beside a stored event.
#[derive(Serialize, Deserialize, Default)]
struct WireFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    except: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audience: Option<serde_json::Map<String, serde_json::Value>>,
}

fn encode_filter(f: &DeliveryFilter) -> String {
    if f.is_empty() {
        return String::new();
    }
    serde_json::to_string(&WireFilter {
        except: f.except.iter().map(|u| u.to_string()).collect(),
        audience: f.audience.as_ref().map(|a| (**a).clone()),
    })
    .expect("filter serialises")
}

fn decode_filter(s: &[u8]) -> DeliveryFilter {
    if s.is_empty() {
        return DeliveryFilter::default();
    }
    match serde_json::from_slice::<WireFilter>(s) {
        Ok(w) => DeliveryFilter {
            except: w.except.into_iter().map(Into::into).collect(),
            audience: w.audience.map(Arc::new),
        },
        Err(_) => DeliveryFilter::default(),
    }
}

/// Per subscribed channel: local subscriber count and the last seq handed to the sink.
struct ChannelState {
    name: ChannelName,
    count: usize,
    last: Option<Position>,
}

enum SubOp {
    Subscribe(ChannelName, oneshot::Sender<BackendResult<()>>),
    Unsubscribe(ChannelName),
}

struct Shared {
    keys: super::Keys,
    cmd: ConnectionManager,
    scripts: Scripts,
    sink: OnceLock<Arc<dyn DeliverySink>>,
    channels: Mutex<HashMap<String, ChannelState>>,
    /// Last time the probe came back (unix ms, local clock).
    probe_seen: AtomicI64,
    healthy: AtomicBool,
}

/// The broker half of [`RedisBackend`].
pub(super) struct RedisBroker {
    shared: Arc<Shared>,
    /// Subscription requests to the manager task. Unbounded: one entry per local subscribe or
    /// unsubscribe, drained continuously in batches; bounded by the number of local subscriptions.
    ops: mpsc::UnboundedSender<SubOp>,
}

impl RedisBroker {
    pub(super) async fn start(
        client: redis::Client,
        config: ConnectionManagerConfig,
        cmd: ConnectionManager,
        keys: super::Keys,
        node: &str,
    ) -> Result<Self, BackendError> {
        // Pushes (messages, Disconnection) from the subscriber connection. redis-rs needs an
        // unbounded sender here; the reader drains it continuously, and its volume is what Redis
        // publishes to this node's channels.
        let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
        let sub_config = config
            .set_push_sender(push_tx)
            .set_automatic_resubscription();
        let mut sub = ConnectionManager::new_with_config(client, sub_config)
            .await
            .map_err(err)?;
        let probe = keys.probe(node);
        sub.subscribe(&probe).await.map_err(err)?;
        let shared = Arc::new(Shared {
            keys,
            cmd,
            scripts: Scripts {
                publish: lua!("unread_lib.lua", "channel_lib.lua", "publish.lua"),
                position: lua!("channel_lib.lua", "position.lua"),
                read: lua!("channel_lib.lua", "read.lua"),
            },
            sink: OnceLock::new(),
            channels: Mutex::new(HashMap::new()),
            probe_seen: AtomicI64::new(now_ms()),
            healthy: AtomicBool::new(true),
        });
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (heal_tx, heal_rx) = mpsc::channel(1);
        let (kick_tx, kick_rx) = mpsc::channel(1);
        tokio::spawn(manage(shared.clone(), sub, ops_rx, kick_rx));
        tokio::spawn(read_pushes(shared.clone(), probe.clone(), push_rx, heal_rx));
        tokio::spawn(run_probe(Arc::downgrade(&shared), probe, heal_tx, kick_tx));
        Ok(RedisBroker {
            shared,
            ops: ops_tx,
        })
    }
}

/// The subscription manager: reference counts, batched SUBSCRIBE / UNSUBSCRIBE, and the baseline
/// position of each newly subscribed channel (so the first gap is caught too).
async fn manage(
    shared: Arc<Shared>,
    mut sub: ConnectionManager,
    mut ops: mpsc::UnboundedReceiver<SubOp>,
    mut kick: mpsc::Receiver<()>,
) {
    loop {
        let first = tokio::select! {
            op = ops.recv() => match op {
                Some(op) => op,
                None => return,
            },
            k = kick.recv() => {
                if k.is_none() {
                    return;
                }
                // The subscription looks broken: a command on the connection makes the manager
                // reconnect (and resubscribe) now rather than at the next subscribe.
                let _: Result<Value, _> = redis::cmd("PING").query_async(&mut sub).await;
                continue;
            }
        };
        let mut batch = vec![first];
        while let Ok(more) = ops.try_recv() {
            batch.push(more);
        }
        let mut to_sub: Vec<ChannelName> = Vec::new();
        let mut to_unsub: Vec<String> = Vec::new();
        let mut waiters = Vec::new();
        {
            let mut chans = lock(&shared.channels);
            for op in batch {
                match op {
                    SubOp::Subscribe(ch, ack) => {
                        let st =
                            chans
                                .entry(ch.as_str().to_string())
                                .or_insert_with(|| ChannelState {
                                    name: ch.clone(),
                                    count: 0,
                                    last: None,
                                });
                        st.count += 1;
                        if st.count == 1 {
                            to_unsub.retain(|c| c != ch.as_str());
                            to_sub.push(ch.clone());
                        }
                        waiters.push((ch, ack));
                    }
                    SubOp::Unsubscribe(ch) => {
                        if let Some(st) = chans.get_mut(ch.as_str()) {
                            st.count = st.count.saturating_sub(1);
                            if st.count == 0 {
                                chans.remove(ch.as_str());
                                to_sub.retain(|c| c != &ch);
                                to_unsub.push(ch.as_str().to_string());
                            }
                        }
                    }
                }
            }
        }
        if !to_unsub.is_empty() {
            let names: Vec<String> = to_unsub.iter().map(|c| shared.keys.pubsub(c)).collect();
            if let Err(e) = sub.unsubscribe(&names).await {
                tracing::warn!(error = %e, channels = names.len(), "Redis UNSUBSCRIBE failed.");
            }
        }
        let mut result = Ok(());
        if !to_sub.is_empty() {
            let names: Vec<String> = to_sub
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            result = sub.subscribe(&names).await.map_err(err);
            if result.is_ok() {
                // Baselines: messages at or below a channel's position now are covered by the
                // subscribers' own history reads.
                for ch in &to_sub {
                    match shared.position(ch).await {
                        Ok(p) => {
                            if let Some(st) = lock(&shared.channels).get_mut(ch.as_str())
                                && st.last.is_none()
                            {
                                st.last = Some(p);
                            }
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
            }
        }
        if let Err(e) = &result {
            // Undo the counts of this batch's new subscriptions: their callers get the error.
            {
                let mut chans = lock(&shared.channels);
                for ch in &to_sub {
                    chans.remove(ch.as_str());
                }
            }
            let names: Vec<String> = to_sub
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            let _ = sub.unsubscribe(&names).await;
            tracing::warn!(error = %e, "Redis SUBSCRIBE failed.");
        }
        for (ch, ack) in waiters {
            let r = if to_sub.contains(&ch) {
                result.clone()
            } else {
                Ok(())
            };
            let _ = ack.send(r);
        }
    }
}

/// Publishes to this node's probe channel every second; when it does not come back, asks for a heal
/// and kicks the subscriber connection.
async fn run_probe(
    shared: std::sync::Weak<Shared>,
    probe: String,
    heal: mpsc::Sender<()>,
    kick: mpsc::Sender<()>,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut con = shared.cmd.clone();
        let sent: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&probe)
            .arg("p")
            .query_async(&mut con)
            .await;
        let late = now_ms() - shared.probe_seen.load(Ordering::Relaxed) > PROBE_DEADLINE_MS;
        if sent.is_err() || late {
            if shared.healthy.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    "Redis subscription looks broken (probe missed); will heal when it returns."
                );
            }
            let _ = heal.try_send(());
            let _ = kick.try_send(());
        }
    }
}

/// Reads pushes: messages to the sink in seq order with gaps healed; heals on `Disconnection` and
/// when the probe says so.
async fn read_pushes(
    shared: Arc<Shared>,
    probe: String,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut heal: mpsc::Receiver<()>,
) {
    let mut needs_heal = false;
    loop {
        tokio::select! {
            p = pushes.recv() => {
                let Some(p) = p else { return };
                match p.kind {
                    PushKind::Message => {
                        let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) =
                            (p.data.first(), p.data.get(1))
                        else {
                            continue;
                        };
                        let name = String::from_utf8_lossy(name);
                        if name == probe {
                            shared.probe_seen.store(now_ms(), Ordering::Relaxed);
                            if !shared.healthy.load(Ordering::Acquire) || needs_heal {
                                // The subscription works again: catch up before declaring health.
                                if shared.heal_all().await {
                                    needs_heal = false;
                                    shared.healthy.store(true, Ordering::Release);
                                    tracing::info!("Redis subscription healthy again.");
                                }
                            }
                            continue;
                        }
                        let Some(channel) = shared.keys.from_pubsub(&name).map(str::to_string) else {
                            continue;
                        };
                        shared.on_message(&channel, payload.clone()).await;
                    }
                    PushKind::Disconnection => {
                        tracing::warn!("Redis subscriber connection lost; resubscribing.");
                        shared.healthy.store(false, Ordering::Release);
                        needs_heal = true;
                    }
                    _ => {}
                }
            }
            h = heal.recv() => {
                if h.is_none() {
                    return;
                }
                needs_heal = true;
            }
        }
    }
}

/// A parsed Pub/Sub payload.
struct Message {
    position: Option<Position>,
    event: Arc<str>,
    filter: DeliveryFilter,
    frame: Bytes,
}

fn parse_payload(payload: Vec<u8>) -> Option<Message> {
    let bytes = Bytes::from(payload);
    let nl1 = bytes.iter().position(|b| *b == b'\n')?;
    let nl2 = nl1 + 1 + bytes[nl1 + 1..].iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..nl1]).ok()?;
    let mut parts = head.split(' ');
    let (stored, seq, epoch, event) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let position = match stored {
        "1" => Some(Position {
            epoch: Epoch::new(epoch),
            seq: seq.parse().ok()?,
        }),
        _ => None,
    };
    Some(Message {
        position,
        event: event.into(),
        filter: decode_filter(&bytes[nl1 + 1..nl2]),
        frame: bytes.slice(nl2 + 1..),
    })
}

impl Shared {
    fn sink(&self) -> Option<&Arc<dyn DeliverySink>> {
        self.sink.get()
    }

    fn deliver(&self, name: &ChannelName, m: Message) {
        if let Some(sink) = self.sink() {
            sink.deliver(Arc::new(Delivery {
                channel: name.clone(),
                position: m.position,
                event: m.event,
                frame: m.frame,
                filter: m.filter,
            }));
        }
    }

    async fn on_message(&self, channel: &str, payload: Vec<u8>) {
        let Some(m) = parse_payload(payload) else {
            tracing::warn!(channel, "Unreadable broker payload dropped.");
            return;
        };
        let (name, last) = {
            let chans = lock(&self.channels);
            let Some(st) = chans.get(channel) else { return };
            (st.name.clone(), st.last.clone())
        };
        let Some(p) = m.position.clone() else {
            self.deliver(&name, m);
            return;
        };
        let missing_from = match last {
            Some(l) if l.epoch == p.epoch && p.seq <= l.seq => return, // already handed over
            Some(l) if l.epoch == p.epoch => l.seq,
            Some(_) => {
                // A new epoch (Redis lost the data): sessions get `reset` with the first event
                // handed over; any earlier events of the new epoch come first.
                if let Some(st) = lock(&self.channels).get_mut(channel) {
                    st.last = Some(Position {
                        epoch: p.epoch.clone(),
                        seq: 0,
                    });
                }
                0
            }
            None => p.seq - 1,
        };
        if p.seq > missing_from + 1 && !self.fill(&name, missing_from, p.seq - 1).await {
            // History unreachable: hand this one over anyway and keep `last`, so the heal (probe or
            // reconnection) fetches the rest. Sessions drop duplicates by seq.
            self.deliver(&name, m);
            return;
        }
        self.set_last(channel, p);
        self.deliver(&name, m);
    }

    fn set_last(&self, channel: &str, p: Position) {
        if let Some(st) = lock(&self.channels).get_mut(channel) {
            match &st.last {
                Some(l) if l.epoch == p.epoch && l.seq >= p.seq => {}
                _ => st.last = Some(p),
            }
        }
    }

    /// Hands over stored events `after < seq <= upto` of `name` from history. False when history
    /// could not be read.
    async fn fill(&self, name: &ChannelName, after: Seq, upto: Seq) -> bool {
        let mut from = after;
        while from < upto {
            let page = match self
                .read(name, from, Some(upto), HEAL_PAGE, Duration::MAX)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(channel = %name, error = %e, "Gap repair failed.");
                    return false;
                }
            };
            if page.0.first_available > from + 1 {
                tracing::warn!(channel = %name, missing_from = from + 1, "Gap older than history; sessions keep their own replay.");
            }
            if page.1.is_empty() {
                break;
            }
            for (ev, filter) in page.1 {
                from = ev.seq;
                let m = Message {
                    position: Some(Position {
                        epoch: page.0.position.epoch.clone(),
                        seq: ev.seq,
                    }),
                    event: crate::event::frame_event_type(&ev.frame)
                        .unwrap_or_default()
                        .into(),
                    filter,
                    frame: ev.frame,
                };
                self.set_last(name.as_str(), m.position.clone().expect("stored"));
                self.deliver(name, m);
            }
        }
        true
    }

    /// Checks every subscribed channel against Redis and hands over what was missed (or the new
    /// epoch's events when Redis lost the data). True when every channel was checked.
    async fn heal_all(&self) -> bool {
        let list: Vec<(ChannelName, Option<Position>)> = lock(&self.channels)
            .values()
            .map(|s| (s.name.clone(), s.last.clone()))
            .collect();
        let mut ok = true;
        for (name, last) in list {
            let pos = match self.position(&name).await {
                Ok(p) => p,
                Err(_) => {
                    ok = false;
                    continue;
                }
            };
            match last {
                None => self.set_last(name.as_str(), pos),
                Some(l) if l.epoch == pos.epoch => {
                    if pos.seq > l.seq && !self.fill(&name, l.seq, pos.seq).await {
                        ok = false;
                    }
                }
                Some(_) => {
                    // A new epoch: sessions get `reset` with its first event.
                    if !self.fill_epoch(&name, &pos).await {
                        ok = false;
                    }
                }
            }
        }
        ok
    }

    async fn fill_epoch(&self, name: &ChannelName, pos: &Position) -> bool {
        if let Some(st) = lock(&self.channels).get_mut(name.as_str()) {
            st.last = Some(Position {
                epoch: pos.epoch.clone(),
                seq: 0,
            });
        }
        self.fill(name, 0, pos.seq).await
    }

    async fn position(&self, channel: &ChannelName) -> BackendResult<Position> {
        let mut con = self.cmd.clone();
        let (epoch, seq): (String, u64) = self
            .scripts
            .position
            .key(self.keys.channel_meta(channel.as_str()))
            .key(self.keys.channel_log(channel.as_str()))
            .arg(Epoch::generate().as_str())
            .arg(DEFAULT_IDLE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(Position {
            epoch: Epoch::new(&epoch),
            seq,
        })
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<(HistoryPage, Vec<(StoredEvent, DeliveryFilter)>)> {
        let mut con = self.cmd.clone();
        let age_ms = max_age.as_millis().min(i64::MAX as u128 / 2) as i64;
        let raw: Vec<Value> = self
            .scripts
            .read
            .key(self.keys.channel_meta(channel.as_str()))
            .key(self.keys.channel_log(channel.as_str()))
            .arg(after)
            .arg(until.map_or(-1, |u| u as i64))
            .arg(limit.max(1))
            .arg(age_ms)
            .arg(Epoch::generate().as_str())
            .arg(DEFAULT_IDLE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let bad = || BackendError::Internal("unexpected reply from read.lua".into());
        let mut it = raw.into_iter();
        let epoch: String =
            redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let seq: u64 = redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let first: u64 = redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let mut events = Vec::new();
        while let Some(s) = it.next() {
            let (t, f, x) = (
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
            );
            let s: u64 = redis::from_redis_value(s).map_err(|_| bad())?;
            let t: i64 = redis::from_redis_value(t).map_err(|_| bad())?;
            let f: Vec<u8> = redis::from_redis_value(f).map_err(|_| bad())?;
            let x: Vec<u8> = redis::from_redis_value(x).map_err(|_| bad())?;
            events.push((
                StoredEvent {
                    seq: s,
                    ts: t,
                    frame: Bytes::from(f),
                },
                decode_filter(&x),
            ));
        }
        let page = HistoryPage {
            position: Position {
                epoch: Epoch::new(&epoch),
                seq,
            },
            first_available: first,
            events: Vec::new(),
        };
        Ok((page, events))
    }
}

#[async_trait]
impl Broker for RedisBackend {
    fn attach(&self, sink: Arc<dyn DeliverySink>) {
        let _ = self.broker.shared.sink.set(sink);
    }

    async fn publish(&self, msg: Outgoing) -> BackendResult<Option<Position>> {
        let shared = &self.broker.shared;
        let filter = encode_filter(&msg.filter);
        let mut con = self.cmd.clone();
        match (&msg.payload, msg.persist) {
            (OutgoingPayload::EventBody(body), Some(limits)) => {
                let ch = msg.channel.as_str();
                let idle = limits.age.as_secs().saturating_add(86_400);
                let mut inv = shared.scripts.publish.key(self.keys.channel_meta(ch));
                inv.key(self.keys.channel_log(ch))
                    .arg(self.keys.pubsub(ch))
                    .arg(event_frame_head(&msg.channel))
                    .arg(&body[..])
                    .arg(limits.size.max(1))
                    .arg(idle)
                    .arg(Epoch::generate().as_str())
                    .arg(&*msg.event)
                    .arg(&filter)
                    .arg(
                        msg.dedupe
                            .as_deref()
                            .map_or(String::new(), |k| self.keys.idempotency(k)),
                    );
                // The unread step rides in the same script (see lua/publish.lua); without one the
                // call is exactly the plain append.
                if let Some((room, step)) = msg.unread_room() {
                    let read = pieces(self.keys.user_read(MARK), 1)?;
                    inv.key(self.keys.room_countable(room))
                        .key(self.keys.room_focus(room));
                    if let Some(from) = &step.from {
                        inv.key(self.keys.user_read(from));
                    }
                    inv.arg(countable_keep(step.keep))
                        .arg(COUNTABLE_TTL.as_secs())
                        .arg(room)
                        .arg(step.from.as_deref().unwrap_or(""))
                        .arg(&read[0])
                        .arg(&read[1]);
                }
                let (epoch, seq): (String, u64) = inv.invoke_async(&mut con).await.map_err(err)?;
                Ok(Some(Position {
                    epoch: Epoch::new(&epoch),
                    seq,
                }))
            }
            (payload, _) => {
                let frame = match payload {
                    OutgoingPayload::EventBody(body) => {
                        crate::event::event_frame(&msg.channel, None, body)
                    }
                    OutgoingPayload::Frame(f) => f.clone(),
                };
                let mut p = Vec::with_capacity(frame.len() + filter.len() + msg.event.len() + 8);
                p.extend_from_slice(b"0 - - ");
                p.extend_from_slice(msg.event.as_bytes());
                p.push(b'\n');
                p.extend_from_slice(filter.as_bytes());
                p.push(b'\n');
                p.extend_from_slice(&frame);
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(self.keys.pubsub(msg.channel.as_str()))
                    .arg(p)
                    .query_async(&mut con)
                    .await
                    .map_err(err)?;
                Ok(None)
            }
        }
    }

    async fn subscribe(&self, channel: &ChannelName) -> BackendResult<()> {
        let (tx, rx) = oneshot::channel();
        self.broker
            .ops
            .send(SubOp::Subscribe(channel.clone(), tx))
            .map_err(|_| BackendError::Unavailable("subscription manager stopped".into()))?;
        rx.await
            .map_err(|_| BackendError::Unavailable("subscription manager stopped".into()))?
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> BackendResult<()> {
        let _ = self.broker.ops.send(SubOp::Unsubscribe(channel.clone()));
        Ok(())
    }

    async fn ping(&self) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(err)?;
        if !self.broker.shared.healthy.load(Ordering::Acquire) {
            return Err(BackendError::Unavailable(
                "Redis subscription is not delivering (healing)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl History for RedisBackend {
    async fn position(&self, channel: &ChannelName) -> BackendResult<Position> {
        self.broker.shared.position(channel).await
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<HistoryPage> {
        let (mut page, events) = self
            .broker
            .shared
            .read(channel, after, until, limit, max_age)
            .await?;
        page.events = events.into_iter().map(|(e, _)| e).collect();
        Ok(page)
    }
}
