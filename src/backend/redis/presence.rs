//! Redis [`Presence`]: who is connected, on which devices, with which status, and who is present in
//! which room, shared by every node. Every time is unix ms of the Redis clock (`TIME` inside the Lua
//! scripts), never a node's clock.
//!
//! What it owns (names from [`super::Keys`]):
//! - per user: a sorted set of session ids scored by expiry (`user_sessions`), a hash of the same ids
//!   -> [`SessionInfo`] JSON (`user_devices`), and a status hash {status, text, last_seen}
//!   (`user_status`);
//! - one global sorted set user -> latest session expiry (`online`): a user with a live session is
//!   always in it, the sweeper reads it instead of scanning, and **whoever removes a user from it
//!   reports them offline**, which makes "offline" exactly-once across nodes;
//! - room presence: per room, user -> latest entry expiry (`room_present`); per room and user,
//!   session -> expiry (`room_user_sessions`); per session, its rooms (`user_session_rooms`, so a
//!   heartbeat refreshes them); and one global sorted set room -> its earliest user's expiry
//!   (`rooms_present`), which the sweeper reads.
//!
//! Guarantees (the [`Presence`] contract): `connect`, `disconnect`, `room_join`, `room_leave`, each
//! sweep step and each heartbeat chunk is one Lua script, so it is atomic. Expired sessions and room
//! entries never count as live, even before a sweep removes them. `connect` drops the user's expired
//! sessions first and returns true for exactly one of any set of concurrent first sessions; the last
//! live session going (`disconnect`) or expiring (`sweep`, safe to run on every node at once) reports
//! the user offline exactly once; the same holds per room and user for room presence. Heartbeats only
//! extend what is still live (never revive an expired session or entry).
//!
//! No leaks under `noeviction`: sorted sets and hashes vanish when emptied; per-user, per-room and
//! per-session keys expire [`KEY_GRACE_MS`] after their latest entry, rounded up to the hour (so a
//! heartbeat moves scores, not key expiries: `presence_lib.lua`); the status hash is kept while
//! online and [`FORGET_AFTER_MS`] after going offline; the two global sorted sets lose their members
//! when the sweeper handles them.
//!
//! One Redis, not Cluster: scripts touch a user's keys and the global sorted sets together, and the
//! heartbeat and room sweep build room keys inside the script (from the pieces of their names that
//! `keys.rs` gives, see [`pieces`]). Cluster would split these steps per slot and make them idempotent.
//!
//! Pipelines of script calls ([`eval_pipeline`]) send `EVALSHA` only; a script Redis does not know
//! (after a restart or `SCRIPT FLUSH`) is loaded then, and only the calls that failed are sent again.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{FromRedisValue, Script, Value};

use super::{MARK, RedisBackend, err, eval_pipeline, pieces};
use crate::backend::{BackendError, BackendResult, Presence, SweepResult};
use crate::device::DeviceState;
use crate::presence::{DevicePresence, SessionInfo, Status, UserPresence};

/// How long an offline user's status and last_seen are kept (as memory does).
const FORGET_AFTER_MS: i64 = 7 * 86_400 * 1000;
/// Per-user and per-room keys expire this long after their latest entry: a safety net; the sweeper
/// removes what expired long before.
const KEY_GRACE_MS: i64 = 86_400 * 1000;
/// Most users and rooms one sweep looks at (the next sweep continues).
const SWEEP_BATCH: usize = 1000;
/// Sessions per heartbeat script call, so one call never holds Redis for long; all chunks go in one
/// pipeline.
const HEARTBEAT_CHUNK: usize = 256;
/// TTLs are capped (ten years) so `now + ttl` stays exact in Lua's doubles.
const MAX_TTL_MS: i64 = 10 * 365 * 86_400 * 1000;

struct Scripts {
    connect: Script,
    disconnect: Script,
    heartbeat: Script,
    set_state: Script,
    set_status: Script,
    get: Script,
    live: Script,
    due: Script,
    sweep_user: Script,
    sweep_room: Script,
    room_join: Script,
    room_leave: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    connect: lua!("presence_lib.lua", "presence_connect.lua"),
    disconnect: lua!("presence_lib.lua", "presence_disconnect.lua"),
    heartbeat: lua!("presence_lib.lua", "presence_heartbeat.lua"),
    set_state: lua!("presence_lib.lua", "presence_set_state.lua"),
    set_status: lua!("presence_lib.lua", "presence_set_status.lua"),
    get: lua!("presence_lib.lua", "presence_get.lua"),
    live: lua!("presence_lib.lua", "presence_live.lua"),
    due: lua!("presence_lib.lua", "presence_due.lua"),
    sweep_user: lua!("presence_lib.lua", "presence_sweep_user.lua"),
    sweep_room: lua!("presence_lib.lua", "presence_sweep_room.lua"),
    room_join: lua!("presence_lib.lua", "presence_room_join.lua"),
    room_leave: lua!("presence_lib.lua", "presence_room_leave.lua"),
});

