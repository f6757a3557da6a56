//! The Redis backend's [`Membership`] (with its reverse index), [`Contacts`], [`Idempotency`],
//! [`Unread`] (with focus), [`Devices`] and [`Announcements`], as Redis keys named by
//! [`super::Keys`].
//!
//! What it owns and how each call stays atomic:
//! - **Membership**: a set of members per room and a set of rooms per user, written together in one
//!   `MULTI` (leaving a room also drops the user's read pointer for it). Contacts: one set per user,
//!   replaced by `DEL` + `SADD` in one `MULTI`.
//! - **Idempotency**: one hash per key (`lua/store_idem_begin.lua` documents its fields): claiming
//!   takes a lapsed lease over or reports the key's state in one script; the publish step records
//!   each channel stored under the key with the append (`lua/publish.lua`); completing stores the
//!   reply; releasing ends the lease (`lua/store_idem_release.lua`). Redis expiry ends the record.
//! - **Unread**: a sorted set of countable seqs per room (score = member = seq), trimmed to the newest
//!   `keep` and given an idle expiry (`lua/store_mark_countable.lua`); one hash of read pointers per
//!   user, moved forward only (`lua/store_set_read.lua`). Counting is `ZCOUNT (pointer +inf` per room:
//!   pipelines of single-key commands (rooms and users hash to different Cluster slots). These
//!   scripts and the publish step (`lua/publish.lua`, which does the same bookkeeping for a countable
//!   room event in the append's round trip) share their Lua in `lua/unread_lib.lua`.
//! - **Focus**: a sorted set of `user|session` per room, scored by expiry in unix ms of the Redis clock
//!   (`TIME` inside `lua/store_focus_*.lua`), pruned on every write and read; the key expires a little
//!   after its longest-lived entry, so a crashed node never leaves anyone focused.
//! - **Push devices**: a hash per user, device id -> [`PushDevice`] JSON.
//! - **Announcements**: one hash, id -> [`Announcement`] JSON, pruned of expired entries and bounded
//!   (`MAX_ANNOUNCEMENTS`, smallest ids first) on every add (`lua/store_announce_add.lua`); a cursor
//!   per user that only moves to greater ids (`lua/store_announce_cursor.lua`).
//!
//! Errors: connection trouble is [`BackendError::Unavailable`]; a reply of an unexpected shape is
//! [`BackendError::Internal`]. Nothing here unwraps a Redis reply.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{FromRedisValue, Script, Value};

use super::{RedisBackend, err, eval_pipeline};
use crate::announcement::Announcement;
use crate::backend::{
    Announcements, BackendError, BackendResult, Contacts, Devices, Idempotency, KeyState,
    Membership, Unread,
};
use crate::device::PushDevice;
use crate::event::Seq;

/// Idle expiry of a room's countable seqs, refreshed on every write (here and in the publish step).
pub(super) const COUNTABLE_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Idle expiry of a user's announcement cursor, refreshed on every swap.
const CURSOR_TTL: Duration = Duration::from_secs(90 * 86_400);
/// How long a focus key outlives its longest-lived entry.
const FOCUS_SLACK: Duration = Duration::from_secs(5);
/// Most announcements kept (the smallest, i.e. oldest, ids go first).
const MAX_ANNOUNCEMENTS: usize = 1000;
/// Rounds of `unread` re-reading pointers that moved while counting.
const UNREAD_ATTEMPTS: usize = 3;

static IDEM_BEGIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/store_idem_begin.lua")));
static IDEM_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/store_idem_release.lua")));
static MARK_COUNTABLE: LazyLock<Script> =
    LazyLock::new(|| lua!("unread_lib.lua", "store_mark_countable.lua"));
static SET_READ: LazyLock<Script> = LazyLock::new(|| lua!("unread_lib.lua", "store_set_read.lua"));
static FOCUS_SET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/store_focus_set.lua")));
static FOCUS_LIST: LazyLock<Script> =
    LazyLock::new(|| lua!("unread_lib.lua", "store_focus_list.lua"));
