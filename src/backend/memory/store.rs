//! The memory backend's [`Membership`], [`Contacts`], [`Idempotency`], [`Unread`] (with focus),
//! [`Devices`] and [`Announcements`], under one lock. The unread step of a publish ([`UnreadStep`])
//! and its idempotency record run here too, called by the broker inside its append.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::Memory;
use crate::announcement::Announcement;
use crate::backend::{
    Announcements, BackendResult, Contacts, Devices, Idempotency, KeyState, Membership, Unread,
    UnreadStep,
};
use crate::device::PushDevice;
use crate::event::{Position, Seq};
use crate::primitives::lock;

#[derive(Default)]
pub(super) struct StoreState {
    members: HashMap<String, BTreeSet<String>>,
    rooms_of: HashMap<String, BTreeSet<String>>,
    contacts: HashMap<String, Vec<String>>,
    idem: HashMap<String, IdemRecord>,
    idem_pruned_at: usize,
    countable: HashMap<String, BTreeSet<Seq>>,
    read: HashMap<(String, String), Seq>,
    /// room -> (user, session) -> expiry
    focus: HashMap<String, HashMap<(String, String), Instant>>,
    devices: HashMap<String, BTreeMap<String, PushDevice>>,
    announcements: Vec<Announcement>,
    announcement_cursor: HashMap<String, String>,
}

/// One idempotency key (see [`Store`]'s idempotency contract).
struct IdemRecord {
    /// The event id of the key's first claim.
    id: String,
    /// Until when the current publisher holds the key.
    lease_until: Instant,
    /// The first reply, once done.
    reply: Option<Bytes>,
    /// Channels stored under the key and where (few: one per publish target).
    stored: Vec<(String, Position)>,
    expires: Instant,
}

impl StoreState {
    /// The live record of an idempotency key.
    fn idem_live(&mut self, key: &str, now: Instant) -> Option<&mut IdemRecord> {
        self.idem.get_mut(key).filter(|r| r.expires > now)
    }

    fn mark_countable(&mut self, room: &str, seq: Seq, keep: usize) {
        let set = self.countable.entry(room.into()).or_default();
        set.insert(seq);
        while set.len() > keep.max(1) {
            set.pop_first();
        }
    }

    fn set_read(&mut self, user: &str, room: &str, seq: Seq) -> Seq {
        let p = self.read.entry((user.into(), room.into())).or_insert(0);
        *p = (*p).max(seq);
        *p
    }

    /// Users focused on `room` now (expired entries dropped), sorted.
    fn focused(&mut self, room: &str) -> Vec<String> {
        let now = Instant::now();
        let Some(f) = self.focus.get_mut(room) else {
            return Vec::new();
        };
        f.retain(|_, exp| *exp > now);
        if f.is_empty() {
            self.focus.remove(room);
            return Vec::new();
        }
        let mut users: Vec<String> = f.keys().map(|(u, _)| u.clone()).collect();
        users.sort();
        users.dedup();
        users
    }
}

impl Memory {
    /// Where `channel` was stored under the idempotency key `key`, if it was.
    pub(super) fn deduped(&self, key: &str, channel: &str) -> Option<Position> {
        let mut s = lock(&self.store);
        let r = s.idem_live(key, Instant::now())?;
        r.stored
            .iter()
            .find(|(c, _)| c == channel)
            .map(|(_, p)| p.clone())
    }

    /// Records that `channel` was stored at `position` under the idempotency key `key` (the broker
    /// calls it inside the append, as it does [`Memory::apply_unread`]).
    pub(super) fn record_dedupe(&self, key: &str, channel: &str, position: &Position) {
        let mut s = lock(&self.store);
        if let Some(r) = s.idem_live(key, Instant::now()) {
            r.stored.push((channel.to_string(), position.clone()));
        }
    }

    /// The [`UnreadStep`] of a stored room event: the same three steps as the [`Store`] calls it
    /// stands for, under one store lock. The broker calls it while it holds the channel's lock (the
    /// lock order is always channel, then store).
    pub(super) fn apply_unread(&self, room: &str, seq: Seq, step: &UnreadStep) {
        let mut s = lock(&self.store);
        s.mark_countable(room, seq, step.keep);
        if let Some(from) = &step.from {
            s.set_read(from, room, seq);
        }
        for user in s.focused(room) {
            if step.from.as_deref() != Some(user.as_str()) {
                s.set_read(&user, room, seq);
            }
        }
    }
}

