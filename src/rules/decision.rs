//! The typed routing [`Decision`]: what `route(event)` returns, parsed and validated from the script's
//! map. Unknown keys and wrong types are errors (reported with the file and line of `fn route`), never
//! silently ignored.

use std::sync::Arc;
use std::time::Duration;

use rhai::Dynamic;

use crate::channels::{ChannelKinds, ChannelName, parse_duration, valid_id};

/// Which of a recipient's devices get an event live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DevicePolicy {
    /// Every session.
    #[default]
    All,
    /// Sessions in the foreground.
    Foreground,
    /// The most recently connected session of each user.
    Latest,
    /// iOS and Android sessions.
    Mobile,
    /// Web and desktop sessions.
    Web,
}

/// When a push notification is sent (executed by the push issue; stored in the decision now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushWhen {
    /// Never.
    Never,
    /// The recipient has no live session.
    Offline,
    /// No foreground session.
    Background,
    /// Not acknowledged by any device within `after`.
    Unacked,
    /// Always.
    Always,
}

/// A push policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PushPolicy {
    /// When.
    pub when: PushWhen,
    /// Delay for `unacked`.
    pub after: Option<Duration>,
    /// Notification title.
    pub title: Option<String>,
    /// Notification body.
    pub body: Option<String>,
    /// Extra data.
    pub data: Option<serde_json::Value>,
    /// Collapse key.
    pub collapse: Option<String>,
    /// Time to live.
    pub ttl: Option<Duration>,
}

/// How one event is routed.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Target channels.
    pub to: Vec<ChannelName>,
    /// Users excluded from live delivery.
    pub except: Vec<Arc<str>>,
    /// Also exclude the sender where the channel kind says `except_sender`.
    pub except_sender: bool,
    /// Store (history, seq); `None` = each target kind's default.
    pub persist: Option<bool>,
    /// Count as unread; `None` = each target kind's default.
    pub unread: Option<bool>,
    /// Device policy for live delivery.
    pub devices: DevicePolicy,
    /// Push policy.
    pub push: Option<PushPolicy>,
    /// Rejected, with this reason.
    pub drop: Option<String>,
}

impl Decision {
    /// Whether the event is stored on `channel`.
    pub fn persist_for(&self, kinds: &ChannelKinds, channel: &ChannelName) -> bool {
        self.persist.unwrap_or_else(|| kinds.of(channel).persist)
    }

    /// Whether the event counts as unread on `channel` (only stored room events can).
    pub fn unread_for(&self, kinds: &ChannelKinds, channel: &ChannelName) -> bool {
        self.persist_for(kinds, channel) && self.unread.unwrap_or_else(|| kinds.of(channel).unread)
    }

    /// Users excluded from live delivery on `channel`, given the sender.
    pub fn except_for(
        &self,
        kinds: &ChannelKinds,
        channel: &ChannelName,
        from: Option<&str>,
    ) -> Vec<Arc<str>> {
        let mut v = self.except.clone();
        if self.except_sender
            && kinds.of(channel).except_sender
            && let Some(f) = from
            && !v.iter().any(|u| &**u == f)
        {
            v.push(f.into());
        }
        v
    }
}

/// The keys a `route` map may have.
pub const DECISION_KEYS: [&str; 8] = [
    "to", "except", "persist", "unread", "devices", "push", "drop", "reason",
];
const PUSH_KEYS: [&str; 7] = ["when", "after", "title", "body", "data", "collapse", "ttl"];

impl DevicePolicy {
    /// Parses `all|foreground|latest|mobile|web`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "all" => DevicePolicy::All,
            "foreground" => DevicePolicy::Foreground,
            "latest" => DevicePolicy::Latest,
            "mobile" => DevicePolicy::Mobile,
            "web" => DevicePolicy::Web,
            _ => return None,
        })
    }

    /// As written in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            DevicePolicy::All => "all",
            DevicePolicy::Foreground => "foreground",
            DevicePolicy::Latest => "latest",
            DevicePolicy::Mobile => "mobile",
            DevicePolicy::Web => "web",
        }
    }
}

