//! HTTP connections under hostile or careless clients, through raw sockets: connections that send
//! nothing or half a request head, idle keep-alives, slow bodies, too many connections, oversized
//! heads, and a response sent before the request body was read.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Reads until the server closes the connection (bounded by `within`); what it sent.
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server did not close the connection within {within:?}"
    );
    got
}

/// One response read off a raw connection: status, lower-cased head, body.
fn parse_response(raw: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    )
}

async fn quick_timeouts() -> TestServer {
    TestServer::start_with(|c| c.read_timeout = Duration::from_secs(1)).await
}

#[tokio::test]
async fn connections_that_send_nothing_or_half_a_head_or_idle_are_closed() {
    let t = quick_timeouts().await;
    // Nothing at all.
    let mut silent = TcpStream::connect(t.addr()).await.unwrap();
    // Half a request head, never finished.
    let mut half = TcpStream::connect(t.addr()).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // A keep-alive connection after one request.
    let mut idle = TcpStream::connect(t.addr()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = idle.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    for (name, tcp) in [
        ("silent", &mut silent),
        ("half", &mut half),
        ("idle", &mut idle),
    ] {
        let rest = read_until_closed(tcp, Duration::from_secs(4)).await;
        // Closed, not answered as if a request had come.
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "{name}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    // The server is fine.
    let (s, _) = t.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408_and_the_connection_closes() {
    let t = quick_timeouts().await;
    let mut tcp = TcpStream::connect(t.addr()).await.unwrap();
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let raw = read_until_closed(&mut tcp, Duration::from_secs(4)).await;
    let (status, head, body) = parse_response(&raw);
    assert_eq!(status, 408, "{head}");
    assert_eq!(body["error"]["code"], "bad_frame", "{body}");
    assert!(head.contains("connection: close"), "{head}");
}

#[tokio::test]
async fn over_the_connection_cap_a_new_connection_gets_503_and_the_node_keeps_serving() {
    let t = TestServer::start_with(|c| c.max_connections = Some(3)).await;
    let mut a = t.ws("a").await;
    let _b = t.ws("b").await;
    let _c = t.ws("c").await;
    let mut tcp = TcpStream::connect(t.addr()).await.unwrap();
    let raw = read_until_closed(&mut tcp, Duration::from_secs(3)).await;
    let (status, head, body) = parse_response(&raw);
    assert_eq!(status, 503, "{head}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(head.contains("retry-after:"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // One leaves: the next one is served.
    a.close_client().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut tcp = TcpStream::connect(t.addr()).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (status, _, _) = parse_response(&read_until_closed(&mut tcp, WAIT).await);
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn oversized_request_heads_get_431_in_the_error_shape() {
    let t = TestServer::start().await;
    let many: String = (0..110).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big = format!("X-Big: {}\r\n", "b".repeat(40 * 1024));
    for extra in [many, big] {
        let mut tcp = TcpStream::connect(t.addr()).await.unwrap();
        let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let (status, head, body) = parse_response(&read_until_closed(&mut tcp, WAIT).await);
        assert_eq!(status, 431, "{head}");
        assert_eq!(body["error"]["code"], "too_large", "{body}");
        assert!(head.contains("connection: close"), "{head}");
    }
}

/// A response sent without reading the request body (a bad API key, say) says `Connection: close`,
/// so a pooling client does not send its next request into a connection the server is closing; and
/// a pooled client's next request works.
#[tokio::test]
async fn a_response_sent_before_the_body_was_read_says_connection_close() {
    let t = TestServer::start().await;
    let mut tcp = TcpStream::connect(t.addr()).await.unwrap();
    let body = json!({"event":"n","to":["u1"],"data":{}}).to_string();
    let req = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let (status, head, v) = parse_response(&read_until_closed(&mut tcp, WAIT).await);
    assert_eq!(status, 401, "{head}");
    assert_eq!(v["error"]["code"], "unauthorized");
    assert!(head.contains("connection: close"), "{head}");
    // A body that was read keeps the connection.
    let (s, _) = t
        .api(
            "POST",
            "/api/v1/events",
            Some(json!({"event":"n","to":["u1"],"data":{}})),
        )
        .await;
    assert_eq!(s, 200);
    let client = crate::common::http_client();
    for key in ["wrong", API_KEY, "wrong", API_KEY] {
        let resp = client
            .post(t.url("/api/v1/events"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("a pooled request after an unread body is not reset");
        let want = if key == API_KEY { 200 } else { 401 };
        assert_eq!(resp.status().as_u16(), want);
    }
}
