//! The HTTP API for backends (`/api/v1`, API key), seed 002's `/api/online-status/*` (client JWT), and
//! the root probes `/healthz`, `/readyz`, `/metrics`, and the API's own description
//! (`/api/v1/openapi.json`, `docs/openapi.json`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

use super::routes::Routes;
use super::{AdminKey, ApiError, ApiKey, ApiResult, AppState, Client, Json, JsonBody};
use crate::announcement::{Announcement, AnnouncementDraft};
use crate::channels::{ChannelName, Kind, valid_id};
use crate::device::PushDevice;
use crate::engine::history::History;
use crate::engine::presence::OnlineUsers;
use crate::engine::{EngineError, PublishRequest};
use crate::event::{Source, new_event_id, now_ms};
use crate::presence::UserPresence;

/// A handler's reply: a typed result, serialised as JSON.
type Reply<T> = ApiResult<Json<T>>;

pub(super) fn routes() -> Routes {
    Routes::new()
        .post("/api/v1/events", publish)
        .post("/api/v1/notifications/publish", publish)
        .get("/api/v1/channels/{channel}/history", history)
        .get("/api/v1/rooms/{room}/events", room_events)
        .put("/api/v1/rooms/{room}/members/{user}", add_member)
        .delete("/api/v1/rooms/{room}/members/{user}", remove_member)
        .get("/api/v1/rooms/{room}/members", members)
        .post("/api/v1/rooms/{room}/leave/{user}", leave)
        .get("/api/v1/rooms/{room}/presence", room_presence)
        .post("/api/v1/rooms/{room}/presence/heartbeat", room_heartbeat)
        .put("/api/v1/users/{user}/contacts", set_contacts)
        .get("/api/v1/users/{user}/contacts", get_contacts)
        .post("/api/v1/presence/query", presence_query)
        .get("/api/v1/presence/online/count", online_count)
        .get("/api/v1/presence/online", online_list)
        .get("/api/v1/presence/{user}", presence_one)
        .get("/api/v1/users/{user}/unread", unread)
        .post("/api/v1/users/{user}/read", mark_read)
        .get("/api/v1/notifications/unread", unread_alias)
        .patch("/api/v1/notifications/{id}/read", read_by_event_id)
        .get("/api/v1/users/{user}/devices", devices)
        .put("/api/v1/users/{user}/devices/{device}", put_device)
        .delete("/api/v1/users/{user}/devices/{device}", delete_device)
        .post("/api/v1/announcements", create_announcement)
        .get("/api/v1/announcements", list_announcements)
        .post("/api/v1/users/{user}/disconnect", disconnect)
        .get("/api/v1/push/dead", push_dead)
        .get("/api/v1/openapi.json", openapi)
        .post("/api/online-status/users", os_users)
        .get("/api/online-status/user/{id}", os_user)
        .get("/api/online-status/friends", os_friends)
        .post("/api/online-status/heartbeat", os_heartbeat)
        .get("/api/online-status/count", os_count)
        .get("/api/online-status/online", os_online)
        .get("/history", client_history)
        .get("/healthz", healthz)
        .get("/readyz", readyz)
        .get("/metrics", metrics)
}

/// `GET /api/v1/openapi.json`: the API's description, with no key (like `/healthz`, it is not data).
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::OPENAPI_JSON,
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.engine.ready().await {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "backend unreachable",
        )
        .into_response()
    }
}

