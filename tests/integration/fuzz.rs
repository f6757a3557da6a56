//! Random frames through the real wire. A fuzzing client sends thousands of frames — every op with
//! fields drawn from valid, wrong-typed, malformed and oversized values, refs of every kind, text that
//! is not JSON, JSON that is not an object, nesting past any parser's limit, binary messages, text
//! that is not UTF-8, messages over the size limits — to a running engine, while a witness in the
//! same room reads everything stored there. Every frame must get its one documented answer (a
//! `reply` with its `ref`, or a `pong`) or a documented close; every server frame is one of the
//! documented types; every error code is a documented one; the witness sees the room's events each
//! once, in `seq` order, without a gap, every accepted publish among them at the seq its reply gave,
//! and history holds the newest of them, the same.
//!
//! The HTTP API gets the same treatment: every JSON operation and event stream of
//! `docs/openapi.json`, called with path ids that exist, that do not and that are malformed, query
//! values and bodies drawn from its schema (or not JSON, or any JSON, or over the body limit), SSE
//! cursors naming real and unknown channels, epochs and seqs, sometimes with a wrong key. Each answer
//! must be one of the statuses the description lists for that operation, never 500, with an error
//! body whose code goes with the status as the protocol's error table says.
//!
//! The generators are seeded: a failure names its seed, and `HERALD_FUZZ_SEED=N` replays it. The
//! runs send 5,000 frames and 25 requests per operation; with `HERALD_SLOW=1` (see `scripts/test`)
//! 100,000 and 500.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::common::*;

const ROOM: &str = "fz";
const FUZZER: &str = "fz-user";
const WITNESS: &str = "fz-witness";
/// The frame size limit the engine runs with here (smaller than the default, so oversized frames
/// stay cheap to build).
const FRAME_BYTES: usize = 8 * 1024;

/// rand's seeded generator (a seed replays a run), with the few draws the fuzz makes.
struct Rng(rand::rngs::StdRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }

    fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.0, 0..n)
    }

    fn chance(&mut self, percent: u64) -> bool {
        rand::Rng::random_ratio(&mut self.0, percent as u32, 100)
    }

    fn pick(&mut self, xs: &[Value]) -> Value {
        xs[self.below(xs.len())].clone()
    }
}

fn seed() -> u64 {
    std::env::var("HERALD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// Values for each kind of field: valid ones first, then wrong types and malformed ones.
struct Pools {
    channel: Vec<Value>,
    room: Vec<Value>,
    seq: Vec<Value>,
    text: Vec<Value>,
    data: Vec<Value>,
    event: Vec<Value>,
    users: Vec<Value>,
    any: Vec<Value>,
}

fn pools() -> Pools {
    let long = "x".repeat(300);
    let thousand: Vec<Value> = (0..1001).map(|i| json!(format!("u{i}"))).collect();
    let any = vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!([]),
        json!({}),
        json!([1, "a", null]),
        json!({"nested": {"deeper": [1, 2, {"x": null}]}}),
        json!("ü漢字🎉\u{0}\u{7f}"),
    ];
    Pools {
        channel: vec![
            json!(format!("room:{ROOM}")),
            json!(format!("room:{ROOM}")),
            json!(format!("user:{FUZZER}")),
            json!("global"),
            json!(format!("active:{ROOM}")),
            json!(format!("presence:{WITNESS}")),
            json!("room:fz-not-a-member"),
            json!("user:someone-else"),
            json!("room:"),
            json!("room:a b"),
            json!("nope:x"),
            json!("room"),
            json!(format!("room:{long}")),
            json!(""),
        ],
        room: vec![
            json!(ROOM),
            json!(ROOM),
            json!("fz-not-a-member"),
            json!(""),
            json!("a b"),
            json!(long.clone()),
            json!("room:fz"),
        ],
        seq: vec![
            json!(0),
            json!(1),
            json!(2),
            json!(7),
            json!(1_000_000),
            json!(-1),
            json!(1.5),
            json!("3"),
            json!(u64::MAX),
            json!(1e300),
        ],
        text: vec![
            json!("hi"),
            json!(""),
            json!("ü漢字🎉"),
            json!("\u{0}"),
            json!("x".repeat(5000)),
        ],
        data: vec![
            json!({"text": "hello"}),
            json!({}),
            json!([1, 2, 3]),
            json!("a string"),
            json!(42),
            Value::Null,
            json!({"a": {"b": {"c": {"d": [1, {"e": "f"}]}}}}),
            json!({"big": "y".repeat(FRAME_BYTES)}),
        ],
        event: vec![
            json!("chat.message"),
            json!("chat.message"),
            json!("x"),
            json!(""),
            json!("bad event!"),
            json!("a".repeat(200)),
            json!("typing"),
        ],
        users: vec![
            json!([WITNESS]),
            json!([FUZZER, WITNESS]),
            json!([]),
            json!(["nobody-at-all"]),
            json!([5, null]),
            json!("not-a-list"),
            Value::Array(thousand),
        ],
        any,
    }
}

/// One generated frame and what it must get back.
struct Sent {
    what: String,
    /// The `ref` the reply must carry, or `None` when no reply comes (a WebSocket ping).
    expect: Option<Value>,
    op: Option<String>,
    /// Whether the server may close the connection for it alone (oversized, not UTF-8).
    may_close: bool,
}

const OPS: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "publish",
    "publish",
    "ack",
    "read",
    "focus",
    "blur",
    "typing",
    "status",
    "state",
    "history",
    "leave",
    "presence",
    "watch",
    "unwatch",
    "ping",
    "connect",
    "nonsense",
    "",
];

