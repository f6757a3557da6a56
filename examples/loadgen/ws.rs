//! The hand-written WebSocket client of subscribers and idle connections: the upgrade, and RFC 6455
//! frames parsed in place in one read buffer.

use std::fmt::Display;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;

use crate::http::{connect_tcp, read_head, refusal, split_url};

/// Largest WebSocket frame, or fragmented message, a subscriber or idle connection accepts (the
/// engine's frames are at most 64 KiB): a larger one means the stream is not what the loadgen
/// expects, and is an error rather than a buffer that grows without bound.
const WS_MAX_MESSAGE: usize = 16 << 20;
/// How long a write of a subscriber's or idle connection's WebSocket (the upgrade request, the
/// subscribe, a pong) may wait for the socket.
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long WebSocket setup waits for each frame (`connected`, the subscribe reply).
pub(crate) const SETUP_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// `ws://host:port` of an `http://host:port` base URL.
pub(crate) fn ws_base(http_base: &str) -> String {
    format!("ws{}", &http_base["http".len()..])
}

/// An open WebSocket on its own TCP connection, read without a WebSocket library: the frames of
/// each read are parsed in place in one buffer, and a text frame's payload is handed out as a slice
/// of it (no copy, no allocation, no UTF-8 check).
pub(crate) struct WsStream {
    tcp: TcpStream,
    /// Bytes read and not parsed yet: between reads, part of one frame at most (kept at the start).
    /// Reads go into its spare capacity.
    buf: Vec<u8>,
    /// The capacity `buf` doubles up to while reads fill it; it grows past this only for a frame
    /// larger than itself, and shrinks back once that frame is read.
    buf_max: usize,
    /// Whether the last read filled `buf`.
    filled: bool,
    frames: WsFrames,
}

/// Connects to `url` (`ws://` only) and upgrades to a WebSocket, written by hand; waits for
/// `connected`, and subscribes to `channel` when given. Returns the stream and the channel's seq from
/// the subscribe reply (0 without a subscribe). The read buffer starts at `read_buffer` bytes and
/// doubles up to `read_buffer_max` while reads fill it.
pub(crate) async fn open_ws_stream(
    url: &str,
    channel: Option<&str>,
    read_buffer: usize,
    read_buffer_max: usize,
) -> Result<(WsStream, u64), String> {
    let (authority, target) = split_url(url, "ws")?;
    let what = format!("GET {}", target.split('?').next().unwrap_or(target));
    let mut tcp = connect_tcp(authority, "WebSocket").await?;
    // The subscribe and the pongs go out at once (as tungstenite's `disable_nagle` did).
    let _ = tcp.set_nodelay(true);
    let key = generate_key();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    match tokio::time::timeout(WS_WRITE_TIMEOUT, tcp.write_all(request.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("sending {what}: {e}")),
        Err(_) => return Err(format!("sending {what}: timed out")),
    }
    let mut buf = Vec::with_capacity(read_buffer);
    let mut head = read_head(&mut tcp, &mut buf, &what).await?;
    if head.status != 101 {
        return Err(refusal(&what, &mut head, &mut tcp, &mut buf).await);
    }
    if !head
        .upgrade
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return Err(format!(
            "{what} answered {} without `Upgrade: websocket` (got {:?})",
            head.status_text, head.upgrade
        ));
    }
    let accept = derive_accept_key(key.as_bytes());
    if head.ws_accept.as_deref() != Some(&accept) {
        return Err(format!(
            "{what}: wrong Sec-WebSocket-Accept {:?} (expected {accept:?})",
            head.ws_accept
        ));
    }
    // `buf` keeps the bytes that came with the head: the first frames.
    let mut ws = WsStream {
        tcp,
        buf,
        buf_max: read_buffer_max,
        filled: false,
        frames: WsFrames::new(None),
    };
    let first = ws.next_json().await?;
    if first["type"] != "connected" {
        return Err(format!("expected `connected`, got {first}"));
    }
    let Some(channel) = channel else {
        return Ok((ws, 0));
    };
    let sub = json!({"op": "subscribe", "channel": channel, "ref": 1});
    ws.send_text(&sub.to_string())
        .await
        .map_err(|e| format!("sending subscribe: {e}"))?;
    loop {
        let v = ws.next_json().await?;
        if v["type"] == "reply" && v["ref"] == 1 {
            if v["ok"] != true {
                return Err(format!("subscribe {channel} refused: {}", v["error"]));
            }
            return Ok((ws, v["seq"].as_u64().unwrap_or(0)));
        }
        if v["type"] == "disconnect" {
            return Err(format!("disconnected during setup: {v}"));
        }
        // Anything else (presence updates of the others joining) is skipped.
    }
}

