//! The protocol reference (`docs/protocol.md`) and the OpenAPI description (`docs/openapi.json`) held
//! to the code. The doc's tables are read as data and compared with what the server does (its op
//! names, close codes, error codes, routes and limits), every JSON example must parse, every WebSocket
//! op example is sent to a real server and its answer compared with the one shown (type, `ok`, error
//! code, field names), and every route has exactly one OpenAPI operation. Where the list to compare
//! with exists only as code (the ops `protocol::parse` accepts, the close codes and error codes), it is
//! read from the source file that defines it, so a new op or code fails here until it is documented.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

// ---- reading the repository's files ----

fn repo_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn protocol_doc() -> String {
    repo_file("docs/protocol.md")
}

fn openapi_doc() -> Value {
    serde_json::from_str(&repo_file("docs/openapi.json")).expect("docs/openapi.json is JSON")
}

// ---- reading markdown ----

/// The text under `heading` (a whole heading line, e.g. `### Client ops`), up to the next heading of
/// any level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/protocol.md has no section {heading:?}"))
        + heading.len()
        + 2;
    let rest = &doc[start..];
    let end = rest.find("\n#").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The markdown tables of `text`, each as its rows (cells trimmed, header and separator left out).
fn tables(text: &str) -> Vec<Vec<Vec<String>>> {
    let mut out: Vec<Vec<Vec<String>>> = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        if !in_table {
            // The header row.
            in_table = true;
            out.push(Vec::new());
            continue;
        }
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ' '))
        {
            continue;
        }
        out.last_mut().unwrap().push(cells);
    }
    out
}

/// The rows of every table in `text`.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    tables(text).into_iter().flatten().collect()
}

/// The rows of the first table in `text`.
fn first_table(text: &str) -> Vec<Vec<String>> {
    tables(text).into_iter().next().unwrap_or_default()
}

/// A cell without its backticks.
fn plain(cell: &str) -> String {
    cell.replace('`', "")
}

/// The backticked words of a cell (`"`a`, `b`?"` -> a, b?).
fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// Every ```json block of the doc: its first line number and its values (the whole block as one value,
/// or else one value per line).
fn json_blocks(doc: &str) -> Vec<(usize, Vec<Value>)> {
    fenced(doc, "json")
        .into_iter()
        .map(|(line, text)| {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return (line, vec![v]);
            }
            let values = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l).unwrap_or_else(|e| {
                        panic!(
                            "docs/protocol.md:{}: a JSON example does not parse ({e}): {l}",
                            line + 1 + i
                        )
                    })
                })
                .collect();
            (line, values)
        })
        .collect()
}

