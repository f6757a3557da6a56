//! The operator commands that talk to a running node over HTTP: `herald status` (is it healthy, what
//! are its figures) and `herald publish` (an event from the shell). Keys come from the environment
//! (`HERALD_ADMIN_KEY`, `HERALD_API_KEY`), never from the command line, where `ps` would show them.

use std::time::Duration;

use serde_json::{Value, json};

use crate::metrics::{Sample, parse, quantile, total};

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A failed command: the message the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

fn client() -> Result<reqwest::Client, CliError> {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| CliError(format!("cannot build an HTTP client: {e}")))
}

/// The node's base URL without a trailing slash.
fn base(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// What a request answered: status and body.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// `code: message` from the error shape, or the body.
    fn error_text(&self) -> String {
        match self.json() {
            Some(v) if v["error"]["code"].is_string() => format!(
                "{} {}: {}",
                self.status,
                v["error"]["code"].as_str().unwrap_or(""),
                v["error"]["message"].as_str().unwrap_or("")
            ),
            _ => format!("{} {}", self.status, self.body.trim()),
        }
    }
}

async fn get(c: &reqwest::Client, url: &str, key: Option<&str>) -> Result<Answer, CliError> {
    let mut req = c.get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    answer(url, req.send().await).await
}

async fn answer(
    url: &str,
    r: Result<reqwest::Response, reqwest::Error>,
) -> Result<Answer, CliError> {
    let r = r.map_err(|e| CliError(format!("{url}: {}", unwrap_error(&e))))?;
    let status = r.status().as_u16();
    let body = r
        .text()
        .await
        .map_err(|e| CliError(format!("{url}: reading the reply: {e}")))?;
    Ok(Answer { status, body })
}

/// The innermost cause of a request error (reqwest's own text is "error sending request").
fn unwrap_error(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = inner.to_string();
        src = inner.source();
    }
    if e.is_timeout() {
        s = format!("no answer within {} s", TIMEOUT.as_secs());
    }
    s
}

/// `herald status`: the node's health and figures as JSON. The admin key (when given) adds the node
/// status and rules; without it, what the root probes and `/metrics` show.
pub async fn status(url: &str, admin_key: Option<&str>) -> Result<Value, CliError> {
    let c = client()?;
    let base = base(url);
    let health = get(&c, &format!("{base}/healthz"), None).await?;
    if health.status != 200 {
        return Err(CliError(format!(
            "{base}/healthz: {} (is this a herald node?)",
            health.error_text()
        )));
    }
    let ready = get(&c, &format!("{base}/readyz"), None).await?;
    let mut out = json!({
        "url": base,
        "ready": ready.status == 200,
    });
    if ready.status != 200 {
        out["ready_error"] = ready.error_text().into();
    }
    if let Some(key) = admin_key {
        let st = get(&c, &format!("{base}/admin/status"), Some(key)).await?;
        if st.status != 200 {
            return Err(CliError(format!(
                "{base}/admin/status: {} (check HERALD_ADMIN_KEY)",
                st.error_text()
            )));
        }
        let st = st.json().unwrap_or_default();
        for k in ["node", "backend", "sessions"] {
            out[k] = st[k].clone();
        }
        let rules = get(&c, &format!("{base}/admin/rules"), Some(key)).await?;
        if let Some(r) = rules.json().filter(|_| rules.status == 200) {
            out["rules"] = json!({
                "version": r["version"],
                "files": r["files"],
                "last_error": r["last_error"],
            });
        }
    }
    let m = get(&c, &format!("{base}/metrics"), admin_key).await?;
    if m.status == 200 {
        out["figures"] = figures(&parse(&m.body));
    } else {
        out["metrics_error"] = m.error_text().into();
    }
    Ok(out)
}

