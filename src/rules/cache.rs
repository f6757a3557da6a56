//! The decision cache: `route` decisions kept by what the rules read of an event, reused for a
//! publish that looks the same to them.

use super::{Decision, EventFields, RouteInput};

/// The decisions `route` made, by the event fields it read (and the publisher's targets, which a
/// decision without `to` keeps), so that a publish that looks the same to the rules as an earlier one
/// is not evaluated again: a chat room's messages differ in `data` and `id`, which the shipped route
/// does not read (its push text is a template, filled in per event). Used only when the rules are
/// pure (no `now_ms()` in `route` or what it calls: Rhai scripts have no other outside input) and read
/// nothing but `type`, `channel`, `room`, `from`, `source` and `to`. Errors are not kept. Bounded:
/// emptied when full. A reload builds a new rule set, with an empty cache.
pub(super) struct RouteCache {
    fields: EventFields,
    map: std::sync::Mutex<std::collections::HashMap<String, Cached>>,
}

/// A `route` outcome: the decision (templates not filled in) and the index of the file that made it,
/// or `None` when every file passed.
pub(super) type Cached = Option<(Decision, usize)>;

/// Entries a [`RouteCache`] holds before it is emptied.
const ROUTE_CACHE_ENTRIES: usize = 4096;

impl RouteCache {
    pub(super) fn new(fields: EventFields) -> Self {
        RouteCache {
            fields,
            map: Default::default(),
        }
    }

    /// What the routes see of `input`: the fields they read and the targets.
    pub(super) fn key(&self, input: &RouteInput<'_>) -> String {
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

    pub(super) fn get(&self, key: &str) -> Option<Cached> {
        self.map.lock().ok()?.get(key).cloned()
    }

    pub(super) fn put(&self, key: String, decided: Cached) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= ROUTE_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key, decided);
    }
}
