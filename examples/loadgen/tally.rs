//! What the subscribers count: [`Shared`] (what every subscriber task reads) and each one's
//! [`Tally`] (seqs seen, latency), from event frames read lazily.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::scan::{find, number_after};

/// Largest latency the histograms track (longer ones are clamped to it).
pub(crate) const LATENCY_MAX_US: u64 = 60_000_000;
/// Histogram precision: 2 significant digits (1 %), ~18 KiB per subscriber.
pub(crate) const LATENCY_SIGFIG: u8 = 2;

/// Microseconds since the UNIX epoch.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What every subscriber task reads.
pub(crate) struct Shared {
    /// The start of every event frame on the room channel.
    pub(crate) head: Vec<u8>,
    /// The start of a `reset` frame.
    pub(crate) reset_head: Vec<u8>,
    /// `room:{room}`.
    pub(crate) channel: String,
    /// Events sent at or after this time (µs) are measured; `u64::MAX` until publishing starts.
    pub(crate) measure_from_us: AtomicU64,
    /// Event frames received so far by each subscriber, for progress lines.
    pub(crate) progress: Vec<PaddedCounter>,
}

/// A counter on its own cache line: each subscriber writes only its own, with a plain store.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct PaddedCounter(pub(crate) AtomicU64);

impl Shared {
    pub(crate) fn delivered(&self) -> u64 {
        self.progress
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// One subscriber's results.
pub(crate) struct Tally {
    /// The channel's seq at subscribe time: deliveries have seqs above it.
    pub(crate) base: u64,
    /// Bit `seq - base - 1` is set once `seq` arrived.
    seen: Vec<u64>,
    /// Highest seq seen.
    highest: u64,
    pub(crate) duplicates: u64,
    pub(crate) reorders: u64,
    pub(crate) resets: u64,
    /// Frames on the channel that could not be read (no `"seq":` or `"t":`).
    pub(crate) unreadable: u64,
    /// Why the socket ended early, if it did.
    pub(crate) closed: Option<String>,
    /// Delivery latency of measured events, µs.
    pub(crate) latency: Histogram<u64>,
    /// Event frames received on the channel.
    pub(crate) frames: u64,
}

impl Tally {
    pub(crate) fn new() -> Self {
        Tally {
            base: 0,
            seen: Vec::new(),
            highest: 0,
            duplicates: 0,
            reorders: 0,
            resets: 0,
            unreadable: 0,
            closed: None,
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
                .expect("valid histogram bounds"),
            frames: 0,
        }
    }

    pub(crate) fn has(&self, seq: u64) -> bool {
        if seq <= self.base {
            return false;
        }
        let i = (seq - self.base - 1) as usize;
        self.seen
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Handles one text frame (the event JSON as on the wire; SSE `data:` lines are the same bytes).
    pub(crate) fn on_frame(&mut self, f: &[u8], shared: &Shared) {
        if !f.starts_with(&shared.head) {
            if f.starts_with(&shared.reset_head) && find(f, shared.channel.as_bytes()).is_some() {
                self.resets += 1;
            }
            return;
        }
        let rest = &f[shared.head.len()..];
        let Some((seq, after)) = number_after(rest, b"\"seq\":") else {
            self.unreadable += 1;
            return;
        };
        let Some((t, _)) = number_after(&rest[after..], b"\"t\":") else {
            self.unreadable += 1;
            return;
        };
        self.frames += 1;
        if seq > self.base {
            let i = (seq - self.base - 1) as usize;
            if self.seen.len() <= i / 64 {
                self.seen.resize(i / 64 + 1, 0);
            }
            let w = &mut self.seen[i / 64];
            let bit = 1u64 << (i % 64);
            if *w & bit != 0 {
                self.duplicates += 1;
                return;
            }
            *w |= bit;
        }
        if seq < self.highest {
            self.reorders += 1;
        }
        self.highest = self.highest.max(seq);
        if t >= shared.measure_from_us.load(Ordering::Relaxed) {
            self.latency
                .saturating_record(now_us().saturating_sub(t).max(1));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn test_shared() -> Shared {
        Shared {
            head: b"{\"type\":\"event\",\"channel\":\"room:r\",".to_vec(),
            reset_head: b"{\"type\":\"reset\"".to_vec(),
            channel: "room:r".into(),
            measure_from_us: AtomicU64::new(0),
            progress: Vec::new(),
        }
    }

    #[test]
    fn frames_are_read_lazily() {
        let shared = Shared {
            head: b"{\"type\":\"event\",\"channel\":\"room:r\",".to_vec(),
            reset_head: b"{\"type\":\"reset\"".to_vec(),
            channel: "room:r".into(),
            measure_from_us: AtomicU64::new(0),
            progress: Vec::new(),
        };
        let mut t = Tally::new();
        t.base = 4;
        let frame = |seq: u64| {
            format!(
                "{{\"type\":\"event\",\"channel\":\"room:r\",\"seq\":{seq},\"epoch\":\"e\",\
                 \"data\":{{\"t\":{},\"pad\":\"x\"}}}}",
                now_us()
            )
        };
        for seq in [5, 7, 6, 7] {
            t.on_frame(frame(seq).as_bytes(), &shared);
        }
        t.on_frame(
            b"{\"type\":\"event\",\"channel\":\"room:other\",\"seq\":9}",
            &shared,
        );
        t.on_frame(
            b"{\"type\":\"reset\",\"channel\":\"room:r\",\"seq\":0}",
            &shared,
        );
        assert!(t.has(5) && t.has(6) && t.has(7) && !t.has(8) && !t.has(4));
        assert_eq!((t.frames, t.duplicates, t.reorders, t.resets), (4, 1, 1, 1));
        assert_eq!(t.latency.len(), 3);
        assert_eq!(number_after(b"x\"seq\":42,", b"\"seq\":"), Some((42, 9)));
        assert_eq!(number_after(b"\"seq\":,", b"\"seq\":"), None);
    }
}
