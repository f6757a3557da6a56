//! Setup both phases share: the engine API calls (room memberships, a channel's seq), and
//! connections that open in parallel and report ready.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, stream};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::args::Args;
use crate::ui::Ui;

/// Token lifetime: long enough for any run.
pub(crate) const TOKEN_TTL_SECS: u64 = 6 * 3600;

/// PUTs every subscriber user into the room through the node it will connect to, and the WebSocket
/// publisher users through the first node.
pub(crate) async fn add_members(
    http: &reqwest::Client,
    api_key: &str,
    args: &Args,
    urls: &[String],
    ws_publishers: usize,
    ui: &Ui,
) -> anyhow::Result<()> {
    let users = (0..args.subscribers)
        .map(|i| (format!("lg-{i}"), &urls[i % urls.len()]))
        .chain((0..ws_publishers).map(|c| (format!("lg-pub-{c}"), &urls[0])));
    let results = stream::iter(users)
        .map(|(user, base)| {
            let url = format!("{base}/api/v1/rooms/{}/members/{user}", args.room);
            async move {
                api_call(http.put(&url).bearer_auth(api_key), "PUT", &url).await?;
                ui.bar.inc(1);
                Ok(())
            }
        })
        .buffer_unordered(args.setup_concurrency.max(1))
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    results.into_iter().collect()
}

/// Sends a setup call to the engine's API; its body, or an error naming the call, its status and body.
async fn api_call(req: reqwest::RequestBuilder, method: &str, url: &str) -> anyhow::Result<String> {
    let r = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{method} {url} answered {status}: {body}");
    }
    Ok(body)
}

/// The channel's last seq, from its history (one event read at most).
pub(crate) async fn channel_seq(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    channel: &str,
) -> anyhow::Result<u64> {
    let url = format!("{base}/api/v1/channels/{channel}/history?since=0&limit=1");
    let body = api_call(http.get(&url).bearer_auth(api_key), "GET", &url).await?;
    let v: Value =
        serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON: {body}"))?;
    Ok(v["seq"].as_u64().unwrap_or(0))
}

/// Opens a connection with `open`, holding one of `connect_slots` meanwhile, and reports the outcome
/// on `ready` (a refusal prefixed with `who`); `None` when stopped first.
pub(crate) async fn open_reported<T>(
    who: &str,
    open: impl Future<Output = Result<T, String>>,
    connect_slots: &Semaphore,
    ready: mpsc::Sender<Result<(), String>>,
    stop: &CancellationToken,
) -> Option<Result<T, String>> {
    let setup = Box::pin(async {
        let _slot = connect_slots
            .acquire()
            .await
            .map_err(|_| "setup cancelled".to_string())?;
        open.await
    });
    let opened = tokio::select! {
        r = setup => r,
        _ = stop.cancelled() => return None,
    };
    let report = match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{who}: {e}")),
    };
    let _ = ready.send(report).await;
    Some(opened)
}

/// Waits until `n` connection tasks reported ready, failing on the first error or at `deadline`.
pub(crate) async fn await_ready(
    ready_rx: &mut mpsc::Receiver<Result<(), String>>,
    n: usize,
    deadline: tokio::time::Instant,
    ui: &Ui,
    what: &str,
) -> anyhow::Result<()> {
    let mut ready = 0;
    let mut last_note = Instant::now();
    while ready < n {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {
                ready += 1;
                ui.bar.inc(1);
            }
            Ok(Some(Err(e))) => bail!("{what} setup failed after {ready} were ready: {e}"),
            Ok(None) => bail!("{what} ended during setup ({ready} ready)"),
            Err(_) => {
                bail!("setup timed out with {ready} of {n} {what} ready (--setup-timeout)")
            }
        }
        if ui.lines() && last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("loadgen: {ready}/{n} {what} ready");
            last_note = Instant::now();
        }
    }
    Ok(())
}
