//! The hand-written HTTP/1.1 client pieces of the SSE and WebSocket clients: URLs, the connect,
//! the response head, a refusal's body, and the body's framing (chunked decoding).

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::scan::find_byte;

/// How long an SSE or WebSocket subscriber's (or idle connection's) TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the engine may take to answer `GET /sse` or a WebSocket upgrade (its response head).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head accepted.
const HEAD_MAX: usize = 16 * 1024;
/// How much of an error response's body (e.g. a refused `GET /sse`) is shown.
const ERROR_BODY_MAX: usize = 1024;

/// A TCP connection to `authority` (port 80 if it has none) within [`CONNECT_TIMEOUT`]; `what`
/// (`SSE`, `WebSocket`) names it in errors.
pub(crate) async fn connect_tcp(authority: &str, what: &str) -> Result<TcpStream, String> {
    let connect =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(connect_addr(authority)));
    match connect.await {
        Err(_) => Err(format!(
            "{what} connect to {authority} timed out after {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => {
            let hint = match e.raw_os_error() {
                Some(24) => " (too many open files: raise `ulimit -n`)",
                Some(99) => " (out of local ports)",
                _ => "",
            };
            Err(format!("{what} connect to {authority} failed: {e}{hint}"))
        }
        Ok(Ok(tcp)) => Ok(tcp),
    }
}

/// Reads the response head to the request `what` (e.g. `GET /sse`) into `buf` and parses it; what
/// came after the head (the first body or frame bytes) stays in `buf`.
pub(crate) async fn read_head(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<ResponseHead, String> {
    let head_len = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(end) = head_end(buf) {
                return Ok(end);
            }
            if buf.len() >= HEAD_MAX {
                return Err(format!(
                    "{what}: the response head is larger than {HEAD_MAX} bytes"
                ));
            }
            match tcp.read_buf(buf).await {
                Ok(0) => {
                    return Err(format!(
                        "{what}: the server closed the connection before the response head's end \
                         (got {:?})",
                        String::from_utf8_lossy(buf)
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{what}: reading the response: {e}")),
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "{what}: no response head within {} s",
            HEAD_TIMEOUT.as_secs()
        )
    })??;
    let head = parse_head(&buf[..head_len]).map_err(|e| format!("{what}: {e}"))?;
    buf.drain(..head_len);
    Ok(head)
}

/// The error for a refused request `what`: the status, the start of the body (see [`error_body`])
/// and, for a 401, a hint.
pub(crate) async fn refusal(
    what: &str,
    head: &mut ResponseHead,
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> String {
    let body = error_body(tcp, buf, &mut head.body).await;
    let hint = if head.status == 401 {
        " (is --secret the engine's HERALD_JWT_SECRET?)"
    } else {
        ""
    };
    format!("{what} answered {}: {body}{hint}", head.status_text)
}

/// The start of an error response's body (at most [`ERROR_BODY_MAX`] bytes, lossy UTF-8, trimmed),
/// framed by `body`, from what `buf` holds and then `tcp`: whatever arrives until the body ends, the
/// connection closes or a read waits 2 s.
async fn error_body(tcp: &mut TcpStream, buf: &mut Vec<u8>, body: &mut BodyDecoder) -> String {
    let mut out = Vec::new();
    loop {
        let ended = body
            .decode(buf, |data| {
                let room = ERROR_BODY_MAX.saturating_sub(out.len());
                out.extend_from_slice(&data[..data.len().min(room)]);
            })
            .unwrap_or(true);
        buf.clear();
        if ended || out.len() >= ERROR_BODY_MAX {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), tcp.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    let mut text = String::from_utf8_lossy(&out).trim().to_string();
    if out.len() >= ERROR_BODY_MAX {
        text.push('…');
    }
    text
}

/// `(authority, target)` of `{scheme}://authority[/path…]` (`http` or `ws`): what to connect to (and
/// send as `Host`), and the request target (at least `/`). No TLS: `https://` and `wss://` are
/// refused.
pub(crate) fn split_url<'a>(url: &'a str, scheme: &str) -> Result<(&'a str, &'a str), String> {
    let after_scheme = url.strip_prefix(scheme);
    let rest = after_scheme
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| {
            if after_scheme.is_some_and(|r| r.starts_with("s://")) {
                format!("{url}: {scheme}s:// (TLS) is not supported, only {scheme}://")
            } else {
                format!("{url}: not a {scheme}:// URL")
            }
        })?;
    let (authority, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((authority, target))
}

/// `authority` with port 80 added when it has none (`host`, `[v6]`).
fn connect_addr(authority: &str) -> String {
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// The length of the response head (status line, headers, the empty line) at the start of `buf`,
/// once it is all there. Lines end with `\r\n` (a bare `\n` is accepted).
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = find_byte(&buf[from..], b'\n') {
        let next = from + i + 1;
        match &buf[next..] {
            [b'\n', ..] => return Some(next + 1),
            [b'\r', b'\n', ..] => return Some(next + 2),
            _ => from = next,
        }
    }
    None
}

/// What the loadgen needs from a response head.
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    /// The status line after the version, e.g. `401 Unauthorized`.
    pub(crate) status_text: String,
    /// How the body is framed: the last `Transfer-Encoding` coding `chunked`, else
    /// `Content-Length`, else up to the connection's end (RFC 9112 §6.3; another transfer coding
    /// also reads to the end, undecoded).
    pub(crate) body: BodyDecoder,
    /// `Upgrade` (a WebSocket upgrade's answer has `websocket`).
    pub(crate) upgrade: Option<String>,
    /// `Sec-WebSocket-Accept`.
    pub(crate) ws_accept: Option<String>,
}

fn parse_head(head: &[u8]) -> Result<ResponseHead, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let (version, status_text) = status_line.split_once(' ').unwrap_or((status_line, ""));
    let status = status_text
        .get(..3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let (mut chunked, mut other_coding, mut length) = (false, false, None);
    let (mut upgrade, mut ws_accept) = (None, None);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // Codings apply in order: only a `chunked` last frames the body.
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            chunked = last.eq_ignore_ascii_case("chunked");
            other_coding = !chunked;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            ws_accept = Some(value.to_string());
        }
    }
    let body = match (chunked, other_coding, length) {
        (true, _, _) => BodyDecoder::Chunked(ChunkState::default()),
        (false, true, _) | (false, false, None) => BodyDecoder::UntilClose,
        (false, false, Some(n)) => BodyDecoder::Length(n),
    };
    Ok(ResponseHead {
        status,
        status_text: status_text.to_string(),
        body,
        upgrade,
        ws_accept,
    })
}