static ANNOUNCE_ADD: LazyLock<Script> =
    LazyLock::new(|| lua!("announce_lib.lua", "store_announce_add.lua"));
static ANNOUNCE_CURSOR: LazyLock<Script> =
    LazyLock::new(|| lua!("announce_lib.lua", "store_announce_cursor.lua"));

/// A duration in whole milliseconds, at least 1 (Redis refuses `PX 0`).
fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, i64::MAX as u128) as u64
}

/// How many countable seqs a room keeps: at least 1, and within what a Lua number holds exactly.
pub(super) fn countable_keep(keep: usize) -> u64 {
    keep.clamp(1, 1 << 52) as u64
}

/// Converts one reply value, mapping a shape mismatch to `Internal`.
fn parse<T: FromRedisValue>(v: Value, what: &str) -> BackendResult<T> {
    redis::from_redis_value(v)
        .map_err(|e| BackendError::Internal(format!("unexpected Redis reply for {what}: {e}")))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Focus entries are `user|session`; user ids never contain `|` (`channels::valid_id`).
fn focus_member(user: &str, session: &str) -> String {
    format!("{user}|{session}")
}

fn json<T: serde::Serialize>(v: &T, what: &str) -> BackendResult<String> {
    serde_json::to_string(v).map_err(|e| BackendError::Internal(format!("encode {what}: {e}")))
}

fn unjson<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> BackendResult<T> {
    serde_json::from_str(s)
        .map_err(|e| BackendError::Internal(format!("unreadable {what} in Redis: {e}")))
}

impl RedisBackend {
    /// One round of unread counting: a `ZCOUNT` per room after its pointer, then the pointers again
    /// (same pipeline, so read after the counts).
    async fn count_after(
        &self,
        user: &str,
        rooms: &[String],
        pointers: &[Option<Seq>],
    ) -> BackendResult<(Vec<u64>, Vec<Option<Seq>>)> {
        let mut con = self.cmd.clone();
        let mut p = redis::pipe();
        for (room, ptr) in rooms.iter().zip(pointers) {
            p.zcount(
                self.keys.room_countable(room),
                format!("({}", ptr.unwrap_or(0)),
                "+inf",
            );
        }
        p.cmd("HMGET").arg(self.keys.user_read(user)).arg(rooms);
        let mut replies: Vec<Value> = p.query_async(&mut con).await.map_err(err)?;
        if replies.len() != rooms.len() + 1 {
            return Err(BackendError::Internal(format!(
                "unexpected Redis reply for unread: {} replies for {} rooms",
                replies.len(),
                rooms.len()
            )));
        }
        let after = replies
            .pop()
            .map_or(Ok(Vec::new()), |v| parse(v, "HMGET"))?;
        let counts = replies
            .into_iter()
            .map(|v| parse(v, "ZCOUNT"))
            .collect::<BackendResult<Vec<u64>>>()?;
        Ok((counts, after))
    }
}

#[async_trait]
impl Membership for RedisBackend {
    async fn add_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        let (new, _): (u64, u64) = redis::pipe()
            .atomic()
            .sadd(self.keys.room_members(room), user)
            .sadd(self.keys.user_rooms(user), room)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(new == 1)
    }

    async fn remove_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        let (was, _, _): (u64, u64, u64) = redis::pipe()
            .atomic()
            .srem(self.keys.room_members(room), user)
            .srem(self.keys.user_rooms(user), room)
            .hdel(self.keys.user_read(user), room)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(was == 1)
    }

    async fn members(&self, room: &str) -> BackendResult<Vec<String>> {
        let mut con = self.cmd.clone();
        let v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.room_members(room))
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(sorted(v))
    }

    async fn is_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        redis::cmd("SISMEMBER")
            .arg(self.keys.room_members(room))
            .arg(user)
            .query_async(&mut con)
            .await
            .map_err(err)
    }

    async fn rooms_of(&self, user: &str) -> BackendResult<Vec<String>> {
        let mut con = self.cmd.clone();
        let v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.user_rooms(user))
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(sorted(v))
    }
}

