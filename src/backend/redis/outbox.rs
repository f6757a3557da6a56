//! [`Outbox`] on Redis: the outbox is a Stream with one consumer group (at-least-once; `XAUTOCLAIM`
//! hands a dead node's unfinished entries to the next claimer), timers a sorted set by due time
//! (Redis clock) beside a hash of their bodies, moved into the stream by one script; dead letters a
//! capped list; acks one hash per channel; a burst gate a key with an expiry and a hash of what it
//! holds. Keys under `{push}` (one slot) except the per-channel acks.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Keys, RedisBackend, err, eval_pipeline};
use crate::backend::{BackendResult, Gate, Outbox, OutboxEntry, OutboxStats, PushStep};
use crate::event::{Seq, now_ms};

static SCHEDULE: LazyLock<Script> = LazyLock::new(|| lua!("push_lib.lua", "push_schedule.lua"));
static DUE: LazyLock<Script> = LazyLock::new(|| lua!("push_lib.lua", "push_due.lua"));
static FINISH: LazyLock<Script> = LazyLock::new(|| lua!("push_lib.lua", "push_finish.lua"));
static ACK: LazyLock<Script> = LazyLock::new(|| lua!("push_ack.lua"));
static GATE: LazyLock<Script> = LazyLock::new(|| lua!("push_lib.lua", "push_gate.lua"));
static TAKE_HELD: LazyLock<Script> = LazyLock::new(|| lua!("push_take_held.lua"));

/// Idle expiry of a channel's ack positions, refreshed on every ack.
const ACKS_TTL: Duration = Duration::from_secs(7 * 86_400);

fn ms(d: Duration) -> u64 {
    d.as_millis().clamp(1, i64::MAX as u128) as u64
}

/// Queues the plan of an event that is not stored (no seq), on its own.
pub(super) async fn record_unstored(
    con: &mut ConnectionManager,
    keys: &Keys,
    step: &PushStep,
) -> BackendResult<()> {
    match step.after {
        None => redis::cmd("XADD")
            .arg(keys.push_outbox())
            .arg("*")
            .arg("b")
            .arg(&step.body[..])
            .arg("s")
            .arg("-")
            .exec_async(con)
            .await
            .map_err(err),
        Some(after) => SCHEDULE
            .key(keys.push_timers())
            .key(keys.push_timer_bodies())
            .arg(&*step.id)
            .arg(ms(after))
            .arg(&step.body[..])
            .invoke_async::<i64>(con)
            .await
            .map(|_| ())
            .map_err(err),
    }
}

/// Creates the consumer group (and the stream); one that exists already is fine.
async fn create_group(con: &mut ConnectionManager, keys: &Keys) -> BackendResult<()> {
    let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.push_outbox())
        .arg(Keys::PUSH_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(err(e)),
    }
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        _ => None,
    }
}

