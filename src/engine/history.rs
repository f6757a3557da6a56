//! Reading a channel's history by seq range (the `history` op, `GET /channels/{channel}/history`,
//! seed 003's `GET /rooms/{room}/events`).

use serde::Serialize;
use serde_json::value::RawValue;

use super::limits::history_limit;
use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::channels::ChannelName;
use crate::event::{Epoch, Seq};

/// A page of history as the API and the `history` op answer it.
#[derive(Debug, Serialize)]
pub struct History {
    /// The channel.
    pub channel: ChannelName,
    /// Its epoch now.
    pub epoch: Epoch,
    /// Its last seq now.
    pub seq: Seq,
    /// The stored events, as their live frames.
    pub events: Vec<Box<RawValue>>,
    /// False when the range asked for starts before what is still kept (trimmed or aged out).
    pub recovered: bool,
}

impl Engine {
    /// What a client asks for (the `history` op, `GET /history`): the events of `channel` with
    /// `from <= seq <= to` (`from` 1 and `to` the last when not given), if `user` may subscribe
    /// to it.
    pub async fn client_history(
        &self,
        user: &str,
        attrs: &serde_json::Map<String, serde_json::Value>,
        channel: &str,
        (from, to): (Option<Seq>, Option<Seq>),
        limit: Option<usize>,
    ) -> EngineResult<History> {
        let ch = ChannelName::parse(channel)?;
        self.can_subscribe(user, attrs, &ch).await?;
        let after = from.unwrap_or(1).saturating_sub(1);
        self.history(&ch, after, to, limit).await
    }

    /// Events of `ch` with `after < seq <= to` (`to`: the last), at most `limit` (100 when not given).
    pub async fn history(
        &self,
        ch: &ChannelName,
        after: Seq,
        to: Option<Seq>,
        limit: Option<usize>,
    ) -> EngineResult<History> {
        let limit = history_limit(limit)?;
        let kinds = self.kinds();
        let kind = kinds.of(ch);
        if !kind.persist {
            return Err(EngineError::new(
                ErrorCode::BadChannel,
                format!("{ch}: this channel kind keeps no history"),
            ));
        }
        let page = backend(
            "history.read",
            self.backends
                .history
                .read(ch, after, to, limit, kind.history_age),
        )
        .await?;
        let recovered =
            after.saturating_add(1) >= page.first_available || after >= page.position.seq;
        if !recovered {
            crate::metrics::unrecovered("history");
        }
        // The stored frames go into the reply as they are, checked to be JSON.
        let mut events = Vec::with_capacity(page.events.len());
        for ev in &page.events {
            let text = std::str::from_utf8(&ev.frame)
                .map_err(|_| EngineError::new(ErrorCode::Internal, "stored frame is not UTF-8"))?;
            let rv = RawValue::from_string(text.to_string())
                .map_err(|_| EngineError::new(ErrorCode::Internal, "stored frame is not JSON"))?;
            events.push(rv);
        }
        Ok(History {
            channel: ch.clone(),
            epoch: page.position.epoch,
            seq: page.position.seq,
            events,
            recovered,
        })
    }
}
