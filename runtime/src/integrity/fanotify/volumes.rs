//! Which volumes of an ima pod keep exec under `volumes = "measure"`, and
//! how they are marked. A memory-backed volume of the pod's own is a
//! filesystem of its own: marked whole, like the rootfs. A disk-backed
//! emptyDir shares the host's filesystem, which a filesystem mark would
//! watch for every process of the node: only the container's own mount of
//! it is marked ([`container_mount`]). That is enough because nothing of the
//! pod can execute a file reached any other way: the container cannot mount
//! (no CAP_SYS_ADMIN, no user namespace of its own), and imacri's init
//! (Landlock) refuses executions of files whose path does not lead up to the
//! container's own root, such as an fd of the same file handed in by a
//! process that reached it through the host's mount, or another container's
//! mount of the volume through `/proc/<pid>/root`. What the host writes there
//! raises no event in that mark; the next execution's identity check (its
//! size, mtime and ctime) measures it anew.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::FanotifyError;

/// Where kubelet keeps a pod's emptyDir volumes, beneath `volumes/`.
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

/// How a volume of the pod's own is marked for its executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnVolume {
    /// A tmpfs of its own: its filesystem, every mount of it.
    Tmpfs,
    /// A disk-backed emptyDir: the container's own mount of it.
    Disk,
}

/// A disk-backed volume a container binds executable: its destination, and
/// the view imacri staged for it (what the container's mount must show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    pub dest: String,
    pub view: PathBuf,
}

/// Whether `bound` (imacri's staged view of the volume the request named
/// `host_path`) is a volume of the pod with `pod_uid`'s own that can be
/// measured, and how.
pub fn pods_own_volume(host_path: &Path, bound: &Path, pod_uid: &str) -> Option<OwnVolume> {
    if pods_own_tmpfs_volume(host_path, bound, pod_uid) {
        return Some(OwnVolume::Tmpfs);
    }
    pods_own_disk_volume(host_path, bound, pod_uid).then_some(OwnVolume::Disk)
}

/// Whether `bound` is a disk-backed emptyDir of the pod with `pod_uid`:
/// kubelet's `<kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/
/// <name>` itself, the same directory (device and inode) as `bound`, with
/// kubelet's directories above it root's and not links. Not a subPath: on
/// the host's filesystem the bind kubelet makes for one cannot be told from
/// any other directory of the host (a tmpfs subPath is told by its device).
fn pods_own_disk_volume(host_path: &Path, bound: &Path, pod_uid: &str) -> bool {
    let Some((p, i)) = in_pod_dir(host_path, pod_uid) else {
        return false;
    };
    let parts: Vec<_> = p.components().collect();
    if parts.len() != i + 5
        || parts[i + 2].as_os_str() != "volumes"
        || parts[i + 3].as_os_str() != EMPTY_DIR
    {
        return false;
    }
    let plugin: PathBuf = parts[..i + 4].iter().collect();
    if !plugin.ancestors().all(root_owned_dir) || !own_disk_view(bound) {
        return false;
    }
    let (Ok(v), Ok(b)) = (std::fs::symlink_metadata(&p), std::fs::metadata(bound)) else {
        return false;
    };
    v.is_dir() && (v.dev(), v.ino()) == (b.dev(), b.ino())
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

/// True when `path` (imacri's staged view of a volume, a mount root of its
/// own) is on no tmpfs and has nothing mounted beneath it (a mount there
/// would come along into the container, executable and unmarked).
pub fn own_disk_view(path: &Path) -> bool {
    let disk = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC);
    disk && !crate::mount::mounts_beneath(path)
}

