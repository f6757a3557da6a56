//! Presence upkeep: one batched heartbeat per node per interval for every live local session, a sweep
//! that turns expired users offline (safe to run on every node), transport pings, closing sessions that
//! stopped heartbeating, and the `presence.changed` / `presence.update` frames.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::json;

use super::hub::{CloseReason, Outbound};
use super::{Engine, backend};
use crate::backend::{DeliveryFilter, Outgoing, OutgoingPayload};
use crate::channels::{ChannelName, Kind};
use crate::event::now_ms;

/// The background loop; ends at shutdown.
pub(crate) async fn run(engine: Engine) {
    let mut tick = tokio::time::interval(engine.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        engine.heartbeat_once().await;
        engine.sweep_once().await;
    }
}

impl Engine {
    /// Refreshes presence and focus for live local sessions, pings them, closes those silent for a
    /// TTL, and asks those the backend no longer has live to register again (a Redis that restarted
    /// without its data forgot them; they are connected here).
    pub(crate) async fn heartbeat_once(&self) {
        let now = now_ms();
        let ttl_ms = self.config.presence_ttl.as_millis() as i64;
        let grace_ms = self.config.heartbeat.as_millis() as i64;
        let mut live = Vec::new();
        let mut alive = Vec::new();
        let mut focus = Vec::new();
        for s in self.hub.sessions() {
            if let Some(at) = s.close_asked_at() {
                if now - at > grace_ms {
                    self.evict(&s).await;
                }
                continue;
            }
            if now - s.last_activity.load(Ordering::Relaxed) > ttl_ms {
                s.close(CloseReason::HeartbeatTimeout);
                continue;
            }
            alive.push((s.user.clone(), s.session.clone()));
            for room in s.focused() {
                focus.push((room, s.user.clone(), s.session.clone()));
            }
            // A queued ping; a full queue means a slow consumer anyway.
            s.send(Outbound::Ping);
            live.push(s);
        }
        if alive.is_empty() {
            return;
        }
        let ttl = self.config.presence_ttl;
        match backend(self.backends.presence.heartbeat(&alive, ttl)).await {
            Ok(missing) => {
                if !missing.is_empty() {
                    tracing::warn!(
                        sessions = missing.len(),
                        "Presence had lost live sessions of this node; restoring them."
                    );
                }
                for i in missing {
                    if let Some(s) = live.get(i) {
                        s.send(Outbound::Restore);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sessions = alive.len(), "Presence heartbeat failed.")
            }
        }
        if let Err(e) = backend(self.backends.store.refresh_focus(&focus, ttl)).await {
            tracing::warn!(error = %e, entries = focus.len(), "Focus refresh failed.");
        }
    }

    /// Forcibly removes a session whose task did not close it within a heartbeat of being asked (an
    /// SSE stream whose client stopped reading is never polled, so it cannot close itself). Its
    /// later cleanup finds nothing left to do.
    async fn evict(&self, s: &Arc<super::hub::SessionHandle>) {
        tracing::info!(conn = %s.session, user = %s.user, "Evicting a session that did not close in time.");
        for ch in self.hub.evict(s) {
            let _ = backend(self.backends.broker.unsubscribe(&ch)).await;
        }
        if let Ok(Some(_)) = backend(self.backends.presence.disconnect(&s.user, &s.session)).await {
            self.publish_presence(&s.user).await;
        }
    }

    /// Expires what is past its TTL (any node's sessions) and announces the changes.
    pub(crate) async fn sweep_once(&self) {
        match backend(self.backends.presence.sweep()).await {
            Ok(r) => {
                for (user, _) in r.offline {
                    self.publish_presence(&user).await;
                }
                for (room, user) in r.room_left {
                    self.publish_room_presence(&room, &user, "left").await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "Presence sweep failed."),
        }
    }

    /// Publishes `presence.changed` for `user` to `presence:{user}` (never stored). Failures are
    /// logged: presence frames are best-effort and coalesced by the next change.
    pub async fn publish_presence(&self, user: &str) {
        let Ok(ch) = ChannelName::try_of(Kind::Presence, user) else {
            return;
        };
        let p = match backend(self.backends.presence.get(&[user.to_string()])).await {
            Ok(mut v) if !v.is_empty() => v.remove(0),
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(user, error = %e, "Presence read failed.");
                return;
            }
        };
        let mut frame = serde_json::to_value(&p).expect("presence serialises");
        frame["type"] = json!("presence.changed");
        self.publish_frame(ch, "presence.changed", frame, DeliveryFilter::default())
            .await;
    }

    /// Publishes `presence.update {room, user, change}` to the room's subscribers (never stored).
    pub async fn publish_room_presence(&self, room: &str, user: &str, change: &str) {
        let Ok(ch) = ChannelName::try_of(Kind::Room, room) else {
            return;
        };
        let frame =
            json!({ "type": "presence.update", "room": room, "user": user, "change": change });
        // The user's own sessions know they joined or left: only the others are told.
        let filter = DeliveryFilter {
            except: vec![user.into()],
            audience: None,
        };
        self.publish_frame(ch, "presence.update", frame, filter)
            .await;
    }

    async fn publish_frame(
        &self,
        channel: ChannelName,
        event: &str,
        frame: serde_json::Value,
        filter: DeliveryFilter,
    ) {
        let out = Outgoing {
            channel,
            event: Arc::from(event),
            payload: OutgoingPayload::Frame(Bytes::from(frame.to_string())),
            persist: None,
            filter,
            unread: None,
            dedupe: None,
        };
        if let Err(e) = backend(self.backends.broker.publish(out)).await {
            tracing::warn!(error = %e, "Presence frame publish failed.");
        }
    }
}
