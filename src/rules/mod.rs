//! Routing rules: Rhai scripts in `rules/*.rhai`, compiled once per (re)load and evaluated once per
//! publish, never per delivery. Each file may define `route(event)`, `can_subscribe(user, channel)`,
//! `can_publish(user, channel, event)` and `announce(announcement, user)`. Files load in name order; for
//! each hook the first file whose function returns a value decides, `()` passes to the next, and when none
//! decides the channel defaults of `channels.toml` apply.
//!
//! Scripts are pure and sandboxed: operation, call-depth, expression-depth, string, array and map limits,
//! a wall-time budget per call, no module imports from disk, no `eval`, no printing (their one outside
//! input is the clock, `now_ms()`). A script that errors
//! or runs out of budget follows `on_error` (channel defaults by default) and counts an error: an event is
//! never lost to a bad script.
//!
//! Layout: [`mod@sandbox`] (the engine scripts run in, the per-call budget), `load.rs` (files compiled
//! into a [`RuleSet`]), [`convert`] (JSON and the event map into Rhai values and back), `cache.rs`
//! (decisions reused for events that look the same to the rules), [`decision`] (the typed
//! Decision), [`fields`] (what a route reads), [`template`] (push text filled in from the event),
//! [`fixtures`] (`rules/tests/*.toml`), [`reload`] (hot reload). This file is the face: the rule set
//! and its hooks.
//!
//! Imports only the vocabulary (`channels`, `event`); never `engine`, `backend` or `transport`.

mod cache;
pub mod convert;
pub mod decision;
pub mod fields;
pub mod fixtures;
mod load;
pub mod reload;
pub mod sandbox;
pub mod template;

pub use decision::{Decision, DevicePolicy, PushPolicy, PushWhen};
pub use fields::EventFields;
pub use sandbox::Budget;

pub use crate::event::Source;

use std::fmt;
use std::sync::Arc;

use rhai::{Dynamic, Engine};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use cache::{Cached, RouteCache};
use convert::{event_map, json_to_dynamic, user_map};
use load::{Hooks, RuleFile, route_fields};
use sandbox::{call_hook, sandbox};

use crate::channels::{ChannelKinds, ChannelName};

/// What routing sees of an event.
#[derive(Debug)]
pub struct RouteInput<'a> {
    /// Event type.
    pub event: &'a str,
    /// Event id.
    pub id: &'a str,
    /// Target channels the publisher named.
    pub targets: &'a [ChannelName],
    /// Sender user, when any.
    pub from: Option<&'a str>,
    /// Payload.
    pub data: &'a RawValue,
    /// Publish time, unix ms.
    pub ts: i64,
    /// API or client.
    pub source: Source,
    /// The sender's JWT `attrs` (client publishes).
    pub attrs: Option<&'a Arc<Map<String, Value>>>,
}

/// A routing result and where it came from.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The decision.
    pub decision: Decision,
    /// `"file.rhai"` whose `route` decided; `None` = channel defaults.
    pub by: Option<Arc<str>>,
    /// The script error that made `on_error` apply, if any.
    pub error: Option<String>,
}

impl Routed {
    /// Who decided, as a dry run and `herald simulate` report it: `file.rhai::route`, or
    /// `channel defaults`.
    pub fn decided_by(&self) -> String {
        match &self.by {
            Some(file) => format!("{file}::route"),
            None => "channel defaults".into(),
        }
    }
}

/// What happens when a script fails or runs out of budget at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Route by the channel defaults (the event is delivered).
    #[default]
    DefaultRoute,
    /// Reject the publish (`rejected`, with the error as reason).
    Reject,
}