/// The fields of an op and the pool each is drawn from.
fn fields(op: &str) -> &'static [(&'static str, &'static str)] {
    match op {
        "subscribe" => &[("channel", "channel"), ("since", "since")],
        "unsubscribe" => &[("channel", "channel")],
        "publish" => &[
            ("channel", "channel"),
            ("event", "event"),
            ("data", "data"),
            ("idempotency_key", "text"),
        ],
        "ack" => &[("channel", "channel"), ("seq", "seq")],
        "read" => &[("room", "room"), ("seq", "seq")],
        "focus" | "blur" | "typing" | "leave" => &[("room", "room")],
        "status" => &[("status", "status"), ("text", "text")],
        "state" => &[("state", "state")],
        "history" => &[
            ("channel", "channel"),
            ("from", "seq"),
            ("to", "seq"),
            ("limit", "seq"),
        ],
        "presence" | "watch" | "unwatch" => &[("users", "users")],
        "connect" => &[("token", "text"), ("format", "format")],
        _ => &[("channel", "channel")],
    }
}

fn value_for(rng: &mut Rng, p: &Pools, pool: &str) -> Value {
    if rng.chance(15) {
        return rng.pick(&p.any);
    }
    match pool {
        "channel" => rng.pick(&p.channel),
        "room" => rng.pick(&p.room),
        "seq" => rng.pick(&p.seq),
        "text" => rng.pick(&p.text),
        "data" => rng.pick(&p.data),
        "event" => rng.pick(&p.event),
        "users" => rng.pick(&p.users),
        "status" => rng.pick(&[
            json!("online"),
            json!("away"),
            json!("busy"),
            json!("dnd"),
            json!("sleepy"),
        ]),
        "state" => rng.pick(&[json!("foreground"), json!("background"), json!("purple")]),
        "format" => rng.pick(&[json!("full"), json!("compact"), json!("xml")]),
        "since" => rng.pick(&[
            json!({"epoch": "nope", "seq": 1}),
            json!({"seq": 1}),
            json!({"epoch": 5, "seq": "x"}),
            json!("since"),
        ]),
        _ => rng.pick(&p.any),
    }
}

