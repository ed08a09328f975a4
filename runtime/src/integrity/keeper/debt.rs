//! What the keeper is owed: imacri's record of a keeper that may hold
//! something other than what imacri handed over (a put it did not take, a
//! drop it did not hear), and of the event numbers that must stay taken
//! until it has caught up.
//!
//! While owed, puts and drops are only recorded here (the callers are
//! measurements: none of them waits out a stalled keeper's timeouts); the
//! watch (`Keeper::supervise`) then settles everything at once: `SYNC`,
//! every fd imacri holds, `PRUNE` (the keeper lets go of what was not given
//! since the `SYNC`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
pub(super) struct Debt {
    /// Set while the keeper may lack what imacri handed over or hold what
    /// imacri let go of. The watch settles until a round finishes; the
    /// keeper's being alive says nothing about that.
    owed: AtomicBool,
    /// Puts and drops that left something owed, counted: a round clears
    /// `owed` only if none came while it ran (one that came after it read
    /// that fd's owner would otherwise be cleared with the rest).
    misses: AtomicU64,
    /// Drops the keeper did not hear, counted, and how many of them the
    /// last round that made it let go covered: a round before imacri
    /// settled gives but cannot prune, so its start's `catch_up` must run
    /// one while any is left.
    unheard: AtomicU64,
    pruned: AtomicU64,
    /// Event fds answered while the keeper may still hold them: their
    /// numbers stay taken, or a next event read under the same number
    /// would be answered, by an imacri started after a crash, with the old
    /// file's verdict. Closed once a round has made the keeper let go.
    numbers: Mutex<Vec<OwnedFd>>,
    /// Once imacri has taken back what the keeper held at its start: only
    /// then does the keeper hold nothing imacri still means to take back,
    /// so a round may make it let go of what imacri does not hold.
    settled: AtomicBool,
    /// One round at a time (each starts the keeper's record of what it
    /// was given anew).
    round: Mutex<()>,
}

/// A round under way: what it may release when it finishes.
pub(super) struct Round<'a> {
    _one: MutexGuard<'a, ()>,
    misses: u64,
    unheard: u64,
    numbers: Vec<OwnedFd>,
}

impl Debt {
    pub(super) fn owed(&self) -> bool {
        self.owed.load(Ordering::SeqCst)
    }

    /// Something was not handed over or not let go of; true if the keeper
    /// owed nothing before (the moment to say so, once).
    pub(super) fn owe(&self) -> bool {
        self.misses.fetch_add(1, Ordering::SeqCst);
        !self.owed.swap(true, Ordering::SeqCst)
    }

    /// A drop the keeper did not hear (asked or not): it may still hold
    /// the key.
    pub(super) fn owe_drop(&self) -> bool {
        self.unheard.fetch_add(1, Ordering::SeqCst);
        self.owe()
    }

    /// Whether the keeper may still hold something imacri let go of.
    pub(super) fn unheard(&self) -> bool {
        self.unheard.load(Ordering::SeqCst) != self.pruned.load(Ordering::SeqCst)
    }

    /// Keeps an answered event's fd (its number) until a round finishes.
    pub(super) fn hold_number(&self, fd: OwnedFd) {
        match self.numbers.lock() {
            Ok(mut n) => n.push(fd),
            // Poisoned: kept open for good rather than reused.
            Err(_) => std::mem::forget(fd),
        }
    }

    pub(super) fn settle(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }

    pub(super) fn settled(&self) -> bool {
        self.settled.load(Ordering::SeqCst)
    }