/// The fenced blocks tagged `lang`: (line of the first content line, text).
fn fenced(doc: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        let t = line.trim();
        match &mut open {
            None if t == format!("```{lang}") => open = Some((i + 2, String::new())),
            None => {}
            Some(_) if t == "```" => out.push(open.take().unwrap()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(
        open.is_none(),
        "docs/protocol.md: an unclosed ```{lang} block"
    );
    out
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

// ---- reading the source files that hold the lists ----

/// The body of the first `fn {name}` in `src` (to the end of the function, at its indentation).
fn fn_body<'a>(src: &'a str, file: &str, name: &str) -> &'a str {
    let at = src
        .find(&format!("fn {name}("))
        .unwrap_or_else(|| panic!("{file} has no fn {name}: update tests/integration/docs.rs"));
    let line_start = src[..at].rfind('\n').map_or(0, |i| i + 1);
    let indent = &src[line_start..at];
    let indent: String = indent.chars().take_while(|c| *c == ' ').collect();
    let end_marker = format!("\n{indent}}}\n");
    let end = src[at..]
        .find(&end_marker)
        .unwrap_or_else(|| panic!("{file}: the end of fn {name}"));
    &src[at..at + end]
}

/// The `Enum::Variant => value` arms of a function's match: variant -> value (quotes and a trailing
/// comma removed).
fn match_arms(body: &str, enum_name: &str) -> BTreeMap<String, String> {
    let prefix = format!("{enum_name}::");
    body.lines()
        .filter_map(|l| {
            let (lhs, rhs) = l.split_once("=>")?;
            let variant = lhs.trim().strip_prefix(&prefix)?;
            let value = rhs.trim().trim_end_matches(',').trim_matches('"');
            Some((variant.trim().to_string(), value.to_string()))
        })
        .collect()
}

/// The op names `protocol::parse` accepts: the arms of `op_of`.
fn ops_in_code() -> BTreeSet<String> {
    let file = "src/engine/protocol.rs";
    let src = repo_file(file);
    let body = fn_body(&src, file, "op_of");
    let ops: BTreeSet<String> = body
        .lines()
        .filter(|l| l.contains("=> Op::"))
        .filter_map(|l| {
            l.trim()
                .strip_prefix('"')?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert!(
        ops.len() > 10,
        "{file}: could not read the ops of op_of: {ops:?}"
    );
    ops
}

/// A status name in the source (`StatusCode::BAD_REQUEST`) as its number.
fn status_number(name: &str) -> u16 {
    match name {
        "BAD_REQUEST" => 400,
        "UNAUTHORIZED" => 401,
        "FORBIDDEN" => 403,
        "NOT_FOUND" => 404,
        "METHOD_NOT_ALLOWED" => 405,
        "REQUEST_TIMEOUT" => 408,
        "CONFLICT" => 409,
        "PAYLOAD_TOO_LARGE" => 413,
        "UPGRADE_REQUIRED" => 426,
        "TOO_MANY_REQUESTS" => 429,
        "REQUEST_HEADER_FIELDS_TOO_LARGE" => 431,
        "INTERNAL_SERVER_ERROR" => 500,
        "SERVICE_UNAVAILABLE" => 503,
        other => panic!("tests/integration/docs.rs does not know StatusCode::{other}: add it"),
    }
}

/// Every (error code, HTTP status) the code can answer: engine codes with the status the transport
/// maps them to, and the codes the transport makes itself (`ApiError::new(StatusCode::X, "code"`).
fn error_codes_in_code() -> BTreeMap<String, BTreeSet<u16>> {
    let engine = repo_file("src/engine/mod.rs");
    let as_str = fn_body(&engine, "src/engine/mod.rs", "as_str");
    let names = match_arms(as_str, "ErrorCode");
    assert!(
        names.len() > 8,
        "could not read ErrorCode::as_str: {names:?}"
    );
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let transport = repo_file("src/transport/mod.rs");
    let from = transport
        .split("impl From<EngineError> for ApiError")
        .nth(1)
        .expect("src/transport/mod.rs: impl From<EngineError> for ApiError");
    let from = &from[..from.find("\nimpl ").unwrap_or(from.len())];
    for line in from.lines().filter(|l| l.contains("=> StatusCode::")) {
        let (lhs, rhs) = line.split_once("=>").unwrap();
        let status = status_number(
            rhs.trim()
                .trim_end_matches(',')
                .trim_start_matches("StatusCode::"),
        );
        for variant in lhs.split('|') {
            let variant = variant.trim().trim_start_matches("ErrorCode::");
            let code = names
                .get(variant)
                .unwrap_or_else(|| panic!("ErrorCode::{variant} has no as_str arm"));
            out.entry(code.clone()).or_default().insert(status);
        }
    }
    for v in names.values() {
        assert!(out.contains_key(v), "ErrorCode {v:?} has no HTTP status");
    }
    for file in ["mod.rs", "api.rs", "sse.rs", "ws.rs", "admin.rs"] {
        let src = repo_file(&format!("src/transport/{file}"));
        for piece in src.split("ApiError::new(").skip(1) {
            let piece = piece.trim_start();
            let Some(rest) = piece.strip_prefix("StatusCode::") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            let rest = rest[name.len()..]
                .trim_start()
                .trim_start_matches(',')
                .trim_start();
            let Some(code) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                continue;
            };
            out.entry(code.to_string())
                .or_default()
                .insert(status_number(&name));
        }
    }
    out
}

/// The close reasons: code -> (reason text, reconnect), from `CloseReason`'s `code`, `text` and
/// `reconnect`.
fn close_codes_in_code() -> BTreeMap<u16, (String, bool)> {
    let file = "src/engine/hub.rs";
    let src = repo_file(file);
    let codes = match_arms(fn_body(&src, file, "code"), "CloseReason");
    let texts = match_arms(fn_body(&src, file, "text"), "CloseReason");
    let reconnect_body = fn_body(&src, file, "reconnect");
    let reconnect: BTreeSet<&str> = reconnect_body
        .split("CloseReason::")
        .skip(1)
        .map(|s| {
            s.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap()
        })
        .collect();
    assert!(codes.len() > 10, "{file}: could not read CloseReason::code");
    codes
        .iter()
        .map(|(variant, code)| {
            let text = texts
                .get(variant)
                .unwrap_or_else(|| panic!("CloseReason::{variant} has no text"));
            (
                code.parse().unwrap(),
                (text.clone(), reconnect.contains(variant.as_str())),
            )
        })
        .collect()
}

// ---- the doc's tables ----

/// The ops of the "Client ops" table: op -> the reply fields it lists (optional ones end with `?`).
fn doc_ops(doc: &str) -> BTreeMap<String, Vec<String>> {
    first_table(section(doc, "### Client ops"))
        .into_iter()
        .map(|row| {
            let op = plain(&row[0]);
            let reply = backticked(&row[2]).iter().map(|s| s.to_string()).collect();
            (op, reply)
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    None,
    ApiKey,
    Jwt,
    Admin,
}

impl Auth {
    fn parse(cell: &str) -> Auth {
        match cell.to_ascii_lowercase().as_str() {
            "none" => Auth::None,
            "api key" => Auth::ApiKey,
            "client jwt" => Auth::Jwt,
            "admin key" => Auth::Admin,
            other => panic!("docs/protocol.md: unknown auth {other:?} in an endpoint table"),
        }
    }

    /// The OpenAPI security scheme of this credential.
    fn scheme(self) -> Option<&'static str> {
        match self {
            Auth::None => None,
            Auth::ApiKey => Some("apiKey"),
            Auth::Jwt => Some("clientJwt"),
            Auth::Admin => Some("adminKey"),
        }
    }
}

/// One row of an endpoint table.
#[derive(Clone, Debug)]
struct Endpoint {
    method: String,
    path: String,
    auth: Auth,
    /// Whether it takes a JSON body.
    body: bool,
    /// The statuses it lists besides 401 and 503.
    errors: BTreeSet<u16>,
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Every row of the doc's endpoint tables (a method, then a backticked path).
fn doc_endpoints(doc: &str) -> Vec<Endpoint> {
    let rows: Vec<Endpoint> = table_rows(doc)
        .into_iter()
        .filter(|r| r.len() >= 6 && METHODS.contains(&r[0].as_str()) && r[1].starts_with("`/"))
        .map(|r| Endpoint {
            method: r[0].clone(),
            path: plain(&r[1]),
            auth: Auth::parse(&r[2]),
            body: r[3] != "—",
            errors: r[5]
                .split(',')
                .map(str::trim)
                .filter(|s| *s != "—")
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| panic!("{}: error status {s:?}", r[1]))
                })
                .collect(),
        })
        .collect();
    assert!(rows.len() > 30, "could not read the endpoint tables");
    rows
}

fn route_set() -> BTreeSet<(String, String)> {
    let table = herald::transport::route_table();
    let set: BTreeSet<(String, String)> = table
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(set.len(), table.len(), "a route is registered twice");
    set
}

/// The operations of the OpenAPI description: (METHOD, path) -> operation.
fn openapi_operations(api: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in api["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            if method == "parameters" {
                continue;
            }
            out.insert((method.to_ascii_uppercase(), path.clone()), op.clone());
        }
    }
    out
}

