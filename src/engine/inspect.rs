//! What an operator looks up (the admin page): one user (presence per device, sessions on every
//! node, rooms and unread, push devices without their tokens) and one channel (position, recent
//! history, subscribers on this node). Read-only, built from the calls the API answers with.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::value::RawValue;

use super::limits::check_id;
use super::{Engine, EngineResult, backend};
use crate::channels::{ChannelName, Kind};
use crate::device::DeviceState;
use crate::event::{Epoch, Seq};
use crate::presence::UserPresence;

/// Events a channel lookup shows: the newest.
pub const RECENT_EVENTS: usize = 20;
/// Subscribers (and room members) a channel lookup lists; the rest are counted.
pub const LISTED: usize = 100;

/// One user as the admin page shows them.
#[derive(Debug, Serialize)]
pub struct UserOverview {
    /// The user.
    pub user: String,
    /// Presence: online, status, one entry per device, last seen.
    pub presence: UserPresence,
    /// Live sessions on every node (presence's record), and this node's sessions presence does not
    /// list (`in_presence: false`: the next heartbeat registers them again).
    pub sessions: Vec<SessionView>,
    /// The rooms they are a member of.
    pub rooms: Vec<String>,
    /// Rooms with something unread, and how much.
    pub unread: BTreeMap<String, u64>,
    /// The sum of `unread`.
    pub unread_total: u64,
    /// Registered push devices (no token or subscription).
    pub devices: Vec<DeviceView>,
}

/// One live session.
#[derive(Debug, Serialize)]
pub struct SessionView {
    /// Session id.
    pub session: String,
    /// Device id.
    pub device: String,
    /// Platform, when known.
    pub platform: Option<String>,
    /// App state.
    pub state: DeviceState,
    /// The node it is connected to.
    pub node: String,
    /// True when that is the node answering.
    pub here: bool,
    /// Whether presence lists it.
    pub in_presence: bool,
    /// Last inbound activity, unix ms (sessions here only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<i64>,
    /// Rooms it has focused (sessions here only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub focused: Vec<String>,
}

/// A push registration without its secret parts.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    /// Device id.
    pub device: String,
    /// Provider.
    pub provider: String,
    /// Platform, when given.
    pub platform: Option<String>,
}

/// One channel as the admin page shows it.
#[derive(Debug, Serialize)]
pub struct ChannelOverview {
    /// The channel.
    pub channel: ChannelName,
    /// Its kind (`user`, `room`, `active`, `presence`, `global`).
    pub kind: &'static str,
    /// Whether its kind keeps history (`epoch`, `seq` and `recent` are absent when not).
    pub persist: bool,
    /// Its epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Its last seq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    /// The newest stored events (at most [`RECENT_EVENTS`], oldest first), as their frames.
    pub recent: Vec<Box<RawValue>>,
    /// How many sessions on this node are subscribed.
    pub subscribers: usize,
    /// The first [`LISTED`] of them.
    pub subscriber_sessions: Vec<Subscriber>,
    /// For a room: its members (the first [`LISTED`]), how many in all, and who is present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomView>,
}

/// A local subscriber.
#[derive(Debug, Serialize)]
pub struct Subscriber {
    /// User.
    pub user: String,
    /// Device.
    pub device: String,
    /// Session id.
    pub session: String,
}

/// A room's membership and presence.
#[derive(Debug, Serialize)]
pub struct RoomView {
    /// Members in all.
    pub member_count: usize,
    /// The first [`LISTED`] members, sorted.
    pub members: Vec<String>,
    /// Users present (a live session subscribed to the room).
    pub present: Vec<String>,
}

impl Engine {
    /// A user's presence, sessions on every node, rooms, unread and devices. An unknown user is
    /// offline with empty lists; a malformed id is `bad_channel`.
    pub async fn user_overview(&self, user: &str) -> EngineResult<UserOverview> {
        check_id("user", user)?;
        let users = [user.to_string()];
        let presence = self
            .presence_of(&users)
            .await?
            .presence
            .remove(user)
            .unwrap_or_else(|| UserPresence {
                user: user.into(),
                online: false,
                status: Default::default(),
                text: None,
                devices: Vec::new(),
                last_seen: None,
            });
        let listed = backend("nodes.sessions_of", self.backends.nodes.sessions_of(user)).await?;
        let local = self.hub.user_sessions(user);
        let mut sessions: Vec<SessionView> = listed
            .iter()
            .map(|info| SessionView {
                session: info.session.to_string(),
                device: info.device.to_string(),
                platform: info.platform.as_deref().map(str::to_string),
                state: info.state,
                node: info.node.to_string(),
                here: info.node == self.node,
                in_presence: true,
                last_activity: None,
                focused: Vec::new(),
            })
            .collect();
        for s in &local {
            let view = match sessions.iter_mut().find(|v| *v.session == *s.session) {
                Some(v) => v,
                None => {
                    sessions.push(SessionView {
                        session: s.session.to_string(),
                        device: s.device.to_string(),
                        platform: s.platform.as_deref().map(str::to_string),
                        state: s.state(),
                        node: self.node.to_string(),
                        here: true,
                        in_presence: false,
                        last_activity: None,
                        focused: Vec::new(),
                    });
                    sessions.last_mut().expect("just pushed")
                }
            };
            view.last_activity = Some(s.last_activity.load(Ordering::Relaxed));
            view.focused = s.focused().into_iter().map(String::from).collect();
        }
        let rooms = backend(
            "membership.rooms_of",
            self.backends.membership.rooms_of(user),
        )
        .await?;
        let unread = self.unread(user).await?.unread;
        let devices = self
            .devices(user)
            .await?
            .devices
            .into_iter()
            .map(|d| DeviceView {
                device: d.device,
                provider: d.provider,
                platform: d.platform,
            })
            .collect();
        Ok(UserOverview {
            user: user.into(),
            presence,
            sessions,
            rooms,
            unread_total: unread.values().sum(),
            unread,
            devices,
        })
    }

    /// A channel's position and newest events (kinds that keep history), its subscribers on this
    /// node and, for a room, its members and who is present.
    pub async fn channel_overview(&self, ch: &ChannelName) -> EngineResult<ChannelOverview> {
        let kinds = self.kinds();
        let persist = kinds.of(ch).persist;
        let (epoch, seq, recent) = if persist {
            let position = backend("history.position", self.backends.history.position(ch)).await?;
            let after = position.seq.saturating_sub(RECENT_EVENTS as Seq);
            let page = self.history(ch, after, None, Some(RECENT_EVENTS)).await?;
            (Some(page.epoch), Some(page.seq), page.events)
        } else {
            (None, None, Vec::new())
        };
        let subs = self.hub.subscribers(ch);
        let subscriber_sessions = subs
            .iter()
            .take(LISTED)
            .map(|s| Subscriber {
                user: s.user.to_string(),
                device: s.device.to_string(),
                session: s.session.to_string(),
            })
            .collect();
        let room = if ch.kind() == Kind::Room {
            let mut members = self.members(ch.id()).await?.members;
            let member_count = members.len();
            members.truncate(LISTED);
            let present = self.room_presence(ch.id()).await?.users;
            Some(RoomView {
                member_count,
                members,
                present,
            })
        } else {
            None
        };
        Ok(ChannelOverview {
            channel: ch.clone(),
            kind: ch.kind().as_str(),
            persist,
            epoch,
            seq,
            recent,
            subscribers: subs.len(),
            subscriber_sessions,
            room,
        })
    }
}
