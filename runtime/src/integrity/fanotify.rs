//! The fanotify backend: imacri measures an ima pod itself on kernels
//! without IMA namespaces.
//!
//! One fanotify group per container, marked with `FAN_MARK_FILESYSTEM` on the
//! container's root (`/proc/<init pid>/root` once the task exists and before
//! it starts): each overlay rootfs is its own superblock, so the mark sees
//! exactly that container's accesses, through whichever mount namespace they
//! come. (A `FAN_MARK_MOUNT` on the host's rootfs mount does not see accesses
//! through the container's cloned mounts.) A group per container also means
//! an event needs no lookup to know whose it is.
//!
//! Each group has a reader thread. A cache hit (same device, inode, size,
//! mtime and ctime as a file already hashed) is answered on that thread in
//! microseconds; a miss goes to a small pool of hashing threads, so one big
//! file never holds up the container's other events. The digest is read
//! through the event's own fd (opened by the kernel, no path race).
//!
//! If imacri dies, the kernel answers the group's pending events with "allow"
//! when the group's fd closes and stops sending events: fanotify fails open.
//! A restarted imacri re-marks every running container and logs a `gap` entry
//! for it, so the unmeasured interval is visible to the verifier.
//!
//! Execution from anywhere but the rootfs is refused by the spec: every other
//! mount of a container in a fanotify-measured pod (volumes, /dev, tmpfs) is
//! mounted `noexec` (see `spec::noexec_outside_rootfs`).

use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use super::allowlist::Allowlist;
use super::journal::Journal;
use super::log::Event;
use crate::ima::policy::{Mode, Rule};

#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error(
        "fanotify_init: {0} (needs CAP_SYS_ADMIN and a kernel with fanotify permission events)"
    )]
    Init(nix::Error),
    #[error("fanotify_mark FAN_MARK_FILESYSTEM on {path}: {source}")]
    Mark { path: PathBuf, source: nix::Error },
    #[error("starting the fanotify reader: {0}")]
    Thread(std::io::Error),
}

/// What the pod's policy asks the backend to measure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Triggers {
    /// Executions (BPRM_CHECK).
    pub exec: bool,
    /// Opens of ELF files (FILE_MMAP / MMAP_CHECK: fanotify cannot see
    /// mmap(PROT_EXEC), so libraries are measured when opened).
    pub mmap: bool,
    /// Opens for reading (FILE_CHECK), optionally only by this host uid.
    pub read: Option<Option<u32>>,
}

impl Triggers {
    /// Compiles the policy's `measure` rules; `to_host` maps an in-pod uid
    /// (a rule's `uid=`/`euid=`) to the host uid the kernel reports.
    pub fn from_rules(rules: &[Rule], to_host: impl Fn(u32) -> u32) -> Triggers {
        let mut t = Triggers::default();
        for r in rules.iter().filter(|r| r.action == "measure") {
            match r.condition("func") {
                Some("BPRM_CHECK") | Some("CREDS_CHECK") => t.exec = true,
                Some("FILE_MMAP") | Some("MMAP_CHECK") | Some("MMAP_CHECK_REQPROT") => {
                    t.mmap = true
                }
                Some("FILE_CHECK") => {
                    let uid = r
                        .condition("euid")
                        .or(r.condition("uid"))
                        .and_then(|v| v.parse().ok())
                        .map(&to_host);
                    t.read = Some(uid);
                }
                None => {
                    t.exec = true;
                    t.mmap = true;
                    t.read = Some(None);
                }
                _ => {}
            }
        }
        t
    }

    fn mask(&self) -> MaskFlags {
        let mut m = MaskFlags::empty();
        if self.exec {
            m |= MaskFlags::FAN_OPEN_EXEC_PERM;
        }
        if self.mmap || self.read.is_some() {
            m |= MaskFlags::FAN_OPEN_PERM;
        }
        m
    }
}

