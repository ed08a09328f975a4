//! Hashing a pod's queued accesses a slice at a time on its own threads
//! (in its CPU cgroups), and what is logged when a file cannot be measured:
//! too large, unhashable, changing while hashed (a `gap`, once per path).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::{Content, Engine, Measured, Pending, HASH_SLICE, HASH_TRIES};
use crate::integrity::charge;
use crate::integrity::digest::{fd_path, FileKey, Hashing, HASH_BUF};
use crate::integrity::elf;
use crate::integrity::hashq::{HashQueue, Job};
use crate::integrity::journal::JournalError;
use crate::integrity::log::Event;
use crate::integrity::policy::Mode;

impl Engine {
    /// A job half hashed is worth going on with while its container is
    /// measured and its caller waits.
    pub(super) fn still_wanted(&self, job: &Job) -> bool {
        let measured = self
            .targets
            .pin()
            .get(&job.target.container)
            .is_some_and(|m| Arc::ptr_eq(m, &job.target));
        measured && job.pending.wanted()
    }

    /// Hashes the next slice of a job's file: the job back if more is left,
    /// else decided and answered.
    pub(super) fn hash_slice(&self, mut job: Job, buf: &mut [u8]) -> Option<Job> {
        let t = job.target.clone();
        if job.hashing.offset() == 0 && job.key.size as u64 > self.max_file_size {
            self.too_large(&t, job.pending, job.key.size as u64);
            return None;
        }
        if job.tries == 0 && job.hashing.offset() == 0 {
            if let Some(d) = &self.hash_delay {
                let path = fd_path(job.pending.fd());
                if path.contains(d.as_str()) {
                    tracing::info!(%path, "test hook: hashing 2 s longer");
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
            }
        }
        let fd = job.pending.fd();
        let before = job.hashing.offset();
        let step = job.hashing.step(fd, buf, HASH_SLICE);
        // Counted as read (a huge file shows as it goes).
        let read = job.hashing.offset().saturating_sub(before);
        self.stats.hashed_bytes.fetch_add(read, Ordering::Relaxed);
        let (digest, _) = match step {
            // Grown past the limit while hashed.
            Ok(None) if job.hashing.offset() > self.max_file_size => {
                let n = job.hashing.offset();
                self.too_large(&t, job.pending, n);
                return None;
            }
            Ok(None) => return Some(job),
            Ok(Some(done)) => done,
            Err(e) => {
                // Not a silent allow: the unmeasured access is a gap in
                // the log (the verifier distrusts it), and enforce denies.
                // Let through (measure) only once the gap is in the log,
                // and never code where the pod's policy denies executable
                // memory no measured file backs (until 2026-12-04 such a
                // mapping ran in measure mode, a `gap` logged).
                let gap = self.unmeasured(&t, &fd_path(fd));
                let runs = matches!(job.kind, Event::Exec | Event::Mmap);
                let allow = t.mode == Mode::Measure
                    && gap != Gap::NotLogged
                    && !(runs && t.no_anonymous_exec);
                if gap == Gap::New {
                    tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, allow, "cannot hash a measured file");
                }
                job.pending.answer(allow);
                return None;
            }
        };
        self.stats.hashed_files.fetch_add(1, Ordering::Relaxed);
        job.tries += 1;
        // A writer that changed the file while it was hashed would have it
        // run under the old digest: the identity must not have moved.
        // The headers an execution needs, read before that look: then it
        // vouches for them too.
        let elf = elf::Facts::read(fd);
        match nix::sys::stat::fstat(fd.as_raw_fd()).map(|st| FileKey::of(&st)) {
            Ok(k) if k == job.key => {
                let content = Content { digest, elf };
                self.remember(job.key, content);
                self.decide(&t, job.pending, job.kind, (content, job.key), None);
                return None;
            }
            Ok(k) if job.tries < HASH_TRIES => {
                job.key = k;
                job.hashing = Hashing::default();
                return Some(job);
            }
            _ => {}
        }
        let path = fd_path(fd);
        if self.unmeasured(&t, &path) == Gap::New {
            tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, "a measured file kept changing while it was hashed; access refused");
        }
        job.pending.answer(false);
        None
    }

    /// Refuses an access of a file too large to hash: a `gap` (it ran
    /// nothing unmeasured, but the pod asked for it) and a violation.
    pub(super) fn too_large(&self, t: &Measured, pending: Box<dyn Pending>, size: u64) {
        let path = fd_path(pending.fd());
        let max = self.max_file_size;
        // Said once per path, as it is logged (a loop of refused attempts is
        // one line; past the quota, the quota entry says it); each attempt
        // is still a notice, which the server rate-limits.
        if self.unmeasured(t, &path) == Gap::New {
            tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, size, max, "a measured file is larger than ima.max_file_size: refused unhashed");
        }
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        pending.answer(false);
        let reason =
            format!("{size} bytes, larger than ima.max_file_size ({max}): not measured, refused");
        self.notice(t, path, String::new(), true, reason);
    }

    /// A `gap` for an access of the pod's that went unmeasured (held to
    /// the pod's quota, once per path: see `Journal::record_unmeasured`).
    pub(super) fn unmeasured(&self, t: &Measured, path: &str) -> Gap {
        match self.journal.record_unmeasured(&t.pod, &t.container, path) {
            Ok(Some(_)) => Gap::New,
            Ok(None) => Gap::Logged,
            // The quota entry says it; refused accesses stay refused.
            Err(JournalError::Quota { .. }) => Gap::NotLogged,
            Err(e) => {
                tracing::error!(container_id = %t.container, error = %e, "recording a gap");
                Gap::NotLogged
            }
        }
    }

    pub(super) fn gap(&self, t: &Measured, path: &str) {
        if let Err(e) = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], Event::Gap, false)
        {
            tracing::error!(container_id = %t.container, error = %e, "recording a gap");
        }
    }
}

/// Where an unmeasured access stands in the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gap {
    /// Logged now.
    New,
    /// Logged before (the same container and path).
    Logged,
    /// Not in the log (the pod's quota is used up, or the log failed).
    NotLogged,
}

/// A hashing thread of `pod`'s: its jobs a slice at a time (in the pod's
/// CPU cgroups once its uncharged budget is spent), until it has had none
/// for a while.
pub(super) fn hash_for(engine: &Weak<Engine>, queue: &HashQueue, pod: &str) {
    let mut buf = vec![0u8; HASH_BUF];
    // Idle, it settles its draw but stays where it is: a thread that went
    // home whenever its pod's queue was empty moved twice per file for a
    // busy pod, and a move after ~50 ms without one waits ~10 ms (charge.rs),
    // which each new file's execution then waited for.
    while let Some(job) = queue.pop(pod, charge::settle, charge::home) {
        let Some(engine) = engine.upgrade() else {
            break;
        };
        charge::work_for(job.target.charge.as_ref());
        match engine.hash_slice(job, &mut buf) {
            Some(job) if engine.still_wanted(&job) => queue.requeue(job),
            Some(job) => {
                job.pending.answer(false);
                engine.inflight.fetch_sub(1, Ordering::SeqCst);
            }
            None => {
                engine.inflight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    charge::home();
}
