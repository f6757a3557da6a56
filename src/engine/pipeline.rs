//! The publish path, for the HTTP API and client `publish` frames alike:
//! dedupe (idempotency key) -> route (one evaluation per publish) -> for each target, append + unread
//! bookkeeping + fan out in one backend step (seq assigned there; on Redis one round trip) -> reply.
//!
//! The payload is encoded once per publish ([`EventBody::encode`]); the backend frames it per target.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::backend::{
    DeliveryFilter, HistoryLimits, Idempotency, Outgoing, OutgoingPayload, UnreadStep,
};
use crate::channels::{ChannelName, Kind};
use crate::event::{EventBody, new_event_id, now_ms};
use crate::rules::{RouteInput, Source};

/// Most target channels one publish may name.
pub const MAX_TARGETS: usize = 100;

/// A publish, as a transport hands it over.
#[derive(Debug)]
pub struct PublishRequest {
    /// Event type.
    pub event: String,
    /// Target channels named by the publisher.
    pub targets: Vec<ChannelName>,
    /// Sender user.
    pub from: Option<Arc<str>>,
    /// Payload.
    pub data: Box<RawValue>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// API or client.
    pub source: Source,
    /// The sender's JWT attrs (client publishes), for the rules.
    pub attrs: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

/// Where one publish went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// Channel.
    pub channel: String,
    /// Seq, when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Epoch, when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// What push the publish planned.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushSummary {
    /// Push jobs planned (push delivery arrives with the push issue: 0 for now).
    pub planned: u32,
}

/// The reply to a publish.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishReply {
    /// Event id.
    pub id: String,
    /// Per target channel.
    pub deliveries: Vec<Receipt>,
    /// Push plan.
    pub push: PushSummary,
}

fn valid_event_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

impl Engine {
    /// Publishes an event (see the module doc). An error means nothing was stored for the failing
    /// target and the idempotency key (if any) was released.
    pub async fn publish(&self, req: PublishRequest) -> EngineResult<PublishReply> {
        let source = req.source.as_str();
        let r = self.publish_inner(req).await;
        match &r {
            Ok(_) => crate::metrics::published(source),
            Err(e) => crate::metrics::publish_failed(e.code.as_str()),
        }
        r
    }

    async fn publish_inner(&self, req: PublishRequest) -> EngineResult<PublishReply> {
        if !valid_event_type(&req.event) {
            return Err(EngineError::new(
                ErrorCode::BadFrame,
                "event: 1-128 characters of [A-Za-z0-9_.:-] required",
            ));
        }
        if req.targets.is_empty() {
            return Err(EngineError::new(
                ErrorCode::BadFrame,
                "no target: give channel, room or to",
            ));
        }
        if req.targets.len() > MAX_TARGETS {
            return Err(EngineError::new(
                ErrorCode::TooLarge,
                format!("at most {MAX_TARGETS} targets per publish"),
            ));
        }
        if req.data.get().len() > self.config.limits.frame_bytes {
            return Err(EngineError::new(
                ErrorCode::TooLarge,
                format!(
                    "data is larger than {} bytes",
                    self.config.limits.frame_bytes
                ),
            ));
        }
        let key = match &req.idempotency_key {
            Some(k) if k.is_empty() || k.len() > 256 => {
                return Err(EngineError::new(
                    ErrorCode::BadFrame,
                    "idempotency_key: 1-256 characters",
                ));
            }
            Some(k) => Some(format!("{}:{k}", req.from.as_deref().unwrap_or(""))),
            None => None,
        };
        if let Some(k) = &key
            && let Some(first) = self.claim(k).await?
        {
            crate::metrics::idempotent_replay();
            return Ok(first);
        }
        let result = self.publish_claimed(&req).await;
        if let Some(k) = &key {
            match &result {
                Ok(reply) => {
                    let bytes = Bytes::from(serde_json::to_vec(reply).expect("reply serialises"));
                    let ttl = self.config.idempotency_ttl;
                    if let Err(e) = backend(self.backends.store.idem_complete(k, bytes, ttl)).await
                    {
                        tracing::warn!(error = %e, "Could not store an idempotent publish result.");
                    }
                }
                Err(_) => {
                    let _ = backend(self.backends.store.idem_release(k)).await;
                }
            }
        }
        result
    }

    /// Claims an idempotency key: `None` when this call owns it, the first reply when done before.
    async fn claim(&self, key: &str) -> EngineResult<Option<PublishReply>> {
        let deadline = tokio::time::Instant::now() + super::BACKEND_DEADLINE;
        loop {
            let ttl = self.config.idempotency_ttl;
            match backend(self.backends.store.idem_begin(key, ttl)).await? {
                Idempotency::Claimed => return Ok(None),
                Idempotency::Done(bytes) => {
                    let reply = serde_json::from_slice(&bytes).map_err(|_| {
                        EngineError::new(
                            ErrorCode::Internal,
                            "stored idempotent reply is unreadable",
                        )
                    })?;
                    return Ok(Some(reply));
                }
                Idempotency::Pending => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(EngineError::new(
                            ErrorCode::Unavailable,
                            "a publish with this idempotency key is still in flight; retry",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn publish_claimed(&self, req: &PublishRequest) -> EngineResult<PublishReply> {
        let id = new_event_id();
        let ts = now_ms();
        // One rule evaluation per publish; the set (and its channel kinds) stays the same for the
        // whole publish even if a reload swaps in a new one meanwhile.
        let rules = self.rules.current();
        let kinds = rules.kinds().clone();
        let routed = rules.route(&RouteInput {
            event: &req.event,
            id: &id,
            targets: &req.targets,
            from: req.from.as_deref(),
            data: &req.data,
            ts,
            source: req.source,
            attrs: req.attrs.as_ref(),
        });
        drop(rules);
        let decision = routed.decision;
        if let Some(reason) = decision.drop {
            return Err(EngineError::new(ErrorCode::Rejected, reason));
        }
        let body = EventBody {
            id: &id,
            event: &req.event,
            data: &req.data,
            from: req.from.as_deref(),
            ts,
        }
        .encode();
        let event: Arc<str> = req.event.as_str().into();
        let mut deliveries = Vec::with_capacity(decision.to.len());
        for channel in &decision.to {
            let kind = kinds.of(channel);
            let persist = decision
                .persist_for(&kinds, channel)
                .then_some(HistoryLimits {
                    size: kind.history_size,
                    age: kind.history_age,
                });
            let filter = DeliveryFilter {
                except: decision.except_for(&kinds, channel, req.from.as_deref()),
                audience: None,
            };
            // Unread bookkeeping (record the event as countable, move the sender's and the focused
            // members' read pointers) rides in the same backend step as the append.
            let unread = (channel.kind() == Kind::Room && decision.unread_for(&kinds, channel))
                .then(|| UnreadStep {
                    keep: kind.history_size,
                    from: req.from.clone(),
                });
            let position = backend(self.backends.broker.publish(Outgoing {
                channel: channel.clone(),
                event: event.clone(),
                payload: OutgoingPayload::EventBody(body.clone()),
                persist,
                filter,
                unread,
            }))
            .await?;
            deliveries.push(Receipt {
                channel: channel.to_string(),
                seq: position.as_ref().map(|p| p.seq),
                epoch: position.map(|p| p.epoch.to_string()),
            });
        }
        Ok(PublishReply {
            id: id.to_string(),
            deliveries,
            push: PushSummary::default(),
        })
    }
}
