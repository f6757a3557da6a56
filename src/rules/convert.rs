//! Values across the boundary: JSON into Rhai values and back, and the event map a `route` gets
//! (only the fields some `route` reads, built from a template).

use std::sync::LazyLock;

use rhai::Dynamic;
use serde_json::{Map, Value};

use super::{EventFields, RouteInput, Source};
use crate::channels::Kind;

/// A JSON value as a Rhai value.
pub(super) fn json_to_dynamic(v: &Value) -> Dynamic {
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
pub(super) fn json_object_to_map(m: &Map<String, Value>) -> rhai::Map {
    let mut out = rhai::Map::new();
    for (k, v) in m {
        out.insert(k.as_str().into(), json_to_dynamic(v));
    }
    out
}

/// A Rhai value as JSON (for `push.data`). Functions and custom types become strings.
pub(super) fn dynamic_to_json(d: &Dynamic) -> Value {
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

/// The user a permission or announcement hook gets: `{id, attrs}`.
pub(super) fn user_map(user: &str, attrs: &Map<String, Value>) -> Dynamic {
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