/// Builds the next frame: an op with drawn fields most of the time, else something malformed.
fn generate(rng: &mut Rng, p: &Pools, next_ref: &mut u64, epoch: &str) -> (Message, Sent) {
    let roll = rng.below(100);
    let text = |t: String, what: &str| {
        let sent = Sent {
            what: format!("{what}: {}", t.chars().take(160).collect::<String>()),
            expect: Some(Value::Null),
            op: None,
            may_close: false,
        };
        (Message::Text(t.into()), sent)
    };
    match roll {
        0..=3 => {
            let t = rng.pick(&[
                json!("{"),
                json!("nul"),
                json!("{\"op\":"),
                json!("\u{feff}{}"),
                json!("{\"op\":\"ping\"}{\"op\":\"ping\"}"),
                json!(" "),
                json!(""),
            ]);
            text(t.as_str().unwrap().to_string(), "not JSON")
        }
        4..=5 => text(rng.pick(&p.any).to_string(), "JSON, not an object"),
        6 => {
            let depth = 200 + rng.below(5000);
            text(
                format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                "deep nesting",
            )
        }
        7 => {
            let sent = Sent {
                what: "binary message".into(),
                expect: Some(Value::Null),
                op: None,
                may_close: false,
            };
            (Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()), sent)
        }
        8 => {
            let sent = Sent {
                what: "WebSocket ping".into(),
                expect: None,
                op: None,
                may_close: false,
            };
            (Message::Ping(b"fz".to_vec().into()), sent)
        }
        9 => {
            // Over the frame limit: `too_large` (with its ref: the frame is not read further), or
            // over twice the limit: the connection closes with 1009.
            let twice = rng.chance(30);
            let pad = "z".repeat(if twice {
                2 * FRAME_BYTES + 10
            } else {
                FRAME_BYTES + 10
            });
            let t = json!({"op": "ping", "ref": "big", "pad": pad}).to_string();
            let sent = Sent {
                what: format!("a {} byte frame", t.len()),
                // `too_large` still names the frame's ref.
                expect: Some(json!("big")),
                op: Some("ping".into()),
                may_close: twice,
            };
            (Message::Text(t.into()), sent)
        }
        11..=20 => {
            // A well-formed publish to the room, sometimes under a reused idempotency key: the
            // stream of events the witness and history must hold exactly.
            *next_ref += 1;
            let mut o = json!({
                "op": "publish", "channel": format!("room:{ROOM}"), "event": "chat.message",
                "data": {"n": *next_ref}, "ref": *next_ref,
            });
            if rng.chance(20) {
                o["idempotency_key"] = json!(format!("k-{}", rng.below(8)));
            }
            let sent = Sent {
                what: o.to_string(),
                expect: Some(json!(*next_ref)),
                op: Some("publish".into()),
                may_close: false,
            };
            (Message::Text(o.to_string().into()), sent)
        }
        10 if rng.chance(30) => {
            // Text that is not UTF-8: closes with 1007.
            let header = FrameHeader {
                opcode: OpCode::Data(Data::Text),
                ..FrameHeader::default()
            };
            let frame = Frame::from_payload(header, vec![b'"', 0xff, 0xfe, b'"'].into());
            let sent = Sent {
                what: "text that is not UTF-8".into(),
                expect: Some(Value::Null),
                op: None,
                may_close: true,
            };
            (Message::Frame(frame), sent)
        }
        _ => {
            let op = OPS[rng.below(OPS.len())];
            let mut o = serde_json::Map::new();
            if !op.is_empty() || rng.chance(50) {
                o.insert("op".into(), json!(op));
            }
            for (name, pool) in fields(op) {
                if rng.chance(85) {
                    let mut v = value_for(rng, p, pool);
                    if *name == "since" && rng.chance(50) {
                        v = json!({"epoch": epoch, "seq": rng.below(20)});
                    }
                    o.insert((*name).into(), v);
                }
            }
            if rng.chance(5) {
                o.insert("extra".into(), rng.pick(&p.any));
            }
            let expect = match rng.below(20) {
                0 => Value::Null,
                1 => {
                    let bad = rng.pick(&[json!(true), json!([1]), json!({"r": 1})]);
                    o.insert("ref".into(), bad);
                    Value::Null
                }
                2 => {
                    *next_ref += 1;
                    let r = json!(format!("s-{next_ref}"));
                    o.insert("ref".into(), r.clone());
                    r
                }
                _ => {
                    *next_ref += 1;
                    o.insert("ref".into(), json!(*next_ref));
                    json!(*next_ref)
                }
            };
            let t = Value::Object(o).to_string();
            let sent = Sent {
                what: t.chars().take(300).collect(),
                expect: Some(expect),
                op: Some(op.to_string()),
                // A publish whose data is over the frame limit.
                may_close: t.len() > 2 * FRAME_BYTES,
            };
            (Message::Text(t.into()), sent)
        }
    }
}