/// A duration in ms, capped at [`MAX_TTL_MS`].
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).map_or(MAX_TTL_MS, |m| m.min(MAX_TTL_MS))
}

fn bad(what: &str) -> BackendError {
    BackendError::Internal(format!("presence: unexpected reply from {what}"))
}

fn parse<T: FromRedisValue>(v: Value, what: &str) -> BackendResult<T> {
    redis::from_redis_value(v).map_err(|_| bad(what))
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Online => "online",
        Status::Away => "away",
        Status::Busy => "busy",
        Status::Dnd => "dnd",
    }
}

fn parse_status(s: &str) -> Status {
    match s {
        "away" => Status::Away,
        "busy" => Status::Busy,
        "dnd" => Status::Dnd,
        _ => Status::Online,
    }
}

fn state_str(s: DeviceState) -> &'static str {
    match s {
        DeviceState::Foreground => "foreground",
        DeviceState::Background => "background",
    }
}

/// Builds a user's presence from `presence_get.lua`'s reply, as memory's view does: one entry per
/// device (foreground when any of its sessions is), last_seen = now while online.
fn view(user: &str, reply: Value) -> BackendResult<UserPresence> {
    const WHAT: &str = "presence_get.lua";
    let mut it = parse::<Vec<Value>>(reply, WHAT)?.into_iter();
    let mut next = || it.next().ok_or_else(|| bad(WHAT));
    let now: i64 = parse(next()?, WHAT)?;
    let status: Option<String> = parse(next()?, WHAT)?;
    let text: Option<String> = parse(next()?, WHAT)?;
    let last_seen: Option<i64> = parse(next()?, WHAT)?;
    let mut sessions = Vec::new();
    for raw in it {
        let raw: Vec<u8> = parse(raw, WHAT)?;
        match serde_json::from_slice::<SessionInfo>(&raw) {
            Ok(info) => sessions.push(info),
            Err(e) => {
                tracing::warn!(user, error = %e, "Unreadable session details in Redis; skipped.");
            }
        }
    }
    let online = !sessions.is_empty();
    Ok(UserPresence {
        user: user.to_string(),
        online,
        status: status.as_deref().map_or(Status::Online, parse_status),
        text,
        devices: DevicePresence::of_sessions(&sessions),
        last_seen: if online { Some(now) } else { last_seen },
    })
}

impl RedisBackend {
    /// Live members of a sorted set scored by expiry.
    async fn live_members(&self, key: String) -> BackendResult<Vec<String>> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .live
            .key(key)
            .arg("members")
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }
}

impl RedisBackend {
    /// A user's live sessions ([`crate::backend::Nodes::sessions_of`]): the session details
    /// `presence_get.lua` reads for [`Presence::get`].
    pub(super) async fn live_sessions(&self, user: &str) -> BackendResult<Vec<SessionInfo>> {
        const WHAT: &str = "presence_get.lua";
        let mut con = self.cmd.clone();
        let reply: Vec<Value> = SCRIPTS
            .get
            .key(self.keys.user_sessions(user))
            .key(self.keys.user_devices(user))
            .key(self.keys.user_status(user))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let mut sessions = Vec::new();
        // After `now`, status, text and last_seen: one session's details each.
        for raw in reply.into_iter().skip(4) {
            let raw: Vec<u8> = parse(raw, WHAT)?;
            match serde_json::from_slice::<SessionInfo>(&raw) {
                Ok(info) => sessions.push(info),
                Err(e) => {
                    tracing::warn!(user, error = %e, "Unreadable session details in Redis; skipped.");
                }
            }
        }
        Ok(sessions)
    }
}

