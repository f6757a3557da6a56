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
//! Imports only the vocabulary (`channels`, `event`); never `engine`, `backend` or `transport`.

pub mod decision;
pub mod fields;
pub mod fixtures;
pub mod reload;
pub mod template;

pub use decision::{Decision, DevicePolicy, PushPolicy, PushWhen};
pub use fields::EventFields;

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use rhai::{AST, CallFnOptions, Dynamic, Engine, Scope};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::channels::{ChannelKinds, ChannelName, Kind};

/// Where an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A backend through the HTTP API.
    Api,
    /// A client connection.
    Client,
}

impl Source {
    /// As scripts see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Client => "client",
        }
    }
}

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

/// Limits of one hook call.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Rhai operations.
    pub operations: u64,
    /// Wall time.
    pub wall: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            operations: 100_000,
            wall: Duration::from_millis(50),
        }
    }
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

fn pos_error(file: &str, pos: rhai::Position, message: impl Into<String>) -> RuleError {
    RuleError {
        file: file.to_string(),
        line: pos.line().unwrap_or(0),
        col: pos.position().unwrap_or(0),
        message: message.into(),
    }
}

thread_local! {
    /// Deadline of the hook call running on this thread (the wall-time budget).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A sandboxed Rhai engine with `budget`.
pub fn sandbox(budget: Budget) -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(budget.operations);
    e.set_max_call_levels(32);
    e.set_max_expr_depths(64, 32);
    e.set_max_string_size(64 * 1024);
    e.set_max_array_size(10_000);
    e.set_max_map_size(10_000);
    // `no_module`: `import` is not in the language at all (no resolver can read a file).
    e.set_optimization_level(rhai::OptimizationLevel::Full);
    e.disable_symbol("eval");
    // The one impure thing scripts get: the clock (announcement expiry, time windows).
    // Volatile: otherwise the optimizer evaluates a call without arguments once, at compile time,
    // and every later call would get the load time.
    rhai::FuncRegistration::new("now_ms")
        .with_volatility(true)
        .register_into_engine(&mut e, crate::event::now_ms);
    // Scripts are pure: no output.
    e.on_print(|_| {});
    e.on_debug(|_, _, _| {});
    e.on_progress(|ops| {
        if ops % 256 != 0 {
            return None;
        }
        let late = DEADLINE.with(|d| d.get().is_some_and(|t| Instant::now() > t));
        late.then(|| Dynamic::from("wall-time budget exceeded"))
    });
    e
}

/// The hooks one file defines.
#[derive(Clone, Copy, Debug, Default)]
struct Hooks {
    route: bool,
    can_subscribe: bool,
    can_publish: bool,
    announce: bool,
}

/// One compiled rule file.
#[derive(Clone)]
struct RuleFile {
    name: Arc<str>,
    ast: AST,
    hooks: Hooks,
    /// Line of `fn route`, for errors about what it returned.
    route_line: usize,
    /// The event fields its `route` can observe.
    fields: EventFields,
    /// Its `route` does not read the clock (nor any function it calls): it decides the same for the
    /// same fields.
    pure: bool,
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
    /// Decisions by what the routes read, when that is little enough to repeat (see [`RouteCache`]).
    cache: Option<Arc<RouteCache>>,
    /// Increases with every successful load.
    pub version: u64,
    /// When it was loaded, unix ms.
    pub loaded_at: i64,
}

