//! The floor for a Redis-backed WebSocket fan-out on this runtime and this box: the least work a
//! node of the side-by-side harness (`benches/peers/matrix.sh`, system `floor`) can do for one
//! delivery, to set herald's and nchan's figures against.
//!
//! One process per node, one thread (a tokio current-thread runtime, as each nginx instance runs
//! one worker). It serves `GET /sub` as a WebSocket (the RFC 6455 handshake, then it only reads
//! to notice the close) and `POST /pub` (the body is `PUBLISH`ed to the Redis channel `bench`
//! over a plain connection, then `200`). One raw connection `SUBSCRIBE`d to `bench` reads the
//! messages; for each one the text frame is built once and written straight to every
//! subscriber's socket from that same loop (`try_write`; whatever does not fit waits in that
//! connection's buffer for its own writer task). No sequence numbers, history, presence,
//! authentication, JSON or limits: none of what a notification engine must do.
//!
//! `cargo build --release --example fanfloor`, then
//! `target/release/examples/fanfloor --listen 127.0.0.1:7081 --redis redis://127.0.0.1:6379`.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const CHANNEL: &str = "bench";

struct Sub {
    stream: TcpStream,
    /// Bytes the fan-out could not write at once; the connection's writer task sends them.
    pending: RefCell<Vec<u8>>,
    wake: Notify,
}

type Subs = Rc<RefCell<Vec<Rc<Sub>>>>;

fn main() {
    let mut listen = "127.0.0.1:7081".to_string();
    let mut redis = "redis://127.0.0.1:6379".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next();
        match (flag.as_str(), value) {
            ("--listen", Some(v)) => listen = v,
            ("--redis", Some(v)) => redis = v,
            _ => {
                eprintln!("usage: fanfloor --listen HOST:PORT --redis redis://HOST:PORT");
                std::process::exit(2);
            }
        }
    }
    let redis = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, serve(listen, redis)) {
        eprintln!("fanfloor: {e}");
        std::process::exit(1);
    }
}

async fn serve(listen: String, redis: String) -> io::Result<()> {
    let subs: Subs = Rc::new(RefCell::new(Vec::new()));
    let listener = TcpListener::bind(&listen).await?;
    tokio::task::spawn_local(fan_out(redis.clone(), subs.clone()));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::task::spawn_local(connection(stream, redis.clone(), subs.clone()));
    }
}

