//! Events and positions: `Event`, `EventId`, `Seq`, `Epoch`, `Position`, the encoded event frame, and the
//! SSE cursor codec (`Cursor`, the opaque `Last-Event-ID`).
//!
//! Vocabulary shared by every module; imports nothing of the engine, the transports or the backends.
//!
//! An event is encoded **once** per publish and per target channel into the exact WebSocket frame
//! (`{"type":"event","channel":…,"seq":…,"epoch":…,"id":…,…}`); every recipient, the history and the SSE
//! stream share those bytes. The frame is built from a channel-independent *body* (`"id":…,"ts":…}`)
//! encoded once per publish, so a publish to N channels serialises the payload once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::channels::ChannelName;

/// A channel's sequence number: 1, 2, 3 … per channel and epoch. 0 means "nothing yet".
pub type Seq = u64;

/// A channel history's generation. A new epoch means the history was lost or reset, so positions taken
/// under an older epoch cannot be served.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A fresh random epoch (12 hex characters).
    pub fn generate() -> Self {
        let n: u64 = rand::random();
        Epoch(format!("{:012x}", n & 0xffff_ffff_ffff).into())
    }

    /// Wraps an existing epoch string (from a backend or a client).
    pub fn new(s: &str) -> Self {
        Epoch(s.into())
    }

    /// The epoch as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a channel stands, or where a client stands in it: `{epoch, seq}` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The last seq (of the channel, or seen by the client).
    pub seq: Seq,
}

/// An event id: a UUID v7 (time-ordered) as a string.
pub type EventId = Arc<str>;

/// A new event id.
pub fn new_event_id() -> EventId {
    uuid::Uuid::now_v7().to_string().into()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a publisher sends, before it is stored: encoded once per publish as the frame body.
#[derive(Debug, Serialize)]
pub struct EventBody<'a> {
    /// Event id.
    pub id: &'a str,
    /// Event type (`chat.message`, `typing`, …).
    pub event: &'a str,
    /// Application payload, passed through untouched.
    pub data: &'a RawValue,
    /// Sender user id, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    /// Publish time, unix ms.
    pub ts: i64,
}

impl EventBody<'_> {
    /// Serialises the body as the tail of an event frame: `"id":…,"ts":…}` (no opening brace), so
    /// [`event_frame`] can prefix it per channel without re-encoding the payload.
    pub fn encode(&self) -> Bytes {
        let full = serde_json::to_vec(self).expect("event body serialises");
        // `full` starts with '{'; keep the rest.
        Bytes::copy_from_slice(&full[1..])
    }
}

/// Builds the WebSocket frame for an event on `channel` from its encoded body: the one place the frame
/// layout is fixed (the Redis Lua step must produce the same bytes).
pub fn event_frame(channel: &ChannelName, position: Option<(&Epoch, Seq)>, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 + channel.as_str().len() + body.len());
    buf.put_slice(event_frame_head(channel).as_bytes());
    if let Some((epoch, seq)) = position {
        buf.put_slice(b"\"seq\":");
        let _ = std::fmt::Write::write_fmt(&mut buf, format_args!("{seq}"));
        buf.put_slice(b",\"epoch\":\"");
        buf.put_slice(epoch.as_str().as_bytes());
        buf.put_slice(b"\",");
    }
    buf.put_slice(body);
    buf.freeze()
}

/// The start of every event frame on `channel`: `{"type":"event","channel":"…",`. Backends that build
/// frames elsewhere (the Redis Lua step) start from this, so the bytes are the same everywhere.
pub fn event_frame_head(channel: &ChannelName) -> String {
    // Channel names are validated to `[A-Za-z0-9_.@:-]`, so they need no JSON escaping.
    format!("{{\"type\":\"event\",\"channel\":\"{}\",", channel.as_str())
}

/// The `reset` frame: `channel`'s epoch changed (or a resume from an old position could not be
/// served), and its position is now `epoch`/`seq`. Every transport sends this one.
pub fn reset_frame(channel: &ChannelName, epoch: &Epoch, seq: Seq) -> Bytes {
    #[derive(Serialize)]
    struct Reset<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: &'a ChannelName,
        epoch: &'a Epoch,
        seq: Seq,
        recovered: bool,
    }
    let frame = Reset {
        kind: "reset",
        channel,
        epoch,
        seq,
        recovered: false,
    };
    Bytes::from(serde_json::to_vec(&frame).expect("reset frame serialises"))
}

/// The same frame marked `"replay":true` (sent from history rather than live).
pub fn replay_frame(frame: &[u8]) -> Bytes {
    const HEAD: &[u8] = b"{\"type\":\"event\",";
    let mut buf = BytesMut::with_capacity(frame.len() + 16);
    if frame.starts_with(HEAD) {
        buf.put_slice(HEAD);
        buf.put_slice(b"\"replay\":true,");
        buf.put_slice(&frame[HEAD.len()..]);
    } else {
        buf.put_slice(frame);
    }
    buf.freeze()
}

