//! The accesses waiting to be hashed, per pod, and the threads hashing
//! them.
//!
//! Each pod's files are hashed on threads of its own (up to
//! [`PER_POD_WORKERS`], started when it has work and gone when it has none)
//! that join the pod's CPU cgroups ([`super::charge`]) while they work: a
//! pod's hashing counts against its CPU limit, as kernel IMA's hashing in
//! the executing task does, and a pod that executes huge files, or is
//! throttled, holds up only itself. A thread reads a slice of a file at a
//! time and puts the job back last in its pod's queue, so one huge file
//! does not hold up the pod's other accesses either.
//!
//! Each pod's queue is bounded: a pod with [`PER_POD_QUEUE`] accesses
//! waiting blocks its own event sources (each container has its own),
//! never another pod's, and never holds more than that many of imacri's
//! fds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::digest::{FileKey, Hashing};
use super::engine::{Measured, Pending};
use super::log::Event;

/// Accesses of one pod waiting for hashing before its sources block.
pub const PER_POD_QUEUE: usize = 32;

/// Threads hashing one pod's files at once (a pod starting several
/// containers hashes their first programs side by side).
pub const PER_POD_WORKERS: usize = 2;

/// How long a pod's idle hashing thread waits for more of its pod's work
/// before it ends (a container's start hashes a few files one after the
/// other: one thread for the lot).
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// How long the end of a pod's measuring waits for its hashing threads to
/// leave (a thread mid-slice of a file for a gone container drops it
/// after the slice).
const GONE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) struct Job {
    pub(super) target: Arc<Measured>,
    pub(super) pending: Box<dyn Pending>,
    pub(super) key: FileKey,
    pub(super) kind: Event,
    /// The digest so far: the next slice goes on with it.
    pub(super) hashing: Hashing,
    /// Whole hashes finished (a file that changed meanwhile is hashed again).
    pub(super) tries: usize,
}

impl Job {
    pub(super) fn new(
        target: Arc<Measured>,
        pending: Box<dyn Pending>,
        key: FileKey,
        kind: Event,
    ) -> Job {
        Job {
            target,
            pending,
            key,
            kind,
            hashing: Hashing::default(),
            tries: 0,
        }
    }
}

#[derive(Default)]
struct PodJobs {
    jobs: VecDeque<Job>,
    /// Threads working for the pod (hashing, or lingering for more).
    workers: usize,
    /// Taken out of the map (no work, no thread): a source that found it
    /// just before looks it up again.
    retired: bool,
    /// No container of the pod is measured any more: its threads linger
    /// no longer.
    gone: bool,
}

/// One pod's queue, behind a lock of its own: only the pod's own threads
/// (its readers, its hashing threads, all in its CPU cgroup) take it, so
/// a pod throttled while one of them held it stalls only itself. (One
/// lock for every pod's queue made a bystander's new executions wait out
/// a throttled pod's period.)
#[derive(Default)]
struct PodQueue {
    jobs: Mutex<PodJobs>,
    /// Room in the queue.
    space: Condvar,
    /// Work for lingering threads.
    work: Condvar,
    /// A thread counted out.
    ended: Condvar,
}

/// How often a source waiting for room looks at imacri's own opens (set
/// without the pod's lock, which imacri's own threads never take).
const OWN_OPEN_RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Default)]
pub(super) struct HashQueue {
    /// Each pod's queue: found without a lock (every pod's sources look
    /// theirs up).
    pods: papaya::HashMap<String, Arc<PodQueue>>,
    /// imacri's own opens of container files in progress (see
    /// [`super::engine::Engine::own_open`]): while there are any, readers
    /// do not wait for room, so they read and let those opens through.
    own_opens: AtomicUsize,
}

impl HashQueue {
    fn queue_of(&self, pod: &str) -> Arc<PodQueue> {
        self.pods
            .pin()
            .get_or_insert_with(pod.to_string(), Default::default)
            .clone()
    }

