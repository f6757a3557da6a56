//! The publish path, for the HTTP API and client `publish` frames alike:
//! dedupe (idempotency key) -> route (one evaluation per publish) -> for each target, append + unread
//! bookkeeping + fan out in one backend step (seq assigned there; on Redis one round trip) -> reply.
//!
//! Under an idempotency key, the key's claim fixes the event id, and each append is recorded under
//! the key in the same backend step: an append whose answer was lost is sent again and returns what
//! was stored, and a retry after a crash takes the key over once its lease lapses (seconds) and
//! stores only the targets not stored yet.
//!
//! The payload is encoded once per publish ([`EventBody::encode`]); the backend frames it per target.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::limits::MAX_TARGETS;
use super::{Engine, EngineError, EngineResult, ErrorCode, backend, within_deadline};
use crate::backend::{
    BackendError, DeliveryFilter, HistoryLimits, KeyState, Outgoing, OutgoingPayload, UnreadStep,
};
use crate::channels::{ChannelName, Kind};
use crate::event::{EventBody, EventId, EventSpec, Position, new_event_id, now_ms};
use crate::rules::{RouteInput, Source};

/// Pause between the attempts of an append whose outcome was unknown (the backend's connection is
/// re-established meanwhile).
const APPEND_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What claiming an idempotency key gave.
enum Claim {
    /// Publish under this event id.
    Owned(EventId),
    /// Done before: the first reply.
    Done(PublishReply),
}

/// The error of a publish whose append to `channel` failed after `stored` (the targets before it)
/// succeeded: it says exactly what is known to be stored and what is not.
fn append_failed(
    e: BackendError,
    channel: &ChannelName,
    stored: &[Receipt],
    keyed: bool,
) -> EngineError {
    let before = if stored.is_empty() {
        String::new()
    } else {
        let list: Vec<&str> = stored.iter().map(|r| r.channel.as_str()).collect();
        format!("stored on {}; ", list.join(", "))
    };
    let retry = if keyed {
        "retry with the same idempotency key to complete it: nothing is stored twice"
    } else if stored.is_empty() {
        "retry"
    } else {
        "a retry stores those again (publish with an idempotency key to retry safely)"
    };
    match e {
        BackendError::Unavailable(m) => {
            tracing::warn!(channel = %channel, error = %m, "Publish refused: backend unavailable.");
            let what = if stored.is_empty() {
                "nothing was stored".to_string()
            } else {
                format!("not stored on {channel}")
            };
            EngineError::new(
                ErrorCode::Unavailable,
                format!("backend unavailable: {before}{what}; {retry}"),
            )
        }
        BackendError::OutcomeUnknown(m) => {
            tracing::warn!(channel = %channel, error = %m, "Publish outcome unknown: backend lost.");
            let retry = if keyed {
                "retry with the same idempotency key to find out: nothing is stored twice"
            } else {
                "a retry may store it twice (publish with an idempotency key to retry safely)"
            };
            EngineError::new(
                ErrorCode::OutcomeUnknown,
                format!(
                    "backend lost after the event was sent: {before}it may or may not be stored on {channel}; {retry}"
                ),
            )
        }
        other => EngineError::from(other),
    }
}

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

/// What the rules decide for an event without publishing it (`POST /admin/rules/dry-run`).
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// The decision, per target channel.
    pub decision: serde_json::Value,
    /// How it was reached.
    pub trace: Trace,
    /// What push it would plan, per target channel the rule's push applies to, and for each
    /// recipient (the first [`DRY_RUN_RECIPIENTS`]) which devices get it live and which by push, and
    /// why, from the shared state now (for `unacked`: at the due time, unless acked by then).
    pub push: Vec<ChannelPush>,
}

/// Recipients a dry run plans at most, per channel.
pub const DRY_RUN_RECIPIENTS: usize = 100;

/// A dry run's push plan for one channel.
#[derive(Debug, Serialize)]
pub struct ChannelPush {
    /// The channel.
    pub channel: String,
    /// The rule's `when`.
    pub when: crate::rules::PushWhen,
    /// For `unacked`: the fallback's delay, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// False when no provider is configured (nothing would be planned).
    pub enabled: bool,
    /// Per recipient.
    pub recipients: Vec<super::pushplan::RecipientPlan>,
    /// Recipients beyond those listed.
    pub more: usize,
}

