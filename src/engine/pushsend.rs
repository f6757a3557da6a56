//! The sending loop every node runs: turns due timers into outbox entries, claims entries (its own
//! and, after `reclaim_after`, those a dead node left), expands plans into jobs (through the burst
//! gate), sends jobs with their provider, and finishes each entry: done, retried with backoff (or
//! after the provider's `Retry-After`), dead-lettered, or done with the dead token removed.
//! At-least-once: a job sent twice (a node died between sending and finishing) carries the same
//! job id and collapse key, so the device shows it once.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

use super::pushplan::{Work, backoff, gate_key, summary_of};
use super::{Engine, within_deadline};
use crate::backend::{BackendError, Gate, OutboxEntry};
use crate::push::{Outcome, PushJob};

/// How often the loop looks for due timers and new entries (timers fire within this of their due
/// time, plus the send).
const TICK: Duration = Duration::from_millis(100);
/// Entries claimed per round.
const BATCH: usize = 64;
/// Sends in flight per node.
const IN_FLIGHT: usize = 32;
/// Dead letters kept.
pub const DEAD_KEPT: usize = 1000;
/// How often the outbox figures are refreshed for `/metrics`.
const STATS_EVERY: Duration = Duration::from_secs(5);

/// A dead letter as kept and listed (`GET /api/v1/push/dead`): the job without its token or
/// subscription, why it failed and when.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The job (token and subscription removed).
    pub job: PushJob,
    /// Why it was given up.
    pub reason: String,
    /// Sends tried.
    pub attempts: u32,
    /// When (unix ms).
    pub at: i64,
}

/// Runs the sending loop until shutdown.
pub(crate) async fn run(engine: Engine) {
    if !engine.push_enabled() {
        return;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None::<tokio::time::Instant>;
    let mut stats_at = tokio::time::Instant::now();
    // Entries a dead node left are looked for a few times per `reclaim_after`, not every tick.
    let reclaim_every = engine.config.push.reclaim_after() / 4;
    let mut reclaim_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let reclaim = reclaim_at.elapsed() >= reclaim_every;
        if reclaim {
            reclaim_at = tokio::time::Instant::now();
        }
        if let Err(e) = engine.push_round(reclaim).await {
            // Once a minute at most while the backend is away.
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(error = %e, "Push loop: backend unavailable; retrying.");
                last_error = Some(tokio::time::Instant::now());
            }
        }
        if stats_at.elapsed() >= STATS_EVERY {
            stats_at = tokio::time::Instant::now();
            if let Ok(s) =
                within_deadline("outbox.push_stats", engine.backends.outbox.push_stats()).await
            {
                crate::metrics::push_outbox(s.queued, s.pending, s.timers, s.dead, s.oldest_ms);
            }
        }
    }
}

impl Engine {
    /// One round: due timers into the outbox, then claimed entries handled until none are left
    /// (with `reclaim`, first those another node claimed and did not finish in `reclaim_after`).
    async fn push_round(&self, reclaim: bool) -> Result<(), BackendError> {
        let outbox = &self.backends.outbox;
        within_deadline("outbox.push_due", outbox.push_due(1024)).await?;
        let mut idle = reclaim.then(|| self.config.push.reclaim_after());
        loop {
            let entries = within_deadline(
                "outbox.push_claim",
                outbox.push_claim(&self.node, BATCH, idle),
            )
            .await?;
            idle = None;
            let n = entries.len();
            futures_util::stream::iter(entries)
                .for_each_concurrent(IN_FLIGHT, |e| async move {
                    if let Err(err) = self.handle_entry(&e).await {
                        // Left unfinished: claimed again after `reclaim_after`.
                        tracing::warn!(entry = %e.entry, error = %err, "Push entry not finished.");
                    }
                })
                .await;
            if n < BATCH {
                return Ok(());
            }
        }
    }

    async fn handle_entry(&self, e: &OutboxEntry) -> Result<(), BackendError> {
        let outbox = &self.backends.outbox;
        let work: Work = match serde_json::from_slice(&e.body) {
            Ok(w) => w,
            Err(err) => {
                tracing::error!(entry = %e.entry, error = %err, "Unreadable push entry; dead-lettered.");
                return within_deadline(
                    "outbox.push_dead",
                    outbox.push_dead(&e.entry, e.body.clone(), DEAD_KEPT),
                )
                .await;
            }
        };
        match work {
            Work::Plan(plan) => {
                let jobs = match self.expand_plan(&plan, e.seq).await {
                    Ok(j) => j,
                    // Left for the next claim (the backend is away).
                    Err(err) => return Err(BackendError::Unavailable(err.message)),
                };
                let now = self.gate(jobs).await?;
                crate::metrics::push_jobs_planned(now.len() as u64);
                within_deadline("outbox.push_enqueue", outbox.push_enqueue(now)).await?;
                within_deadline("outbox.push_done", outbox.push_done(&e.entry)).await
            }
            Work::Summary { key } => {
                let window = self.config.push.burst_window();
                let held =
                    within_deadline("outbox.push_take_held", outbox.push_take_held(&key, window))
                        .await?;
                if let Some((n, last)) = held
                    && let Ok(Work::Job { job, .. }) = serde_json::from_slice::<Work>(&last)
                {
                    let job = summary_of(job, n);
                    crate::metrics::push_jobs_planned(1);
                    within_deadline(
                        "outbox.push_enqueue",
                        outbox.push_enqueue(vec![Work::Job { job, attempt: 0 }.encode()]),
                    )
                    .await?;
                }
                within_deadline("outbox.push_done", outbox.push_done(&e.entry)).await
            }
            Work::Job { job, attempt } => self.send_job(e, job, attempt).await,
        }
    }

