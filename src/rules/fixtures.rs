//! Rule fixtures: `rules/tests/*.toml`, each a list of cases (an event in, the expected decision out).
//! Run by `herald rules test`, and by every (re)load: a rule set whose fixtures fail is refused.
//!
//! ```toml
//! [[case]]
//! name = "a chat message goes to the room, minus the sender"
//! event = { type = "chat.message", channel = "room:r1", from = "alice", data = { text = "hi" } }
//! expect = { to = ["room:r1"], except = ["alice"], unread = true, push = { when = "unacked", after = "30s" } }
//! ```
//!
//! Expectations are checked against the *effective* decision for the first target channel (sender
//! exclusion, persist and unread resolved against `channels.toml`); fields left out are not checked.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{RouteInput, Routed, RuleError, RuleSet, Source};
use crate::channels::{ChannelName, Kind, parse_duration};
pub use crate::event::EventSpec;

impl EventSpec {
    /// The target channels.
    pub fn targets(&self) -> Result<Vec<ChannelName>, String> {
        let mut t = Vec::new();
        if let Some(c) = &self.channel {
            t.push(ChannelName::parse(c).map_err(|e| e.to_string())?);
        }
        if let Some(r) = &self.room {
            t.push(ChannelName::try_of(Kind::Room, r).map_err(|e| e.to_string())?);
        }
        for u in &self.to {
            t.push(ChannelName::try_of(Kind::User, u).map_err(|e| e.to_string())?);
        }
        // As the publish does, so a simulation decides what the publish would.
        ChannelName::dedupe(&mut t);
        if t.is_empty() {
            return Err("the event names no target (channel, room or to)".into());
        }
        Ok(t)
    }

