//! The typed routing [`Decision`]: what `route(event)` returns, parsed and validated from the script's
//! map. Unknown keys and wrong types are errors (reported with the file and line of `fn route`), never
//! silently ignored.

use std::sync::Arc;
use std::time::Duration;

use rhai::Dynamic;

use super::{RouteInput, template};
use crate::channels::{ChannelKinds, ChannelName, parse_duration, valid_id};
pub use crate::device::DevicePolicy;

/// When a push notification is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// `title_template` / `body_template` still to fill in from the event ([`Decision::fill_in`]).
    pub templates: Option<Box<PushTemplates>>,
}

/// Push text templates a route returned, before they are filled in from the event.
#[derive(Clone, Debug, PartialEq)]
pub struct PushTemplates {
    /// `title_template`.
    pub title: Option<rhai::ImmutableString>,
    /// `body_template`.
    pub body: Option<rhai::ImmutableString>,
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
const PUSH_KEYS: [&str; 9] = [
    "when",
    "after",
    "title",
    "title_template",
    "body",
    "body_template",
    "data",
    "collapse",
    "ttl",
];

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

/// The string `d` holds (shared, not copied).
fn want_str(key: &str, d: &Dynamic) -> Result<rhai::ImmutableString, String> {
    d.clone()
        .into_immutable_string()
        .map_err(|_| format!("`{key}` must be a string, not {}", type_of(d)))
}

fn want_duration(key: &str, d: &Dynamic) -> Result<Duration, String> {
    if d.is_int() {
        let n = d.as_int().unwrap_or(0);
        return u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| format!("`{key}` must not be negative"));
    }
    parse_duration(&want_str(key, d)?).map_err(|e| format!("`{key}`: {e}"))
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
        // `to` is filled with the publisher's targets at the end when the map has none.
        let mut out = Decision::defaults(&[]);
        let mut to_given = false;
        let mut drop = false;
        let mut reason = None;
        // One pass, by value: nothing is cloned, error texts are only built on errors.
        for (k, v) in map {
            match k.as_str() {
                "to" => {
                    let mut to: Vec<ChannelName> = Vec::new();
                    let mut add = |name: &str| -> Result<(), String> {
                        // The common case names a channel the publisher named: reuse it.
                        let ch = match targets.iter().find(|t| t.as_str() == name) {
                            Some(t) => t.clone(),
                            None => ChannelName::parse(name).map_err(|e| format!("`to`: {e}"))?,
                        };
                        if !to.contains(&ch) {
                            to.push(ch);
                        }
                        Ok(())
                    };
                    if v.is_string() {
                        add(v.into_immutable_string().unwrap_or_default().as_str())?;
                    } else if v.is_array() {
                        for x in v.into_array().unwrap_or_default() {
                            if !x.is_string() {
                                return Err(format!(
                                    "`to` must be an array of strings, not {}",
                                    type_of(&x)
                                ));
                            }
                            add(x.into_immutable_string().unwrap_or_default().as_str())?;
                        }
                    } else {
                        return Err(format!(
                            "`to` must be an array of strings, not {}",
                            type_of(&v)
                        ));
                    }
                    if to.len() > 100 {
                        return Err("`to`: at most 100 channels".into());
                    }
                    out.to = to;
                    to_given = true;
                }
                "except" => {
                    let mut users: Vec<Arc<str>> = Vec::new();
                    let mut add = |x: Dynamic| -> Result<(), String> {
                        if !x.is_string() {
                            return Err(format!(
                                "`except` must be an array of strings, not {}",
                                type_of(&x)
                            ));
                        }
                        let u = x.into_immutable_string().unwrap_or_default();
                        if !valid_id(&u) {
                            return Err(format!("`except`: bad user id {:?}", u.as_str()));
                        }
                        users.push(Arc::from(u.as_str()));
                        Ok(())
                    };
                    if v.is_array() {
                        for x in v.into_array().unwrap_or_default() {
                            add(x)?;
                        }
                    } else {
                        add(v)?;
                    }
                    out.except = users;
                    out.except_sender = false;
                }
                "persist" => out.persist = Some(want_bool("persist", &v)?),
                "unread" => out.unread = Some(want_bool("unread", &v)?),
                "devices" => {
                    let s = want_str("devices", &v)?;
                    out.devices = DevicePolicy::parse(&s).ok_or_else(|| {
                        format!(
                            "`devices` must be all, foreground, latest, mobile or web, not {s:?}"
                        )
                    })?;
                }
                "push" => {
                    if !v.is_unit() {
                        out.push = Some(parse_push(v)?);
                    }
                }
                "drop" => drop = want_bool("drop", &v)?,
                "reason" => reason = Some(want_str("reason", &v)?.to_string()),
                _ => {
                    return Err(format!(
                        "unknown key `{k}` (allowed: {})",
                        DECISION_KEYS.join(", ")
                    ));
                }
            }
        }
        if !to_given {
            out.to = targets.to_vec();
        }
        if drop {
            out.drop = Some(reason.unwrap_or_else(|| "dropped by a rule".into()));
        }
        Ok(out)
    }
}