    /// The burst gate, for a plan's jobs in one backend call: those to send now, encoded; the rest
    /// are held for their window's summary.
    async fn gate(&self, jobs: Vec<PushJob>) -> Result<Vec<Bytes>, BackendError> {
        let encode = |job: PushJob| Work::Job { job, attempt: 0 }.encode();
        let window = self.config.push.burst_window();
        if window.is_zero() {
            return Ok(jobs.into_iter().map(encode).collect());
        }
        let calls = jobs
            .iter()
            .map(|job| {
                let key = gate_key(job);
                let summary = Work::Summary { key: key.clone() }.encode();
                (key, encode(job.clone()), summary)
            })
            .collect();
        let gates = within_deadline(
            "outbox.push_gates",
            self.backends.outbox.push_gates(window, calls),
        )
        .await?;
        Ok(jobs
            .into_iter()
            .zip(gates)
            .filter(|(_, g)| *g == Gate::Send)
            .map(|(job, _)| encode(job))
            .collect())
    }

    async fn send_job(
        &self,
        e: &OutboxEntry,
        job: PushJob,
        attempt: u32,
    ) -> Result<(), BackendError> {
        let outbox = &self.backends.outbox;
        let provider = job.provider.as_str();
        let outcome = match self.push.get(job.provider) {
            Some(p) => p.send(&job).await,
            None => Outcome::Failed {
                reason: format!("provider {provider} is not configured"),
            },
        };
        let attempts = attempt + 1;
        match outcome {
            Outcome::Sent => {
                crate::metrics::push_sent(provider);
                tracing::debug!(provider, user = %job.user, device = %job.device, job = %job.id, "Push sent.");
                within_deadline("outbox.push_done", outbox.push_done(&e.entry)).await
            }
            Outcome::Retry { after, reason } if attempts < self.config.push.max_attempts() => {
                let wait = after.unwrap_or_else(|| backoff(attempt));
                crate::metrics::push_failed(provider, &reason, "retry");
                tracing::info!(provider, job = %job.id, reason = %reason, retry_in_ms = wait.as_millis() as u64, "Push will be retried.");
                let id = format!("retry:{}", job.id);
                let body = Work::Job {
                    job,
                    attempt: attempts,
                }
                .encode();
                within_deadline(
                    "outbox.push_retry",
                    outbox.push_retry(&e.entry, &id, wait, body),
                )
                .await
            }
            Outcome::Retry { reason, .. } | Outcome::Failed { reason } => {
                crate::metrics::push_failed(provider, &reason, "dead_letter");
                tracing::warn!(provider, job = %job.id, reason = %reason, attempts, "Push dead-lettered.");
                let dead = dead_letter(job, reason, attempts);
                within_deadline(
                    "outbox.push_dead",
                    outbox.push_dead(&e.entry, dead, DEAD_KEPT),
                )
                .await
            }
            Outcome::DeadToken { reason } => {
                crate::metrics::push_dead_token(provider);
                tracing::info!(provider, user = %job.user, device = %job.device, reason = %reason, "Push token dead; device removed.");
                self.remove_dead_device(&job).await?;
                within_deadline("outbox.push_done", outbox.push_done(&e.entry)).await
            }
        }
    }

    /// Removes the device a dead token belonged to, unless it was registered again with another
    /// token meanwhile.
    async fn remove_dead_device(&self, job: &PushJob) -> Result<(), BackendError> {
        let devices = &self.backends.devices;
        let regs = within_deadline("devices.devices", devices.devices(&job.user)).await?;
        let same = regs.iter().any(|r| {
            r.device == job.device && r.token == job.token && r.subscription == job.subscription
        });
        if same {
            within_deadline(
                "devices.delete_device",
                devices.delete_device(&job.user, &job.device),
            )
            .await?;
        }
        Ok(())
    }
}

fn dead_letter(mut job: PushJob, reason: String, attempts: u32) -> Bytes {
    job.token = None;
    job.subscription = None;
    let d = DeadLetter {
        job,
        reason,
        attempts,
        at: crate::event::now_ms(),
    };
    Bytes::from(serde_json::to_vec(&d).expect("dead letter serialises"))
}

/// The push outbox as `GET /api/v1/push/dead` shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetters {
    /// Newest first.
    pub dead: Vec<DeadLetter>,
    /// The outbox figures.
    pub outbox: crate::backend::OutboxStats,
}

impl Engine {
    /// The newest `limit` dead letters (at most [`DEAD_KEPT`]) and the outbox figures.
    pub async fn push_dead_letters(&self, limit: usize) -> super::EngineResult<DeadLetters> {
        let outbox = &self.backends.outbox;
        let raw = super::backend(
            "outbox.push_dead_letters",
            outbox.push_dead_letters(limit.min(DEAD_KEPT)),
        )
        .await?;
        let dead = raw
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect();
        let outbox = super::backend("outbox.push_stats", outbox.push_stats()).await?;
        Ok(DeadLetters { dead, outbox })
    }
}
