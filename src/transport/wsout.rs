//! The WebSocket connection's outgoing frames, written by herald itself rather than through
//! tungstenite's write buffer: each queued frame is a few header bytes and the frame's shared
//! payload (`Bytes`: a delivery's frame is the same allocation for every local recipient), and a
//! flush hands them all to one vectored write, or, when they come to at most [`COPY_UP_TO`] bytes,
//! copies them onto the stack for one plain write. Nothing is allocated per recipient, and nothing
//! stays allocated once the queue has drained, where a write buffer keeps the size of its largest
//! burst for the connection's life.
//!
//! Server frames are never masked (RFC 6455 §5.1), so a frame is `FIN|opcode`, the payload length
//! (7 bits, or 126 + 16 bits, or 127 + 64 bits), then the payload.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::engine::hub::DirectWrite;

/// `FIN` and the text opcode.
const TEXT: u8 = 0x81;
/// `FIN` and the ping opcode.
const PING: u8 = 0x89;
/// Most slices handed to one write (the kernel takes up to 1,024).
const SLICES: usize = 64;
/// What is left to write of one write's frames, when at most this many bytes, is copied into one
/// buffer and written with one `send()` rather than a `writev` of its slices: on loopback here a two-slice `writev` cost
/// 0.5-0.8 µs more per call than a `send()` of the same bytes (`examples/sendfloor --writev`: the vfs
/// layer's iovec import and file checks; in the engine the difference stayed inside the noise), and
/// copying a few frames costs far less. Most writes are one delivery of a few hundred bytes.
const COPY_UP_TO: usize = 1024;
/// A write of at most this many bytes is copied into a buffer this size instead: most writes are
/// one event frame of a few hundred bytes (254 for a 100-byte payload in the full form), and the
/// copy's buffer is zeroed first (a quarter of the work for a quarter of the bytes).
const COPY_SMALL: usize = 320;

/// One frame's header: at most 10 bytes, made when the frame is written.
#[derive(Clone, Copy, Debug)]
struct Head {
    bytes: [u8; 10],
    len: u8,
}