/// Where two sequences of seqs part, for a short failure message.
fn first_difference(a: impl Iterator<Item = u64>, b: impl Iterator<Item = u64>) -> String {
    let (a, b): (Vec<u64>, Vec<u64>) = (a.collect(), b.collect());
    let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    format!(
        "{} seqs against {} expected, first difference at index {at}: {:?} against {:?}",
        a.len(),
        b.len(),
        a.get(at..(at + 5).min(a.len())),
        b.get(at..(at + 5).min(b.len()))
    )
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(s: &TestServer, user: &str) -> (Socket, Value) {
    let url = s.ws_url(&format!("?token={}", s.token(user)));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    let first = next_json(&mut ws).await.expect("a connected frame");
    assert_eq!(first["type"], "connected", "{first}");
    (ws, first)
}

/// The next JSON frame, or the close code when the server closed (`None`: no close frame); panics
/// on anything that is not JSON text or a close.
async fn next_json(ws: &mut Socket) -> Result<Value, Option<u16>> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame from the engine within 10 s");
        match m {
            None | Some(Err(_)) => return Err(None),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t)
                    .unwrap_or_else(|e| panic!("a server frame that is not JSON ({e}): {t}"));
                return Ok(v);
            }
            Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("a server frame that is not text: {other:?}"),
        }
    }
}

/// What the protocol reference documents (docs/protocol.md's tables, as `docs.rs` reads them):
/// the server frame types, and each error code with its HTTP statuses.
struct Contract {
    frames: BTreeSet<String>,
    errors: BTreeMap<String, BTreeSet<u16>>,
}

impl Contract {
    fn read() -> Contract {
        Contract {
            frames: crate::docs::documented_server_frames(),
            errors: crate::docs::documented_error_codes(),
        }
    }
}

/// Checks one server frame against the contract.
fn check_frame(c: &Contract, v: &Value, ctx: &dyn Fn() -> String) {
    let t = v["type"].as_str().unwrap_or_default();
    assert!(c.frames.contains(t), "{}: undocumented frame {v}", ctx());
    if t == "reply" && v["ok"] == false {
        let code = v["error"]["code"].as_str().unwrap_or_default();
        assert!(
            c.errors.contains_key(code),
            "{}: undocumented error {v}",
            ctx()
        );
        assert!(v["error"]["message"].is_string(), "{}: {v}", ctx());
    }
    if t == "event" && v["channel"] == format!("room:{ROOM}") && !v["seq"].is_u64() {
        panic!("{}: a room event without a seq: {v}", ctx());
    }
}

/// The long run (`HERALD_SLOW=1 scripts/test`).
fn slow() -> bool {
    std::env::var("HERALD_SLOW").is_ok_and(|v| v == "1")
}