/// One container to measure.
#[derive(Debug, Clone)]
pub struct Target {
    pub pod: String,
    pub container: String,
    /// The container's root as the host sees it: `/proc/<pid>/root`.
    pub root: PathBuf,
    pub triggers: Triggers,
    pub mode: Mode,
    pub allowlist: Option<Arc<Allowlist>>,
    /// Volumes measured like the rootfs (each a filesystem of its own).
    pub volumes: Vec<PathBuf>,
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
    /// Time from reading a cache-hit event to answering it.
    pub hit_ns_total: AtomicU64,
    pub denied: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(st: &nix::sys::stat::FileStat) -> FileKey {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// How often a file that changes while it is hashed is hashed again before
/// the access is refused.
const HASH_TRIES: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Known {
    elf: Option<bool>,
    digest: Option<[u8; 32]>,
}

const CACHE_LIMIT: usize = 200_000;

struct Group {
    fan: Fanotify,
    target: Target,
    /// The kernel sends an execve's open as two events, FAN_OPEN_EXEC_PERM
    /// then FAN_OPEN_PERM (the second only after the first is answered):
    /// the open that follows an exec of the same file by the same task is
    /// the exec itself, not a library load.
    last_exec: Mutex<Option<(i32, FileKey)>>,
}

struct Job {
    group: Arc<Group>,
    event: FanotifyEvent,
    key: FileKey,
    kind: Event,
}

pub struct Engine {
    journal: Arc<Journal>,
    cache: Mutex<HashMap<FileKey, Known>>,
    jobs: Mutex<mpsc::Sender<Job>>,
    notices: tokio::sync::mpsc::UnboundedSender<Notice>,
    pub stats: Stats,
    /// Fault injection for the fail-closed tests: every reader fails after
    /// this many events (`IMACRI_TEST_FANOTIFY_FAIL_AFTER`).
    fail_after: Option<u64>,
}

/// A running watch; dropping it stops measuring (the group closes).
pub struct Watch {
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the reader, which closes the group.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Probes whether this node can run the backend (root, permission events,
/// filesystem marks).
pub fn probe() -> Result<(), String> {
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )
    .map_err(|e| format!("fanotify permission events are unavailable: {e}"))?;
    fan.mark(
        MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
        MaskFlags::FAN_OPEN_EXEC_PERM,
        None,
        Some("/proc/self/root"),
    )
    .map_err(|e| format!("fanotify filesystem marks with FAN_OPEN_EXEC_PERM are unavailable: {e}"))
}

impl Engine {
    pub fn new(
        journal: Arc<Journal>,
        notices: tokio::sync::mpsc::UnboundedSender<Notice>,
        workers: usize,
    ) -> Arc<Engine> {
        let (tx, rx) = mpsc::channel::<Job>();
        let engine = Arc::new(Engine {
            journal,
            cache: Mutex::new(HashMap::new()),
            jobs: Mutex::new(tx),
            notices,
            stats: Stats::default(),
            fail_after: std::env::var("IMACRI_TEST_FANOTIFY_FAIL_AFTER")
                .ok()
                .and_then(|v| v.parse().ok()),
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let weak = Arc::downgrade(&engine);
            let _ = std::thread::Builder::new()
                .name(format!("imacri-hash-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let (Ok(job), Some(engine)) = (job, weak.upgrade()) else {
                        return;
                    };
                    engine.hash_and_answer(job);
                });
        }
        engine
    }

    /// Marks the container's filesystem and starts answering its events.
    pub fn watch(self: &Arc<Self>, target: Target) -> Result<Watch, FanotifyError> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::FAN_UNLIMITED_QUEUE,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(FanotifyError::Init)?;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            target.triggers.mask(),
            None,
            Some(&target.root),
        )
        .map_err(|source| FanotifyError::Mark {
            path: target.root.clone(),
            source,
        })?;
        for v in &target.volumes {
            fan.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                target.triggers.mask(),
                None,
                Some(v),
            )
            .map_err(|source| FanotifyError::Mark {
                path: v.clone(),
                source,
            })?;
        }
        let (stop_r, stop_w) = nix::unistd::pipe().map_err(|e| FanotifyError::Thread(e.into()))?;
        let group = Arc::new(Group {
            fan,
            target,
            last_exec: Mutex::new(None),
        });
        let engine = self.clone();
        let thread = std::thread::Builder::new()
            .name("imacri-fanotify".into())
            .spawn(move || engine.read_loop(group, stop_r))
            .map_err(FanotifyError::Thread)?;
        Ok(Watch {
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }

    fn read_loop(&self, group: Arc<Group>, stop: OwnedFd) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut handled = 0u64;
        loop {
            let mut fds = [
                PollFd::new(group.fan.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return self.stopped(&group, &stop, format!("fanotify poll failed: {e}")),
                Ok(_) => {}
            }
            if fds[1].any().unwrap_or(true) {
                return;
            }
            if self.fail_after.is_some_and(|n| handled >= n) {
                return self.stopped(&group, &stop, "injected reader fault (test)".into());
            }
            let events = match group.fan.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return self.stopped(
                        &group,
                        &stop,
                        format!("reading fanotify events failed: {e}"),
                    )
                }
            };
            for ev in events {
                handled += 1;
                self.handle(&group, ev);
            }
        }
    }