/// How a dry run's decision was reached.
#[derive(Debug, Serialize)]
pub struct Trace {
    /// `file.rhai::route`, or `channel defaults`.
    pub by: String,
    /// The rule error that made `on_error` apply, if any.
    pub error: Option<String>,
    /// The rule set's version.
    pub version: u64,
    /// Its files.
    pub files: Vec<String>,
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

impl Receipt {
    /// `channel`, at `position` when stored there.
    pub fn new(channel: &ChannelName, position: Option<Position>) -> Self {
        Receipt {
            channel: channel.to_string(),
            seq: position.as_ref().map(|p| p.seq),
            epoch: position.map(|p| p.epoch.to_string()),
        }
    }
}

/// What push the publish planned.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushSummary {
    /// Push plans recorded: one per target channel (`user:`, `room:`) the rule's push applies to.
    /// Each is carried out for the channel's recipients now, or at the fallback's due time for
    /// `unacked` (see README "Push").
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
    /// Routes `spec` with the rules in force, storing and delivering nothing; the push part reads
    /// the shared state (presence, devices, focus, membership).
    pub async fn dry_run(&self, spec: &EventSpec) -> EngineResult<DryRun> {
        let rules = self.rules.current();
        let routed = spec
            .route(&rules)
            .map_err(|e| EngineError::new(ErrorCode::BadFrame, e))?;
        let targets = super::pushplan::push_targets(
            &routed.decision,
            rules.kinds(),
            spec.from.as_deref(),
            self.config.push.default_after(),
        );
        let mut push = Vec::with_capacity(targets.len());
        for t in targets {
            let mut recipients = self
                .plan_channel(
                    &t.channel,
                    &t.except,
                    t.when,
                    routed.decision.devices,
                    None,
                    super::pushplan::PlanScope::Everyone,
                )
                .await?;
            let more = recipients.len().saturating_sub(DRY_RUN_RECIPIENTS);
            recipients.truncate(DRY_RUN_RECIPIENTS);
            push.push(ChannelPush {
                channel: t.channel.to_string(),
                when: t.when,
                after_ms: t.after.map(|a| a.as_millis() as u64),
                enabled: self.push_enabled(),
                recipients,
                more,
            });
        }
        Ok(DryRun {
            push,
            decision: routed.decision.to_json(rules.kinds(), spec.from.as_deref()),
            trace: Trace {
                by: routed.decided_by(),
                error: routed.error,
                version: rules.version,
                files: rules.files(),
            },
        })
    }

    /// Publishes an event (see the module doc). An error says what is known: `unavailable` that the
    /// failing target was not stored (earlier targets were, and the message names them),
    /// `outcome_unknown` that it may have been. Under an idempotency key, a retry completes the
    /// publish without storing anything twice.
    pub async fn publish(&self, req: PublishRequest) -> EngineResult<PublishReply> {
        let source = req.source.as_str();
        let started = std::time::Instant::now();
        let r = self.publish_inner(req).await;
        match &r {
            Ok(_) => crate::metrics::published(source, started.elapsed()),
            Err(e) => crate::metrics::publish_failed(source, e.code.as_str(), started.elapsed()),
        }
        r
    }