    /// Starts a round, waiting for one under way (`wait`) or not (None
    /// then: the one under way is made to run again, by a miss).
    pub(super) fn begin(&self, wait: bool) -> Option<Round<'_>> {
        let one = match wait {
            true => self.round.lock().ok(),
            false => self.round.try_lock().ok(),
        };
        let Some(one) = one else {
            self.owe();
            return None;
        };
        self.owed.store(true, Ordering::SeqCst);
        // Taken before anything is given: what is held after this came
        // after the round's start and may still be in the keeper after it.
        let numbers = self
            .numbers
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default();
        Some(Round {
            _one: one,
            misses: self.misses.load(Ordering::SeqCst),
            unheard: self.unheard.load(Ordering::SeqCst),
            numbers,
        })
    }

    /// The keeper answers again (its `SYNC` came back): puts and drops go
    /// to it from now on, in order with the round's own puts (both take
    /// the owner's lock).
    pub(super) fn answering(&self) {
        self.owed.store(false, Ordering::SeqCst);
    }

    /// Ends a round. `pruned`: the keeper let go of everything the round
    /// did not give, so the numbers held at its start are free. A failed
    /// round keeps them and leaves the keeper owed.
    pub(super) fn end(&self, round: Round<'_>, ok: bool, pruned: bool) {
        let Round {
            misses,
            unheard,
            numbers,
            ..
        } = round;
        if !ok || self.misses.load(Ordering::SeqCst) != misses {
            self.owed.store(true, Ordering::SeqCst);
        }
        if !(ok && pruned) {
            if let Ok(mut n) = self.numbers.lock() {
                n.extend(numbers);
                return;
            }
            std::mem::forget(numbers);
            return;
        }
        self.pruned.store(unheard, Ordering::SeqCst);
        drop(numbers);
    }

    /// How many answered events' numbers are held for the keeper.
    pub(super) fn numbers_held(&self) -> usize {
        self.numbers.lock().map(|n| n.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::Debt;
    use std::os::fd::OwnedFd;

    fn an_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A put or drop left owed while a round runs (after the round read
    /// its owner, or before the keeper answered its SYNC) leaves the keeper
    /// owed after the round, which would otherwise clear it with the rest;
    /// a round without one clears it.
    #[test]
    fn a_miss_during_a_round_outlives_it() {
        let d = Debt::default();
        assert!(d.owe());
        let r = d.begin(true).unwrap();
        assert!(d.owed(), "a round starts owed");
        d.owe();
        d.answering();
        assert!(!d.owed(), "puts go to the keeper once it answers");
        d.end(r, true, true);
        assert!(d.owed(), "the miss was cleared with the round");
        let r = d.begin(true).unwrap();
        d.answering();
        d.end(r, true, true);
        assert!(!d.owed());
    }

    /// Only numbers held when a round began are freed by it, and only by
    /// one that made the keeper let go (a failed round, or one before
    /// imacri settled or against a keeper without SYNC, frees none).
    #[test]
    fn numbers_wait_for_a_round_that_pruned_after_them() {
        let d = Debt::default();
        d.hold_number(an_fd());
        assert!(d.owe_drop());
        assert!(d.unheard());
        let r = d.begin(true).unwrap();
        // Answered after the round began: the keeper may yet take its put.
        d.hold_number(an_fd());
        d.end(r, false, false);
        assert_eq!(d.numbers_held(), 2);
        assert!(d.owed());
        let r = d.begin(true).unwrap();
        d.end(r, true, false);
        assert_eq!(d.numbers_held(), 2);
        assert!(d.unheard(), "no prune, yet the drops count as heard");
        let r = d.begin(true).unwrap();
        d.end(r, true, true);
        assert_eq!(d.numbers_held(), 0);
        assert!(!d.unheard());
    }

    /// A caller that finds a round under way does not wait for it (a
    /// measurement would wait out the keeper's timeouts) but makes it run
    /// again: what it remembered may have come after the round read it.
    #[test]
    fn a_round_under_way_is_run_again_not_waited_for() {
        let d = Debt::default();
        let r = d.begin(true).unwrap();
        d.answering();
        assert!(d.begin(false).is_none());
        d.end(r, true, true);
        assert!(d.owed());
    }
}
