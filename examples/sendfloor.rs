//! The floor under one delivery on this machine: what a bare `send()` of one small frame costs when
//! every connection gets one frame per round, as in the two-node benchmark (2,000 subscribers at 50
//! publishes/s: each connection gets a frame every 20 ms, so nothing can be batched per connection and
//! every delivery is its own `send()`).
//!
//! It opens `--connections` loopback TCP connections. A reader thread (a tokio runtime, as the loadgen
//! reads) drains them all, and the main thread writes one `--size`-byte frame to each connection per
//! round, `--rate` rounds a second, for `--seconds`. It prints one JSON line: the sender's CPU µs per
//! `send()` and the reader's per frame, from `/proc/thread-self/schedstat` (nanoseconds on the CPU).
//!
//! On loopback the sender's `send()` also runs the receiver's TCP input and wakes it, which is why it
//! costs several µs. A server on the same box delivers below this figure only by putting several
//! frames in one write, or by entering the kernel once for many sends: `--uring` sends each round
//! in io_uring submissions of 64, as herald's writer tasks do (on the 2-vCPU box of the README,
//! 4.2 µs per send against 5.4, the mean of six interleaved runs each). Compare it with
//! `engine_cpu_us_per_delivery` from `examples/loadgen`.
//!
//! `cargo run --release --example sendfloor -- --connections 1000 --rate 50 --seconds 5`

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

struct Args {
    connections: usize,
    rate: u32,
    seconds: f64,
    size: usize,
    /// Each frame as two slices (a 2-byte header and the rest) in one `writev`.
    writev: bool,
    /// Each round's sends in io_uring submissions of 64, as herald's writer tasks send.
    uring: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        connections: 1000,
        rate: 50,
        seconds: 5.0,
        size: 150,
        writev: false,
        uring: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        if flag == "--writev" {
            a.writev = true;
            continue;
        }
        if flag == "--uring" {
            a.uring = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--connections" => a.connections = value.parse().map_err(|e| bad(&e))?,
            "--rate" => a.rate = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => a.seconds = value.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.connections == 0 || a.rate == 0 || a.size == 0 || a.seconds <= 0.0 {
        return Err("--connections, --rate, --size and --seconds must be positive".into());
    }
    Ok(a)
}

const HELP: &str =
    "sendfloor: the CPU cost of one send() per delivery on this machine (loopback TCP)

  --connections N   connections, each written once per round      [1000]
  --rate R          rounds per second                              [50]
  --seconds S       how long to send                               [5]
  --size B          bytes per frame (a 100-byte payload's frame)   [150]
  --writev          write each frame as two slices in one writev
  --uring           send each round in io_uring submissions of 64 (as herald's writer tasks do)

Prints one JSON line: sends, sends_per_s, sender_cpu_us_per_send, reader_cpu_us_per_frame.";

/// One frame to every connection the way herald's writer tasks send (`herald::sendbatch`: io_uring
/// submissions of 64 non-blocking sends), what a full socket did not take written after, blocking:
/// the sends made.
fn send_round_uring(servers: &mut [TcpStream], frame: &[u8]) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let jobs: Vec<_> = servers
        .iter()
        .map(|s| (s.as_raw_fd(), 0..frame.len()))
        .collect();
    let mut sent = Vec::with_capacity(jobs.len());
    herald::sendbatch::send_all(&jobs, frame, &mut sent);
    for (s, n) in servers.iter_mut().zip(sent) {
        match usize::try_from(n) {
            Ok(n) => s.write_all(&frame[n..])?,
            Err(_) if n == -(libc::EAGAIN as isize) => s.write_all(frame)?,
            Err(_) => return Err(std::io::Error::from_raw_os_error(-n as i32)),
        }
    }
    Ok(servers.len() as u64)
}

/// This thread's time on the CPU, from /proc/thread-self/schedstat (ns).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{HELP}");
            return;
        }
        Err(e) => {
            eprintln!("sendfloor: {e}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("sendfloor: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut clients = Vec::with_capacity(args.connections);
    let mut servers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(TcpStream::connect(addr)?);
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        servers.push(s);
    }
    let rounds = (args.seconds * f64::from(args.rate)).ceil() as u64;
    let expected = rounds * args.connections as u64 * args.size as u64;
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            rt.block_on(async move {
                let start = thread_cpu_ns();
                let mut tasks = Vec::with_capacity(clients.len());
                for c in clients {
                    c.set_nonblocking(true)?;
                    let mut c = tokio::net::TcpStream::from_std(c)?;
                    let received = received.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(n) = c.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
                Ok(thread_cpu_ns() - start)
            })
        })
    };
    let frame = vec![b'x'; args.size];
    std::thread::sleep(Duration::from_millis(200));
    let every = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let (t0, cpu0) = (Instant::now(), thread_cpu_ns());
    let mut sends = 0u64;
    for r in 0..rounds {
        let due = t0 + every * r as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if args.uring {
            sends += send_round_uring(&mut servers, &frame)?;
            continue;
        }
        for s in &mut servers {
            if args.writev {
                let (head, rest) = frame.split_at(2.min(frame.len()));
                let n =
                    s.write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(rest)])?;
                s.write_all(&frame[n..])?;
            } else {
                s.write_all(&frame)?;
            }
            sends += 1;
        }
    }
    let (elapsed, sender_ns) = (t0.elapsed(), thread_cpu_ns() - cpu0);
    // Let the reader take everything, then close so its tasks end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(servers);
    let reader_ns = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))??;
    let frames = received.load(Ordering::Relaxed) / args.size as u64;
    println!(
        "{{\"connections\":{},\"rate\":{},\"size\":{},\"sends\":{sends},\"sends_per_s\":{:.0},\"frames_received\":{frames},\"sender_cpu_us_per_send\":{:.2},\"reader_cpu_us_per_frame\":{:.2}}}",
        args.connections,
        args.rate,
        args.size,
        sends as f64 / elapsed.as_secs_f64(),
        sender_ns as f64 / 1000.0 / sends as f64,
        reader_ns as f64 / 1000.0 / frames.max(1) as f64,
    );
    Ok(())
}
