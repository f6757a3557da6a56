//! The HTTP connections themselves: the accept loop, what one connection may hold, and the process's
//! open-file limit they live under.
//!
//! - **A cap per node** (`http.max_connections`; by default the open-file limit less a reserve for
//!   Redis, the rules directory and logs): past it a new connection is answered `503 unavailable`
//!   at once and closed, instead of the process running out of descriptors, which would stall
//!   `/healthz` and every new WebSocket. Upgraded WebSockets and SSE streams count until they close.
//! - **A read timeout** (`http.read_timeout`): a connection that sends nothing, or half a request
//!   head, or idles between keep-alive requests, is closed after it (hyper's header read timer,
//!   which runs whenever the connection waits for a request head); request bodies are read within
//!   the same time ([`super::JsonBody`]).
//! - **Shutdown**: new connections stop, open ones finish their request and close (hyper's graceful
//!   shutdown), within the grace period whatever the clients do.
//!
//! Imports nothing of `backend` or `rules`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Descriptors kept back from the connection cap: Redis connections, the rules directory and its
/// watcher, logs.
const FD_RESERVE: u64 = 256;
/// The cap when the open-file limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 10_000;
/// Most request header fields hyper parses. The router answers over [`MAX_HEADERS`] itself (in the
/// protocol's error shape), so only requests past this get hyper's bare 431.
const HYPER_MAX_HEADERS: usize = 128;
/// Most bytes of a request head hyper reads (likewise above [`MAX_HEADER_BYTES`]).
const HYPER_MAX_HEADER_BYTES: usize = 128 * 1024;
/// Most request header fields a request may have (431 `too_large` beyond).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of request header names and values (431 `too_large` beyond).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How many connections are open on this node, and how many may be.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    max: usize,
}

impl Connections {
    /// A counter allowing `max` open connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    fn admit(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One admitted connection; gives its place back when dropped (with the socket, wherever it went:
/// an upgraded WebSocket carries it).
#[derive(Debug)]
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream holding its connection [`Slot`].
struct Counted {
    tcp: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// An upgraded connection's TCP stream, shared: the connection reads and writes it as its own, and
/// the fan-out writes deliveries to it while the session is idle
/// ([`crate::engine::hub::DirectWrite`]). It keeps the connection's [`Slot`]; the descriptor closes
/// when the last holder lets go (the session gives the fan-out's up when it closes).
#[derive(Debug)]
pub(super) struct SharedTcp {
    pub(super) tcp: Arc<TcpStream>,
    _slot: Slot,
}

/// The upgraded connection's own TCP stream, shared, and the bytes hyper read past the upgrade
/// request; `Err` gives the connection back when it is not one of this module's.
pub(super) fn shared(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(SharedTcp, bytes::Bytes), hyper::upgrade::Upgraded> {
    let parts = upgraded.downcast::<TokioIo<Counted>>()?;
    let Counted { tcp, _slot } = parts.io.into_inner();
    Ok((
        SharedTcp {
            tcp: Arc::new(tcp),
            _slot,
        },
        parts.read_buf,
    ))
}

impl SharedTcp {
    /// One `write` once the socket is writable, waiting again while it would block.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.tcp.poll_write_ready(cx))?;
            match write(&self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.tcp.poll_read_ready(cx))?;
            // `try_read` clears the readiness when the socket has nothing after all.
            match self.tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write))
    }
}

/// The answer to a connection over the cap: written before its request is read, then closed.
fn refusal(max: usize) -> Vec<u8> {
    let body = format!(
        "{{\"error\":{{\"code\":\"unavailable\",\"message\":\"this node holds its maximum of {max} connections; retry later or on another node\"}}}}\n"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections until `stop` is cancelled, serving `app` on each. Returns once the listener
/// is closed; the connections finish on their own (each stops at `stop` too).
pub(super) async fn accept(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    read_timeout: Duration,
    nodelay: bool,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_headers(HYPER_MAX_HEADERS)
        .max_header_size(HYPER_MAX_HEADER_BYTES);
    let http = Arc::new(http);
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors or a connection reset before it was accepted: the next
                    // accept may work, and a tight loop would not help it.
                    tracing::warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        // No Nagle by default: frames are already batched per flush, and waiting for an ACK can
        // hold a frame back by the client's delayed-ACK time. With Nagle on, frames queue while one
        // is unacknowledged and leave together (fewer packets on a saturated host).
        if nodelay && let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "Could not set TCP_NODELAY.");
        }
        let Some(slot) = connections.admit() else {
            crate::metrics::connection_refused();
            let max = connections.max();
            tokio::spawn(async move {
                let mut tcp = tcp;
                let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&refusal(max)))
                    .await;
            });
            continue;
        };
        let io = TokioIo::new(Counted { tcp, _slot: slot });
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: hyper::Request<hyper::body::Incoming>| req.map(Body::new)),
        );
        let http = http.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = http.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error.");
            }
        });
    }
}

/// Pending connections the listener queues before `accept` (the kernel caps it at
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 1,024: a storm of reconnects after a
/// restart overflows that, and each SYN dropped waits a one-second retransmit.
const LISTEN_BACKLOG: u32 = 8192;

/// A listener on `addr` with a backlog deep enough for a connect storm.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The connection cap to use: `configured`, or the open-file limit less a reserve.
pub fn max_connections(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| match open_file_limit() {
        Some((soft, _)) => soft.saturating_sub(FD_RESERVE).max(64) as usize,
        None => FALLBACK_MAX_CONNECTIONS,
    })
}

/// The process's open-file limit `(soft, hard)`.
pub fn open_file_limit() -> Option<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, properly aligned local.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    (rc == 0).then_some((l.rlim_cur, l.rlim_max))
}

/// Raises the process's soft open-file limit to its hard limit (each connection is a descriptor,
/// and the soft limit a shell hands down is often 1024). Returns `(before, after)`.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = open_file_limit().ok_or_else(io::Error::last_os_error)?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let l = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one `rlimit` through a pointer to a live, properly aligned local.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) };
    if rc == 0 {
        Ok((soft, hard))
    } else {
        Err(io::Error::last_os_error())
    }
}
