//! imacri's own opens of a pod's files (for a lease, a hash): the threads
//! doing one now, in slots a reader checks without a lock, so that it lets
//! them through at once.

use std::sync::atomic::Ordering;

/// The threads of imacri opening a container's file now, in slots a
/// reader checks without a lock.
pub(super) struct OwnOpeners {
    slots: [std::sync::atomic::AtomicI32; OWN_OPENER_SLOTS],
}

/// More than this many own opens at once wait for a slot.
const OWN_OPENER_SLOTS: usize = 64;

impl Default for OwnOpeners {
    fn default() -> Self {
        OwnOpeners {
            slots: std::array::from_fn(|_| std::sync::atomic::AtomicI32::new(0)),
        }
    }
}

impl OwnOpeners {
    /// Takes a free slot for `tid` (waiting for one if all are taken).
    pub(super) fn enter(&self, tid: i32) -> usize {
        loop {
            for (i, s) in self.slots.iter().enumerate() {
                if s.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return i;
                }
            }
            std::thread::yield_now();
        }
    }

    pub(super) fn leave(&self, slot: usize) {
        self.slots[slot].store(0, Ordering::SeqCst);
    }

    pub(super) fn contains(&self, tid: i32) -> bool {
        // 0 marks a free slot (and is what fanotify reports for a pid it
        // cannot name): never one of ours.
        tid > 0 && self.slots.iter().any(|s| s.load(Ordering::SeqCst) == tid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn own_openers_are_found_until_they_leave_and_wait_for_a_slot() {
        let o = Arc::new(OwnOpeners::default());
        let slots: Vec<usize> = (1..=OWN_OPENER_SLOTS as i32).map(|t| o.enter(t)).collect();
        assert!(o.contains(7) && !o.contains(OWN_OPENER_SLOTS as i32 + 1));
        // All taken: the next waits until one leaves.
        let o2 = o.clone();
        let late = std::thread::spawn(move || o2.enter(1000));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!o.contains(1000));
        o.leave(slots[6]);
        let s = late.join().unwrap();
        assert_eq!(s, slots[6]);
        assert!(o.contains(1000) && !o.contains(7));
        o.leave(s);
        assert!(!o.contains(1000) && !o.contains(0));
    }
}