#[tokio::test]
async fn random_frames_get_documented_answers_and_lose_nothing() {
    let seed = seed();
    let contract = Contract::read();
    let frames = if slow() { 100_000 } else { 5_000 };
    let s = TestServer::start_with(|c| {
        c.limits.frame_bytes = FRAME_BYTES;
        c.limits.frames_per_second = 1_000_000;
    })
    .await;
    s.join(ROOM, FUZZER).await;
    s.join(ROOM, WITNESS).await;
    let (status, v) = s
        .api(
            "PUT",
            &format!("/api/v1/users/{FUZZER}/contacts"),
            Some(json!({"contacts": [WITNESS]})),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // The witness reads everything stored in the room, in order, until told to stop.
    let (mut witness, _) = open(&s, WITNESS).await;
    witness
        .send(Message::Text(
            json!({"op": "subscribe", "channel": format!("room:{ROOM}"), "ref": 1})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<u64>();
    let watcher = tokio::spawn(async move {
        let mut seen: Vec<(u64, String)> = Vec::new();
        let mut until: Option<u64> = None;
        let mut epoch = None;
        loop {
            if let Some(last) = until
                && seen.last().map_or(0, |(s, _)| *s) >= last
            {
                return (seen, epoch);
            }
            tokio::select! {
                last = &mut stop_rx, if until.is_none() => until = Some(last.unwrap()),
                f = next_json(&mut witness) => {
                    let v = f.unwrap_or_else(|c| panic!("witness closed ({c:?})"));
                    if v["type"] == "reply" && v["ref"] == 1 {
                        assert_eq!(v["ok"], true, "witness subscribe: {v}");
                        epoch = v["epoch"].as_str().map(str::to_string);
                    }
                    if v["type"] == "event" && v["channel"] == format!("room:{ROOM}") {
                        let seq = v["seq"].as_u64().expect("stored room event has seq");
                        seen.push((seq, v["id"].as_str().unwrap_or_default().to_string()));
                    }
                }
            }
        }
    });

    let p = pools();
    let mut rng = Rng::new(seed);
    let mut next_ref = 0u64;
    let (mut ws, _) = open(&s, FUZZER).await;
    // The room's epoch, so some `since` positions are real ones.
    let epoch = s.history(&format!("room:{ROOM}"), 0).await["epoch"]
        .as_str()
        .unwrap_or("e")
        .to_string();
    let mut accepted: BTreeMap<u64, String> = BTreeMap::new();
    let (mut closes, mut answered) = (BTreeMap::<u16, u32>::new(), 0u32);
    for i in 0..frames {
        let (msg, sent) = generate(&mut rng, &p, &mut next_ref, &epoch);
        let ctx = || format!("seed {seed}, frame {i}: {}", sent.what);
        // A send can fail only when the server already closed (after a close it caused): the
        // answer loop below finds the close.
        let _ = ws.send(msg).await;
        let Some(expect) = sent.expect.clone() else {
            continue;
        };
        // Read until this frame's answer, or the close it caused (or a violation limit's).
        let outcome = loop {
            match next_json(&mut ws).await {
                Ok(v) => {
                    check_frame(&contract, &v, &ctx);
                    if v["type"] == "disconnect" {
                        let code = v["code"].as_u64().unwrap() as u16;
                        let close = loop {
                            match next_json(&mut ws).await {
                                Ok(v) => check_frame(&contract, &v, &ctx),
                                Err(c) => break c,
                            }
                        };
                        assert_eq!(close, Some(code), "{}: disconnect {v}", ctx());
                        break Err(code);
                    }
                    let answer = matches!(v["type"].as_str(), Some("reply" | "pong"));
                    if answer && v["ref"] == expect {
                        break Ok(v);
                    }
                    assert!(!answer, "{}: an answer to another frame: {v}", ctx());
                }
                Err(c) => panic!("{}: closed ({c:?}) without a disconnect frame", ctx()),
            }
        };
        match outcome {
            Ok(v) => {
                answered += 1;
                let failed = v["ok"] == false;
                let code = v["error"]["code"].as_str().unwrap_or_default();
                let is_publish = sent.op.as_deref() == Some("publish");
                if failed && is_publish {
                    if ["forbidden", "not_member", "rejected", "unavailable"].contains(&code) {
                        assert_eq!(v["action"], "rollback", "{}: {v}", ctx());
                    }
                } else {
                    assert!(v.get("action").is_none(), "{}: {v}", ctx());
                }
                if is_publish && v["ok"] == true {
                    for d in v["deliveries"].as_array().unwrap() {
                        if d["channel"] == format!("room:{ROOM}") {
                            let seq = d["seq"].as_u64().expect("a stored delivery has a seq");
                            let id = v["id"].as_str().unwrap().to_string();
                            let before = accepted.insert(seq, id.clone());
                            assert!(
                                before.is_none_or(|b| b == id),
                                "{}: seq {seq} given to two events",
                                ctx()
                            );
                        }
                    }
                }
                if sent.op.as_deref() == Some("leave") && v["ok"] == true && v["left"] == true {
                    s.join(ROOM, FUZZER).await; // back in, so publishes keep landing
                }
            }
            Err(code) => {
                assert!(
                    code == 4010 || (sent.may_close && [1007, 1009].contains(&code)),
                    "{}: closed with {code}",
                    ctx()
                );
                *closes.entry(code).or_default() += 1;
                (ws, _) = open(&s, FUZZER).await;
            }
        }
    }
    drop(ws);

    // Nothing accepted is missing, and the witness saw the room's history exactly.
    let mut history: Vec<(u64, String)> = Vec::new();
    loop {
        let since = history.last().map_or(0, |(s, _)| *s);
        let h = s.history(&format!("room:{ROOM}"), since).await;
        let events = h["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        for e in events {
            history.push((e["seq"].as_u64().unwrap(), e["id"].as_str().unwrap().into()));
        }
    }
    // History keeps the room's newest events (its `history_size`): one run of seqs up to the last.
    let first = history.first().map_or(1, |(s, _)| *s);
    let last = history.last().map_or(0, |(s, _)| *s);
    assert!(
        history.iter().map(|(s, _)| *s).eq(first..=last),
        "seed {seed}: history has gaps: {}",
        first_difference(history.iter().map(|(s, _)| *s), first..=last)
    );
    stop_tx.send(last).unwrap();
    let (seen, witness_epoch) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the witness got every stored event")
        .unwrap();
    assert!(witness_epoch.is_some(), "the witness subscribed");
    // The witness saw every seq from 1, once, in order; the part history still has is the same.
    assert!(
        seen.iter().map(|(s, _)| *s).eq(1..=last),
        "seed {seed}: what the witness saw live: {}",
        first_difference(seen.iter().map(|(s, _)| *s), 1..=last)
    );
    assert!(
        seen[first as usize - 1..] == history[..],
        "seed {seed}: the witness and history disagree"
    );
    for (seq, id) in &accepted {
        assert_eq!(
            &seen[*seq as usize - 1].1,
            id,
            "seed {seed}: accepted event {seq} is not what was stored there"
        );
    }
    assert!(
        accepted.len() > frames / 40 && answered as usize > frames / 2,
        "seed {seed}: too little got through to mean anything: {} accepted, {answered} answered",
        accepted.len()
    );
    assert!(
        closes.contains_key(&4010),
        "seed {seed}: the violation limit never closed: {closes:?}"
    );
    eprintln!(
        "fuzz seed {seed}: {frames} frames, {answered} answered, {} accepted, closes {closes:?}",
        accepted.len()
    );
    s.stop().await;
}

// ---- the HTTP API ----

/// `#/components/...` references resolved against the description.
fn resolve<'a>(api: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => {
            let mut at = api;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            resolve(api, at)
        }
        None => v,
    }
}