impl RedisBackend {
    /// The keys `presence_room_join.lua` and `presence_room_leave.lua` take, in their KEYS order.
    fn room_keys(&self, room: &str, user: &str, session: &str) -> [String; 4] {
        [
            self.keys.room_present(room),
            self.keys.room_user_sessions(room, user),
            self.keys.rooms_present(),
            self.keys.user_session_rooms(user, session),
        ]
    }
}

#[async_trait]
impl Presence for RedisBackend {
    async fn connect(&self, info: &SessionInfo, ttl: Duration) -> BackendResult<bool> {
        let details = serde_json::to_string(info)
            .map_err(|e| BackendError::Internal(format!("presence: session details: {e}")))?;
        let user = &*info.user;
        let mut con = self.cmd.clone();
        let first: i64 = SCRIPTS
            .connect
            .key(self.keys.user_sessions(user))
            .key(self.keys.user_devices(user))
            .key(self.keys.user_status(user))
            .key(self.keys.online())
            .arg(user)
            .arg(&*info.session)
            .arg(details)
            .arg(ms(ttl))
            .arg(KEY_GRACE_MS)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(first == 1)
    }

    async fn disconnect(&self, user: &str, session: &str) -> BackendResult<Option<i64>> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .disconnect
            .key(self.keys.user_sessions(user))
            .key(self.keys.user_devices(user))
            .key(self.keys.user_status(user))
            .key(self.keys.online())
            .arg(user)
            .arg(session)
            .arg(KEY_GRACE_MS)
            .arg(FORGET_AFTER_MS)
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }

    async fn heartbeat(
        &self,
        sessions: &[(Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<Vec<usize>> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let present = pieces(self.keys.room_present(MARK), 1)?;
        let entries = pieces(self.keys.room_user_sessions(MARK, MARK), 2)?;
        let mut calls = Vec::with_capacity(sessions.len().div_ceil(HEARTBEAT_CHUNK));
        for chunk in sessions.chunks(HEARTBEAT_CHUNK) {
            let mut inv = SCRIPTS.heartbeat.prepare_invoke();
            inv.key(self.keys.online())
                .key(self.keys.rooms_present())
                .arg(ms(ttl))
                .arg(KEY_GRACE_MS)
                .arg(&present)
                .arg(&entries);
            for (user, session) in chunk {
                inv.key(self.keys.user_sessions(user))
                    .key(self.keys.user_devices(user))
                    .key(self.keys.user_session_rooms(user, session))
                    .arg(&**user)
                    .arg(&**session);
            }
            calls.push((&SCRIPTS.heartbeat, inv));
        }
        let mut con = self.cmd.clone();
        let replies = eval_pipeline(&mut con, &calls).await?;
        let mut missing = Vec::new();
        for (c, reply) in replies.into_iter().enumerate() {
            let at: Vec<usize> = parse(reply, "presence_heartbeat.lua")?;
            missing.extend(at.into_iter().map(|i| c * HEARTBEAT_CHUNK + i));
        }
        Ok(missing)
    }

    async fn set_state(&self, user: &str, session: &str, state: DeviceState) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .set_state
            .key(self.keys.user_sessions(user))
            .key(self.keys.user_devices(user))
            .arg(session)
            .arg(state_str(state))
            .invoke_async::<()>(&mut con)
            .await
            .map_err(err)
    }

    async fn set_status(
        &self,
        user: &str,
        status: Status,
        text: Option<String>,
    ) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .set_status
            .key(self.keys.user_status(user))
            .key(self.keys.user_sessions(user))
            .arg(status_str(status))
            .arg(if text.is_some() { "1" } else { "0" })
            .arg(text.as_deref().unwrap_or(""))
            .arg(FORGET_AFTER_MS)
            .invoke_async::<()>(&mut con)
            .await
            .map_err(err)
    }

    async fn get(&self, users: &[String]) -> BackendResult<Vec<UserPresence>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let calls: Vec<_> = users
            .iter()
            .map(|user| {
                let mut inv = SCRIPTS.get.key(self.keys.user_sessions(user));
                inv.key(self.keys.user_devices(user))
                    .key(self.keys.user_status(user));
                (&SCRIPTS.get, inv)
            })
            .collect();
        let mut con = self.cmd.clone();
        let replies = eval_pipeline(&mut con, &calls).await?;
        if replies.len() != users.len() {
            return Err(bad("presence_get.lua"));
        }
        users
            .iter()
            .zip(replies)
            .map(|(user, reply)| view(user, reply))
            .collect()
    }

    async fn sweep(&self) -> BackendResult<SweepResult> {
        let mut con = self.cmd.clone();
        let (users, rooms): (Vec<String>, Vec<String>) = SCRIPTS
            .due
            .key(self.keys.online())
            .key(self.keys.rooms_present())
            .arg(SWEEP_BATCH)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let mut out = SweepResult::default();
        if users.is_empty() && rooms.is_empty() {
            return Ok(out);
        }
        let entries = pieces(self.keys.room_user_sessions(MARK, MARK), 2)?;
        let mut calls = Vec::with_capacity(users.len() + rooms.len());
        for user in &users {
            let mut inv = SCRIPTS.sweep_user.key(self.keys.user_sessions(user));
            inv.key(self.keys.user_devices(user))
                .key(self.keys.user_status(user))
                .key(self.keys.online())
                .arg(user)
                .arg(KEY_GRACE_MS)
                .arg(FORGET_AFTER_MS);
            calls.push((&SCRIPTS.sweep_user, inv));
        }
        for room in &rooms {
            let mut inv = SCRIPTS.sweep_room.key(self.keys.room_present(room));
            inv.key(self.keys.rooms_present())
                .arg(room)
                .arg(&entries)
                .arg(KEY_GRACE_MS)
                .arg(SWEEP_BATCH);
            calls.push((&SCRIPTS.sweep_room, inv));
        }
        let replies = eval_pipeline(&mut con, &calls).await?;
        if replies.len() != users.len() + rooms.len() {
            return Err(bad("the sweep pipeline"));
        }
        let mut replies = replies.into_iter();
        for (user, reply) in users.into_iter().zip(replies.by_ref()) {
            if let Some(last_seen) = parse::<Option<i64>>(reply, "presence_sweep_user.lua")? {
                out.offline.push((user, last_seen));
            }
        }
        for (room, reply) in rooms.into_iter().zip(replies) {
            for user in parse::<Vec<String>>(reply, "presence_sweep_room.lua")? {
                out.room_left.push((room.clone(), user));
            }
        }
        Ok(out)
    }

    async fn online_count(&self) -> BackendResult<u64> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .live
            .key(self.keys.online())
            .arg("count")
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }

    /// Reads every online user id and pages in Rust: the online set is scored by expiry, so it
    /// cannot be ranged by id. One page costs O(online users); fine up to a few hundred thousand
    /// users (an admin listing, not a hot path). Past that, keep a second, lex-ordered set.
    async fn online_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> BackendResult<(Vec<String>, Option<String>)> {
        let mut users = self.live_members(self.keys.online()).await?;
        users.retain(|u| cursor.is_none_or(|c| u.as_str() > c));
        users.sort_unstable();
        let more = users.len() > limit;
        users.truncate(limit);
        let next = if more { users.last().cloned() } else { None };
        Ok((users, next))
    }

    async fn room_join(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        let first: i64 = SCRIPTS
            .room_join
            .key(&self.room_keys(room, user, session)[..])
            .arg(room)
            .arg(user)
            .arg(session)
            .arg(ms(ttl))
            .arg(KEY_GRACE_MS)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(first == 1)
    }

    async fn room_leave(&self, room: &str, user: &str, session: &str) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        let last: i64 = SCRIPTS
            .room_leave
            .key(&self.room_keys(room, user, session)[..])
            .arg(room)
            .arg(user)
            .arg(session)
            .arg(KEY_GRACE_MS)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(last == 1)
    }

    async fn room_users(&self, room: &str) -> BackendResult<Vec<String>> {
        let mut users = self.live_members(self.keys.room_present(room)).await?;
        users.sort_unstable();
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::redis::Keys;

    #[test]
    fn pieces_rebuild_the_key_names() {
        let keys = Keys::new("h:");
        let p = pieces(keys.room_present(MARK), 1).expect("pieces");
        assert_eq!(format!("{}r1{}", p[0], p[1]), keys.room_present("r1"));
        let p = pieces(keys.room_user_sessions(MARK, MARK), 2).expect("pieces");
        assert_eq!(
            format!("{}r1{}ann{}", p[0], p[1], p[2]),
            keys.room_user_sessions("r1", "ann")
        );
    }

    #[test]
    fn ttls_are_capped() {
        assert_eq!(ms(Duration::from_millis(250)), 250);
        assert_eq!(ms(Duration::MAX), MAX_TTL_MS);
    }
}
