//! Closes after writing, which make the digest cache forget a file. The
//! cache is keyed by the file's identity, times included
//! (`digest::FileKey`), and checked again after hashing; a close after
//! writing forgets the file's digest besides, for what the identity
//! misses: a rewrite within one timestamp tick on a filesystem with coarse
//! timestamps, and an overlay file whose upper file a process outside the
//! pod maps shared and writable through an fd it then closed (unwritten
//! yet: the digest must be measured anew, which looks for such a mapping,
//! `overlay.rs`).
//!
//! Those notifications used to come through the container's own group,
//! whose queue has no bound (its permission events must never be dropped:
//! the kernel allows what it drops). Nothing waits for them, so a pod
//! opening and closing files for writing faster than its reader reads them
//! (a reader that shares the pod's CPU), or while imacri was down, grew the
//! kernel's memory without bound: +27 MB in 3 s (`ima_groups.rs`
//! `a_pods_closes_do_not_grow_the_kernels_memory`), ~18 MB a second on a
//! tmpfs. They now come through a second group per container, with the
//! kernel's bounded queue (`fs.fanotify.max_queued_events`, 16 384 by
//! default, ~1 MiB): past it the kernel queues an overflow instead, and
//! every digest of the filesystems that group marks is forgotten. Its
//! queue is read before the events of the container's group that follow
//! (a close queued before an execution is handled before it), and the
//! keeper does not keep it (a next imacri starts with no digests).
//!
//! Only filesystems that need it are marked: overlays, and those without
//! multigrain timestamps. Where the kernel has them (Linux >= 6.13: ext4,
//! xfs, btrfs, tmpfs), a write after the file's times were read (imacri's
//! `fstat`) takes a fine-grained time, so no rewrite keeps the identity a
//! digest was cached under.

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{container_mount, FanotifyError, Target};
use crate::integrity::engine::Engine;

const EXT4: i64 = 0xEF53;
const XFS: i64 = 0x5846_5342;
const BTRFS: i64 = 0x9123_683E;
const TMPFS: i64 = 0x0102_1994;
const OVERLAYFS: i64 = 0x794c_7630;

/// Filesystems the kernel gives multigrain timestamps where it has them.
const MULTIGRAIN: [i64; 4] = [EXT4, XFS, BTRFS, TMPFS];

/// Whether this kernel gives multigrain timestamps: a memfd (tmpfs)
/// written twice with its times read between keeps none of them.
pub fn kernel_multigrain() -> bool {
    static PROBED: OnceLock<bool> = OnceLock::new();
    *PROBED.get_or_init(|| probe().unwrap_or(false))
}

fn probe() -> std::io::Result<bool> {
    // SAFETY: memfd_create with a static name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"imacri-mgtime".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd of ours.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    let times = || -> std::io::Result<(i64, i64)> {
        let st = nix::sys::stat::fstat(file.as_raw_fd())?;
        Ok((st.st_ctime, st.st_ctime_nsec))
    };
    for _ in 0..32 {
        nix::sys::uio::pwrite(&file, b"a", 0)?;
        let a = times()?;
        nix::sys::uio::pwrite(&file, b"b", 0)?;
        if times()? == a {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the filesystem at `path` needs closes after writing for the
/// digest cache (see the module); where its type cannot be told, it does.
fn needs_closes(path: &Path) -> bool {
    let Ok(fs) = nix::sys::statfs::statfs(path) else {
        return true;
    };
    let magic = fs.filesystem_type().0;
    magic == OVERLAYFS || !(kernel_multigrain() && MULTIGRAIN.contains(&magic))
}

/// A container's group for closes after writing, and the filesystems
/// (devices) it marks.
pub(super) struct Closes {
    fan: Fanotify,
    devices: Vec<u64>,
    /// The kernel reports an fd it could not open in the event
    /// (FAN_REPORT_FD_ERROR, Linux >= 6.13) rather than failing the read
    /// and dropping the event.
    fd_errors: bool,
}

/// FAN_REPORT_FD_ERROR (not in nix yet).
const FAN_REPORT_FD_ERROR: u32 = 0x0000_2000;

impl Closes {
    /// The group for `target`'s filesystems that need it (None: none do).
    pub(super) fn open(target: &Target) -> Result<Option<Closes>, FanotifyError> {
        let mut marks: Vec<(PathBuf, MarkFlags)> = std::iter::once(&target.root)
            .chain(&target.volumes)
            .map(|p| (p.clone(), MarkFlags::FAN_MARK_FILESYSTEM))
            .collect();
        // Each mounted volume through an O_PATH fd of the container's
        // mount (as the container's group marks it), held until marked.
        let mut held = Vec::new();
        for v in &target.mounted {
            let (fd, _) = container_mount(&target.root, v)?;
            marks.push((
                PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
                MarkFlags::FAN_MARK_MOUNT,
            ));
            held.push(fd);
        }
        marks.retain(|(p, _)| needs_closes(p));
        if marks.is_empty() {
            return Ok(None);
        }
        // The fd of each event is opened when it is read, O_NONBLOCK (see
        // `watch`): a process of the pod holding a write lease on the file
        // made that open fail, and the kernel then failed the read and
        // dropped the event, its digest kept. Reported in the event, it is
        // a close whose file is not known: every digest is forgotten.
        let (fan, fd_errors) = notification_group().map_err(super::init_failed)?;
        let mut devices = Vec::new();
        for (path, how) in &marks {
            super::mark_path(&fan, *how, MaskFlags::FAN_CLOSE_WRITE, path)?;
            if let Ok(st) = nix::sys::stat::stat(path) {
                devices.push(st.st_dev);
            }
        }
        Ok(Some(Closes {
            fan,
            devices,
            fd_errors,
        }))
    }

    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fan.as_fd()
    }

    /// Reads every close queued now, and forgets the digests they name (an
    /// overflow, or a file not named: every digest of the filesystems
    /// marked).
    pub(super) fn read(&self, engine: &Engine) {
        self.read_with(|inode| match inode {
            Some(inode) => engine.invalidate(inode),
            None => engine.invalidate_devices(&self.devices),
        })
    }

    /// As [`read`](Self::read), handing each close's inode (None: not
    /// known) to `forget`.
    fn read_with(&self, mut forget: impl FnMut(Option<(u64, u64)>)) {
        loop {
            let events = match self.fan.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {
                    // Without fd errors reported, a read that failed on an
                    // open left an event lost, the rest still queued.
                    if !self.fd_errors && queued(&self.fan) > 0 {
                        forget(None);
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    // Unread, any of them could be stale.
                    tracing::warn!(error = %e, "reading closes after writing failed; the container's digests are forgotten");
                    return forget(None);
                }
            };
            for ev in events {
                match ev.fd().map(|fd| fd.as_raw_fd()) {
                    Some(fd) if fd >= 0 => forget(
                        nix::sys::stat::fstat(fd)
                            .ok()
                            .map(|st| (st.st_dev, st.st_ino)),
                    ),
                    Some(_) => {
                        // An open that failed (-errno): no fd to close
                        // (nix's drop would close it, and panic).
                        std::mem::forget(ev);
                        forget(None);
                    }
                    // The queue overflowed.
                    None => forget(None),
                }
            }
        }
    }
}

/// A notification group whose events carry the error of an fd the kernel
/// could not open, where it can (true then).
fn notification_group() -> nix::Result<(Fanotify, bool)> {
    let init = |extra: u32| {
        Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::from_bits_retain(extra),
            EventFFlags::O_RDONLY
                | EventFFlags::O_LARGEFILE
                | EventFFlags::O_CLOEXEC
                | EventFFlags::O_NONBLOCK,
        )
    };
    match init(FAN_REPORT_FD_ERROR) {
        Ok(fan) => Ok((fan, true)),
        Err(nix::errno::Errno::EINVAL) => Ok((init(0)?, false)),
        Err(e) => Err(e),
    }
}

