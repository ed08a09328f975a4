//! Watches that end without a writer. The kernel drops a watch's mark
//! when its file is deleted and nothing has it open, while the table still
//! has the watch: a new file that takes the deleted one's inode number is
//! not watched by it (`current`, `still_watching`). And a container's
//! group watches at most `ima.max_watched_files` files at a time: at the
//! limit the watches nothing needs any more end first (`sweep`), past it
//! the mapping or script is refused (`room`).

use nix::sys::fanotify::{MarkFlags, MaskFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use super::super::digest::FileKey;
use super::super::engine::Mapper;
use super::super::sys::{SysError, WatchError};
use super::writes::{fstat, Found, Watched, SCRIPT_WATCHED, WATCHED};
use super::{inpod, leases, Group};

/// New watches a group makes between two sweeps for its pod's lease
/// limit (`Group::room`).
const RESWEEP: usize = 64;

/// A watch as a sweep looked at it.
struct Looked {
    inode: (u64, u64),
    calls: inpod::Calls,
    script: bool,
    born: u64,
    leased: bool,
    /// Where a watch without a lease had its file.
    path: Option<Box<std::path::Path>>,
}

impl Group {
    /// Whether the watch `found` of `inode`, which the file open as `fd`
    /// has now, is still this file's: its mark is in place (a lease holds
    /// the file, so it is; else asked of the kernel). If not, the kernel
    /// dropped the mark with a deleted file whose inode number this new
    /// file took, and the stale watch ends here (its next watch is
    /// placed by the caller). Until 2026-12-06 such a file counted as
    /// watched: mapped executable with no mark, it could be rewritten
    /// under its mapping unseen (a script run and deleted, then a new
    /// file mapped, as `escape map-flood` does, took its number).
    pub(super) fn current(
        &self,
        fd: BorrowedFd<'_>,
        inode: (u64, u64),
        found: Found,
        mask: MaskFlags,
    ) -> Result<bool, WatchError> {
        if !self.ours(fd, inode, found) {
            return Ok(false);
        }
        if !found.leased {
            // With the mask of this use (a script's file now mapped).
            self.mark(fd, mask)?;
        }
        Ok(true)
    }

    /// Whether the file open as `fd` has this group's mark. The kernel has
    /// no call that asks; but it refuses (EEXIST) to add an evictable mark
    /// where a mark that holds its inode (ours) is, and otherwise places
    /// one, which is removed again. A kernel before 5.19 cannot tell: true.
    fn marked(&self, fd: BorrowedFd<'_>) -> Result<bool, SysError> {
        let probe = |flags| {
            self.fan.mark::<std::path::Path>(
                flags,
                MaskFlags::FAN_MODIFY,
                Some(fd.as_raw_fd()),
                None,
            )
        };
        match probe(MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_EVICTABLE) {
            Err(nix::errno::Errno::EEXIST) | Err(nix::errno::Errno::EINVAL) => Ok(true),
            Ok(()) => {
                let _ = probe(MarkFlags::FAN_MARK_REMOVE);
                Ok(false)
            }
            Err(e) => Err(SysError::call("fanotify inode mark", e)),
        }
    }

    /// Whether the watch of `inode`, of which the file open as `fd` has
    /// just been closed after writing, is this file's (see `current`); a
    /// stale one ends here. What cannot be told counts as the file's.
    pub(super) fn still_watching(&self, fd: BorrowedFd<'_>, inode: (u64, u64)) -> bool {
        let Ok(Some(found)) = self.found(inode, None) else {
            return true;
        };
        self.ours(fd, inode, found)
    }

    /// Whether the watch `found` of `inode` is the file's open as `fd` (a
    /// lease holds the file, or the file has the group's mark); if not, it
    /// ends. What cannot be told counts as the file's.
    fn ours(&self, fd: BorrowedFd<'_>, inode: (u64, u64), found: Found) -> bool {
        if found.leased || self.marked(fd).unwrap_or(true) {
            return true;
        }
        self.forget_if(None, inode, |w| w.born == found.born);
        false
    }

    /// Room for one more watch: a container's group watches at most
    /// `ima.max_watched_files` files at a time, so a container mapping ever
    /// new files and keeping them mapped cannot grow imacri's table, nor use
    /// up the node's marks, without bound. At the limit the watches nothing
    /// needs any more end first (`sweep`); past it, the mapping or script
    /// is refused (`WatchError::Full`). `by`: the caller the room is for,
    /// whose own call in flight is this one.
    ///
    /// A pod at its lease limit (`share::PER_POD`, below the watch limit)
    /// sweeps too, so that the leases of files its exited processes mapped
    /// do not leave its new mappings unleased; once per [`RESWEEP`] new
    /// watches of the group at most, as a sweep that ends nothing (the
    /// pod's other containers hold its leases, or its files are all still
    /// mapped) would otherwise be paid by every mapping after it.
    pub(super) fn room(&self, by: Mapper) -> Result<(), WatchError> {
        let limit = self
            .engine
            .upgrade()
            .map_or(usize::MAX, |e| e.max_watched_files());
        let len = self.mapped.lock()?.len();
        if len < limit {
            let due = len >= self.swept_at.load(Ordering::Relaxed) + RESWEEP;
            if due && leases::pod_full(&self.target.measured.pod) {
                self.swept_at.store(len, Ordering::Relaxed);
                let ended = self.sweep(by);
                tracing::debug!(container_id = %self.target.measured.container, ended, "watches swept at the pod's lease limit");
                self.count_swept(ended);
                self.swept_at
                    .fetch_min(len - ended.min(len), Ordering::Relaxed);
            }
            return Ok(());
        }
        let ended = self.sweep(by);
        tracing::debug!(container_id = %self.target.measured.container, ended, limit, "watches swept");
        self.count_swept(ended);
        if self.mapped.lock()?.len() < limit {
            return Ok(());
        }
        Err(WatchError::Full(limit))
    }

    fn count_swept(&self, ended: usize) {
        if let Some(e) = self.engine.upgrade() {
            e.stats
                .swept_watches
                .fetch_add(ended as u64, Ordering::Relaxed);
        }
    }

    /// Ends the watches nothing needs any more: those whose mark the kernel
    /// dropped (their file was deleted), and those whose file no process of
    /// the container holds (maps executable; for a script, has open) nor
    /// may be about to (a mapping call or an execution in flight), as an
    /// open for writing would end them (`write_open`). The mark to remove
    /// is named by the lease's file, or, for a watch without a lease (a
    /// script's), found where the file was (`forget_at_path`); one whose
    /// path names another file now stays. How many ended.
    /// `by`'s task is not waited for: its call in flight is the one the
    /// sweep is made for (an execution waiting for its answer shows as
    /// in `execve`, which would hold every script's watch).
    fn sweep(&self, by: Mapper) -> usize {
        // The table first, then the marks: a watch is in the table only
        // once its mark is placed, so one missing from the marks read after
        // is one the kernel dropped.
        let looked: Vec<Looked> = match self.mapped.lock() {
            Ok(m) => m
                .iter()
                .map(|(i, w)| Looked {
                    inode: *i,
                    calls: w.calls.clone(),
                    script: w.script,
                    born: w.born,
                    leased: w.lease.is_some(),
                    path: w.path.clone(),
                })
                .collect(),
            Err(_) => return 0,
        };
        // By inode number alone: the kernel names a mark's device as its
        // superblock's, which is not what fstat says on every filesystem
        // (a btrfs subvolume's), and a watch found marked stays. Unreadable:
        // no mark counts as dropped.
        let marked: Option<std::collections::HashSet<u64>> =
            super::readback::read_marks(self.fan.as_fd())
                .ok()
                .map(|m| m.into_keys().map(|(_, ino)| ino).collect());
        let dropped = |i: &(u64, u64)| marked.as_ref().is_some_and(|m| !m.contains(&i.1));
        let procfs = self.target.root.join("proc");
        let unheld = inpod::unheld(
            &procfs,
            inpod::ns_tid(&by),
            looked
                .iter()
                .filter(|l| (l.leased || l.path.is_some()) && !dropped(&l.inode))
                .map(|l| (l.inode, &l.calls, l.script)),
        );
        let mut ended = 0;
        for l in &looked {
            // Unless a call was added meanwhile (as `done_with_mapping`).
            let still = |w: &Watched| w.born == l.born && w.calls.added == l.calls.added;
            let gone = if dropped(&l.inode) || (l.leased && unheld.contains(&l.inode)) {
                self.forget_if(None, l.inode, still)
            } else if let (Some(path), true) = (&l.path, unheld.contains(&l.inode)) {
                self.forget_at_path(l.inode, path, still)
            } else {
                false
            };
            ended += usize::from(gone);
        }
        ended
    }

    /// Ends the watch of `inode` that passes `still`, its mark found at
    /// `path` in the container (where it was when the watch began); not
    /// if the path now names another file (renamed or replaced: the watch
    /// stays until a writer or the container ends it). With the table
    /// locked throughout, so that no call finds the watch in place while
    /// its mark goes, nor places a mark this removes; the path is opened
    /// `O_PATH` (no open of the file, no event of its own).
    fn forget_at_path(
        &self,
        inode: (u64, u64),
        path: &std::path::Path,
        still: impl FnOnce(&Watched) -> bool,
    ) -> bool {
        let Ok(mut m) = self.mapped.lock() else {
            return false;
        };
        let mask = match m.get(&inode) {
            Some(w) if still(w) => {
                if w.script {
                    SCRIPT_WATCHED
                } else {
                    WATCHED
                }
            }
            _ => return false,
        };
        let Ok(file) = super::volumes::open_in_root(&self.target.root, path) else {
            return false;
        };
        if fstat(file.as_fd()).ok().map(|st| FileKey::of(&st).inode()) != Some(inode) {
            return false;
        }
        // Through the O_PATH fd's link: fanotify_mark takes no O_PATH fd.
        let at = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if self
            .fan
            .mark(MarkFlags::FAN_MARK_REMOVE, mask, None, Some(&at))
            .is_err()
        {
            return false;
        }
        if let Some(w) = m.remove(&inode) {
            self.drop_key(w.key);
        }
        true
    }
}