/// Differences between two sets, named, for an assertion message.
fn diff<T: Ord + std::fmt::Debug>(
    a: &BTreeSet<T>,
    a_name: &str,
    b: &BTreeSet<T>,
    b_name: &str,
) -> String {
    let only_a: Vec<&T> = a.difference(b).collect();
    let only_b: Vec<&T> = b.difference(a).collect();
    format!(
        "in {a_name} but not in {b_name}: {only_a:?}; in {b_name} but not in {a_name}: {only_b:?}"
    )
}

// ---- the doc against itself and the code ----

#[test]
fn every_json_example_parses_and_sse_examples_are_real_cursors() {
    let doc = protocol_doc();
    let blocks = json_blocks(&doc);
    assert!(
        blocks.len() > 40,
        "only {} JSON examples found",
        blocks.len()
    );
    // The SSE examples: every `id:` is a herald cursor, every `data:` JSON.
    let mut ids = 0;
    for (line, text) in fenced(&doc, "text") {
        for l in text.lines() {
            if let Some(id) = l.strip_prefix("id: ") {
                assert!(
                    herald::event::Cursor::decode(id).is_some(),
                    "docs/protocol.md:{line}: `id: {id}` is not a herald cursor"
                );
                ids += 1;
            }
            if let Some(data) = l.strip_prefix("data: ") {
                serde_json::from_str::<Value>(data).unwrap_or_else(|e| {
                    panic!("docs/protocol.md:{line}: SSE data is not JSON ({e}): {data}")
                });
            }
        }
    }
    assert!(ids > 0, "the SSE example has no cursor");
}

#[test]
fn the_op_table_lists_exactly_the_ops_the_server_parses() {
    let doc = protocol_doc();
    let documented: BTreeSet<String> = doc_ops(&doc).into_keys().collect();
    let code = ops_in_code();
    assert_eq!(
        documented,
        code,
        "the op table of docs/protocol.md and op_of in src/engine/protocol.rs differ: {}",
        diff(&documented, "the doc", &code, "the code")
    );
    // Each op has an example that the op-examples test runs.
    let examples: BTreeSet<String> = json_blocks(&doc)
        .iter()
        .filter_map(|(_, v)| v[0]["op"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = documented.difference(&examples).collect();
    assert!(missing.is_empty(), "ops without an example: {missing:?}");
}

#[test]
fn the_close_code_table_is_the_servers() {
    let doc = protocol_doc();
    let documented: BTreeMap<u16, (String, bool)> = first_table(section(&doc, "### Close codes"))
        .into_iter()
        .map(|r| {
            let code: u16 = r[0]
                .parse()
                .unwrap_or_else(|_| panic!("close code {:?}", r[0]));
            let reconnect = match r[2].as_str() {
                "true" => true,
                "false" => false,
                other => panic!("close code {code}: reconnect {other:?}"),
            };
            (code, (plain(&r[1]), reconnect))
        })
        .collect();
    let code = close_codes_in_code();
    assert_eq!(
        documented.keys().collect::<BTreeSet<_>>(),
        code.keys().collect::<BTreeSet<_>>(),
        "close codes: {}",
        diff(
            &documented.keys().collect(),
            "the doc",
            &code.keys().collect(),
            "CloseReason"
        )
    );
    for (c, want) in &code {
        assert_eq!(
            &documented[c], want,
            "close code {c}: doc (reason, reconnect) vs code"
        );
    }
}

/// The protocol's error table: each code and the HTTP statuses it lists.
pub(crate) fn documented_error_codes() -> BTreeMap<String, BTreeSet<u16>> {
    first_table(section(&protocol_doc(), "### Error codes"))
        .into_iter()
        .map(|r| {
            let c = plain(&r[0]);
            let statuses = r[1]
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{c}: status {s:?}"))
                })
                .collect();
            (c, statuses)
        })
        .collect()
}

/// The server frame types the protocol's table lists.
pub(crate) fn documented_server_frames() -> BTreeSet<String> {
    first_table(section(&protocol_doc(), "### Server frames"))
        .into_iter()
        .map(|r| plain(&r[0]))
        .collect()
}