    /// Queues `job`, blocking while its pod has `PER_POD_QUEUE` jobs
    /// waiting. True when the caller must start a thread for the pod
    /// (counted already: the caller runs it, on a thread of its own or,
    /// failing that, its own).
    pub(super) fn push(&self, job: Job) -> bool {
        loop {
            let pq = self.queue_of(&job.target.pod);
            let Ok(mut q) = pq.jobs.lock() else {
                return false;
            };
            if q.retired {
                continue;
            }
            while self.own_opens.load(Ordering::SeqCst) == 0 && q.jobs.len() >= PER_POD_QUEUE {
                q = match pq.space.wait_timeout(q, OWN_OPEN_RECHECK) {
                    Ok((q, _)) => q,
                    Err(_) => return false,
                };
            }
            q.jobs.push_back(job);
            q.gone = false;
            pq.work.notify_all();
            if q.workers < PER_POD_WORKERS && q.workers < q.jobs.len() {
                q.workers += 1;
                return true;
            }
            return false;
        }
    }

    /// A job put down after a slice: last in its pod's queue. Never waits
    /// (it held its place while hashed; its thread keeps the queue).
    pub(super) fn requeue(&self, job: Job) {
        let pq = self.queue_of(&job.target.pod);
        let Ok(mut q) = pq.jobs.lock() else {
            return;
        };
        q.jobs.push_back(job);
    }

