//! Redis failing under a publish, through the wire: the connection lost after a command reached
//! Redis (the reply never comes), an idempotency key claimed just before Redis went away, Redis
//! loading its data after a restart. Each engine talks to its own redis-server through a TCP proxy
//! that can cut the connection carrying a chosen command, which is what a client sees when Redis
//! runs a command and dies before answering.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

use crate::common::*;
use crate::redis_server::RedisServer;

/// A TCP proxy in front of a redis-server's unix socket. Once armed with a pattern, the first client
/// bytes containing it are passed to Redis, and then that connection is cut without passing Redis's
/// answer on. Other connections, and new ones, pass through.
struct CuttingProxy {
    url: String,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(socket: PathBuf) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = UnixStream::connect(&socket).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, a.clone(), c.clone()));
            }
        });
        CuttingProxy {
            url,
            armed,
            cuts,
            task,
        }
    }

    /// Cuts the connection that next sends `pattern`, once.
    fn cut_after(&self, pattern: &str) {
        *self.armed.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: tokio::net::TcpStream,
    server: UnixStream,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
) {
    let (mut from_server, mut to_server) = server.into_split();
    let (mut from_client, mut to_client) = client.split();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = {
        let cut = cut.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Past the cut, Redis's answers are never passed on.
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to_client.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let matched = {
                let mut armed = armed.lock().unwrap();
                let hit = armed.as_ref().is_some_and(|p| {
                    let mut window = tail.clone();
                    window.extend_from_slice(&buf[..n]);
                    window.windows(p.len()).any(|w| w == &p[..])
                });
                if hit {
                    *armed = None;
                }
                hit
            };
            if matched {
                cut.store(true, Ordering::SeqCst);
                cuts.fetch_add(1, Ordering::SeqCst);
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
            if matched {
                // Let Redis run it, then drop the connection: the client never hears back.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            let keep = buf[..n].len().min(256);
            tail = buf[n - keep..n].to_vec();
        }
    };
    tokio::select! {
        _ = answers => {}
        _ = requests => {}
    }
}

/// An engine on `redis` reached through a cutting proxy, after one keyed publish (so Redis knows
/// the scripts: the command a test cuts is the one that runs, not a first `EVALSHA` that Redis
/// answers with `NOSCRIPT`).
async fn engine_behind_proxy(
    redis: &RedisServer,
    f: impl FnOnce(&mut herald::Config),
) -> (TestServer, CuttingProxy) {
    let proxy = CuttingProxy::start(redis.socket()).await;
    let t = TestServer::start_redis(&proxy.url, "faults", f).await;
    t.publish(json!({"event":"warm","to":["warm"],"data":{},"idempotency_key":"warm"}))
        .await;
    (t, proxy)
}

fn seqs(history: &Value) -> Vec<u64> {
    history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// Redis stored the event and the connection died before its answer: the engine cannot know, and
/// must not say "nothing was stored" (the event is in history, and was delivered).
#[tokio::test]
async fn a_publish_whose_answer_was_lost_is_reported_as_unknown_not_unstored() {
    let redis = RedisServer::start();
    let (t, proxy) = engine_behind_proxy(&redis, |_| {}).await;
    proxy.cut_after("fault.unkeyed");
    let (status, v) = t
        .try_publish(json!({"event":"fault.unkeyed","to":["u1"],"data":{}}))
        .await;
    assert_eq!(
        proxy.cuts(),
        1,
        "the publish went through the cut: {status} {v}"
    );
    assert_error(&(status, v.clone()), 503, "outcome_unknown");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("nothing was stored"),
        "the reply must not claim what the engine cannot know: {message}"
    );
    assert!(message.contains("idempotency key"), "{message}");
    // It was stored: the reply did not lie.
    assert_eq!(seqs(&t.history("user:u1", 0).await), [1]);
}

/// The same loss under an idempotency key: the engine sends its append again once the connection
/// is back, deduplicated by the key, and answers with what was stored, once.
#[tokio::test]
async fn a_keyed_publish_whose_answer_was_lost_is_resolved_by_the_engine_and_stored_once() {
    let redis = RedisServer::start();
    let (t, proxy) = engine_behind_proxy(&redis, |_| {}).await;
    t.join("r1", "bob").await;
    let mut bob = t.ws("bob").await;
    bob.subscribed("room:r1").await;
    proxy.cut_after("fault.keyed");
    let body = json!({"event":"fault.keyed","room":"r1","data":{"n":1},"idempotency_key":"lost-1"});
    let (status, reply) = t.try_publish(body.clone()).await;
    assert_eq!(proxy.cuts(), 1, "the publish went through the cut");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["deliveries"][0]["seq"], 1);
    assert_eq!(seqs(&t.history("room:r1", 0).await), [1], "stored once");
    let ev = bob.event_on("room:r1").await;
    assert_eq!(
        (ev["seq"].clone(), ev["id"].clone()),
        (json!(1), reply["id"].clone())
    );
    bob.assert_none(Duration::from_millis(300), |v| v["type"] == "event")
        .await;
    // The backend's own retry gets the same reply.
    let (status, again) = t.try_publish(body).await;
    assert_eq!((status, &again), (200, &reply));
}