fn parse_push(v: Dynamic) -> Result<PushPolicy, String> {
    if !v.is_map() {
        return Err(format!("`push` must be a map, not {}", type_of(&v)));
    }
    let m = v.cast::<rhai::Map>();
    let mut when = None;
    let mut p = PushPolicy {
        when: PushWhen::Never,
        after: None,
        title: None,
        body: None,
        data: None,
        collapse: None,
        ttl: None,
        templates: None,
    };
    fn opt_string(key: &str, x: Dynamic) -> Result<Option<String>, String> {
        if x.is_unit() {
            return Ok(None);
        }
        if !x.is_string() {
            return Err(format!("`{key}` must be a string, not {}", type_of(&x)));
        }
        Ok(Some(x.into_string().unwrap_or_default()))
    }
    let (mut title_template, mut body_template) = (None, None);
    for (k, x) in m {
        match k.as_str() {
            "when" => {
                let s = want_str("push.when", &x)?;
                when = Some(PushWhen::parse(&s).ok_or_else(|| {
                    format!("`push.when` must be never, offline, background, unacked or always, not {s:?}")
                })?);
            }
            "after" if !x.is_unit() => p.after = Some(want_duration("push.after", &x)?),
            "ttl" if !x.is_unit() => p.ttl = Some(want_duration("push.ttl", &x)?),
            "after" | "ttl" => {}
            "title" => p.title = opt_string("push.title", x)?,
            "body" => p.body = opt_string("push.body", x)?,
            "title_template" if !x.is_unit() => {
                title_template = Some(want_str("push.title_template", &x)?)
            }
            "body_template" if !x.is_unit() => {
                body_template = Some(want_str("push.body_template", &x)?)
            }
            "title_template" | "body_template" => {}
            "collapse" => p.collapse = opt_string("push.collapse", x)?,
            "data" => p.data = (!x.is_unit()).then(|| super::convert::dynamic_to_json(&x)),
            _ => {
                return Err(format!(
                    "unknown key `push.{k}` (allowed: {})",
                    PUSH_KEYS.join(", ")
                ));
            }
        }
    }
    p.when = when.ok_or("`push.when` is required")?;
    for (key, text, tpl) in [
        ("title", &p.title, &title_template),
        ("body", &p.body, &body_template),
    ] {
        if text.is_some() && tpl.is_some() {
            return Err(format!(
                "give `push.{key}` or `push.{key}_template`, not both"
            ));
        }
    }
    if title_template.is_some() || body_template.is_some() {
        p.templates = Some(Box::new(PushTemplates {
            title: title_template,
            body: body_template,
        }));
    }
    if p.when == PushWhen::Unacked && p.after.is_none() {
        return Err("`push.after` is required with `when: \"unacked\"`".into());
    }
    Ok(p)
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
    /// Fills the push text templates in from the event (see [`template`]).
    pub fn fill_in(&mut self, input: &RouteInput<'_>) -> Result<(), String> {
        let Some(p) = &mut self.push else {
            return Ok(());
        };
        let Some(t) = p.templates.take() else {
            return Ok(());
        };
        for (key, text, tpl) in [
            ("title", &mut p.title, t.title),
            ("body", &mut p.body, t.body),
        ] {
            if let Some(tpl) = tpl {
                *text = template::render(&tpl, input)
                    .map_err(|e| format!("`push.{key}_template`: {e}"))?;
            }
        }
        Ok(())
    }

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