async fn metrics(State(s): State<AppState>, parts: axum::http::request::Parts) -> Response {
    if s.engine.config.metrics_require_admin {
        let mut parts = parts;
        if let Err(e) = <AdminKey as axum::extract::FromRequestParts<AppState>>::from_request_parts(
            &mut parts, &s,
        )
        .await
        {
            return e.into_response();
        }
    }
    crate::metrics::sample(s.engine.hub.sample());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

/// `POST /events` body.
#[derive(Deserialize)]
struct PublishBody {
    #[serde(alias = "type")]
    event: String,
    channel: Option<String>,
    #[serde(alias = "roomId")]
    room: Option<String>,
    to: Option<Vec<String>>,
    from: Option<String>,
    data: Option<Box<RawValue>>,
    idempotency_key: Option<String>,
}

async fn publish(
    State(s): State<AppState>,
    _: ApiKey,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<PublishBody>,
) -> Reply<impl Serialize> {
    let mut targets = Vec::new();
    if let Some(c) = &b.channel {
        targets.push(ChannelName::parse(c).map_err(EngineError::from)?);
    }
    if let Some(r) = &b.room {
        targets.push(ChannelName::try_of(Kind::Room, r).map_err(EngineError::from)?);
    }
    for u in b.to.iter().flatten() {
        targets.push(ChannelName::try_of(Kind::User, u).map_err(EngineError::from)?);
    }
    if let Some(f) = &b.from
        && !valid_id(f)
    {
        return Err(ApiError::bad(
            "from: a user id (1-128 characters of [A-Za-z0-9_.@-])",
        ));
    }
    let key = b.idempotency_key.or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let data = b
        .data
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("valid JSON"));
    let reply = s
        .engine
        .publish(PublishRequest {
            event: b.event,
            targets,
            from: b.from.map(|f| Arc::from(f.as_str())),
            data,
            idempotency_key: key,
            source: Source::Api,
            attrs: None,
        })
        .await?;
    Ok(Json(reply))
}

fn num(q: &HashMap<String, String>, k: &str) -> Result<Option<u64>, ApiError> {
    match q.get(k).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad(format!("{k}: expected a non-negative integer"))),
    }
}

/// A history page of `ch` as `?since=` (exclusive) and `?limit=` ask.
async fn history_page(
    s: &AppState,
    ch: &ChannelName,
    q: &HashMap<String, String>,
) -> Reply<History> {
    let since = num(q, "since")?.unwrap_or(0);
    let limit = num(q, "limit")?.map(|l| l as usize);
    Ok(Json(s.engine.history(ch, since, None, limit).await?))
}

async fn history(
    State(s): State<AppState>,
    _: ApiKey,
    Path(channel): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    let ch = ChannelName::parse(&channel).map_err(EngineError::from)?;
    history_page(&s, &ch, &q).await
}

async fn room_events(
    State(s): State<AppState>,
    _: ApiKey,
    Path(room): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    let ch = ChannelName::try_of(Kind::Room, &room).map_err(EngineError::from)?;
    history_page(&s, &ch, &q).await
}

async fn add_member(
    State(s): State<AppState>,
    _: ApiKey,
    Path((room, user)): Path<(String, String)>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.add_member(&room, &user).await?))
}

async fn remove_member(
    State(s): State<AppState>,
    _: ApiKey,
    Path((room, user)): Path<(String, String)>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.remove_member(&room, &user).await?))
}

async fn members(
    State(s): State<AppState>,
    _: ApiKey,
    Path(room): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.members(&room).await?))
}

async fn leave(
    State(s): State<AppState>,
    _: ApiKey,
    Path((room, user)): Path<(String, String)>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.leave_room(&room, &user).await?))
}

async fn room_presence(
    State(s): State<AppState>,
    _: ApiKey,
    Path(room): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.room_presence(&room).await?))
}

#[derive(Deserialize)]
struct UserBody {
    #[serde(alias = "userId")]
    user: Value,
}

fn id_of(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(ApiError::bad("user ids are strings or numbers")),
    }
}

async fn room_heartbeat(
    State(s): State<AppState>,
    _: ApiKey,
    Path(room): Path<String>,
    JsonBody(b): JsonBody<UserBody>,
) -> Reply<impl Serialize> {
    let user = id_of(&b.user)?;
    Ok(Json(s.engine.http_heartbeat(&user, Some(&room)).await?))
}

#[derive(Deserialize)]
struct ContactsBody {
    contacts: Vec<String>,
}

