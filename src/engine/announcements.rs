//! Announcements (seed 004) and the login sync of the `connected` frame: an announcement is stored
//! for the sync and published live on `global` to those it is for; each user has one cursor, shared
//! by their devices, so each sees each announcement once.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::control::event_data;
use super::pipeline::Receipt;
use super::{Engine, EngineResult, backend};
use crate::announcement::Announcement;
use crate::backend::{DeliveryFilter, HistoryLimits, Outgoing, OutgoingPayload, audience_admits};
use crate::channels::ChannelName;
use crate::event::{EventBody, now_ms};

/// The login sync of the `connected` frame.
#[derive(Debug, Serialize)]
pub struct LoginSync {
    /// Unread counts of the user's rooms that have any.
    pub unread: BTreeMap<String, u64>,
    /// The announcements the user has not seen that are for them, as `event` objects.
    pub announcements: Vec<Value>,
}

/// The reply to creating an announcement.
#[derive(Debug, Serialize)]
pub struct AnnouncementCreated {
    /// What was stored.
    pub announcement: Announcement,
    /// The live event's id (the announcement's).
    pub id: String,
    /// Where it went live.
    pub deliveries: Vec<Receipt>,
}

/// The unexpired announcements.
#[derive(Debug, Serialize)]
pub struct Announcements {
    /// Oldest first.
    pub announcements: Vec<Announcement>,
}

impl Engine {
    /// Unread per room and the announcements this user has not seen (the per-user cursor moves past
    /// them) that their attrs admit.
    pub async fn login_sync(
        &self,
        user: &str,
        attrs: &Map<String, Value>,
    ) -> EngineResult<LoginSync> {
        // Two independent reads, one round trip's wait for both.
        let (unread, all) = tokio::try_join!(
            self.unread(user),
            backend(
                "announcements.announcements",
                self.backends.announcements.announcements(now_ms()),
            )
        )?;
        let unread = unread.unread;
        let mut announcements = Vec::new();
        if let Some(newest) = all.last() {
            let cursor = backend(
                "announcements.swap_announcement_cursor",
                self.backends
                    .announcements
                    .swap_announcement_cursor(user, &newest.id),
            )
            .await?;
            for a in &all {
                if cursor.as_deref().is_some_and(|c| a.id.as_str() <= c)
                    || !self.admits_announcement(a, user, attrs)
                {
                    continue;
                }
                announcements.push(a.event());
            }
        }
        Ok(LoginSync {
            unread,
            announcements,
        })
    }

    /// Creates an announcement: stored for login sync and published live on `global` to those its
    /// audience admits.
    pub async fn create_announcement(&self, a: Announcement) -> EngineResult<AnnouncementCreated> {
        backend(
            "announcements.add_announcement",
            self.backends.announcements.add_announcement(&a),
        )
        .await?;
        let ch = ChannelName::global();
        let kinds = self.kinds();
        let kind = kinds.of(&ch);
        let data = event_data(&a.data());
        // The live event carries the announcement's id, as the login sync does.
        let body = EventBody {
            id: &a.id,
            event: "announcement",
            data: &data,
            from: None,
            ts: a.ts,
        }
        .encode();
        let pos = backend(
            "broker.publish",
            self.backends.broker.publish(Outgoing {
                channel: ch.clone(),
                event: "announcement".into(),
                payload: OutgoingPayload::EventBody(body),
                persist: kind.persist.then_some(HistoryLimits {
                    size: kind.history_size,
                    age: kind.history_age,
                }),
                filter: DeliveryFilter {
                    except: Vec::new(),
                    // With `announce` rules each session asks them (Session::check); without, the hub
                    // filters by audience.
                    audience: (!a.audience.is_empty() && !self.rules.current().has_announce())
                        .then(|| Arc::new(a.audience.clone())),
                    devices: Default::default(),
                },
                unread: None,
                dedupe: None,
                push: None,
            }),
        )
        .await?;
        Ok(AnnouncementCreated {
            id: a.id.clone(),
            deliveries: vec![Receipt::new(&ch, pos)],
            announcement: a,
        })
    }

    /// Whether `user` is shown announcement `a`: the `announce` rules decide; without one, the
    /// audience (every key equal to the user's attr).
    pub fn admits_announcement(
        &self,
        a: &Announcement,
        user: &str,
        attrs: &Map<String, Value>,
    ) -> bool {
        self.rules
            .current()
            .announce(&a.data(), user, attrs)
            .unwrap_or_else(|| audience_admits(&a.audience, attrs))
    }

    /// The unexpired announcements.
    pub async fn announcements(&self) -> EngineResult<Announcements> {
        let announcements = backend(
            "announcements.announcements",
            self.backends.announcements.announcements(now_ms()),
        )
        .await?;
        Ok(Announcements { announcements })
    }
}
