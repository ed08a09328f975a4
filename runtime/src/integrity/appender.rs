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

use crate::inbox::Inbox;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};

/// Why a submitted item was not committed: the commit of its batch failed
/// (every caller of the batch gets the same error), or the writer is gone.
#[derive(Debug, thiserror::Error)]
pub enum AppendError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Commit(Arc<E>),
    #[error("the writer is gone")]
    Gone,
}

/// Where a caller waits for its request's outcome.
struct Reply<E> {
    outcome: OnceLock<Result<(), Arc<E>>>,
    caller: Thread,
}

struct Request<T, E> {
    item: T,
    reply: Arc<Reply<E>>,
}

/// The writer: `submit` returns once the item is committed.
pub(super) struct Appender<T: Send + 'static, E: std::error::Error + Send + Sync + 'static> {
    inbox: Arc<Inbox<Request<T, E>>>,
    closing: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static, E: std::error::Error + Send + Sync + 'static> Appender<T, E> {
    /// Starts the writer thread; `commit` writes a batch in order and makes
    /// it durable (an error fails the whole batch).
    pub(super) fn spawn(
        name: &str,
        mut commit: impl FnMut(&[T]) -> Result<(), E> + Send + 'static,
    ) -> std::io::Result<Self> {
        let inbox: Arc<Inbox<Request<T, E>>> = Arc::new(Inbox::new());
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
                    let (items, replies): (Vec<T>, Vec<Arc<Reply<E>>>) =
                        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
                    let outcome = commit(&items).map_err(Arc::new);
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
    pub(super) fn submit(&self, item: T) -> Result<(), AppendError<E>> {
        let Some(worker) = &self.worker else {
            return Err(AppendError::Gone);
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
                return r.clone().map_err(AppendError::Commit);
            }
            // Spurious wake-ups (another unpark of this thread) loop.
            std::thread::park();
        }
    }
}

impl<T: Send + 'static, E: std::error::Error + Send + Sync + 'static> Drop for Appender<T, E> {
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
                Ok::<(), std::io::Error>(())
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
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        })
        .unwrap();
        match a.submit(1) {
            Err(AppendError::Commit(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("{other:?}"),
        }
        fail.store(false, Ordering::Relaxed);
        assert!(a.submit(2).is_ok());
    }
}
