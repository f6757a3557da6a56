//! Redis [`Nodes`]: the node registry shared by every node on this Redis (a sorted set of record
//! expiries and a hash of what each node said, [`super::Keys::nodes`] and
//! [`super::Keys::node_info`]), one Lua step per call (`lua/nodes_*.lua`), times from Redis `TIME`.
//! A user's sessions on every node come from presence's own keys.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{RedisBackend, err};
use crate::backend::{BackendError, BackendResult, NodeInfo, NodeList, NodeSeen, Nodes};
use crate::presence::SessionInfo;

struct Scripts {
    beat: Script,
    gone: Script,
    list: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    beat: lua!("nodes_lib.lua", "nodes_beat.lua"),
    gone: lua!("nodes_lib.lua", "nodes_gone.lua"),
    list: lua!("nodes_lib.lua", "nodes_list.lua"),
});

fn bad(what: &str) -> BackendError {
    BackendError::Internal(format!("nodes: unexpected reply from {what}"))
}

/// A `<heartbeat> <JSON>` record and its expiry score as `nodes_list.lua` gives them; `None` (and a
/// warning) for a record this version cannot read.
fn seen(id: &str, record: &str, expires: &str) -> Option<NodeSeen> {
    let (beat, json) = record.split_once(' ')?;
    let heartbeat = beat.parse().ok()?;
    let expires = expires.parse::<f64>().ok()? as i64;
    match serde_json::from_str::<NodeInfo>(json) {
        Ok(info) => Some(NodeSeen {
            info,
            heartbeat,
            expires,
        }),
        Err(e) => {
            tracing::warn!(node = id, error = %e, "Unreadable node record in Redis; skipped.");
            None
        }
    }
}

#[async_trait]
impl Nodes for RedisBackend {
    async fn node_beat(&self, node: &NodeInfo, ttl: Duration) -> BackendResult<()> {
        let json = serde_json::to_string(node)
            .map_err(|e| BackendError::Internal(format!("nodes: record: {e}")))?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut con = self.cmd.clone();
        SCRIPTS
            .beat
            .key(self.keys.nodes())
            .key(self.keys.node_info())
            .arg(&node.id)
            .arg(json)
            .arg(ttl_ms)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn node_gone(&self, id: &str) -> BackendResult<()> {
        let mut con = self.cmd.clone();
        SCRIPTS
            .gone
            .key(self.keys.nodes())
            .key(self.keys.node_info())
            .arg(id)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn nodes(&self) -> BackendResult<NodeList> {
        const WHAT: &str = "nodes_list.lua";
        let mut con = self.cmd.clone();
        let reply: Vec<Value> = SCRIPTS
            .list
            .key(self.keys.nodes())
            .key(self.keys.node_info())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let mut it = reply.into_iter();
        let now: i64 =
            redis::from_redis_value(it.next().ok_or_else(|| bad(WHAT))?).map_err(|_| bad(WHAT))?;
        let rest: Vec<String> = it
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|_| bad(WHAT))?;
        if !rest.len().is_multiple_of(3) {
            return Err(bad(WHAT));
        }
        let mut nodes: Vec<NodeSeen> = rest
            .chunks(3)
            .filter_map(|c| seen(&c[0], &c[1], &c[2]))
            .collect();
        nodes.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(NodeList { now, nodes })
    }

    async fn sessions_of(&self, user: &str) -> BackendResult<Vec<SessionInfo>> {
        let mut sessions = self.live_sessions(user).await?;
        sessions.sort_by(|a, b| a.session.cmp(&b.session));
        Ok(sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::seen;

    #[test]
    fn a_record_is_read_back_and_a_bad_one_skipped() {
        let json = r#"{"id":"a","started":5,"version":"0.1.0","backend":"redis","sessions":2}"#;
        let s = seen("a", &format!("1700000000123 {json}"), "1700000060123").unwrap();
        assert_eq!(s.heartbeat, 1_700_000_000_123);
        assert_eq!(s.expires, 1_700_000_060_123);
        assert_eq!(s.info.sessions, 2);
        assert!(seen("a", "no-space", "1").is_none());
        assert!(seen("a", "12 {not json", "1").is_none());
        assert!(seen("a", &format!("x {json}"), "1").is_none());
    }
}
