//! Where log lines go: `tracing` to stderr through a sink that never blocks the engine and never
//! panics, whatever stderr is (a terminal, a file, a pipe whose reader went away or stopped reading).
//!
//! Lines are handed to one writer thread through a bounded queue; when the queue is full (stderr is
//! not keeping up) a line is dropped and counted, and the count is written once stderr takes lines
//! again. A write that fails (a closed pipe) is dropped too: logging must not be what stops a
//! shutdown. At exit, [`flush`] gives the writer a bounded time to write what is queued.
//!
//! Secrets never reach a line: the WebSocket library logs frames' contents (a `connect` frame holds a
//! JWT) at trace level, so its trace lines are dropped whatever the filter asks (its other levels
//! follow the filter like everything else).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Lines queued for stderr before new ones are dropped.
const QUEUE_LINES: usize = 4096;

/// Targets that log message contents (a `connect` frame's token) at trace level.
const QUIET_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

enum Item {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Sink {
    tx: SyncSender<Item>,
    dropped: AtomicU64,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("herald-log".into())
            .spawn(move || write_lines(rx));
        if spawned.is_err() {
            // No writer: lines are dropped (counted) rather than written on the engine's threads.
            eprintln_quiet("herald: could not start the log writer; logs are dropped");
        }
        Sink {
            tx,
            dropped: AtomicU64::new(0),
        }
    })
}

/// Writes to stderr, ignoring every error (the one place herald writes to stderr directly).
pub fn eprintln_quiet(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.write_all(b"\n");
}

/// Writes to stdout, ignoring every error (`herald | head` must not panic the server).
pub fn println_quiet(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn write_lines(rx: Receiver<Item>) {
    let mut err = std::io::stderr();
    let mut broken = false;
    for item in rx {
        match item {
            Item::Line(line) => {
                if broken {
                    continue;
                }
                if let Some(s) = SINK.get() {
                    let n = s.dropped.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        let note =
                            format!("herald: {n} log line(s) dropped: stderr did not keep up\n");
                        broken |= err.write_all(note.as_bytes()).is_err();
                    }
                }
                // A closed pipe stays closed: stop trying, keep draining.
                broken |= err.write_all(&line).is_err();
            }
            Item::Flush(done) => {
                let _ = err.flush();
                let _ = done.send(());
            }
        }
    }
}

/// One event's bytes, queued whole when the formatter is done with it.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let s = sink();
        match s.tx.try_send(Item::Line(std::mem::take(&mut self.0))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The `MakeWriter` of the sink.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(256))
    }
}

/// The filter: `HERALD_LOG`, else `RUST_LOG`, else `info`.
pub fn filter() -> EnvFilter {
    EnvFilter::try_from_env("HERALD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// True for the trace lines of [`QUIET_TARGETS`], which no filter lets through.
fn frame_contents(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::TRACE
        && QUIET_TARGETS.iter().any(|t| {
            meta.target()
                .strip_prefix(t)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// The filters every layer sits behind: `env` outermost, so that its maximum level is the
/// subscriber's. That maximum is what the `log` bridge enables: with the frame filter outermost
/// (it has no maximum) the WebSocket library formatted a trace line for every frame, at any
/// `HERALD_LOG`, only for the frame filter to drop it.
fn filtered<L>(
    layer: L,
    env: EnvFilter,
) -> impl tracing_subscriber::Layer<tracing_subscriber::Registry>
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry>,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::filter_fn;
    layer
        .with_filter(filter_fn(|meta| !frame_contents(meta)))
        .with_filter(env)
}

/// Installs the subscriber: `format` lines on stderr through the sink, as [`filter`] allows, never
/// the frame contents the WebSocket library traces.
pub fn init(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Never fails a write, so the formatter's fallback (a print to stderr, which panics when
        // stderr is a closed pipe) never runs.
        .with_writer(Stderr);
    let registry = tracing_subscriber::registry();
    let _ = match format {
        LogFormat::Json => registry.with(filtered(layer.json(), filter())).try_init(),
        LogFormat::Text => registry.with(filtered(layer, filter())).try_init(),
    };
}

/// Gives the writer up to `within` to write what is queued (at exit).
pub fn flush(within: Duration) {
    static FLUSHING: Mutex<()> = Mutex::new(());
    let Some(s) = SINK.get() else { return };
    let _one = FLUSHING.lock();
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if s.tx.try_send(Item::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(within);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn the_subscribers_maximum_level_is_the_operators() {
        for (directives, max) in [
            ("warn", LevelFilter::WARN),
            ("info,herald=debug", LevelFilter::DEBUG),
            ("trace", LevelFilter::TRACE),
        ] {
            let layer = filtered(tracing_subscriber::fmt::layer(), EnvFilter::new(directives));
            assert_eq!(layer.max_level_hint(), Some(max), "{directives}");
        }
    }

    #[test]
    fn only_the_websocket_librarys_trace_lines_are_frame_contents() {
        use tracing::Level;
        use tracing::callsite::Identifier;
        use tracing::metadata::Kind;
        struct Site;
        impl tracing::Callsite for Site {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unreachable!()
            }
        }
        static SITE: Site = Site;
        let meta = |target: &'static str, level| {
            tracing::Metadata::new(
                "e",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], Identifier(&SITE)),
                Kind::EVENT,
            )
        };
        assert!(frame_contents(&meta("tungstenite::protocol", Level::TRACE)));
        assert!(frame_contents(&meta("tokio_tungstenite", Level::TRACE)));
        assert!(!frame_contents(&meta("tungstenite", Level::DEBUG)));
        assert!(!frame_contents(&meta("tungstenite_other", Level::TRACE)));
        assert!(!frame_contents(&meta("herald::transport", Level::TRACE)));
    }
}