/// A rule file that failed to load, or a load-time check that failed: `file:line:col: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// File name (relative to the rules directory).
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col) {
            (0, _) => write!(f, "{}: {}", self.file, self.message),
            (l, 0) => write!(f, "{}:{l}: {}", self.file, self.message),
            (l, c) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for RuleError {}

impl RuleError {
    /// An error about a whole file (no line or column).
    pub fn in_file(file: impl Into<String>, message: impl Into<String>) -> Self {
        RuleError {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }
}

/// A compiled rule set (immutable; reloads build a new one and swap it in).
#[derive(Clone)]
pub struct RuleSet {
    engine: Arc<Engine>,
    files: Vec<RuleFile>,
    kinds: Arc<ChannelKinds>,
    budget: Budget,
    on_error: OnError,
    /// The event map `route` gets, with `()` values: only the fields some `route` can observe.
    template: rhai::Map,
    /// Decisions by what the routes read, when that is little enough to repeat (see `cache.rs`).
    cache: Option<Arc<RouteCache>>,
    /// Increases with every successful load.
    pub version: u64,
    /// When it was loaded, unix ms.
    pub loaded_at: i64,
}

impl RuleSet {
    /// Channel defaults only (no files).
    pub fn defaults(kinds: Arc<ChannelKinds>) -> Self {
        let budget = Budget::default();
        RuleSet {
            engine: Arc::new(sandbox(budget)),
            files: Vec::new(),
            kinds,
            budget,
            on_error: OnError::DefaultRoute,
            template: rhai::Map::new(),
            cache: None,
            version: 0,
            loaded_at: crate::event::now_ms(),
        }
    }

    /// Whether any file defines `announce`.
    pub fn has_announce(&self) -> bool {
        self.files.iter().any(|f| f.hooks.announce)
    }

    /// The loaded file names, in evaluation order.
    pub fn files(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.to_string()).collect()
    }

    /// The event fields the `route` hooks read.
    pub fn event_fields(&self) -> EventFields {
        route_fields(&self.files)
    }

    /// Whether `route` decisions are kept and reused (the decision cache, `cache.rs`).
    pub fn caches_decisions(&self) -> bool {
        self.cache.is_some()
    }

    /// The channel kinds the defaults come from.
    pub fn kinds(&self) -> &Arc<ChannelKinds> {
        &self.kinds
    }

    /// The per-call budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Evaluates `route` for one publish (or takes the decision it made for an event that looked the
    /// same to it: the decision cache, `cache.rs`).
    pub fn route(&self, input: &RouteInput<'_>) -> Routed {
        if !self.files.iter().any(|f| f.hooks.route) {
            return self.by_default(input, None);
        }
        let key = self.cache.as_ref().map(|c| c.key(input));
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(hit) = cache.get(key)
        {
            return self.fill_in(hit, input);
        }
        let decided = match self.evaluate(input) {
            Ok(decided) => decided,
            Err(e) => return self.failed(input, e),
        };
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.put(key, decided.clone());
        }
        self.fill_in(decided, input)
    }

    /// Calls the `route` hooks in file order: the first decision, `None` when every file passed.
    fn evaluate(&self, input: &RouteInput<'_>) -> Result<Cached, String> {
        let mut event = Some(event_map(&self.template, input));
        let last = self.files.iter().rposition(|f| f.hooks.route);
        for (i, f) in self.files.iter().enumerate().filter(|(_, f)| f.hooks.route) {
            // Arguments are passed by value: the last (usually the only) file takes the map itself
            // instead of a deep copy.
            let arg = if Some(i) == last {
                event.take()
            } else {
                event.clone()
            };
            let Some(arg) = arg else { break };
            let d = call_hook(&self.engine, self.budget, &f.name, &f.ast, "route", (arg,))?;
            if d.is_unit() {
                continue;
            }
            return Decision::from_dynamic(d, input.targets)
                .map(|d| Some((d, i)))
                .map_err(|msg| format!("{}:{}: route() returned {msg}", f.name, f.route_line));
        }
        Ok(None)
    }

    /// The routed result: push text templates filled in from this event.
    fn fill_in(&self, decided: Cached, input: &RouteInput<'_>) -> Routed {
        let Some((mut decision, file)) = decided else {
            return self.by_default(input, None);
        };
        let f = &self.files[file];
        match decision.fill_in(input) {
            Ok(()) => Routed {
                decision,
                by: Some(f.name.clone()),
                error: None,
            },
            Err(msg) => self.failed(
                input,
                format!("{}:{}: route() returned {msg}", f.name, f.route_line),
            ),
        }
    }

    fn by_default(&self, input: &RouteInput<'_>, error: Option<String>) -> Routed {
        Routed {
            decision: Decision::defaults(input.targets),
            by: None,
            error,
        }
    }

    fn failed(&self, input: &RouteInput<'_>, error: String) -> Routed {
        crate::metrics::rule_error("route");
        tracing::warn!(error = %error, event = input.event, "Rule failed; on_error applies.");
        match self.on_error {
            OnError::DefaultRoute => self.by_default(input, Some(error)),
            OnError::Reject => {
                let mut decision = Decision::defaults(input.targets);
                decision.drop = Some(format!("rule error: {error}"));
                Routed {
                    decision,
                    by: None,
                    error: Some(error),
                }
            }
        }
    }

    fn permission(
        &self,
        hook: &'static str,
        pick: fn(&Hooks) -> bool,
        args: Vec<Dynamic>,
    ) -> Option<bool> {
        for f in self.files.iter().filter(|f| pick(&f.hooks)) {
            let r = call_hook(
                &self.engine,
                self.budget,
                &f.name,
                &f.ast,
                hook,
                args.clone(),
            );
            match r {
                Ok(d) if d.is_unit() => continue,
                Ok(d) => match d.as_bool() {
                    Ok(b) => return Some(b),
                    Err(t) => {
                        crate::metrics::rule_error(hook);
                        tracing::warn!(file = %f.name, hook, "Rule returned {t}, not a bool; channel defaults apply.");
                        return None;
                    }
                },
                Err(e) => {
                    crate::metrics::rule_error(hook);
                    tracing::warn!(error = %e, "Rule failed; channel defaults apply.");
                    return None;
                }
            }
        }
        None
    }

    /// `can_subscribe(user, channel)`: `Some` when a rule decided, `None` = channel defaults.
    pub fn can_subscribe(
        &self,
        user: &str,
        attrs: &Map<String, Value>,
        channel: &ChannelName,
    ) -> Option<bool> {
        if !self.files.iter().any(|f| f.hooks.can_subscribe) {
            return None;
        }
        let args = vec![
            user_map(user, attrs),
            Dynamic::from(channel.as_str().to_string()),
        ];
        self.permission("can_subscribe", |h| h.can_subscribe, args)
    }

    /// `can_publish(user, channel, event)`: `Some` when a rule decided, `None` = channel defaults.
    pub fn can_publish(
        &self,
        user: &str,
        attrs: &Map<String, Value>,
        channel: &ChannelName,
        event: &str,
    ) -> Option<bool> {
        if !self.files.iter().any(|f| f.hooks.can_publish) {
            return None;
        }
        let args = vec![
            user_map(user, attrs),
            Dynamic::from(channel.as_str().to_string()),
            Dynamic::from(event.to_string()),
        ];
        self.permission("can_publish", |h| h.can_publish, args)
    }

    /// `announce(announcement, user)`: `Some` when a rule decided, `None` = the audience filter.
    pub fn announce(
        &self,
        announcement: &Value,
        user: &str,
        attrs: &Map<String, Value>,
    ) -> Option<bool> {
        if !self.files.iter().any(|f| f.hooks.announce) {
            return None;
        }
        let args = vec![json_to_dynamic(announcement), user_map(user, attrs)];
        self.permission("announce", |h| h.announce, args)
    }
}
