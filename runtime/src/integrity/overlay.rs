//! What overlayfs hides from the kernel's writer rules: a mapping of an
//! overlay file holds the layer's real file, not the overlay file. A process
//! that maps a rootfs file shared and writable and closes its fd leaves no
//! writer of the overlay file: the kernel's ETXTBSY rule and a read lease on
//! the overlay file both pass while the mapping can still change what runs.
//! A process of the pod is held to the kernel's rules by the map guard
//! (`fanotify/held.rs`); one outside it (a host daemon, a helper the pod
//! passed an fd to) is found here, at the check of an execution or mapping:
//! the real file is looked up in the overlay's upper layer and told apart
//! from any other by its page cache (the same file has the same pages), and
//! a read lease on it says whether anyone has it open for writing. A file
//! the upper layer does not have is a lower layer's, which nothing of the
//! pod can write (a write or a rename copies it up first); one renamed away
//! and back while it was looked up is told by its ctime. A mapping made
//! between the check and the kernel's own (an outside process racing the
//! execution) is kept out by the lease `fanotify/window.rs` holds then.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::engine::open_for_writing;
use super::sys::SysError;

/// Why an overlay's file or root could not be told apart (see the module).
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{root} is not an overlay filesystem")]
    NotOverlay { root: String },
    #[error(
        "{root} is an overlay ({dev}), but not the one mounted for the container (...{bundle})"
    )]
    NotContainers {
        root: String,
        dev: String,
        bundle: String,
    },
    #[error("{0} is not a path from the root")]
    NotFromRoot(PathBuf),
    #[error("the upper layer's {0} is another file")]
    AnotherFile(PathBuf),
    #[error("{0} changed while it was looked up")]
    Changed(PathBuf),
    #[error("the overlay {0} has no upper layer")]
    NoUpper(String),
    #[error("no overlay {0} is mounted here")]
    NotMounted(String),
    #[error("the page is not present (or its frame is hidden)")]
    PageHidden,
}

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Whether `fd` is a file of an overlay filesystem.
pub fn on_overlayfs(fd: BorrowedFd<'_>) -> nix::Result<bool> {
    let fs = nix::sys::statfs::fstatfs(fd)?;
    Ok(fs.filesystem_type().0 as i64 == OVERLAYFS_SUPER_MAGIC)
}

/// Whether `fd`, a file nobody has open for writing (the caller checked:
/// a writer of the overlay file is the kernel's rules' and the writers
/// check's to see), is an overlay file whose real file is open for writing
/// (see the module). Fails closed: a real file that cannot be found
/// (renamed meanwhile, deleted, a mount of the overlay below its root)
/// counts as written.
pub fn upper_written(fd: BorrowedFd<'_>) -> bool {
    if !on_overlayfs(fd).unwrap_or(true) {
        // Not overlayfs: a mapping holds the file itself.
        return false;
    }
    real_file_written(fd).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "the real file of an overlay file cannot be found: counted as written");
        true
    })
}

/// Whether the root of task `pid` is the overlay containerd's runc shim
/// mounted for container `id` of containerd namespace `namespace` (at its
/// bundle's `.../<namespace>/<id>/rootfs`), found by its device in this
/// process's mountinfo (imacri shares the shim's mount namespace). The
/// fanotify backend marks the filesystem of that root: a runtime that
/// reports another process as the task (a VM's, a sandbox's) would have it
/// watch a host filesystem and leave the container's own unwatched.
pub fn is_containers_root(pid: u32, namespace: &str, id: &str) -> Result<(), OverlayError> {
    let root = format!("/proc/{pid}/root");
    let dir = std::fs::File::open(&root).map_err(|e| SysError::io(format!("opening {root}"), e))?;
    if !on_overlayfs(dir.as_fd()).map_err(|e| SysError::call(format!("statfs {root}"), e))? {
        return Err(OverlayError::NotOverlay { root });
    }
    let st = nix::sys::stat::fstat(dir.as_raw_fd())
        .map_err(|e| SysError::call(format!("stat {root}"), e))?;
    let dev = format!("{}:{}", libc::major(st.st_dev), libc::minor(st.st_dev));
    let bundle = format!("/{namespace}/{id}/rootfs");
    let info = mountinfo()?;
    let found = info.lines().any(|line| {
        let Some((mount, sb)) = line.split_once(" - ") else {
            return false;
        };
        let f: Vec<&str> = mount.split(' ').collect();
        f.get(2) == Some(&dev.as_str())
            && sb.starts_with("overlay ")
            && f.get(4).is_some_and(|m| {
                crate::mount::unescape(m)
                    .to_string_lossy()
                    .ends_with(&bundle)
            })
    });
    if found {
        Ok(())
    } else {
        Err(OverlayError::NotContainers { root, dev, bundle })
    }
}

fn mountinfo() -> Result<String, SysError> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SysError::io("reading mountinfo", e))
}

fn fstat(fd: BorrowedFd<'_>) -> Result<nix::sys::stat::FileStat, SysError> {
    nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SysError::call("fstat", e))
}

