//! Every Redis key and Pub/Sub channel name herald uses, in one place.
//!
//! Keys carry a `{hash tag}` per channel, user or room, so everything one atomic step touches for one
//! channel or user lands in one Redis Cluster slot; moving to Cluster changes this file (and the steps
//! that span users or rooms become idempotent instead of atomic). A prefix separates deployments (and
//! test runs) sharing one Redis.

/// Key builder for one deployment prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `"herald:"`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- channels: history + fan-out ----

    /// Hash `{epoch, seq}` of a channel.
    pub fn channel_meta(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:meta", self.prefix)
    }

    /// Stream of a channel's stored events, ids `seq-0`.
    pub fn channel_log(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:log", self.prefix)
    }

    /// Pub/Sub channel of a herald channel.
    pub fn pubsub(&self, channel: &str) -> String {
        format!("{}ps:{channel}", self.prefix)
    }

    /// The herald channel a Pub/Sub channel name carries, if it is one of ours.
    pub fn from_pubsub<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(&self.prefix)?.strip_prefix("ps:")
    }

    /// A node's self-addressed probe channel.
    pub fn probe(&self, node: &str) -> String {
        format!("{}probe:{node}", self.prefix)
    }

    // ---- presence ----

    /// Sorted set: a user's session ids scored by expiry (unix ms, Redis clock).
    pub fn user_sessions(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:sessions", self.prefix)
    }

    /// Hash: session id -> session details (JSON).
    pub fn user_devices(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:devices", self.prefix)
    }

    /// Hash: status, text, last_seen.
    pub fn user_status(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:status", self.prefix)
    }

    /// Sorted set: online user -> their latest session expiry (the sweeper reads it; no scans).
    pub fn online(&self) -> String {
        format!("{}online", self.prefix)
    }

    /// Sorted set: user present in a room -> the expiry of their latest entry there.
    pub fn room_present(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:present", self.prefix)
    }

    /// Sorted set: one user's entries in a room's presence, session id -> expiry.
    pub fn room_user_sessions(&self, room: &str, user: &str) -> String {
        format!("{}{{r:{room}}}:present:{user}", self.prefix)
    }

    /// Sorted set: room -> the earliest moment one of its users' presence there lapses (the lowest
    /// score of its [`Keys::room_present`]); the sweeper reads it, no scans.
    pub fn rooms_present(&self) -> String {
        format!("{}rooms-present", self.prefix)
    }

    /// Set: the rooms one session is present in, so heartbeats refresh those entries too.
    pub fn user_session_rooms(&self, user: &str, session: &str) -> String {
        format!("{}{{u:{user}}}:session-rooms:{session}", self.prefix)
    }

    // ---- store ----

    /// Set: a room's members.
    pub fn room_members(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:members", self.prefix)
    }

    /// Set: a user's rooms (reverse index).
    pub fn user_rooms(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:rooms", self.prefix)
    }

    /// Set: a user's contacts.
    pub fn user_contacts(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:contacts", self.prefix)
    }

    /// Hash: an idempotency key's record: `id` (the event id of its first claim), `lease` (until when
    /// its publisher holds it, unix ms of the Redis clock), `reply` once done, and `c:<channel's
    /// Pub/Sub name>` = `<seq> <epoch>` for each channel stored under it.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}idem2:{{{key}}}", self.prefix)
    }

    /// Sorted set: a room's countable seqs (score = member = seq).
    pub fn room_countable(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:countable", self.prefix)
    }

    /// Hash: room -> read pointer of a user.
    pub fn user_read(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:read", self.prefix)
    }

    /// Sorted set: `user|session` focused on a room, scored by expiry.
    pub fn room_focus(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:focus", self.prefix)
    }

    /// Hash: device id -> push registration (JSON).
    pub fn user_push_devices(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:push", self.prefix)
    }

    /// Hash: announcement id -> announcement (JSON).
    pub fn announcements(&self) -> String {
        format!("{}announcements", self.prefix)
    }

    /// String: a user's announcement cursor (the newest id seen).
    pub fn announcement_cursor(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:ann-cursor", self.prefix)
    }

    /// Stream: the push outbox (consumer group [`Keys::PUSH_GROUP`]); fields `b` body, `s` seq.
    pub fn push_outbox(&self) -> String {
        format!("{}{{push}}:outbox", self.prefix)
    }

    /// Sorted set: push timer id -> due time (unix ms, Redis clock).
    pub fn push_timers(&self) -> String {
        format!("{}{{push}}:timers", self.prefix)
    }

    /// Hash: push timer id -> `<seq or -> <body>`.
    pub fn push_timer_bodies(&self) -> String {
        format!("{}{{push}}:timer-bodies", self.prefix)
    }

    /// List: push dead letters, newest first.
    pub fn push_dead(&self) -> String {
        format!("{}{{push}}:dead", self.prefix)
    }

    /// Hash: user -> the highest seq they acked on `channel`.
    pub fn push_acks(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:acks", self.prefix)
    }

    /// String with an expiry: a push burst window is open for `key`.
    pub fn push_gate(&self, key: &str) -> String {
        format!("{}{{push}}:gate:{key}", self.prefix)
    }

    /// Hash: pushes held while `key`'s window is open (`n` count, `b` the last).
    pub fn push_held(&self, key: &str) -> String {
        format!("{}{{push}}:held:{key}", self.prefix)
    }

    // ---- the node registry ----

    /// Sorted set: node id -> when its record lapses (unix ms, Redis clock).
    pub fn nodes(&self) -> String {
        format!("{}{{nodes}}:expiry", self.prefix)
    }

    /// Hash: node id -> `<last heartbeat, unix ms> <what it said, JSON>`.
    pub fn node_info(&self) -> String {
        format!("{}{{nodes}}:info", self.prefix)
    }

    /// The outbox's consumer group.
    pub const PUSH_GROUP: &'static str = "herald";
}