/// A frame header's length for a payload of `payload` bytes.
fn head_len(payload: usize) -> usize {
    match payload {
        0..126 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

impl Head {
    fn new(first: u8, payload: usize) -> Head {
        let mut bytes = [0u8; 10];
        bytes[0] = first;
        let len = head_len(payload);
        match len {
            2 => bytes[1] = payload as u8,
            4 => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        Head {
            bytes,
            len: len as u8,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Makes one write of `parts` to `to`: copied into one buffer for `plain` when they come to at most
/// [`COPY_UP_TO`] bytes, else as slices (the first [`SLICES`]) for `vectored`.
fn write_parts<'a, T, R>(
    parts: impl Iterator<Item = &'a [u8]> + Clone,
    to: T,
    plain: impl FnOnce(T, &[u8]) -> R,
    vectored: impl FnOnce(T, &[IoSlice<'_>]) -> R,
) -> R {
    let size: usize = parts.clone().map(<[u8]>::len).sum();
    if size <= COPY_SMALL {
        plain(to, copied::<COPY_SMALL>(parts, &mut [0u8; COPY_SMALL]))
    } else if size <= COPY_UP_TO {
        plain(to, copied::<COPY_UP_TO>(parts, &mut [0u8; COPY_UP_TO]))
    } else {
        let mut slices = [IoSlice::new(&[]); SLICES];
        let mut n = 0;
        for part in parts.take(SLICES) {
            slices[n] = IoSlice::new(part);
            n += 1;
        }
        vectored(to, &slices[..n])
    }
}

/// `parts` copied one after the other into `flat` (they fit: the caller summed them).
fn copied<'a, 'b, const N: usize>(
    parts: impl Iterator<Item = &'a [u8]>,
    flat: &'b mut [u8; N],
) -> &'b [u8] {
    let mut n = 0;
    for part in parts {
        flat[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    &flat[..n]
}

/// A queued frame: its first header byte (`FIN|opcode`) and its payload.
type Frame = (u8, Bytes);

/// Frames waiting to be written, in order. 32 bytes in the connection's task, which every idle
/// connection holds for its life; the queue's allocation is given back once drained.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    frames: Vec<Frame>,
    /// The first frame not fully written.
    next: u32,
    /// Bytes of `frames[next]` (header, then payload) already written.
    written: u32,
}

impl Outbox {
    /// Queues a text frame carrying `payload` (valid UTF-8: every frame herald makes is JSON).
    pub(super) fn text(&mut self, payload: Bytes) {
        self.frames.push((TEXT, payload));
    }

    /// Puts the rest of a text frame the fan-out began writing itself first: `payload`'s frame
    /// less its first `written` bytes, before whatever is queued. Nothing queued may have been
    /// written yet (the fan-out writes only while the connection holds nothing of its own on the
    /// socket, and the connection takes the rest before it writes again).
    pub(super) fn rest_of_text(&mut self, payload: Bytes, written: usize) {
        debug_assert_eq!(
            self.written, 0,
            "the rest of a frame goes before anything written"
        );
        let size = head_len(payload.len()) + payload.len();
        if written >= size {
            return;
        }
        self.frames.drain(..self.next as usize);
        self.frames.insert(0, (TEXT, payload));
        self.next = 0;
        self.written = written as u32;
    }

    /// Queues an empty ping.
    pub(super) fn ping(&mut self) {
        self.frames.push((PING, Bytes::new()));
    }

    /// Nothing is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.next as usize == self.frames.len()
    }

    /// Writes everything queued to `io`, several frames per write.
    pub(super) fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let pending = &self.frames[self.next as usize..];
            let mut heads = [Head {
                bytes: [0; 10],
                len: 0,
            }; SLICES / 2];
            for (h, (first, payload)) in heads.iter_mut().zip(pending) {
                *h = Head::new(*first, payload.len());
            }
            let heads = &heads[..pending.len().min(SLICES / 2)];
            let wrote = ready!(write_parts(
                self.parts(heads),
                (&mut *io, &mut *cx),
                |(io, cx), flat| Pin::new(io).poll_write(cx, flat),
                |(io, cx), slices| Pin::new(io).poll_write_vectored(cx, slices),
            ))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(wrote);
        }
        self.frames = Vec::new();
        self.next = 0;
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// What is left to write of the pending frames `heads` covers (their headers, one per frame from
    /// the first pending), in order: each header and payload, less what was written of the first,
    /// empty parts left out.
    fn parts<'a>(&'a self, heads: &'a [Head]) -> impl Iterator<Item = &'a [u8]> + Clone {
        let mut skip = self.written as usize;
        heads
            .iter()
            .zip(&self.frames[self.next as usize..])
            .flat_map(|(head, (_, payload))| [head.as_slice(), payload.as_ref()])
            .filter_map(move |part| {
                if skip >= part.len() {
                    skip -= part.len();
                    None
                } else {
                    let rest = &part[skip..];
                    skip = 0;
                    Some(rest)
                }
            })
    }

    /// Marks `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        while let Some((_, payload)) = self.frames.get(self.next as usize) {
            let size = head_len(payload.len()) + payload.len();
            let left = size - self.written as usize;
            if n < left {
                // A frame is at most the socket's frame limit (far below 4 GiB).
                self.written += n as u32;
                return;
            }
            n -= left;
            self.next += 1;
            self.written = 0;
        }
    }
}

/// The fan-out's writer for a WebSocket on plain TCP: a text frame in one non-blocking `send()`.
/// Straight to the descriptor rather than through tokio's `try_write`, whose readiness check reads
/// one more cold cache line per delivery (in a fan-out to a thousand sockets, a third of the
/// fan-out's own time), and to the descriptor the fan-out keeps (the token) rather than the one in
/// the stream's allocation, for the same reason. Should the socket be full, the task's write finds
/// that out through tokio as it would anyway (one more `send()` in a rare case).
impl DirectWrite for TcpStream {
    fn token(&self) -> u64 {
        self.as_raw_fd() as u64
    }

    fn write_text(&self, token: u64, payload: &[u8]) -> Option<usize> {
        debug_assert_eq!(token, self.token());
        let head = Head::new(TEXT, payload.len());
        let size = head.len as usize + payload.len();
        match send_now(token, [head.as_slice(), payload].into_iter()) {
            Ok(n) if n == size => None,
            Ok(n) => Some(n),
            // Full (or broken: the task's own write finds out).
            Err(_) => Some(0),
        }
    }

    fn batch_frame(&self, token: u64, payload: &[u8], frame: &mut Vec<u8>) -> Option<RawFd> {
        debug_assert_eq!(token, self.token());
        // A big frame goes out by itself, from where it is, rather than copied.
        if payload.len() > COPY_UP_TO {
            return None;
        }
        frame.extend_from_slice(Head::new(TEXT, payload.len()).as_slice());
        frame.extend_from_slice(payload);
        Some(token as RawFd)
    }

    fn write_texts(&self, token: u64, payloads: &[&[u8]]) -> (usize, usize) {
        debug_assert_eq!(token, self.token());
        let payloads = &payloads[..payloads.len().min(SLICES / 2)];
        let mut heads = [Head::new(TEXT, 0); SLICES / 2];
        for (h, p) in heads.iter_mut().zip(payloads) {
            *h = Head::new(TEXT, p.len());
        }
        let parts = heads
            .iter()
            .zip(payloads)
            .flat_map(|(h, p)| [h.as_slice(), *p]);
        // Full (or broken: the task's own write finds out).
        let mut left = send_now(token, parts).unwrap_or(0);
        for (i, p) in payloads.iter().enumerate() {
            let size = head_len(p.len()) + p.len();
            if left < size {
                return (i, left);
            }
            left -= size;
        }
        (payloads.len(), 0)
    }
}

/// One non-blocking write of `parts` ([`write_parts`]) straight to the descriptor `token`: the
/// bytes the socket took.
fn send_now<'a>(token: u64, parts: impl Iterator<Item = &'a [u8]> + Clone) -> io::Result<usize> {
    // SAFETY: `token` is a stream's descriptor (`DirectWrite::token`), open as long as the stream
    // is, and the caller borrows the stream for this call.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(token as RawFd) };
    let socket = socket2::SockRef::from(&fd);
    let flags = crate::sendbatch::FLAGS;
    write_parts(
        parts,
        &socket,
        |socket, flat| socket.send_with_flags(flat, flags),
        |socket, slices| socket.send_vectored_with_flags(slices, flags),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer taking at most `max` bytes per write.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
        /// Calls of `poll_write` and of `poll_write_vectored`.
        plain: usize,
        vectored: usize,
    }

    impl Trickle {
        fn new(max: usize) -> Self {
            Trickle {
                out: Vec::new(),
                max,
                plain: 0,
                vectored: 0,
            }
        }
    }

    /// Writes everything `o` holds to a writer taking at most `max` bytes per write, which must
    /// complete at once; the writer, to look at.
    fn write_all(o: &mut Outbox, max: usize) -> Trickle {
        let mut w = Trickle::new(max);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            o.poll_write_to(&mut w, &mut cx),
            Poll::Ready(Ok(()))
        ));
        w
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.plain += 1;
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.vectored += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn expected(payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in payloads {
            v.push(0x81);
            match p.len() {
                l if l < 126 => v.push(l as u8),
                l if l <= 65535 => {
                    v.push(126);
                    v.extend_from_slice(&(l as u16).to_be_bytes());
                }
                l => {
                    v.push(127);
                    v.extend_from_slice(&(l as u64).to_be_bytes());
                }
            }
            v.extend_from_slice(p);
        }
        v
    }

    #[test]
    fn frames_arrive_whole_and_in_order_however_the_writes_split() {
        let sizes = [0usize, 5, 125, 126, 300, 65535, 65536, 70000, 1];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![b'a' + i as u8; n])
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        for max in [1, 3, 7, 1000, usize::MAX / 2] {
            let mut o = Outbox::default();
            for p in &payloads {
                o.text(Bytes::from(p.clone()));
            }
            let w = write_all(&mut o, max);
            assert!(o.is_empty());
            assert_eq!(w.out, expected(&refs), "max {max}");
        }
    }

    #[test]
    fn many_frames_take_several_writes_and_the_queue_is_given_back() {
        let mut o = Outbox::default();
        for i in 0..200 {
            o.text(Bytes::from(format!("{{\"n\":{i}}}")));
        }
        o.ping();
        let w = write_all(&mut o, usize::MAX / 2);
        assert_eq!(&w.out[w.out.len() - 2..], &[0x89, 0x00]);
        assert_eq!(w.out[0], 0x81);
        assert_eq!(o.frames.capacity(), 0);
    }

    #[test]
    fn a_small_write_is_one_send_and_a_large_one_is_vectored() {
        // One delivery, or a few: copied into one buffer, one plain write; on either side of
        // the small buffer's size (a frame of 126..=0xFFFF bytes has a 4-byte header).
        for n in [100, COPY_SMALL - 4, COPY_SMALL - 3] {
            let mut o = Outbox::default();
            o.text(Bytes::from(vec![b'x'; n]));
            let w = write_all(&mut o, usize::MAX / 2);
            assert_eq!((w.plain, w.vectored), (1, 0), "{n} bytes");
            assert_eq!(w.out, expected(&[&vec![b'x'; n]]), "{n} bytes");
        }
        let mut o = Outbox::default();
        o.text(Bytes::from(vec![b'a'; 250]));
        o.text(Bytes::from(vec![b'b'; 300]));
        let w = write_all(&mut o, usize::MAX / 2);
        assert_eq!((w.plain, w.vectored), (1, 0));
        assert_eq!(w.out, expected(&[&[b'a'; 250], &[b'b'; 300]]));
        // More than COPY_UP_TO bytes: the frames' own bytes in one vectored write, nothing copied.
        let mut o = Outbox::default();
        for _ in 0..8 {
            o.text(Bytes::from(vec![b'c'; 250]));
        }
        let w = write_all(&mut o, usize::MAX / 2);
        assert_eq!((w.plain, w.vectored), (0, 1));
        assert_eq!(w.out, expected(&[&[b'c'; 250][..]; 8]));
        // A large write cut short: the rest, once small, goes as one send.
        let mut o = Outbox::default();
        for _ in 0..8 {
            o.text(Bytes::from(vec![b'd'; 250]));
        }
        let w = write_all(&mut o, 1500);
        assert_eq!((w.vectored, w.plain), (1, 1));
        assert_eq!(w.out, expected(&[&[b'd'; 250][..]; 8]));
    }

    #[test]
    fn the_rest_of_a_frame_goes_out_from_where_the_socket_stopped() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let whole = expected(&[&payload]);
        for written in [0, 1, 3, 4, 150, whole.len() - 1, whole.len()] {
            let mut o = Outbox::default();
            // Whatever was queued meanwhile goes after it.
            o.text(Bytes::from_static(b"next"));
            o.rest_of_text(Bytes::from(payload.clone()), written);
            let w = write_all(&mut o, 7);
            let mut got = whole[..written].to_vec();
            got.extend_from_slice(&w.out);
            assert_eq!(got, expected(&[&payload, b"next"]), "written {written}");
        }
    }
}
