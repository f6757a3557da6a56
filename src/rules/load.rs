//! Loading a rule set: the `*.rhai` files of the rules directory in name order, each compiled once,
//! its hooks found and their arity checked, the event fields its `route` reads noted, and errors
//! named by file, line and column.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{AST, Engine};

use super::cache::RouteCache;
use super::convert::event_template;
use super::sandbox::{Budget, sandbox};
use super::{EventFields, OnError, RuleError, RuleSet, fields};
use crate::channels::ChannelKinds;

/// The hooks one file defines.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Hooks {
    pub(super) route: bool,
    pub(super) can_subscribe: bool,
    pub(super) can_publish: bool,
    pub(super) announce: bool,
}

/// One compiled rule file.
#[derive(Clone)]
pub(super) struct RuleFile {
    pub(super) name: Arc<str>,
    pub(super) ast: AST,
    pub(super) hooks: Hooks,
    /// Line of `fn route`, for errors about what it returned.
    pub(super) route_line: usize,
    /// The event fields its `route` can observe.
    pub(super) fields: EventFields,
    /// Its `route` does not read the clock (nor any function it calls): it decides the same for the
    /// same fields.
    pub(super) pure: bool,
}

/// The hook names and their arity.
const HOOKS: [(&str, usize); 4] = [
    ("route", 1),
    ("can_subscribe", 2),
    ("can_publish", 3),
    ("announce", 2),
];

impl RuleSet {
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
}

/// The event fields some file's `route` reads.
pub(super) fn route_fields(files: &[RuleFile]) -> EventFields {
    files
        .iter()
        .fold(EventFields::NONE, |f, file| f.union(file.fields))
}

/// The `*.rhai` files of `dir`, sorted by name. A missing directory has none.
pub(super) fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
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

fn pos_error(file: &str, pos: rhai::Position, message: impl Into<String>) -> RuleError {
    RuleError {
        file: file.to_string(),
        line: pos.line().unwrap_or(0),
        col: pos.position().unwrap_or(0),
        message: message.into(),
    }
}