/// The hook names and their arity.
const HOOKS: [(&str, usize); 4] = [
    ("route", 1),
    ("can_subscribe", 2),
    ("can_publish", 3),
    ("announce", 2),
];

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

    /// Compiles every `*.rhai` in `dir` (name order). A missing directory is an empty rule set.
    pub fn load(
        dir: &Path,
        kinds: Arc<ChannelKinds>,
        budget: Budget,
        on_error: OnError,
        version: u64,
    ) -> Result<Self, RuleError> {
        let engine = sandbox(budget);
        let mut files = Vec::new();
        for path in rule_files(dir)? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| RuleError::in_file(&name, format!("cannot read: {e}")))?;
            files.push(compile_file(&engine, &name, &text)?);
        }
        let fields = route_fields(&files);
        let pure = files.iter().all(|f| !f.hooks.route || f.pure);
        let cache = (pure && fields.is_repetitive()).then(|| Arc::new(RouteCache::new(fields)));
        Ok(RuleSet {
            engine: Arc::new(engine),
            files,
            kinds,
            budget,
            on_error,
            template: event_template(fields),
            cache,
            version,
            loaded_at: crate::event::now_ms(),
        })
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

    /// Whether `route` decisions are kept and reused ([`RouteCache`]).
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

    fn call(&self, f: &RuleFile, hook: &str, args: impl rhai::FuncArgs) -> Result<Dynamic, String> {
        let deadline = Instant::now() + self.budget.wall;
        DEADLINE.with(|d| d.set(Some(deadline)));
        let r = self.engine.call_fn_with_options::<Dynamic>(
            CallFnOptions::new().eval_ast(false),
            &mut Scope::new(),
            &f.ast,
            hook,
            args,
        );
        DEADLINE.with(|d| d.set(None));
        r.map_err(|e| {
            let pos = e.position();
            let msg = e.to_string();
            match (pos.line(), pos.position()) {
                (Some(l), Some(c)) => format!("{}:{l}:{c}: {hook}(): {msg}", f.name),
                (Some(l), None) => format!("{}:{l}: {hook}(): {msg}", f.name),
                _ => format!("{}: {hook}(): {msg}", f.name),
            }
        })
    }

    /// Evaluates `route` for one publish (or takes the decision it made for an event that looked the
    /// same to it, see [`RouteCache`]).
    pub fn route(&self, input: &RouteInput<'_>) -> Routed {
        if !self.files.iter().any(|f| f.hooks.route) {
            return self.by_default(input, None);
        }
        let key = self.cache.as_ref().map(|c| c.key(input));
        if let (Some(cache), Some(key)) = (&self.cache, &key) {
            if let Some(hit) = cache.get(key) {
                return self.fill_in(hit, input);
            }
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
            let d = self.call(f, "route", (arg,))?;
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
            let r = self.call(f, hook, args.clone());
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

/// The event fields some file's `route` reads.
fn route_fields(files: &[RuleFile]) -> EventFields {
    files
        .iter()
        .fold(EventFields::NONE, |f, file| f.union(file.fields))
}

/// The decisions `route` made, by the event fields it read (and the publisher's targets, which a
/// decision without `to` keeps), so that a publish that looks the same to the rules as an earlier one
/// is not evaluated again: a chat room's messages differ in `data` and `id`, which the shipped route
/// does not read (its push text is a template, filled in per event). Used only when the rules are
/// pure (no `now_ms()` in `route` or what it calls: Rhai scripts have no other outside input) and read
/// nothing but `type`, `channel`, `room`, `from`, `source` and `to`. Errors are not kept. Bounded:
/// emptied when full. A reload builds a new rule set, with an empty cache.
pub struct RouteCache {
    fields: EventFields,
    map: std::sync::Mutex<std::collections::HashMap<String, Cached>>,
}

/// A `route` outcome: the decision (templates not filled in) and the index of the file that made it,
/// or `None` when every file passed.
type Cached = Option<(Decision, usize)>;

/// Entries a [`RouteCache`] holds before it is emptied.
const ROUTE_CACHE_ENTRIES: usize = 4096;

impl RouteCache {
    fn new(fields: EventFields) -> Self {
        RouteCache {
            fields,
            map: Default::default(),
        }
    }

    /// What the routes see of `input`: the fields they read and the targets.
    fn key(&self, input: &RouteInput<'_>) -> String {
        use std::fmt::Write;
        let mut k = String::with_capacity(64);
        k.push_str(input.event);
        if self.fields.contains("from") {
            let _ = write!(k, "\0{}", input.from.unwrap_or("\u{1}"));
        }
        if self.fields.contains("source") {
            k.push('\0');
            k.push_str(input.source.as_str());
        }
        for t in input.targets {
            k.push('\0');
            k.push_str(t.as_str());
        }
        k
    }

    fn get(&self, key: &str) -> Option<Cached> {
        self.map.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: String, decided: Cached) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= ROUTE_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key, decided);
    }
}

/// The `*.rhai` files of `dir`, sorted by name. A missing directory has none.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RuleError::in_file(
                dir.display().to_string(),
                format!("cannot read the rules directory: {e}"),
            ));
        }
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai") && p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

/// Compiles one file and checks its hooks' arity.
fn compile_file(engine: &Engine, name: &str, text: &str) -> Result<RuleFile, RuleError> {
    let ast = engine
        .compile(text)
        .map_err(|e| pos_error(name, e.position(), e.err_type().to_string()))?;
    let mut hooks = Hooks::default();
    for f in ast.iter_functions() {
        let Some((_, arity)) = HOOKS.iter().find(|(h, _)| *h == f.name) else {
            continue;
        };
        if f.params.len() != *arity {
            let (line, col) = fn_pos(text, f.name);
            return Err(RuleError {
                file: name.to_string(),
                line,
                col,
                message: format!(
                    "hook `{}` takes {arity} parameter(s), found {}",
                    f.name,
                    f.params.len()
                ),
            });
        }
        match f.name {
            "route" => hooks.route = true,
            "can_subscribe" => hooks.can_subscribe = true,
            "can_publish" => hooks.can_publish = true,
            _ => hooks.announce = true,
        }
    }
    Ok(RuleFile {
        name: name.into(),
        fields: fields::route_fields(&ast),
        pure: !fields::route_calls(&ast, "now_ms"),
        ast,
        hooks,
        route_line: fn_line(text, "route"),
    })
}

