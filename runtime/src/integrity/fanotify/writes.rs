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
//! script's mark asks for no FAN_CLOSE_WRITE, which tells them apart).

use nix::sys::fanotify::{MarkFlags, MaskFlags};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;

use super::super::digest::{fd_path, FileKey};
use super::super::engine::{open_for_writing, Engine, WatchedAs, WriteWatch};
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
const SCRIPT_WATCHED: MaskFlags = MaskFlags::FAN_OPEN_PERM.union(MaskFlags::FAN_MODIFY);

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
    broken: bool,
    /// An executed script, watched while the pod's processes read it.
    script: bool,
    /// The file's identity when the watch began, which the engine checked
    /// to be the one it measured, after the writers check (None: a script,
    /// or a watch read back after a restart).
    since: Option<FileKey>,
}

/// Inode → what watches it.
pub(super) type WatchedFiles = HashMap<(u64, u64), Watched>;

fn fstat(fd: BorrowedFd<'_>) -> Result<nix::sys::stat::FileStat, SysError> {
    nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SysError::call("fstat", e))
}

impl WriteWatch for Group {
    fn watch(&self, fd: BorrowedFd<'_>) -> Result<bool, WatchError> {
        self.watch_with(fd, |fd| self.reopen(fd))
    }

    fn watch_own(&self, fd: BorrowedFd<'_>) -> Result<bool, WatchError> {
        self.watch_with(fd, |fd| fd.try_clone_to_owned())
    }

    fn watch_script(&self, fd: BorrowedFd<'_>) -> Result<(), WatchError> {
        let st = fstat(fd)?;
        let inode = FileKey::of(&st).inode();
        if self.watched(inode) {
            return Ok(());
        }
        let mut mapped = self.mapped.lock()?;
        if mapped.contains_key(&inode) {
            return Ok(());
        }
        // Marked with the table locked: a mark for an entry that is not
        // there would be read back as a script's after a restart anyway.
        self.fan
            .mark::<std::path::Path>(
                MarkFlags::FAN_MARK_ADD,
                SCRIPT_WATCHED,
                Some(fd.as_raw_fd()),
                None,
            )
            .map_err(|e| SysError::call("fanotify inode mark", e))?;
        mapped.insert(
            inode,
            Watched {
                script: true,
                ..Default::default()
            },
        );
        Ok(())
    }

    fn hold_writer(&self, file: OwnedFd) -> Result<(), WatchError> {
        self.hold(file)
    }

    fn unwatch(&self, fd: BorrowedFd<'_>) {
        if let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) {
            self.forget(Some(fd), FileKey::of(&st).inode());
        }
    }
}

impl Group {
    /// Watches the file open as `fd`, its lease taken through the file
    /// `own` makes of it (never the process's own open file, which the
    /// process could let go of).
    fn watch_with(
        &self,
        fd: BorrowedFd<'_>,
        own: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<OwnedFd>,
    ) -> Result<bool, WatchError> {
        let st = fstat(fd)?;
        let since = FileKey::of(&st);
        let inode = since.inode();
        if self.watched(inode) {
            return Ok(false);
        }
        // A lease needs an open file of our own. Opened before the mark
        // (our open would ask this very mark otherwise), and never with
        // the table locked: the reader that lets our open through looks
        // the table up for other events meanwhile.
        let own = own(fd);
        // Marks the file's inode (no path): one mark per file, on any
        // filesystem (a file passed in from elsewhere too).
        let marked_by = own.as_ref().map_or(fd, |f| f.as_fd());
        self.fan
            .mark::<std::path::Path>(
                MarkFlags::FAN_MARK_ADD,
                WATCHED,
                Some(marked_by.as_raw_fd()),
                None,
            )
            .map_err(|e| SysError::call("fanotify inode mark", e))?;
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
        if mapped.contains_key(&inode) {
            // Watched by a racing call meanwhile (the same mark): ours goes.
            return Ok(false);
        }
        // Kept while the table is locked, so a key never outlives its entry.
        let key = lease.as_ref().and_then(|l| self.keep(l, inode));
        mapped.insert(
            inode,
            Watched {
                lease,
                key,
                broken: false,
                script: false,
                since: Some(since),
            },
        );
        Ok(true)
    }

    fn watched(&self, inode: (u64, u64)) -> bool {
        self.mapped.lock().is_ok_and(|m| m.contains_key(&inode))
    }

