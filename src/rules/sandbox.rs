//! The sandbox a rule runs in: a Rhai engine with operation, call-depth, expression-depth, string,
//! array and map limits, no `eval`, no output, the clock as its one outside input, and a wall-time
//! budget per hook call.

use std::cell::Cell;
use std::time::{Duration, Instant};

use rhai::{AST, CallFnOptions, Dynamic, Engine, Scope};

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

/// Calls `hook` of the file `file` (compiled as `ast`) within `budget`; a failure names the file,
/// line and column.
pub(super) fn call_hook(
    engine: &Engine,
    budget: Budget,
    file: &str,
    ast: &AST,
    hook: &str,
    args: impl rhai::FuncArgs,
) -> Result<Dynamic, String> {
    let started = Instant::now();
    let deadline = started + budget.wall;
    DEADLINE.with(|d| d.set(Some(deadline)));
    let r = engine.call_fn_with_options::<Dynamic>(
        CallFnOptions::new().eval_ast(false),
        &mut Scope::new(),
        ast,
        hook,
        args,
    );
    DEADLINE.with(|d| d.set(None));
    crate::metrics::rule_call(hook, started.elapsed());
    r.map_err(|e| {
        let pos = e.position();
        let msg = e.to_string();
        match (pos.line(), pos.position()) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}: {hook}(): {msg}"),
            (Some(l), None) => format!("{file}:{l}: {hook}(): {msg}"),
            _ => format!("{file}: {hook}(): {msg}"),
        }
    })
}
