//! Which fields of the event the `route` hooks read, found once per (re)load from the compiled scripts,
//! so that a publish builds only those: a route that reads `event.type` and `event.room` does not pay
//! for turning `data` (the payload) and `attrs` into Rhai values on every publish.
//!
//! The analysis is conservative. A field is left out only when no `route` can observe it: every use of
//! the event parameter must be a named property read (`event.type`, `event.data.text`,
//! `event.attrs?.name`). Any other use (`event["type"]`, `event.keys()`, `for x in event`,
//! `helper(event)`, `let e = event`, `break event`) makes that file need the whole map. Property names
//! that are not event fields add nothing: reading them gives `()` either way.

use rhai::{AST, ASTNode, Expr, Stmt};

/// The keys of the event map, in the map's (sorted) order. Bit `i` of [`EventFields`] is `EVENT_KEYS[i]`.
pub const EVENT_KEYS: [&str; 10] = [
    "attrs", "channel", "data", "from", "id", "room", "source", "to", "ts", "type",
];

/// A set of event fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventFields(u16);

impl EventFields {
    /// Every field.
    pub const ALL: EventFields = EventFields((1 << EVENT_KEYS.len()) - 1);
    /// No field.
    pub const NONE: EventFields = EventFields(0);

    /// Both sets.
    pub fn union(self, other: EventFields) -> EventFields {
        EventFields(self.0 | other.0)
    }

    /// Whether `key` (one of [`EVENT_KEYS`]) is in the set.
    pub fn contains(self, key: &str) -> bool {
        EVENT_KEYS
            .iter()
            .position(|k| *k == key)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// Whether these fields repeat from one publish to the next (no `data`, `attrs`, `id` or `ts`), so
    /// that decisions made on them are worth keeping.
    pub fn is_repetitive(self) -> bool {
        ["data", "attrs", "id", "ts"]
            .iter()
            .all(|k| !self.contains(k))
    }

    /// The set's keys, in [`EVENT_KEYS`] order.
    pub fn keys(self) -> impl Iterator<Item = &'static str> {
        EVENT_KEYS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, k)| *k)
    }

    fn with(self, key: &str) -> EventFields {
        match EVENT_KEYS.iter().position(|k| *k == key) {
            Some(i) => EventFields(self.0 | (1 << i)),
            None => self, // not an event field: `()` whether or not the map is complete
        }
    }
}

/// The event fields `fn route(event)` of `ast` can observe; [`EventFields::NONE`] when it has no `route`.
pub fn route_fields(ast: &AST) -> EventFields {
    let Some(param) = ast
        .iter_functions()
        .find(|f| f.name == "route" && f.params.len() == 1)
        .map(|f| f.params[0].to_string())
    else {
        return EventFields::NONE;
    };
    // Only `route`'s body: helpers can see the event only if `route` passes it, which is a use that
    // needs the whole map anyway.
    let route = only(ast, |name, arity| name == "route" && arity == 1);
    let mut fields = EventFields::NONE;
    let complete = route.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            // rhai's walk does not enter `break <value>`: what it carries is unseen, so assume the worst.
            Some(ASTNode::Stmt(Stmt::BreakLoop(Some(_), ..))) => false,
            Some(ASTNode::Expr(var @ Expr::Variable(v, ..))) if v.1.as_str() == param => {
                match read_property(path, var) {
                    Some(name) => {
                        fields = fields.with(name);
                        true
                    }
                    None => false, // stops the walk: the whole map
                }
            }
            _ => true,
        }
    });
    if complete { fields } else { EventFields::ALL }
}

/// Whether `route` in `ast`, or a function of `ast` it calls (directly or not), calls `name` (as
/// `name(..)` or `x.name(..)`). Other hooks and their helpers do not count.
pub fn route_calls(ast: &AST, name: &str) -> bool {
    let mut seen: Vec<String> = vec!["route".to_string()];
    let mut next = 0;
    while let Some(f) = seen.get(next).cloned() {
        next += 1;
        let body = only(ast, |n, _| n == f);
        let mut found = false;
        body.walk(&mut |path: &[ASTNode]| {
            let called = match path.last() {
                Some(ASTNode::Expr(Expr::FnCall(c, ..) | Expr::MethodCall(c, ..)))
                | Some(ASTNode::Stmt(Stmt::FnCall(c, ..))) => c.name.as_str(),
                _ => return true,
            };
            if called == name {
                found = true;
                return false;
            }
            if !seen.iter().any(|s| s == called) && ast.iter_functions().any(|d| d.name == called) {
                seen.push(called.to_string());
            }
            true
        });
        if found {
            return true;
        }
    }
    false
}