    /// Whether the watched file is as it was when its watch began (`now`,
    /// its identity as of an event): a close after writing that shows no
    /// write since was queued before the watch (a file written, closed and
    /// then mapped: the event is read after the mapping was decided).
    fn unchanged_since_watched(&self, now: &FileKey) -> bool {
        self.mapped.lock().is_ok_and(|m| {
            m.get(&now.inode())
                .is_some_and(|w| w.since.as_ref() == Some(now))
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

    /// Whether a process of the container may map `inode` executable
    /// (`inpod::may_map`).
    fn mapped_in_pod(&self, inode: (u64, u64)) -> bool {
        inpod::may_map(&self.target.root.join("proc"), inode)
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

    fn drop_key(&self, key: Option<String>) {
        if let (Some(k), Some(key)) = (&self.keeper, key) {
            let _ = k.drop_key(&key);
        }
    }

    /// Ends the watch of `inode`. The mark is named by the lease's file,
    /// or by `fd` (the file) where there is no lease.
    fn forget(&self, fd: Option<BorrowedFd<'_>>, inode: (u64, u64)) {
        let Some(w) = self.mapped.lock().ok().and_then(|mut m| m.remove(&inode)) else {
            return;
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
        if !self.mapped_in_pod(inode) {
            self.forget(None, inode);
            return;
        }
        engine.tomtou(&self.target.measured, &path, WatchedAs::Mapping, how);
        if !self.target.measured.keeps_mappings() {
            self.forget(None, inode);
        }
    }
}

/// After a restart: the watched files are the group's inode marks (what
/// the last imacri placed), and their leases are those the keeper held. A
/// lease that broke meanwhile is a truncate nobody answered: logged now,
/// and under `enforce` the container is killed. A mark whose lease is lost
/// watches alone; a lease without its mark is let go.
pub(super) fn take_back(
    group: &std::sync::Arc<Group>,
    marked: HashMap<(u64, u64), bool>,
    kept: Vec<(String, OwnedFd)>,
) {
    let mut files: WatchedFiles = marked
        .into_iter()
        .map(|(i, script)| {
            (
                i,
                Watched {
                    script,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut broke = Vec::new();
    for (key, file) in kept {
        let inode = nix::sys::stat::fstat(file.as_raw_fd()).map(|st| FileKey::of(&st).inode());
        let Some((inode, w)) = inode.ok().and_then(|i| Some(i).zip(files.get_mut(&i))) else {
            group.drop_key(Some(key));
            continue;
        };
        if let Some(k) = &group.keeper {
            k.remember(&key, file.as_fd());
        }
        match leases::adopt(
            file,
            std::sync::Arc::downgrade(group),
            inode,
            &group.target.measured.pod,
        ) {
            Ok((lease, whole)) => {
                if !whole {
                    broke.push(inode);
                }
                w.lease = Some(lease);
                w.key = Some(key);
            }
            Err(e) => {
                tracing::warn!(container_id = %group.target.measured.container, error = %e, "a kept lease cannot be taken back: a truncate of its file is not seen");
                group.drop_key(Some(key));
            }
        }
    }
    if let Ok(mut m) = group.mapped.lock() {
        *m = files;
    }
    for inode in broke {
        group.lease_broken(
            inode,
            "truncated while imacri was down (its read lease broke)",
        );
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
    // FAN_MODIFY only comes from the marks of watched files.
    let how = if mask.contains(MaskFlags::FAN_MODIFY) {
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
    let done_with = match script {
        // Run and done: rewritten, and measured again if executed again.
        true => !group.open_in_pod(inode),
        false => !group.mapped_in_pod(inode),
    };
    if done_with {
        group.forget(Some(fd), inode);
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

/// The files group `fan` watches for writers: its inode marks, as its
/// fdinfo lists them (what the last imacri placed, after a restart), each
/// with whether it is a script's.
pub(super) fn marked_inodes(fan: BorrowedFd<'_>) -> HashMap<(u64, u64), bool> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fan.as_raw_fd()))
        .map(|t| parse_marks(&t))
        .unwrap_or_default()
}

/// `fanotify ino:<hex> sdev:<hex> mflags:<hex> mask:<hex> ...` lines whose
/// mask has FAN_MODIFY (a script's: without FAN_CLOSE_WRITE); sdev is the
/// kernel's dev_t (major << 20 | minor).
fn parse_marks(fdinfo: &str) -> HashMap<(u64, u64), bool> {
    fdinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("fanotify ino:")?.split_whitespace();
            let ino = u64::from_str_radix(f.next()?, 16).ok()?;
            let sdev = u32::from_str_radix(f.next()?.strip_prefix("sdev:")?, 16).ok()?;
            let mask = u64::from_str_radix(f.find_map(|x| x.strip_prefix("mask:"))?, 16).ok()?;
            let script = mask & MaskFlags::FAN_CLOSE_WRITE.bits() == 0;
            (mask & MaskFlags::FAN_MODIFY.bits() != 0)
                .then(|| ((libc::makedev(sdev >> 20, sdev & 0xfffff), ino), script))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn fdinfo_lines_give_the_watched_inodes() {
        let info = "pos:\t0\nflags:\t02000002\nfanotify flags:5 event-flags:8000\n\
            fanotify ino:263 sdev:fe00000 mflags:0 mask:1000a ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:6302000000000000\n\
            fanotify ino:3 sdev:1600005 mflags:0 mask:8 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:00\n\
            fanotify sdev:fe00000 mflags:0 mask:40008 ignored_mask:0\n\
            fanotify mnt_id:1c mflags:0 mask:40000 ignored_mask:0\n";
        let got = parse_marks(info);
        assert_eq!(
            got,
            HashMap::from([((libc::makedev(254, 0), 0x263), false)])
        );
        let script = "fanotify ino:9 sdev:fe00000 mflags:0 mask:10002 ignored_mask:0\n";
        assert_eq!(
            parse_marks(script),
            HashMap::from([((libc::makedev(254, 0), 9), true)])
        );
    }

    /// The fdinfo of a real group names a marked file as fstat does
    /// (fanotify_init needs CAP_SYS_ADMIN: the tests run as root).
    #[test]
    fn a_marked_file_is_read_back_from_the_group() {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
            EventFFlags::O_RDONLY,
        )
        .unwrap();
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        fan.mark::<std::path::Path>(MarkFlags::FAN_MARK_ADD, WATCHED, Some(f.as_raw_fd()), None)
            .unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(
            marked_inodes(fan.as_fd()),
            HashMap::from([((m.dev(), m.ino()), false)])
        );
    }
}
