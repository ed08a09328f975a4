//! One writer for a resource every pod's threads write to (the node's
//! measurement log), which never waits on a pod.
//!
//! A thread working for a pod runs in the pod's CPU cgroup
//! ([`super::charge`]) and is stopped wherever it is when the pod reaches
//! its limit, for the rest of the period (90 ms of every 100 at a tenth of
//! a core). Held then, a lock every pod's threads take stalls them all: a
//! bystander pod's new executions waited 95 ms next to a pod at its limit
//! that logged a read in a loop (its reader had been throttled on the way
//! back from the log's `write`, holding the log's lock). So callers take
//! no lock here: a request goes on a lock-free stack (a compare-and-swap;
//! a caller stopped at any point holds up no one else), and one thread of
//! imacri's own, never in a pod's cgroup, takes every request waiting,
//! commits them in order with one `fdatasync`, and wakes each caller
//! (`unpark`, no lock either).

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};

/// A lock-free stack that is only ever pushed to and taken whole: with no
/// single pops there is no ABA hazard (a push's compare-and-swap checks the
/// head it links to is still the head).
struct Inbox<T> {
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
    fn new() -> Self {
        Inbox {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    fn push(&self, item: T) {
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
    fn take_all(&self) -> Vec<T> {
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

/// Where a caller waits for its request's outcome.
struct Reply {
    outcome: OnceLock<Result<(), String>>,
    caller: Thread,
}

struct Request<T> {
    item: T,
    reply: Arc<Reply>,
}

/// The writer: `submit` returns once the item is committed.
pub(super) struct Appender<T: Send + 'static> {
    inbox: Arc<Inbox<Request<T>>>,
    closing: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Appender<T> {
    /// Starts the writer thread; `commit` writes a batch in order and makes
    /// it durable (an error fails the whole batch).
    pub(super) fn spawn(
        name: &str,
        mut commit: impl FnMut(&[T]) -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Self> {
        let inbox: Arc<Inbox<Request<T>>> = Arc::new(Inbox::new());
        let closing = Arc::new(AtomicBool::new(false));
        let (i, c) = (inbox.clone(), closing.clone());
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // It serves every pod: never in one's cgroup.
                super::charge::home();
                loop {
                    let batch = i.take_all();
                    if batch.is_empty() {
                        if c.load(Ordering::Acquire) {
                            return;
                        }
                        std::thread::park();
                        continue;
                    }
                    let (items, replies): (Vec<T>, Vec<Arc<Reply>>) =
                        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
                    let outcome = commit(&items);
                    for r in replies {
                        let _ = r.outcome.set(outcome.clone());
                        r.caller.unpark();
                    }
                }
            })?;
        Ok(Appender {
            inbox,
            closing,
            worker: Some(worker),
        })
    }

    /// Queues `item` and waits until it is committed.
    pub(super) fn submit(&self, item: T) -> Result<(), String> {
        let Some(worker) = &self.worker else {
            return Err("the writer is gone".into());
        };
        let reply = Arc::new(Reply {
            outcome: OnceLock::new(),
            caller: std::thread::current(),
        });
        self.inbox.push(Request {
            item,
            reply: reply.clone(),
        });
        worker.thread().unpark();
        loop {
            if let Some(r) = reply.outcome.get() {
                return r.clone();
            }
            // Spurious wake-ups (another unpark of this thread) loop.
            std::thread::park();
        }
    }
}

impl<T: Send + 'static> Drop for Appender<T> {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        if let Some(w) = self.worker.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn concurrent_submits_all_land_in_each_callers_order_in_few_commits() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (l, c) = (log.clone(), commits.clone());
        let a = Arc::new(
            Appender::spawn("test-appender", move |b: &[(u8, u32)]| {
                c.fetch_add(1, Ordering::Relaxed);
                // A commit takes a while (an fdatasync): others pile up.
                std::thread::sleep(std::time::Duration::from_micros(200));
                l.lock().unwrap().extend_from_slice(b);
                Ok(())
            })
            .unwrap(),
        );
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        a.submit((t, i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1600);
        for t in 0..8u8 {
            let mine: Vec<u32> = log.iter().filter(|x| x.0 == t).map(|x| x.1).collect();
            assert_eq!(mine, (0..200).collect::<Vec<_>>());
        }
        // Batched: far fewer commits than items.
        assert!(commits.load(Ordering::Relaxed) < 1600);
    }

    #[test]
    fn a_failed_commit_fails_its_callers_and_the_next_one_goes_on() {
        let fail = Arc::new(AtomicBool::new(true));
        let f = fail.clone();
        let a = Appender::spawn("test-appender", move |_: &[u8]| {
            if f.load(Ordering::Relaxed) {
                Err("disk full".to_string())
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(a.submit(1), Err("disk full".to_string()));
        fail.store(false, Ordering::Relaxed);
        assert_eq!(a.submit(2), Ok(()));
    }

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
