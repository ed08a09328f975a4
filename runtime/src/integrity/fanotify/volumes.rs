//! Which volumes of an ima pod keep exec under `volumes = "measure"`, and
//! how they are marked. A memory-backed volume of the pod's own is a
//! filesystem of its own: marked whole, like the rootfs. Every other volume
//! (a disk-backed emptyDir, a hostPath, a persistent volume, a subPath, an
//! image volume, the host's or another pod's tmpfs) shares its filesystem
//! with processes outside the pod, whose executions a filesystem mark would
//! put into the pod's log and under its policy: only the container's own
//! mount of it is marked ([`container_mount`]). That is enough because
//! nothing of the pod can execute a file reached any other way: the
//! container cannot mount (no CAP_SYS_ADMIN, no user namespace of its own),
//! and imacri's init (Landlock) refuses executions of files whose path does
//! not lead up to the container's own root, such as an fd of the same file
//! handed in by a process that reached it through the host's mount, or
//! another container's mount of the volume through `/proc/<pid>/root`. What
//! the host writes there raises no event in that mark; the next execution's
//! identity check (its size, mtime and ctime) measures it anew.
//!
//! Only filesystems whose files this kernel alone changes qualify: on a
//! network or FUSE filesystem another machine or a daemon can serve other
//! bytes to the execution than to the hash, with no local write to notice.
//! Those, and a volume with mounts beneath it (they would come along,
//! unmarked), stay `noexec`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::FanotifyError;

/// How an executable volume is marked for its executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMark {
    /// A tmpfs of the pod's own: its filesystem, every mount of it.
    Filesystem,
    /// Any other volume on a local filesystem: the container's own mount.
    Mount,
}

/// A volume a container binds executable that is marked through its mount:
/// its destination, and the view imacri staged for it (what the
/// container's mount must show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    pub dest: String,
    pub view: PathBuf,
}

/// Whether `bound` (imacri's staged view of the volume the request named
/// `host_path`) can keep exec in a container of the pod with `pod_uid`,
/// and how it is marked then.
pub fn volume_mark(host_path: &Path, bound: &Path, pod_uid: &str) -> Option<VolumeMark> {
    if pods_own_tmpfs_volume(host_path, bound, pod_uid) {
        return Some(VolumeMark::Filesystem);
    }
    mount_markable_view(bound).then_some(VolumeMark::Mount)
}

/// The filesystems a volume marked through its mount may be on: local ones,
/// whose every change goes through this kernel (ext2/3/4 share a magic).
const LOCAL_FILESYSTEMS: [nix::sys::statfs::FsType; 6] = [
    nix::sys::statfs::EXT4_SUPER_MAGIC,
    nix::sys::statfs::XFS_SUPER_MAGIC,
    nix::sys::statfs::BTRFS_SUPER_MAGIC,
    nix::sys::statfs::F2FS_SUPER_MAGIC,
    nix::sys::statfs::TMPFS_MAGIC,
    nix::sys::statfs::OVERLAYFS_SUPER_MAGIC,
];

/// True when `path` (imacri's staged view of a volume, a mount root of its
/// own) is a directory or regular file on a local filesystem with nothing
/// mounted beneath it (a mount there would come along into the container,
/// executable and unmarked).
pub fn mount_markable_view(path: &Path) -> bool {
    let kind = std::fs::metadata(path).is_ok_and(|m| m.is_dir() || m.is_file());
    let local = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| LOCAL_FILESYSTEMS.contains(&s.filesystem_type()));
    kind && local && !crate::mount::mounts_beneath(path)
}