    /// A reader that cannot go on fails closed: the gap is logged, the
    /// server is told to kill the container, and the group stays open with
    /// nothing answered, so the container's next execution waits (killably)
    /// instead of running unmeasured, until its watch is dropped.
    fn stopped(&self, group: &Group, stop: &OwnedFd, reason: String) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let t = &group.target;
        tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, %reason, "measurement stopped; the container is killed");
        if let Err(e) = self
            .journal
            .record(&t.pod, &t.container, "-", [0; 32], Event::Gap, false)
        {
            tracing::error!(container_id = %t.container, error = %e, "recording the measurement gap");
        }
        let _ = self.notices.send(Notice {
            pod: t.pod.clone(),
            container: t.container.clone(),
            path: String::new(),
            digest: String::new(),
            denied: false,
            reason,
            stopped: true,
        });
        loop {
            let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return,
            }
        }
    }

    fn handle(&self, group: &Arc<Group>, ev: FanotifyEvent) {
        let t0 = std::time::Instant::now();
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let Some(fd) = ev.fd() else {
            tracing::warn!(container_id = %group.target.container, "fanotify queue overflow");
            return;
        };
        let st = match nix::sys::stat::fstat(fd.as_raw_fd()) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
            _ => return answer(group, &ev, true),
        };
        let key = FileKey::of(&st);
        let trig = &group.target.triggers;
        let exec = ev.mask().contains(MaskFlags::FAN_OPEN_EXEC_PERM);
        if let Ok(mut last) = group.last_exec.lock() {
            let this = Some((ev.pid(), key));
            if exec {
                *last = this;
            } else if *last == this {
                *last = None;
                return answer(group, &ev, true);
            }
        }
        let mut known = self.known(&key);
        let kind = if exec && trig.exec {
            Event::Exec
        } else if trig.mmap && self.is_elf(fd, &key, &mut known) {
            Event::Mmap
        } else if let Some(uid) = trig.read {
            if uid.is_some_and(|u| euid_of(ev.pid()) != Some(u)) {
                return answer(group, &ev, true);
            }
            Event::Read
        } else {
            return answer(group, &ev, true);
        };
        match known.digest {
            Some(d) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.decide(group, &ev, kind, d);
                self.stats
                    .hit_ns_total
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            None => {
                let job = Job {
                    group: group.clone(),
                    event: ev,
                    key,
                    kind,
                };
                let sent = self.jobs.lock().map(|tx| tx.send(job));
                if let Ok(Err(mpsc::SendError(job))) = sent {
                    self.hash_and_answer(job);
                }
            }
        }
    }

    fn known(&self, key: &FileKey) -> Known {
        self.cache
            .lock()
            .ok()
            .and_then(|c| c.get(key).copied())
            .unwrap_or_default()
    }

    fn remember(&self, key: FileKey, update: impl FnOnce(&mut Known)) {
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_LIMIT {
                c.clear();
            }
            update(c.entry(key).or_default());
        }
    }

    fn is_elf(&self, fd: BorrowedFd<'_>, key: &FileKey, known: &mut Known) -> bool {
        if let Some(e) = known.elf {
            return e;
        }
        let mut magic = [0u8; 4];
        let elf = matches!(nix::sys::uio::pread(fd, &mut magic, 0), Ok(4) if magic == *b"\x7fELF");
        known.elf = Some(elf);
        self.remember(*key, |k| k.elf = Some(elf));
        elf
    }

    fn hash_and_answer(&self, job: Job) {
        let Some(fd) = job.event.fd() else { return };
        let t = &job.group.target;
        let mut key = job.key;
        for _ in 0..HASH_TRIES {
            let (digest, n) = match hash_fd(fd) {
                Ok(r) => r,
                Err(e) => {
                    // Not a silent allow: the unmeasured access is a gap in
                    // the log (the verifier distrusts it), and enforce denies.
                    let allow = t.mode == Mode::Measure;
                    tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, allow, "cannot hash a measured file");
                    let path = fd_path(fd);
                    if let Err(e) =
                        self.journal
                            .record(&t.pod, &t.container, &path, [0; 32], Event::Gap, false)
                    {
                        tracing::error!(container_id = %t.container, error = %e, "recording a gap");
                    }
                    return answer(&job.group, &job.event, allow);
                }
            };
            self.stats.hashed_files.fetch_add(1, Ordering::Relaxed);
            self.stats.hashed_bytes.fetch_add(n, Ordering::Relaxed);
            // A writer that changed the file while it was hashed would have
            // it run under the old digest: the identity must not have moved.
            let now = nix::sys::stat::fstat(fd.as_raw_fd()).map(|st| FileKey::of(&st));
            match now {
                Ok(k) if k == key => {
                    self.remember(key, |k| k.digest = Some(digest));
                    return self.decide(&job.group, &job.event, job.kind, digest);
                }
                Ok(k) => key = k,
                Err(_) => break,
            }
        }
        let path = fd_path(fd);
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, "a measured file kept changing while it was hashed; access refused");
        if let Err(e) = self
            .journal
            .record(&t.pod, &t.container, &path, [0; 32], Event::Gap, false)
        {
            tracing::error!(container_id = %t.container, error = %e, "recording a gap");
        }
        answer(&job.group, &job.event, false);
    }

    /// Appraises, records and answers one measured access.
    fn decide(&self, group: &Group, ev: &FanotifyEvent, kind: Event, digest: [u8; 32]) {
        let t = &group.target;
        let path = ev.fd().map(fd_path).unwrap_or_default();
        let digest_hex = format!("sha256:{}", hex::encode(digest));
        let verdict = t
            .allowlist
            .as_ref()
            .and_then(|a| a.check_file(&path, &digest_hex));
        let deny = verdict.is_some()
            && t.mode == Mode::Enforce
            && matches!(kind, Event::Exec | Event::Mmap);
        let logged_kind = if deny { Event::Deny } else { kind };
        let recorded = self.journal.record(
            &t.pod,
            &t.container,
            &path,
            digest,
            logged_kind,
            verdict.is_some(),
        );
        let new = match recorded {
            Ok(e) => e.is_some(),
            Err(e) => {
                tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, "cannot append to the measurement log");
                // Unrecorded in enforce mode means unproven: refuse.
                if t.mode == Mode::Enforce {
                    return answer(group, ev, false);
                }
                false
            }
        };
        if deny {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        answer(group, ev, !deny);
        if let Some(reason) = verdict {
            if new || deny {
                let _ = self.notices.send(Notice {
                    pod: t.pod.clone(),
                    container: t.container.clone(),
                    path,
                    digest: digest_hex,
                    denied: deny,
                    reason,
                    stopped: false,
                });
            }
        }
    }
}