/// A value for a schema: mostly of its type (strings from ids that exist, ids that do not and
/// malformed ones), sometimes anything at all.
fn value_of(rng: &mut Rng, p: &Pools, api: &Value, schema: &Value, depth: u32) -> Value {
    let schema = resolve(api, schema);
    if rng.chance(12) || depth > 3 {
        return rng.pick(&p.any);
    }
    match schema["type"].as_str() {
        Some("string") => rng.pick(&[
            json!("alice"),
            json!("bob"),
            json!("r1"),
            json!("room:r1"),
            json!("user:alice"),
            json!("global"),
            json!("chat.message"),
            json!("fcm"),
            json!("online"),
            json!("no such"),
            json!(""),
            json!("x".repeat(300)),
            json!("ü漢字🎉"),
        ]),
        Some("integer" | "number") => rng.pick(&p.seq),
        Some("boolean") => json!(rng.chance(50)),
        Some("array") => {
            let n = rng.below(4);
            let items = &schema["items"];
            Value::Array(
                (0..n)
                    .map(|_| value_of(rng, p, api, items, depth + 1))
                    .collect(),
            )
        }
        Some("object") | None if schema["properties"].is_object() => {
            let mut o = serde_json::Map::new();
            for (name, s) in schema["properties"].as_object().unwrap() {
                if rng.chance(75) {
                    o.insert(name.clone(), value_of(rng, p, api, s, depth + 1));
                }
            }
            Value::Object(o)
        }
        _ => rng.pick(&p.data),
    }
}