fn array_of(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// Stream entries (`[[id, [field, value, …]], …]`) as outbox entries; deleted ones (nil) skipped.
fn entries(v: &Value, out: &mut Vec<OutboxEntry>) {
    let Some(list) = array_of(v) else {
        return;
    };
    for e in list {
        let Some([id, fields]) = array_of(e).and_then(|a| <&[Value; 2]>::try_from(a).ok()) else {
            continue;
        };
        let (Some(id), Some(fields)) = (bytes_of(id), array_of(fields)) else {
            continue;
        };
        let mut body = None;
        let mut seq = None;
        for kv in fields.chunks(2) {
            if let [k, v] = kv {
                match bytes_of(k).as_deref() {
                    Some(b"b") => body = bytes_of(v),
                    Some(b"s") => {
                        seq = bytes_of(v)
                            .and_then(|s| String::from_utf8(s).ok())
                            .and_then(|s| s.parse::<Seq>().ok())
                    }
                    _ => {}
                }
            }
        }
        if let (Ok(entry), Some(body)) = (String::from_utf8(id), body) {
            out.push(OutboxEntry {
                entry,
                body: Bytes::from(body),
                seq,
            });
        }
    }
}

/// The entries of an `XREADGROUP` reply (RESP3: a map stream -> entries; RESP2: `[[stream, entries]]`).
fn read_group_entries(v: &Value, out: &mut Vec<OutboxEntry>) {
    match v {
        Value::Map(m) => {
            for (_, e) in m {
                entries(e, out);
            }
        }
        Value::Array(streams) => {
            for s in streams {
                if let Some([_, e]) = array_of(s).and_then(|a| <&[Value; 2]>::try_from(a).ok()) {
                    entries(e, out);
                }
            }
        }
        _ => {}
    }
}

fn no_group(e: &redis::RedisError) -> bool {
    e.to_string().contains("NOGROUP")
}

impl RedisBackend {
    /// Creates the outbox's consumer group (at start; again if Redis lost it).
    pub(super) async fn ensure_push_group(&self) -> BackendResult<()> {
        create_group(&mut self.cmd.clone(), &self.keys).await
    }

    async fn claim_once(
        &self,
        consumer: &str,
        count: usize,
        idle: Option<Duration>,
    ) -> redis::RedisResult<Vec<OutboxEntry>> {
        let mut con = self.cmd.clone();
        let outbox = self.keys.push_outbox();
        let mut out = Vec::new();
        // Entries a claimer did not finish in time first (a node that died), then new ones.
        if let Some(idle) = idle {
            let stale: Value = redis::cmd("XAUTOCLAIM")
                .arg(&outbox)
                .arg(Keys::PUSH_GROUP)
                .arg(consumer)
                .arg(ms(idle))
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut con)
                .await?;
            if let Some(parts) = array_of(&stale)
                && let Some(list) = parts.get(1)
            {
                entries(list, &mut out);
            }
        }
        if out.len() < count {
            let fresh: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(Keys::PUSH_GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(count - out.len())
                .arg("STREAMS")
                .arg(&outbox)
                .arg(">")
                .query_async(&mut con)
                .await?;
            read_group_entries(&fresh, &mut out);
        }
        Ok(out)
    }

    async fn finish(
        &self,
        entry: &str,
        mode: &str,
        id: &str,
        after: Duration,
        body: &[u8],
        keep: usize,
    ) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        FINISH
            .key(self.keys.push_outbox())
            .key(self.keys.push_timers())
            .key(self.keys.push_timer_bodies())
            .key(self.keys.push_dead())
            .arg(Keys::PUSH_GROUP)
            .arg(entry)
            .arg(mode)
            .arg(id)
            .arg(ms(after))
            .arg(body)
            .arg(keep.max(1))
            .invoke_async::<i64>(&mut con)
            .await
            .map(|_| ())
            .map_err(err)
    }
}

#[async_trait]
impl Outbox for RedisBackend {
    async fn push_enqueue(&self, bodies: Vec<Bytes>) -> BackendResult<()> {
        if bodies.is_empty() {
            return Ok(());
        }
        let mut con = self.cmd.clone();
        let mut p = redis::pipe();
        p.atomic();
        for b in &bodies {
            p.cmd("XADD")
                .arg(self.keys.push_outbox())
                .arg("*")
                .arg("b")
                .arg(&b[..])
                .arg("s")
                .arg("-")
                .ignore();
        }
        p.exec_async(&mut con).await.map_err(err)
    }

    async fn push_schedule(&self, id: &str, after: Duration, body: Bytes) -> BackendResult<()> {
        record_unstored(
            &mut self.cmd.clone(),
            &self.keys,
            &PushStep {
                id: id.into(),
                after: Some(after),
                body,
            },
        )
        .await
    }

    async fn push_due(&self, limit: usize) -> BackendResult<usize> {
        let mut con = self.cmd.clone();
        DUE.key(self.keys.push_timers())
            .key(self.keys.push_timer_bodies())
            .key(self.keys.push_outbox())
            .arg(limit.max(1))
            .invoke_async::<usize>(&mut con)
            .await
            .map_err(err)
    }

