//! Room presence (`presence.update`) coalesced per room: the first change in a quiet room goes out at
//! once, as one user's frame; the changes that follow within `room_interval` wait for the interval to
//! end and go out together, one frame per kind of change naming many users (at most
//! `room_batch_max`, the rest counted in `more`). A join storm of N users in a room so costs each
//! subscriber a few frames per interval rather than N, and N² frames in all become ~N per interval.
//!
//! Each node coalesces the changes of its own sessions; the frames cross nodes like any other.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::primitives::lock;

/// A room presence change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A session of the user subscribed to the room.
    Joined,
    /// The user's last session in the room left.
    Left,
    /// The user became present through the HTTP heartbeat.
    Online,
}

impl Change {
    /// The `change` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Joined => "joined",
            Change::Left => "left",
            Change::Online => "online",
        }
    }

    const ALL: [Change; 3] = [Change::Joined, Change::Left, Change::Online];
}

/// What to do with a change just offered.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// The room was quiet: send this change now, on its own.
    SendNow,
    /// Held for the interval's end; `Some`: nothing was waiting yet, so flush at this instant.
    Held(Option<Instant>),
}

/// What a flush sends: one group per kind of change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// `(change, users listed, how many more were not listed)`.
    pub groups: Vec<(Change, Vec<String>, usize)>,
}

impl Batch {
    /// The single change of a batch of one, which goes out in the one-user form.
    pub fn single(&self) -> Option<(Change, &str)> {
        match self.groups.as_slice() {
            [(c, users, 0)] if users.len() == 1 => Some((*c, users[0].as_str())),
            _ => None,
        }
    }
}

struct Window {
    /// Changes arriving before this are held.
    until: Instant,
    /// Held changes, oldest first (a user may appear more than once: the last one counts).
    held: Vec<(String, Change)>,
    /// A flush is scheduled.
    scheduled: bool,
}

/// The per-room windows of one node.
#[derive(Default)]
pub struct Coalescer {
    rooms: Mutex<HashMap<Box<str>, Window>>,
}

impl Coalescer {
    /// Offers `user`'s `change` in `room` at `now`.
    pub fn offer(
        &self,
        room: &str,
        user: &str,
        change: Change,
        now: Instant,
        interval: Duration,
    ) -> Offer {
        let mut rooms = lock(&self.rooms);
        match rooms.get_mut(room) {
            Some(w) if now < w.until || w.scheduled => {
                w.held.push((user.to_string(), change));
                if w.scheduled {
                    Offer::Held(None)
                } else {
                    w.scheduled = true;
                    Offer::Held(Some(w.until))
                }
            }
            _ => {
                rooms.insert(
                    room.into(),
                    Window {
                        until: now + interval,
                        held: Vec::new(),
                        scheduled: false,
                    },
                );
                Offer::SendNow
            }
        }
    }

    /// Takes what `room` held, at its scheduled flush (`now`): the batch to send, and the window
    /// goes on for another `interval` (changes in it are held for the next flush). `None`: nothing
    /// was held.
    pub fn flush(&self, room: &str, now: Instant, interval: Duration, max: usize) -> Option<Batch> {
        let mut rooms = lock(&self.rooms);
        let w = rooms.get_mut(room)?;
        w.scheduled = false;
        w.until = now + interval;
        let held = std::mem::take(&mut w.held);
        (!held.is_empty()).then(|| batch(held, max))
    }

    /// Forgets windows that ended with nothing held (called once per heartbeat).
    pub fn sweep(&self, now: Instant) {
        lock(&self.rooms).retain(|_, w| w.scheduled || now < w.until);
    }

    /// Rooms with an open window.
    pub fn len(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// No open window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Each user's last change, grouped by change, oldest first, at most `max` users named per group.
fn batch(held: Vec<(String, Change)>, max: usize) -> Batch {
    let mut seen = HashSet::with_capacity(held.len());
    let mut last: Vec<(String, Change)> = held
        .into_iter()
        .rev()
        .filter(|(u, _)| seen.insert(u.clone()))
        .collect();
    last.reverse();
    let mut out = Batch::default();
    for c in Change::ALL {
        let mut users = Vec::new();
        let mut more = 0;
        for (u, _) in last.iter().filter(|(_, k)| *k == c) {
            if users.len() < max {
                users.push(u.clone());
            } else {
                more += 1;
            }
        }
        if !users.is_empty() || more > 0 {
            out.groups.push((c, users, more));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(100);

    #[test]
    fn first_change_goes_at_once_later_ones_wait_for_the_interval() {
        let c = Coalescer::default();
        let t = Instant::now();
        assert_eq!(c.offer("r", "a", Change::Joined, t, I), Offer::SendNow);
        assert_eq!(
            c.offer("r", "b", Change::Joined, t + I / 2, I),
            Offer::Held(Some(t + I))
        );
        assert_eq!(
            c.offer("r", "c", Change::Joined, t + I / 2, I),
            Offer::Held(None)
        );
        // Another room is independent.
        assert_eq!(c.offer("s", "a", Change::Joined, t, I), Offer::SendNow);
        let b = c.flush("r", t + I, I, 100).unwrap();
        assert_eq!(
            b.groups,
            vec![(Change::Joined, vec!["b".into(), "c".into()], 0)]
        );
        // The window goes on after a flush: a storm gets one frame per interval.
        assert_eq!(
            c.offer("r", "d", Change::Joined, t + I + I / 2, I),
            Offer::Held(Some(t + I * 2))
        );
        assert_eq!(
            c.flush("r", t + I * 2, I, 100).unwrap().single(),
            Some((Change::Joined, "d"))
        );
        // Quiet for a whole interval: the next change goes at once again.
        assert_eq!(c.flush("r", t + I * 3, I, 100), None);
        assert_eq!(
            c.offer("r", "e", Change::Left, t + I * 4, I),
            Offer::SendNow
        );
    }

    #[test]
    fn a_user_counts_once_with_the_last_change_and_lists_are_capped() {
        let c = Coalescer::default();
        let t = Instant::now();
        c.offer("r", "x", Change::Joined, t, I);
        for u in ["a", "b", "c", "d", "a"] {
            c.offer("r", u, Change::Joined, t, I);
        }
        c.offer("r", "b", Change::Left, t, I);
        let b = c.flush("r", t + I, I, 2).unwrap();
        assert_eq!(
            b.groups,
            vec![
                (Change::Joined, vec!["c".into(), "d".into()], 1),
                (Change::Left, vec!["b".into()], 0),
            ]
        );
        assert_eq!(b.single(), None);
    }

    #[test]
    fn sweep_forgets_ended_windows_only() {
        let c = Coalescer::default();
        let t = Instant::now();
        c.offer("r", "a", Change::Joined, t, I);
        c.offer("s", "a", Change::Joined, t, I);
        c.offer("s", "b", Change::Joined, t, I);
        c.sweep(t + I * 2);
        // `r` ended quiet; `s` has a flush pending.
        assert_eq!(c.len(), 1);
        c.flush("s", t + I * 2, I, 10);
        c.sweep(t + I * 4);
        assert!(c.is_empty());
    }
}
