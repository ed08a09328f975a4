//! After a restart: a group's watched files read back from the group the
//! fd keeper held (its inode marks, in its fdinfo) with their kept leases.

use nix::sys::fanotify::MaskFlags;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::super::digest::FileKey;
use super::writes::{Watched, WatchedFiles};
use super::{leases, Group};

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
        .map(|(i, script)| (i, Watched::read_back(script)))
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

/// The files group `fan` watches for writers: its inode marks, as its
/// fdinfo lists them (what the last imacri placed, after a restart), each
/// with whether it is a script's.
pub(super) fn marked_inodes(fan: BorrowedFd<'_>) -> HashMap<(u64, u64), bool> {
    read_marks(fan).unwrap_or_default()
}

/// [`marked_inodes`], or why the group's fdinfo cannot be read.
pub(super) fn read_marks(fan: BorrowedFd<'_>) -> std::io::Result<HashMap<(u64, u64), bool>> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fan.as_raw_fd()))
        .map(|t| parse_marks(&t))
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
    use super::super::writes::WATCHED;
    use super::*;
    use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags};
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
