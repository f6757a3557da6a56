//! Real local HTTP servers standing in for Google's, Apple's and the browsers' push services and for a
//! webhook receiver. Each checks requests the way the real endpoint does (auth, headers, body shape) and
//! records what it accepted, so tests assert on what a provider would have received.

use std::net::SocketAddr;

pub mod apple;
pub mod google;
pub mod webhook;
pub mod webpush;

/// Serves `router` on 127.0.0.1:0 (HTTP/1.1 and HTTP/2 with prior knowledge) until the test ends.
pub async fn spawn(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake");
    let addr = listener.local_addr().expect("fake addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// Polls `received` until it holds `n` items or `timeout` passes; what it holds then (no panic: the
/// test asserts on it).
pub async fn wait_for<T>(
    n: usize,
    timeout: std::time::Duration,
    received: impl Fn() -> Vec<T>,
) -> Vec<T> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let got = received();
        if got.len() >= n || tokio::time::Instant::now() >= end {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A reply the fake gives to the next request(s) instead of accepting: status and optional
/// `Retry-After` seconds.
#[derive(Clone, Copy, Debug)]
pub struct Failure {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` header value (seconds), when set.
    pub retry_after: Option<u64>,
}
