//! Push text templates. Instead of `push.title` and `push.body` (text as it is), a route may return
//! `push.title_template` and `push.body_template`: text naming fields of the event in braces, filled in
//! by the engine (in Rust, once per publish) after `route` returns:
//!
//! ```text
//! title_template: "{attrs.name ?? from}"    the sender's display name, or their id when the JWT has none
//! body_template:  "{data.text}"             the payload's `text`
//! body_template:  "{from} liked {data.post.title ?? \"your post\"}"
//! ```
//!
//! Templates are separate keys so that text a script builds from user content (`title: event.data.x`)
//! is never read as a template: a message containing `{attrs.email}` stays that text. Filled-in values
//! are not read again either.
//!
//! A placeholder is one or more alternatives separated by `??`; the first that is present (not missing,
//! not null) is used, and a quoted literal (`"…"`) always is. When none is, the placeholder is empty; a
//! title or body that renders empty is no title or body. The fields are `type`, `id`, `from`, `room`,
//! `channel`, `source`, `ts`, `attrs.KEY` and `data` followed by `.KEY` or `.INDEX` steps. Strings are
//! used as they are, numbers and booleans as written, objects and arrays as compact JSON. `{{` and `}}`
//! are literal braces. A literal cannot contain `"`, `}` or `??`. A malformed template is a rule error
//! (the event is routed by `on_error`; the fixtures catch it before a reload is accepted).
//!
//! Why templates: building the text in the script costs a Rhai map of the payload and the attrs and a
//! few dynamic reads on every publish; the same text filled in here costs a fraction of that, and a
//! route that only names fields keeps the event map it is given small (see [`super::fields`]).

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::RouteInput;

/// `text` with its placeholders filled from `input`. `Ok(None)` when it renders empty.
pub fn render(text: &str, input: &RouteInput<'_>) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(i) = rest.bytes().position(|b| b == b'{' || b == b'}') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if tail.starts_with('}') {
            return Err(format!(
                "a lone `}}` in {text:?} (write `}}}}` for a brace)"
            ));
        } else {
            let end = tail.bytes().position(|b| b == b'}').ok_or_else(|| {
                format!("an unclosed `{{` in {text:?} (write `{{{{` for a brace)")
            })?;
            placeholder(&tail[1..end], input, &mut out)?;
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok((!out.is_empty()).then_some(out))
}

/// Writes the first present alternative of `a ?? b ?? …` (nothing when none is).
fn placeholder(spec: &str, input: &RouteInput<'_>, out: &mut String) -> Result<(), String> {
    let mut found = false;
    let mut rest = Some(spec);
    while let Some(r) = rest {
        let (alt, next) = match r.as_bytes().windows(2).position(|w| w == b"??") {
            Some(i) => (&r[..i], Some(&r[i + 2..])),
            None => (r, None),
        };
        rest = next;
        let alt = alt.trim();
        // Every alternative is checked, even after the one used: a typo must not hide behind a
        // field that happens to be present in the fixtures. Only until one is present are they
        // looked up.
        if let Some(lit) = alt.strip_prefix('"') {
            let lit = lit
                .strip_suffix('"')
                .filter(|l| !l.contains('"'))
                .ok_or_else(|| format!("a bad literal {alt} in {{{spec}}}"))?;
            if !found {
                out.push_str(lit);
                found = true;
            }
        } else {
            found |= field(alt, input, spec, (!found).then_some(&mut *out))?;
        }
    }
    Ok(())
}