impl WsStream {
    /// One read into `buf`'s spare capacity. Before it, `buf` doubles when a frame fills all of it,
    /// or when the last read filled it and it is below `buf_max`.
    async fn fill(&mut self) -> Result<(), String> {
        let cap = self.buf.capacity();
        if self.buf.len() == cap || (self.filled && cap < self.buf_max) {
            self.buf.reserve(2 * cap - self.buf.len());
        }
        match self.tcp.read_buf(&mut self.buf).await {
            Ok(0) => Err("socket ended".into()),
            Ok(_) => {
                self.filled = self.buf.len() == self.buf.capacity();
                Ok(())
            }
            Err(e) => Err(format!("socket error: {e}")),
        }
    }

    /// Drops the first `n` bytes of `buf` (parsed frames), moving what is left (part of a frame) to
    /// its start; a buffer grown past `buf_max` for a large frame shrinks back once empty.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        if self.buf.is_empty() && self.buf.capacity() > self.buf_max {
            self.buf = Vec::with_capacity(self.buf_max);
        }
    }

    /// Writes the frames queued in `frames.out` (pongs, a close reply, a setup frame), if any.
    async fn send_queued(&mut self) -> Result<(), String> {
        if self.frames.out.is_empty() {
            return Ok(());
        }
        let written =
            tokio::time::timeout(WS_WRITE_TIMEOUT, self.tcp.write_all(&self.frames.out)).await;
        self.frames.out.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("socket error: {e}")),
            Err(_) => Err(format!(
                "socket error: the engine took no frame for {} s",
                WS_WRITE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends `text` as one masked text frame (setup only).
    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.frames.queue(OP_TEXT, text.as_bytes());
        self.send_queued().await
    }

    /// The next text message, parsed as JSON (setup only: this allocates), each within
    /// [`SETUP_FRAME_TIMEOUT`]; pings on the way are answered.
    async fn next_json(&mut self) -> Result<Value, String> {
        let next = async {
            loop {
                let Some((len, text)) = self.frames.next(&self.buf)? else {
                    self.fill().await?;
                    continue;
                };
                let json = text.map(|t| {
                    serde_json::from_slice(t).map_err(|e| {
                        format!("unreadable frame ({e}): {}", String::from_utf8_lossy(t))
                    })
                });
                self.consume(len);
                self.send_queued().await?;
                if let Some(json) = json {
                    return json;
                }
            }
        };
        tokio::time::timeout(SETUP_FRAME_TIMEOUT, next)
            .await
            .map_err(|_| {
                format!(
                    "no frame from the server within {} s",
                    SETUP_FRAME_TIMEOUT.as_secs()
                )
            })?
    }

    /// Sends a close frame (no status), best effort: 1 s at most.
    async fn close(&mut self) {
        self.frames.out.clear();
        self.frames.queue(OP_CLOSE, &[]);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tcp.write_all(&self.frames.out))
            .await;
        self.frames.out.clear();
    }
}

/// Reads `ws`'s frames until the server closes it, the connection fails or `stop`, handing each text
/// message to `on_text` (in place: a slice of the read buffer) and answering pings. Returns why the
/// socket ended; `None` when stopped (after sending a close frame, best effort).
pub(crate) async fn ws_receive(
    ws: &mut WsStream,
    stop: &CancellationToken,
    mut on_text: impl FnMut(&[u8]),
) -> Option<String> {
    // One waiter for the whole loop: `cancelled()` registers with the token (a lock) when first polled.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // The buffer holds what the last read brought after the partial frame the one before left
        // (at first: whatever came with the subscribe reply). Every complete frame is handled, then
        // the rest moves to the buffer's start.
        if !ws.buf.is_empty() {
            let parsed = ws.frames.parse(&ws.buf, &mut on_text);
            let sent = ws.send_queued().await;
            match parsed {
                Ok(n) => ws.consume(n),
                Err(reason) => return Some(reason),
            }
            if let Err(e) = sent {
                return Some(e);
            }
        }
        tokio::select! {
            biased;
            r = ws.fill() => if let Err(e) = r {
                return Some(e);
            },
            _ = &mut stopped => break,
        }
    }
    ws.close().await;
    None
}