/// Redis went away right after it recorded the claim of an idempotency key: the key's claim lapses
/// within its lease (seconds), not with the key's 24 h, and the publisher's retries end in exactly
/// one stored event.
#[tokio::test]
async fn a_key_claimed_just_before_redis_was_lost_is_free_again_within_its_lease() {
    let redis = RedisServer::start();
    let (t, proxy) = engine_behind_proxy(&redis, |c| {
        c.idempotency_lease = Duration::from_secs(1);
    })
    .await;
    proxy.cut_after("claim-lost-1");
    let body = json!({"event":"n","to":["u1"],"data":{},"idempotency_key":"claim-lost-1"});
    let (status, first) = t.try_publish(body.clone()).await;
    assert_eq!(proxy.cuts(), 1, "the claim went through the cut");
    assert_error(&(status, first), 503, "unavailable");
    // A backend following the contract: retry the 503 with the same key.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let reply = loop {
        let (status, v) = t.try_publish(body.clone()).await;
        if status == 200 {
            break v;
        }
        assert_error(&(status, v), 503, "unavailable");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed blocked past its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply["deliveries"][0]["seq"], 1);
    assert_eq!(seqs(&t.history("user:u1", 0).await), [1], "stored once");
}

/// While Redis loads its data after a restart it refuses commands (`LOADING`): that is the backend
/// being unavailable (503 `unavailable`, retry), not an internal error; and publishes work again
/// once it has loaded.
#[tokio::test]
async fn publishes_while_redis_loads_its_data_get_unavailable() {
    let mut redis = RedisServer::start();
    let t = TestServer::start_redis(&redis.url, "loading", |_| {}).await;
    t.publish(json!({"event":"n","to":["u1"],"data":{}})).await;
    // Enough keys, each loaded slowly, to keep Redis loading for a few seconds.
    let fill = "for i = 1, 20000 do redis.call('SET', 'filler:' .. i, i) end";
    assert!(
        redis
            .command(&["EVAL", fill, "0"])
            .is_some_and(|r| r.starts_with("$-1") || r.starts_with("_")),
        "filled"
    );
    assert!(
        redis
            .command(&["SAVE"])
            .is_some_and(|r| r.starts_with("+OK"))
    );
    // Loads each key slowly, answering clients (`LOADING`) every KiB loaded.
    redis.restart_loading(&[
        "--key-load-delay",
        "100",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    // The first publish may still meet the connection the restart killed (its outcome unknown to
    // the engine); once reconnected, Redis refuses while it loads.
    let mut refused = false;
    for _ in 0..20 {
        let (status, v) = t
            .try_publish(json!({"event":"n","to":["u1"],"data":{}}))
            .await;
        assert_eq!(status, 503, "{v}");
        if v["error"]["code"] == "unavailable" {
            refused = true;
            break;
        }
        assert_error(&(status, v), 503, "outcome_unknown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "a publish while loading is refused as unavailable");
    assert!(
        redis.is_loading(),
        "the publishes ran while Redis was loading"
    );
    let (ready, _) = t.call("GET", "/readyz", None, None).await;
    assert_eq!(ready, 503);
    // Loaded: the engine is back by itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = t
            .try_publish(json!({"event":"n","to":["u1"],"data":{}}))
            .await;
        if status == 200 {
            assert_eq!(v["deliveries"][0]["seq"], 2, "{v}");
            break;
        }
        assert_error(&(status, v), 503, "unavailable");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
