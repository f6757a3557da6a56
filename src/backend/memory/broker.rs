//! Memory broker + history: per-channel logs with seq, epoch, size and age limits. A publish's unread
//! step ([`crate::backend::UnreadStep`]) and its idempotency record ([`Outgoing::dedupe`]) run under
//! the channel's lock, with the append.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{Memory, SHARDS};
use crate::backend::{
    BackendResult, Broker, Delivery, DeliverySink, History, HistoryPage, Outgoing, OutgoingPayload,
};
use crate::channels::ChannelName;
use crate::event::{Epoch, Position, Seq, StoredEvent, event_frame, now_ms};
use crate::primitives::lock;

/// One channel's history.
pub(super) struct ChannelLog {
    epoch: Epoch,
    last: Seq,
    events: VecDeque<StoredEvent>,
}

impl ChannelLog {
    fn new() -> Self {
        ChannelLog {
            epoch: Epoch::generate(),
            last: 0,
            events: VecDeque::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            seq: self.last,
        }
    }

    fn trim_age(&mut self, age: Duration, now: i64) {
        let oldest = now - age.as_millis() as i64;
        while self.events.front().is_some_and(|e| e.ts < oldest) {
            self.events.pop_front();
        }
    }
}

impl Memory {
    fn channel(&self, ch: &ChannelName) -> Arc<Mutex<ChannelLog>> {
        // Shard choice only needs to be consistent within this process.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        ch.hash(&mut hasher);
        let shard = &self.channels[(hasher.finish() as usize) % SHARDS];
        lock(shard)
            .entry(ch.clone())
            .or_insert_with(|| Arc::new(Mutex::new(ChannelLog::new())))
            .clone()
    }

    fn sink(&self) -> Option<&Arc<dyn DeliverySink>> {
        self.sink.get()
    }
}

#[async_trait]
impl Broker for Memory {
    fn attach(&self, sink: Arc<dyn DeliverySink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, msg: Outgoing) -> BackendResult<Option<Position>> {
        let unread = msg.unread_room().map(|(_, step)| step.clone());
        let Outgoing {
            channel,
            event,
            payload,
            persist,
            filter,
            unread: _,
            dedupe,
            push,
        } = msg;
        match (payload, persist) {
            (OutgoingPayload::EventBody(body), Some(limits)) => {
                let log = self.channel(&channel);
                let mut log = lock(&log);
                // Under the channel's lock, so a check and the append that follows are one step.
                if let Some(key) = &dedupe
                    && let Some(stored) = self.deduped(key, channel.as_str())
                {
                    return Ok(Some(stored));
                }
                let now = now_ms();
                log.last += 1;
                let seq = log.last;
                let frame = event_frame(&channel, Some((&log.epoch, seq)), &body);
                log.events.push_back(StoredEvent {
                    seq,
                    ts: now,
                    frame: frame.clone(),
                });
                while log.events.len() > limits.size {
                    log.events.pop_front();
                }
                log.trim_age(limits.age, now);
                let position = log.position();
                // The unread step belongs to the same atomic step: done before anyone can see the
                // event, and in seq order with the channel's other publishes.
                if let Some(step) = &unread {
                    self.apply_unread(channel.id(), seq, step);
                }
                if let Some(key) = &dedupe {
                    self.record_dedupe(key, channel.as_str(), &position);
                }
                if let Some(step) = &push {
                    lock(&self.outbox).record(step, Some(seq));
                }
                // Handing over while the channel lock is held keeps deliveries in seq order; the sink
                // only does non-blocking queue pushes and socket writes.
                if let Some(sink) = self.sink() {
                    sink.deliver(Arc::new(Delivery {
                        channel,
                        event,
                        position: Some(position.clone()),
                        frame,
                        filter,
                        compact: Default::default(),
                    }));
                }
                Ok(Some(position))
            }
            (payload, _) => {
                let frame = match payload {
                    OutgoingPayload::EventBody(body) => event_frame(&channel, None, &body),
                    OutgoingPayload::Frame(f) => f,
                };
                if let Some(sink) = self.sink() {
                    sink.deliver(Arc::new(Delivery {
                        channel,
                        event,
                        position: None,
                        frame,
                        filter,
                        compact: Default::default(),
                    }));
                }
                if let Some(step) = &push {
                    lock(&self.outbox).record(step, None);
                }
                Ok(None)
            }
        }
    }

    async fn subscribe(&self, _channel: &ChannelName) -> BackendResult<()> {
        // One process: every publish reaches the sink; the hub drops what no one here wants.
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) -> BackendResult<()> {
        Ok(())
    }

    async fn ping(&self) -> BackendResult<()> {
        Ok(())
    }
}

#[async_trait]
impl History for Memory {
    async fn position(&self, channel: &ChannelName) -> BackendResult<Position> {
        let log = self.channel(channel);
        let log = lock(&log);
        Ok(log.position())
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<HistoryPage> {
        let log = self.channel(channel);
        let mut log = lock(&log);
        log.trim_age(max_age, now_ms());
        let first_available = log.events.front().map_or(log.last + 1, |e| e.seq);
        let until = until.unwrap_or(log.last);
        // Seqs are contiguous in the deque: index = seq - first.
        let start = after.saturating_add(1).max(first_available);
        let events = if start > until {
            Vec::new()
        } else {
            let skip = (start - first_available) as usize;
            log.events
                .iter()
                .skip(skip)
                .take_while(|e| e.seq <= until)
                .take(limit)
                .cloned()
                .collect()
        };
        Ok(HistoryPage {
            position: log.position(),
            first_available,
            events,
        })
    }
}
