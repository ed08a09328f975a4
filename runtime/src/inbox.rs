//! A lock-free queue of many producers and one consumer that takes all at
//! once, for what every pod's threads hand to one thread of imacri's own
//! (the node log's writer, the log sink): a producer stopped anywhere (a
//! thread of a pod at its CPU limit) holds up no one.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A lock-free stack that is only ever pushed to and taken whole: with no
/// single pops there is no ABA hazard (a push's compare-and-swap checks the
/// head it links to is still the head).
pub(crate) struct Inbox<T> {
    head: AtomicPtr<Node<T>>,
}

struct Node<T> {
    item: T,
    next: *mut Node<T>,
}

// SAFETY: items move between threads only through the atomic head; a node
// is owned by the stack until `take_all` takes the whole list.
unsafe impl<T: Send> Send for Inbox<T> {}
unsafe impl<T: Send> Sync for Inbox<T> {}

impl<T> Inbox<T> {
    pub(crate) fn new() -> Self {
        Inbox {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    pub(crate) fn push(&self, item: T) {
        let node = Box::into_raw(Box::new(Node {
            item,
            next: ptr::null_mut(),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the swap below publishes it.
            unsafe { (*node).next = head };
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Everything pushed so far, oldest first.
    pub(crate) fn take_all(&self) -> Vec<T> {
        let mut p = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        let mut out = Vec::new();
        while !p.is_null() {
            // SAFETY: the swap made the whole list ours; each node was
            // made by `Box::into_raw` and is freed once.
            let node = unsafe { Box::from_raw(p) };
            p = node.next;
            out.push(node.item);
        }
        out.reverse();
        out
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        self.take_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_stopped_mid_push_holds_up_no_one() {
        // What a lock would not allow: a push that has read the head and
        // not yet swapped (a caller throttled there) does not stop others.
        let inbox = Inbox::new();
        let stale = inbox.head.load(Ordering::Relaxed);
        inbox.push(1);
        inbox.push(2);
        // The "stopped" caller resumes: its swap fails and it retries.
        let node = Box::into_raw(Box::new(Node {
            item: 3,
            next: stale,
        }));
        assert!(inbox
            .head
            .compare_exchange(stale, node, Ordering::Release, Ordering::Relaxed)
            .is_err());
        // SAFETY: never published.
        drop(unsafe { Box::from_raw(node) });
        inbox.push(3);
        assert_eq!(inbox.take_all(), vec![1, 2, 3]);
        assert!(inbox.take_all().is_empty());
    }
}
