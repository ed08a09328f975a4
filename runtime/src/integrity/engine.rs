//! The measurement engine both event sources feed: fanotify (executions,
//! reads) and the seccomp map guard (executable mappings). It owns the
//! digest cache, the hashing threads and the decision: appraise, record,
//! answer.
//!
//! - A cache hit (same inode, size, mtime and ctime as a file already
//!   hashed) is decided on the caller's thread in microseconds. A miss is
//!   queued for its pod's hashing threads ([`super::hashq`]), which run in
//!   the pod's CPU cgroups: one pod's big files, or its CPU limit, never
//!   hold up another pod's executions, and the pod pays for its hashing.
//! - Each pod's queue is bounded: a pod with `PER_POD_QUEUE` accesses
//!   waiting blocks only its own event sources (each container has its
//!   own), and never holds more than that many of imacri's fds.
//! - Every executable mapping checks for open writers (IMA's open-writers
//!   violation) just before it is answered: a file that can change under
//!   the digest is a `writers` entry, and refused in enforce mode. (For
//!   executions the kernel does it: ETXTBSY both ways.)
//! - An access the log cannot take (quota, I/O error) is refused: what is
//!   not recorded was not measured.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::allowlist::Allowlist;
use super::charge::{self, Charge};
use super::digest::{digest_text, fd_path, FileKey, Hashing, HASH_BUF};
pub use super::hashq::PER_POD_QUEUE;
use super::hashq::{HashQueue, Job};
use super::journal::{Journal, JournalError};
use super::log::Event;
pub use super::quiet::Quiet;
use crate::integrity::policy::Mode;

/// How often a file that changes while it is hashed is hashed again before
/// the access is refused.
const HASH_TRIES: usize = 3;

const CACHE_LIMIT: usize = 200_000;

/// How much of one file a hashing thread reads before it takes the next
/// pod's turn (10-20 ms at release speed): a pod that executes a huge file
/// holds up its own accesses, never another pod's first executions.
const HASH_SLICE: u64 = 16 << 20;

/// `ima.max_file_size`'s default: 4 GiB, past the biggest libraries real
/// images ship (GPU runtimes' are 1-2 GiB); a larger file is refused
/// unhashed.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 30;

/// One measured container: whose entries, and how they are appraised.
#[derive(Debug)]
pub struct Measured {
    pub pod: String,
    pub container: String,
    pub mode: Mode,
    pub allowlist: Option<Arc<Allowlist>>,
    /// The pod's CPU cgroups, which imacri's threads join while they work
    /// for this container (None: uncharged, see [`charge`]).
    pub charge: Option<Arc<Charge>>,
    /// The budget of warnings the container's calls can cause.
    pub quiet: Quiet,
}

/// An access waiting for its answer: the file (an fd the kernel or the
/// process gave us) and how to answer.
pub trait Pending: Send {
    fn fd(&self) -> BorrowedFd<'_>;
    fn answer(self: Box<Self>, allow: bool);
    /// Called when the access waits for hashing (not decided at once).
    fn queued(&mut self) {}
    /// Whether the caller still waits for the answer (a huge file is not
    /// hashed on for a caller that is gone).
    fn wanted(&self) -> bool {
        true
    }
}

