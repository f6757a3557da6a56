//! The subscriber tasks: each opens its WebSocket or SSE stream, reports ready, and counts its
//! deliveries into a [`Tally`] until stopped.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::setup::open_reported;
use crate::sse::{SUB_READ_BUFFER, SUB_READ_BUFFER_MAX, open_sse, sse_receive};
use crate::tally::{Shared, Tally};
use crate::ws::{open_ws_stream, ws_receive};

/// One WebSocket subscriber: connect, subscribe, report ready, then count deliveries until `stop`.
pub(crate) async fn ws_subscriber(
    index: usize,
    ws_url: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::new();
    let open = open_ws_stream(
        &ws_url,
        Some(&shared.channel),
        SUB_READ_BUFFER,
        SUB_READ_BUFFER_MAX,
    );
    let Some((mut ws, base)) = set_up(index, open, &connect_slots, ready, &stop, &mut tally).await
    else {
        return tally;
    };
    tally.base = base;
    let progress = &shared.progress[index].0;
    let closed = ws_receive(&mut ws, &stop, |frame| {
        tally.on_frame(frame, &shared);
        progress.store(tally.frames, Ordering::Relaxed);
    })
    .await;
    tally.closed = closed;
    tally
}

/// Opens subscriber `index`'s connection with `open` (see [`open_reported`]); `None` when stopped, or
/// refused (the reason is in `tally.closed`).
async fn set_up<T>(
    index: usize,
    open: impl Future<Output = Result<T, String>>,
    connect_slots: &Semaphore,
    ready: mpsc::Sender<Result<(), String>>,
    stop: &CancellationToken,
    tally: &mut Tally,
) -> Option<T> {
    let who = format!("subscriber lg-{index}");
    match open_reported(&who, open, connect_slots, ready, stop).await? {
        Ok(conn) => Some(conn),
        Err(e) => {
            tally.closed = Some(e);
            None
        }
    }
}

/// One SSE subscriber: open the stream, report ready, wait for the channel's seq at subscribe time,
/// then count deliveries until `stop`.
pub(crate) async fn sse_subscriber(
    index: usize,
    url: String,
    shared: Arc<Shared>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    stop: CancellationToken,
    mut base: watch::Receiver<Option<u64>>,
) -> Tally {
    let mut tally = Tally::new();
    let Some(mut sse) = set_up(
        index,
        open_sse(&url),
        &connect_slots,
        ready,
        &stop,
        &mut tally,
    )
    .await
    else {
        return tally;
    };
    // Nothing is published before the base is known, so the stream can wait in the socket.
    tally.base = tokio::select! {
        b = base.wait_for(Option::is_some) => match b {
            Ok(b) => (*b).unwrap_or(0),
            Err(_) => return tally,
        },
        _ = stop.cancelled() => return tally,
    };
    sse_receive(
        &mut sse,
        &mut tally,
        &shared,
        &shared.progress[index].0,
        &stop,
    )
    .await;
    tally
}