    async fn publish_inner(&self, mut req: PublishRequest) -> EngineResult<PublishReply> {
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
        ChannelName::dedupe(&mut req.targets);
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
            Some(k) => format!("{}:{k}", req.from.as_deref().unwrap_or("")),
            None => return self.publish_claimed(&req, new_event_id(), None).await,
        };
        let id = match self.claim(&key).await? {
            Claim::Owned(id) => id,
            Claim::Done(first) => {
                crate::metrics::idempotent_replay();
                return Ok(first);
            }
        };
        let key: Arc<str> = key.into();
        let result = self.publish_claimed(&req, id, Some(&key)).await;
        let keys = &self.backends.idempotency;
        match &result {
            Ok(reply) => {
                let bytes = Bytes::from(serde_json::to_vec(reply).expect("reply serialises"));
                let ttl = self.config.idempotency_ttl;
                if let Err(e) = within_deadline(
                    "idempotency.idem_complete",
                    keys.idem_complete(&key, bytes, ttl),
                )
                .await
                {
                    // Every target is recorded under the key: a retry takes over once the lease
                    // lapses and gets this reply's positions without storing again.
                    tracing::warn!(error = %e, "Could not store an idempotent publish result.");
                }
            }
            Err(_) => {
                // What was stored stays recorded under the key; ending the lease lets the
                // publisher's retry take over at once (else when the lease lapses).
                let _ = within_deadline("idempotency.idem_release", keys.idem_release(&key)).await;
            }
        }
        result
    }

    /// Claims an idempotency key: the event id to publish under, or the first reply when done before.
    /// A publish holding the key's lease is waited for, within the backend deadline.
    async fn claim(&self, key: &str) -> EngineResult<Claim> {
        let deadline = tokio::time::Instant::now() + super::BACKEND_DEADLINE;
        let fresh = new_event_id();
        loop {
            let begin = self.backends.idempotency.idem_begin(
                key,
                &fresh,
                self.config.idempotency_lease,
                self.config.idempotency_ttl,
            );
            match backend("idempotency.idem_begin", begin).await? {
                KeyState::Claimed { id } => return Ok(Claim::Owned(id.into())),
                KeyState::Done(bytes) => {
                    let reply = serde_json::from_slice(&bytes).map_err(|_| {
                        EngineError::new(
                            ErrorCode::Internal,
                            "stored idempotent reply is unreadable",
                        )
                    })?;
                    return Ok(Claim::Done(reply));
                }
                KeyState::Pending => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(EngineError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "a publish with this idempotency key is in flight; retry (its claim lapses within {} s)",
                                self.config.idempotency_lease.as_secs_f64().ceil()
                            ),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Appends to one target. Under an idempotency key the append is deduplicated by the key's
    /// record, so one whose outcome is unknown (the backend went away after it was sent) is sent
    /// again until the backend answers, within the deadline: the reply then says what was stored.
    async fn append(&self, out: Outgoing) -> Result<Option<Position>, BackendError> {
        if out.dedupe.is_none() {
            return within_deadline("broker.publish", self.backends.broker.publish(out)).await;
        }
        let deadline = tokio::time::Instant::now() + super::BACKEND_DEADLINE;
        let mut unknown = None;
        loop {
            let e =
                match within_deadline("broker.publish", self.backends.broker.publish(out.clone()))
                    .await
                {
                    Ok(p) => return Ok(p),
                    Err(e @ BackendError::OutcomeUnknown(_)) => e,
                    // Refused now, but an earlier attempt may have been stored.
                    Err(e @ BackendError::Unavailable(_)) if unknown.is_some() => e,
                    Err(e) => return Err(e),
                };
            if tokio::time::Instant::now() >= deadline {
                return Err(match unknown {
                    Some(first) => first,
                    None => e,
                });
            }
            unknown.get_or_insert(e);
            tokio::time::sleep(APPEND_RETRY_PAUSE).await;
        }
    }

    async fn publish_claimed(
        &self,
        req: &PublishRequest,
        id: EventId,
        dedupe: Option<&Arc<str>>,
    ) -> EngineResult<PublishReply> {
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
        let mut planned = 0u32;
        for channel in &decision.to {
            let kind = kinds.of(channel);
            let persist = decision
                .persist_for(&kinds, channel)
                .then_some(HistoryLimits {
                    size: kind.history_size,
                    age: kind.history_age,
                });
            let except = decision.except_for(&kinds, channel, req.from.as_deref());
            let push = self.push_step(&decision, &req.event, &id, channel, &except);
            planned += u32::from(push.is_some());
            let filter = DeliveryFilter {
                except,
                audience: None,
                devices: decision.devices,
            };
            // Unread bookkeeping (record the event as countable, move the sender's and the focused
            // members' read pointers) rides in the same backend step as the append.
            let unread = (channel.kind() == Kind::Room && decision.unread_for(&kinds, channel))
                .then(|| UnreadStep {
                    keep: kind.history_size,
                    from: req.from.clone(),
                });
            let out = Outgoing {
                channel: channel.clone(),
                event: event.clone(),
                payload: OutgoingPayload::EventBody(body.clone()),
                persist,
                filter,
                unread,
                dedupe: persist.and(dedupe.cloned()),
                push,
            };
            let position = match self.append(out).await {
                Ok(p) => p,
                Err(e) => return Err(append_failed(e, channel, &deliveries, dedupe.is_some())),
            };
            deliveries.push(Receipt::new(channel, position));
        }
        Ok(PublishReply {
            id: id.to_string(),
            deliveries,
            push: PushSummary { planned },
        })
    }
}
