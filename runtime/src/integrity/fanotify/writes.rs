//! Files a container mapped executable, watched for writers (IMA's ToMToU).
//! A mapping runs the page cache, so a file rewritten in place under it
//! runs what was written, not what was measured (an *executed* file cannot
//! be opened for writing: ETXTBSY; a mapped one can).
//!
//! Each file the engine lets a container map executable gets an inode mark
//! in the container's group, on any filesystem, placed before the engine
//! checks the file for writers and answers the mapping call. From then on:
//! - an open for writing is a permission event (FAN_OPEN_PERM), decided
//!   while the opener waits, before it can write a byte: refused under
//!   `enforce` (a `deny` entry; the file keeps what was measured and the
//!   container runs on), let through and logged as a `tomtou` violation
//!   otherwise, which ends the watch (the file is measured again when
//!   mapped again); both only while a process of the container maps the
//!   file executable or may be about to (`inpod.rs`): once nothing does,
//!   the open goes on unlogged and the watch ends, as IMA lets a file be
//!   written once no mapping holds it;
//! - a write or a close after writing (FAN_MODIFY, FAN_CLOSE_WRITE), which
//!   only a writer that slipped past both checks could make, is a `tomtou`
//!   found after the fact, and kills the container under `enforce`.
//!
//! A script (an executed file that is not ELF) is read by its interpreter
//! after the execution was measured, a line at a time for a shell: rewritten
//! in place meanwhile (`echo cmd >> script`), the interpreter runs what was
//! written. So an executed script gets an inode mark too (no lease: a
//! truncate is seen after the fact), and an open of it for writing *while a
//! process of the pod has it open* (its interpreter; IMA's ToMToU asks the
//! same of the inode's readers) is decided as for a mapped file; with no
//! such process the open goes on and the watch ends (rewriting a script
//! after it ran is common, and it is measured again when executed again).
//!
//! The marks live in the group, which the keeper holds across an imacri
//! restart; the next imacri reads them back from the group's fdinfo (a
//! script's mark asks for no FAN_CLOSE_WRITE, which tells them apart:
//! `readback.rs`).

use nix::sys::fanotify::{MarkFlags, MaskFlags};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;

use super::super::digest::{fd_path, FileKey};
use super::super::engine::{open_for_writing, Engine, Mapper, WatchedAs, WriteWatch};
use super::super::keeper;
use super::super::sys::{LeaseError, SysError, WatchError};
use super::leases::{self, Lease};
use super::{inpod, Group};

/// What an inode mark of a mapped file asks for. FAN_MODIFY comes from
/// these marks only; FAN_OPEN_PERM and FAN_CLOSE_WRITE also from the
/// filesystem marks, so those name a watched file only when it is in the
/// group's set.
pub(super) const WATCHED: MaskFlags = MaskFlags::FAN_OPEN_PERM
    .union(MaskFlags::FAN_MODIFY)
    .union(MaskFlags::FAN_CLOSE_WRITE);

/// What the inode mark of an executed script asks for.
pub(super) const SCRIPT_WATCHED: MaskFlags = MaskFlags::FAN_OPEN_PERM.union(MaskFlags::FAN_MODIFY);

/// How often a watch nothing maps is looked at again when a call was added
/// to it meanwhile, before its file counts as mapped.
const DONE_LOOKS: usize = 3;

/// One watched file of a group.
#[derive(Debug, Default)]
pub(super) struct Watched {
    /// The read lease that sees a truncate (none where the filesystem
    /// gives none: then only the mark watches).
    pub(super) lease: Option<Lease>,
    /// The fd keeper's key for its copy of the lease's file.
    pub(super) key: Option<String>,
    /// The lease broke and is held on (enforce: the container is being
    /// killed, the truncater waits until then).
    pub(super) broken: bool,
    /// An executed script, watched while the pod's processes read it.
    pub(super) script: bool,
    /// The file's identity when the watch began, which the engine checked
    /// to be the one it measured, after the writers check (None: a script,
    /// or a watch read back after a restart).
    pub(super) since: Option<FileKey>,
    /// The calls that mapped it (`inpod::may_map` waits for those in
    /// flight).
    pub(super) calls: inpod::Calls,
    /// Which watch of the inode this is (a sweep ends the one it looked
    /// at, never one placed since).
    pub(super) born: u64,
    /// Where the container had the file when the watch began, for a watch
    /// without a lease: a sweep finds its mark there (`forget_at_path`).
    pub(super) path: Option<Box<std::path::Path>>,
}