/// The functions of `ast` that `keep` (name, arity) keeps, and no top-level statements.
fn only(ast: &AST, keep: impl Fn(&str, usize) -> bool) -> AST {
    // Not `clone_functions_only_filtered`: in rhai 1.27 it keeps every function when it copies into
    // an empty module.
    let mut out = ast.clone_functions_only();
    out.retain_functions(|_, _, name, arity| keep(name, arity));
    out
}

/// The property `var` (the last node of `path`) is read through: `var.name…` or `var?.name…`. `None` for
/// any other use of the variable.
fn read_property<'a>(path: &[ASTNode<'a>], var: &Expr) -> Option<&'a str> {
    let parent = path.len().checked_sub(2).and_then(|i| path.get(i))?;
    let ASTNode::Expr(Expr::Dot(x, ..)) = parent else {
        return None;
    };
    if !std::ptr::eq(&x.lhs, var) {
        return None;
    }
    // `a.b.c` is `Dot(a, Dot(b, c))` and `a.b[i]` is `Dot(a, Index(b, i))`: the first property is the
    // left-most leaf of the right side. A method call (`a.keys()`) is not a property read.
    let mut e = &x.rhs;
    loop {
        match e {
            Expr::Property(p, ..) => return Some(p.2.as_str()),
            Expr::Dot(y, ..) | Expr::Index(y, ..) => e = &y.lhs,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(script: &str) -> Vec<&'static str> {
        let engine = crate::rules::sandbox::sandbox(crate::rules::Budget::default());
        let ast = engine.compile(script).expect("compiles");
        let f = route_fields(&ast);
        if f == EventFields::ALL {
            return vec!["ALL"];
        }
        f.keys().collect()
    }

    #[test]
    fn property_reads_name_only_what_they_read() {
        let s = r#"fn route(event) {
            switch event.type {
                "a" => { let r = event.room; if r == () { return; } #{ to: "room:" + r } }
                "b" => #{ to: event.data.text, except: event.attrs?.name ?? event.from },
                "c" => `${event.ts}`,
                _ => ()
            }
        }"#;
        assert_eq!(fields(s), ["attrs", "data", "from", "room", "ts", "type"]);
        // Unknown properties add nothing; another parameter name is followed.
        assert_eq!(fields("fn route(e) { e.nope; e.id }"), ["id"]);
        assert_eq!(fields("fn route(e) { e.data[0].x }"), ["data"]);
        assert_eq!(fields("fn route(e) { e.to.len() }"), ["to"]);
        // Other hooks and helpers do not count; no `route`, no fields.
        assert_eq!(
            fields("fn route(e) { e.type } fn other(e) { e.keys() } fn can_publish(u, c, e) { e }"),
            ["type"]
        );
        assert_eq!(
            fields("fn can_publish(u, c, event) { event.x } fn h(event) { event.y }"),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn clock_calls_and_repeating_fields() {
        let engine = crate::rules::sandbox::sandbox(crate::rules::Budget::default());
        let ast = |s: &str| engine.compile(s).expect("compiles");
        let clock = |s: &str| route_calls(&ast(s), "now_ms");
        assert!(clock(
            "fn route(e) { h() } fn h() { g(1) } fn g(x) { let t = now_ms(); t }"
        ));
        assert!(clock("fn route(e) { now_ms(); }"));
        assert!(clock("fn route(e) { e.x.h() } fn h() { this + now_ms() }"));
        assert!(!clock("fn route(e) { e.now_ms }"));
        // Another hook's clock does not make `route` impure.
        assert!(!clock(
            "fn route(e) { h() } fn h() { 1 } fn announce(a, u) { now_ms() }"
        ));
        let f = |s: &str| route_fields(&ast(s)).is_repetitive();
        assert!(f(
            "fn route(e) { e.type + e.room + e.from + e.to + e.channel + e.source }"
        ));
        for field in ["data", "attrs", "id", "ts"] {
            assert!(
                !f(&format!("fn route(e) {{ e.type + e.{field} }}")),
                "{field}"
            );
        }
    }

    #[test]
    fn any_other_use_needs_the_whole_map() {
        for s in [
            r#"fn route(event) { event["type"] }"#,
            "fn route(event) { event.keys() }",
            "fn route(event) { for x in event { } }",
            "fn route(event) { helper(event) } fn helper(e) { e.id }",
            "fn route(event) { let e = event; e.id }",
            "fn route(event) { event }",
            "fn route(event) { loop { break event; } }",
            "fn route(event) { event.type_of() }",
            "fn route(event) { #{ x: event } }",
            r#"fn route(event) { "id" in event }"#,
        ] {
            assert_eq!(fields(s), ["ALL"], "{s}");
        }
    }
}
