//! Frame encoding, with the functions the publish and delivery paths call, for a chat payload (~100 B of
//! `data`) and a larger one (~2 KB):
//!
//! - `body_encode`: [`EventBody::encode`], once per publish (`engine/pipeline.rs`);
//! - `event_frame`: [`event_frame`] with a seq and epoch, once per publish and target channel (the memory
//!   broker; it includes [`herald::event::event_frame_head`], which the Redis broker sends to its Lua step);
//!   `body_encode` + `event_frame` is what one publish to one channel costs in encoding;
//! - `replay_frame`: [`replay_frame`], once per replayed event and session (history, not the live path);
//! - `sse_event`: what an SSE stream does per recipient and stored event (`transport/sse.rs`): the
//!   stream's cursor (one channel) re-encoded as the `id:` line, then [`write_event`] into the
//!   chunk buffer.
//!
//! Throughput is the bytes each function produces.
//!
//! `cargo bench --bench frames`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald::channels::ChannelName;
use herald::event::{Cursor, Epoch, EventBody, Position, event_frame, replay_frame};
use herald::transport::sse::write_event;
use serde_json::json;
use serde_json::value::RawValue;

const ID: &str = "0190c3e4-5b6a-7c8d-9e0f-112233445566";
const TS: i64 = 1_767_225_600_000;

/// A chat message of ordinary length: ~100 bytes of `data`.
fn chat_payload() -> Box<RawValue> {
    let v = json!({
        "text": "Are we still on for lunch at noon? I booked the usual place.",
        "mentions": ["bob"],
        "reply_to": 41
    });
    RawValue::from_string(v.to_string()).expect("valid JSON")
}

/// A larger message: ~2 KB of `data` (long text, attachments, mentions).
fn large_payload() -> Box<RawValue> {
    let text =
        "Minutes of the planning meeting: we agreed to ship the release on Thursday. ".repeat(18);
    let attachments: Vec<_> = (0..4)
        .map(|i| {
            json!({
                "id": format!("att-{i}"),
                "name": format!("diagram-{i}.png"),
                "mime": "image/png",
                "size": 48_213 + i,
                "url": format!("https://files.example.com/r1/att-{i}/diagram-{i}.png")
            })
        })
        .collect();
    let v = json!({
        "text": text,
        "mentions": ["bob", "carol", "dave"],
        "attachments": attachments,
        "reply_to": 41
    });
    RawValue::from_string(v.to_string()).expect("valid JSON")
}

fn frames(c: &mut Criterion) {
    let channel = ChannelName::parse("room:r1").expect("valid");
    let epoch = Epoch::new("5f3a9c0d12ab");
    let seq = 1_234_567;
    for (name, data, size) in [
        ("chat_100B", chat_payload(), 80..=120),
        ("large_2KB", large_payload(), 1900..=2200),
    ] {
        assert!(
            size.contains(&data.get().len()),
            "{name}: {} bytes",
            data.get().len()
        );
        let body = EventBody {
            id: ID,
            event: "chat.message",
            data: &data,
            from: Some("alice"),
            ts: TS,
        };
        let encoded = body.encode();
        let frame = event_frame(&channel, Some((&epoch, seq)), &encoded);
        let replayed = replay_frame(&frame);
        // The frame must be the JSON clients parse, or the numbers measure something else.
        let v: serde_json::Value = serde_json::from_slice(&frame).expect("frame is JSON");
        assert_eq!(v["seq"], seq);
        let positions: BTreeMap<String, Position> = [(
            channel.to_string(),
            Position {
                epoch: epoch.clone(),
                seq,
            },
        )]
        .into_iter()
        .collect();
        let (mut text, mut id, mut out) = (String::new(), String::new(), BytesMut::new());
        let mut sse = |frame: &[u8]| {
            // As `StreamState::write` does for a stored event: the stream's cursor (every channel
            // of it) re-encoded into reused buffers, then the event appended to the chunk buffer
            // (cleared here once it holds 64 KiB, as the stream sends a chunk).
            Cursor::encode_into(&positions, &mut text, &mut id);
            if out.len() > 64 * 1024 {
                out.clear();
            }
            write_event(&mut out, Some(&id), "chat.message", frame);
            out.len()
        };
        let sse_len = {
            let before = sse(&frame);
            sse(&frame) - before
        };

        let mut g = c.benchmark_group(format!("frames/{name}"));
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_function("body_encode", |b| b.iter(|| black_box(&body).encode()));
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function("event_frame", |b| {
            b.iter(|| {
                event_frame(
                    black_box(&channel),
                    Some((&epoch, black_box(seq))),
                    black_box(&encoded),
                )
            })
        });
        g.throughput(Throughput::Bytes(replayed.len() as u64));
        g.bench_function("replay_frame", |b| {
            b.iter(|| replay_frame(black_box(&frame)))
        });
        g.throughput(Throughput::Bytes(sse_len as u64));
        g.bench_function("sse_event", |b| b.iter(|| sse(black_box(&frame))));
        g.finish();
    }
}

criterion_group!(benches, frames);
criterion_main!(benches);
