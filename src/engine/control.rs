//! What the engine itself sends, past the rules and unstored: the one way to hand a frame to every
//! node's subscribers of a channel (`Engine::emit`: presence frames, read syncs, `room.left`, kicks),
//! and the cross-node kick that closes a user's sessions everywhere.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::hub::CloseReason;
use super::limits::check_id;
use super::{Engine, EngineResult, backend};
use crate::backend::{DeliveryFilter, Outgoing, OutgoingPayload};
use crate::channels::{ChannelName, Kind};
use crate::event::{EventBody, new_event_id, now_ms};

/// The internal event name of the cross-node "close this user's sessions" frame.
pub const KICK_EVENT: &str = "herald.kick";

/// The reply to `POST /users/{user}/disconnect`.
#[derive(Debug, Serialize)]
pub struct Disconnected {
    /// The user.
    pub user: String,
    /// Sessions closed on this node (those on others close as the kick reaches them).
    pub closed: usize,
}

/// The `data` of an event the engine makes (typing, read receipts, room and announcement events),
/// as the raw JSON a publish carries.
pub(crate) fn event_data(data: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(data).expect("engine event data serialises")
}

impl Engine {
    /// Hands `payload` (a whole frame, or an event body framed per channel) to every node's
    /// subscribers of `channel`: not stored, not routed by the rules, filtered by `filter`.
    pub(crate) async fn emit(
        &self,
        channel: ChannelName,
        event: &str,
        payload: OutgoingPayload,
        filter: DeliveryFilter,
    ) -> EngineResult<()> {
        backend(
            "broker.publish",
            self.backends.broker.publish(Outgoing {
                channel,
                event: event.into(),
                payload,
                persist: None,
                filter,
                unread: None,
                dedupe: None,
                push: None,
            }),
        )
        .await?;
        Ok(())
    }

    /// [`Engine::emit`] of an `event` frame the engine makes: `data`, a fresh id, from `from`.
    pub(crate) async fn emit_event(
        &self,
        channel: ChannelName,
        event: &str,
        data: &impl Serialize,
        from: Option<Arc<str>>,
    ) -> EngineResult<()> {
        let id = new_event_id();
        let data = event_data(data);
        let body = EventBody {
            id: &id,
            event,
            data: &data,
            from: from.as_deref(),
            ts: now_ms(),
        }
        .encode();
        self.emit(
            channel,
            event,
            OutgoingPayload::EventBody(body),
            DeliveryFilter::default(),
        )
        .await
    }

    /// Closes every session of `user`: here at once, on other nodes through a control frame on
    /// `user:{user}` that clients never see ([`super::Session::check`] acts on it).
    pub async fn disconnect_user(&self, user: &str) -> EngineResult<Disconnected> {
        check_id("user", user)?;
        let sessions = self.hub.user_sessions(user);
        for s in &sessions {
            s.close(CloseReason::Kicked);
        }
        let frame = Bytes::from_static(b"{\"type\":\"kick\"}");
        self.emit(
            ChannelName::of(Kind::User, user),
            KICK_EVENT,
            OutgoingPayload::Frame(frame),
            DeliveryFilter::default(),
        )
        .await?;
        Ok(Disconnected {
            user: user.to_string(),
            closed: sessions.len(),
        })
    }
}