#[test]
fn the_error_code_table_is_the_servers() {
    let documented = documented_error_codes();
    let code = error_codes_in_code();
    let a: BTreeSet<&String> = documented.keys().collect();
    let b: BTreeSet<&String> = code.keys().collect();
    assert_eq!(a, b, "error codes: {}", diff(&a, "the doc", &b, "the code"));
    for (c, statuses) in &code {
        let cell = &documented[c];
        for s in statuses {
            assert!(
                cell.contains(s),
                "error code {c}: the code answers {s}, the doc lists {cell:?}"
            );
        }
    }
}

#[test]
fn the_endpoint_tables_list_exactly_the_routes() {
    let doc = protocol_doc();
    let rows = doc_endpoints(&doc);
    let documented: BTreeSet<(String, String)> = rows
        .iter()
        .map(|e| (e.method.clone(), e.path.clone()))
        .collect();
    assert_eq!(documented.len(), rows.len(), "an endpoint is listed twice");
    let routes = route_set();
    assert_eq!(
        documented,
        routes,
        "endpoints: {}",
        diff(&documented, "docs/protocol.md", &routes, "the router")
    );
}

/// The doc's default of a limit, as the code holds it (`None`: checked over the wire instead, by
/// `the_documented_limits_hold_over_the_wire`).
fn limit_in_code(name: &str) -> Option<String> {
    use herald::engine::limits::*;
    let c = herald::config::Config::defaults();
    let l = &c.limits;
    let secs = |d: Duration| format!("{} s", d.as_secs());
    Some(match name {
        "`limits.frame_bytes`" => l.frame_bytes.to_string(),
        "`limits.frames_per_second`" => l.frames_per_second.to_string(),
        "`limits.violations_before_disconnect`" => l.violations_before_disconnect.to_string(),
        "`limits.connections_per_user`" => l.connections_per_user.to_string(),
        "`limits.queue_frames`" => l.queue_frames.to_string(),
        "`limits.subscriptions_per_connection`" => l.subscriptions_per_connection.to_string(),
        "`limits.connect_timeout`" => secs(l.connect_timeout),
        "`limits.typing_interval`" => secs(l.typing_interval),
        "`presence.ttl`" => secs(c.presence_ttl),
        "`presence.heartbeat`" => secs(c.heartbeat),
        "`presence.room_interval`" => secs(c.room_presence.interval),
        "`presence.room_batch_max`" => c.room_presence.batch_max.to_string(),
        "`http.read_timeout`" => secs(c.read_timeout),
        "request head fields" => herald::transport::conn::MAX_HEADERS.to_string(),
        "request head bytes" => herald::transport::conn::MAX_HEADER_BYTES.to_string(),
        "users per `presence` / `watch` / query" => MAX_USERS_PER_OP.to_string(),
        "history page" => MAX_HISTORY_LIMIT.to_string(),
        "contacts per user" => MAX_CONTACTS.to_string(),
        "targets per publish" => MAX_TARGETS.to_string(),
        "backend deadline" => secs(herald::engine::BACKEND_DEADLINE),
        _ => return None,
    })
}

/// The limits the wire test checks: the doc's row name.
const WIRE_LIMITS: [&str; 6] = [
    "channels per SSE stream",
    "status text",
    "idempotency key",
    "announcement title",
    "ids (user, room, device)",
    "event type",
];

fn doc_limits(doc: &str) -> Vec<(String, String, String)> {
    first_table(section(doc, "## Limits"))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect()
}

#[test]
fn the_limits_table_is_the_configs() {
    let doc = protocol_doc();
    for (name, default, _) in doc_limits(&doc) {
        match limit_in_code(&name) {
            Some(want) => assert_eq!(default, want, "limit {name}: doc vs code"),
            None => assert!(
                WIRE_LIMITS.contains(&name.as_str()),
                "limit {name}: tests/integration/docs.rs checks it neither against the code nor over \
                 the wire"
            ),
        }
    }
}

// ---- the doc against a running server ----

/// The number a limit row gives (`256 characters` -> 256), and the error code of its "over it" cell.
fn limit_row(doc: &str, name: &str) -> (usize, String) {
    let (_, default, over) = doc_limits(doc)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("docs/protocol.md: no limit {name:?}"));
    let n = default
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("limit {name}: {default:?}"));
    let code = backticked(&over)
        .first()
        .unwrap_or_else(|| panic!("limit {name}: no error code in {over:?}"))
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ')
        .to_string();
    (n, code)
}