    /// Routes this event with `rules`.
    pub fn route(&self, rules: &RuleSet) -> Result<Routed, String> {
        let targets = self.targets()?;
        // A sender the publish API would refuse.
        if let Some(f) = &self.from
            && !crate::channels::valid_id(f)
        {
            return Err("from: a user id (1-128 characters of [A-Za-z0-9_.@-])".into());
        }
        let data = RawValue::from_string(self.data.to_string()).map_err(|e| e.to_string())?;
        let source = match self.source.as_deref() {
            None | Some("api") => Source::Api,
            Some("client") => Source::Client,
            Some(other) => return Err(format!("source must be api or client, not {other:?}")),
        };
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| "00000000-0000-7000-8000-000000000000".into());
        let attrs = Arc::new(self.attrs.clone());
        Ok(rules.route(&RouteInput {
            event: &self.event,
            id: &id,
            targets: &targets,
            from: self.from.as_deref(),
            data: &data,
            ts: crate::event::now_ms(),
            source,
            attrs: Some(&attrs),
        }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(default)]
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    event: EventSpec,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    to: Option<Vec<String>>,
    except: Option<Vec<String>>,
    persist: Option<bool>,
    unread: Option<bool>,
    devices: Option<String>,
    push: Option<ExpectPush>,
    /// `true`: no push policy at all.
    no_push: Option<bool>,
    drop: Option<bool>,
    reason: Option<String>,
    /// The file whose `route` decided (`"defaults"` for the channel defaults).
    by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectPush {
    when: Option<String>,
    after: Option<String>,
    title: Option<String>,
    body: Option<String>,
    collapse: Option<String>,
    ttl: Option<String>,
    data: Option<Value>,
}

/// The outcome of a fixture run.
#[derive(Debug, Default)]
pub struct Report {
    /// Cases run.
    pub cases: usize,
    /// One entry per failing case: `file: case: field: expected …, got …` lines.
    pub failures: Vec<String>,
}

/// Runs every `tests/*.toml` under `dir` against `rules`. `Err` when a fixture file cannot be read
/// or parsed (with file and line).
pub fn run(dir: &Path, rules: &RuleSet) -> Result<Report, RuleError> {
    let tests = dir.join("tests");
    let mut files: Vec<_> = match std::fs::read_dir(&tests) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let mut report = Report::default();
    for path in files {
        let name = format!(
            "tests/{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RuleError::in_file(&name, format!("cannot read: {e}")))?;
        let parsed: FixtureFile = crate::channels::parse_toml(&name, &text)
            .map_err(|e| RuleError::in_file(&name, e.message))?;
        for case in parsed.case {
            report.cases += 1;
            let diffs = check(&case, rules);
            if !diffs.is_empty() {
                report
                    .failures
                    .push(format!("{name}: {}:\n  {}", case.name, diffs.join("\n  ")));
            }
        }
    }
    Ok(report)
}

fn check(case: &Case, rules: &RuleSet) -> Vec<String> {
    let routed = match case.event.route(rules) {
        Ok(r) => r,
        Err(e) => return vec![format!("event: {e}")],
    };
    let mut diffs = Vec::new();
    let mut diff = |field: &str, want: String, got: String| {
        if want != got {
            diffs.push(format!("{field}: expected {want}, got {got}"));
        }
    };
    if let Some(err) = &routed.error {
        diff("error", "none".into(), err.clone());
    }
    let d = &routed.decision;
    let kinds: &Arc<crate::channels::ChannelKinds> = rules.kinds();
    if let Some(by) = &case.expect.by {
        diff(
            "by",
            by.clone(),
            routed.by.as_deref().unwrap_or("defaults").to_string(),
        );
    }
    if let Some(to) = &case.expect.to {
        let got: Vec<String> = d.to.iter().map(|c| c.to_string()).collect();
        diff("to", format!("{to:?}"), format!("{got:?}"));
    }
    let first = d.to.first();
    if let Some(except) = &case.expect.except {
        let mut got: Vec<String> = match first {
            Some(ch) => d
                .except_for(kinds, ch, case.event.from.as_deref())
                .iter()
                .map(|u| u.to_string())
                .collect(),
            None => d.except.iter().map(|u| u.to_string()).collect(),
        };
        got.sort();
        let mut want = except.clone();
        want.sort();
        diff("except", format!("{want:?}"), format!("{got:?}"));
    }
    if let (Some(want), Some(ch)) = (case.expect.persist, first) {
        diff(
            "persist",
            want.to_string(),
            d.persist_for(kinds, ch).to_string(),
        );
    }
    if let (Some(want), Some(ch)) = (case.expect.unread, first) {
        diff(
            "unread",
            want.to_string(),
            d.unread_for(kinds, ch).to_string(),
        );
    }
    if let Some(dev) = &case.expect.devices {
        diff("devices", dev.clone(), d.devices.as_str().to_string());
    }
    if case.expect.no_push == Some(true) {
        diff(
            "push",
            "none".into(),
            if d.push.is_some() {
                "a push policy".into()
            } else {
                "none".into()
            },
        );
    }
    if let Some(p) = &case.expect.push {
        match &d.push {
            None => diff("push", "a push policy".into(), "none".into()),
            Some(got) => {
                if let Some(w) = &p.when {
                    diff("push.when", w.clone(), got.when.as_str().into());
                }
                if let Some(a) = &p.after {
                    diff(
                        "push.after",
                        format!("{:?}", parse_duration(a).ok()),
                        format!("{:?}", got.after),
                    );
                }
                if let Some(t) = &p.ttl {
                    diff(
                        "push.ttl",
                        format!("{:?}", parse_duration(t).ok()),
                        format!("{:?}", got.ttl),
                    );
                }
                for (field, want, have) in [
                    ("push.title", &p.title, &got.title),
                    ("push.body", &p.body, &got.body),
                    ("push.collapse", &p.collapse, &got.collapse),
                ] {
                    if let Some(w) = want {
                        diff(
                            field,
                            format!("{w:?}"),
                            format!("{:?}", have.as_deref().unwrap_or("")),
                        );
                    }
                }
                if let Some(data) = &p.data {
                    diff(
                        "push.data",
                        data.to_string(),
                        got.data.clone().unwrap_or(Value::Null).to_string(),
                    );
                }
            }
        }
    }
    if let Some(want) = case.expect.drop {
        diff("drop", want.to_string(), d.drop.is_some().to_string());
    }
    if let Some(reason) = &case.expect.reason {
        diff(
            "reason",
            format!("{reason:?}"),
            format!("{:?}", d.drop.as_deref().unwrap_or("")),
        );
    }
    diffs
}