#[async_trait]
impl Membership for Memory {
    async fn add_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let mut s = lock(&self.store);
        let new = s
            .members
            .entry(room.into())
            .or_default()
            .insert(user.into());
        s.rooms_of
            .entry(user.into())
            .or_default()
            .insert(room.into());
        Ok(new)
    }

    async fn remove_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let mut s = lock(&self.store);
        let was = s.members.get_mut(room).is_some_and(|m| m.remove(user));
        if s.members.get(room).is_some_and(|m| m.is_empty()) {
            s.members.remove(room);
        }
        if let Some(r) = s.rooms_of.get_mut(user) {
            r.remove(room);
            if r.is_empty() {
                s.rooms_of.remove(user);
            }
        }
        s.read.remove(&(user.to_string(), room.to_string()));
        Ok(was)
    }

    async fn members(&self, room: &str) -> BackendResult<Vec<String>> {
        let s = lock(&self.store);
        Ok(s.members
            .get(room)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn is_member(&self, room: &str, user: &str) -> BackendResult<bool> {
        let s = lock(&self.store);
        Ok(s.members.get(room).is_some_and(|m| m.contains(user)))
    }

    async fn rooms_of(&self, user: &str) -> BackendResult<Vec<String>> {
        let s = lock(&self.store);
        Ok(s.rooms_of
            .get(user)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl Contacts for Memory {
    async fn set_contacts(&self, user: &str, contacts: &[String]) -> BackendResult<()> {
        let mut s = lock(&self.store);
        let mut c: Vec<String> = contacts.to_vec();
        c.sort();
        c.dedup();
        if c.is_empty() {
            s.contacts.remove(user);
        } else {
            s.contacts.insert(user.into(), c);
        }
        Ok(())
    }

    async fn contacts(&self, user: &str) -> BackendResult<Vec<String>> {
        let s = lock(&self.store);
        Ok(s.contacts.get(user).cloned().unwrap_or_default())
    }
}

#[async_trait]
impl Idempotency for Memory {
    async fn idem_begin(
        &self,
        key: &str,
        id: &str,
        lease: Duration,
        ttl: Duration,
    ) -> BackendResult<KeyState> {
        let mut s = lock(&self.store);
        let now = Instant::now();
        // Amortised pruning keeps the map bounded by the keys alive within their TTL.
        if s.idem.len() > 1024 && s.idem.len() > 2 * s.idem_pruned_at {
            s.idem.retain(|_, r| r.expires > now);
            s.idem_pruned_at = s.idem.len();
        }
        if let Some(r) = s.idem_live(key, now) {
            if let Some(reply) = &r.reply {
                return Ok(KeyState::Done(reply.clone()));
            }
            if r.lease_until > now {
                return Ok(KeyState::Pending);
            }
            r.lease_until = now + lease;
            return Ok(KeyState::Claimed { id: r.id.clone() });
        }
        s.idem.insert(
            key.into(),
            IdemRecord {
                id: id.into(),
                lease_until: now + lease,
                reply: None,
                stored: Vec::new(),
                expires: now + ttl,
            },
        );
        Ok(KeyState::Claimed { id: id.into() })
    }

    async fn idem_complete(&self, key: &str, reply: Bytes, ttl: Duration) -> BackendResult<()> {
        let mut s = lock(&self.store);
        let now = Instant::now();
        match s.idem_live(key, now) {
            Some(r) => {
                r.reply = Some(reply);
                r.expires = now + ttl;
            }
            None => {
                s.idem.insert(
                    key.into(),
                    IdemRecord {
                        id: String::new(),
                        lease_until: now,
                        reply: Some(reply),
                        stored: Vec::new(),
                        expires: now + ttl,
                    },
                );
            }
        }
        Ok(())
    }

    async fn idem_release(&self, key: &str) -> BackendResult<()> {
        let mut s = lock(&self.store);
        let now = Instant::now();
        if let Some(r) = s.idem_live(key, now)
            && r.reply.is_none()
        {
            r.lease_until = now;
        }
        Ok(())
    }
}

#[async_trait]
impl Unread for Memory {
    async fn mark_countable(&self, room: &str, seq: Seq, keep: usize) -> BackendResult<()> {
        lock(&self.store).mark_countable(room, seq, keep);
        Ok(())
    }

    async fn set_read(&self, user: &str, room: &str, seq: Seq) -> BackendResult<Seq> {
        Ok(lock(&self.store).set_read(user, room, seq))
    }

    async fn unread(&self, user: &str, rooms: &[String]) -> BackendResult<Vec<u64>> {
        let s = lock(&self.store);
        Ok(rooms
            .iter()
            .map(|room| {
                let ptr = s
                    .read
                    .get(&(user.to_string(), room.clone()))
                    .copied()
                    .unwrap_or(0);
                s.countable
                    .get(room)
                    .map_or(0, |set| set.range(ptr + 1..).count() as u64)
            })
            .collect())
    }

    async fn set_focus(
        &self,
        room: &str,
        user: &str,
        session: &str,
        ttl: Duration,
    ) -> BackendResult<()> {
        let mut s = lock(&self.store);
        s.focus
            .entry(room.into())
            .or_default()
            .insert((user.into(), session.into()), Instant::now() + ttl);
        Ok(())
    }

    async fn refresh_focus(
        &self,
        entries: &[(Box<str>, Arc<str>, Arc<str>)],
        ttl: Duration,
    ) -> BackendResult<()> {
        let mut s = lock(&self.store);
        let until = Instant::now() + ttl;
        for (room, user, session) in entries {
            s.focus
                .entry(room.to_string())
                .or_default()
                .insert((user.to_string(), session.to_string()), until);
        }
        Ok(())
    }

    async fn clear_focus(&self, room: &str, user: &str, session: &str) -> BackendResult<()> {
        let mut s = lock(&self.store);
        if let Some(f) = s.focus.get_mut(room) {
            f.remove(&(user.to_string(), session.to_string()));
            if f.is_empty() {
                s.focus.remove(room);
            }
        }
        Ok(())
    }

    async fn focused(&self, room: &str) -> BackendResult<Vec<String>> {
        Ok(lock(&self.store).focused(room))
    }
}

#[async_trait]
impl Devices for Memory {
    async fn put_device(&self, user: &str, device: PushDevice) -> BackendResult<()> {
        let mut s = lock(&self.store);
        s.devices
            .entry(user.into())
            .or_default()
            .insert(device.device.clone(), device);
        Ok(())
    }

    async fn delete_device(&self, user: &str, device: &str) -> BackendResult<bool> {
        let mut s = lock(&self.store);
        let was = s
            .devices
            .get_mut(user)
            .is_some_and(|d| d.remove(device).is_some());
        if s.devices.get(user).is_some_and(|d| d.is_empty()) {
            s.devices.remove(user);
        }
        Ok(was)
    }

    async fn devices(&self, user: &str) -> BackendResult<Vec<PushDevice>> {
        Ok(self.devices_of(&[user.to_string()]).await?.remove(0))
    }

    async fn devices_of(&self, users: &[String]) -> BackendResult<Vec<Vec<PushDevice>>> {
        let s = lock(&self.store);
        Ok(users
            .iter()
            .map(|u| {
                s.devices
                    .get(u)
                    .map(|d| d.values().cloned().collect())
                    .unwrap_or_default()
            })
            .collect())
    }
}

#[async_trait]
impl Announcements for Memory {
    async fn add_announcement(&self, a: &Announcement) -> BackendResult<()> {
        let mut s = lock(&self.store);
        let now = crate::event::now_ms();
        s.announcements
            .retain(|x| x.expires.is_none_or(|e| e > now));
        s.announcements.push(a.clone());
        // Bounded: the oldest never-expiring announcements go first past this many.
        if s.announcements.len() > 1000 {
            s.announcements.remove(0);
        }
        Ok(())
    }

    async fn announcements(&self, now: i64) -> BackendResult<Vec<Announcement>> {
        let s = lock(&self.store);
        Ok(s.announcements
            .iter()
            .filter(|a| a.expires.is_none_or(|e| e > now))
            .cloned()
            .collect())
    }

    async fn swap_announcement_cursor(
        &self,
        user: &str,
        id: &str,
    ) -> BackendResult<Option<String>> {
        let mut s = lock(&self.store);
        let prev = s.announcement_cursor.get(user).cloned();
        if prev.as_deref().is_none_or(|p| p < id) {
            s.announcement_cursor.insert(user.into(), id.into());
        }
        Ok(prev)
    }
}