    async fn push_claim(
        &self,
        consumer: &str,
        count: usize,
        idle: Option<Duration>,
    ) -> BackendResult<Vec<OutboxEntry>> {
        match self.claim_once(consumer, count, idle).await {
            Ok(v) => Ok(v),
            // Redis lost the stream or the group (a restart without persistence, a flush).
            Err(e) if no_group(&e) => {
                self.ensure_push_group().await?;
                self.claim_once(consumer, count, idle).await.map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    async fn push_done(&self, entry: &str) -> BackendResult<()> {
        self.finish(entry, "done", "", Duration::ZERO, b"", 1).await
    }

    async fn push_retry(
        &self,
        entry: &str,
        id: &str,
        after: Duration,
        body: Bytes,
    ) -> BackendResult<()> {
        self.finish(entry, "retry", id, after, &body, 1).await
    }

    async fn push_dead(&self, entry: &str, body: Bytes, keep: usize) -> BackendResult<()> {
        self.finish(entry, "dead", "", Duration::ZERO, &body, keep)
            .await
    }

    async fn push_dead_letters(&self, limit: usize) -> BackendResult<Vec<Bytes>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut con = self.cmd.clone();
        let v: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(self.keys.push_dead())
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(v.into_iter().map(Bytes::from).collect())
    }

    async fn push_stats(&self) -> BackendResult<OutboxStats> {
        let mut con = self.cmd.clone();
        let outbox = self.keys.push_outbox();
        let (queued, first, timers, dead): (u64, Value, u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&outbox)
            .cmd("XRANGE")
            .arg(&outbox)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("ZCARD")
            .arg(self.keys.push_timers())
            .cmd("LLEN")
            .arg(self.keys.push_dead())
            .query_async(&mut con)
            .await
            .map_err(err)?;
        let pending: Value = redis::cmd("XPENDING")
            .arg(&outbox)
            .arg(Keys::PUSH_GROUP)
            .query_async(&mut con)
            .await
            .unwrap_or(Value::Nil);
        let pending = array_of(&pending)
            .and_then(|a| a.first())
            .and_then(|v| match v {
                Value::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            })
            .unwrap_or(0);
        let mut oldest = Vec::new();
        entries(&first, &mut oldest);
        let oldest_ms = oldest
            .first()
            .and_then(|e| e.entry.split('-').next()?.parse::<i64>().ok())
            .map_or(0, |t| u64::try_from(now_ms() - t).unwrap_or(0));
        Ok(OutboxStats {
            queued,
            pending,
            timers,
            dead,
            oldest_ms,
        })
    }

    async fn push_ack(&self, user: &str, channel: &str, seq: Seq) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        ACK.key(self.keys.push_acks(channel))
            .arg(user)
            .arg(seq)
            .arg(ACKS_TTL.as_secs())
            .invoke_async::<i64>(&mut con)
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn push_acked(&self, channel: &str, users: &[String]) -> BackendResult<Vec<Seq>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.cmd.clone();
        let v: Vec<Option<Seq>> = redis::cmd("HMGET")
            .arg(self.keys.push_acks(channel))
            .arg(users)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(v.into_iter().map(|s| s.unwrap_or(0)).collect())
    }

    async fn push_gate(
        &self,
        key: &str,
        window: Duration,
        body: Bytes,
        summary: Bytes,
    ) -> BackendResult<Gate> {
        let mut con = self.cmd.clone();
        let open: i64 = GATE
            .key(self.keys.push_gate(key))
            .key(self.keys.push_held(key))
            .key(self.keys.push_timers())
            .key(self.keys.push_timer_bodies())
            .arg(ms(window))
            .arg(&body[..])
            .arg(format!("sum:{key}"))
            .arg(&summary[..])
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(if open == 1 { Gate::Send } else { Gate::Held })
    }

    async fn push_gates(
        &self,
        window: Duration,
        gates: Vec<(String, Bytes, Bytes)>,
    ) -> BackendResult<Vec<Gate>> {
        if gates.is_empty() {
            return Ok(Vec::new());
        }
        let window = ms(window);
        let calls: Vec<_> = gates
            .iter()
            .map(|(key, body, summary)| {
                let mut inv = GATE.key(self.keys.push_gate(key));
                inv.key(self.keys.push_held(key))
                    .key(self.keys.push_timers())
                    .key(self.keys.push_timer_bodies())
                    .arg(window)
                    .arg(&body[..])
                    .arg(format!("sum:{key}"))
                    .arg(&summary[..]);
                (&*GATE, inv)
            })
            .collect();
        let mut con = self.cmd.clone();
        eval_pipeline(&mut con, &calls)
            .await?
            .into_iter()
            .map(|v| match v {
                Value::Int(1) => Ok(Gate::Send),
                Value::Int(_) => Ok(Gate::Held),
                other => Err(crate::backend::BackendError::Internal(format!(
                    "push_gate.lua answered {other:?}"
                ))),
            })
            .collect()
    }

    async fn push_take_held(
        &self,
        key: &str,
        window: Duration,
    ) -> BackendResult<Option<(u32, Bytes)>> {
        let mut con = self.cmd.clone();
        let v: Option<(u32, Vec<u8>)> = TAKE_HELD
            .key(self.keys.push_gate(key))
            .key(self.keys.push_held(key))
            .arg(ms(window))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(v.map(|(n, b)| (n, Bytes::from(b))))
    }
}
