//! The SSE client: `GET /sse` written by hand on its own connection, its body split into lines in
//! place, and a subscriber's receive loop over them.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::http::{BodyDecoder, connect_tcp, read_head, refusal, split_url};
use crate::scan::find_byte;
use crate::tally::{Shared, Tally};

/// Longest SSE line accepted (event frames are at most the engine's 64 KiB frame limit plus the
/// envelope): a longer one means the stream is not what the loadgen expects.
const SSE_MAX_LINE: usize = 1 << 20;
/// Read buffer of each subscriber (SSE or WebSocket) at first: 16 KiB holds ~50 events of 100 B
/// data. Reads go into its spare capacity (nothing is zero-filled), so it costs memory only as far
/// as reads fill it.
pub(crate) const SUB_READ_BUFFER: usize = 16 * 1024;
/// A subscriber whose read filled its whole buffer (it is behind: the socket holds more) doubles
/// the buffer, up to this: fewer, larger reads while it catches up.
pub(crate) const SUB_READ_BUFFER_MAX: usize = 128 * 1024;
/// The SSE `data:` of the frame the engine sends before it ends a stream.
const DISCONNECT_HEAD: &[u8] = b"{\"type\":\"disconnect\"";

/// Reads `sse`'s events into `tally` until the body ends, the connection fails or `stop`; sets
/// `tally.closed` unless stopped.
pub(crate) async fn sse_receive(
    sse: &mut SseStream,
    tally: &mut Tally,
    shared: &Shared,
    progress: &AtomicU64,
    stop: &CancellationToken,
) {
    let mut lines = SseLines::default();
    let mut disconnect = None;
    // One waiter for the whole loop: `cancelled()` registers with the token (a lock) when first polled.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // The buffer holds whatever the last read (or the response head's read) brought; the body
        // decoder and the line splitter keep their partial state, so it is always consumed whole.
        if !sse.buf.is_empty() {
            let mut fits = true;
            let body = sse.body.decode(&sse.buf, |payload| {
                if fits {
                    fits = lines.feed(payload, |line| {
                        on_sse_line(line, tally, shared, &mut disconnect);
                    });
                }
            });
            let full = sse.buf.len() == sse.buf.capacity();
            sse.buf.clear();
            if full && sse.buf.capacity() < SUB_READ_BUFFER_MAX {
                sse.buf.reserve(2 * sse.buf.capacity());
            }
            progress.store(tally.frames, Ordering::Relaxed);
            if !fits {
                tally.closed = Some(format!("an SSE line longer than {SSE_MAX_LINE} bytes"));
                return;
            }
            match body {
                Ok(false) => {}
                Ok(true) => {
                    tally.closed = Some(closed_by_server(disconnect, "stream ended"));
                    return;
                }
                Err(e) => {
                    tally.closed = Some(format!("stream error: {e}"));
                    return;
                }
            }
        }
        tokio::select! {
            biased;
            r = sse.tcp.read_buf(&mut sse.buf) => match r {
                Ok(0) => {
                    tally.closed = Some(if sse.body.ends_at_eof() {
                        closed_by_server(disconnect, "stream ended")
                    } else {
                        closed_by_server(
                            disconnect,
                            "stream error: the connection closed before the body's end",
                        )
                    });
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tally.closed = Some(format!("stream error: {e}"));
                    return;
                }
            },
            _ = &mut stopped => return,
        }
    }
}

/// `closed by the server: {disconnect frame}` when the engine sent one, else `otherwise`.
fn closed_by_server(disconnect: Option<String>, otherwise: &str) -> String {
    match disconnect {
        Some(d) => format!("closed by the server: {d}"),
        None => otherwise.into(),
    }
}

/// One SSE line: a `data:` line is an event frame (or the engine's last word, a `disconnect`);
/// `id:`, `event:`, `retry:`, comments and blank lines are skipped.
fn on_sse_line(line: &[u8], tally: &mut Tally, shared: &Shared, disconnect: &mut Option<String>) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data.starts_with(DISCONNECT_HEAD) {
        *disconnect = Some(String::from_utf8_lossy(data).into_owned());
    } else {
        tally.on_frame(data, shared);
    }
}