    /// The pod's next job for one of its threads; None when there was none
    /// for [`LINGER`] (or its pod is gone): the thread is counted out and
    /// ends. `idle` runs before it waits, `leaving` before it is counted
    /// out (both without the pod's lock).
    pub(super) fn pop(&self, pod: &str, idle: impl Fn(), leaving: impl Fn()) -> Option<Job> {
        let pq = self.pods.pin().get(pod)?.clone();
        let mut q = pq.jobs.lock().ok()?;
        let (mut waited, mut left) = (false, false);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                pq.space.notify_all();
                return Some(job);
            }
            if waited && !left {
                drop(q);
                leaving();
                left = true;
                // A job that came meanwhile is still this thread's.
                q = pq.jobs.lock().ok()?;
                continue;
            }
            if waited {
                q.workers = q.workers.saturating_sub(1);
                if q.workers == 0 {
                    // Out of the map before the lock is let go: a source
                    // that finds it retired finds it gone.
                    q.retired = true;
                    let _ = self.pods.pin().remove_if(pod, |_, v| Arc::ptr_eq(v, &pq));
                }
                pq.ended.notify_all();
                return None;
            }
            drop(q);
            idle();
            q = pq.jobs.lock().ok()?;
            let deadline = std::time::Instant::now() + LINGER;
            while q.jobs.is_empty() && !q.gone {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                q = pq.work.wait_timeout(q, left).ok()?.0;
            }
            waited = true;
        }
    }

    /// `pod` has no measured container left: its idle threads end, and
    /// this waits (up to [`GONE_WAIT`]) until they have left (kubelet
    /// kills whatever it finds in a removed pod's cgroups).
    pub(super) fn pod_gone(&self, pod: &str) {
        let Some(pq) = self.pods.pin().get(pod).cloned() else {
            return;
        };
        let Ok(mut q) = pq.jobs.lock() else { return };
        q.gone = true;
        pq.work.notify_all();
        let deadline = std::time::Instant::now() + GONE_WAIT;
        while q.workers > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::debug!(pod_sandbox_id = %pod, "a hashing thread of a gone pod still works; it ends by itself");
                return;
            }
            q = match pq.ended.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(_) => return,
            };
        }
    }

    pub(super) fn own_opens(&self, by: isize) {
        if by >= 0 {
            self.own_opens
                .fetch_add(by.unsigned_abs(), Ordering::SeqCst);
        } else {
            self.own_opens
                .fetch_sub(by.unsigned_abs(), Ordering::SeqCst);
        }
        // Without the pods' locks (a throttled pod's must not hold up
        // imacri's own open): a waiter that misses this looks again within
        // OWN_OPEN_RECHECK.
        for (_, pq) in self.pods.pin().iter() {
            pq.space.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::policy::Mode;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    struct Quiet(OwnedFd);

    impl Pending for Quiet {
        fn fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }
        fn answer(self: Box<Self>, _: bool) {}
    }

    /// A job of `pod`'s for the file `f`.
    fn job(pod: &str, f: &std::path::Path) -> Job {
        Job::new(
            Arc::new(Measured {
                pod: pod.into(),
                container: "c".into(),
                mode: Mode::Measure,
                allowlist: None,
                charge: None,
                quiet: Default::default(),
                no_anonymous_exec: false,
            }),
            Box::new(Quiet(std::fs::File::open(f).unwrap().into())),
            FileKey::of(&nix::sys::stat::stat(f).unwrap()),
            Event::Exec,
        )
    }

    /// A pod no longer measured: its lingering thread ends at once, and
    /// the end of the pod's measuring returns once the thread has left
    /// its cgroups (its `leaving` ran), not a linger later.
    #[test]
    fn a_gone_pods_threads_leave_before_it_is_forgotten() {
        use std::sync::atomic::AtomicBool;
        let q = Arc::new(HashQueue::default());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(q.push(job("p", &f)));
        let left = Arc::new(AtomicBool::new(false));
        let (q2, l2) = (q.clone(), left.clone());
        let worker = std::thread::spawn(move || {
            let mut jobs = 0;
            let leaving = || {
                // A move out of a pod's cgroups may wait a grace period.
                std::thread::sleep(std::time::Duration::from_millis(30));
                l2.store(true, Ordering::SeqCst);
            };
            while q2.pop("p", || (), leaving).is_some() {
                jobs += 1;
            }
            jobs
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let t0 = std::time::Instant::now();
        q.pod_gone("p");
        assert!(
            left.load(Ordering::SeqCst),
            "returned before the thread left"
        );
        assert!(
            t0.elapsed() < LINGER,
            "{:?}: waited out the linger",
            t0.elapsed()
        );
        assert_eq!(worker.join().unwrap(), 1);
        // A pod never seen, or gone already: nothing to wait for.
        q.pod_gone("p");
        q.pod_gone("never");
    }

    #[test]
    fn pods_get_threads_of_their_own_and_bounded_queues() {
        let q = Arc::new(HashQueue::default());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let job = |pod: &str| job(pod, &f);
        // A pod's first jobs ask for threads, up to PER_POD_WORKERS.
        let started: Vec<bool> = (0..PER_POD_QUEUE).map(|_| q.push(job("flood"))).collect();
        assert_eq!(started.iter().filter(|s| **s).count(), PER_POD_WORKERS);
        // The flooding pod's next access waits for space...
        let q2 = q.clone();
        let extra = job("flood");
        let blocked = std::thread::spawn(move || q2.push(extra));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !blocked.is_finished(),
            "a full pod queue must block its source"
        );
        // ...while another pod's first access gets a thread of its own at
        // once.
        assert!(q.push(job("quiet")));
        assert_eq!(q.pop("quiet", || (), || ()).unwrap().target.pod, "quiet");
        // Its thread, idle, ends after lingering; the pod is forgotten.
        let t0 = std::time::Instant::now();
        assert!(q.pop("quiet", || (), || ()).is_none());
        assert!(t0.elapsed() >= LINGER);
        assert!(q.push(job("quiet")), "a new thread for new work");
        // Room made in the flood: its source goes on.
        q.pop("flood", || (), || ()).unwrap();
        assert!(!blocked.join().unwrap(), "two threads work already");
        // Full again: an own open of imacri's (the hashing threads that
        // would make room may be the ones opening) lets the source on.
        let q2 = q.clone();
        let extra = job("flood");
        let waiting = std::thread::spawn(move || q2.push(extra));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiting.is_finished());
        q.own_opens(1);
        waiting.join().unwrap();
        q.own_opens(-1);
    }
}
