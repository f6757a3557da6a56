//! SSE endpoints: `/sse?channels=…` (cursor `id:` per stored event, resume from `Last-Event-ID` across
//! every listed channel), `/api/v1/rooms/{room}/stream` (one room), `/api/presence/stream` (contacts'
//! presence: `connected`, `initial`, `status_change`, `heartbeat` every 30 s). A comment line every 15 s
//! keeps proxies from closing idle streams; `retry:` is sent once.
//!
//! An SSE stream is a session like a WebSocket (presence, limits, slow-consumer rule); it ends when the
//! client goes (the body stream is dropped) or the server closes it.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;
use tokio::time::{Instant, Interval};

use super::auth::Claims;
use super::routes::Routes;
use super::{ApiError, ApiResult, AppState, Client};
use crate::channels::{ChannelName, Kind};
use crate::engine::session::Verdict;
use crate::engine::{EngineError, ErrorCode, Next, Outbound, Session, SessionOpen, Transport};
use crate::event::FrameFormat;
use crate::event::{Cursor, Position, StoredEvent, reset_frame};

const KEEPALIVE: Duration = Duration::from_secs(15);
const PRESENCE_HEARTBEAT: Duration = Duration::from_secs(30);
/// Most channels one `/sse` stream may list.
const MAX_SSE_CHANNELS: usize = 64;

pub(super) fn routes() -> Routes {
    Routes::new()
        .get("/sse", sse)
        .get("/api/v1/rooms/{room}/stream", room_stream)
        .get("/api/presence/stream", presence_stream)
}

#[derive(Deserialize)]
struct SseQuery {
    channels: Option<String>,
    last_event_id: Option<String>,
    device: Option<String>,
    event_name: Option<String>,
}

/// What an event frame's `event:` line says (`?event_name=`): its event type (`type`, the default),
/// or `message`, so that a browser's `EventSource` hands every app event to `onmessage` without
/// knowing the types in advance. Protocol frames (reset, disconnect, presence, ...) keep their names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EventNames {
    Type,
    Message,
}

impl EventNames {
    fn parse(q: Option<&str>) -> ApiResult<EventNames> {
        match q {
            None | Some("type") => Ok(EventNames::Type),
            Some("message") => Ok(EventNames::Message),
            Some(other) => Err(ApiError::bad(format!(
                "event_name: {other:?} is not one of type, message"
            ))),
        }
    }

    /// The `event:` name of `frame`, whose own name is `name`.
    fn of<'a>(self, name: &'a str, frame: &[u8]) -> &'a str {
        if self == EventNames::Message && crate::event::is_event_frame(frame) {
            "message"
        } else {
            name
        }
    }
}

fn last_event_id(headers: &HeaderMap, q: Option<&str>) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| q.map(str::to_string))
        .filter(|s| !s.is_empty())
}

async fn sse(
    State(state): State<AppState>,
    Client(claims): Client,
    Query(q): Query<SseQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let list = q.channels.as_deref().unwrap_or("");
    let mut channels = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ch = ChannelName::parse(name).map_err(EngineError::from)?;
        if !channels.contains(&ch) {
            channels.push(ch);
        }
    }
    if channels.is_empty() {
        return Err(ApiError::bad(
            "channels: give at least one channel (?channels=a,b)",
        ));
    }
    if channels.len() > MAX_SSE_CHANNELS {
        return Err(ApiError::from(EngineError::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_SSE_CHANNELS} channels per stream"),
        )));
    }
    let resume = last_event_id(&headers, q.last_event_id.as_deref());
    let names = EventNames::parse(q.event_name.as_deref())?;
    open_stream(
        &state,
        &claims,
        q.device,
        names,
        channels,
        resume,
        StreamKind::Channels,
    )
    .await
}

async fn room_stream(
    State(state): State<AppState>,
    Client(claims): Client,
    Path(room): Path<String>,
    Query(q): Query<SseQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let ch = ChannelName::try_of(Kind::Room, &room).map_err(EngineError::from)?;
    let resume = last_event_id(&headers, q.last_event_id.as_deref());
    let names = EventNames::parse(q.event_name.as_deref())?;
    open_stream(
        &state,
        &claims,
        q.device,
        names,
        vec![ch],
        resume,
        StreamKind::Channels,
    )
    .await
}

