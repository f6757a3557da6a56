//! Memory presence: per-user sessions with expiry, status, last_seen, and room presence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::Memory;
use crate::backend::{BackendResult, Presence, SweepResult};
use crate::device::DeviceState;
use crate::event::now_ms;
use crate::presence::{DevicePresence, SessionInfo, Status, UserPresence};
use crate::primitives::lock;

/// How long an offline user's last_seen and status are kept.
const FORGET_AFTER_MS: i64 = 7 * 86_400 * 1000;

#[derive(Default)]
pub(super) struct PresenceState {
    users: HashMap<Arc<str>, UserEntry>,
    /// room -> user -> session -> expiry
    rooms: HashMap<String, HashMap<String, HashMap<String, Instant>>>,
}

struct UserEntry {
    sessions: Sessions,
    /// Reported online and not yet reported offline (Redis: member of the online set). Whoever
    /// clears it reports the user offline, so "offline" is reported exactly once.
    online: bool,
    status: Status,
    text: Option<String>,
    last_seen: Option<i64>,
}

/// A user's sessions with their expiry. A short list rather than a map: users have a handful of
/// sessions (capped per user), and a map's smallest table costs ~0.5 KB per connected user.
#[derive(Default)]
struct Sessions(Vec<(SessionInfo, Instant)>);

impl Sessions {
    fn insert(&mut self, info: SessionInfo, exp: Instant) {
        match self.0.iter_mut().find(|(i, _)| i.session == info.session) {
            Some(s) => *s = (info, exp),
            None => {
                crate::primitives::reserve_tight(&mut self.0);
                self.0.push((info, exp));
            }
        }
    }

    fn remove(&mut self, session: &str) -> Option<(SessionInfo, Instant)> {
        let at = self.0.iter().position(|(i, _)| &*i.session == session)?;
        Some(self.0.swap_remove(at))
    }

    fn get_mut(&mut self, session: &str) -> Option<&mut (SessionInfo, Instant)> {
        self.0.iter_mut().find(|(i, _)| &*i.session == session)
    }

    fn values(&self) -> impl Iterator<Item = &(SessionInfo, Instant)> {
        self.0.iter()
    }

