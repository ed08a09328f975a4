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

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::allowlist::Allowlist;
use super::charge::Charge;
use super::digest::{FileKey, HASH_BUF};
use super::elf;
pub use super::hashq::PER_POD_QUEUE;
use super::hashq::{HashQueue, Job};
use super::journal::Journal;
use super::log::Event;
pub use super::quiet::Quiet;
use super::sys::WatchError;
use crate::integrity::policy::Mode;

mod decide;
mod hashing;
mod own;
mod source;

pub use decide::open_for_writing;
use hashing::hash_for;
use own::OwnOpeners;
pub use source::{Caller, Mapper, Pending, WriteWatch};

/// How often a file that changes while it is hashed is hashed again before
/// the access is refused.
const HASH_TRIES: usize = 3;

/// Digests cached at most (~150 bytes each: ~10 MB). The cache holds the
/// files of running containers only (a container's go with it), a few
/// hundred each; a container that runs ever new files fills it with its own
/// and then loses them (`remember`). It was 200 000 (~30 MB, as much as
/// imacri's whole idle target) while dead containers' digests stayed.
const CACHE_LIMIT: usize = 65_536;

/// How much of one file a hashing thread reads before it takes the next
/// pod's turn (10-20 ms at release speed): a pod that executes a huge file
/// holds up its own accesses, never another pod's first executions.
const HASH_SLICE: u64 = 16 << 20;

/// `ima.max_file_size`'s default: 4 GiB, past the biggest libraries real
/// images ship (GPU runtimes' are 1-2 GiB); a larger file is refused
/// unhashed.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 30;

/// `ima.max_watched_files`'s default: far above the libraries and scripts
/// one container holds at a time (a large program maps a few hundred).
/// It alone bounds a container's marks: imacri's groups do not count
/// against the node's `fs.fanotify.max_user_marks` (`FAN_UNLIMITED_MARKS`),
/// so one pod's cannot use up another's.
pub const DEFAULT_MAX_WATCHED_FILES: usize = 4096;

/// A test hook's delay: `text:milliseconds` in the environment variable.
fn delay_for(var: &str) -> Option<(String, std::time::Duration)> {
    let v = crate::crash::hook(var)?;
    let (text, ms) = v.rsplit_once(':')?;
    let ms = ms.parse().ok()?;
    Some((text.to_string(), std::time::Duration::from_millis(ms)))
}

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
    /// The pod's policy denies executable memory no file backs (the map
    /// guard's rule, `setting::AnonymousExec`).
    pub no_anonymous_exec: bool,
}

impl Measured {
    /// Whether a file mapped executable may not change under its mappings
    /// (a writer refused, a change found after the fact kills the
    /// container): under `enforce`, and where the policy denies executable
    /// memory no file backs (a rewritten mapped file is just that).
    pub fn keeps_mappings(&self) -> bool {
        self.mode == Mode::Enforce || self.no_anonymous_exec
    }
}

/// What a file watched for writers is to its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedAs {
    /// Mapped executable (by a call, or a program's interpreter).
    Mapping,
    /// An executed script, read by a process of the pod.
    Script,
}

impl WatchedAs {
    /// How violations name it.
    pub fn what(self) -> &'static str {
        match self {
            WatchedAs::Mapping => "mapped executable",
            WatchedAs::Script => "executed as a script and read by a process of the pod",
        }
    }

    /// Whether a change of it is refused (or found and punished) for `t`.
    fn kept_by(self, t: &Measured) -> bool {
        match self {
            WatchedAs::Mapping => t.keeps_mappings(),
            WatchedAs::Script => t.mode == Mode::Enforce,
        }
    }
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
    /// Of those, leases given up for another file's when imacri's share
    /// of open files, or the pod's own limit, was taken (`leasesGivenUp`).
    pub leases_given_up: AtomicU64,
    /// Files of an overlay filesystem mapped shared and writable, held open
    /// for writing until their container is gone (`heldWriters`).
    pub held_writers: AtomicU64,
    /// Watches ended because a container reached `ima.max_watched_files`
    /// and nothing held their files any more (`sweptWatches`).
    pub swept_watches: AtomicU64,
    /// Accesses the kernel refused itself because it could not open their
    /// file for a reader (imacri at its open-file limit): failed, not
    /// measured (`unopenedEvents`).
    pub unopened: AtomicU64,
}