#[async_trait]
impl Contacts for RedisBackend {
    async fn set_contacts(&self, user: &str, contacts: &[String]) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let key = self.keys.user_contacts(user);
        let mut p = redis::pipe();
        p.atomic().del(&key).ignore();
        if !contacts.is_empty() {
            p.sadd(&key, contacts).ignore();
        }
        p.exec_async(&mut con).await.map_err(err)
    }

    async fn contacts(&self, user: &str) -> BackendResult<Vec<String>> {
        let mut con = self.cmd.clone();
        let v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.user_contacts(user))
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(sorted(v))
    }
}

#[async_trait]
impl Idempotency for RedisBackend {
    async fn idem_begin(
        &self,
        key: &str,
        id: &str,
        lease: Duration,
        ttl: Duration,
    ) -> BackendResult<KeyState> {
        let mut con = self.cmd.clone();
        let reply: Vec<Value> = IDEM_BEGIN
            .key(self.keys.idempotency(key))
            .arg(id)
            .arg(millis(lease))
            .arg(millis(ttl))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let mut it = reply.into_iter();
        let state: String = parse(
            it.next().unwrap_or(Value::Nil),
            "store_idem_begin.lua state",
        )?;
        let mut value = || -> BackendResult<Vec<u8>> {
            parse(
                it.next().unwrap_or(Value::Nil),
                "store_idem_begin.lua value",
            )
        };
        Ok(match state.as_str() {
            "done" => KeyState::Done(Bytes::from(value()?)),
            "pending" => KeyState::Pending,
            "claimed" => KeyState::Claimed {
                id: String::from_utf8(value()?).map_err(|_| {
                    BackendError::Internal("idempotency: event id is not UTF-8".into())
                })?,
            },
            other => {
                return Err(BackendError::Internal(format!(
                    "unexpected Redis reply for store_idem_begin.lua: {other:?}"
                )));
            }
        })
    }

    async fn idem_complete(&self, key: &str, reply: Bytes, ttl: Duration) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let k = self.keys.idempotency(key);
        redis::pipe()
            .atomic()
            .hset(&k, "reply", &reply[..])
            .ignore()
            .pexpire(&k, millis(ttl) as i64)
            .ignore()
            .exec_async(&mut con)
            .await
            .map_err(err)
    }

    async fn idem_release(&self, key: &str) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let _ended: u64 = IDEM_RELEASE
            .key(self.keys.idempotency(key))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }
}

#[async_trait]
impl Unread for RedisBackend {
    async fn mark_countable(&self, room: &str, seq: Seq, keep: usize) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let _: i64 = MARK_COUNTABLE
            .key(self.keys.room_countable(room))
            .arg(seq)
            .arg(countable_keep(keep))
            .arg(COUNTABLE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn set_read(&self, user: &str, room: &str, seq: Seq) -> BackendResult<Seq> {
        let mut con = self.cmd.clone();
        SET_READ
            .key(self.keys.user_read(user))
            .arg(room)
            .arg(seq)
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }

    async fn unread(&self, user: &str, rooms: &[String]) -> BackendResult<Vec<u64>> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.cmd.clone();
        let mut pointers: Vec<Option<Seq>> = redis::cmd("HMGET")
            .arg(self.keys.user_read(user))
            .arg(rooms)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        // Pointers only move forward: when a room's pointer is the same before and after its ZCOUNT,
        // the count was true at that instant. A pointer that moved meanwhile is counted again.
        let mut attempt = 1;
        loop {
            let (counts, after) = self.count_after(user, rooms, &pointers).await?;
            if after == pointers || attempt == UNREAD_ATTEMPTS {
                return Ok(counts);
            }
            pointers = after;
            attempt += 1;
        }
    }

