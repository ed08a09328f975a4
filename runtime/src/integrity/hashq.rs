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

use std::collections::{HashMap, VecDeque};
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
}

#[derive(Default)]
struct Inner {
    per_pod: HashMap<String, PodJobs>,
    /// imacri's own opens of container files in progress (see
    /// [`super::engine::Engine::own_open`]): while there are any, readers
    /// do not wait for room, so they read and let those opens through.
    own_opens: usize,
}

#[derive(Default)]
pub(super) struct HashQueue {
    inner: Mutex<Inner>,
    /// Room in a pod's queue.
    space: Condvar,
    /// Work for lingering threads.
    work: Condvar,
}

impl HashQueue {
    /// Queues `job`, blocking while its pod has `PER_POD_QUEUE` jobs
    /// waiting. True when the caller must start a thread for the pod
    /// (counted already: the caller runs it, on a thread of its own or,
    /// failing that, its own).
    pub(super) fn push(&self, job: Job) -> bool {
        let pod = job.target.pod.clone();
        let Ok(mut q) = self.inner.lock() else {
            return false;
        };
        while q.own_opens == 0
            && q.per_pod
                .get(&pod)
                .is_some_and(|p| p.jobs.len() >= PER_POD_QUEUE)
        {
            q = match self.space.wait(q) {
                Ok(q) => q,
                Err(_) => return false,
            };
        }
        let p = q.per_pod.entry(pod).or_default();
        p.jobs.push_back(job);
        self.work.notify_all();
        if p.workers < PER_POD_WORKERS && p.workers < p.jobs.len() {
            p.workers += 1;
            return true;
        }
        false
    }

    /// A job put down after a slice: last in its pod's queue. Never waits
    /// (it held its place while hashed).
    pub(super) fn requeue(&self, job: Job) {
        if let Ok(mut q) = self.inner.lock() {
            let pod = job.target.pod.clone();
            q.per_pod.entry(pod).or_default().jobs.push_back(job);
        }
    }

    /// The pod's next job for one of its threads; None when there was none
    /// for [`LINGER`]: the thread is counted out and ends.
    pub(super) fn pop(&self, pod: &str, idle: impl Fn()) -> Option<Job> {
        let mut q = self.inner.lock().ok()?;
        let mut waited = false;
        loop {
            let p = q.per_pod.get_mut(pod)?;
            if let Some(job) = p.jobs.pop_front() {
                self.space.notify_all();
                return Some(job);
            }
            if waited {
                p.workers = p.workers.saturating_sub(1);
                if p.workers == 0 {
                    q.per_pod.remove(pod);
                }
                return None;
            }
            // Not working for the pod while idle.
            drop(q);
            idle();
            q = self.inner.lock().ok()?;
            let deadline = std::time::Instant::now() + LINGER;
            while q.per_pod.get(pod).is_some_and(|p| p.jobs.is_empty()) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                q = self.work.wait_timeout(q, left).ok()?.0;
            }
            waited = true;
        }
    }

    pub(super) fn own_opens(&self, by: isize) {
        if let Ok(mut q) = self.inner.lock() {
            q.own_opens = q.own_opens.saturating_add_signed(by);
            self.space.notify_all();
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

    #[test]
    fn pods_get_threads_of_their_own_and_bounded_queues() {
        let q = Arc::new(HashQueue::default());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let job = |pod: &str| {
            Job::new(
                Arc::new(Measured {
                    pod: pod.into(),
                    container: "c".into(),
                    mode: Mode::Measure,
                    allowlist: None,
                    charge: None,
                }),
                Box::new(Quiet(std::fs::File::open(&f).unwrap().into())),
                FileKey::of(&nix::sys::stat::stat(&f).unwrap()),
                Event::Exec,
            )
        };
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
        assert_eq!(q.pop("quiet", || ()).unwrap().target.pod, "quiet");
        // Its thread, idle, ends after lingering; the pod is forgotten.
        let t0 = std::time::Instant::now();
        assert!(q.pop("quiet", || ()).is_none());
        assert!(t0.elapsed() >= LINGER);
        assert!(q.push(job("quiet")), "a new thread for new work");
        // Room made in the flood: its source goes on.
        q.pop("flood", || ()).unwrap();
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