/// Where the files a container maps executable are watched for writers
/// (its fanotify group): a mapping keeps running the page cache, so a file
/// rewritten in place under it runs what was written (IMA's ToMToU).
pub trait WriteWatch: Send + Sync {
    /// From now on, asks before the file open as `fd` is opened for writing
    /// and reports writes to it (in place before its writers are checked
    /// and the mapping exists). Ok(true) when this call placed the watch,
    /// Ok(false) when it was in place already.
    fn watch(&self, fd: BorrowedFd<'_>) -> Result<bool, String>;
    /// The mapping a watch was placed for was refused after all.
    fn unwatch(&self, fd: BorrowedFd<'_>);
    /// From now on, while a process of the pod has the executed script
    /// open as `fd` open (its interpreter), asks before it is opened for
    /// writing (in place before the execution is answered).
    fn watch_script(&self, fd: BorrowedFd<'_>) -> Result<(), String>;
}

/// A measurement the policy does not allow, for logs and CRI events.
#[derive(Debug, Clone)]
pub struct Notice {
    pub pod: String,
    pub container: String,
    pub path: String,
    pub digest: String,
    pub denied: bool,
    pub reason: String,
    /// The container's measurement stopped (its reader failed): it must be
    /// killed.
    pub stopped: bool,
}

/// Counters for status and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub cache_hits: AtomicU64,
    pub hashed_files: AtomicU64,
    pub hashed_bytes: AtomicU64,
    /// Time from a cache hit's handling to its answer (the decision).
    pub hit_ns_total: AtomicU64,
    pub denied: AtomicU64,
    pub mappings: AtomicU64,
    /// Guarded calls made while another task shared the caller's fd table
    /// or address space: its sharers were held still during the call
    /// (`heldCalls` in the status).
    pub held_calls: AtomicU64,
    /// Shared calls whose sharers could not be held: refused.
    pub unheld_calls: AtomicU64,
    /// Files mapped executable that got no read lease (a filesystem
    /// without leases, or the lease limits): their mark alone watches
    /// them, and a truncate of them is not seen (`unleasedFiles`).
    pub unleased: AtomicU64,
}

/// By inode: the identity a file was hashed at and its digest.
type DigestCache = papaya::HashMap<(u64, u64), (FileKey, [u8; 32])>;

pub struct Engine {
    journal: Arc<Journal>,
    /// Lock-free (as the maps below): every pod's threads look it up and
    /// write it, and a thread of a pod at its CPU limit is stopped
    /// wherever it is for the rest of the period; stopped holding a lock,
    /// it would stall every pod (a read-write lock only helps until a
    /// write waits behind it).
    cache: DigestCache,
    queue: Arc<HashQueue>,
    /// Itself, for the hashing threads it starts.
    me: Weak<Engine>,
    notices: tokio::sync::mpsc::UnboundedSender<Notice>,
    /// Containers measured now, by ID (the map guard finds them by the ID
    /// runc reports).
    targets: papaya::HashMap<String, Arc<Measured>>,
    /// Per container, where its executable mappings are watched for writes.
    /// Weak: a lock-free map drops what it removes only later, and a group
    /// kept open after its reader ended would hold every open of the files
    /// it marks forever (a bench's `unshare` hung on the host's libc).
    write_watches: papaya::HashMap<String, Weak<dyn WriteWatch>>,
    pub stats: Stats,
    /// Fault injection for the fail-closed tests: every reader fails after
    /// this many events (`IMACRI_TEST_FANOTIFY_FAIL_AFTER`).
    pub(super) fail_after: Option<u64>,
    /// Fault injection for the restart tests: an event for a path
    /// containing this is read and never answered, as by an imacri that
    /// died while hashing (`IMACRI_TEST_FANOTIFY_STALL`).
    pub(super) stall: Option<String>,
    /// The same for the map guard's notifications (`IMACRI_TEST_MAPGUARD_STALL`).
    pub(super) map_stall: Option<String>,
    /// Fault injection for the swap tests: the map guard waits this long
    /// between its check and its answer for calls of processes that share
    /// their tables (`IMACRI_TEST_MAPGUARD_SWAP_WINDOW`, milliseconds).
    pub(super) map_swap_window: Option<std::time::Duration>,
    /// Fault injection: the sharers of a guarded call are never held, so
    /// every shared call is refused (`IMACRI_TEST_MAPGUARD_NO_HOLD`).
    pub(super) map_no_hold: bool,
    /// Set when imacri shuts down: watches then leave their groups with the
    /// fd keeper, so the containers wait for the next imacri.
    detached: std::sync::atomic::AtomicBool,
    /// Events read from the kernel and not answered yet, plus readers that
    /// are about to read: what a graceful stop waits for (see [`drain`]).
    inflight: AtomicUsize,
    /// Test only: hashing a file whose path contains this takes 2 s longer.
    hash_delay: Option<String>,
    /// Threads of imacri opening a container's file now (own_open).
    /// Lock-free: every pod's readers look it up for each open they see.
    own_openers: OwnOpeners,
    /// Files larger than this are refused unhashed (`ima.max_file_size`).
    max_file_size: u64,
}

/// The threads of imacri opening a container's file now, in slots a
/// reader checks without a lock.
struct OwnOpeners {
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
    fn enter(&self, tid: i32) -> usize {
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

    fn leave(&self, slot: usize) {
        self.slots[slot].store(0, Ordering::SeqCst);
    }

    fn contains(&self, tid: i32) -> bool {
        // 0 marks a free slot (and is what fanotify reports for a pid it
        // cannot name): never one of ours.
        tid > 0 && self.slots.iter().any(|s| s.load(Ordering::SeqCst) == tid)
    }
}

/// A reader's claim that it may read events now (see [`Engine::reading`]).
pub struct Reading<'a>(&'a AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    /// imacri is going away (not the containers): keep what is kept, and
    /// read no more events (they wait in the kernel for the next imacri).
    pub fn detach(&self) {
        self.detached
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Taken by a reader (fanotify or map guard) before it reads events
    /// and held until it has answered or queued them; `None` once imacri is
    /// going away. Counting first and checking after means a stop that saw
    /// no reader at work can never be followed by a read.
    pub fn reading(&self) -> Option<Reading<'_>> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let r = Reading(&self.inflight);
        (!self.detached()).then_some(r)
    }

    /// After [`detach`]: waits (up to `limit`) until every event read so
    /// far is answered, so a graceful stop (an upgrade, `systemctl
    /// restart`) does not refuse the executions in flight as a crash must.
    /// Returns how many were still unanswered at the limit.
    pub fn drain(&self, limit: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let n = self.inflight.load(Ordering::SeqCst);
            if n == 0 || std::time::Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub fn detached(&self) -> bool {
        self.detached.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn new(
        journal: Arc<Journal>,
        notices: tokio::sync::mpsc::UnboundedSender<Notice>,
        max_file_size: u64,
    ) -> Arc<Engine> {
        Arc::new_cyclic(|me| Engine {
            journal,
            cache: papaya::HashMap::new(),
            queue: Arc::new(HashQueue::default()),
            me: me.clone(),
            notices,
            targets: papaya::HashMap::new(),
            write_watches: papaya::HashMap::new(),
            stats: Stats::default(),
            fail_after: std::env::var("IMACRI_TEST_FANOTIFY_FAIL_AFTER")
                .ok()
                .and_then(|v| v.parse().ok()),
            stall: std::env::var("IMACRI_TEST_FANOTIFY_STALL").ok(),
            map_stall: std::env::var("IMACRI_TEST_MAPGUARD_STALL").ok(),
            map_swap_window: std::env::var("IMACRI_TEST_MAPGUARD_SWAP_WINDOW")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
            map_no_hold: std::env::var_os("IMACRI_TEST_MAPGUARD_NO_HOLD").is_some(),
            detached: Default::default(),
            inflight: AtomicUsize::new(0),
            hash_delay: std::env::var("IMACRI_TEST_HASH_DELAY").ok(),
            own_openers: OwnOpeners::default(),
            max_file_size,
        })
    }

    /// Queues a job, starting a hashing thread for its pod if it needs one
    /// (hashing on the caller's thread if none can be started).
    fn enqueue(&self, job: Job) {
        let pod = job.target.pod.clone();
        if !self.queue.push(job) {
            return;
        }
        let (me, queue, p) = (self.me.clone(), self.queue.clone(), pod.clone());
        let started = std::thread::Builder::new()
            .name("imacri-hash".into())
            .stack_size(256 * 1024)
            .spawn(move || hash_for(&me, &queue, &p));
        if let Err(e) = started {
            tracing::warn!(pod_sandbox_id = %pod, error = %e, "cannot start a hashing thread: hashing on the event's thread");
            hash_for(&self.me, &self.queue, &pod);
        }
    }

    /// Runs `open`, an open by imacri itself of a file some group watches
    /// (a lease needs an open file of our own): every reader lets it
    /// through at once, and readers waiting for room in a pod's queue stop
    /// waiting, since the hashing threads that make room may be the ones
    /// opening (a reader waiting on them while they wait on it would never
    /// wake).
    pub(super) fn own_open<T>(&self, open: impl FnOnce() -> T) -> T {
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let slot = self.own_openers.enter(tid);
        self.queue.own_opens(1);
        let r = open();
        self.queue.own_opens(-1);
        self.own_openers.leave(slot);
        r
    }

    /// Whether thread `tid` is imacri's own, opening in [`own_open`].
    pub(super) fn is_own_open(&self, tid: i32) -> bool {
        self.own_openers.contains(tid)
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Makes a container findable by ID while it is measured.
    pub fn register(&self, m: Arc<Measured>) {
        self.targets.pin().insert(m.container.clone(), m);
    }

    pub fn unregister(&self, container: &str) {
        self.targets.pin().remove(container);
        self.write_watches.pin().remove(container);
    }

    /// Where `container`'s executable mappings are watched for writes.
    pub fn set_write_watch(&self, container: &str, w: Arc<dyn WriteWatch>) {
        self.write_watches
            .pin()
            .insert(container.to_string(), Arc::downgrade(&w));
    }

    fn write_watch(&self, t: &Measured) -> Option<Arc<dyn WriteWatch>> {
        self.write_watches
            .pin()
            .get(&t.container)
            .and_then(Weak::upgrade)
    }

    /// A file `t` mapped executable is being opened for writing; the
    /// opener waits for the answer. Under `enforce` it is refused (a `deny`
    /// entry: the attempt is an alert, and the file keeps what was
    /// measured); otherwise let through as a `tomtou` violation, written to
    /// the log before the opener can write. Unrecorded: refused.
    /// `what` the file is (mapped executable, a script being read).
    pub fn write_open(&self, t: &Measured, path: &str, what: &str) -> bool {
        let enforce = t.mode == Mode::Enforce;
        let (event, reason) = if enforce {
            (
                Event::Deny,
                format!("opened for writing while {what}: refused"),
            )
        } else {
            (
                Event::Tomtou,
                format!("{what}, then opened for writing while the container ran"),
            )
        };
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, %reason, "ima violation: a watched file opened for writing");
        let r = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], event, true);
        let allow = !enforce && r.is_ok();
        if !allow {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        self.notice(t, path.to_string(), String::new(), !allow, reason);
        allow
    }

    /// A file `t` mapped executable was written since, by a writer no
    /// check saw open: a `tomtou` entry (a violation) and, under `enforce`,
    /// the container is killed, since a mapping may now run what no policy
    /// allowed.
    pub fn tomtou(&self, t: &Measured, path: &str, what: &str, how: &str) {
        let reason = format!("{what}, then {how} while the container ran");
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, %reason, "ima violation: tomtou");
        let r = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], Event::Tomtou, true);
        if t.mode == Mode::Enforce || r.is_err() {
            let _ = self.notices.send(Notice {
                pod: t.pod.clone(),
                container: t.container.clone(),
                path: path.to_string(),
                digest: String::new(),
                denied: true,
                reason: format!("{reason}: {path}"),
                stopped: true,
            });
        } else {
            self.notice(t, path.to_string(), String::new(), false, reason);
        }
    }