fn real_file_written(fd: BorrowedFd<'_>) -> Result<bool, OverlayError> {
    let st = fstat(fd)?;
    if st.st_size == 0 {
        // Nothing a mapping could change (it cannot grow the file).
        return Ok(false);
    }
    let upper = upper_of(st.st_dev)?;
    let path = || {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| SysError::io("reading the file's path", e))
    };
    let link = path()?;
    let Ok(rel) = link.strip_prefix("/") else {
        return Err(OverlayError::NotFromRoot(link));
    };
    match open_beneath(&upper, rel) {
        Ok(u) => {
            if first_page(u.as_fd())? != first_page(fd)? {
                return Err(OverlayError::AnotherFile(link));
            }
            Ok(open_for_writing(u.as_fd()))
        }
        // Not in the upper layer, and still where it was looked up and not
        // renamed meanwhile (away and back: a rename moves the ctime, and
        // after our fstat read it the next move is one the kernel keeps
        // apart, multigrain timestamps): a lower layer's file, which
        // nothing of the pod can write (a write, or a rename, copies it up
        // first).
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && path()? == link => {
            let now = fstat(fd)?;
            if (now.st_ctime, now.st_ctime_nsec) != (st.st_ctime, st.st_ctime_nsec) {
                return Err(OverlayError::Changed(link));
            }
            Ok(false)
        }
        Err(e) => Err(SysError::io(format!("{} in the upper layer", link.display()), e).into()),
    }
}

/// The upper directory of the overlay mounted with device `dev`, from this
/// process's mountinfo (imacri mounts ima pods' roots).
pub fn upper_of(dev: u64) -> Result<PathBuf, OverlayError> {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let info = mountinfo()?;
    for line in info.lines() {
        let Some((mount, sb)) = line.split_once(" - ") else {
            continue;
        };
        if mount.split(' ').nth(2) != Some(want.as_str()) {
            continue;
        }
        let mut f = sb.split(' ');
        if f.next() != Some("overlay") {
            continue;
        }
        let opts = f.nth(1).unwrap_or_default();
        return opts
            .split(',')
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(crate::mount::unescape)
            .ok_or(OverlayError::NoUpper(want));
    }
    Err(OverlayError::NotMounted(want))
}

/// `rel` opened read-only beneath `dir`, following no symlink and leaving
/// `dir`'s mount for none.
fn open_beneath(dir: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = nix::fcntl::openat2(d.as_raw_fd(), rel, how)?;
    // SAFETY: openat2 returned a new fd we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The page frame holding the first page of `fd`'s page cache: the same
/// for two open files exactly when they are one file. Faulted in without a
/// SIGBUS if the file shrank meanwhile (MADV_POPULATE_READ fails instead).
fn first_page(fd: BorrowedFd<'_>) -> Result<u64, OverlayError> {
    const LEN: usize = 4096;
    // SAFETY: a new private read-only mapping of our own, unmapped below;
    // it is only populated, never read through.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(SysError::last("mmap").into());
    }
    let frame = (|| -> Result<u64, OverlayError> {
        // SAFETY: madvise on the mapping made above.
        if unsafe { libc::madvise(at, LEN, libc::MADV_POPULATE_READ) } != 0 {
            return Err(SysError::last("populating").into());
        }
        let map = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| SysError::io("opening pagemap", e))?;
        let mut entry = [0u8; 8];
        let off = (at as u64 / LEN as u64) * 8;
        std::os::unix::fs::FileExt::read_exact_at(&map, &mut entry, off)
            .map_err(|e| SysError::io("reading pagemap", e))?;
        let e = u64::from_ne_bytes(entry);
        let pfn = e & ((1 << 55) - 1);
        if e >> 63 == 0 || pfn == 0 {
            return Err(OverlayError::PageHidden);
        }
        Ok(pfn)
    })();
    // SAFETY: the mapping made above, not used past here.
    unsafe { libc::munmap(at, LEN) };
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_whose_root_is_no_containers_overlay_is_told() {
        // This test's root: the node's filesystem, as a VM's or a
        // sandbox's process reported as a task would have.
        let e = is_containers_root(std::process::id(), "k8s.io", "c1").unwrap_err();
        assert!(
            matches!(
                e,
                OverlayError::NotOverlay { .. } | OverlayError::NotContainers { .. }
            ),
            "{e}"
        );
        assert!(matches!(
            is_containers_root(u32::MAX, "k8s.io", "c1"),
            Err(OverlayError::Sys(_))
        ));
    }

    /// One file's first page is one frame; another file's is another.
    #[test]
    fn a_files_first_page_tells_it_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"same").unwrap();
        std::fs::write(&b, b"same").unwrap();
        let open = |p: &Path| OwnedFd::from(std::fs::File::open(p).unwrap());
        let (a1, a2, b1) = (open(&a), open(&a), open(&b));
        let pa = first_page(a1.as_fd()).unwrap();
        assert_eq!(pa, first_page(a2.as_fd()).unwrap());
        assert_ne!(pa, first_page(b1.as_fd()).unwrap());
        let empty = dir.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        assert!(first_page(open(&empty).as_fd()).is_err());
    }
}