async fn set_contacts(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
    JsonBody(b): JsonBody<ContactsBody>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.set_contacts(&user, &b.contacts).await?))
}

async fn get_contacts(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.contacts(&user).await?))
}

async fn presence_one(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
) -> Reply<impl Serialize> {
    let mut p = s.engine.presence_of(std::slice::from_ref(&user)).await?;
    Ok(Json(p.presence.remove(&user)))
}

#[derive(Deserialize)]
struct UsersBody {
    #[serde(alias = "user_ids")]
    users: Vec<Value>,
}

fn ids(v: &[Value]) -> Result<Vec<String>, ApiError> {
    v.iter().map(id_of).collect()
}

async fn presence_query(
    State(s): State<AppState>,
    _: ApiKey,
    JsonBody(b): JsonBody<UsersBody>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.presence_of(&ids(&b.users)?).await?))
}

async fn online_count(State(s): State<AppState>, _: ApiKey) -> Reply<impl Serialize> {
    Ok(Json(s.engine.online_count().await?))
}

/// A page of online users as `?cursor=` and `?limit=` (default 100) ask.
async fn online_page(s: &AppState, q: &HashMap<String, String>) -> Reply<OnlineUsers> {
    let limit = num(q, "limit")?.unwrap_or(100) as usize;
    let cursor = q
        .get("cursor")
        .map(String::as_str)
        .filter(|c| !c.is_empty());
    Ok(Json(s.engine.online_page(cursor, limit).await?))
}

/// `GET /push/dead?limit=` (default 100): dead letters, newest first, and the outbox figures.
async fn push_dead(
    State(s): State<AppState>,
    _: ApiKey,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    let limit = num(&q, "limit")?.unwrap_or(100) as usize;
    Ok(Json(s.engine.push_dead_letters(limit).await?))
}

async fn online_list(
    State(s): State<AppState>,
    _: ApiKey,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    online_page(&s, &q).await
}

async fn unread(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.unread(&user).await?))
}

async fn unread_alias(
    State(s): State<AppState>,
    _: ApiKey,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    let user = q
        .get("userId")
        .or_else(|| q.get("user"))
        .ok_or_else(|| ApiError::bad("userId: required"))?;
    let unread = s.engine.unread(user).await?.unread;
    let total: u64 = unread.values().sum();
    Ok(Json(json!({ "unread": unread, "total": total })))
}

#[derive(Deserialize)]
struct ReadBody {
    room: String,
    seq: u64,
}

async fn mark_read(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
    JsonBody(b): JsonBody<ReadBody>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.mark_read(&user, &b.room, b.seq).await?))
}

async fn read_by_event_id(
    State(s): State<AppState>,
    _: ApiKey,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Reply<impl Serialize> {
    let from_body = body.get("userId").or_else(|| body.get("user")).cloned();
    let user = match (q.get("userId").or_else(|| q.get("user")), from_body) {
        (Some(u), _) => u.clone(),
        (None, Some(v)) => id_of(&v)?,
        (None, None) => return Err(ApiError::bad("userId: required (query or body)")),
    };
    let (room, seq) = s.engine.find_room_event(&user, &id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such event in this user's rooms",
        )
    })?;
    Ok(Json(s.engine.mark_read(&user, &room, seq).await?))
}

#[derive(Deserialize)]
struct DeviceBody {
    provider: String,
    token: Option<String>,
    subscription: Option<Value>,
    platform: Option<String>,
}

async fn put_device(
    State(s): State<AppState>,
    _: ApiKey,
    Path((user, device)): Path<(String, String)>,
    JsonBody(b): JsonBody<DeviceBody>,
) -> Reply<impl Serialize> {
    let d = PushDevice::register(device, b.provider, b.token, b.subscription, b.platform)
        .map_err(ApiError::bad)?;
    Ok(Json(s.engine.put_device(&user, d).await?))
}

