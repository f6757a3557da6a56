//! The subscriber connection's channels: local subscribers reference-counted per channel, SUBSCRIBE
//! and UNSUBSCRIBE batched by one manager task, and each new channel's baseline position (so the
//! first gap after subscribing is caught too).

use std::sync::Arc;

use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::err;
use super::shared::{ChannelState, Shared};
use crate::backend::BackendResult;
use crate::channels::ChannelName;
use crate::event::Position;
use crate::primitives::lock;

pub(super) enum SubOp {
    Subscribe(ChannelName, oneshot::Sender<BackendResult<()>>),
    Unsubscribe(ChannelName),
}

/// The subscription manager: reference counts, batched SUBSCRIBE / UNSUBSCRIBE, and the baseline
/// position of each newly subscribed channel (so the first gap is caught too).
pub(super) async fn manage(
    shared: Arc<Shared>,
    mut sub: ConnectionManager,
    mut ops: mpsc::UnboundedReceiver<SubOp>,
    mut kick: mpsc::Receiver<()>,
) {
    loop {
        let first = tokio::select! {
            op = ops.recv() => match op {
                Some(op) => op,
                None => return,
            },
            k = kick.recv() => {
                if k.is_none() {
                    return;
                }
                // The subscription looks broken: a command on the connection makes the manager
                // reconnect (and resubscribe) now rather than at the next subscribe.
                let _: Result<Value, _> = redis::cmd("PING").query_async(&mut sub).await;
                continue;
            }
        };
        let mut batch = vec![first];
        while let Ok(more) = ops.try_recv() {
            batch.push(more);
        }
        let mut to_sub: Vec<ChannelName> = Vec::new();
        let mut to_unsub: Vec<String> = Vec::new();
        let mut waiters = Vec::new();
        {
            let mut chans = lock(&shared.channels);
            for op in batch {
                match op {
                    SubOp::Subscribe(ch, ack) => {
                        let st =
                            chans
                                .entry(ch.as_str().to_string())
                                .or_insert_with(|| ChannelState {
                                    name: ch.clone(),
                                    count: 0,
                                    last: None,
                                    live: false,
                                });
                        st.count += 1;
                        if st.count == 1 {
                            to_unsub.retain(|c| c != ch.as_str());
                            to_sub.push(ch.clone());
                        }
                        waiters.push((ch, ack));
                    }
                    SubOp::Unsubscribe(ch) => {
                        if let Some(st) = chans.get_mut(ch.as_str()) {
                            st.count = st.count.saturating_sub(1);
                            if st.count == 0 {
                                chans.remove(ch.as_str());
                                to_sub.retain(|c| c != &ch);
                                to_unsub.push(ch.as_str().to_string());
                            }
                        }
                    }
                }
            }
        }
        if !to_unsub.is_empty() {
            let names: Vec<String> = to_unsub.iter().map(|c| shared.keys.pubsub(c)).collect();
            if let Err(e) = sub.unsubscribe(&names).await {
                tracing::warn!(error = %e, channels = names.len(), "Redis UNSUBSCRIBE failed.");
            }
        }
        let mut result = Ok(());
        if !to_sub.is_empty() {
            let names: Vec<String> = to_sub
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            result = sub.subscribe(&names).await.map_err(err);
            if result.is_ok() {
                // Baselines: messages at or below a channel's position now are covered by the
                // subscribers' own history reads. All of a batch's at once (they share the
                // multiplexed connection's pipeline): one after the other, a connect storm's batch
                // of new `user:` channels took a round trip each while every subscribe behind it
                // waited.
                let positions: BackendResult<Vec<Position>> =
                    futures_util::future::join_all(to_sub.iter().map(|ch| shared.position(ch)))
                        .await
                        .into_iter()
                        .collect();
                match positions {
                    // Live only once the whole batch holds: a failed one is undone below, and a
                    // subscriber let through by `live` meanwhile would miss its messages.
                    Ok(positions) => {
                        let mut chans = lock(&shared.channels);
                        for (ch, p) in to_sub.iter().zip(positions) {
                            if let Some(st) = chans.get_mut(ch.as_str()) {
                                st.last.get_or_insert(p);
                                st.live = true;
                            }
                        }
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        if let Err(e) = &result {
            // Undo the counts of this batch's new subscriptions: their callers get the error.
            {
                let mut chans = lock(&shared.channels);
                for ch in &to_sub {
                    chans.remove(ch.as_str());
                }
            }
            let names: Vec<String> = to_sub
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            let _ = sub.unsubscribe(&names).await;
            tracing::warn!(error = %e, "Redis SUBSCRIBE failed.");
        }
        for (ch, ack) in waiters {
            let r = if to_sub.contains(&ch) {
                result.clone()
            } else {
                Ok(())
            };
            let _ = ack.send(r);
        }
    }
}