/// An open `/sse` stream on its own TCP connection (no HTTP client library: one task per subscriber
/// reads the socket and parses everything in place).
pub(crate) struct SseStream {
    tcp: TcpStream,
    /// The read buffer ([`SUB_READ_BUFFER`] bytes of capacity, up to [`SUB_READ_BUFFER_MAX`];
    /// emptied after every read). Between [`open_sse`] and the first read it holds the body bytes
    /// that came with the response head.
    buf: Vec<u8>,
    /// The body's framing.
    body: BodyDecoder,
}

/// `GET /sse…` over a new TCP connection, written by hand; the stream once the engine answered 200
/// (it subscribes before answering).
pub(crate) async fn open_sse(url: &str) -> Result<SseStream, String> {
    let (authority, target) = split_url(url, "http")?;
    let mut tcp = connect_tcp(authority, "SSE").await?;
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending GET /sse: {e}"))?;
    let mut buf = Vec::with_capacity(SUB_READ_BUFFER);
    let mut head = read_head(&mut tcp, &mut buf, "GET /sse").await?;
    if head.status != 200 {
        return Err(refusal("GET /sse", &mut head, &mut tcp, &mut buf).await);
    }
    Ok(SseStream {
        tcp,
        buf,
        body: head.body,
    })
}

/// Splits an SSE byte stream into lines. Complete lines inside a chunk are handed out in place; only
/// a line cut by a chunk boundary is copied (into `carry`).
#[derive(Default)]
struct SseLines {
    carry: Vec<u8>,
}

