//! The idle phase: K idle WebSockets, and the engine's RSS before and after they opened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::args::Args;
use crate::procfs::Probes;
use crate::report::{IdleReport, round1};
use crate::setup::{TOKEN_TTL_SECS, await_ready, open_reported};
use crate::ui::{SETUP_TEMPLATE, Ui};
use crate::ws::{open_ws_stream, ws_base, ws_receive};

/// Read buffer of idle WebSockets: they only ever read a `connected`, a reply and pings, and there
/// may be many of them (it grows for a larger frame, and shrinks back once that frame is read).
const IDLE_READ_BUFFER: usize = 1024;
/// How long the engine has to settle after the last idle connection subscribed, before its RSS is
/// read again.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

/// The idle connections, open, and what was measured when they opened.
pub(crate) struct IdlePhase {
    tasks: Vec<JoinHandle<Option<String>>>,
    setup_s: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
}

pub(crate) async fn idle_phase(
    args: &Args,
    urls: &[String],
    probes: &Probes,
    ui: &Ui,
    stop: &CancellationToken,
) -> anyhow::Result<IdlePhase> {
    let rss_before_kb = probes.engine_rss_kb()?;
    ui.note(format_args!(
        "opening {} idle WebSockets over {} node(s) (engine RSS {rss_before_kb} kB) …",
        args.idle,
        urls.len()
    ));
    ui.phase("idle", args.idle as u64, SETUP_TEMPLATE);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.setup_timeout);
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.idle);
    let slots = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(args.idle);
    for i in 0..args.idle {
        let user = format!("lg-idle-{i}");
        let token = herald::transport::auth::mint_hs256(&args.secret, &user, None, TOKEN_TTL_SECS)
            .context("minting an idle connection token")?;
        let url = format!("{}/ws?token={token}", ws_base(&urls[i % urls.len()]));
        tasks.push(tokio::spawn(idle_connection(
            user,
            url,
            slots.clone(),
            ready_tx.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    await_ready(&mut ready_rx, args.idle, deadline, ui, "idle connections").await?;
    let setup_s = t0.elapsed().as_secs_f64();
    ui.bar.set_message("settling");
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_after_kb = probes.engine_rss_kb()?;
    ui.note(format_args!(
        "{} idle connections open in {setup_s:.1}s; engine RSS {rss_before_kb} -> {rss_after_kb} kB",
        args.idle
    ));
    Ok(IdlePhase {
        tasks,
        setup_s,
        rss_before_kb,
        rss_after_kb,
    })
}

impl IdlePhase {
    /// Waits for the (stopped) idle connections to close; the report's idle fields.
    pub(crate) async fn finish(self, ui: &Ui) -> anyhow::Result<IdleReport> {
        let k = self.tasks.len();
        let mut disconnects = 0u64;
        let mut first = None;
        for t in self.tasks {
            if let Some(reason) = t.await.context("an idle connection task panicked")? {
                disconnects += 1;
                first.get_or_insert(reason);
            }
        }
        if let Some(reason) = first {
            ui.warn(format_args!(
                "{disconnects} idle connections lost their socket; the first: {reason}"
            ));
        }
        let grown_bytes = (self.rss_after_kb as i64 - self.rss_before_kb as i64) * 1024;
        Ok(IdleReport {
            idle_connections: k,
            idle_setup_s: round1(self.setup_s),
            rss_before_kb: self.rss_before_kb,
            rss_after_kb: self.rss_after_kb,
            rss_per_idle_connection_bytes: grown_bytes / k.max(1) as i64,
            idle_disconnects: disconnects,
        })
    }
}

/// One idle connection: connect, subscribe to its own `user:` channel, report ready, then read
/// (answering the engine's pings) until `stop`. Returns why the socket ended early, if it did.
async fn idle_connection(
    user: String,
    ws_url: String,
    slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Option<String> {
    // Boxed, in a statement of its own: the setup future (connect, upgrade, subscribe) is large,
    // and inline (or held in a named local) it would stay in the task for its whole life.
    let channel = format!("user:{user}");
    let setup = Box::pin(open_reported(
        &user,
        open_ws_stream(&ws_url, Some(&channel), IDLE_READ_BUFFER, IDLE_READ_BUFFER),
        &slots,
        ready,
        &stop,
    ));
    let mut ws = match setup.await? {
        Ok((ws, _)) => ws,
        Err(e) => return Some(e),
    };
    ws_receive(&mut ws, &stop, |_| {}).await
}