    pub fn target(&self, container: &str) -> Option<Arc<Measured>> {
        self.targets.pin().get(container).cloned()
    }

    /// Forgets the digest of an inode that was written (close after write).
    pub fn invalidate(&self, inode: (u64, u64)) {
        self.cache.pin().remove(&inode);
    }

    fn cached(&self, key: &FileKey) -> Option<[u8; 32]> {
        self.cache
            .pin()
            .get(&key.inode())
            .filter(|(k, _)| k == key)
            .map(|(_, d)| *d)
    }

    fn remember(&self, key: FileKey, digest: [u8; 32]) {
        let c = self.cache.pin();
        if c.len() >= CACHE_LIMIT {
            c.clear();
        }
        c.insert(key.inode(), (key, digest));
    }

    /// Measures one access of a regular file: decided now on a cache hit,
    /// else queued for hashing (blocking while the pod's queue is full).
    pub fn submit(
        &self,
        target: Arc<Measured>,
        mut pending: Box<dyn Pending>,
        key: FileKey,
        kind: Event,
    ) {
        let t0 = std::time::Instant::now();
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        match self.cached(&key) {
            Some(d) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.decide(&target, pending, kind, d, Some(t0));
            }
            None => {
                pending.queued();
                // Counted until a worker has answered it.
                self.inflight.fetch_add(1, Ordering::SeqCst);
                self.enqueue(Job::new(target, pending, key, kind))
            }
        }
    }

    /// As [`submit`], hashing in the calling thread (for the accesses a
    /// previous imacri left unanswered, before the container's reader
    /// reads anything).
    pub fn measure_now(
        &self,
        target: Arc<Measured>,
        pending: Box<dyn Pending>,
        key: FileKey,
        kind: Event,
    ) {
        match self.cached(&key) {
            Some(d) => self.decide(&target, pending, kind, d, None),
            None => {
                let mut job = Job::new(target, pending, key, kind);
                let mut buf = vec![0u8; HASH_BUF];
                while let Some(more) = self.hash_slice(job, &mut buf) {
                    job = more;
                }
            }
        }
    }

    /// A job half hashed is worth going on with while its container is
    /// measured and its caller waits.
    fn still_wanted(&self, job: &Job) -> bool {
        let measured = self
            .targets
            .pin()
            .get(&job.target.container)
            .is_some_and(|m| Arc::ptr_eq(m, &job.target));
        measured && job.pending.wanted()
    }

    /// Hashes the next slice of a job's file: the job back if more is left,
    /// else decided and answered.
    fn hash_slice(&self, mut job: Job, buf: &mut [u8]) -> Option<Job> {
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
                // Let through (measure) only once the gap is in the log.
                let gap = self.unmeasured(&t, &fd_path(fd));
                let allow = t.mode == Mode::Measure && gap != Gap::NotLogged;
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
        match nix::sys::stat::fstat(fd.as_raw_fd()).map(|st| FileKey::of(&st)) {
            Ok(k) if k == job.key => {
                self.remember(job.key, digest);
                self.decide(&t, job.pending, job.kind, digest, None);
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
    fn too_large(&self, t: &Measured, pending: Box<dyn Pending>, size: u64) {
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
    fn unmeasured(&self, t: &Measured, path: &str) -> Gap {
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

    fn gap(&self, t: &Measured, path: &str) {
        if let Err(e) = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], Event::Gap, false)
        {
            tracing::error!(container_id = %t.container, error = %e, "recording a gap");
        }
    }

    /// Appraises, records and answers one measured access. `hit`: when a
    /// cache hit's handling began, for the time-to-answer statistic (taken
    /// before the answer: answering wakes the waiting task, which may
    /// preempt this thread).
    fn decide(
        &self,
        t: &Measured,
        pending: Box<dyn Pending>,
        kind: Event,
        digest: [u8; 32],
        hit: Option<std::time::Instant>,
    ) {
        let fd = pending.fd();
        let path = fd_path(fd);
        let digest_hex = digest_text(&digest);
        let runs = matches!(kind, Event::Exec | Event::Mmap);
        let enforce = t.mode == Mode::Enforce && runs;
        if kind == Event::Mmap {
            self.stats.mappings.fetch_add(1, Ordering::Relaxed);
        }
        let verdict = t
            .allowlist
            .as_ref()
            .and_then(|a| a.check_file(&path, &digest_hex, kind));
        let deny = verdict.is_some() && enforce;
        // A mapping to be allowed is watched first: from here on an open
        // for writing waits for the watch's answer, so the check below sees
        // every writer that opened before it.
        let mut watch = None;
        if let Some(w) = (kind == Event::Mmap && !deny)
            .then(|| self.write_watch(t))
            .flatten()
        {
            match w.watch(fd) {
                Ok(true) => watch = Some(w),
                Ok(false) => {}
                // Unwatched, a mapping could be rewritten unseen.
                Err(e) if enforce => {
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a mapping cannot be watched for writers; refused");
                    }
                    self.stats.denied.fetch_add(1, Ordering::Relaxed);
                    pending.answer(false);
                    let reason = format!("cannot be watched for writers: {e}");
                    return self.notice(t, path, digest_hex, true, reason);
                }
                Err(e) => {
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a mapped file is not watched for writers")
                    }
                }
            }
        }
        // A script is read by its interpreter after this answer: watched
        // first, so that no rewrite under the interpreter goes unseen.
        if kind == Event::Exec && !deny && !is_elf(fd) {
            if let Some(w) = self.write_watch(t) {
                if let Err(e) = w.watch_script(fd) {
                    if enforce {
                        if let Some(unsaid) = t.quiet.take() {
                            tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a script cannot be watched for writers; refused");
                        }
                        self.stats.denied.fetch_add(1, Ordering::Relaxed);
                        pending.answer(false);
                        let reason = format!("cannot be watched for writers: {e}");
                        return self.notice(t, path, digest_hex, true, reason);
                    }
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "an executed script is not watched for writers");
                    }
                }
            }
        }
        // Checked right before the answer: a writer could change what runs
        // after it was measured. Only for mappings: an execution of a file
        // open for writing is refused by the kernel itself (ETXTBSY), and
        // so is opening a running executable for writing.
        if kind == Event::Mmap && open_for_writing(fd) {
            let reason = "open for writing while executed or mapped executable".to_string();
            let r = self
                .journal
                .record(&t.pod, &t.container, &path, digest, Event::Writers, true);
            if enforce || r.is_err() {
                if let Some(w) = &watch {
                    w.unwatch(fd);
                }
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                pending.answer(false);
                return self.notice(t, path, digest_hex, true, reason);
            }
            self.notice(t, path.clone(), digest_hex.clone(), false, reason);
        }
        let logged = if deny { Event::Deny } else { kind };
        let new = match self.journal.record(
            &t.pod,
            &t.container,
            &path,
            digest,
            logged,
            verdict.is_some(),
        ) {
            Ok(e) => e.is_some(),
            Err(e) => {
                // Unrecorded means unmeasured: refused in every mode.
                let quota = matches!(e, JournalError::Quota { .. });
                if !quota {
                    tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, "cannot append to the measurement log");
                }
                if let Some(w) = &watch {
                    w.unwatch(fd);
                }
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                pending.answer(false);
                return self.notice(t, path, digest_hex, true, e.to_string());
            }
        };
        if deny {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t0) = hit {
            self.stats
                .hit_ns_total
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        pending.answer(!deny);
        if let Some(reason) = verdict {
            if new || deny {
                self.notice(t, path, digest_hex, deny, reason);
            }
        }
    }

    fn notice(&self, t: &Measured, path: String, digest: String, denied: bool, reason: String) {
        let _ = self.notices.send(Notice {
            pod: t.pod.clone(),
            container: t.container.clone(),
            path,
            digest,
            denied,
            reason,
            stopped: false,
        });
    }

    /// A source that cannot go on: the gap is logged and the server told to
    /// kill the container.
    pub(super) fn stopped(&self, t: &Measured, reason: String) {
        tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, %reason, "measurement stopped; the container is killed");
        self.gap(t, "-");
        let _ = self.notices.send(Notice {
            pod: t.pod.clone(),
            container: t.container.clone(),
            path: String::new(),
            digest: String::new(),
            denied: false,
            reason,
            stopped: true,
        });
    }
}

