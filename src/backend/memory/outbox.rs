//! The push outbox in memory: entries, timers, dead letters, acks and burst gates of one node.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::Memory;
use crate::backend::{BackendResult, Gate, Outbox, OutboxEntry, OutboxStats, PushStep};
use crate::event::{Seq, now_ms};
use crate::primitives::lock;

/// One queued entry.
struct Queued {
    entry: OutboxEntry,
    queued_at: i64,
    /// When and by whom it was claimed last.
    claimed: Option<Instant>,
}

/// A timer: due time (unix ms), seq, body.
type Timer = (i64, Option<Seq>, Bytes);

#[derive(Default)]
pub(super) struct OutboxState {
    next: u64,
    queue: VecDeque<Queued>,
    timers: HashMap<String, Timer>,
    /// Due time -> timer ids (the index `push_due` reads).
    due: BTreeMap<(i64, String), ()>,
    dead: VecDeque<Bytes>,
    /// (channel, user) -> acked seq.
    acks: HashMap<(String, String), Seq>,
    /// key -> window end.
    gates: HashMap<String, Instant>,
    /// key -> (count, last held).
    held: HashMap<String, (u32, Bytes)>,
}

impl OutboxState {
    fn enqueue(&mut self, body: Bytes, seq: Option<Seq>) {
        self.next += 1;
        let now = now_ms();
        self.queue.push_back(Queued {
            entry: OutboxEntry {
                entry: format!("{now}-{}", self.next),
                body,
                seq,
            },
            queued_at: now,
            claimed: None,
        });
    }

    fn schedule(&mut self, id: &str, due: i64, seq: Option<Seq>, body: Bytes) {
        if self.timers.contains_key(id) {
            return;
        }
        self.timers.insert(id.to_string(), (due, seq, body));
        self.due.insert((due, id.to_string()), ());
    }

    fn finish(&mut self, entry: &str) -> Option<Queued> {
        let i = self.queue.iter().position(|q| q.entry.entry == entry)?;
        self.queue.remove(i)
    }

    /// The push step of an append (called under the channel's lock, with the seq it assigned).
    pub(super) fn record(&mut self, step: &PushStep, seq: Option<Seq>) {
        match step.after {
            None => self.enqueue(step.body.clone(), seq),
            Some(after) => self.schedule(&step.id, now_ms() + ms(after), seq, step.body.clone()),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

#[async_trait]
impl Outbox for Memory {
    async fn push_enqueue(&self, bodies: Vec<Bytes>) -> BackendResult<()> {
        let mut o = lock(&self.outbox);
        for b in bodies {
            o.enqueue(b, None);
        }
        Ok(())
    }

    async fn push_schedule(&self, id: &str, after: Duration, body: Bytes) -> BackendResult<()> {
        lock(&self.outbox).schedule(id, now_ms() + ms(after), None, body);
        Ok(())
    }

    async fn push_due(&self, limit: usize) -> BackendResult<usize> {
        let mut o = lock(&self.outbox);
        let now = now_ms();
        let due: Vec<(i64, String)> = o
            .due
            .range(..=(now, String::from("\u{10FFFF}")))
            .take(limit)
            .map(|(k, ())| k.clone())
            .collect();
        for k in &due {
            o.due.remove(k);
            if let Some((_, seq, body)) = o.timers.remove(&k.1) {
                o.enqueue(body, seq);
            }
        }
        Ok(due.len())
    }

    async fn push_claim(
        &self,
        _consumer: &str,
        count: usize,
        idle: Option<Duration>,
    ) -> BackendResult<Vec<OutboxEntry>> {
        let mut o = lock(&self.outbox);
        let now = Instant::now();
        let mut out = Vec::new();
        for q in o.queue.iter_mut() {
            if out.len() >= count {
                break;
            }
            let stale = |at: Instant| idle.is_some_and(|idle| now.duration_since(at) >= idle);
            if q.claimed.is_none_or(stale) {
                q.claimed = Some(now);
                out.push(q.entry.clone());
            }
        }
        Ok(out)
    }

    async fn push_done(&self, entry: &str) -> BackendResult<()> {
        lock(&self.outbox).finish(entry);
        Ok(())
    }

    async fn push_retry(
        &self,
        entry: &str,
        id: &str,
        after: Duration,
        body: Bytes,
    ) -> BackendResult<()> {
        let mut o = lock(&self.outbox);
        let seq = o.finish(entry).and_then(|q| q.entry.seq);
        o.schedule(id, now_ms() + ms(after), seq, body);
        Ok(())
    }

    async fn push_dead(&self, entry: &str, body: Bytes, keep: usize) -> BackendResult<()> {
        let mut o = lock(&self.outbox);
        o.finish(entry);
        o.dead.push_front(body);
        o.dead.truncate(keep.max(1));
        Ok(())
    }

    async fn push_dead_letters(&self, limit: usize) -> BackendResult<Vec<Bytes>> {
        Ok(lock(&self.outbox)
            .dead
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn push_stats(&self) -> BackendResult<OutboxStats> {
        let o = lock(&self.outbox);
        let now = now_ms();
        Ok(OutboxStats {
            queued: o.queue.len() as u64,
            pending: o.queue.iter().filter(|q| q.claimed.is_some()).count() as u64,
            timers: o.timers.len() as u64,
            dead: o.dead.len() as u64,
            oldest_ms: o
                .queue
                .front()
                .map_or(0, |q| u64::try_from(now - q.queued_at).unwrap_or(0)),
        })
    }

    async fn push_ack(&self, user: &str, channel: &str, seq: Seq) -> BackendResult<()> {
        let mut o = lock(&self.outbox);
        let at = o.acks.entry((channel.into(), user.into())).or_default();
        *at = (*at).max(seq);
        Ok(())
    }

    async fn push_acked(&self, channel: &str, users: &[String]) -> BackendResult<Vec<Seq>> {
        let o = lock(&self.outbox);
        Ok(users
            .iter()
            .map(|u| {
                o.acks
                    .get(&(channel.to_string(), u.clone()))
                    .copied()
                    .unwrap_or(0)
            })
            .collect())
    }

    async fn push_gate(
        &self,
        key: &str,
        window: Duration,
        body: Bytes,
        summary: Bytes,
    ) -> BackendResult<Gate> {
        let mut o = lock(&self.outbox);
        let now = Instant::now();
        match o.gates.get(key) {
            Some(end) if *end > now => {
                let end = *end;
                let held = o.held.entry(key.to_string()).or_insert((0, Bytes::new()));
                held.0 += 1;
                held.1 = body;
                if held.0 == 1 {
                    let due = now_ms() + ms(end.saturating_duration_since(now));
                    o.schedule(&format!("sum:{key}"), due, None, summary);
                }
                Ok(Gate::Held)
            }
            _ => {
                o.gates.insert(key.to_string(), now + window);
                Ok(Gate::Send)
            }
        }
    }

    async fn push_take_held(
        &self,
        key: &str,
        window: Duration,
    ) -> BackendResult<Option<(u32, Bytes)>> {
        let mut o = lock(&self.outbox);
        let held = o.held.remove(key);
        if held.is_some() {
            o.gates.insert(key.to_string(), Instant::now() + window);
        }
        Ok(held)
    }
}
