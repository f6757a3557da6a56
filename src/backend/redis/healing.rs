//! Healing what Redis Pub/Sub loses (it is at-most-once): the reader hands messages to the node's
//! sink in seq order, and a seq that is not last+1 makes it fetch the missing range from the stream
//! first; a `Disconnection` push, or the node's self-addressed probe not coming back, makes it check
//! every subscribed channel against Redis and hand over what was missed (or the new epoch's events
//! when Redis lost its data: sessions then get `reset`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::shared::Shared;
use super::wire::{Message, parse_payload};
use crate::backend::{Delivery, DeliverySink};
use crate::channels::ChannelName;
use crate::event::{Position, Seq, now_ms};
use crate::primitives::lock;

/// How often a node probes its own subscriber connection.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not seen for this long means the subscription is broken.
const PROBE_DEADLINE_MS: i64 = 3_000;
/// Page size when healing a gap from history.
const HEAL_PAGE: usize = 1000;

/// Publishes to this node's probe channel every second; when it does not come back, asks for a heal
/// and kicks the subscriber connection.
pub(super) async fn run_probe(
    shared: std::sync::Weak<Shared>,
    probe: String,
    heal: mpsc::Sender<()>,
    kick: mpsc::Sender<()>,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut command_was_up = true;
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
        let command_up = sent.is_ok();
        crate::metrics::redis_up("command", command_up, command_up && !command_was_up);
        command_was_up = command_up;
        if sent.is_err() || late {
            if shared.healthy.swap(false, Ordering::AcqRel) {
                crate::metrics::redis_up("subscriber", false, false);
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
pub(super) async fn read_pushes(
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
                                let healed = shared.heal_all().await;
                                crate::metrics::redis_heal(healed);
                                if healed {
                                    needs_heal = false;
                                    shared.healthy.store(true, Ordering::Release);
                                    crate::metrics::redis_up("subscriber", true, true);
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
                        if shared.healthy.swap(false, Ordering::AcqRel) {
                            crate::metrics::redis_up("subscriber", false, false);
                        }
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
                compact: Default::default(),
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
        if p.seq > missing_from + 1 {
            crate::metrics::gap_repaired();
        }
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
    pub(super) async fn heal_all(&self) -> bool {
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
}