/// Reads one request head; returns it and any bytes read past it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn connection(mut stream: TcpStream, redis: String, subs: Subs) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut publisher: Option<TcpStream> = None;
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        if head.starts_with("GET /sub") {
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            stream.write_all(reply.as_bytes()).await?;
            return subscriber(stream, subs).await;
        }
        if head.starts_with("POST /pub") {
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                let mut chunk = [0u8; 2048];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            if publisher.is_none() {
                publisher = Some(TcpStream::connect(&redis).await?);
            }
            let r = publisher.as_mut().expect("connected");
            let mut cmd = format!(
                "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{CHANNEL}\r\n${}\r\n",
                CHANNEL.len(),
                body.len()
            )
            .into_bytes();
            cmd.extend_from_slice(&body);
            cmd.extend_from_slice(b"\r\n");
            r.write_all(&cmd).await?;
            // The reply is one line (`:N\r\n`, the number of receivers).
            let mut reply = Vec::new();
            while !reply.ends_with(b"\r\n") {
                let mut b = [0u8; 64];
                let n = r.read(&mut b).await?;
                if n == 0 {
                    return Err(io::Error::other("redis closed"));
                }
                reply.extend_from_slice(&b[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await?;
            continue;
        }
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await?;
    }
    Ok(())
}

async fn subscriber(stream: TcpStream, subs: Subs) -> io::Result<()> {
    let sub = Rc::new(Sub {
        stream,
        pending: RefCell::new(Vec::new()),
        wake: Notify::new(),
    });
    subs.borrow_mut().push(sub.clone());
    let writer = tokio::task::spawn_local(drain(sub.clone()));
    let mut buf = [0u8; 512];
    loop {
        sub.stream.readable().await?;
        match sub.stream.try_read(&mut buf) {
            Ok(0) => break,
            // A client's close frame (FIN + opcode 8): answer it and go.
            Ok(n) if n >= 1 && buf[0] == 0x88 => {
                let _ = sub.stream.try_write(&[0x88, 0x00]);
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    writer.abort();
    subs.borrow_mut().retain(|s| !Rc::ptr_eq(s, &sub));
    Ok(())
}

/// Sends what the fan-out left in a connection's buffer.
async fn drain(sub: Rc<Sub>) {
    loop {
        sub.wake.notified().await;
        while !sub.pending.borrow().is_empty() {
            if sub.stream.writable().await.is_err() {
                return;
            }
            let r = sub.stream.try_write(&sub.pending.borrow());
            match r {
                Ok(n) => {
                    sub.pending.borrow_mut().drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

fn deliver(subs: &Subs, frame: &[u8]) {
    for sub in subs.borrow().iter() {
        let mut pending = sub.pending.borrow_mut();
        if !pending.is_empty() {
            pending.extend_from_slice(frame);
            continue;
        }
        match sub.stream.try_write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(n) => {
                pending.extend_from_slice(&frame[n..]);
                sub.wake.notify_one();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pending.extend_from_slice(frame);
                sub.wake.notify_one();
            }
            Err(_) => {}
        }
    }
}

fn ws_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= u16::MAX as usize => {
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

/// Reads one RESP value's line (`\r\n`-terminated) from `buf` at `*at`.
fn line(buf: &[u8], at: &mut usize) -> Option<usize> {
    let rel = buf[*at..].windows(2).position(|w| w == b"\r\n")?;
    let start = *at;
    *at += rel + 2;
    Some(start)
}

/// Parses one `message` push (`*3 $7 message $5 bench $N payload`) at the start of `buf`:
/// `Some((consumed, Some(payload range)))`, `Some((consumed, None))` for any other complete
/// reply (the subscribe confirmation), `None` when more bytes are needed.
fn parse_push(buf: &[u8]) -> Option<(usize, Option<(usize, usize)>)> {
    let mut at = 0;
    let s = line(buf, &mut at)?;
    if buf[s] != b'*' {
        return Some((at, None));
    }
    let count: usize = std::str::from_utf8(&buf[s + 1..at - 2])
        .ok()?
        .parse()
        .ok()?;
    let mut last = (0, 0);
    let mut first_is_message = false;
    for i in 0..count {
        let s = line(buf, &mut at)?;
        if buf[s] != b'$' {
            continue;
        }
        let n: usize = std::str::from_utf8(&buf[s + 1..at - 2])
            .ok()?
            .parse()
            .ok()?;
        if buf.len() < at + n + 2 {
            return None;
        }
        if i == 0 {
            first_is_message = &buf[at..at + n] == b"message";
        }
        last = (at, at + n);
        at += n + 2;
    }
    Some((at, first_is_message.then_some(last)))
}

async fn fan_out(redis: String, subs: Subs) {
    let mut conn = match TcpStream::connect(&redis).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fanfloor: redis {redis}: {e}");
            std::process::exit(1);
        }
    };
    let cmd = format!(
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{CHANNEL}\r\n",
        CHANNEL.len()
    );
    if conn.write_all(cmd.as_bytes()).await.is_err() {
        std::process::exit(1);
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                eprintln!("fanfloor: redis subscription lost");
                std::process::exit(1);
            }
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some((used, payload)) = parse_push(&buf[at..]) {
            if let Some((s, e)) = payload {
                let frame = ws_text_frame(&buf[at + s..at + e]);
                deliver(&subs, &frame);
            }
            at += used;
        }
        buf.drain(..at);
    }
}
