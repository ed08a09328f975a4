//! Warnings a pod can cause as fast as it makes system calls (a mapping
//! call with a bad fd, a flood of accesses imacri cannot watch) are held to
//! [`PER_SECOND`] per container; the next one said carries how many were
//! not (`unsaid`). Lock-free: taken by threads working in a pod's cgroup.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Warnings of one container said per second.
pub const PER_SECOND: u32 = 10;

/// One container's warning budget.
#[derive(Debug, Default)]
pub struct Quiet {
    /// The second (since imacri started) the count is of.
    second: AtomicU64,
    said: AtomicU32,
    unsaid: AtomicU64,
}

impl Quiet {
    /// Some(warnings left unsaid before this one) when this one is said.
    pub fn take(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        self.take_at(START.get_or_init(Instant::now).elapsed().as_secs() + 1)
    }

    fn take_at(&self, now: u64) -> Option<u64> {
        let s = self.second.load(Ordering::Acquire);
        // One thread opens the new second; a racing one counts in it.
        if s != now
            && self
                .second
                .compare_exchange(s, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.said.store(0, Ordering::Release);
        }
        if self.said.fetch_add(1, Ordering::AcqRel) < PER_SECOND {
            Some(self.unsaid.swap(0, Ordering::AcqRel))
        } else {
            self.unsaid.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_said_at_the_rate_with_what_was_left_unsaid() {
        let q = Quiet::default();
        for _ in 0..PER_SECOND {
            assert_eq!(q.take_at(1), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(q.take_at(1), None);
        }
        assert_eq!(q.take_at(2), Some(100));
        assert_eq!(q.take_at(2), Some(0));
        // Many threads at once: exactly the budget is said.
        let q = std::sync::Arc::new(Quiet::default());
        let said: u32 = (0..8)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || (0..100).filter(|_| q.take_at(7).is_some()).count())
            })
            .map(|t| t.join().unwrap() as u32)
            .sum();
        assert_eq!(said, PER_SECOND);
        assert_eq!(q.take_at(8), Some(800 - u64::from(PER_SECOND)));
    }
}