    fn retain(&mut self, keep: impl FnMut(&(SessionInfo, Instant)) -> bool) {
        self.0.retain(keep);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

impl UserEntry {
    fn new() -> Self {
        UserEntry {
            sessions: Sessions::default(),
            online: false,
            status: Status::Online,
            text: None,
            last_seen: None,
        }
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = &SessionInfo> {
        self.sessions
            .values()
            .filter(move |(_, exp)| *exp > now)
            .map(|(info, _)| info)
    }

    fn view(&self, user: &str) -> UserPresence {
        let devices = DevicePresence::of_sessions(self.live(Instant::now()));
        let online = !devices.is_empty();
        UserPresence {
            user: user.to_string(),
            online,
            status: self.status,
            text: self.text.clone(),
            devices,
            last_seen: if online {
                Some(now_ms())
            } else {
                self.last_seen
            },
        }
    }
}

fn offline(user: &str) -> UserPresence {
    UserPresence {
        user: user.to_string(),
        online: false,
        status: Status::Online,
        text: None,
        devices: Vec::new(),
        last_seen: None,
    }
}

impl Memory {
    /// A user's live sessions, by session id ([`crate::backend::Nodes::sessions_of`]).
    pub(super) fn live_sessions(&self, user: &str) -> Vec<SessionInfo> {
        let p = lock(&self.presence);
        let mut out: Vec<SessionInfo> = p
            .users
            .get(user)
            .map(|e| e.live(Instant::now()).cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.session.cmp(&b.session));
        out
    }
}

#[async_trait]
impl Presence for Memory {
    async fn connect(&self, info: &SessionInfo, ttl: Duration) -> BackendResult<bool> {
        let mut p = lock(&self.presence);
        let e = p
            .users
            .entry(info.user.clone())
            .or_insert_with(UserEntry::new);
        // Sessions past their TTL do not count, as in Redis.
        let now = Instant::now();
        e.sessions.retain(|(_, exp)| *exp > now);
        let was_offline = e.sessions.is_empty();
        e.sessions.insert(info.clone(), now + ttl);
        e.online = true;
        Ok(was_offline)
    }

    async fn disconnect(&self, user: &str, session: &str) -> BackendResult<Option<i64>> {
        let mut p = lock(&self.presence);
        let Some(e) = p.users.get_mut(user) else {
            return Ok(None);
        };
        let now = Instant::now();
        let removed_live = e.sessions.remove(session).is_some_and(|(_, exp)| exp > now);
        if removed_live && e.online && e.live(now).next().is_none() {
            e.sessions.clear();
            e.online = false;
            let ms = now_ms();
            e.last_seen = Some(ms);
            return Ok(Some(ms));
        }
        Ok(None)
    }

    async fn heartbeat(
        &self,
        sessions: &[(Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<Vec<usize>> {
        let mut p = lock(&self.presence);
        let now = Instant::now();
        let expiry = now + ttl;
        let mut missing = Vec::new();
        for (i, (user, session)) in sessions.iter().enumerate() {
            match p
                .users
                .get_mut(user)
                .and_then(|e| e.sessions.get_mut(session))
            {
                Some(s) if s.1 > now => s.1 = expiry,
                _ => missing.push(i),
            }
        }
        // Room presence entries of these sessions are refreshed too, while live.
        let wanted: std::collections::HashSet<&str> = sessions.iter().map(|(_, s)| &**s).collect();
        for users in p.rooms.values_mut() {
            for sess in users.values_mut() {
                for (s, exp) in sess.iter_mut() {
                    if *exp > now && wanted.contains(s.as_str()) {
                        *exp = expiry;
                    }
                }
            }
        }
        Ok(missing)
    }

    async fn set_state(&self, user: &str, session: &str, state: DeviceState) -> BackendResult<()> {
        let mut p = lock(&self.presence);
        if let Some(e) = p.users.get_mut(user)
            && let Some(s) = e.sessions.get_mut(session)
        {
            s.0.state = state;
        }
        Ok(())
    }

    async fn set_status(
        &self,
        user: &str,
        status: Status,
        text: Option<String>,
    ) -> BackendResult<()> {
        let mut p = lock(&self.presence);
        let e = p.users.entry(user.into()).or_insert_with(UserEntry::new);
        e.status = status;
        e.text = text;
        Ok(())
    }

    async fn get(&self, users: &[String]) -> BackendResult<Vec<UserPresence>> {
        let p = lock(&self.presence);
        Ok(users
            .iter()
            .map(|u| {
                p.users
                    .get(u.as_str())
                    .map_or_else(|| offline(u), |e| e.view(u))
            })
            .collect())
    }

    async fn sweep(&self) -> BackendResult<SweepResult> {
        let mut p = lock(&self.presence);
        let now = Instant::now();
        let now_ms = now_ms();
        let mut out = SweepResult::default();
        p.users.retain(|user, e| {
            e.sessions.retain(|(_, exp)| *exp > now);
            if e.online && e.sessions.is_empty() {
                e.online = false;
                e.last_seen = Some(now_ms);
                out.offline.push((user.to_string(), now_ms));
            }
            // Forget long-gone users (bounded memory), like Redis' last_seen TTL.
            !(e.sessions.is_empty() && e.last_seen.is_none_or(|t| now_ms - t > FORGET_AFTER_MS))
                || e.status != Status::Online
                || e.text.is_some()
        });
        p.rooms.retain(|room, users| {
            users.retain(|user, sess| {
                sess.retain(|_, exp| *exp > now);
                if sess.is_empty() {
                    out.room_left.push((room.clone(), user.clone()));
                }
                !sess.is_empty()
            });
            !users.is_empty()
        });
        Ok(out)
    }

    async fn online_count(&self) -> BackendResult<u64> {
        let p = lock(&self.presence);
        let now = Instant::now();
        Ok(p.users
            .values()
            .filter(|e| e.live(now).next().is_some())
            .count() as u64)
    }

    async fn online_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> BackendResult<(Vec<String>, Option<String>)> {
        let p = lock(&self.presence);
        let now = Instant::now();
        let mut users: Vec<&str> = p
            .users
            .iter()
            .filter(|(u, e)| e.live(now).next().is_some() && cursor.is_none_or(|c| &***u > c))
            .map(|(u, _)| &**u)
            .collect();
        users.sort_unstable();
        let more = users.len() > limit;
        users.truncate(limit);
        let next = if more {
            users.last().map(|u| u.to_string())
        } else {
            None
        };
        Ok((users.into_iter().map(str::to_string).collect(), next))
    }

    async fn room_join(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let mut p = lock(&self.presence);
        let sess = p
            .rooms
            .entry(room.to_string())
            .or_default()
            .entry(user.to_string())
            .or_default();
        let now = Instant::now();
        sess.retain(|_, exp| *exp > now);
        let new = sess.is_empty();
        sess.insert(session.to_string(), Instant::now() + ttl);
        Ok(new)
    }

    async fn room_leave(&self, room: &str, user: &str, session: &str) -> BackendResult<bool> {
        let mut p = lock(&self.presence);
        let Some(users) = p.rooms.get_mut(room) else {
            return Ok(false);
        };
        let Some(sess) = users.get_mut(user) else {
            return Ok(false);
        };
        let now = Instant::now();
        let removed_live = sess.remove(session).is_some_and(|exp| exp > now);
        let gone = removed_live && !sess.values().any(|exp| *exp > now);
        if gone {
            sess.clear();
        }
        if sess.is_empty() {
            users.remove(user);
        }
        if users.is_empty() {
            p.rooms.remove(room);
        }
        Ok(gone)
    }

    async fn room_users(&self, room: &str) -> BackendResult<Vec<String>> {
        let p = lock(&self.presence);
        let now = Instant::now();
        let mut users: Vec<String> = p
            .rooms
            .get(room)
            .map(|u| {
                u.iter()
                    .filter(|(_, s)| s.values().any(|exp| *exp > now))
                    .map(|(u, _)| u.clone())
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        Ok(users)
    }
}