fn answer(group: &Group, ev: &FanotifyEvent, allow: bool) {
    let Some(fd) = ev.fd() else { return };
    let r = if allow {
        Response::FAN_ALLOW
    } else {
        Response::FAN_DENY
    };
    if let Err(e) = group.fan.write_response(FanotifyResponse::new(fd, r)) {
        tracing::error!(container_id = %group.target.container, error = %e, "answering a fanotify event failed");
    }
}

/// True when `path` is the root of a tmpfs mount: a filesystem of its own
/// (kubelet's memory-backed emptyDir and projected volumes), which a
/// `FAN_MARK_FILESYSTEM` can watch without watching the host.
pub fn own_tmpfs(path: &std::path::Path) -> bool {
    let Ok(p) = std::fs::canonicalize(path) else {
        return false;
    };
    let Some(parent) = p.parent() else {
        return false;
    };
    let (Ok(st), Ok(up)) = (nix::sys::stat::stat(&p), nix::sys::stat::stat(parent)) else {
        return false;
    };
    let tmpfs = nix::sys::statfs::statfs(&p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    tmpfs && st.st_dev != up.st_dev
}

/// The file's path as its opener sees it: the kernel resolves the event's
/// fd relative to the opener's mount namespace root, so a container's
/// accesses read as `/bin/sh`, not the host's rootfs path.
fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

fn euid_of(pid: i32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// sha256 of a file read through `fd` from offset 0 (pread: the fd's own
/// offset is the opener's, untouched).
pub fn hash_fd(fd: BorrowedFd<'_>) -> std::io::Result<([u8; 32], u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off: i64 = 0;
    loop {
        match nix::sys::uio::pread(fd, &mut buf, off) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                off += n as i64;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((h.finalize().into(), off as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ima::policy::parse;

    #[test]
    fn policy_rules_compile_to_triggers() {
        let t = Triggers::from_rules(
            &parse("measure func=BPRM_CHECK mask=MAY_EXEC\nmeasure func=FILE_MMAP mask=MAY_EXEC\n")
                .unwrap(),
            |u| u,
        );
        assert_eq!(
            t,
            Triggers {
                exec: true,
                mmap: true,
                read: None
            }
        );
        assert!(t
            .mask()
            .contains(MaskFlags::FAN_OPEN_EXEC_PERM | MaskFlags::FAN_OPEN_PERM));
        let t = Triggers::from_rules(
            &parse("measure func=FILE_CHECK mask=^MAY_READ uid=0\ndont_measure func=BPRM_CHECK\n")
                .unwrap(),
            |u| u + 100000,
        );
        assert_eq!(t.read, Some(Some(100000)));
        assert!(!t.exec);
        let only_exec = Triggers::from_rules(&parse("measure func=BPRM_CHECK").unwrap(), |u| u);
        assert_eq!(only_exec.mask(), MaskFlags::FAN_OPEN_EXEC_PERM);
    }

    #[test]
    fn hashes_from_offset_zero() {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abc").unwrap();
        f.seek(std::io::SeekFrom::Start(2)).unwrap();
        let (d, n) = hash_fd(f.as_fd()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            hex::encode(d),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