/// Writes the value of one field path to `out` and says whether it is present; with no `out`, only
/// checks that the path names a field.
fn field(
    path: &str,
    input: &RouteInput<'_>,
    spec: &str,
    out: Option<&mut String>,
) -> Result<bool, String> {
    let (root, rest) = first_step(path);
    let first = input.targets.first();
    let ts;
    let scalar: Option<&str> = match root {
        "type" => Some(input.event),
        "id" => Some(input.id),
        "from" => input.from,
        "channel" => first.map(|c| c.as_str()),
        "room" => first
            .filter(|c| {
                matches!(
                    c.kind(),
                    crate::channels::Kind::Room | crate::channels::Kind::Active
                )
            })
            .map(|c| c.id()),
        "source" => Some(input.source.as_str()),
        "ts" => {
            ts = input.ts.to_string();
            Some(&ts)
        }
        _ => None,
    };
    match root {
        "type" | "id" | "from" | "channel" | "room" | "source" | "ts" => {
            if rest.is_some() {
                return Err(format!("`{root}` has no fields, in {{{spec}}}"));
            }
            match (scalar, out) {
                (Some(v), Some(out)) => {
                    out.push_str(v);
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        "attrs" => {
            let key = rest
                .filter(|k| !k.is_empty())
                .ok_or_else(|| format!("`attrs` needs a key (attrs.name), in {{{spec}}}"))?;
            let Some(out) = out else { return Ok(false) };
            let mut steps = key.split('.');
            let first = steps.next().unwrap_or_default();
            let v = input.attrs.and_then(|a| a.get(first));
            Ok(walk(v, steps).is_some_and(|v| write_json(v, out)))
        }
        "data" => {
            let Some(out) = out else { return Ok(false) };
            let mut de = serde_json::Deserializer::from_str(input.data.get());
            Ok(Lookup { rest, out }.deserialize(&mut de).unwrap_or(false))
        }
        _ => Err(format!(
            "unknown field `{path}` in {{{spec}}} (fields: type, id, from, room, channel, source, ts, \
             attrs.KEY, data.KEY…)"
        )),
    }
}

/// `"a.b.c"` as `("a", Some("b.c"))`, `"a"` as `("a", None)`.
fn first_step(path: &str) -> (&str, Option<&str>) {
    match path.bytes().position(|b| b == b'.') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// Follows `.KEY` / `.INDEX` steps.
fn walk<'v, 's>(
    mut v: Option<&'v Value>,
    steps: impl Iterator<Item = &'s str>,
) -> Option<&'v Value> {
    for s in steps {
        v = match v? {
            Value::Object(m) => m.get(s),
            Value::Array(a) => s.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
    }
    v
}

/// Writes a JSON value as template text (strings as they are, numbers and booleans as written,
/// objects and arrays as compact JSON); `false` for null, which writes nothing.
fn write_json(v: &Value, out: &mut String) -> bool {
    match v {
        Value::Null => return false,
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
    true
}

/// Writes the value at `.KEY`/`.INDEX` steps of a JSON document, read in one pass without building
/// the rest of it (a chat payload's `text` without a map of the whole payload); `false` when a step is
/// missing or the value is null.
struct Lookup<'s, 'o> {
    /// The steps still to take (`"post.title"`); `None` at the value itself.
    rest: Option<&'s str>,
    out: &'o mut String,
}

impl<'de> DeserializeSeed<'de> for Lookup<'_, '_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        match self.rest {
            // Strings straight into `out`; anything else through a `Value`.
            None => d.deserialize_any(Leaf(self.out)),
            Some(_) => d.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Lookup<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<bool, A::Error> {
        let (step, rest) = first_step(self.rest.unwrap_or_default());
        let mut out = Some(self.out);
        let mut found = false;
        while let Some(hit) = m.next_key_seed(KeyIs(step))? {
            match out.take() {
                Some(o) if hit => found = m.next_value_seed(Lookup { rest, out: o })?,
                o => {
                    out = o;
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<bool, A::Error> {
        let (step, rest) = first_step(self.rest.unwrap_or_default());
        let want = step.parse::<usize>().ok();
        let mut out = Some(self.out);
        let mut found = false;
        let mut i = 0;
        loop {
            let more = match out.take() {
                Some(o) if Some(i) == want => {
                    match s.next_element_seed(Lookup { rest, out: o })? {
                        Some(f) => {
                            found = f;
                            true
                        }
                        None => false,
                    }
                }
                o => {
                    out = o;
                    s.next_element::<IgnoredAny>()?.is_some()
                }
            };
            if !more {
                break;
            }
            i += 1;
        }
        Ok(found)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// The value a lookup arrived at, written to the text.
struct Leaf<'o>(&'o mut String);

impl<'de> Visitor<'de> for Leaf<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        self.0.push_str(v);
        Ok(true)
    }
    fn visit_bool<E>(self, v: bool) -> Result<bool, E> {
        self.0.push_str(if v { "true" } else { "false" });
        Ok(true)
    }
    fn visit_i64<E>(self, v: i64) -> Result<bool, E> {
        self.0.push_str(&v.to_string());
        Ok(true)
    }
    fn visit_u64<E>(self, v: u64) -> Result<bool, E> {
        self.0.push_str(&v.to_string());
        Ok(true)
    }
    fn visit_f64<E>(self, v: f64) -> Result<bool, E> {
        Ok(write_json(&Value::from(v), self.0))
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<bool, A::Error> {
        let v = Value::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
        Ok(write_json(&v, self.0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<bool, A::Error> {
        let v = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(s))?;
        Ok(write_json(&v, self.0))
    }
}

/// Whether a map key is this one, without allocating it.
struct KeyIs<'s>(&'s str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, k: &str) -> Result<bool, E> {
        Ok(k == self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;
    use crate::channels::ChannelName;
    use crate::rules::Source;

    fn fill(
        tpl: &str,
        data: serde_json::Value,
        from: Option<&str>,
    ) -> Result<Option<String>, String> {
        let targets = [ChannelName::parse("room:r1").expect("valid")];
        let data = RawValue::from_string(data.to_string()).expect("json");
        let attrs = Arc::new(
            json!({ "name": "Alice Kim", "app": { "v": 3 } })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        let input = RouteInput {
            event: "chat.message",
            id: "e1",
            targets: &targets,
            from,
            data: &data,
            ts: 1_767_225_600_000,
            source: Source::Client,
            attrs: Some(&attrs),
        };
        render(tpl, &input)
    }

    fn ok(tpl: &str, data: serde_json::Value) -> String {
        fill(tpl, data, Some("alice"))
            .expect("renders")
            .unwrap_or_default()
    }

    #[test]
    fn fields_alternatives_and_literals() {
        let d = json!({ "text": "hi {there}", "n": 3, "f": 1.5, "ok": true, "post": { "title": "T" },
                        "items": [ { "name": "a" }, { "name": "b" } ], "none": null, "obj": { "a": [1] } });
        assert_eq!(ok("{from}: {data.text}", d.clone()), "alice: hi {there}");
        assert_eq!(ok("{attrs.name ?? from}", d.clone()), "Alice Kim");
        assert_eq!(ok("{attrs.nick ?? from}", d.clone()), "alice");
        assert_eq!(ok("{attrs.nick ?? \"someone\"}", d.clone()), "someone");
        assert_eq!(ok("{data.none ?? data.post.title}", d.clone()), "T");
        assert_eq!(ok("{data.items.1.name}", d.clone()), "b");
        assert_eq!(ok("{data.items.7.name ?? \"-\"}", d.clone()), "-");
        assert_eq!(
            ok("{data.n} {data.f} {data.ok} {attrs.app.v}", d.clone()),
            "3 1.5 true 3"
        );
        assert_eq!(ok("{data.obj}", d.clone()), r#"{"a":[1]}"#);
        assert_eq!(
            ok("{type} {id} {room} {channel} {source} {ts}", d.clone()),
            "chat.message e1 r1 room:r1 client 1767225600000"
        );
        assert_eq!(ok("{{literal}} }} {{", d.clone()), "{literal} } {");
        // A payload that is not an object has no fields; a missing field renders nothing.
        assert_eq!(fill("{data.text}", json!("hi"), None), Ok(None));
        assert_eq!(fill("{from}", json!({}), None), Ok(None));
        assert_eq!(ok("{data}", json!("whole")), "whole");
    }

    #[test]
    fn mistakes_are_errors_even_behind_a_present_alternative() {
        for tpl in [
            "{from ?? nope}",
            "{nope}",
            "{attrs}",
            "{from.x}",
            "{\"unclosed ?? from}",
            "open {from",
            "lone } brace",
        ] {
            assert!(fill(tpl, json!({}), Some("a")).is_err(), "{tpl}");
        }
    }
}