/// The container's own mount of a disk volume, for a mount mark: `v.dest`
/// looked up in the container's root (`root`: `/proc/<pid>/root`) as runc
/// resolved it (links kept in the root), and checked to be the root of a
/// mount showing the directory of `v.view`. A destination the image's links
/// lead elsewhere is refused rather than another mount marked in its place.
/// Also returns the mount's ID: two destinations found at one mount (links
/// a running container made, when imacri marks it again without its keeper)
/// would leave the other mount unmarked, and the caller refuses them.
pub(super) fn container_mount(
    root: &Path,
    v: &MountedVolume,
) -> Result<(OwnedFd, u64), FanotifyError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let at = root.join(v.dest.trim_start_matches('/'));
    let not_it = |why: String| FanotifyError::VolumeMount {
        path: at.clone(),
        why,
    };
    let r = std::fs::File::open(root).map_err(|e| not_it(e.to_string()))?;
    let how = OpenHow::new()
        // Not O_PATH: fanotify_mark takes no O_PATH fd (EBADF).
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(r.as_raw_fd(), v.dest.as_str(), how)
        .map_err(|e| not_it(e.to_string()))?;
    // SAFETY: openat2 returned a new fd we own.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let (st, view) = (
        statx_of(&fd).map_err(|e| not_it(e.to_string()))?,
        std::fs::metadata(&v.view).map_err(|e| not_it(e.to_string()))?,
    );
    let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
    if (dev, st.stx_ino) != (view.dev(), view.ino()) {
        return Err(not_it(format!(
            "it is not the volume's directory (staged at {})",
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
/// 2026-12-04, between the bind and the check (`ima_guards.rs`
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

    /// A disk-backed emptyDir is the pod's own only as kubelet's directory
    /// of it, bound as it is, with nothing mounted beneath.
    #[test]
    fn a_disk_emptydir_of_the_pods_own_is_marked_through_its_mount() {
        use nix::mount::{mount, MsFlags};
        // On the host's disk (/tmp may be a tmpfs).
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let vols = d.path().join("pods/u-1/volumes/kubernetes.io~empty-dir");
        let cache = vols.join("cache");
        let theirs = d
            .path()
            .join("pods/u-2/volumes/kubernetes.io~empty-dir/cache");
        let sub = d.path().join("pods/u-1/volume-subpaths/cache/c/0");
        let config = d
            .path()
            .join("pods/u-1/volumes/kubernetes.io~configmap/cfg");
        let mem = vols.join("mem");
        for p in [&cache, &theirs, &sub, &config, &mem, &cache.join("dir")] {
            std::fs::create_dir_all(p).unwrap();
        }
        let mut mounted = Mounted(Vec::new());
        mount(
            Some("t"),
            &mem,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        mounted.0.push(mem.clone());
        let own = |p: &Path, uid| pods_own_volume(p, p, uid);
        assert_eq!(own(&cache, "u-1"), Some(OwnVolume::Disk));
        assert_eq!(own(&mem, "u-1"), Some(OwnVolume::Tmpfs));
        assert_eq!(own(&cache, "u-2"), None, "another pod's");
        assert_eq!(own(&theirs, "u-1"), None);
        assert_eq!(own(&cache.join("dir"), "u-1"), None, "beneath the volume");
        assert_eq!(own(&sub, "u-1"), None, "a subPath on the host's disk");
        assert_eq!(own(&config, "u-1"), None, "not an emptyDir");
        assert_eq!(own(d.path(), "u-1"), None);
        // What is bound decides.
        assert_eq!(pods_own_volume(&cache, &theirs, "u-1"), None);
        assert_eq!(pods_own_volume(&cache, &cache.join("dir"), "u-1"), None);
        // A link is where it leads.
        let link = vols.join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        assert_eq!(own(&link, "u-1"), None);
        // Something mounted beneath it would come along unmarked.
        let beneath = cache.join("dir");
        mount(
            Some("t"),
            &beneath,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert_eq!(own(&cache, "u-1"), None, "a mount beneath");
        nix::mount::umount2(&beneath, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(own(&cache, "u-1"), Some(OwnVolume::Disk));
        // A directory in the way that is not root's.
        nix::unistd::chown(&vols, Some(1000.into()), None).unwrap();
        assert_eq!(own(&cache, "u-1"), None);
    }
}
