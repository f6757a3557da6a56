//! Channel vocabulary: parsing `"room:42"` into a [`ChannelName`], and the channel kinds of
//! `channels.toml` ([`ChannelKinds`]) with who may subscribe and publish, history limits, unread and
//! room presence. Shared by every module; imports nothing of the engine, transports or backends.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The five channel kinds of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `user:{user}`: one user's private channel.
    User,
    /// `room:{room}`: a room's members.
    Room,
    /// `active:{room}`: those who have the room open (typing, read receipts).
    Active,
    /// `presence:{user}`: one user's presence changes.
    Presence,
    /// `global`: everyone.
    Global,
}

impl Kind {
    /// The prefix on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Room => "room",
            Kind::Active => "active",
            Kind::Presence => "presence",
            Kind::Global => "global",
        }
    }
}

/// Why a channel name was refused (`bad_channel`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    /// Not a known kind.
    #[error("unknown channel kind in {0:?}: expected user:, room:, active:, presence: or global")]
    UnknownKind(String),
    /// The id part is invalid.
    #[error("bad channel id in {0:?}: ids are 1-128 characters of [A-Za-z0-9_.@-]")]
    BadId(String),
}

/// True when `id` is a valid user or room id: 1–128 characters of `[A-Za-z0-9_.@-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// A parsed, validated channel name. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ChannelName {
    kind: Kind,
    full: Arc<str>,
}

impl ChannelName {
    /// Keeps the first of each name, in order: a publish naming one channel twice (`channel:
    /// "user:a"` with `to: ["a"]`, or `to: ["a", "b", "a"]`) stores and delivers it once.
    pub fn dedupe(names: &mut Vec<ChannelName>) {
        let mut i = 0;
        while i < names.len() {
            if names[..i].contains(&names[i]) {
                names.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Parses and validates `"kind:id"` or `"global"`.
    pub fn parse(s: &str) -> Result<Self, ChannelError> {
        if s == "global" {
            return Ok(ChannelName {
                kind: Kind::Global,
                full: s.into(),
            });
        }
        let (kind, id) = s
            .split_once(':')
            .ok_or_else(|| ChannelError::UnknownKind(truncate(s)))?;
        let kind = match kind {
            "user" => Kind::User,
            "room" => Kind::Room,
            "active" => Kind::Active,
            "presence" => Kind::Presence,
            _ => return Err(ChannelError::UnknownKind(truncate(s))),
        };
        if !valid_id(id) {
            return Err(ChannelError::BadId(truncate(s)));
        }
        Ok(ChannelName {
            kind,
            full: s.into(),
        })
    }

    /// Builds `kind:id` from a known-valid id (panics in debug builds if it is not).
    pub fn of(kind: Kind, id: &str) -> Self {
        debug_assert!(valid_id(id), "invalid id {id:?}");
        ChannelName {
            kind,
            full: format!("{}:{id}", kind.as_str()).into(),
        }
    }

    /// Builds `kind:id`, validating the id.
    pub fn try_of(kind: Kind, id: &str) -> Result<Self, ChannelError> {
        if kind == Kind::Global {
            return Ok(Self::global());
        }
        if !valid_id(id) {
            return Err(ChannelError::BadId(truncate(id)));
        }
        Ok(Self::of(kind, id))
    }

    /// The `global` channel.
    pub fn global() -> Self {
        ChannelName {
            kind: Kind::Global,
            full: "global".into(),
        }
    }

    /// The channel's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The id part (`""` for `global`).
    pub fn id(&self) -> &str {
        match self.kind {
            Kind::Global => "",
            k => &self.full[k.as_str().len() + 1..],
        }
    }

    /// True when both are the same copy of the name (see `Hub::subscribe`): a sure match, where
    /// false says nothing.
    pub fn same(&self, other: &ChannelName) -> bool {
        Arc::ptr_eq(&self.full, &other.full)
    }

    /// The full name as on the wire.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(140).collect()
}

// Equal names held by the hub and its sessions share one `Arc` (the hub interns them), so the
// pointer test settles most comparisons on the delivery path without reading the text.
impl PartialEq for ChannelName {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || self.full == other.full
    }
}
impl Eq for ChannelName {}
impl Hash for ChannelName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.full.hash(state)
    }
}
impl PartialOrd for ChannelName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ChannelName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self.same(other) {
            return std::cmp::Ordering::Equal;
        }
        self.full.cmp(&other.full)
    }
}
impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}
impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.full)
    }
}
impl serde::Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

/// Who may subscribe to a channel of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscribePolicy {
    /// Any authenticated user.
    Any,
    /// Only the user the channel is named after (`user:{me}`).
    Owner,
    /// Members of the room the channel is named after.
    Member,
    /// The user's contacts and those who share a room with them (`presence:{user}`).
    Watcher,
    /// No client (backends only).
    Nobody,
}

/// Who may publish to a channel of a kind from a client connection. Backends (API key) may always publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishPolicy {
    /// Any authenticated user.
    Any,
    /// Only the user the channel is named after.
    Owner,
    /// Members of the room.
    Member,
    /// Backends only.
    Backend,
}