/// An HTTP/1.1 response body's framing, decoded incrementally: the payload bytes of each read are
/// handed out in place (a chunk cut by a read boundary is handed out in pieces), so nothing is
/// copied and no read's bytes need keeping.
pub(crate) enum BodyDecoder {
    /// `Transfer-Encoding: chunked`, in this state.
    Chunked(ChunkState),
    /// `Content-Length`: bytes left.
    Length(u64),
    /// Everything up to the connection's end.
    UntilClose,
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) enum ChunkState {
    /// At a chunk-size line's start (a hex digit must come).
    #[default]
    Size,
    /// In a chunk-size line's hex digits: the value so far and how many digits.
    SizeDigits {
        size: u64,
        digits: u8,
    },
    /// After the size: whitespace and chunk extensions (`;name=value`, ignored) to the line's end.
    Ext {
        size: u64,
    },
    /// The size line's `\r` came; its `\n` must follow.
    SizeLf {
        size: u64,
    },
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its `\r\n`.
    DataCr,
    DataLf,
    /// After the last (0-size) chunk: trailer lines, up to an empty line. `empty`: nothing but
    /// `\r` on the current line so far.
    Trailer {
        empty: bool,
    },
    /// The body ended.
    Done,
}

/// Longest chunk-size (hex digits): 15 keep it below 2^60, far beyond any real chunk.
const CHUNK_SIZE_DIGITS: u8 = 15;

impl BodyDecoder {
    /// Passes the payload bytes in `input` to `on_data` (in order, possibly in several pieces);
    /// true once the body ended (bytes after its end are ignored), an error when the framing is
    /// broken.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<bool, String> {
        match self {
            BodyDecoder::UntilClose => {
                on_data(input);
                Ok(false)
            }
            BodyDecoder::Length(left) => {
                let take = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                on_data(&input[..take]);
                *left -= take as u64;
                Ok(*left == 0)
            }
            BodyDecoder::Chunked(state) => state.decode(input, on_data),
        }
    }

    /// Whether the connection's end is the body's end (rather than a cut).
    pub(crate) fn ends_at_eof(&self) -> bool {
        matches!(
            self,
            BodyDecoder::UntilClose
                | BodyDecoder::Length(0)
                | BodyDecoder::Chunked(ChunkState::Done)
        )
    }
}