/// WebSocket opcodes (RFC 6455 §5.2).
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// The frame layer of a client WebSocket (RFC 6455 §5): parses the server's frames in place, and
/// queues the frames to send back (pongs, the close reply) in `out`.
struct WsFrames {
    /// The masking key of every frame sent, in tests; `None`: a fresh random key for each frame
    /// (RFC 6455 §5.3). Frames sent are few (the subscribe, pongs, the close).
    fixed_mask: Option<[u8; 4]>,
    /// Whether the fragmented message in progress is text (`Some(false)`: binary); `None` outside
    /// one.
    fragmented: Option<bool>,
    /// The fragmented text message so far (rare: the engine sends each message in one frame).
    fragments: Vec<u8>,
    /// Masked frames to send.
    out: Vec<u8>,
}

impl WsFrames {
    fn new(fixed_mask: Option<[u8; 4]>) -> WsFrames {
        WsFrames {
            fixed_mask,
            fragmented: None,
            fragments: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Queues a frame to send in `out`, masked with a fresh key (or the fixed one).
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.fixed_mask.unwrap_or_else(rand::random);
        masked_frame(&mut self.out, opcode, payload, mask);
    }

    /// Hands the text messages of the complete frames at the start of `buf` to `on_text`; returns
    /// how many bytes they took (the rest is part of a frame), or why the connection ends (a close
    /// frame, a protocol error).
    fn parse(&mut self, buf: &[u8], mut on_text: impl FnMut(&[u8])) -> Result<usize, String> {
        let mut at = 0;
        while let Some((len, text)) = self.next(&buf[at..])? {
            if let Some(text) = text {
                on_text(text);
            }
            at += len;
        }
        Ok(at)
    }

    /// The frame at the start of `buf`: its length and the text message it completes (`None` for a
    /// fragment, a binary message or a control frame), or `Ok(None)` when only part of it is there.
    /// A ping queues its pong. A close frame queues the reply and ends with `Err(closed by the
    /// server: CODE REASON)`; a protocol error ends with `Err` too.
    fn next<'a>(&'a mut self, buf: &'a [u8]) -> Result<Option<WsFrame<'a>>, String> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(protocol_error(
                "reserved bits set (no extension was agreed)",
            ));
        }
        if b1 & 0x80 != 0 {
            return Err(protocol_error("a masked frame from the server"));
        }
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        let (header, len) = match b1 & 0x7f {
            126 => match buf.get(2..4) {
                Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
                None => return Ok(None),
            },
            n => (2, u64::from(n)),
        };
        if len > WS_MAX_MESSAGE as u64 {
            return Err(protocol_error(format_args!(
                "a frame of {len} bytes (at most {WS_MAX_MESSAGE} accepted)"
            )));
        }
        let end = header + len as usize;
        let Some(payload) = buf.get(header..end) else {
            return Ok(None);
        };
        let text = match opcode {
            // The hot path: a whole text message in one frame.
            OP_TEXT if fin && self.fragmented.is_none() => Some(payload),
            OP_TEXT | OP_BINARY if self.fragmented.is_some() => {
                return Err(protocol_error("a new message inside a fragmented one"));
            }
            OP_BINARY if fin => None,
            OP_TEXT | OP_BINARY => {
                self.fragmented = Some(opcode == OP_TEXT);
                self.fragments.clear();
                if opcode == OP_TEXT {
                    self.add_fragment(payload)?;
                }
                None
            }
            OP_CONTINUATION => {
                let Some(is_text) = self.fragmented else {
                    return Err(protocol_error("a continuation frame outside a message"));
                };
                if is_text {
                    self.add_fragment(payload)?;
                }
                if fin {
                    self.fragmented = None;
                }
                (fin && is_text).then_some(&self.fragments[..])
            }
            OP_CLOSE | OP_PING | OP_PONG if !fin || len > 125 => {
                return Err(protocol_error("a fragmented or oversized control frame"));
            }
            OP_PING => {
                self.queue(OP_PONG, payload);
                None
            }
            OP_PONG => None,
            OP_CLOSE => return Err(self.on_close(payload)),
            _ => return Err(protocol_error(format_args!("unknown opcode {opcode:#x}"))),
        };
        Ok(Some((end, text)))
    }

    fn add_fragment(&mut self, payload: &[u8]) -> Result<(), String> {
        if self.fragments.len() + payload.len() > WS_MAX_MESSAGE {
            return Err(protocol_error(format_args!(
                "a fragmented message of more than {WS_MAX_MESSAGE} bytes"
            )));
        }
        self.fragments.extend_from_slice(payload);
        Ok(())
    }

    /// A close frame: queues the reply (echoing the status code, RFC 6455 §5.5.1) and returns why
    /// the connection ends.
    fn on_close(&mut self, payload: &[u8]) -> String {
        match *payload {
            [] => {
                self.queue(OP_CLOSE, &[]);
                "closed by the server".into()
            }
            [_] => protocol_error("a close frame with a 1-byte payload"),
            [c0, c1, ref reason @ ..] => {
                self.queue(OP_CLOSE, &[c0, c1]);
                format!(
                    "closed by the server: {} {}",
                    u16::from_be_bytes([c0, c1]),
                    String::from_utf8_lossy(reason)
                )
            }
        }
    }
}