/// The settings of one channel kind.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSettings {
    /// Who may subscribe.
    pub subscribe: SubscribePolicy,
    /// Who may publish from a client.
    pub publish: PublishPolicy,
    /// Whether events are stored (history, `seq`) by default.
    #[serde(default = "yes")]
    pub persist: bool,
    /// How many events history keeps per channel.
    #[serde(default = "default_history_size")]
    pub history_size: usize,
    /// How old an event may be and still be replayed (`"30s"`, `"7d"`).
    #[serde(default = "default_history_age", deserialize_with = "de_duration")]
    pub history_age: Duration,
    /// Whether events count as unread by default (rooms).
    #[serde(default)]
    pub unread: bool,
    /// Whether the sender is excluded from live delivery by default.
    #[serde(default)]
    pub except_sender: bool,
    /// Whether subscribers are tracked as room presence (`presence.update`).
    #[serde(default)]
    pub presence: bool,
}

fn yes() -> bool {
    true
}
fn default_history_size() -> usize {
    100
}
fn default_history_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}

/// The most events history keeps per channel, whatever `channels.toml` says (bounds memory).
pub const MAX_HISTORY_SIZE: usize = 100_000;

/// The channel kinds, as `channels.toml` defines them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelKinds {
    /// `user:` channels.
    pub user: KindSettings,
    /// `room:` channels.
    pub room: KindSettings,
    /// `active:` channels.
    pub active: KindSettings,
    /// `presence:` channels.
    pub presence: KindSettings,
    /// `global`.
    pub global: KindSettings,
}

/// The shipped `channels.toml`, used when the file is absent.
pub const DEFAULT_CHANNELS_TOML: &str = include_str!("../channels.toml");

/// An error loading `channels.toml` or `herald.toml`: names the file, the line and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigFileError {
    /// The file.
    pub file: String,
    /// What is wrong, with line and key.
    pub message: String,
}

/// Parses a TOML document strictly, naming `file`, the line and the key in any error.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigFileError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|sp| line_of(text, sp.start));
        let msg = e.message().trim().to_string();
        let key = e
            .span()
            .map(|sp| key_at(text, sp))
            .filter(|k| !k.is_empty());
        let message = match (line, key) {
            (Some(l), Some(k)) => format!("line {l}, at `{k}`: {msg}"),
            (Some(l), None) => format!("line {l}: {msg}"),
            _ => msg,
        };
        ConfigFileError {
            file: file.to_string(),
            message,
        }
    })
}

/// What an error span points at; for a bad value, with its key (`ttl = "5 parsecs"`).
fn key_at(text: &str, span: std::ops::Range<usize>) -> String {
    let start = span.start.min(text.len());
    let at = text[start..span.end.min(text.len())]
        .lines()
        .next()
        .unwrap_or("")
        .trim();
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    match text[line_start..start].split_once('=') {
        Some((k, _)) if !k.trim().is_empty() => format!("{} = {at}", k.trim()),
        _ => at.to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl ChannelKinds {
    /// Parses `channels.toml` text (`file` names it in errors).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigFileError> {
        let kinds: ChannelKinds = parse_toml(file, text)?;
        for (name, k) in kinds.iter() {
            if k.history_size > MAX_HISTORY_SIZE {
                return Err(ConfigFileError {
                    file: file.into(),
                    message: format!(
                        "[{name}] history_size = {} is above the maximum {MAX_HISTORY_SIZE}",
                        k.history_size
                    ),
                });
            }
        }
        Ok(kinds)
    }

    /// Loads `channels.toml` from `path`; the shipped defaults when `path` does not exist and
    /// `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigFileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&path.display().to_string(), &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Self::parse("channels.toml (built in)", DEFAULT_CHANNELS_TOML)
            }
            Err(e) => Err(ConfigFileError {
                file: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }),
        }
    }

    /// The settings of one kind.
    pub fn get(&self, kind: Kind) -> &KindSettings {
        match kind {
            Kind::User => &self.user,
            Kind::Room => &self.room,
            Kind::Active => &self.active,
            Kind::Presence => &self.presence,
            Kind::Global => &self.global,
        }
    }

    /// The settings of a channel's kind.
    pub fn of(&self, channel: &ChannelName) -> &KindSettings {
        self.get(channel.kind())
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, &KindSettings)> {
        [
            ("user", &self.user),
            ("room", &self.room),
            ("active", &self.active),
            ("presence", &self.presence),
            ("global", &self.global),
        ]
        .into_iter()
    }
}

impl Default for ChannelKinds {
    fn default() -> Self {
        Self::parse("channels.toml (built in)", DEFAULT_CHANNELS_TOML)
            .expect("the built-in channels.toml parses")
    }
}

/// Parses a duration string: `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("bad duration {s:?}: expected e.g. \"500ms\", \"30s\", \"5m\", \"7d\"")
    })?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => {
            return Err(format!("bad duration {s:?}: unit must be ms, s, m, h or d"));
        }
    };
    Ok(d)
}

/// serde helper: a duration as a string (`"30s"`) or an integer number of seconds.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(ChannelName::parse("room:r1").unwrap().id(), "r1");
        assert_eq!(ChannelName::parse("global").unwrap().kind(), Kind::Global);
        assert!(ChannelName::parse("room:").is_err());
        assert!(ChannelName::parse("room:a b").is_err());
        assert!(ChannelName::parse("nope:x").is_err());
        assert!(ChannelName::parse(&format!("room:{}", "a".repeat(129))).is_err());
    }

    #[test]
    fn shipped_channels_toml_parses() {
        let k = ChannelKinds::default();
        assert_eq!(k.room.subscribe, SubscribePolicy::Member);
        assert!(!k.active.persist);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = DEFAULT_CHANNELS_TOML.replacen("[room]\n", "[room]\nbogus = 1\n", 1);
        let err = ChannelKinds::parse("channels.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels.toml"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("").is_err());
    }
}