#[tokio::test]
async fn the_documented_limits_hold_over_the_wire() {
    let doc = protocol_doc();
    let t = TestServer::start().await;
    t.join("r1", "alice").await;

    // Channels per SSE stream: n is refused for its count only past n.
    let (n, code) = limit_row(&doc, "channels per SSE stream");
    let token = t.token("alice");
    let list = |k: usize| {
        (0..k)
            .map(|i| format!("room:s{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (s, v) = probe(
        &t,
        "GET",
        &format!("/sse?channels={}&token={token}", list(n + 1)),
        None,
        None,
    )
    .await;
    assert_error(&(s, v), 413, &code);
    let (s, v) = probe(
        &t,
        "GET",
        &format!("/sse?channels={}&token={token}", list(n)),
        None,
        None,
    )
    .await;
    assert_ne!(v["error"]["code"], code, "{n} channels: {s} {v}");

    // Status text.
    let (n, code) = limit_row(&doc, "status text");
    let mut ws = t.ws("alice").await;
    let ok = ws
        .request(json!({"op": "status", "status": "busy", "text": "x".repeat(n)}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let over = ws
        .request(json!({"op": "status", "status": "busy", "text": "x".repeat(n + 1)}))
        .await;
    assert_eq!(over["error"]["code"], code.as_str(), "{over}");

    // Idempotency key.
    let (n, code) = limit_row(&doc, "idempotency key");
    let body = |k: usize| json!({"event": "e", "to": ["alice"], "idempotency_key": "k".repeat(k)});
    assert_eq!(t.try_publish(body(n)).await.0, 200);
    assert_error(&t.try_publish(body(n + 1)).await, 400, &code);

    // Announcement title.
    let (n, code) = limit_row(&doc, "announcement title");
    let body = |k: usize| Some(json!({"title": "t".repeat(k), "body": "b"}));
    assert_eq!(t.api("POST", "/api/v1/announcements", body(n)).await.0, 200);
    assert_error(
        &t.api("POST", "/api/v1/announcements", body(n + 1)).await,
        400,
        &code,
    );

    // Ids.
    let (n, code) = limit_row(&doc, "ids (user, room, device)");
    let path = |k: usize| format!("/api/v1/rooms/{}/members/alice", "r".repeat(k));
    assert_eq!(t.api("PUT", &path(n), None).await.0, 200);
    assert_error(&t.api("PUT", &path(n + 1), None).await, 400, &code);

    // Event type.
    let (n, code) = limit_row(&doc, "event type");
    let body = |k: usize| json!({"event": "e".repeat(k), "to": ["alice"]});
    assert_eq!(t.try_publish(body(n)).await.0, 200);
    assert_error(&t.try_publish(body(n + 1)).await, 400, &code);
    t.stop().await;
}

/// The world every op example runs in: `alice` and `bob` members of `r1`, `bob` alice's contact, two
/// messages from `bob` in `r1`.
async fn example_world() -> TestServer {
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    t.join("r1", "bob").await;
    let (s, _) = t
        .api(
            "PUT",
            "/api/v1/users/alice/contacts",
            Some(json!({"contacts": ["bob"]})),
        )
        .await;
    assert_eq!(s, 200);
    for text in ["hi alice", "are you there?"] {
        t.publish(
            json!({"event": "chat.message", "room": "r1", "from": "bob", "data": {"text": text}}),
        )
        .await;
    }
    t
}

/// Asserts that `got` is the frame `want` shows: the same type, the same `ok` and error code, and the
/// same field names.
fn assert_like(want: &Value, got: &Value, at: &str) {
    assert_eq!(got["type"], want["type"], "{at}: type; got {got}");
    if want.get("ok").is_some() {
        assert_eq!(got["ok"], want["ok"], "{at}: ok; got {got}");
    }
    if want.get("error").is_some() {
        assert_eq!(
            got["error"]["code"], want["error"]["code"],
            "{at}: error code; got {got}"
        );
    }
    assert_eq!(keys(got), keys(want), "{at}: field names; got {got}");
}

/// Sends an op example's first line as `alice` and checks the frames that follow it against the
/// example's next lines (the reply first).
/// Sends `request` and waits for the frame answering its `ref`.
async fn ask(ws: &mut Ws, request: Value) -> Value {
    let reference = request["ref"].clone();
    ws.send(request).await;
    ws.wait_for(|v| {
        v.get("ref") == Some(&reference)
            && ["reply", "pong", "connected"].contains(&v["type"].as_str().unwrap_or(""))
    })
    .await
}

async fn run_op_example(line: usize, frames: &[Value]) {
    let at = format!("docs/protocol.md:{line}");
    assert!(
        frames.len() >= 2,
        "{at}: an op example shows its reply on the next line"
    );
    let t = example_world().await;
    let mut request = frames[0].clone();
    let op = request["op"].as_str().unwrap().to_string();
    if request.get("token").is_some() {
        request["token"] = json!(t.token("alice"));
    }
    if let Some(since) = request.get_mut("since") {
        let channel = frames[0]["channel"].as_str().unwrap();
        since["epoch"] = t.history(channel, 0).await["epoch"].clone();
    }
    let opens = op == "connect" && frames[1]["type"] == "connected";
    let mut ws = if opens {
        Ws::connect(&t.ws_url("")).await
    } else {
        let mut ws = t.ws("alice").await;
        if op != "subscribe" {
            ws.subscribed("room:r1").await;
        }
        ws
    };
    let reply = ask(&mut ws, request).await;
    assert_like(&frames[1], &reply, &at);
    let mut rest = frames[2..].iter();
    while let Some(want) = rest.next() {
        // A further op in the block: sent on the same connection, its reply on the next line.
        if want.get("op").is_some() {
            let shown = rest
                .next()
                .unwrap_or_else(|| panic!("{at}: the op {want} shows no reply"));
            assert_like(shown, &ask(&mut ws, want.clone()).await, &at);
            continue;
        }
        let got = ws
            .wait_for(|v| {
                v["type"] == want["type"]
                    && v.get("event") == want.get("event")
                    && v.get("channel") == want.get("channel")
            })
            .await;
        assert_like(want, &got, &at);
    }
    t.stop().await;
}

#[tokio::test]
async fn every_op_example_answers_as_shown() {
    let doc = protocol_doc();
    let mut ran = 0;
    for (line, frames) in json_blocks(&doc) {
        if frames[0].get("op").is_some() {
            run_op_example(line, &frames).await;
            ran += 1;
        }
    }
    assert!(ran > 20, "only {ran} op examples ran");
}

/// The op table's reply fields are those of the op's example reply (the optional ones aside).
#[test]
fn the_op_tables_reply_fields_are_the_examples() {
    let doc = protocol_doc();
    let ops = doc_ops(&doc);
    for (_, frames) in json_blocks(&doc) {
        let Some(op) = frames[0]["op"].as_str() else {
            continue;
        };
        let reply = &frames[1];
        if reply["type"] != "reply" || reply["ok"] != true {
            continue;
        }
        let listed = ops
            .get(op)
            .unwrap_or_else(|| panic!("op {op} has an example but no row in the op table"));
        let shown: BTreeSet<String> = keys(reply)
            .into_iter()
            .filter(|k| !["type", "ref", "ok"].contains(&k.as_str()))
            .collect();
        let required: BTreeSet<String> = listed
            .iter()
            .filter(|f| !f.ends_with('?'))
            .cloned()
            .collect();
        let all: BTreeSet<String> = listed
            .iter()
            .map(|f| f.trim_end_matches('?').to_string())
            .collect();
        assert!(
            required.is_subset(&shown) && shown.is_subset(&all),
            "op {op}: the table lists reply fields {listed:?}, its example shows {shown:?}"
        );
    }
}

#[tokio::test]
async fn real_server_frames_look_like_the_examples() {
    let doc = protocol_doc();
    let types = documented_server_frames();
    let examples: Vec<Value> = json_blocks(&doc)
        .into_iter()
        .flat_map(|(_, v)| v)
        .filter(|v| v.get("type").is_some())
        .collect();
    let example_types: BTreeSet<String> = examples
        .iter()
        .map(|v| v["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        example_types,
        "server frame types: {}",
        diff(&types, "the table", &example_types, "the examples")
    );

    // Make one real frame of every kind.
    // Room presence held over 3 s, at most one user named per frame (so `more` shows).
    let t = TestServer::start_with(|c| {
        c.room_presence.interval = Duration::from_secs(3);
        c.room_presence.batch_max = 1;
    })
    .await;
    for u in ["alice", "bob", "carol", "dave"] {
        t.join("r1", u).await;
    }
    let mut seen: Vec<Value> = Vec::new();
    let mut alice = t.ws("alice").await;
    seen.push(alice.connected.clone());
    seen.push(alice.subscribed("room:r1").await);
    seen.push(alice.request(json!({"op": "ping"})).await);
    seen.push(
        alice
            .request(json!({"op": "watch", "users": ["bob"]}))
            .await,
    );
    seen.push(alice.request(json!({"op": "focus", "room": "r1"})).await);
    let mut bob = t.ws("bob").await;
    seen.push(
        alice
            .wait_for(|v| v["type"] == "presence.changed" && v["online"] == true)
            .await,
    );
    // alice's own join opened the room's window: bob's, alone in it, goes out at its end in the
    // one-user form; the two joins in the next window go out together.
    bob.subscribed("room:r1").await;
    seen.push(alice.wait_for(|v| v["type"] == "presence.update").await);
    let mut carol = t.ws("carol").await;
    let mut dave = t.ws("dave").await;
    carol.subscribed("room:r1").await;
    dave.subscribed("room:r1").await;
    seen.push(
        alice
            .wait_for(|v| v["type"] == "presence.update" && v.get("users").is_some())
            .await,
    );
    bob.request(json!({"op": "publish", "channel": "room:r1", "event": "chat.message", "data": {"text": "hi"}}))
        .await;
    seen.push(alice.event_on("room:r1").await);
    bob.request(json!({"op": "typing", "room": "r1"})).await;
    seen.push(alice.event_on("active:r1").await);
    // A reset: resuming an SSE stream under an epoch the channel does not have.
    let mut cursor = herald::event::Cursor::default();
    cursor.positions.insert(
        "room:r1".into(),
        herald::event::Position {
            epoch: herald::event::Epoch::new("000000000bad"),
            seq: 1,
        },
    );
    let url = t.url(&format!("/sse?channels=room:r1&token={}", t.token("alice")));
    let mut sse = Sse::open(&url, Some(&cursor.encode())).await;
    seen.push(sse.next_named("reset").await.data);
    drop(sse);
    // The compact form.
    let mut compact = t.ws_with("alice", "&format=compact").await;
    compact.subscribed("room:r1").await;
    bob.request(json!({"op": "publish", "channel": "room:r1", "event": "chat.message", "data": {"text": "hi"}}))
        .await;
    let array = compact.wait_for(Value::is_array).await;
    let shown = json_blocks(&doc)
        .into_iter()
        .flat_map(|(_, v)| v)
        .find(Value::is_array)
        .expect("a compact example");
    assert_eq!(
        array.as_array().unwrap().len(),
        shown.as_array().unwrap().len(),
        "{array} vs {shown}"
    );
    assert_eq!(array[0], "room:r1");
    assert!(array[1].is_u64() && array[3].is_object(), "{array}");
    // A disconnect.
    t.api("POST", "/api/v1/users/alice/disconnect", None).await;
    seen.push(alice.wait_for(|v| v["type"] == "disconnect").await);

    let seen_types: BTreeSet<String> = seen
        .iter()
        .map(|v| v["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        seen_types, types,
        "this test makes a frame of every documented type"
    );
    for got in &seen {
        let matches = examples
            .iter()
            .filter(|e| e["type"] == got["type"])
            .any(|e| keys(e) == keys(got));
        assert!(
            matches,
            "no example in docs/protocol.md has the fields of this real {} frame: {got}",
            got["type"]
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn close_codes_on_the_wire_match_the_table() {
    let doc = protocol_doc();
    let table: BTreeMap<u64, (String, bool)> = first_table(section(&doc, "### Close codes"))
        .into_iter()
        .map(|r| (r[0].parse().unwrap(), (plain(&r[1]), r[2] == "true")))
        .collect();
    let check = |frame: &Value| {
        let code = frame["code"].as_u64().expect("a disconnect code");
        let (reason, reconnect) = &table[&code];
        assert_eq!(frame["reason"], reason.as_str(), "{frame}");
        assert_eq!(frame["reconnect"], *reconnect, "{frame}");
    };
    let t = TestServer::start().await;
    // 4001: a connect frame with a token that is not one.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op": "connect", "token": "not-a-jwt"}))
        .await;
    check(&ws.wait_for(|v| v["type"] == "disconnect").await);
    // 4010: a connect frame asking for a format that does not exist.
    let mut ws = Ws::connect(&t.ws_url("")).await;
    ws.send(json!({"op": "connect", "token": t.token("alice"), "format": "tiny"}))
        .await;
    let frame = ws.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(frame["code"], 4010);
    check(&frame);
    // 4012: the backend disconnects the user.
    let mut ws = t.ws("alice").await;
    t.api("POST", "/api/v1/users/alice/disconnect", None).await;
    let frame = ws.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(frame["code"], 4012);
    check(&frame);
    // 1001: the node shuts down.
    let mut ws = t.ws("alice").await;
    t.server.shutdown();
    let frame = ws.wait_for(|v| v["type"] == "disconnect").await;
    assert_eq!(frame["code"], 1001);
    check(&frame);
    t.stop().await;
}

/// An HTTP request that does not wait for a stream's body: (status, JSON body or Null).
async fn probe(
    t: &TestServer,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = t.http.request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        t.url(path),
    );
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .unwrap_or_else(|_| panic!("{method} {path} timed out"))
        .unwrap();
    let status = resp.status().as_u16();
    let stream = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if stream {
        // Dropping the response ends the stream.
        return (status, Value::Null);
    }
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `path` with its parameters filled with ids that exist in the world of the endpoint test.
fn fill(path: &str) -> String {
    path.replace("{room}", "r1")
        .replace("{user}", "alice")
        .replace("{channel}", "room:r1")
        .replace("{device}", "d1")
        .replace("{file}", "index.js")
        .replace("{id}", "0193a0c0-7b1e-7c3a-9f00-2b6d1e4c8a10")
}

#[tokio::test]
async fn every_documented_endpoint_answers_with_its_documented_credential() {
    let doc = protocol_doc();
    let t = TestServer::start().await;
    t.join("r1", "alice").await;
    let jwt = t.token("alice");
    for e in doc_endpoints(&doc) {
        let path = fill(&e.path);
        let at = format!("{} {}", e.method, e.path);
        // Without a credential.
        let got = probe(&t, &e.method, &path, None, None).await;
        match (e.auth, e.path.as_str()) {
            // A plain GET is not an upgrade, which the upgrade table documents.
            (_, "/ws") => assert_error(&got, 426, "bad_frame"),
            (Auth::None, _) => assert_eq!(got.0, 200, "{at} needs no credential: {got:?}"),
            _ => assert_error(&got, 401, "unauthorized"),
        }
        // With it: served (neither the router's 404 nor its 405), and a body that is not JSON is
        // refused where the doc says the endpoint takes one.
        let credential = match e.auth {
            Auth::None => None,
            Auth::ApiKey => Some(API_KEY),
            Auth::Jwt => Some(jwt.as_str()),
            Auth::Admin => Some(ADMIN_KEY),
        };
        let (s, v) = probe(&t, &e.method, &path, credential, None).await;
        assert_ne!(s, 405, "{at}: {v}");
        assert!(
            !(s == 404 && v["error"]["message"] == "no such endpoint"),
            "{at}: the router's fallback answered"
        );
        if credential.is_some() && s == 401 {
            panic!("{at}: refused its documented credential: {v}");
        }
        if e.body {
            let got = probe(&t, &e.method, &path, credential, Some("{")).await;
            assert_error(&got, 400, "bad_frame");
        }
        // A malformed id in the path is refused, as the endpoint lists (a `{file}` is a name, not
        // an id: one the library does not have is 404, which `assets.rs` checks).
        if e.path.contains('{') && !e.path.contains("{file}") {
            assert!(e.errors.contains(&400), "{at} takes an id but lists no 400");
            let bad = e
                .path
                .split('/')
                .map(|seg| {
                    if seg.starts_with('{') {
                        "no%20such"
                    } else {
                        seg
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            let (s, v) = probe(&t, &e.method, &bad, credential, None).await;
            assert_eq!(s, 400, "{at} with a malformed id: {v}");
        }
    }
    // And the fallbacks the doc describes.
    assert_error(
        &probe(&t, "GET", "/api/v1/nothing-here", Some(API_KEY), None).await,
        404,
        "not_found",
    );
    assert_error(
        &probe(&t, "DELETE", "/healthz", None, None).await,
        405,
        "method_not_allowed",
    );
    t.stop().await;
}

// ---- the OpenAPI description ----

#[test]
fn every_route_has_one_openapi_operation_and_every_operation_a_route() {
    let api = openapi_doc();
    let ops: BTreeSet<(String, String)> = openapi_operations(&api).into_keys().collect();
    let routes = route_set();
    let undescribed: Vec<String> = routes
        .difference(&ops)
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        undescribed.is_empty(),
        "routes without an operation in docs/openapi.json: {undescribed:?}"
    );
    let unrouted: Vec<String> = ops
        .difference(&routes)
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        unrouted.is_empty(),
        "operations in docs/openapi.json that no route serves: {unrouted:?}"
    );
}

/// Every `$ref` in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("$ref", Value::String(s)) => out.push(s),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_openapi_description_is_well_formed() {
    let api = openapi_doc();
    let version = api["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3.1."), "openapi {version:?}");
    // The three bearer credentials.
    let schemes = &api["components"]["securitySchemes"];
    for name in ["apiKey", "clientJwt", "adminKey"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    assert_eq!(schemes["clientJwt"]["bearerFormat"], "JWT");
    // The error shape.
    let error = &api["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["error"]));
    assert_eq!(
        error["properties"]["error"]["required"],
        json!(["code", "message"])
    );
    // Every reference resolves.
    let mut all = Vec::new();
    refs(&api, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r}: only local references"));
        assert!(api.pointer(pointer).is_some(), "{r} does not resolve");
    }
    let resolve = |v: &Value| -> Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => api.pointer(&r[1..]).unwrap().clone(),
            None => v.clone(),
        }
    };
    let mut ids = BTreeSet::new();
    for ((method, path), op) in openapi_operations(&api) {
        let at = format!("{method} {path}");
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: operationId"));
        assert!(
            ids.insert(id.to_string()),
            "{at}: operationId {id} used twice"
        );
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{at}: no responses"
        );
        for s in op["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{at}: security"))
        {
            for name in s.as_object().unwrap().keys() {
                assert!(schemes.get(name).is_some(), "{at}: unknown scheme {name}");
            }
        }
        // Each path parameter is declared.
        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(resolve)
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        let in_path: BTreeSet<String> = path
            .split('{')
            .skip(1)
            .map(|s| s.split('}').next().unwrap().to_string())
            .collect();
        assert_eq!(declared, in_path, "{at}: path parameters");
    }
}

#[test]
fn the_openapi_security_is_the_docs_auth() {
    let api = openapi_doc();
    let ops = openapi_operations(&api);
    for e in doc_endpoints(&protocol_doc()) {
        let op = &ops[&(e.method.clone(), e.path.clone())];
        let first = op["security"]
            .as_array()
            .and_then(|s| s.first())
            .and_then(|s| s.as_object())
            .and_then(|s| s.keys().next().cloned());
        assert_eq!(
            first.as_deref(),
            e.auth.scheme(),
            "{} {}: docs/protocol.md says {:?}",
            e.method,
            e.path,
            e.auth
        );
    }
}

#[test]
fn the_docs_errors_are_the_openapi_responses() {
    let ops = openapi_operations(&openapi_doc());
    for e in doc_endpoints(&protocol_doc()) {
        let op = &ops[&(e.method.clone(), e.path.clone())];
        let described: BTreeSet<u16> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            // Neither success nor a redirect is an error (the reply column says those).
            .filter(|s| ![101, 200, 401, 503].contains(s) && !(300..400).contains(s))
            .collect();
        assert_eq!(
            e.errors, described,
            "{} {}: the errors docs/protocol.md lists vs the responses docs/openapi.json describes",
            e.method, e.path
        );
    }
}

#[tokio::test]
async fn openapi_json_is_served_without_a_key_and_is_the_file() {
    let t = TestServer::start().await;
    let resp = tokio::time::timeout(WAIT, t.http.get(t.url("/api/v1/openapi.json")).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let body = resp.text().await.unwrap();
    assert_eq!(
        body,
        repo_file("docs/openapi.json"),
        "the served description is the file"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        v["openapi"]
    );
    // It is a description: a key changes nothing, a wrong one is not refused either.
    let (s, _) = probe(&t, "GET", "/api/v1/openapi.json", Some("wrong"), None).await;
    assert_eq!(s, 200);
    t.stop().await;
}

/// The README's `herald.toml` (the first ```toml block, "the values shown are the defaults") is
/// accepted by the strict config parser, and the limits, presence and timing values it shows are
/// the defaults: a key renamed or a default changed in one place fails here.
#[test]
fn the_readmes_herald_toml_parses_and_shows_the_defaults() {
    let readme = repo_file("README.md");
    let (_, text) = fenced(&readme, "toml")
        .into_iter()
        .find(|(_, t)| t.contains("[limits]"))
        .expect("README: a ```toml block with [limits]");
    let dir = TempDir::new("readme-toml");
    let path = dir.join("herald.toml");
    std::fs::write(&path, &text).unwrap();
    let c = herald::config::Config::load(herald::config::Overrides {
        config: Some(path),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("README's herald.toml: {e}"));
    let d = herald::config::Config::defaults();
    assert_eq!(format!("{:?}", c.limits), format!("{:?}", d.limits));
    assert_eq!(c.room_presence, d.room_presence);
    assert_eq!(
        (
            c.presence_ttl,
            c.heartbeat,
            c.read_timeout,
            c.shutdown_grace
        ),
        (
            d.presence_ttl,
            d.heartbeat,
            d.read_timeout,
            d.shutdown_grace
        )
    );
    assert_eq!(
        (c.idempotency_ttl, c.idempotency_lease),
        (d.idempotency_ttl, d.idempotency_lease)
    );
}