impl ChunkState {
    /// [`BodyDecoder::decode`] of a chunked body. The framing (size lines, CRLFs, trailers) goes
    /// a byte at a time, a chunk's data in one piece per read.
    fn decode(&mut self, input: &[u8], mut on_data: impl FnMut(&[u8])) -> Result<bool, String> {
        let mut i = 0;
        while i < input.len() {
            if let ChunkState::Data(left) = *self {
                let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                on_data(&input[i..i + take]);
                i += take;
                *self = match left - take as u64 {
                    0 => ChunkState::DataCr,
                    left => ChunkState::Data(left),
                };
                continue;
            }
            let b = input[i];
            i += 1;
            *self = match (&*self, b) {
                (ChunkState::Done, _) => return Ok(true),
                (ChunkState::Size, _) => match hex_digit(b) {
                    Some(d) => ChunkState::SizeDigits {
                        size: u64::from(d),
                        digits: 1,
                    },
                    None => return Err(format!("chunk size expected, got byte {b:#04x}")),
                },
                (&ChunkState::SizeDigits { size, digits }, _) => match (hex_digit(b), b) {
                    (Some(_), _) if digits == CHUNK_SIZE_DIGITS => {
                        return Err(format!(
                            "a chunk size of more than {CHUNK_SIZE_DIGITS} hex digits"
                        ));
                    }
                    (Some(d), _) => ChunkState::SizeDigits {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    (None, b';' | b' ' | b'\t') => ChunkState::Ext { size },
                    (None, b'\r') => ChunkState::SizeLf { size },
                    (None, b'\n') => ChunkState::after_size(size),
                    (None, _) => {
                        return Err(format!("bad byte {b:#04x} in a chunk size line"));
                    }
                },
                (&ChunkState::Ext { size }, b'\n') => ChunkState::after_size(size),
                (&ChunkState::Ext { size }, _) => ChunkState::Ext { size },
                (&ChunkState::SizeLf { size }, b'\n') => ChunkState::after_size(size),
                (ChunkState::SizeLf { .. }, _) => {
                    return Err(format!("chunk size line: \\r then byte {b:#04x}"));
                }
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataCr | ChunkState::DataLf, b'\n') => ChunkState::Size,
                (ChunkState::DataCr | ChunkState::DataLf, _) => {
                    return Err(format!(
                        "chunk data not followed by \\r\\n (byte {b:#04x}): the size was wrong"
                    ));
                }
                (&ChunkState::Trailer { empty }, b'\n') => {
                    if empty {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailer { empty: true }
                    }
                }
                (&ChunkState::Trailer { empty }, b'\r') => ChunkState::Trailer { empty },
                (ChunkState::Trailer { .. }, _) => ChunkState::Trailer { empty: false },
                (ChunkState::Data(_), _) => unreachable!("handled above"),
            };
        }
        Ok(*self == ChunkState::Done)
    }

