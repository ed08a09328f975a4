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
//!   mapped again);
//! - a write or a close after writing (FAN_MODIFY, FAN_CLOSE_WRITE), which
//!   only a writer that slipped past both checks could make, is a `tomtou`
//!   found after the fact, and kills the container under `enforce`.
//!
//! The marks live in the group, which the keeper holds across an imacri
//! restart; the next imacri reads them back from the group's fdinfo.

use nix::sys::fanotify::{MarkFlags, MaskFlags};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::super::digest::{fd_path, FileKey};
use super::super::engine::{open_for_writing, Engine, WriteWatch};
use super::Group;

/// What an inode mark of a mapped file asks for. FAN_MODIFY comes from
/// these marks only; FAN_OPEN_PERM and FAN_CLOSE_WRITE also from the
/// filesystem marks, so those name a watched file only when it is in the
/// group's set.
pub(super) const WATCHED: MaskFlags = MaskFlags::FAN_OPEN_PERM
    .union(MaskFlags::FAN_MODIFY)
    .union(MaskFlags::FAN_CLOSE_WRITE);

impl WriteWatch for Group {
    fn watch(&self, fd: BorrowedFd<'_>) -> Result<bool, String> {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| e.to_string())?;
        let inode = FileKey::of(&st).inode();
        let mut mapped = self.mapped.lock().map_err(|e| e.to_string())?;
        if mapped.contains(&inode) {
            return Ok(false);
        }
        // Marks the fd's own inode (no path): one mark per file, on any
        // filesystem (a file passed in from elsewhere too).
        match self.fan.mark::<std::path::Path>(
            MarkFlags::FAN_MARK_ADD,
            WATCHED,
            Some(fd.as_raw_fd()),
            None,
        ) {
            Ok(()) => Ok(mapped.insert(inode)),
            Err(e) => Err(format!("fanotify inode mark: {e}")),
        }
    }

    fn unwatch(&self, fd: BorrowedFd<'_>) {
        if let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) {
            self.forget(fd, FileKey::of(&st).inode());
        }
    }
}

impl Group {
    fn watched(&self, inode: (u64, u64)) -> bool {
        self.mapped.lock().is_ok_and(|m| m.contains(&inode))
    }

    fn forget(&self, fd: BorrowedFd<'_>, inode: (u64, u64)) {
        let was = self.mapped.lock().is_ok_and(|mut m| m.remove(&inode));
        if was {
            let _ = self.fan.mark::<std::path::Path>(
                MarkFlags::FAN_MARK_REMOVE,
                WATCHED,
                Some(fd.as_raw_fd()),
                None,
            );
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
    // FAN_MODIFY only comes from the marks of mapped files.
    let how = if mask.contains(MaskFlags::FAN_MODIFY) {
        "written"
    } else if mask.contains(MaskFlags::FAN_CLOSE_WRITE) && group.watched(inode) {
        "closed after writing"
    } else {
        return;
    };
    group.forget(fd, inode);
    engine.tomtou(&group.target.measured, &fd_path(fd), how);
}

/// A permission event for an open of the file open as `fd`: None unless it
/// is a watched file opened by a writer (the opener's write access is
/// counted before fanotify asks), else whether to let the open through.
pub(super) fn write_open(
    engine: &Engine,
    group: &Group,
    fd: BorrowedFd<'_>,
    inode: (u64, u64),
) -> Option<bool> {
    if !group.watched(inode) || !open_for_writing(fd) {
        return None;
    }
    let allow = engine.write_open(&group.target.measured, &fd_path(fd));
    if allow {
        group.forget(fd, inode);
    }
    Some(allow)
}

/// The files group `fan` watches for writers: its inode marks, as its
/// fdinfo lists them (what the last imacri placed, after a restart).
pub(super) fn marked_inodes(fan: BorrowedFd<'_>) -> HashSet<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fan.as_raw_fd()))
        .map(|t| parse_marks(&t))
        .unwrap_or_default()
}

/// `fanotify ino:<hex> sdev:<hex> mflags:<hex> mask:<hex> ...` lines whose
/// mask has FAN_MODIFY; sdev is the kernel's dev_t (major << 20 | minor).
fn parse_marks(fdinfo: &str) -> HashSet<(u64, u64)> {
    fdinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("fanotify ino:")?.split_whitespace();
            let ino = u64::from_str_radix(f.next()?, 16).ok()?;
            let sdev = u32::from_str_radix(f.next()?.strip_prefix("sdev:")?, 16).ok()?;
            let mask = u64::from_str_radix(f.find_map(|x| x.strip_prefix("mask:"))?, 16).ok()?;
            (mask & MaskFlags::FAN_MODIFY.bits() != 0)
                .then(|| (libc::makedev(sdev >> 20, sdev & 0xfffff), ino))
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
        assert_eq!(got, HashSet::from([(libc::makedev(254, 0), 0x263)]));
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
            HashSet::from([(m.dev(), m.ino())])
        );
    }
}