/// The container's own mount of a volume, for a mount mark: `v.dest`
/// looked up in the container's root (`root`: `/proc/<pid>/root`) as runc
/// resolved it (links kept in the root), and checked to be the root of a
/// mount showing the directory or file of `v.view`. A destination the
/// image's links lead elsewhere is refused rather than another mount marked
/// in its place. Returns an `O_PATH` fd of it (nothing is opened: a FIFO
/// would block, a device would act, a leased file would wait for its
/// holder) and the mount's ID: two destinations found at one mount (links a
/// running container made, when imacri marks it again without its keeper)
/// would leave the other mount unmarked, and the caller refuses them.
pub(super) fn container_mount(
    root: &Path,
    v: &MountedVolume,
) -> Result<(OwnedFd, u64), FanotifyError> {
    let at = root.join(v.dest.trim_start_matches('/'));
    let not_it = |why: String| FanotifyError::VolumeMount {
        path: at.clone(),
        why,
    };
    let fd = open_in_root(root, Path::new(&v.dest)).map_err(|e| not_it(e.to_string()))?;
    let (st, view) = (
        statx_of(&fd).map_err(|e| not_it(e.to_string()))?,
        std::fs::metadata(&v.view).map_err(|e| not_it(e.to_string()))?,
    );
    let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
    if (dev, st.stx_ino) != (view.dev(), view.ino()) {
        return Err(not_it(format!(
            "it is not the volume's {} (staged at {})",
            if view.is_dir() { "directory" } else { "file" },
            v.view.display()
        )));
    }
    if st.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 == 0
        || st.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 == 0
    {
        return Err(not_it("it is not the root of a mount".into()));
    }
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(not_it("the kernel does not tell its mount".into()));
    }
    Ok((fd, st.stx_mnt_id))
}

/// An `O_PATH` fd of `path` resolved in the container whose root is `root`
/// (`/proc/<pid>/root`): links inside the root only, no magic links.
pub(super) fn open_in_root(root: &Path, path: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let r = std::fs::File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(r.as_raw_fd(), path, how)?;
    // SAFETY: openat2 returned a new fd we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `host_path` as it is (links followed) and the index of its `pods`
/// component that `pod_uid` follows: kubelet's directory of the pod.
fn in_pod_dir(host_path: &Path, pod_uid: &str) -> Option<(PathBuf, usize)> {
    if pod_uid.is_empty() {
        return None;
    }
    let p = std::fs::canonicalize(host_path).ok()?;
    let i = p
        .components()
        .collect::<Vec<_>>()
        .windows(2)
        .position(|w| w[0].as_os_str() == "pods" && w[1].as_os_str() == pod_uid)?;
    Some((p, i))
}

fn statx_of(fd: &OwnedFd) -> std::io::Result<libc::statx> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH, and a buffer of
    // the right size the kernel fills.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_MNT_ID,
            st.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled it.
    Ok(unsafe { st.assume_init() })
}

/// Whether `bound`, what a container will bind for the volume its request
/// named `host_path` (imacri's staged view of it), is a memory-backed volume
/// of the pod with `pod_uid`'s own: the root of a tmpfs in kubelet's
/// directory of the pod's volumes (`<kubelet root>/pods/<uid>/volumes/
/// <plugin>/<name>`), or a subPath of one (`.../pods/<uid>/volume-subpaths/
/// <name>/...` on that volume's filesystem), with nothing mounted beneath.
/// A memory-backed volume there is the pod's alone; a tmpfs elsewhere (the
/// host's `/dev/shm`, another pod's emptyDir, a subPath of a hostPath) is
/// used by processes outside the pod, whose executions a mark of the pod's
/// would measure into its log and put under its policy.
///
/// Decided on `bound` itself (device and inode) and on kubelet's
/// directories, each looked at without following a link and owned by root:
/// a host path through a directory the pod controls (in a disk volume of
/// its own) could name another file at every look, and did, until
/// 2026-12-04, between the bind and the check (`ima_guards/mounts.rs`
/// `a_volume_swapped_under_its_check_does_not_run`).
fn pods_own_tmpfs_volume(host_path: &Path, bound: &Path, pod_uid: &str) -> bool {
    let Some((p, i)) = in_pod_dir(host_path, pod_uid) else {
        return false;
    };
    let parts: Vec<_> = p.components().collect();
    // The path test first: most volumes (hostPaths) end there, before the
    // mountinfo is read.
    let pod_dir: PathBuf = parts[..i + 2].iter().collect();
    if !pod_dir.ancestors().all(root_owned_dir) || !own_tmpfs_view(bound) {
        return false;
    }
    let Ok(b) = std::fs::metadata(bound) else {
        return false;
    };
    let own = own_volume_roots(&pod_dir.join("volumes"));
    let at = |k: usize| parts.get(k).map(|c| c.as_os_str());
    match (at(i + 2), at(i + 3)) {
        (Some(d), Some(_)) if d == "volumes" => own
            .iter()
            .any(|(_, dev, ino)| (*dev, *ino) == (b.dev(), b.ino())),
        (Some(d), Some(name)) if d == "volume-subpaths" => {
            own.iter().any(|(n, dev, _)| n == name && *dev == b.dev())
        }
        _ => false,
    }
}