/// By inode: the identity a file was hashed at, and what was learnt of its
/// content then.
type DigestCache = papaya::HashMap<(u64, u64), (FileKey, Content)>;

/// What is known of a file's content once hashed: its digest, and the ELF
/// facts an execution of it needs (read with the digest, so a cached
/// execution reads no header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub digest: [u8; 32],
    pub elf: elf::Facts,
}

impl Content {
    /// A file's content that no execution will ask about (tests).
    pub fn digest_only(digest: [u8; 32]) -> Content {
        Content {
            digest,
            elf: elf::Facts::default(),
        }
    }
}

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
    /// Per container, the devices of the filesystems its group marks: the
    /// digests of their files are forgotten with the last container that
    /// marks them (a removed container's overlay is gone, and a node that
    /// ran thousands of containers kept their digests until the cache
    /// filled up: ~150 bytes each, up to [`CACHE_LIMIT`]).
    devices: papaya::HashMap<String, Vec<u64>>,
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
    /// Fault injection for the rewrite tests: an executable mapping of a
    /// file whose path contains the text waits this long between its
    /// writers check and its answer, as a caller held up on its way into
    /// the kernel's mapping would (`IMACRI_TEST_MAPGUARD_ANSWER_DELAY`,
    /// `text:milliseconds`).
    pub(super) map_answer_delay: Option<(String, std::time::Duration)>,
    /// Fault injection: an executable mapping call of a file whose path
    /// contains the text waits this long between its watch (where it is
    /// added to the file's callers) and its writers check
    /// (`IMACRI_TEST_MAPGUARD_WATCH_DELAY`, `text:milliseconds`).
    pub(super) map_watch_delay: Option<(String, std::time::Duration)>,
    /// Fault injection: a write-open of a watched file whose path contains
    /// the text, found mapped by nobody, waits this long before its watch
    /// ends (`IMACRI_TEST_WRITE_LOOK_DELAY`, `text:milliseconds`).
    pub(crate) write_look_delay: Option<(String, std::time::Duration)>,
    /// Fault injection: a container's reader, woken by closes after
    /// writing alone, waits this long before it reads them
    /// (`IMACRI_TEST_CLOSES_DELAY`, milliseconds).
    pub(crate) closes_delay: Option<std::time::Duration>,
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
    /// Files one container's group watches for writers at most
    /// (`ima.max_watched_files`).
    max_watched_files: AtomicUsize,
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
            devices: papaya::HashMap::new(),
            stats: Stats::default(),
            fail_after: crate::crash::hook("IMACRI_TEST_FANOTIFY_FAIL_AFTER")
                .and_then(|v| v.parse().ok()),
            stall: crate::crash::hook("IMACRI_TEST_FANOTIFY_STALL"),
            map_stall: crate::crash::hook("IMACRI_TEST_MAPGUARD_STALL"),
            map_swap_window: crate::crash::hook_ms("IMACRI_TEST_MAPGUARD_SWAP_WINDOW"),
            map_no_hold: crate::crash::hook("IMACRI_TEST_MAPGUARD_NO_HOLD").is_some(),
            map_answer_delay: delay_for("IMACRI_TEST_MAPGUARD_ANSWER_DELAY"),
            map_watch_delay: delay_for("IMACRI_TEST_MAPGUARD_WATCH_DELAY"),
            write_look_delay: delay_for("IMACRI_TEST_WRITE_LOOK_DELAY"),
            closes_delay: crate::crash::hook_ms("IMACRI_TEST_CLOSES_DELAY"),
            detached: Default::default(),
            inflight: AtomicUsize::new(0),
            hash_delay: crate::crash::hook("IMACRI_TEST_HASH_DELAY"),
            own_openers: OwnOpeners::default(),
            max_file_size,
            max_watched_files: AtomicUsize::new(DEFAULT_MAX_WATCHED_FILES),
        })
    }

    /// Sets `ima.max_watched_files` (at least 1).
    pub fn set_max_watched_files(&self, n: usize) {
        self.max_watched_files.store(n.max(1), Ordering::Relaxed);
    }

    pub fn max_watched_files(&self) -> usize {
        self.max_watched_files.load(Ordering::Relaxed)
    }

    /// Queues a job, starting a hashing thread for its pod if it needs one
    /// (hashing on the caller's thread if none can be started).
    fn enqueue(&self, job: Job) {
        let pod = job.target.pod.clone();
        if !self.queue.push(job) {
            return;
        }
        let (me, queue, p) = (self.me.clone(), self.queue.clone(), pod.clone());
        let here = super::charge::here();
        let started = std::thread::Builder::new()
            .name("imacri-hash".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                here.adopt();
                hash_for(&me, &queue, &p)
            });
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

    /// Makes a container findable by ID while it is measured; `devices`:
    /// those of the filesystems it alone (or with other containers of its
    /// pod) has marked.
    pub fn register(&self, m: Arc<Measured>, devices: Vec<u64>) {
        self.devices.pin().insert(m.container.clone(), devices);
        self.targets.pin().insert(m.container.clone(), m);
    }

    pub fn unregister(&self, container: &str) {
        let gone = self.targets.pin().remove(container).cloned();
        self.write_watches.pin().remove(container);
        self.forget_devices_of(container);
        // The pod's last measured container: its lingering hashing threads
        // end now, out of its cgroups (kubelet kills what it finds in a
        // removed pod's cgroup).
        if let Some(m) = gone {
            if !self.targets.pin().values().any(|t| t.pod == m.pod) {
                self.queue.pod_gone(&m.pod);
            }
        }
    }

    /// Forgets the digests of files on the filesystems only `container`
    /// marked.
    fn forget_devices_of(&self, container: &str) {
        let devices = self.devices.pin();
        let Some(mine) = devices.remove(container).cloned() else {
            return;
        };
        let gone: Vec<u64> = mine
            .into_iter()
            .filter(|d| !devices.values().any(|v| v.contains(d)))
            .collect();
        if !gone.is_empty() {
            self.cache.pin().retain(|inode, _| !gone.contains(&inode.0));
        }
    }

    /// Digests cached now.
    pub fn cached_digests(&self) -> usize {
        self.cache.len()
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

    /// See [`WriteWatch::hold_writer`]; Err where `t` has no watch.
    pub fn hold_writer(&self, t: &Measured, file: OwnedFd) -> Result<(), WatchError> {
        let w = self.write_watch(t).ok_or(WatchError::NoGroup)?;
        w.hold_writer(file)?;
        self.stats.held_writers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn target(&self, container: &str) -> Option<Arc<Measured>> {
        self.targets.pin().get(container).cloned()
    }

    /// Forgets the digest of an inode that was written (close after write).
    pub fn invalidate(&self, inode: (u64, u64)) {
        self.cache.pin().remove(&inode);
    }

    /// Forgets every digest of files on `devices` (closes after writing
    /// were lost).
    pub fn invalidate_devices(&self, devices: &[u64]) {
        self.cache
            .pin()
            .retain(|inode, _| !devices.contains(&inode.0));
    }

    fn cached(&self, key: &FileKey) -> Option<Content> {
        self.cache
            .pin()
            .get(&key.inode())
            .filter(|(k, _)| k == key)
            .map(|(_, c)| *c)
    }

    fn remember(&self, key: FileKey, content: Content) {
        let c = self.cache.pin();
        if c.len() >= CACHE_LIMIT {
            // Full: the filesystem with the most digests loses them (a
            // container that runs ever new files fills the cache with its
            // own); only a cache no filesystem dominates is cleared. Until
            // 2026-12-05 it was cleared whole, so a pod could make every
            // other pod hash its files again, as often as it liked.
            let mut per_device: HashMap<u64, usize> = HashMap::new();
            for (inode, _) in c.iter() {
                *per_device.entry(inode.0).or_default() += 1;
            }
            match per_device.into_iter().max_by_key(|(_, n)| *n) {
                Some((dev, n)) if n >= CACHE_LIMIT / 8 => c.retain(|inode, _| inode.0 != dev),
                _ => c.clear(),
            }
        }
        c.insert(key.inode(), (key, content));
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
        if kind == Event::Mmap {
            // Decided on the map guard's thread, not after the container's
            // reader read the closes queued before it: a close that asks
            // for the file to be measured anew (an overlay file mapped
            // shared and writable outside the pod) must count first.
            if let Some(w) = self.write_watch(&target) {
                w.read_closes();
            }
        }
        match self.cached(&key) {
            Some(c) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.decide(&target, pending, kind, (c, key), Some(t0));
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
            Some(c) => self.decide(&target, pending, kind, (c, key), None),
            None => {
                let mut job = Job::new(target, pending, key, kind);
                let mut buf = vec![0u8; HASH_BUF];
                while let Some(more) = self.hash_slice(job, &mut buf) {
                    job = more;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