impl SseLines {
    /// Calls `on_line` for every line `chunk` completes (without its `\n` or `\r\n`); false when a
    /// line grew past [`SSE_MAX_LINE`].
    fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) -> bool {
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match find_byte(rest, b'\n') {
                Some(i) => {
                    self.carry.extend_from_slice(&rest[..i]);
                    on_line(trim_cr(&self.carry));
                    self.carry.clear();
                    rest = &rest[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return self.carry.len() <= SSE_MAX_LINE;
                }
            }
        }
        while let Some(i) = find_byte(rest, b'\n') {
            on_line(trim_cr(&rest[..i]));
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
        self.carry.len() <= SSE_MAX_LINE
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head_end;
    use crate::http::tests::serve_once;
    use crate::tally::now_us;
    use crate::tally::tests::test_shared;
    use std::time::Duration;
    use tokio::task::JoinHandle;

    #[test]
    fn sse_lines_are_split_across_chunk_boundaries() {
        let stream = b"retry: 3000\n\nid: c1\nevent: bench\ndata: {\"a\":1}\n\n: keep-alive\r\n\r\ndata: x\n";
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let mut lines = SseLines::default();
                let mut got = Vec::new();
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    assert!(lines.feed(part, |l| got.push(l.to_vec())));
                }
                let want: Vec<&[u8]> = vec![
                    b"retry: 3000",
                    b"",
                    b"id: c1",
                    b"event: bench",
                    b"data: {\"a\":1}",
                    b"",
                    b": keep-alive",
                    b"",
                    b"data: x",
                ];
                assert_eq!(got, want, "cut at {cut}, {cut2}");
            }
        }
        let mut lines = SseLines::default();
        assert!(!lines.feed(&vec![b'x'; SSE_MAX_LINE + 1], |_| {}));
    }

    /// [`serve_once`] for `GET /sse?channels=room:r&token=tok`: checks the request, answers `parts`.
    async fn fake_engine(parts: Vec<Vec<u8>>) -> (String, JoinHandle<Vec<u8>>) {
        let (addr, task) = serve_once(move |addr, request| {
            let want = format!(
                "GET /sse?channels=room:r&token=tok HTTP/1.1\r\nHost: {addr}\r\n\
                 Accept: text/event-stream\r\n\r\n"
            );
            assert_eq!(request, want);
            parts
        })
        .await;
        (format!("http://{addr}/sse?channels=room:r&token=tok"), task)
    }

    #[tokio::test]
    async fn a_refused_sse_request_shows_the_status_and_the_body() {
        let (url, server) = fake_engine(vec![
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 39\r\n\r\n{\"error\":".to_vec(),
            b"{\"code\":\"unauthorized\",\"m\":1}}".to_vec(),
        ])
        .await;
        let Err(e) = open_sse(&url).await else {
            panic!("a 401 opened a stream")
        };
        assert_eq!(
            e,
            "GET /sse answered 401 Unauthorized: {\"error\":{\"code\":\"unauthorized\",\"m\":1}} \
             (is --secret the engine's HERALD_JWT_SECRET?)"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_sse_stream_ends_at_the_last_chunk_with_the_disconnect_as_reason() {
        let event = |seq: u64| {
            format!(
                "id: c{seq}\nevent: bench\ndata: {{\"type\":\"event\",\"channel\":\"room:r\",\
                 \"seq\":{seq},\"epoch\":\"e\",\"data\":{{\"t\":{},\"pad\":\"x\"}}}}\n\n",
                now_us()
            )
        };
        let chunk = |payload: &str| format!("{:x}\r\n{payload}\r\n", payload.len()).into_bytes();
        let two = format!("{}{}", event(2), event(3));
        let two = chunk(&two);
        let (cut, cut2) = (two.len() / 3, two.len() / 2);
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        head.extend(chunk("retry: 3000\n\n"));
        let (url, server) = fake_engine(vec![
            head,
            chunk(&event(1)),
            two[..cut].to_vec(),
            two[cut..cut2].to_vec(),
            two[cut2..].to_vec(),
            chunk(": keep-alive\n\n"),
            chunk(
                "event: disconnect\ndata: {\"type\":\"disconnect\",\"code\":4008,\
                 \"reason\":\"slow consumer\"}\n\n",
            ),
            b"0\r\n\r\n".to_vec(),
        ])
        .await;
        let mut sse = open_sse(&url).await.unwrap();
        let (shared, progress, stop) = (test_shared(), AtomicU64::new(0), CancellationToken::new());
        let mut tally = Tally::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            sse_receive(&mut sse, &mut tally, &shared, &progress, &stop),
        )
        .await
        .expect("the stream ended at its last chunk, without waiting for the connection's end");
        assert!(tally.has(1) && tally.has(2) && tally.has(3) && !tally.has(4));
        assert_eq!((tally.frames, tally.unreadable), (3, 0));
        assert_eq!(progress.load(Ordering::Relaxed), 3);
        assert_eq!(
            tally.closed.as_deref(),
            Some(
                "closed by the server: {\"type\":\"disconnect\",\"code\":4008,\
                 \"reason\":\"slow consumer\"}"
            )
        );
        drop(sse);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_sse_stream_cut_mid_body_is_an_error_and_stop_ends_it_quietly() {
        // The connection closes in the middle of a chunk.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut kept = None;
            for i in 0..2 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                while head_end(&request).is_none() {
                    assert!(tcp.read_buf(&mut request).await.unwrap() > 0);
                }
                tcp.write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n20\r\ndata: cut",
                )
                .await
                .unwrap();
                // The first connection closes here (dropped); the second stays open.
                if i == 1 {
                    kept = Some(tcp);
                }
            }
            kept.unwrap()
        });
        let url = format!("http://{addr}/sse?channels=room:r&token=tok");
        let (shared, progress) = (test_shared(), AtomicU64::new(0));
        let mut sse = open_sse(&url).await.unwrap();
        let mut tally = Tally::new();
        sse_receive(
            &mut sse,
            &mut tally,
            &shared,
            &progress,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(
            tally.closed.as_deref(),
            Some("stream error: the connection closed before the body's end")
        );
        // Stopped while the engine is quiet: no close reason.
        let mut sse = open_sse(&url).await.unwrap();
        let open = server.await.unwrap();
        let mut tally = Tally::new();
        let stop = CancellationToken::new();
        stop.cancel();
        sse_receive(&mut sse, &mut tally, &shared, &progress, &stop).await;
        assert_eq!((tally.closed, tally.frames), (None, 0));
        drop(open);
    }
}
