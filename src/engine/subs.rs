//! A session's subscriptions with the position each has been given, and the check every live
//! delivery passes before it is written: skip what was already sent (replayed, or redelivered
//! after the Redis subscription healed), and `reset` when the channel's epoch changed under the
//! subscription. The session's task runs it for what comes through its queue, and the fan-out for
//! what it writes to an idle WebSocket itself ([`crate::engine::hub`]); the state lives beside the
//! session's queue, under the same lock, for both.

use bytes::Bytes;
use smallvec::SmallVec;

use crate::backend::Delivery;
use crate::channels::ChannelName;
use crate::event::{Epoch, Seq, reset_frame};

/// One subscription. This session has been handed every stored event with `lo < seq <= last`
/// (replayed or live), so replay serves only seqs at or below `lo` and live delivery only above `last`.
#[derive(Debug)]
pub(crate) struct Sub {
    pub(crate) epoch: Option<Epoch>,
    pub(crate) lo: Seq,
    pub(crate) last: Seq,
    pub(crate) room_presence: bool,
}

impl Sub {
    /// A subscription with no position yet (read from the backend next).
    pub(crate) fn new() -> Self {
        Sub {
            epoch: None,
            lo: 0,
            last: 0,
            room_presence: false,
        }
    }
}

/// How many subscriptions a session keeps inline, beside its queue: its own `user:` and `global`
/// and one room. A fan-out looks a delivery's subscription up in every recipient; kept in an
/// allocation of its own, that was one more cold cache line per delivery (a sixth of a node's
/// user-space samples in a `perf` profile of the two-node harness at 50k deliveries/s).
const INLINE: usize = 3;

/// A session's subscriptions, sorted by channel. Most sessions hold a handful (their own `user:` and
/// `global`, a few rooms), where a hash map's smallest table costs ~0.3 KiB per connection; binary
/// search keeps the per-delivery lookup cheap up to the 512 allowed.
#[derive(Debug, Default)]
pub(crate) struct Subs(SmallVec<[(ChannelName, Sub); INLINE]>);

/// What to do with a delivery.
#[derive(Debug)]
pub enum Verdict {
    /// Already sent (replayed) or no longer subscribed.
    Skip,
    /// Send it.
    Deliver,
    /// Send this `reset` frame, then the delivery.
    Reset(Bytes),
}

/// What the fan-out may do with a delivery it would write itself.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Live {
    /// Write it (the subscription's position has moved to it).
    Write,
    /// Already sent: drop it.
    Skip,
    /// Not for the fan-out to decide (no such subscription yet, or a `reset` is due): queue it
    /// for the session's task, which runs [`Subs::check`].
    Queue,
}

impl Subs {
    fn find(&self, ch: &ChannelName) -> Result<usize, usize> {
        // A delivery carries the hub's name, which the subscription holds too (`Hub::subscribe`):
        // in the few subscriptions most sessions have, a pointer scan finds it without reading
        // the names (std's binary search goes on comparing after a match, with other names).
        if self.0.len() <= 8
            && let Some(at) = self.0.iter().position(|(c, _)| c.same(ch))
        {
            return Ok(at);
        }
        self.0.binary_search_by(|(c, _)| c.cmp(ch))
    }

    pub(crate) fn contains_key(&self, ch: &ChannelName) -> bool {
        self.find(ch).is_ok()
    }

    pub(crate) fn get_mut(&mut self, ch: &ChannelName) -> Option<&mut Sub> {
        let at = self.find(ch).ok()?;
        Some(&mut self.0[at].1)
    }

    pub(crate) fn insert(&mut self, ch: ChannelName, sub: Sub) {
        match self.find(&ch) {
            Ok(at) => self.0[at].1 = sub,
            Err(at) => {
                if self.0.len() == self.0.capacity() && self.0.len() < 2 * INLINE {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, (ch, sub));
            }
        }
    }

    pub(crate) fn remove(&mut self, ch: &ChannelName) -> Option<Sub> {
        let at = self.find(ch).ok()?;
        Some(self.0.remove(at).1)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ChannelName, &Sub)> {
        self.0.iter().map(|(c, s)| (c, s))
    }

    /// Takes every subscription (the session is closing).
    pub(crate) fn take(&mut self) -> Vec<(ChannelName, Sub)> {
        std::mem::take(&mut self.0).into_vec()
    }

    /// The session's task's check: drop duplicates of what was sent, `reset` when the epoch changed
    /// under the subscription (the position then moves to the delivery's).
    pub(crate) fn check(&mut self, d: &Delivery) -> Verdict {
        let Some(sub) = self.get_mut(&d.channel) else {
            return Verdict::Skip;
        };
        let mut verdict = Verdict::Deliver;
        if let Some(p) = &d.position {
            match &sub.epoch {
                Some(e) if *e == p.epoch => {
                    if p.seq <= sub.last {
                        return Verdict::Skip;
                    }
                }
                _ => {
                    verdict = Verdict::Reset(reset_frame(&d.channel, &p.epoch, p.seq));
                    crate::metrics::reset_sent();
                    sub.epoch = Some(p.epoch.clone());
                }
            }
            sub.last = p.seq;
        }
        verdict
    }

    /// The fan-out's check, for a delivery it would write itself: the same decisions as
    /// [`check`](Self::check) where they need nothing but a write, and [`Live::Queue`] for the rest.
    pub(crate) fn live(&mut self, d: &Delivery) -> Live {
        let Some(sub) = self.get_mut(&d.channel) else {
            return Live::Queue;
        };
        if let Some(p) = &d.position {
            match &sub.epoch {
                Some(e) if *e == p.epoch => {
                    if p.seq <= sub.last {
                        return Live::Skip;
                    }
                    sub.last = p.seq;
                }
                _ => return Live::Queue,
            }
        }
        Live::Write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &Subs) -> Vec<String> {
        s.iter().map(|(c, _)| c.to_string()).collect()
    }

    #[test]
    fn subscriptions_past_the_inline_ones_stay_sorted_and_found() {
        let mut s = Subs::default();
        let all = [
            "room:e", "user:u", "global", "room:a", "room:c", "room:b", "room:d",
        ];
        for (i, n) in all.iter().enumerate() {
            let mut sub = Sub::new();
            sub.last = i as Seq;
            s.insert(ChannelName::parse(n).unwrap(), sub);
        }
        let mut sorted: Vec<String> = all.iter().map(|n| n.to_string()).collect();
        sorted.sort();
        assert_eq!(names(&s), sorted);
        for (i, n) in all.iter().enumerate() {
            // Found by name (another allocation of it: the binary search) with its own position.
            let ch = ChannelName::parse(n).unwrap();
            assert_eq!(s.get_mut(&ch).map(|sub| sub.last), Some(i as Seq), "{n}");
        }
        // Inserting an existing name replaces its position without adding one.
        s.insert(ChannelName::parse("room:a").unwrap(), Sub::new());
        assert_eq!(s.len(), all.len());
        assert_eq!(
            s.get_mut(&ChannelName::parse("room:a").unwrap())
                .map(|sub| sub.last),
            Some(0)
        );
        assert!(s.remove(&ChannelName::parse("room:c").unwrap()).is_some());
        assert!(s.remove(&ChannelName::parse("room:c").unwrap()).is_none());
        assert!(!s.contains_key(&ChannelName::parse("room:c").unwrap()));
        let taken = s.take();
        assert_eq!(taken.len(), all.len() - 1);
        assert_eq!(s.len(), 0);
    }
}