/// The line of `fn NAME(` in a script (0 when not found).
fn fn_line(text: &str, name: &str) -> usize {
    fn_pos(text, name).0
}

/// The 1-based line and column of `fn NAME(` in a script (`(0, 0)` when not found).
fn fn_pos(text: &str, name: &str) -> (usize, usize) {
    let pat = format!("fn {name}(");
    text.lines()
        .enumerate()
        .find_map(|(i, l)| {
            let c = l.find(&pat)?;
            // A mention in a `//` comment is not the definition.
            (!l[..c].contains("//")).then(|| (i + 1, l[..c].chars().count() + 1))
        })
        .unwrap_or((0, 0))
}

/// A JSON value as a Rhai value.
pub fn json_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        Value::Object(m) => Dynamic::from_map(json_object_to_map(m)),
    }
}

/// A JSON object as a Rhai map. Entries are inserted one by one: for the few keys objects have here,
/// that is cheaper than `collect` (which buffers, sorts and bulk-builds).
fn json_object_to_map(m: &Map<String, Value>) -> rhai::Map {
    let mut out = rhai::Map::new();
    for (k, v) in m {
        out.insert(k.as_str().into(), json_to_dynamic(v));
    }
    out
}

/// A Rhai value as JSON (for `push.data`). Functions and custom types become strings.
pub fn dynamic_to_json(d: &Dynamic) -> Value {
    if d.is_unit() {
        Value::Null
    } else if let Ok(b) = d.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = d.as_int() {
        Value::from(i)
    } else if let Ok(f) = d.as_float() {
        Value::from(f)
    } else if let Ok(s) = d.as_immutable_string_ref() {
        Value::String(s.as_str().to_owned())
    } else if let Ok(a) = d.as_array_ref() {
        Value::Array(a.iter().map(dynamic_to_json).collect())
    } else if let Ok(m) = d.as_map_ref() {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
                .collect(),
        )
    } else {
        Value::String(d.to_string())
    }
}

fn user_map(user: &str, attrs: &Map<String, Value>) -> Dynamic {
    let mut m = rhai::Map::new();
    m.insert("id".into(), Dynamic::from(user.to_string()));
    m.insert("attrs".into(), Dynamic::from_map(json_object_to_map(attrs)));
    Dynamic::from_map(m)
}

/// The event map with the keys of `fields` and `()` values: cloning it (one node) and filling the
/// values in place is cheaper than building a map entry by entry (a sort and a search per key).
pub fn event_template(fields: EventFields) -> rhai::Map {
    fields.keys().map(|k| (k.into(), Dynamic::UNIT)).collect()
}

/// `source` as scripts see it, shared rather than allocated per publish.
static SOURCES: LazyLock<[rhai::ImmutableString; 2]> =
    LazyLock::new(|| [Source::Api.as_str().into(), Source::Client.as_str().into()]);

/// The event as scripts see it: `type`, `id`, `channel`, `room`, `from`, `to`, `data`, `ts`, `source`,
/// `attrs`, or those of them `template` (from [`event_template`]) has.
pub fn event_map(template: &rhai::Map, input: &RouteInput<'_>) -> Dynamic {
    let first = input.targets.first();
    let mut m = template.clone();
    for (k, v) in m.iter_mut() {
        *v = match k.as_str() {
            "attrs" => Dynamic::from_map(
                input
                    .attrs
                    .map(|a| json_object_to_map(a))
                    .unwrap_or_default(),
            ),
            "channel" => first.map_or(Dynamic::UNIT, |c| c.as_str().into()),
            // Straight from the JSON text into Rhai values (rhai's `serde`), no serde_json::Value.
            "data" => serde_json::from_str::<Dynamic>(input.data.get()).unwrap_or(Dynamic::UNIT),
            "from" => input.from.map_or(Dynamic::UNIT, |f| f.into()),
            "id" => input.id.into(),
            "room" => first
                .filter(|c| matches!(c.kind(), Kind::Room | Kind::Active))
                .map_or(Dynamic::UNIT, |c| c.id().into()),
            "source" => SOURCES[usize::from(input.source == Source::Client)]
                .clone()
                .into(),
            "to" => input
                .targets
                .iter()
                .filter(|c| c.kind() == Kind::User)
                .map(|c| c.id().into())
                .collect::<rhai::Array>()
                .into(),
            "ts" => Dynamic::from(input.ts),
            "type" => input.event.into(),
            _ => Dynamic::UNIT, // not in fields::EVENT_KEYS
        };
    }
    Dynamic::from_map(m)
}
