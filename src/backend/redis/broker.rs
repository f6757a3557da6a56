//! Redis fan-out: one Lua step per stored target (`lua/publish.lua`: seq from the meta hash, XADD
//! `seq-0`, MAXLEN trim, the unread step of a countable room event, the idempotency record, PUBLISH
//! in the format of [`super::wire`]): one round trip per publish; frames that are not stored are a
//! plain PUBLISH. Receiving is a dedicated connection (RESP3 push, automatic resubscription) whose
//! channels [`super::subscriptions`] manages and whose messages [`super::healing`] hands over in seq
//! order, gaps healed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use redis::PushInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use super::healing::{read_pushes, run_probe};
use super::shared::{Scripts, Shared};
use super::store::{COUNTABLE_TTL, countable_keep};
use super::subscriptions::{SubOp, manage};
use super::wire::{encode_filter, unstored_payload};
use super::{MARK, RedisBackend, err, pieces};
use crate::backend::{
    BackendError, BackendResult, Broker, DeliverySink, Outgoing, OutgoingPayload,
};
use crate::channels::ChannelName;
use crate::event::{Epoch, Position, event_frame_head, now_ms};
use crate::primitives::lock;

/// The broker half of [`RedisBackend`].
pub(super) struct RedisBroker {
    pub(super) shared: Arc<Shared>,
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
                publish: lua!(
                    "unread_lib.lua",
                    "channel_lib.lua",
                    "push_lib.lua",
                    "publish.lua"
                ),
                position: lua!("channel_lib.lua", "position.lua"),
                read: lua!("channel_lib.lua", "read.lua"),
            },
            sink: OnceLock::new(),
            channels: Mutex::new(HashMap::new()),
            probe_seen: AtomicI64::new(now_ms()),
            healthy: AtomicBool::new(true),
        });
        crate::metrics::redis_up("command", true, false);
        crate::metrics::redis_up("subscriber", true, false);
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
                // The push step: fixed arguments, empty when there is none.
                match &msg.push {
                    None => inv.arg("").arg("").arg("").arg("").arg(0).arg(""),
                    Some(step) => match step.after {
                        None => inv
                            .arg("now")
                            .arg(self.keys.push_outbox())
                            .arg("")
                            .arg(&*step.id)
                            .arg(0)
                            .arg(&step.body[..]),
                        Some(after) => inv
                            .arg("after")
                            .arg(self.keys.push_timers())
                            .arg(self.keys.push_timer_bodies())
                            .arg(&*step.id)
                            .arg(after.as_millis() as u64)
                            .arg(&step.body[..]),
                    },
                };
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
                let p = unstored_payload(&msg.event, &filter, &frame);
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(self.keys.pubsub(msg.channel.as_str()))
                    .arg(p)
                    .query_async(&mut con)
                    .await
                    .map_err(err)?;
                // Not stored: no seq to carry, so the plan is queued on its own (after the frame
                // went out, as a stored event's is in the same step).
                if let Some(step) = &msg.push {
                    super::outbox::record_unstored(&mut con, &self.keys, step).await?;
                }
                Ok(None)
            }
        }
    }

    async fn subscribe(&self, channel: &ChannelName) -> BackendResult<()> {
        // A channel the connection already listens on needs only its count raised: no message to
        // the manager, whose loop a connect storm keeps busy with every new `user:` channel (a
        // subscribe to `global` or a shared room used to wait behind each of its batches).
        if let Some(st) = lock(&self.broker.shared.channels).get_mut(channel.as_str())
            && st.live
        {
            st.count += 1;
            return Ok(());
        }
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