/// The `event` field of a stored frame (replay and gap repair: live deliveries carry it beside the
/// frame, so this parse stays off the fan-out path).
pub fn frame_event_type(frame: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        event: Option<String>,
    }
    serde_json::from_slice::<Head>(frame)
        .ok()
        .and_then(|h| h.event)
}

/// Whether `frame` is an event frame (`{"type":"event",…}`, as herald writes them: `type` first),
/// rather than a protocol frame (reply, reset, presence, disconnect).
pub fn is_event_frame(frame: &[u8]) -> bool {
    frame.starts_with(br#"{"type":"event","#)
}

/// How a session's event frames are written: the full object (the default), or the compact array a
/// client asks for at connect (`?format=compact`, `"format":"compact"` in `connect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrameFormat {
    /// `{"type":"event","channel":…,"seq":…,"epoch":…,"id":…,"event":…,"data":…,"from":…,"ts":…}`.
    #[default]
    Full,
    /// `[channel, seq, event, data, ts]`, with `from` as a sixth element when there is a sender:
    /// no `type`, `epoch` (the subscribe reply and `reset` carry it), `id` or field names.
    Compact,
}

impl FrameFormat {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameFormat::Full => "full",
            FrameFormat::Compact => "compact",
        }
    }

    /// The format a client named (`full`, `compact`); the error says what is accepted.
    pub fn parse(name: &str) -> Result<FrameFormat, String> {
        match name {
            "full" => Ok(FrameFormat::Full),
            "compact" => Ok(FrameFormat::Compact),
            other => Err(format!(
                "format {:?}: expected \"full\" or \"compact\"",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// [`compact_frame`] of an event frame; any other frame as it is (it has one form).
pub fn compact_or_same(frame: &Bytes) -> Bytes {
    compact_frame(frame).unwrap_or_else(|| frame.clone())
}

/// The compact form of a full event frame (live or replayed), `None` for any other frame: built from
/// the frame's bytes, with the payload copied through as it is.
pub fn compact_frame(full: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Full<'a> {
        #[serde(borrow)]
        channel: std::borrow::Cow<'a, str>,
        seq: Option<Seq>,
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        data: &'a RawValue,
        #[serde(borrow)]
        from: Option<std::borrow::Cow<'a, str>>,
        ts: i64,
    }
    if !full.starts_with(b"{\"type\":\"event\",") {
        return None;
    }
    let f: Full<'_> = serde_json::from_slice(full).ok()?;
    let mut buf = Vec::with_capacity(48 + f.data.get().len());
    buf.push(b'[');
    serde_json::to_writer(&mut buf, &f.channel).ok()?;
    match f.seq {
        Some(s) => {
            let _ = std::io::Write::write_fmt(&mut buf, format_args!(",{s},"));
        }
        None => buf.extend_from_slice(b",null,"),
    }
    serde_json::to_writer(&mut buf, &f.event).ok()?;
    buf.push(b',');
    buf.extend_from_slice(f.data.get().as_bytes());
    let _ = std::io::Write::write_fmt(&mut buf, format_args!(",{}", f.ts));
    if let Some(from) = &f.from {
        buf.push(b',');
        serde_json::to_writer(&mut buf, from).ok()?;
    }
    buf.push(b']');
    Some(Bytes::from(buf))
}

/// One stored event as history returns it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// Its seq in the channel.
    pub seq: Seq,
    /// Publish time, unix ms (for history age limits).
    pub ts: i64,
    /// The live frame bytes (as [`event_frame`] built them).
    pub frame: Bytes,
}

/// The SSE cursor: every channel's `{epoch, seq}` of one stream, encoded as an opaque `Last-Event-ID`.
///
/// Encoding: URL-safe base64 (no padding) of `channel epoch seq` lines. Opaque to clients; stable enough
/// that a cursor from one node works on any other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Channel name -> position.
    pub positions: BTreeMap<String, Position>,
}

impl Cursor {
    /// Encodes the cursor.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        Cursor::encode_into(&self.positions, &mut String::new(), &mut out);
        out
    }

    /// Encodes `positions` as a cursor into `out` (cleared first), with `scratch` for the plain
    /// text: an SSE stream keeps both and re-encodes its cursor per event without allocating.
    pub fn encode_into(
        positions: &BTreeMap<String, Position>,
        scratch: &mut String,
        out: &mut String,
    ) {
        use std::fmt::Write as _;
        scratch.clear();
        for (ch, p) in positions {
            // Writing to a String cannot fail.
            let _ = writeln!(scratch, "{ch} {} {}", p.epoch.as_str(), p.seq);
        }
        out.clear();
        URL_SAFE_NO_PAD.encode_string(scratch.as_bytes(), out);
    }

    /// Decodes a cursor; `None` when it is not one of ours.
    pub fn decode(s: &str) -> Option<Cursor> {
        if s.len() > 16 * 1024 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(s.trim()).ok()?;
        let text = std::str::from_utf8(&raw).ok()?;
        let mut positions = BTreeMap::new();
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (ch, epoch, seq) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || epoch.is_empty() {
                return None;
            }
            positions.insert(
                ch.to_string(),
                Position {
                    epoch: Epoch::new(epoch),
                    seq: seq.parse().ok()?,
                },
            );
        }
        Some(Cursor { positions })
    }
}