/// Where the container has the file open as `fd` (the kernel's name for
/// it, from the container's root); None for a deleted file.
fn container_path(fd: BorrowedFd<'_>) -> Option<Box<std::path::Path>> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let deleted = p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)");
    (p.is_absolute() && !deleted).then(|| p.into_boxed_path())
}

/// The next watch's `born`.
pub(super) fn next_born() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Watched {
    /// A watch the last imacri placed, read back from its mark.
    pub(super) fn read_back(script: bool) -> Watched {
        Watched {
            script,
            // What the last imacri let map it is not known.
            calls: inpod::Calls::unknown(),
            born: next_born(),
            ..Default::default()
        }
    }
}

/// A watch found in place for a file mapped or executed again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Found {
    /// A lease holds the file (so its inode, and its mark).
    pub(super) leased: bool,
    pub(super) born: u64,
}

/// Inode → what watches it.
pub(super) type WatchedFiles = HashMap<(u64, u64), Watched>;

pub(super) fn fstat(fd: BorrowedFd<'_>) -> Result<nix::sys::stat::FileStat, SysError> {
    nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SysError::call("fstat", e))
}

impl WriteWatch for Group {
    fn watch(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<bool, WatchError> {
        self.watch_with(fd, by, |fd| self.reopen(fd))
    }

    fn watch_own(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<bool, WatchError> {
        self.watch_with(fd, by, |fd| fd.try_clone_to_owned())
    }

    fn watch_script(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<(), WatchError> {
        let st = fstat(fd)?;
        let inode = FileKey::of(&st).inode();
        if let Some(found) = self.found(inode, None)? {
            if self.current(fd, inode, found, SCRIPT_WATCHED)? {
                return Ok(());
            }
        }
        self.room(by)?;
        let mut mapped = self.mapped.lock()?;
        if mapped.contains_key(&inode) {
            // Watched by a racing execution meanwhile (the same mark).
            return Ok(());
        }
        // Marked with the table locked: a mark for an entry that is not
        // there would be read back as a script's after a restart anyway.
        self.mark(fd, SCRIPT_WATCHED)?;
        mapped.insert(
            inode,
            Watched {
                script: true,
                born: next_born(),
                path: container_path(fd),
                ..Default::default()
            },
        );
        Ok(())
    }

    fn hold_writer(&self, file: OwnedFd) -> Result<(), WatchError> {
        self.hold(file)
    }

    fn read_closes(&self) {
        if let (Some(c), Some(engine)) = (&self.closes, self.engine.upgrade()) {
            c.read(&engine);
        }
    }

    fn unwatch(&self, fd: BorrowedFd<'_>) {
        if let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) {
            self.forget(Some(fd), FileKey::of(&st).inode());
        }
    }
}

impl Group {
    /// Watches the file open as `fd`, mapped `by`, its lease taken through
    /// the file `own` makes of it (never the process's own open file, which
    /// the process could let go of).
    fn watch_with(
        &self,
        fd: BorrowedFd<'_>,
        by: Mapper,
        own: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<OwnedFd>,
    ) -> Result<bool, WatchError> {
        let st = fstat(fd)?;
        let since = FileKey::of(&st);
        let inode = since.inode();
        if let Some(found) = self.found(inode, Some(by))? {
            if self.current(fd, inode, found, WATCHED)? {
                return Ok(false);
            }
        }
        self.room(by)?;
        // A lease needs an open file of our own. Opened before the mark
        // (our open would ask this very mark otherwise), and never with
        // the table locked: the reader that lets our open through looks
        // the table up for other events meanwhile.
        let own = own(fd);
        // Marks the file's inode (no path): one mark per file, on any
        // filesystem (a file passed in from elsewhere too).
        let marked_by = own.as_ref().map_or(fd, |f| f.as_fd());
        self.mark(marked_by, WATCHED)?;
        let lease = match own
            .map_err(|e| LeaseError::from(SysError::io("opening the file again", e)))
            .and_then(|f| self.lease(f, inode))
        {
            Ok(l) => Some(l),
            // An open writer is the caller's writers check to find; a
            // filesystem without leases leaves the mark alone to watch.
            Err(e) => {
                if !matches!(e, LeaseError::Writers) {
                    if let Some(engine) = self.engine.upgrade() {
                        engine.stats.unleased.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(unsaid) = self.target.measured.quiet.take() {
                        tracing::warn!(container_id = %self.target.measured.container, error = %e, unsaid, "a mapped file has no read lease: a truncate of it is not seen");
                    }
                }
                None
            }
        };
        let mut mapped = self.mapped.lock()?;
        if let Some(w) = mapped.get_mut(&inode) {
            // Watched by a racing call meanwhile (the same mark): ours goes.
            w.calls.add(by);
            return Ok(false);
        }
        // Kept while the table is locked, so a key never outlives its entry.
        let key = lease.as_ref().and_then(|l| self.keep(l, inode));
        let mut calls = inpod::Calls::default();
        calls.add(by);
        let path = lease.is_none().then(|| container_path(fd)).flatten();
        mapped.insert(
            inode,
            Watched {
                lease,
                key,
                broken: false,
                script: false,
                path,
                since: Some(since),
                calls,
                born: next_born(),
            },
        );
        Ok(true)
    }

    /// Places the inode mark of the file open as `fd` (or adds `mask` to
    /// it). The mark holds the inode while it lasts; the kernel drops it
    /// when the file is deleted and nothing has it open any more.
    pub(super) fn mark(&self, fd: BorrowedFd<'_>, mask: MaskFlags) -> Result<(), WatchError> {
        self.fan
            .mark::<std::path::Path>(MarkFlags::FAN_MARK_ADD, mask, Some(fd.as_raw_fd()), None)
            .map_err(|e| match e {
                nix::errno::Errno::ENOSPC => WatchError::NodeMarks {
                    limit: super::groups::limit(std::path::Path::new(super::groups::MARKS_SYSCTL))
                        .map_or_else(|e| format!("unreadable: {e}"), |n| n.to_string()),
                },
                e => SysError::call("fanotify inode mark", e).into(),
            })
    }

    /// Whether `inode` is watched already; if so, `by` is added to its
    /// callers (in the same look, so that a watch ended for nobody mapping
    /// the file is one this call was not added to: `done_with_mapping`).
    pub(super) fn found(
        &self,
        inode: (u64, u64),
        by: Option<Mapper>,
    ) -> Result<Option<Found>, WatchError> {
        let mut mapped = self.mapped.lock()?;
        Ok(mapped.get_mut(&inode).map(|w| {
            if let Some(by) = by {
                w.calls.add(by);
            }
            Found {
                leased: w.lease.is_some(),
                born: w.born,
            }
        }))
    }

    pub(super) fn watched(&self, inode: (u64, u64)) -> bool {
        self.mapped.lock().is_ok_and(|m| m.contains_key(&inode))
    }

    /// Whether the watched file's content is as it was when its watch
    /// began (`now`, its identity as of an event): a close after writing
    /// that shows no write since was queued before the watch (a file
    /// written, closed and then mapped: the event is read after the
    /// mapping was decided). Size and modification time only: the change
    /// time also moves when the file is renamed, linked, deleted or
    /// chmod-ed, none of which changes what the mapping runs. Until
    /// 2026-12-06 the whole identity counted: a file written, mapped and
    /// then deleted (a library extracted, loaded and removed, as plugin
    /// loaders do) before the reader came to the close was a `tomtou`
    /// violation, which under `enforce` killed the container. A write
    /// after the watch began is a FAN_MODIFY of the watch's own mark
    /// whatever the change time says, and one before it the engine's
    /// identity check refused (`decide.rs`).
    fn unchanged_since_watched(&self, now: &FileKey) -> bool {
        let content = |k: &FileKey| (k.dev, k.ino, k.size, k.mtime);
        self.mapped.lock().is_ok_and(|m| {
            m.get(&now.inode())
                .and_then(|w| w.since.as_ref())
                .is_some_and(|since| content(since) == content(now))
        })
    }

    fn is_script(&self, inode: (u64, u64)) -> bool {
        self.mapped
            .lock()
            .is_ok_and(|m| m.get(&inode).is_some_and(|w| w.script))
    }

    /// Whether a process of the container's pid namespace has `inode`
    /// open (its interpreter reading it): their fds, as the container's
    /// own procfs lists them. An opener being decided has no fd yet.
    fn open_in_pod(&self, inode: (u64, u64)) -> bool {
        inpod::has_open(&self.target.root.join("proc"), inode)
    }

    /// Whether nothing of the container maps the watched file `inode`
    /// executable, nor may be about to (`inpod::may_map`, for the calls
    /// that mapped it): if so its watch ends (the mark named by `fd`, the
    /// file, where it has no lease). A call added meanwhile started its
    /// writers check after the look began: looked at again (without that,
    /// a call whose writer closed without writing would map the file with
    /// its watch gone).
    fn done_with_mapping(&self, fd: Option<BorrowedFd<'_>>, inode: (u64, u64)) -> bool {
        let procfs = self.target.root.join("proc");
        for _ in 0..DONE_LOOKS {
            let calls = match self.mapped.lock() {
                Ok(m) => match m.get(&inode) {
                    Some(w) => w.calls.clone(),
                    // Ended meanwhile (another opener's look): done.
                    None => return true,
                },
                Err(_) => return false,
            };
            if inpod::may_map(&procfs, inode, &calls) {
                return false;
            }
            self.test_look_delay(fd);
            if self.forget_if(fd, inode, |w| w.calls.added == calls.added) {
                return true;
            }
        }
        false
    }

    /// Our own read-only open file of the file open as `fd` (the mapping
    /// process's, or the kernel's for us). O_NONBLOCK: an open waits for
    /// whoever holds a write lease on the file (up to fs.lease-break-time,
    /// 45 s), and a process in the pod can hold one; this one fails with
    /// EWOULDBLOCK instead (no lease of ours then) and the hashing thread,
    /// which every pod shares, goes on.
    fn reopen(&self, fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(&path)
                .map(OwnedFd::from)
        };
        match self.engine.upgrade() {
            Some(e) => e.own_open(open),
            None => Err(std::io::Error::other("the engine is gone")),
        }
    }

    fn lease(&self, file: OwnedFd, inode: (u64, u64)) -> Result<Lease, LeaseError> {
        leases::take(file, self.me.clone(), inode, &self.target.measured.pod)
    }

    /// Hands the keeper a copy of the lease's file, so that the lease
    /// outlives an imacri restart.
    fn keep(&self, lease: &Lease, inode: (u64, u64)) -> Option<String> {
        let k = self.keeper.as_ref()?;
        let key = keeper::lease_key(&self.target.measured.container, inode);
        match k.put(&key, lease.fd()) {
            Ok(()) => Some(key),
            Err(e) => {
                tracing::warn!(container_id = %self.target.measured.container, error = %e, "fd keeper: a lease not kept; after an imacri restart a truncate of this file is not seen");
                None
            }
        }
    }

    pub(super) fn drop_key(&self, key: Option<String>) {
        if let (Some(k), Some(key)) = (&self.keeper, key) {
            let _ = k.drop_key(&key);
        }
    }

    /// Test only (`IMACRI_TEST_WRITE_LOOK_DELAY`): a wide window between
    /// the look that found nothing mapping the file open as `fd` and the
    /// end of its watch.
    fn test_look_delay(&self, fd: Option<BorrowedFd<'_>>) {
        let (Some(fd), Some(engine)) = (fd, self.engine.upgrade()) else {
            return;
        };
        if let Some((slow, delay)) = &engine.write_look_delay {
            if fd_path(fd).contains(slow.as_str()) {
                std::thread::sleep(*delay);
            }
        }
    }

    /// Ends the watch of `inode`. The mark is named by the lease's file,
    /// or by `fd` (the file) where there is no lease.
    fn forget(&self, fd: Option<BorrowedFd<'_>>, inode: (u64, u64)) {
        self.forget_if(fd, inode, |_| true);
    }

    /// As [`forget`](Self::forget) where the watch passes `still` (looked
    /// at with the table locked). Whether the watch is gone.
    pub(super) fn forget_if(
        &self,
        fd: Option<BorrowedFd<'_>>,
        inode: (u64, u64),
        still: impl FnOnce(&Watched) -> bool,
    ) -> bool {
        let removed = self.mapped.lock().ok().and_then(|mut m| {
            match m.get(&inode) {
                Some(w) if still(w) => m.remove(&inode),
                Some(_) => None,
                // Gone already.
                None => None,
            }
        });
        let Some(w) = removed else {
            return !self.watched(inode);
        };
        if let Some(by) = w.lease.as_ref().map(|l| l.fd()).or(fd) {
            let mask = if w.script { SCRIPT_WATCHED } else { WATCHED };
            let _ = self.fan.mark::<std::path::Path>(
                MarkFlags::FAN_MARK_REMOVE,
                mask,
                Some(by.as_raw_fd()),
                None,
            );
        }
        self.drop_key(w.key);
        // The lease goes last, when the watch is over.
        drop(w.lease);
        true
    }

    /// Gives up the lease held through `fd` on the watched `inode` for
    /// another file's (`leases.rs`: imacri's share of open files, or the
    /// pod's own limit, taken):
    /// the watch goes on with its mark alone, as one that got no lease
    /// (a truncate of the file is seen after the fact, by FAN_MODIFY).
    /// Not while the table is busy (the caller may hold another group's
    /// table), nor a lease being broken. Whether it was given up.
    pub(super) fn give_up_lease(&self, inode: (u64, u64), fd: std::os::fd::RawFd) -> bool {
        let (lease, key) = {
            let Ok(mut m) = self.mapped.try_lock() else {
                return false;
            };
            let Some(w) = m.get_mut(&inode) else {
                return false;
            };
            if w.broken || w.lease.as_ref().is_none_or(|l| l.fd().as_raw_fd() != fd) {
                return false;
            }
            let Some(lease) = w.lease.take() else {
                return false;
            };
            // Where a watch without a lease finds its file (`sweep.rs`).
            w.path = container_path(lease.fd());
            (lease, w.key.take())
        };
        self.drop_key(key);
        lease.give_up();
        if let Some(engine) = self.engine.upgrade() {
            engine.stats.unleased.fetch_add(1, Ordering::Relaxed);
            engine.stats.leases_given_up.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(container_id = %self.target.measured.container, "a lease given up for another file's: a truncate of this file is seen after the fact");
        true
    }

    /// The lease on `inode` broke: someone truncates the file (an open for
    /// writing asks the mark first and is decided there). The truncater
    /// waits while the `tomtou` is logged; under `enforce` the container is
    /// killed and the lease held until it is gone, so a truncater in the
    /// container dies before it cuts anything; otherwise the watch ends
    /// and the truncate goes on. A file nothing maps any more (nor is
    /// about to: the truncater's write access counts before the lease
    /// breaks, as an opener's does) is cut as any file, the watch ended.
    pub(super) fn lease_broken(&self, inode: (u64, u64), how: &str) {
        let Some(engine) = self.engine.upgrade() else {
            return;
        };
        let path = {
            let Ok(mut m) = self.mapped.lock() else {
                return;
            };
            let Some(w) = m.get_mut(&inode).filter(|w| !w.broken) else {
                return;
            };
            w.broken = true;
            w.lease.as_ref().map(|l| fd_path(l.fd()))
        };
        let Some(path) = path else { return };
        if self.done_with_mapping(None, inode) {
            return;
        }
        engine.tomtou(&self.target.measured, &path, WatchedAs::Mapping, how);
        if !self.target.measured.keeps_mappings() {
            self.forget(None, inode);
        }
    }
}

/// A notification (`mask`: FAN_MODIFY or FAN_CLOSE_WRITE) of the file open
/// as `fd`: a `tomtou` found after the fact when it is a watched file.
pub(super) fn written(
    engine: &Engine,
    group: &Group,
    mask: MaskFlags,
    fd: BorrowedFd<'_>,
    inode: (u64, u64),
) {
    // FAN_MODIFY only comes from the marks of watched files (a writer open
    // before a watch's mark, which its writers check finds, can write
    // before the watch is in the table: that one is no watch's yet).
    let how = if mask.contains(MaskFlags::FAN_MODIFY) {
        if !group.watched(inode) {
            return;
        }
        "written"
    } else if mask.contains(MaskFlags::FAN_CLOSE_WRITE) && group.watched(inode) {
        // Nothing was written since the watch began: the writer closed
        // before the file was measured for the mapping (the engine checks
        // the identity it measured after the writers check, so a write in
        // between refused the mapping instead).
        let now = fstat(fd).map(|st| FileKey::of(&st));
        if now.is_ok_and(|k| group.unchanged_since_watched(&k)) {
            return;
        }
        // A deleted watched file's inode number taken by this new one:
        // its creation is no write under a watch.
        if !group.still_watching(fd, inode) {
            return;
        }
        "closed after writing"
    } else {
        return;
    };
    // A script nobody reads any more (a truncate by path; writers are
    // decided at their open): written after it ran, which is fine.
    let script = group.is_script(inode);
    group.forget(Some(fd), inode);
    if script && !group.open_in_pod(inode) {
        return;
    }
    let what = if script {
        WatchedAs::Script
    } else {
        WatchedAs::Mapping
    };
    engine.tomtou(&group.target.measured, &fd_path(fd), what, how);
}

/// A permission event for an open of the file open as `fd`: None unless it
/// is a watched file opened by a writer (the opener's write access is
/// counted before fanotify asks), else whether to let the open through.
/// A mapped file that nothing maps any more (nor is about to) is written
/// as any file: its watch ends, and mapping it again measures it again (as
/// IMA, which lets a file be written once no mapping holds it). Until
/// 2026-12-04 such a file stayed unwritable under `enforce` and
/// `anonymous_exec = "deny"` for the container's life.
pub(super) fn write_open(
    engine: &Engine,
    group: &Group,
    fd: BorrowedFd<'_>,
    inode: (u64, u64),
) -> Option<bool> {
    if !group.watched(inode) || !open_for_writing(fd) {
        return None;
    }
    let script = group.is_script(inode);
    if script && !group.open_in_pod(inode) {
        // Run and done: rewritten, and measured again if executed again.
        group.forget(Some(fd), inode);
        return Some(true);
    }
    if !script && group.done_with_mapping(Some(fd), inode) {
        return Some(true);
    }
    let what = if script {
        WatchedAs::Script
    } else {
        WatchedAs::Mapping
    };
    let allow = engine.write_open(&group.target.measured, &fd_path(fd), what);
    if allow {
        group.forget(Some(fd), inode);
    }
    Some(allow)
}