    async fn set_focus(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let _live: u64 = FOCUS_SET
            .key(self.keys.room_focus(room))
            .arg(focus_member(user, session))
            .arg(millis(ttl))
            .arg(millis(FOCUS_SLACK))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn refresh_focus(
        &self,
        entries: &[(Box<str>, Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let calls: Vec<_> = entries
            .iter()
            .map(|(room, user, session)| {
                let mut inv = FOCUS_SET.prepare_invoke();
                inv.key(self.keys.room_focus(room))
                    .arg(focus_member(user, session))
                    .arg(millis(ttl))
                    .arg(millis(FOCUS_SLACK));
                (&*FOCUS_SET, inv)
            })
            .collect();
        let mut con = self.cmd.clone();
        eval_pipeline(&mut con, &calls).await.map(drop)
    }

    async fn clear_focus(&self, room: &str, user: &str, session: &str) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        redis::cmd("ZREM")
            .arg(self.keys.room_focus(room))
            .arg(focus_member(user, session))
            .exec_async(&mut con)
            .await
            .map_err(err)
    }

    async fn focused(&self, room: &str) -> BackendResult<Vec<String>> {
        let mut con = self.cmd.clone();
        let entries: Vec<String> = FOCUS_LIST
            .key(self.keys.room_focus(room))
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let users = entries
            .into_iter()
            .map(|e| match e.split_once('|') {
                Some((user, _)) => Ok(user.to_string()),
                None => Err(BackendError::Internal(format!(
                    "unreadable focus entry in Redis: {e:?}"
                ))),
            })
            .collect::<BackendResult<Vec<String>>>()?;
        Ok(sorted(users))
    }
}

#[async_trait]
impl Devices for RedisBackend {
    async fn put_device(&self, user: &str, device: PushDevice) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        redis::cmd("HSET")
            .arg(self.keys.user_push_devices(user))
            .arg(&device.device)
            .arg(json(&device, "push device")?)
            .exec_async(&mut con)
            .await
            .map_err(err)
    }

    async fn delete_device(&self, user: &str, device: &str) -> BackendResult<bool> {
        let mut con = self.cmd.clone();
        let n: u64 = redis::cmd("HDEL")
            .arg(self.keys.user_push_devices(user))
            .arg(device)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        Ok(n == 1)
    }

    async fn devices(&self, user: &str) -> BackendResult<Vec<PushDevice>> {
        Ok(self.devices_of(&[user.to_string()]).await?.remove(0))
    }

    async fn devices_of(&self, users: &[String]) -> BackendResult<Vec<Vec<PushDevice>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.cmd("HGETALL").arg(self.keys.user_push_devices(user));
        }
        let mut con = self.cmd.clone();
        let replies: Vec<Vec<(String, String)>> = pipe.query_async(&mut con).await.map_err(err)?;
        replies
            .into_iter()
            .map(|mut all| {
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all.iter().map(|(_, v)| unjson(v, "push device")).collect()
            })
            .collect()
    }
}

#[async_trait]
impl Announcements for RedisBackend {
    async fn add_announcement(&self, a: &Announcement) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        let _removed: u64 = ANNOUNCE_ADD
            .key(self.keys.announcements())
            .arg(&a.id)
            .arg(json(a, "announcement")?)
            .arg(MAX_ANNOUNCEMENTS)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn announcements(&self, now: i64) -> BackendResult<Vec<Announcement>> {
        let mut con = self.cmd.clone();
        let all: Vec<String> = redis::cmd("HVALS")
            .arg(self.keys.announcements())
            .query_async(&mut con)
            .await
            .map_err(err)?;
        let mut live = Vec::with_capacity(all.len());
        for s in &all {
            let a: Announcement = unjson(s, "announcement")?;
            if a.expires.is_none_or(|e| e > now) {
                live.push(a);
            }
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn swap_announcement_cursor(
        &self,
        user: &str,
        id: &str,
    ) -> BackendResult<Option<String>> {
        let mut con = self.cmd.clone();
        ANNOUNCE_CURSOR
            .key(self.keys.announcement_cursor(user))
            .arg(id)
            .arg(CURSOR_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }
}
