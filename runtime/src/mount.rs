//! Mounting containerd snapshot mounts on the host (to read a container's
//! /etc/passwd before it runs), tmpfs for pod shm, and reading this
//! process's mountinfo.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `struct mount_attr` (linux/mount.h), for `mount_setattr(2)`.
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `mount_setattr(dirfd, path, flags, attr)`; returns the raw result (only
/// async-signal-safe calls: usable in a forked child).
///
/// # Safety
/// `path` must be a valid C string.
pub(crate) unsafe fn mount_setattr(
    dirfd: i32,
    path: *const libc::c_char,
    flags: libc::c_uint,
    attr: &MountAttr,
) -> libc::c_long {
    libc::syscall(
        libc::SYS_mount_setattr,
        dirfd,
        path,
        flags,
        attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    )
}

fn flag(opt: &str) -> Option<(bool, MsFlags)> {
    Some(match opt {
        "ro" => (true, MsFlags::MS_RDONLY),
        "rw" => (false, MsFlags::MS_RDONLY),
        "bind" => (true, MsFlags::MS_BIND),
        "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
        "nosuid" => (true, MsFlags::MS_NOSUID),
        "nodev" => (true, MsFlags::MS_NODEV),
        "noexec" => (true, MsFlags::MS_NOEXEC),
        _ => return None,
    })
}

/// Splits mount options into flags and filesystem data.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match flag(o) {
            Some((true, f)) => flags |= f,
            Some((false, f)) => flags &= !f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mounts containerd's mounts for a snapshot at `target`.
pub fn mount_snapshot(
    mounts: &[containerd_client::types::Mount],
    target: &Path,
    readonly: bool,
) -> Result<()> {
    for m in mounts {
        let (mut flags, data) = parse_options(&m.options);
        if readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        let fstype = if m.r#type == "bind" {
            None
        } else {
            Some(m.r#type.as_str())
        };
        mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| Error::io("mounting snapshot at", target, e.into()))?;
        if readonly && flags.contains(MsFlags::MS_BIND) {
            // A bind mount ignores MS_RDONLY until remounted.
            let _ = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
    Ok(())
}

/// Unmounts everything at `target`; not mounted is fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    loop {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(Error::io("unmounting", target, e.into())),
        }
    }
}

/// Removes a directory of mount points (a container's staged binds): each
/// entry is unmounted, then removed on its own, never recursively, so a
/// bind of the host's files still mounted (its unmount failed) is left
/// with its files rather than emptied. A missing `dir` is fine.
pub fn remove_mount_dir(dir: &Path) -> Result<()> {
    // `dir` itself may be the mount (a probe of a snapshot).
    unmount_all(dir)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("reading", dir, e)),
    };
    for e in entries.flatten() {
        let p = e.path();
        unmount_all(&p)?;
        let removed = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &p, e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", dir, e)),
    }
}

/// A tmpfs for a pod's /dev/shm.
pub fn mount_shm(target: &Path, size_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|e| Error::io("creating", target, e))?;
    mount(
        Some("shm"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={size_bytes}").as_str()),
    )
    .map_err(|e| Error::io("mounting shm at", target, e.into()))
}

/// Whether anything is mounted strictly beneath `path` (after resolving
/// it) in this process's mount namespace. Unreadable: yes (the caller then
/// takes the stricter way).
pub fn mounts_beneath(path: &Path) -> bool {
    let (Ok(p), Ok(info)) = (
        std::fs::canonicalize(path),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return true;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .any(|m| m != p && m.starts_with(&p))
}

/// The index of the first of `paths` (each resolved) that is on a procfs
/// or has a procfs mounted beneath it, in this process's mount namespace: a
/// bind of it would bring `/proc/<pid>/mem` files along. One that cannot be
/// resolved or looked at counts (the caller refuses it).
pub fn procfs_at_or_beneath(paths: &[&Path]) -> Option<usize> {
    use nix::sys::statfs::{statfs, PROC_SUPER_MAGIC};
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok();
    let points: Vec<PathBuf> = info
        .iter()
        .flat_map(|i| i.lines())
        .filter(|l| l.split_once(" - ").and_then(|(_, r)| r.split(' ').next()) == Some("proc"))
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .collect();
    paths.iter().position(|path| {
        let Ok(p) = std::fs::canonicalize(path) else {
            return true;
        };
        info.is_none()
            || statfs(&p).map_or(true, |s| s.filesystem_type() == PROC_SUPER_MAGIC)
            || points.iter().any(|m| m.starts_with(&p))
    })
}

/// A mountinfo field with its octal escapes (`\040`) undone.
pub(crate) fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_dir_is_removed_entry_by_entry_never_recursively() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("c1");
        std::fs::create_dir_all(d.join("0")).unwrap();
        std::fs::write(d.join("1"), b"a file bind").unwrap();
        remove_mount_dir(&d).unwrap();
        assert!(!d.exists());
        remove_mount_dir(&d).unwrap();
        // What is still full (a bind whose unmount failed, showing the
        // host's files) is kept, files and all.
        std::fs::create_dir_all(d.join("0")).unwrap();
        std::fs::write(d.join("0/host-file"), b"keep").unwrap();
        assert!(remove_mount_dir(&d).is_err());
        assert_eq!(std::fs::read(d.join("0/host-file")).unwrap(), b"keep");
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&[
            "ro".into(),
            "lowerdir=/a:/b".into(),
            "nosuid".into(),
            "index=off".into(),
        ]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(d, "lowerdir=/a:/b,index=off");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c"), PathBuf::from("/a b\\c"));
        assert_eq!(unescape("/plain\\x"), PathBuf::from("/plain\\x"));
    }

    #[test]
    fn procfs_is_found_at_or_beneath_a_path() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        for p in ["/", "/proc/self", "/proc/1/root/proc"].map(Path::new) {
            assert_eq!(procfs_at_or_beneath(&[d.path(), p]), Some(1));
        }
        assert_eq!(procfs_at_or_beneath(&[d.path()]), None);
        assert_eq!(procfs_at_or_beneath(&[&missing]), Some(0));
    }

    #[test]
    fn mounts_beneath_a_path_are_found() {
        // /proc and /sys are mounted beneath /; a fresh directory has none.
        assert!(mounts_beneath(Path::new("/")));
        let d = tempfile::tempdir().unwrap();
        assert!(!mounts_beneath(d.path()));
        // Unresolvable: the stricter answer.
        assert!(mounts_beneath(&d.path().join("missing")));
    }
}