impl PushWhen {
    /// Parses `never|offline|background|unacked|always`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "never" => PushWhen::Never,
            "offline" => PushWhen::Offline,
            "background" => PushWhen::Background,
            "unacked" => PushWhen::Unacked,
            "always" => PushWhen::Always,
            _ => return None,
        })
    }

    /// As written in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            PushWhen::Never => "never",
            PushWhen::Offline => "offline",
            PushWhen::Background => "background",
            PushWhen::Unacked => "unacked",
            PushWhen::Always => "always",
        }
    }
}

fn type_of(d: &Dynamic) -> &'static str {
    if d.is_unit() {
        "()"
    } else if d.is_bool() {
        "bool"
    } else if d.is_int() {
        "int"
    } else if d.is_float() {
        "float"
    } else if d.is_string() {
        "string"
    } else if d.is_array() {
        "array"
    } else if d.is_map() {
        "map"
    } else {
        "value"
    }
}

fn want_bool(key: &str, d: &Dynamic) -> Result<bool, String> {
    d.as_bool()
        .map_err(|_| format!("`{key}` must be a bool, not {}", type_of(d)))
}

fn want_string(key: &str, d: &Dynamic) -> Result<String, String> {
    if d.is_string() {
        Ok(d.clone().into_string().unwrap_or_default())
    } else {
        Err(format!("`{key}` must be a string, not {}", type_of(d)))
    }
}

fn want_strings(key: &str, d: &Dynamic) -> Result<Vec<String>, String> {
    if d.is_string() {
        return Ok(vec![want_string(key, d)?]);
    }
    if !d.is_array() {
        return Err(format!(
            "`{key}` must be an array of strings, not {}",
            type_of(d)
        ));
    }
    d.clone()
        .into_array()
        .unwrap_or_default()
        .iter()
        .map(|x| want_string(key, x))
        .collect()
}

fn want_duration(key: &str, d: &Dynamic) -> Result<Duration, String> {
    if d.is_int() {
        let n = d.as_int().unwrap_or(0);
        return u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| format!("`{key}` must not be negative"));
    }
    let s = want_string(key, d)?;
    parse_duration(&s).map_err(|e| format!("`{key}`: {e}"))
}

impl Decision {
    /// The channel-default route: deliver to the named targets; sender exclusion, persist and
    /// unread per target kind.
    pub fn defaults(targets: &[ChannelName]) -> Self {
        Decision {
            to: targets.to_vec(),
            except: Vec::new(),
            except_sender: true,
            persist: None,
            unread: None,
            devices: DevicePolicy::All,
            push: None,
            drop: None,
        }
    }

    /// Parses the map a `route` returned. Keys absent from the map keep their channel defaults (`to`:
    /// the publisher's targets). When `except` is given it replaces the sender exclusion.
    pub fn from_dynamic(d: Dynamic, targets: &[ChannelName]) -> Result<Self, String> {
        if !d.is_map() {
            return Err(format!(
                "a {}, expected a map like #{{to: [..]}} or ()",
                type_of(&d)
            ));
        }
        let map = d.cast::<rhai::Map>();
        let mut out = Decision::defaults(targets);
        if let Some(k) = map.keys().find(|k| !DECISION_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "unknown key `{k}` (allowed: {})",
                DECISION_KEYS.join(", ")
            ));
        }
        if let Some(v) = map.get("to") {
            let mut to = Vec::new();
            for name in want_strings("to", v)? {
                let ch = ChannelName::parse(&name).map_err(|e| format!("`to`: {e}"))?;
                if !to.contains(&ch) {
                    to.push(ch);
                }
            }
            if to.len() > 100 {
                return Err("`to`: at most 100 channels".into());
            }
            out.to = to;
        }
        if let Some(v) = map.get("except") {
            let users = want_strings("except", v)?;
            if let Some(u) = users.iter().find(|u| !valid_id(u)) {
                return Err(format!("`except`: bad user id {u:?}"));
            }
            out.except = users.into_iter().map(|u| Arc::from(u.as_str())).collect();
            out.except_sender = false;
        }
        if let Some(v) = map.get("persist") {
            out.persist = Some(want_bool("persist", v)?);
        }
        if let Some(v) = map.get("unread") {
            out.unread = Some(want_bool("unread", v)?);
        }
        if let Some(v) = map.get("devices") {
            let s = want_string("devices", v)?;
            out.devices = DevicePolicy::parse(&s).ok_or_else(|| {
                format!("`devices` must be all, foreground, latest, mobile or web, not {s:?}")
            })?;
        }
        if let Some(v) = map.get("push")
            && !v.is_unit()
        {
            out.push = Some(parse_push(v)?);
        }
        let drop = match map.get("drop") {
            Some(v) => want_bool("drop", v)?,
            None => false,
        };
        let reason = match map.get("reason") {
            Some(v) => Some(want_string("reason", v)?),
            None => None,
        };
        if drop {
            out.drop = Some(reason.unwrap_or_else(|| "dropped by a rule".into()));
        }
        Ok(out)
    }
}