/// Bytes of events queued in `fan` (FIONREAD).
fn queued(fan: &Fanotify) -> i32 {
    use std::os::fd::AsFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fan.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_filesystems_whose_timestamps_tell_every_rewrite_go_without_closes() {
        // /dev/shm is a tmpfs: multigrain where the kernel has it (and
        // then a rewrite after a look at the times changes them).
        let shm = Path::new("/dev/shm");
        assert_eq!(needs_closes(shm), !kernel_multigrain());
        if kernel_multigrain() {
            let f = shm.join(format!("imacri-closes-{}", std::process::id()));
            std::fs::write(&f, b"a").unwrap();
            let a = nix::sys::stat::stat(&f).unwrap();
            std::fs::write(&f, b"b").unwrap();
            let b = nix::sys::stat::stat(&f).unwrap();
            std::fs::remove_file(&f).unwrap();
            assert_ne!((a.st_ctime, a.st_ctime_nsec), (b.st_ctime, b.st_ctime_nsec));
        }
        // Another type, or none to be told: asked for.
        assert!(needs_closes(Path::new("/proc")));
        assert!(needs_closes(Path::new("/nonexistent/imacri")));
    }

    #[test]
    fn a_close_whose_file_cannot_be_opened_forgets_every_digest() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (f, g) = (dir.path().join("f"), dir.path().join("g"));
        std::fs::write(&f, b"").unwrap();
        std::fs::write(&g, b"").unwrap();
        let (fan, fd_errors) = notification_group().unwrap();
        for p in [&f, &g] {
            fan.mark(
                MarkFlags::FAN_MARK_ADD,
                MaskFlags::FAN_CLOSE_WRITE,
                None,
                Some(p),
            )
            .unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        // A process holding a write lease on f: the kernel's open of it
        // for the event fails (O_NONBLOCK), and breaking the lease sends
        // the process SIGIO, which ends it.
        let path = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes system calls (its arguments made
        // before the fork) and exits.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                let ok = fd >= 0 && libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) == 0;
                libc::write(w.as_raw_fd(), [ok as u8].as_ptr().cast(), 1);
                libc::sleep(10);
                libc::_exit(0)
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let mut ok = [0u8];
        nix::unistd::read(r.as_raw_fd(), &mut ok).unwrap();
        assert_eq!(ok[0], 1, "no write lease");
        let closes = Closes {
            fan,
            devices: vec![],
            fd_errors,
        };
        let mut seen = Vec::new();
        closes.read_with(|i| seen.push(i));
        let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        // f not named (its digests all forgotten), g named.
        let g_inode = std::fs::metadata(&g).map(|m| (m.dev(), m.ino())).unwrap();
        assert!(seen.contains(&None), "{seen:?}");
        assert!(seen.contains(&Some(g_inode)), "{seen:?}");
    }
}