/// The figures an operator looks at first, from the exposition text.
fn figures(s: &[Sample]) -> Value {
    let by = |name: &str, label: &str| -> Value {
        let mut m = serde_json::Map::new();
        for x in s.iter().filter(|x| x.name == name) {
            let k = x.label(label).unwrap_or("").to_string();
            let v = m.get(&k).and_then(Value::as_f64).unwrap_or(0.0) + x.value;
            m.insert(k, json!(v));
        }
        Value::Object(m)
    };
    let ms = |name: &str, q: f64| quantile(s, name, q).map(|v| (v * 1e6).round() / 1e3);
    json!({
        "sessions": by("herald_sessions", "transport"),
        "published": by("herald_events_published_total", "source"),
        "publish_errors": total(s, "herald_publish_errors_total"),
        "deliveries": total(s, "herald_deliveries_total"),
        "slow_consumer_disconnects": total(s, "herald_slow_consumer_disconnects_total"),
        "publish_ms": {"p50": ms("herald_publish_duration_seconds", 0.5), "p99": ms("herald_publish_duration_seconds", 0.99)},
        "fanout_ms": {"p50": ms("herald_fanout_duration_seconds", 0.5), "p99": ms("herald_fanout_duration_seconds", 0.99)},
        "queue_high_water": total(s, "herald_session_queue_high_water"),
        "redis_up": by("herald_redis_up", "connection"),
        "rule_errors": total(s, "herald_rule_errors_total"),
        "push_queued": total(s, "herald_push_outbox_queued"),
        "push_dead_letters": total(s, "herald_push_dead_letters"),
    })
}

/// The `status` JSON as lines for a person.
pub fn status_text(v: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<11} {v}\n"));
    let ready = if v["ready"] == true {
        "ready".to_string()
    } else {
        format!(
            "NOT READY ({})",
            v["ready_error"].as_str().unwrap_or("backend unreachable")
        )
    };
    out.push_str(&format!(
        "herald at {}: {ready}\n",
        v["url"].as_str().unwrap_or("")
    ));
    if v["node"].is_string() {
        line(
            &mut out,
            "node",
            format!(
                "{} ({} backend), {} sessions",
                v["node"].as_str().unwrap_or(""),
                v["backend"].as_str().unwrap_or(""),
                v["sessions"]
            ),
        );
    }
    let f = &v["figures"];
    if f.is_object() {
        let num = |x: &Value| x.as_f64().map(|n| format!("{n}")).unwrap_or("-".into());
        let pair = |x: &Value| -> String {
            x.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {}", num(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "0".into())
        };
        let ms = |x: &Value| {
            let one = |q: &str| {
                x[q].as_f64()
                    .map(|n| format!("{n} ms"))
                    .unwrap_or_else(|| "-".into())
            };
            format!("p50 {}, p99 {} (since start)", one("p50"), one("p99"))
        };
        line(&mut out, "sessions", pair(&f["sessions"]));
        line(
            &mut out,
            "published",
            format!(
                "{} (errors {})",
                pair(&f["published"]),
                num(&f["publish_errors"])
            ),
        );
        line(&mut out, "deliveries", num(&f["deliveries"]));
        line(&mut out, "publish", ms(&f["publish_ms"]));
        line(&mut out, "fan-out", ms(&f["fanout_ms"]));
        line(
            &mut out,
            "slow",
            format!(
                "{} slow-consumer disconnects, deepest queue {} frames",
                num(&f["slow_consumer_disconnects"]),
                num(&f["queue_high_water"])
            ),
        );
        if f["redis_up"].as_object().is_some_and(|m| !m.is_empty()) {
            line(&mut out, "redis", pair(&f["redis_up"]));
        }
        line(
            &mut out,
            "push",
            format!(
                "{} queued, {} dead letters",
                num(&f["push_queued"]),
                num(&f["push_dead_letters"])
            ),
        );
    } else if let Some(e) = v["metrics_error"].as_str() {
        line(
            &mut out,
            "metrics",
            format!("{e} (set HERALD_ADMIN_KEY when /metrics needs it)"),
        );
    }
    let r = &v["rules"];
    if r.is_object() {
        let files = r["files"].as_array().map(Vec::len).unwrap_or(0);
        let err = match r["last_error"].as_str() {
            Some(e) => format!("; LAST RELOAD REFUSED: {e}"),
            None => String::new(),
        };
        line(
            &mut out,
            "rules",
            format!("version {}, {files} file(s){err}", r["version"]),
        );
    }
    if !v["node"].is_string() {
        out.push_str("  (set HERALD_ADMIN_KEY for the node, session and rules figures)\n");
    }
    out
}

/// `herald publish`: sends `body` (a `POST /api/v1/events` body) and returns the reply.
pub async fn publish(url: &str, api_key: &str, body: &Value) -> Result<Value, CliError> {
    let c = client()?;
    let url = format!("{}/api/v1/events", base(url));
    let a = answer(
        &url,
        c.post(&url).bearer_auth(api_key).json(body).send().await,
    )
    .await?;
    match a.json() {
        Some(v) if a.status == 200 => Ok(v),
        _ => Err(CliError(format!("publish refused: {}", a.error_text()))),
    }
}