/// Where an unmeasured access stands in the log.
#[derive(Debug, PartialEq, Eq)]
enum Gap {
    /// Logged now.
    New,
    /// Logged before (the same container and path).
    Logged,
    /// Not in the log (the pod's quota is used up, or the log failed).
    NotLogged,
}

/// Whether the file open as `fd` is an ELF program (else the kernel runs
/// it through an interpreter that reads it: a script).
fn is_elf(fd: BorrowedFd<'_>) -> bool {
    let mut magic = [0u8; 4];
    nix::sys::uio::pread(fd, &mut magic, 0).is_ok_and(|n| n == 4 && magic == *b"\x7fELF")
}

/// A hashing thread of `pod`'s: its jobs a slice at a time, in the pod's
/// CPU cgroups, until it has had none for a while.
fn hash_for(engine: &Weak<Engine>, queue: &HashQueue, pod: &str) {
    let mut buf = vec![0u8; HASH_BUF];
    while let Some(job) = queue.pop(pod, charge::home) {
        let Some(engine) = engine.upgrade() else {
            break;
        };
        charge::enter(job.target.charge.as_ref());
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

/// Whether the file's content can change under what was measured (IMA's
/// open-writers): someone has it open for writing, or it has no name and is
/// not sealed against writes (a memfd or SysV segment: pseudo files whose
/// writers the kernel does not count). Fails closed: a file that can take
/// neither check counts as written.
pub fn open_for_writing(fd: BorrowedFd<'_>) -> bool {
    let raw = fd.as_raw_fd();
    let nameless = nix::sys::stat::fstat(raw).map_or(true, |st| st.st_nlink == 0);
    if nameless {
        // SAFETY: fcntl on a valid fd with integer arguments.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        let sealed = seals >= 0 && seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0;
        if !sealed {
            return true;
        }
    }
    // `fd` may be the process's own open file (the map guard's), and a
    // lease is the file's: one the process holds through it must be left
    // alone (a read lease taken here would replace it, and the release drop
    // it). Held, it answers the question: a read lease stands only while
    // nobody has the file open for writing, a write lease only while
    // nobody else has it open at all, so only this very file can be
    // open for writing (a write lease being downgraded for a reader reads
    // as F_RDLCK; one being broken by a writer as F_UNLCK, checked below).
    // SAFETY: fcntl on a valid fd with integer arguments.
    let held = unsafe { libc::fcntl(raw, libc::F_GETLEASE) };
    if held == libc::F_RDLCK || held == libc::F_WRLCK {
        let mode = unsafe { libc::fcntl(raw, libc::F_GETFL) } & libc::O_ACCMODE;
        return mode != libc::O_RDONLY;
    }
    // A read lease is refused exactly when the inode's write count is
    // positive (the kernel's check_conflicting_open); released at once.
    let r = unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_RDLCK) };
    if r != 0 {
        return true;
    }
    unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_UNLCK) };
    false
}