async fn presence_stream(
    State(state): State<AppState>,
    Client(claims): Client,
    Query(q): Query<SseQuery>,
) -> ApiResult<Response> {
    let names = EventNames::parse(q.event_name.as_deref())?;
    open_stream(
        &state,
        &claims,
        q.device,
        names,
        Vec::new(),
        None,
        StreamKind::Presence,
    )
    .await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Channels,
    Presence,
}

async fn open_stream(
    state: &AppState,
    claims: &Claims,
    device: Option<String>,
    names: EventNames,
    channels: Vec<ChannelName>,
    resume: Option<String>,
    kind: StreamKind,
) -> ApiResult<Response> {
    let engine = &state.engine;
    // Permissions first, so a refused stream never counts as a session.
    for ch in &channels {
        engine.can_subscribe(&claims.sub, &claims.attrs, ch).await?;
    }
    let cursor = match &resume {
        Some(id) => Some(
            Cursor::decode(id)
                .ok_or_else(|| ApiError::bad("Last-Event-ID is not a herald cursor"))?,
        ),
        None => None,
    };
    let mut session = engine
        .open_session(SessionOpen {
            user: claims.sub.as_str().into(),
            device: device.or_else(|| claims.device.clone()),
            platform: claims.platform.clone(),
            state: Default::default(),
            attrs: claims.attrs.clone(),
            transport: Transport::Sse,
            // An SSE stream outlives its token, as EventSource reconnects with the same URL.
            expires: None,
            // SSE carries each event's type and cursor in its own fields: frames stay whole.
            format: FrameFormat::Full,
        })
        .await?;
    let mut out = BytesMut::new();
    out.put_slice(b"retry: 3000\n\n");
    let mut positions: BTreeMap<String, Position> = BTreeMap::new();
    let mut replay: Vec<(ChannelName, StoredEvent)> = Vec::new();
    for ch in channels {
        let since = cursor
            .as_ref()
            .and_then(|c| c.positions.get(ch.as_str()).cloned());
        let (reply, events) = session.subscribe_checked(ch.clone(), since.clone()).await?;
        if let (Some(epoch), Some(seq)) = (reply.epoch, reply.seq) {
            let start = match &since {
                Some(s) if reply.recovered => s.seq,
                _ => seq,
            };
            if since.is_some() && !reply.recovered {
                // Tell the client its position could not be served (it must refetch).
                write_event(&mut out, None, "reset", &reset_frame(&ch, &epoch, seq));
            }
            positions.insert(ch.to_string(), Position { epoch, seq: start });
        }
        replay.extend(events.into_iter().map(|e| (ch.clone(), e)));
    }
    let (mut cursor_text, mut cursor_id) = (String::new(), String::new());
    for (ch, ev) in replay {
        if let Some(p) = positions.get_mut(ch.as_str()) {
            p.seq = ev.seq;
        }
        let name = crate::event::frame_event_type(&ev.frame).unwrap_or_else(|| "message".into());
        Cursor::encode_into(&positions, &mut cursor_text, &mut cursor_id);
        write_event(
            &mut out,
            Some(&cursor_id),
            names.of(&name, &ev.frame),
            &ev.frame,
        );
    }
    if kind == StreamKind::Presence {
        let contacts = engine.contacts(&claims.sub).await?.contacts;
        for c in &contacts {
            session
                .subscribe_checked(ChannelName::of(Kind::Presence, c), None)
                .await?;
        }
        let connected = json!({ "user": claims.sub, "conn": &*session.handle.session, "contacts": contacts.len() });
        write_event(
            &mut out,
            None,
            "connected",
            connected.to_string().as_bytes(),
        );
        let initial = engine.presence_of(&contacts).await?.presence;
        let initial = serde_json::to_vec(&initial).expect("presence serialises");
        write_event(&mut out, None, "initial", &initial);
    }
    let st = StreamState {
        session,
        positions,
        kind,
        names,
        keepalive: interval(KEEPALIVE),
        heartbeat: interval(PRESENCE_HEARTBEAT),
        first: Some(out.freeze()),
        done: false,
        cursor_text,
        cursor_id,
    };
    let body = Body::from_stream(stream::unfold(st, next_chunk));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn interval(every: Duration) -> Interval {
    let mut i = tokio::time::interval_at(Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

struct StreamState {
    session: Session,
    positions: BTreeMap<String, Position>,
    kind: StreamKind,
    names: EventNames,
    keepalive: Interval,
    heartbeat: Interval,
    first: Option<Bytes>,
    done: bool,
    /// The cursor's plain text and its encoding, reused from event to event.
    cursor_text: String,
    cursor_id: String,
}

/// Appends one SSE event (`id:` when given, `event:`, one `data:` line) to `out`: the per-recipient
/// framing of every SSE stream (`pub` for `benches/frames.rs`).
pub fn write_event(out: &mut BytesMut, id: Option<&str>, event: &str, data: &[u8]) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_slice(b"\ndata: ");
    // Frames are single-line JSON, so one `data:` line suffices.
    out.put_slice(data);
    out.put_slice(b"\n\n");
}

async fn next_chunk(mut st: StreamState) -> Option<(Result<Bytes, std::io::Error>, StreamState)> {
    if let Some(first) = st.first.take() {
        return Some((Ok(first), st));
    }
    if st.done {
        return None;
    }
    let handle = st.session.handle.clone();
    loop {
        let mut out = BytesMut::with_capacity(1024);
        tokio::select! {
            next = st.session.recv() => match next {
                Next::Close(reason) => {
                    st.done = true;
                    write_event(&mut out, None, "disconnect", &reason.frame());
                    return Some((Ok(out.freeze()), st));
                }
                Next::Out(item) => {
                    st.write(item, &mut out);
                    while out.len() < 64 * 1024 {
                        let Some(more) = st.session.try_recv() else { break };
                        st.write(more, &mut out);
                    }
                    st.session.after_delivery().await;
                }
            },
            _ = st.keepalive.tick() => {
                handle.touch();
                out.put_slice(b": keep-alive\n\n");
            }
            _ = st.heartbeat.tick(), if st.kind == StreamKind::Presence => {
                let hb = json!({ "ts": crate::event::now_ms() });
                write_event(&mut out, None, "heartbeat", hb.to_string().as_bytes());
            }
        }
        if !out.is_empty() {
            return Some((Ok(out.freeze()), st));
        }
    }
}

impl StreamState {
    fn write(&mut self, item: Outbound, out: &mut BytesMut) {
        match item {
            // `Checked` comes only to a WebSocket's writer (the flush tick's), already checked.
            Outbound::Checked(d) => self.write_delivery(&d, out),
            Outbound::Deliver(d) => {
                match self.session.check(&d) {
                    Verdict::Skip => return,
                    Verdict::Reset(r) => write_event(out, None, "reset", &r),
                    Verdict::Deliver => {}
                }
                self.write_delivery(&d, out);
            }
            Outbound::Ping => self.session.handle.touch(),
            other => self.session.control(other),
        }
    }

    fn write_delivery(&mut self, d: &crate::backend::Delivery, out: &mut BytesMut) {
        let name: &str = match (self.kind, &*d.event) {
            (StreamKind::Presence, "presence.changed") => "status_change",
            (_, e) => self.names.of(e, &d.frame),
        };
        match &d.position {
            Some(p) => {
                match self.positions.get_mut(d.channel.as_str()) {
                    Some(have) => have.clone_from(p),
                    None => {
                        self.positions.insert(d.channel.to_string(), p.clone());
                    }
                }
                Cursor::encode_into(&self.positions, &mut self.cursor_text, &mut self.cursor_id);
                write_event(out, Some(&self.cursor_id), name, &d.frame);
            }
            None => write_event(out, None, name, &d.frame),
        }
    }
}