/// A path parameter: an id that exists, one that does not, or a malformed one (percent-encoded).
fn path_value(rng: &mut Rng, name: &str) -> String {
    let good: &[&str] = match name {
        "room" => &["r1", "r2"],
        "user" => &["alice", "bob", "nobody"],
        "channel" => &[
            "room:r1",
            "user:alice",
            "global",
            "active:r1",
            "presence:bob",
            "room:zz",
        ],
        "device" => &["d1", "d2"],
        "id" => &["0193a0c0-7b1e-7c3a-9f00-2b6d1e4c8a10", "alice"],
        _ => &["x"],
    };
    let bad = [
        "no%20such",
        "%00",
        "%C3%BC",
        "room%3A",
        "nope%3Ax",
        "a%2Fb",
        "-",
    ];
    if rng.chance(75) {
        good[rng.below(good.len())].to_string()
    } else if rng.chance(80) {
        bad[rng.below(bad.len())].to_string()
    } else {
        "x".repeat(200)
    }
}

/// An SSE cursor (`Last-Event-ID`): lines of `channel epoch seq`, base64url, with channels, epochs
/// and seqs that exist or not, and now and then not a cursor at all.
fn cursor(rng: &mut Rng, epochs: &[String]) -> String {
    use base64::Engine as _;
    if rng.chance(15) {
        let junk = ["garbage", "", "%%%", "cm9vbQ"];
        return junk[rng.below(junk.len())].to_string();
    }
    let channels = [
        "room:r1",
        "global",
        "user:alice",
        "user:bob",
        "room:zz",
        "nope:x",
        "",
    ];
    let seqs = [
        "0",
        "1",
        "2",
        "99",
        "18446744073709551615",
        "-1",
        "x",
        "1e3",
    ];
    let lines: Vec<String> = (0..1 + rng.below(3))
        .map(|_| {
            format!(
                "{} {} {}",
                channels[rng.below(channels.len())],
                epochs[rng.below(epochs.len())],
                seqs[rng.below(seqs.len())]
            )
        })
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(lines.join("\n"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn random_http_requests_get_documented_statuses_and_error_bodies() {
    let seed = seed();
    let contract = Contract::read();
    let per_op = if slow() { 500 } else { 25 };
    let api: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    let s = TestServer::start().await;
    s.join("r1", "alice").await;
    s.join("r1", "bob").await;
    let jwt = s.token("alice");
    s.publish(json!({"channel": "room:r1", "event": "chat.message", "data": {}}))
        .await;
    // Real epochs, so some cursors name positions the engine knows.
    let mut epochs = vec!["000000000000".to_string()];
    for ch in ["room:r1", "global", "user:alice"] {
        if let Some(e) = s.history(ch, 0).await["epoch"].as_str() {
            epochs.push(e.to_string());
        }
    }
    let p = pools();
    let mut rng = Rng::new(seed);
    let mut calls = 0;
    let mut by_status = BTreeMap::<u16, u32>::new();
    let mut undocumented = BTreeMap::<(String, u16), String>::new();
    for (path, ops) in api["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let ok_type = op["responses"]["200"]["content"]
                .as_object()
                .map(|c| c.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            // JSON endpoints and the event streams (the pages and files are checked elsewhere).
            let stream = ok_type == ["text/event-stream"];
            if !(stream || ok_type == ["application/json"]) || path == "/api/v1/openapi.json" {
                continue;
            }
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let params: Vec<&Value> = op["parameters"]
                .as_array()
                .map(|ps| ps.iter().map(|x| resolve(&api, x)).collect())
                .unwrap_or_default();
            let credential = match op["security"][0].as_object().and_then(|o| o.keys().next()) {
                Some(k) if k == "apiKey" => Some(API_KEY),
                Some(k) if k == "adminKey" => Some(ADMIN_KEY),
                Some(_) => Some(jwt.as_str()),
                None => None,
            };
            let body_schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
            for _ in 0..per_op {
                let mut url = path.clone();
                let mut query = Vec::new();
                let mut headers = Vec::new();
                for param in &params {
                    let name = param["name"].as_str().unwrap();
                    if name == "last_event_id" || name == "Last-Event-ID" {
                        if rng.chance(50) {
                            let c = cursor(&mut rng, &epochs);
                            match param["in"].as_str() {
                                Some("header") => headers.push((name.to_string(), c)),
                                _ => query.push((name.to_string(), c)),
                            }
                        }
                        continue;
                    }
                    match param["in"].as_str() {
                        Some("path") => {
                            url = url.replace(&format!("{{{name}}}"), &path_value(&mut rng, name))
                        }
                        Some("query") if name != "token" && rng.chance(60) => {
                            let v = value_of(&mut rng, &p, &api, &param["schema"], 0);
                            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                            query.push((name.to_string(), v));
                        }
                        _ => {}
                    }
                }
                if rng.chance(10) {
                    query.push(("unknown".into(), "1".into()));
                }
                let (body, what) = if body_schema.is_null() {
                    (None, "no body")
                } else {
                    match rng.below(10) {
                        0 => (Some("{".to_string()), "not JSON"),
                        1 => (Some(rng.pick(&p.any).to_string()), "any JSON"),
                        2 => (Some("y".repeat(300 * 1024)), "an oversized body"),
                        _ => (
                            Some(value_of(&mut rng, &p, &api, &body_schema, 0).to_string()),
                            "a body after the schema",
                        ),
                    }
                };
                let wrong_key = credential.is_some() && rng.chance(5);
                let mut full = url.clone();
                for (i, (k, v)) in query.iter().enumerate() {
                    full.push(if i == 0 { '?' } else { '&' });
                    full.push_str(&format!("{}={}", encode(k), encode(v)));
                }
                let mut req = s.http.request(
                    reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    s.url(&full),
                );
                if let Some(c) = credential {
                    req = req.bearer_auth(if wrong_key { "not-the-key" } else { c });
                }
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                if let Some(b) = &body {
                    req = req
                        .header("content-type", "application/json")
                        .body(b.clone());
                }
                let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
                    .await
                    .expect("an answer within 10 s")
                    .expect("an HTTP answer");
                let status = resp.status().as_u16();
                let is_stream = resp
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                if stream && status == 200 {
                    // Open: dropping the response ends the stream.
                    assert!(
                        is_stream,
                        "seed {seed}: {method} {full}: 200 without a stream"
                    );
                    calls += 1;
                    *by_status.entry(status).or_default() += 1;
                    continue;
                }
                let text = resp.text().await.unwrap_or_default();
                let ctx = format!(
                    "seed {seed}: {} {url} {query:?} ({what}{}): {status} {}",
                    method.to_uppercase(),
                    if wrong_key { ", a wrong key" } else { "" },
                    text.chars().take(300).collect::<String>()
                );
                calls += 1;
                *by_status.entry(status).or_default() += 1;
                assert!(status != 500, "{ctx}");
                if !documented.contains(&status) {
                    // Gathered, so one run names every gap between the description and the code.
                    let op = format!("{} {path}", method.to_uppercase());
                    undocumented.entry((op, status)).or_insert(ctx.clone());
                }
                if wrong_key {
                    assert_eq!(status, 401, "{ctx}");
                }
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{ctx}: the body is not JSON ({e})"));
                if status >= 400 {
                    let code = v["error"]["code"].as_str().unwrap_or_default();
                    assert!(
                        contract
                            .errors
                            .get(code)
                            .is_some_and(|s| s.contains(&status)),
                        "{ctx}: error code {code:?} with {status}"
                    );
                    assert!(v["error"]["message"].is_string(), "{ctx}");
                }
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "statuses an operation answered that docs/openapi.json does not list for it:\n{}",
        undocumented
            .iter()
            .map(|((op, status), example)| format!("{op} -> {status}, e.g. {example}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        by_status
            .get(&200)
            .is_some_and(|n| *n as usize > calls / 10)
            && by_status.contains_key(&400),
        "seed {seed}: too little got through to mean anything: {by_status:?}"
    );
    eprintln!("http fuzz seed {seed}: {calls} requests, statuses {by_status:?}");
    s.stop().await;
}