/// A complete frame at the start of the buffer: its length, and the text message it completes.
type WsFrame<'a> = (usize, Option<&'a [u8]>);

fn protocol_error(detail: impl Display) -> String {
    format!("WebSocket protocol error: {detail}")
}

/// Appends a client frame (FIN set, one frame per message) of `opcode` with `payload` masked by
/// `mask` to `out`.
fn masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::serve_once;
    use crate::tally::tests::test_shared;
    use crate::tally::{Tally, now_us};
    use tokio::task::JoinHandle;

    /// A server frame (unmasked) with first byte `b0` (FIN and opcode), its length in the fewest
    /// bytes.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// [`frame`] with a 64-bit length whatever the payload's size.
    fn frame64(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0, 127];
        f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The client frames in `bytes`, each checked to be masked with `mask` (when given): the first
    /// byte and the unmasked payload.
    fn client_frames(bytes: &[u8], mask: Option<[u8; 4]>) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (b0, b1) = (bytes[at], bytes[at + 1]);
            assert!(b1 & 0x80 != 0, "an unmasked client frame: {bytes:?}");
            let (mut h, len) = match b1 & 0x7f {
                126 => (
                    4,
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                ),
                127 => {
                    let n = u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap());
                    (10, n as usize)
                }
                n => (2, usize::from(n)),
            };
            let key = &bytes[at + h..at + h + 4];
            if let Some(mask) = mask {
                assert_eq!(key, mask);
            }
            h += 4;
            let payload = bytes[at + h..at + h + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            frames.push((b0, payload));
            at += h + len;
        }
        frames
    }

    /// Feeds `reads` to a new [`WsFrames`] as successive reads into one buffer, kept and compacted
    /// as [`ws_receive`] does: the text messages, the frames queued to send, and how it ended
    /// (`Ok`: the bytes of a partial frame left).
    fn feed(reads: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>, Result<usize, String>) {
        let mut frames = WsFrames::new(Some([0x0f, 0xa0, 0x55, 0xff]));
        let (mut buf, mut texts) = (Vec::new(), Vec::new());
        for read in reads {
            buf.extend_from_slice(read);
            match frames.parse(&buf, |t| texts.push(t.to_vec())) {
                Ok(n) => drop(buf.drain(..n)),
                Err(e) => return (texts, frames.out, Err(e)),
            }
        }
        (texts, frames.out, Ok(buf.len()))
    }

    #[test]
    fn ws_frames_split_at_every_byte_boundary_are_read_whole() {
        let long16 = vec![b'm'; 300];
        let long64: Vec<u8> = (0..200u8).collect();
        let mut stream = frame(0x81, b"{\"n\":1}");
        for f in [
            frame(0x89, b"p1"),
            frame(0x81, &long16),
            frame(0x82, b"binary, ignored"),
            frame64(0x81, &long64),
            // A fragmented text message with a control frame between its fragments.
            frame(0x01, b"frag-"),
            frame(0x8a, b"pong, ignored"),
            frame(0x00, b"ment-"),
            frame(0x80, b"ed"),
            // A fragmented binary message, ignored.
            frame(0x02, b"b1"),
            frame(0x80, b"b2"),
            frame(0x81, b""),
            frame(0x01, b"again"),
            frame(0x80, b"!"),
            frame(0x81, b"last"),
            frame(0x88, b"\x03\xe8bye"),
        ] {
            stream.extend(f);
        }
        let texts: Vec<Vec<u8>> = vec![
            b"{\"n\":1}".to_vec(),
            long16,
            long64,
            b"frag-ment-ed".to_vec(),
            Vec::new(),
            b"again!".to_vec(),
            b"last".to_vec(),
        ];
        let sent = vec![(0x8a, b"p1".to_vec()), (0x88, b"\x03\xe8".to_vec())];
        let end = Err("closed by the server: 1000 bye".to_string());
        let check = |reads: &[&[u8]], what: &str| {
            let (got, out, ended) = feed(reads);
            assert_eq!(got, texts, "{what}");
            assert_eq!(
                client_frames(&out, Some([0x0f, 0xa0, 0x55, 0xff])),
                sent,
                "{what}"
            );
            assert_eq!(ended, end, "{what}");
        };
        for cut in 0..=stream.len() {
            check(&[&stream[..cut], &stream[cut..]], &format!("cut at {cut}"));
        }
        for size in [1, 2, 3, 7, 64] {
            let reads: Vec<&[u8]> = stream.chunks(size).collect();
            check(&reads, &format!("reads of {size}"));
        }
        // Without the close: the partial frame at the end stays in the buffer.
        let cut = stream.len() - 3;
        let (got, _, ended) = feed(&[&stream[..cut]]);
        assert_eq!((got.len(), ended), (texts.len(), Ok(4)));
    }

    #[test]
    fn ws_control_frames_and_protocol_errors() {
        // A ping's pong is masked (here with a fixed key).
        let mut frames = WsFrames::new(Some([0xa5, 0x5a, 0xff, 0x00]));
        assert_eq!(frames.parse(&frame(0x89, b"hey"), |_| panic!()), Ok(5));
        assert_eq!(
            frames.out,
            [
                0x8a,
                0x83,
                0xa5,
                0x5a,
                0xff,
                0x00,
                b'h' ^ 0xa5,
                b'e' ^ 0x5a,
                b'y' ^ 0xff
            ]
        );
        let mut frames = WsFrames::new(Some([1, 2, 3, 4]));
        assert_eq!(
            frames.parse(&frame(0x88, b""), |_| panic!()),
            Err("closed by the server".into())
        );
        assert_eq!(frames.out, [0x88, 0x80, 1, 2, 3, 4]);
        let mut frames = WsFrames::new(Some([1, 2, 3, 4]));
        assert_eq!(
            frames.parse(&frame(0x88, b"\x0f\xa8slow consumer"), |_| panic!()),
            Err("closed by the server: 4008 slow consumer".into())
        );
        assert_eq!(
            client_frames(&frames.out, Some([1, 2, 3, 4])),
            [(0x88, b"\x0f\xa8".to_vec())]
        );

        let error = |bytes: &[&[u8]]| feed(bytes).2.unwrap_err();
        let masked = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        assert_eq!(
            error(&[&masked]),
            "WebSocket protocol error: a masked frame from the server"
        );
        let mut oversized = vec![0x81, 127];
        oversized.extend_from_slice(&(WS_MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert_eq!(
            error(&[&oversized]),
            "WebSocket protocol error: a frame of 16777217 bytes (at most 16777216 accepted)"
        );
        // The largest frame accepted is merely incomplete; so is a 64-bit length without its payload.
        oversized[9] -= 1;
        assert_eq!(feed(&[&oversized]).2, Ok(10));
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(error(&[&huge]).contains("a frame of 18446744073709551615 bytes"));
        let big = frame64(0x01, &vec![b'x'; WS_MAX_MESSAGE]);
        assert_eq!(
            error(&[&big, &frame(0x80, b"y")]),
            "WebSocket protocol error: a fragmented message of more than 16777216 bytes"
        );
        assert!(error(&[&frame(0x80, b"x")]).contains("a continuation frame outside a message"));
        assert!(
            error(&[&frame(0x01, b"a"), &frame(0x81, b"b")])
                .contains("a new message inside a fragmented one")
        );
        assert!(error(&[&frame(0x09, b"")]).contains("a fragmented or oversized control frame"));
        assert!(error(&[&frame(0x89, &[0; 126])]).contains("oversized control frame"));
        assert!(error(&[&frame(0xc1, b"x")]).contains("reserved bits"));
        assert!(error(&[&frame(0x83, b"x")]).contains("unknown opcode 0x3"));
        assert!(error(&[&frame(0x88, b"\x03")]).contains("a 1-byte payload"));
    }

    /// [`serve_once`] for a WebSocket upgrade of `GET /ws?token=tok`: checks the request, answers
    /// `answer(key)`, the request's `Sec-WebSocket-Key`.
    async fn fake_ws_engine(
        answer: impl FnOnce(&str) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (String, JoinHandle<Vec<u8>>) {
        let (addr, task) = serve_once(move |addr, request| {
            let key = request
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .expect("a Sec-WebSocket-Key")
                .to_string();
            let want = format!(
                "GET /ws?token=tok HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            assert_eq!(request, want);
            answer(&key)
        })
        .await;
        (format!("ws://{addr}/ws?token=tok"), task)
    }

    fn switching_protocols(accept: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_refused_ws_upgrade_shows_the_status_and_the_body() {
        let (url, server) = fake_ws_engine(|_| {
            vec![
                b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 39\r\n\r\n{\"error\":".to_vec(),
                b"{\"code\":\"unauthorized\",\"m\":1}}".to_vec(),
            ]
        })
        .await;
        let Err(e) = open_ws_stream(&url, None, 1024, 1024).await else {
            panic!("a 401 opened a WebSocket")
        };
        assert_eq!(
            e,
            "GET /ws answered 401 Unauthorized: {\"error\":{\"code\":\"unauthorized\",\"m\":1}} \
             (is --secret the engine's HERALD_JWT_SECRET?)"
        );
        server.await.unwrap();
        let Err(e) = open_ws_stream("wss://127.0.0.1:1/ws", None, 1024, 1024).await else {
            panic!("a wss:// URL opened a WebSocket")
        };
        assert_eq!(
            e,
            "wss://127.0.0.1:1/ws: wss:// (TLS) is not supported, only ws://"
        );
    }

    #[tokio::test]
    async fn a_ws_upgrade_with_a_wrong_accept_is_refused() {
        let connected = frame(0x81, b"{\"type\":\"connected\"}");
        let (url, server) = fake_ws_engine(move |_| {
            let mut answer = switching_protocols(&derive_accept_key(b"another key"));
            answer.extend(connected);
            vec![answer]
        })
        .await;
        let Err(e) = open_ws_stream(&url, None, 1024, 1024).await else {
            panic!("a wrong Sec-WebSocket-Accept was taken")
        };
        assert!(
            e.starts_with("GET /ws: wrong Sec-WebSocket-Accept Some("),
            "{e}"
        );
        server.await.unwrap();
        // The right one is taken.
        let connected = frame(0x81, b"{\"type\":\"connected\"}");
        let (url, server) = fake_ws_engine(move |key| {
            let mut answer = switching_protocols(&derive_accept_key(key.as_bytes()));
            answer.extend(connected);
            vec![answer]
        })
        .await;
        let (ws, base) = open_ws_stream(&url, None, 1024, 1024).await.unwrap();
        assert_eq!((base, ws.buf.len()), (0, 0));
        drop(ws);
        server.await.unwrap();
    }

    fn event(seq: u64, pad: usize) -> Vec<u8> {
        format!(
            "{{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":{seq},\"epoch\":\"e\",\
             \"data\":{{\"t\":{},\"pad\":\"{}\"}}}}",
            now_us(),
            "x".repeat(pad)
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn a_ws_stream_subscribes_and_reads_frames_of_any_size() {
        let (url, server) = fake_ws_engine(|key| {
            let presence = frame(0x81, b"{\"type\":\"presence\",\"user\":\"lg-1\"}");
            let mut first = switching_protocols(&derive_accept_key(key.as_bytes()));
            // The first frames come with the head, and the presence update is cut by a read.
            first.extend(frame(
                0x81,
                b"{\"type\":\"connected\",\"connection_id\":\"c\"}",
            ));
            first.extend_from_slice(&presence[..10]);
            let mut second = presence[10..].to_vec();
            second.extend(frame(
                0x81,
                b"{\"type\":\"reply\",\"ref\":1,\"ok\":true,\"seq\":4}",
            ));
            // An event right behind the reply, in the same read.
            second.extend(frame(0x81, &event(5, 10)));
            let six = frame(0x81, &event(6, 10));
            let mut fourth = six[10..].to_vec();
            fourth.extend(frame(0x89, b"hb"));
            // Larger than the buffer can grow to by itself.
            fourth.extend(frame(0x81, &event(7, 70_000)));
            let eight = event(8, 100);
            let (a, b) = eight.split_at(50);
            vec![
                first,
                second,
                six[..10].to_vec(),
                fourth,
                [frame(0x01, a), frame(0x80, b)].concat(),
                frame(0x88, b"\x0f\xa8slow consumer"),
            ]
        })
        .await;
        let (mut ws, base) = open_ws_stream(&url, Some("room:r"), 1024, 4096)
            .await
            .unwrap();
        assert_eq!(base, 4);
        let (shared, stop) = (test_shared(), CancellationToken::new());
        let mut tally = Tally::new();
        tally.base = base;
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            ws_receive(&mut ws, &stop, |f| tally.on_frame(f, &shared)),
        )
        .await
        .expect("the stream ended at the close frame");
        assert_eq!(
            closed.as_deref(),
            Some("closed by the server: 4008 slow consumer")
        );
        assert!((5..=8).all(|s| tally.has(s)) && !tally.has(9));
        assert_eq!((tally.frames, tally.unreadable), (4, 0));
        drop(ws);
        let sent = client_frames(&server.await.unwrap(), None);
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert_eq!(sent[0].0, 0x81);
        assert_eq!(
            serde_json::from_slice::<Value>(&sent[0].1).unwrap(),
            json!({"op": "subscribe", "channel": "room:r", "ref": 1})
        );
        assert_eq!(sent[1], (0x8a, b"hb".to_vec()));
        assert_eq!(sent[2], (0x88, b"\x0f\xa8".to_vec()));
    }

    #[tokio::test]
    async fn a_refused_subscribe_is_an_error_and_stop_sends_a_close() {
        let answer = |reply: &'static [u8]| {
            move |key: &str| {
                let mut answer = switching_protocols(&derive_accept_key(key.as_bytes()));
                answer.extend(frame(0x81, b"{\"type\":\"connected\"}"));
                answer.extend(frame(0x81, reply));
                vec![answer]
            }
        };
        let (url, server) = fake_ws_engine(answer(
            b"{\"type\":\"reply\",\"ref\":1,\"ok\":false,\"error\":{\"code\":\"forbidden\"}}",
        ))
        .await;
        let Err(e) = open_ws_stream(&url, Some("room:r"), 1024, 1024).await else {
            panic!("a refused subscribe opened a subscriber")
        };
        assert_eq!(e, "subscribe room:r refused: {\"code\":\"forbidden\"}");
        server.await.unwrap();

        let (url, server) = fake_ws_engine(answer(
            b"{\"type\":\"reply\",\"ref\":1,\"ok\":true,\"seq\":0}",
        ))
        .await;
        let (mut ws, _) = open_ws_stream(&url, Some("room:r"), 1024, 1024)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(ws_receive(&mut ws, &stop, |_| panic!()).await, None);
        drop(ws);
        let sent = client_frames(&server.await.unwrap(), None);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[1], (0x88, Vec::new()));
    }
}