fn parse_push(v: &Dynamic) -> Result<PushPolicy, String> {
    if !v.is_map() {
        return Err(format!("`push` must be a map, not {}", type_of(v)));
    }
    let m = v.clone().cast::<rhai::Map>();
    if let Some(k) = m.keys().find(|k| !PUSH_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key `push.{k}` (allowed: {})",
            PUSH_KEYS.join(", ")
        ));
    }
    let when = match m.get("when") {
        Some(w) => {
            let s = want_string("push.when", w)?;
            PushWhen::parse(&s).ok_or_else(|| {
                format!(
                    "`push.when` must be never, offline, background, unacked or always, not {s:?}"
                )
            })?
        }
        None => return Err("`push.when` is required".into()),
    };
    let opt_string = |k: &str| -> Result<Option<String>, String> {
        match m.get(k) {
            Some(x) if !x.is_unit() => Ok(Some(want_string(&format!("push.{k}"), x)?)),
            _ => Ok(None),
        }
    };
    let opt_duration = |k: &str| -> Result<Option<Duration>, String> {
        match m.get(k) {
            Some(x) if !x.is_unit() => Ok(Some(want_duration(&format!("push.{k}"), x)?)),
            _ => Ok(None),
        }
    };
    let after = opt_duration("after")?;
    if when == PushWhen::Unacked && after.is_none() {
        return Err("`push.after` is required with `when: \"unacked\"`".into());
    }
    Ok(PushPolicy {
        when,
        after,
        title: opt_string("title")?,
        body: opt_string("body")?,
        data: m
            .get("data")
            .filter(|d| !d.is_unit())
            .map(super::dynamic_to_json),
        collapse: opt_string("collapse")?,
        ttl: opt_duration("ttl")?,
    })
}

impl PushPolicy {
    /// As JSON (durations as `"30s"`-style strings in ms precision).
    pub fn to_json(&self) -> serde_json::Value {
        let d = |x: &Option<Duration>| x.map(|d| format!("{}ms", d.as_millis()));
        serde_json::json!({
            "when": self.when.as_str(),
            "after": d(&self.after),
            "title": self.title,
            "body": self.body,
            "data": self.data,
            "collapse": self.collapse,
            "ttl": d(&self.ttl),
        })
    }
}

impl Decision {
    /// As JSON for operators (`herald simulate`, `/admin/rules/dry-run`): the decision as returned,
    /// and per target channel what it means with the channel defaults resolved.
    pub fn to_json(&self, kinds: &ChannelKinds, from: Option<&str>) -> serde_json::Value {
        let per_channel: Vec<serde_json::Value> = self
            .to
            .iter()
            .map(|ch| {
                serde_json::json!({
                    "channel": ch,
                    "persist": self.persist_for(kinds, ch),
                    "unread": self.unread_for(kinds, ch),
                    "except": self.except_for(kinds, ch, from).iter().map(|u| u.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "to": self.to,
            "except": self.except.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
            "persist": self.persist,
            "unread": self.unread,
            "devices": self.devices.as_str(),
            "push": self.push.as_ref().map(PushPolicy::to_json),
            "drop": self.drop.is_some(),
            "reason": self.drop,
            "channels": per_channel,
        })
    }
}