/// A directory (not a link to one) owned by host root: none of the pod's.
fn root_owned_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == 0)
}

/// The tmpfs roots among kubelet's volumes of a pod (`volumes/<plugin>/
/// <name>`, each the root of a filesystem of its own): (name, device, inode).
fn own_volume_roots(volumes: &Path) -> Vec<(std::ffi::OsString, u64, u64)> {
    let mut out = Vec::new();
    let Ok(plugins) = std::fs::read_dir(volumes) else {
        return out;
    };
    for plugin in plugins.flatten().map(|e| e.path()) {
        let Ok(pm) = std::fs::symlink_metadata(&plugin) else {
            continue;
        };
        if !root_owned_dir(&plugin) {
            continue;
        }
        let Ok(names) = std::fs::read_dir(&plugin) else {
            continue;
        };
        for vol in names.flatten() {
            let path = vol.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let tmpfs = nix::sys::statfs::statfs(&path)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
            if m.is_dir() && m.dev() != pm.dev() && tmpfs {
                out.push((vol.file_name(), m.dev(), m.ino()));
            }
        }
    }
    out
}

/// True when `path` (imacri's staged view of a volume, a mount root of its
/// own) is a tmpfs with nothing mounted beneath it.
pub fn own_tmpfs_view(path: &Path) -> bool {
    let tmpfs = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    tmpfs && !crate::mount::mounts_beneath(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tmpfs mounts stand for kubelet's memory-backed volumes (the unit
    /// tests run as root), taken down when the test ends.
    struct Mounted(Vec<PathBuf>);
    impl Drop for Mounted {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    #[test]
    fn only_the_pods_own_kubelet_volumes_are_its_own() {
        use nix::mount::{mount, MsFlags};
        let d = tempfile::tempdir().unwrap();
        let vols = d.path().join("pods/u-1/volumes/kubernetes.io~empty-dir");
        let (cache, plain) = (vols.join("cache"), vols.join("plain"));
        let theirs = d
            .path()
            .join("pods/u-2/volumes/kubernetes.io~empty-dir/cache");
        let sub = d.path().join("pods/u-1/volume-subpaths/cache/c/0");
        let other_sub = d.path().join("pods/u-1/volume-subpaths/cache/c/1");
        for p in [&cache, &plain, &theirs, &sub, &other_sub] {
            std::fs::create_dir_all(p).unwrap();
        }
        let mut mounted = Mounted(Vec::new());
        for p in [&cache, &theirs] {
            mount(Some("t"), p, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
            mounted.0.push(p.clone());
            std::fs::create_dir(p.join("dir")).unwrap();
        }
        // subPaths as kubelet binds them: of the pod's volume, and one under
        // its name bound from another pod's.
        for (at, from) in [(&sub, &cache), (&other_sub, &theirs)] {
            mount(
                Some(&from.join("dir")),
                at,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
            mounted.0.push(at.clone());
        }
        // Bound as named (in a pod, the bound view is an ID-mapped copy).
        let own = |p: &Path, uid| pods_own_tmpfs_volume(p, p, uid);
        assert!(own(&cache, "u-1"));
        assert!(own(&sub, "u-1"), "a subPath of its own volume");
        assert!(!own(&other_sub, "u-1"), "another pod's filesystem");
        assert!(!own(&plain, "u-1"), "no tmpfs");
        assert!(!own(&theirs, "u-1"), "another pod's");
        assert!(!own(&cache, "u-2"));
        assert!(!own(&cache, ""));
        assert!(!own(Path::new("/dev/shm"), "u-1"));
        // What is bound decides, not what the path names now.
        assert!(!pods_own_tmpfs_volume(&cache, &theirs, "u-1"));
        assert!(!pods_own_tmpfs_volume(&cache, &cache.join("dir"), "u-1"));
        // A link in the pod's directory is where it leads.
        let link = vols.join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        assert!(!own(&link, "u-1"));
        // A directory in the way that is not root's (one of the pod's).
        nix::unistd::chown(&vols, Some(1000.into()), None).unwrap();
        assert!(!own(&cache, "u-1"));
        nix::unistd::chown(&vols, Some(0.into()), None).unwrap();
        assert!(own(&cache, "u-1"));
    }

    /// The pod's own memory-backed volume is marked whole; every other
    /// volume on a local filesystem through the container's mount; a FIFO,
    /// a device, a filesystem of the kernel's own or a volume with a mount
    /// beneath is not marked (it stays noexec).
    #[test]
    fn volumes_are_marked_whole_or_through_their_mount() {
        use nix::mount::{mount, MsFlags};
        // On the host's disk (/tmp may be a tmpfs).
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let vols = d.path().join("pods/u-1/volumes/kubernetes.io~empty-dir");
        let (cache, mem, shm) = (vols.join("cache"), vols.join("mem"), d.path().join("shm"));
        let theirs = d
            .path()
            .join("pods/u-2/volumes/kubernetes.io~empty-dir/mem");
        let sub = d.path().join("pods/u-1/volume-subpaths/cache/c/0");
        for p in [&cache, &mem, &shm, &theirs, &sub, &cache.join("dir")] {
            std::fs::create_dir_all(p).unwrap();
        }
        let file = cache.join("tool");
        std::fs::write(&file, "x").unwrap();
        let fifo = cache.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut mounted = Mounted(Vec::new());
        for p in [&mem, &shm, &theirs] {
            mount(Some("t"), p, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
            mounted.0.push(p.clone());
        }
        let mark = |p: &Path| volume_mark(p, p, "u-1");
        assert_eq!(mark(&mem), Some(VolumeMark::Filesystem), "its own tmpfs");
        assert_eq!(mark(&cache), Some(VolumeMark::Mount), "a disk emptyDir");
        assert_eq!(mark(&sub), Some(VolumeMark::Mount), "a subPath on disk");
        assert_eq!(mark(&file), Some(VolumeMark::Mount), "a file");
        assert_eq!(mark(&shm), Some(VolumeMark::Mount), "the host's tmpfs");
        assert_eq!(mark(&theirs), Some(VolumeMark::Mount), "another pod's");
        assert_eq!(volume_mark(&mem, &mem, "u-2"), Some(VolumeMark::Mount));
        // What is bound decides, not what the path names.
        assert_eq!(volume_mark(&mem, &shm, "u-1"), Some(VolumeMark::Mount));
        assert_eq!(mark(&fifo), None, "a FIFO");
        assert_eq!(mark(Path::new("/dev/null")), None, "a device");
        assert_eq!(mark(Path::new("/proc/self/fdinfo")), None, "procfs");
        assert_eq!(mark(&d.path().join("missing")), None);
        // Something mounted beneath would come along unmarked.
        mount(
            Some("t"),
            &cache.join("dir"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        mounted.0.push(cache.join("dir"));
        assert_eq!(mark(&cache), None, "a mount beneath");
        assert_eq!(mark(&cache.join("dir")), Some(VolumeMark::Mount));
    }

    /// The container's mount of a volume is found as runc made it: the
    /// root of a mount showing the staged view, a directory or a file.
    #[test]
    fn a_containers_mount_of_a_volume_is_found_in_its_root() {
        use nix::mount::{mount, MsFlags};
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let (root, vol) = (d.path().join("root"), d.path().join("vol"));
        for p in [root.join("v"), root.join("plain"), vol.clone()] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(vol.join("tool"), "x").unwrap();
        std::fs::write(root.join("t"), "").unwrap();
        // A link in the root leads within it, never to the host's path.
        std::os::unix::fs::symlink("/v", root.join("link")).unwrap();
        std::os::unix::fs::symlink(&vol, root.join("out")).unwrap();
        let mut mounted = Mounted(Vec::new());
        for (from, at) in [
            (vol.clone(), root.join("v")),
            (vol.join("tool"), root.join("t")),
        ] {
            mount(
                Some(&from),
                &at,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
            mounted.0.push(at);
        }
        let at = |dest: &str, view: &Path| {
            let v = MountedVolume {
                dest: dest.into(),
                view: view.into(),
            };
            container_mount(&root, &v)
                .map(|(_, id)| id)
                .map_err(|e| e.to_string())
        };
        let (dir, file) = (
            at("/v", &vol).unwrap(),
            at("/t", &vol.join("tool")).unwrap(),
        );
        assert_ne!(dir, file, "two mounts");
        assert_eq!(at("/link", &vol).unwrap(), dir, "a link in the root");
        let e = at("/plain", &d.path().join("root/plain")).unwrap_err();
        assert!(e.contains("not the root of a mount"), "{e}");
        let e = at("/v", &vol.join("tool")).unwrap_err();
        assert!(e.contains("not the volume's file"), "{e}");
        let e = at("/out", &vol).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }
}