#[cfg(test)]
mod tests {
    use super::super::digest::hash_fd;
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Mutex;

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

    struct Recorded {
        fd: OwnedFd,
        answers: Arc<Mutex<Vec<(String, bool)>>>,
        name: String,
    }

    impl Pending for Recorded {
        fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
        fn answer(self: Box<Self>, allow: bool) {
            self.answers
                .lock()
                .unwrap()
                .push((self.name.clone(), allow));
        }
    }

    #[test]
    fn open_writers_are_seen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bin");
        std::fs::write(&p, b"\x7fELF").unwrap();
        let r = std::fs::File::open(&p).unwrap();
        assert!(!open_for_writing(r.as_fd()));
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert!(open_for_writing(r.as_fd()));
        drop(w);
        assert!(!open_for_writing(r.as_fd()));
        // A lease held through the file itself answers, and stays.
        let lease = |f: &std::fs::File, t: libc::c_int| unsafe {
            libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, t)
        };
        let held = |f: &std::fs::File| unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) };
        assert_eq!(lease(&r, libc::F_WRLCK), 0);
        assert!(!open_for_writing(r.as_fd()));
        assert_eq!(held(&r), libc::F_WRLCK);
        assert_eq!(lease(&r, libc::F_RDLCK), 0);
        assert!(!open_for_writing(r.as_fd()));
        assert_eq!(held(&r), libc::F_RDLCK);
        assert_eq!(lease(&r, libc::F_UNLCK), 0);
        drop(r);
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        assert_eq!(lease(&rw, libc::F_WRLCK), 0);
        assert!(open_for_writing(rw.as_fd()));
        assert_eq!(held(&rw), libc::F_WRLCK);
        drop(rw);
        // A memfd: the kernel counts no writers, but anyone with its fd can
        // write; sealed against writes it is stable.
        // SAFETY: memfd_create with a static name; the fd is owned below.
        let m = unsafe {
            use std::os::fd::FromRawFd;
            let fd = libc::memfd_create(c"m".as_ptr(), libc::MFD_ALLOW_SEALING);
            assert!(fd >= 0);
            OwnedFd::from_raw_fd(fd)
        };
        assert!(open_for_writing(m.as_fd()));
        unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert!(!open_for_writing(m.as_fd()));
    }

    #[test]
    fn decisions_record_refuse_and_respect_quota() {
        let d = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(d.path(), 15, None).unwrap().with_quota(3));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = Engine::new(journal.clone(), tx, DEFAULT_MAX_FILE_SIZE);
        let answers = Arc::new(Mutex::new(Vec::new()));
        let bin = d.path().join("bin");
        std::fs::write(&bin, b"payload").unwrap();
        let (digest, _) = hash_fd(std::fs::File::open(&bin).unwrap().as_fd()).unwrap();
        let allow = Allowlist {
            files: [(
                bin.to_string_lossy().into_owned(),
                [digest_text(&digest)].into(),
            )]
            .into(),
            ..Default::default()
        };
        let target = Arc::new(Measured {
            pod: "p".into(),
            container: "c".into(),
            mode: Mode::Enforce,
            allowlist: Some(Arc::new(allow)),
            charge: None,
            quiet: Default::default(),
        });
        let pend = |path: &std::path::Path, name: &str| {
            Box::new(Recorded {
                fd: std::fs::File::open(path).unwrap().into(),
                answers: answers.clone(),
                name: name.into(),
            })
        };
        // Allowed digest: allowed and logged.
        engine.decide(&target, pend(&bin, "ok"), Event::Mmap, digest, None);
        // Another file: denied in enforce mode.
        let other = d.path().join("other");
        std::fs::write(&other, b"evil").unwrap();
        engine.decide(&target, pend(&other, "evil"), Event::Exec, [9; 32], None);
        // Mapped while open for writing: refused even with an allowed digest.
        let w = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
        engine.decide(&target, pend(&bin, "written"), Event::Mmap, digest, None);
        drop(w);
        // Quota (3) reached: the next new measurement is refused.
        let third = d.path().join("third");
        std::fs::write(&third, b"x").unwrap();
        engine.decide(&target, pend(&third, "over"), Event::Read, [3; 32], None);
        let a = answers.lock().unwrap().clone();
        assert_eq!(
            a,
            vec![
                ("ok".to_string(), true),
                ("evil".to_string(), false),
                ("written".to_string(), false),
                ("over".to_string(), false)
            ]
        );
        let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
        let events: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(events, ["mmap", "deny", "writers", "quota"]);
    }
}
