//! Integration tests: real engines on port 0, driven through the real wire (WebSocket, SSE, HTTP).
//! One binary (modules under `tests/integration/`) so the suite links once.

#![allow(unreachable_pub, missing_docs)]

#[path = "integration/common.rs"]
mod common;

#[path = "integration/redis_server.rs"]
mod redis_server;

#[path = "integration/fakes/mod.rs"]
mod fakes;

#[path = "integration/conformance.rs"]
mod conformance;
#[path = "integration/eviction.rs"]
mod eviction;
#[path = "integration/ws.rs"]
mod ws;

#[path = "integration/assets.rs"]
mod assets;

#[path = "integration/sse.rs"]
mod sse;

#[path = "integration/presence.rs"]
mod presence;

#[path = "integration/replay.rs"]
mod replay;

#[path = "integration/api.rs"]
mod api;

#[path = "integration/auth.rs"]
mod auth;

#[path = "integration/cli.rs"]
mod cli;

#[path = "integration/cluster.rs"]
mod cluster;

#[path = "integration/rules.rs"]
mod rules;

#[path = "integration/faults.rs"]
mod faults;

#[path = "integration/http.rs"]
mod http;

#[path = "integration/docs.rs"]
mod docs;

#[path = "integration/process.rs"]
mod process;

#[path = "integration/push.rs"]
mod push;

#[path = "integration/push_fcm_apns.rs"]
mod push_fcm_apns;

#[path = "integration/push_webpush.rs"]
mod push_webpush;

#[path = "integration/metrics.rs"]
mod metrics;

#[path = "integration/operator.rs"]
mod operator;

#[path = "integration/admin.rs"]
mod admin;

#[path = "integration/direct.rs"]
mod direct;

#[path = "integration/coalesce.rs"]
mod coalesce;

#[path = "integration/fuzz.rs"]
mod fuzz;