async fn delete_device(
    State(s): State<AppState>,
    _: ApiKey,
    Path((user, device)): Path<(String, String)>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.delete_device(&user, &device).await?))
}

async fn devices(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.devices(&user).await?))
}

async fn create_announcement(
    State(s): State<AppState>,
    _: ApiKey,
    JsonBody(draft): JsonBody<AnnouncementDraft>,
) -> Reply<impl Serialize> {
    let a =
        Announcement::create(draft, new_event_id().to_string(), now_ms()).map_err(ApiError::bad)?;
    Ok(Json(s.engine.create_announcement(a).await?))
}

async fn list_announcements(State(s): State<AppState>, _: ApiKey) -> Reply<impl Serialize> {
    Ok(Json(s.engine.announcements().await?))
}

async fn disconnect(
    State(s): State<AppState>,
    _: ApiKey,
    Path(user): Path<String>,
) -> Reply<impl Serialize> {
    Ok(Json(s.engine.disconnect_user(&user).await?))
}

// ---- seed 002: /api/online-status/* with a client JWT ----

/// Seed 002's view of one user's presence.
fn seed_status(p: Option<&UserPresence>) -> Value {
    let Some(p) = p else {
        return json!({ "is_online": false, "status": null, "text": null, "last_seen": null });
    };
    let (status, text) = if p.online {
        (json!(p.status), json!(p.text))
    } else {
        (Value::Null, Value::Null)
    };
    let mut v = json!({ "is_online": p.online, "status": status, "text": text });
    let key = if p.online {
        "last_activity"
    } else {
        "last_seen"
    };
    v[key] = json!(p.last_seen);
    v
}

async fn seed_map(s: &AppState, users: &[String]) -> Reply<Value> {
    let p = s.engine.presence_of(users).await?;
    let out: Map<String, Value> = users
        .iter()
        .map(|u| (u.clone(), seed_status(p.presence.get(u))))
        .collect();
    Ok(Json(Value::Object(out)))
}

async fn os_users(
    State(s): State<AppState>,
    Client(_): Client,
    JsonBody(b): JsonBody<UsersBody>,
) -> Reply<impl Serialize> {
    seed_map(&s, &ids(&b.users)?).await
}

async fn os_user(
    State(s): State<AppState>,
    Client(_): Client,
    Path(id): Path<String>,
) -> Reply<impl Serialize> {
    let p = s.engine.presence_of(std::slice::from_ref(&id)).await?;
    let mut out = seed_status(p.presence.get(&id));
    out["user_id"] = json!(id);
    Ok(Json(out))
}

async fn os_friends(State(s): State<AppState>, Client(c): Client) -> Reply<impl Serialize> {
    let contacts = s.engine.contacts(&c.sub).await?.contacts;
    seed_map(&s, &contacts).await
}

async fn os_heartbeat(State(s): State<AppState>, Client(c): Client) -> Reply<impl Serialize> {
    Ok(Json(s.engine.http_heartbeat(&c.sub, None).await?))
}

async fn os_count(State(s): State<AppState>, Client(_): Client) -> Reply<impl Serialize> {
    Ok(Json(s.engine.online_count().await?))
}

/// `GET /history?channel=&from=&to=&limit=`: the `history` op over HTTP, for clients that hold a
/// JWT and no WebSocket (an SSE client filling a live gap): the same fields, access (whoever may
/// subscribe to the channel) and reply.
async fn client_history(
    State(s): State<AppState>,
    Client(c): Client,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    let channel = q
        .get("channel")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad("channel: required (?channel=room:r1)"))?;
    let range = (num(&q, "from")?, num(&q, "to")?);
    let limit = num(&q, "limit")?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    let h = s
        .engine
        .client_history(&c.sub, &c.attrs, channel, range, limit)
        .await?;
    Ok(Json(h))
}

async fn os_online(
    State(s): State<AppState>,
    Client(_): Client,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<impl Serialize> {
    online_page(&s, &q).await
}