/// Where an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A backend through the HTTP API.
    Api,
    /// A client connection.
    Client,
}

impl Source {
    /// As scripts see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Client => "client",
        }
    }
}

/// An event as the rules see it, in the shape of a `POST /api/v1/events` body (`event`, `channel`,
/// `room`, `to`, `from`, `data`; `idempotency_key` is accepted and has no effect here) plus what only a
/// simulation needs: `source`, the sender's JWT `attrs`, and the event `id`. Fixtures (TOML),
/// `herald simulate` (JSON) and `POST /admin/rules/dry-run` all read this one shape. `type` is
/// accepted for `event`, as the publish API accepts it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// Event type.
    #[serde(alias = "type")]
    pub event: String,
    /// Target channel.
    pub channel: Option<String>,
    /// Target room (bare id).
    #[serde(alias = "roomId")]
    pub room: Option<String>,
    /// Target users.
    #[serde(default)]
    pub to: Vec<String>,
    /// Sender.
    pub from: Option<String>,
    /// Payload.
    #[serde(default)]
    pub data: Value,
    /// `api` (default) or `client`.
    pub source: Option<String>,
    /// The sender's JWT attrs.
    #[serde(default)]
    pub attrs: Map<String, Value>,
    /// Event id (default: a fixed test id).
    pub id: Option<String>,
    /// As in a publish; a simulation stores nothing, so it changes nothing.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_frame_keeps_channel_seq_event_data_ts_from() {
        let ch = ChannelName::parse("room:bench").unwrap();
        let data = RawValue::from_string(r#"{"t":1,"p":"x"}"#.into()).unwrap();
        let body = EventBody {
            id: "0193a0c0-0000-7000-8000-000000000000",
            event: "chat.message",
            data: &data,
            from: Some("alice"),
            ts: 1733212345678,
        }
        .encode();
        let full = event_frame(&ch, Some((&Epoch::new("e1"), 12345)), &body);
        let c = compact_frame(&full).unwrap();
        assert_eq!(
            std::str::from_utf8(&c).unwrap(),
            r#"["room:bench",12345,"chat.message",{"t":1,"p":"x"},1733212345678,"alice"]"#
        );
        // A replayed frame compacts the same; an unstored one has a null seq.
        assert_eq!(compact_frame(&replay_frame(&full)).unwrap(), c);
        let body = EventBody {
            from: None,
            ..body_of(&data)
        }
        .encode();
        let c = compact_frame(&event_frame(&ch, None, &body)).unwrap();
        assert_eq!(
            std::str::from_utf8(&c).unwrap(),
            r#"["room:bench",null,"typing",{"t":1,"p":"x"},1]"#
        );
        // The envelope (all but the payload) of a room event stays under 60 bytes.
        assert!(c.len() - data.get().len() < 60);
        assert_eq!(
            compact_frame(br#"{"type":"presence.update","room":"r"}"#),
            None
        );
    }

    fn body_of(data: &RawValue) -> EventBody<'_> {
        EventBody {
            id: "i",
            event: "typing",
            data,
            from: None,
            ts: 1,
        }
    }

    #[test]
    fn cursor_round_trips() {
        let mut c = Cursor::default();
        c.positions.insert(
            "room:r1".into(),
            Position {
                epoch: Epoch::new("abc"),
                seq: 7,
            },
        );
        c.positions.insert(
            "global".into(),
            Position {
                epoch: Epoch::new("def"),
                seq: 0,
            },
        );
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not base64!"), None);
    }

    #[test]
    fn frame_is_valid_json_and_replay_marks_it() {
        let ch = ChannelName::parse("room:r1").unwrap();
        let data = RawValue::from_string("{\"text\":\"hi\"}".into()).unwrap();
        let body = EventBody {
            id: "e1",
            event: "chat.message",
            data: &data,
            from: Some("u1"),
            ts: 5,
        }
        .encode();
        let f = event_frame(&ch, Some((&Epoch::new("ep"), 3)), &body);
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["epoch"], "ep");
        assert_eq!(v["data"]["text"], "hi");
        let r: serde_json::Value = serde_json::from_slice(&replay_frame(&f)).unwrap();
        assert_eq!(r["replay"], true);
        assert_eq!(r["id"], "e1");
    }
}