    /// The state after a chunk-size line: the last chunk (0) starts the trailers.
    fn after_size(size: u64) -> ChunkState {
        if size == 0 {
            ChunkState::Trailer { empty: true }
        } else {
            ChunkState::Data(size)
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::task::JoinHandle;

    /// A chunked body of `chunks` (extension text, data), a last chunk with an extension and a
    /// trailer, and the start of a next response (which is not body).
    fn chunked(chunks: &[(&str, &[u8])]) -> (Vec<u8>, usize) {
        let mut body = Vec::new();
        for (ext, data) in chunks {
            body.extend_from_slice(format!("{:X}{ext}\r\n", data.len()).as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0;last=\"yes\"\r\nX-Trailer: 1\r\n\r\n");
        let end = body.len();
        body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        (body, end)
    }

    /// Decodes `parts` in turn: the payload, and the input offset each part ended at with whether
    /// the body had ended then.
    fn decode_parts(parts: &[&[u8]]) -> (Vec<u8>, Vec<(usize, bool)>) {
        let mut d = BodyDecoder::Chunked(ChunkState::default());
        let mut payload = Vec::new();
        let mut at = 0;
        let mut ends = Vec::new();
        for p in parts {
            let ended = d.decode(p, |b| payload.extend_from_slice(b)).unwrap();
            at += p.len();
            ends.push((at, ended));
        }
        (payload, ends)
    }

    #[test]
    fn chunked_bodies_decode_split_at_every_byte_boundary() {
        let (body, end) = chunked(&[
            ("", b"retry: 3000\n\n"),
            (
                ";name=value;q=\"a;b\"",
                b"id: c1\nevent: bench\ndata: {\"a\":1}\n\n",
            ),
            (" ; x", b"data: 0123456789abcdef\n\n"),
            ("", b"\r\n: keep-alive\r\n\r\n"),
        ]);
        let want = b"retry: 3000\n\nid: c1\nevent: bench\ndata: {\"a\":1}\n\ndata: 0123456789abcdef\n\n\r\n: keep-alive\r\n\r\n";
        for cut in 0..=body.len() {
            for cut2 in cut..=body.len() {
                let parts = [&body[..cut], &body[cut..cut2], &body[cut2..]];
                let (payload, ends) = decode_parts(&parts);
                assert_eq!(payload, want, "cut at {cut}, {cut2}");
                for (at, ended) in ends {
                    assert_eq!(ended, at >= end, "cut at {cut}, {cut2}: part to {at}");
                }
            }
        }
        // A byte at a time: the payload comes a byte at a time too, and nothing is lost.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (payload, ends) = decode_parts(&bytes);
        assert_eq!(payload, want);
        assert_eq!(ends.iter().position(|&(_, e)| e), Some(end - 1));
    }

    #[test]
    fn chunk_extensions_the_last_chunk_and_broken_framing() {
        let decode = |input: &[u8]| {
            let mut d = BodyDecoder::Chunked(ChunkState::default());
            let mut payload = Vec::new();
            d.decode(input, |b| payload.extend_from_slice(b))
                .map(|ended| (String::from_utf8(payload).unwrap(), ended))
        };
        let ok = |input: &[u8], payload: &str, ended: bool| {
            assert_eq!(
                decode(input),
                Ok((payload.to_string(), ended)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        };
        ok(b"5;a=b\r\nhello\r\n0\r\n\r\n", "hello", true);
        ok(b"5 ;a=\"x;y\" ; b\r\nhello\r\n0;c\r\n\r\n", "hello", true);
        ok(b"5\t;a\r\nhello\r\n", "hello", false);
        ok(
            b"A\r\n0123456789\r\na\r\nabcdefghij\r\n",
            "0123456789abcdefghij",
            false,
        );
        ok(b"000000000000005\r\nhello\r\n", "hello", false);
        // The last chunk, its trailers and the empty line end the body; what follows is not body.
        ok(b"0\r\n\r\n", "", true);
        ok(b"000\r\n\r\n", "", true);
        ok(b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n", "", true);
        ok(b"0\r\n\r\n5\r\nhello\r\n", "", true);
        ok(b"0\r\n", "", false);
        ok(b"0\r\nX-A: 1\r\n", "", false);
        // Bare LFs are accepted.
        ok(b"5\nhello\n0\n\n", "hello", true);
        let mut d = BodyDecoder::Chunked(ChunkState::default());
        assert_eq!(d.decode(b"3\r\nabc\r\n0\r\n", |_| {}), Ok(false));
        assert!(!d.ends_at_eof());
        assert_eq!(d.decode(b"\r\n", |_| {}), Ok(true));
        assert!(d.ends_at_eof());
        assert_eq!(d.decode(b"", |_| {}), Ok(true));
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b";a\r\n",
            b"5\r\nhelloX",
            b"5\r\nhello\rX",
            b"5\rX",
            b"1000000000000000\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn identity_bodies_and_response_heads() {
        let mut d = BodyDecoder::Length(5);
        let mut payload = Vec::new();
        assert_eq!(
            d.decode(b"hel", |b| payload.extend_from_slice(b)),
            Ok(false)
        );
        assert!(!d.ends_at_eof());
        assert_eq!(
            d.decode(b"lo, more", |b| payload.extend_from_slice(b)),
            Ok(true)
        );
        assert_eq!(payload, b"hello");
        assert!(d.ends_at_eof());
        let mut d = BodyDecoder::UntilClose;
        assert_eq!(d.decode(b"any\n", |b| assert_eq!(b, b"any\n")), Ok(false));
        assert!(d.ends_at_eof());

        let response = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            Transfer-Encoding: chunked\r\ndate: x\r\n\r\nd\r\nretry: 3000\n\n\r\n";
        let end = head_end(response).unwrap();
        assert_eq!(&response[end..end + 3], b"d\r\n");
        for cut in 0..end {
            assert_eq!(head_end(&response[..cut]), None);
        }
        let head = parse_head(&response[..end]).unwrap();
        assert_eq!((head.status, head.status_text.as_str()), (200, "200 OK"));
        assert!(matches!(head.body, BodyDecoder::Chunked(ChunkState::Size)));
        let head = |text: &str| parse_head(text.as_bytes());
        let h = head("HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(
            (h.status, h.status_text.as_str()),
            (401, "401 Unauthorized")
        );
        assert!(matches!(h.body, BodyDecoder::Length(12)));
        let h = head("HTTP/1.0 200 OK\n\n").unwrap();
        assert!(matches!(h.body, BodyDecoder::UntilClose));
        assert_eq!(head_end(b"HTTP/1.0 200 OK\n\nbody"), Some(17));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, CHUNKED\r\n\r\n").unwrap();
        assert!(matches!(h.body, BodyDecoder::Chunked(_)));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert!(matches!(h.unwrap().body, BodyDecoder::UntilClose));
        assert!(head("SSH-2.0-OpenSSH_9.6\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());

        assert_eq!(
            split_url("http://127.0.0.1:7070/sse?channels=room:r&token=t", "http"),
            Ok(("127.0.0.1:7070", "/sse?channels=room:r&token=t"))
        );
        assert_eq!(split_url("http://h", "http"), Ok(("h", "/")));
        assert_eq!(
            split_url("ws://h:1/ws?token=t", "ws"),
            Ok(("h:1", "/ws?token=t"))
        );
        assert_eq!(
            split_url("wss://h/ws", "ws"),
            Err("wss://h/ws: wss:// (TLS) is not supported, only ws://".into())
        );
        assert_eq!(
            split_url("http://h/ws", "ws"),
            Err("http://h/ws: not a ws:// URL".into())
        );
        assert!(
            split_url("https://h/", "http").is_err() && split_url("http:///x", "http").is_err()
        );
        assert!(split_url("wsx://h/", "ws").is_err());
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             sec-websocket-accept:  s3pPLMBiTxaQ9kYGzzhZRbK+xOo= \r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 101);
        assert_eq!(
            (h.upgrade.as_deref(), h.ws_accept.as_deref()),
            (Some("websocket"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="))
        );
        assert_eq!(connect_addr("127.0.0.1:7070"), "127.0.0.1:7070");
        assert_eq!(connect_addr("localhost"), "localhost:80");
        assert_eq!(connect_addr("[::1]"), "[::1]:80");
        assert_eq!(connect_addr("[::1]:7070"), "[::1]:7070");
    }

    /// A one-connection server: reads the request head and hands it to `respond`, which checks it
    /// and returns the answer; writes the answer's parts (each flushed, with a pause between), then
    /// reads until the client closes the connection. Its address, and a task returning what the
    /// client sent after the request head.
    pub(crate) async fn serve_once(
        respond: impl FnOnce(std::net::SocketAddr, &str) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (std::net::SocketAddr, JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let end = loop {
                if let Some(end) = head_end(&request) {
                    break end;
                }
                assert!(tcp.read_buf(&mut request).await.unwrap() > 0);
            };
            let mut sent = request.split_off(end);
            for p in respond(addr, &String::from_utf8_lossy(&request)) {
                // A client that refused the answer may be gone already.
                if tcp.write_all(&p).await.is_err() {
                    break;
                }
                tcp.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Like hyper after a keep-alive response: wait for a next request that never comes.
            while let Ok(n) = tcp.read_buf(&mut sent).await {
                if n == 0 {
                    break;
                }
            }
            sent
        });
        (addr, task)
    }
}
