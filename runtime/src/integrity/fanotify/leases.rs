//! Read leases on the files a container mapped executable. `truncate(2)`
//! cuts a file without opening it and sends no fanotify event (measured on
//! 6.18, ext4 and overlayfs), so an inode mark cannot see it; a lease can:
//! the kernel breaks every lease on a file before it truncates it (and
//! before any open for writing), signals the holder, and makes the
//! truncater wait until the holder lets go (or `fs.lease-break-time`, 45 s
//! by default, passes).
//!
//! One thread per process reads the signals of all leases: a real-time
//! signal sent to that thread only (F_SETOWN_EX with F_OWNER_TID), blocked
//! there and read from a signalfd, whose `ssi_fd` names the broken lease's
//! fd. When the signal queue is full the kernel sends SIGIO instead,
//! without the fd: then every lease is looked at. Both signals get a no-op
//! handler, so one that reaches another thread (the kernel makes the
//! process the owner while it sets a lease up) harms nothing; every lease
//! is looked at once after its owner is set, so such a break is not missed.
//!
//! A lease is held through our own read-only open file (the process's own
//! open file would let the process release it), which the fd keeper also
//! holds, so the lease outlives an imacri restart; the next imacri sets
//! itself as the owner again and finds the breaks it missed.
//!
//! How many a pod and imacri may hold, and who gives one up when they are
//! all taken: `share.rs`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock, Weak};

use super::share::{share_of, Holder, Share, Table, Use};
use super::Group;
use crate::integrity::sys::{LeaseError, SysError};

/// The signal a lease break sends (glibc keeps the first real-time
/// signals for itself; `SIGRTMIN()` is past those).
fn lease_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

/// A read lease this process holds on a file; released when dropped.
#[derive(Debug)]
pub(super) struct Lease {
    file: OwnedFd,
}

impl Lease {
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Ends the lease now, whatever other copies of its file (the
    /// keeper's) are still open: a truncate that breaks it meanwhile would
    /// wait for an answer nobody gives.
    pub(super) fn give_up(self) {
        // SAFETY: fcntl with integer arguments.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Out of the table before the fd number can be reused.
        if let Ok(s) = service() {
            s.share.table.remove(self.file.as_raw_fd());
        }
    }
}

struct Service {
    /// The thread that reads the signals (the owner of every lease).
    tid: libc::pid_t,
    /// Who holds what of imacri's share, and who gives way (`share.rs`).
    share: Share,
}

fn service() -> Result<&'static Service, LeaseError> {
    static SERVICE: OnceLock<Result<Service, Arc<SysError>>> = OnceLock::new();
    SERVICE
        .get_or_init(|| start().map_err(Arc::new))
        .as_ref()
        .map_err(|e| LeaseError::Service(e.clone()))
}

/// Whether this node lets imacri hold leases (`fs.leases-enable`).
pub fn probe() -> Result<(), LeaseError> {
    match std::fs::read_to_string("/proc/sys/fs/leases-enable") {
        Ok(v) if v.trim() == "0" => Err(LeaseError::Disabled),
        _ => service().map(|_| ()),
    }
}

extern "C" fn ignore(_: libc::c_int) {}

fn start() -> Result<Service, SysError> {
    let sig = lease_signal();
    for s in [sig, libc::SIGIO] {
        // SAFETY: installs a handler that does nothing, only where none
        // is set (SIGIO's default would end the process); sa is zeroed
        // plain data.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(s, std::ptr::null(), &mut old) != 0 {
                return Err(SysError::last("sigaction"));
            }
            if old.sa_sigaction == libc::SIG_DFL {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(s, &sa, std::ptr::null_mut());
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("imacri-leases".into())
        .spawn(move || {
            // Started by whichever thread took a lease first, maybe one
            // working in a pod's cgroup: this one serves every pod.
            crate::integrity::charge::home();
            // SAFETY: a sigset built and used on this thread only; the
            // signalfd is a new fd we own.
            let sfd = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigaddset(&mut set, libc::SIGIO);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
                if fd < 0 {
                    let _ = tx.send(Err(SysError::last("signalfd")));
                    return;
                }
                OwnedFd::from_raw_fd(fd)
            };
            // SAFETY: gettid has no arguments.
            let _ = tx.send(Ok(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t));
            read_signals(sfd, sig);
        })
        .map_err(|e| SysError::io("starting the lease thread", e))?;
    let tid = rx.recv().map_err(|_| {
        SysError::io(
            "starting the lease thread",
            std::io::Error::other("it ended before it was ready"),
        )
    })??;
    // SAFETY: getrlimit on a local struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    Ok(Service {
        tid,
        share: Share {
            table: Table::default(),
            // Test only: a node's worth of pods filling imacri's share in
            // a test of a few pods.
            limit: crate::crash::hook("IMACRI_TEST_LEASE_LIMIT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(share_of(nofile as u64)),
        },
    })
}

fn read_signals(sfd: OwnedFd, sig: libc::c_int) {
    loop {
        // SAFETY: plain data, filled by read(2).
        let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let n = unsafe {
            libc::read(
                sfd.as_raw_fd(),
                &mut si as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %std::io::Error::last_os_error(), "the lease thread cannot read its signals: truncates of mapped files now wait out fs.lease-break-time unseen");
            return;
        }
        let Ok(s) = service() else { return };
        // A signal names an fd (or, after a queue overflow, none): only a
        // lease that is breaking now counts (a stale signal can name an fd
        // number reused since).
        let suspects: Vec<RawFd> = if si.ssi_signo as libc::c_int == sig {
            vec![si.ssi_fd]
        } else {
            s.share.table.by_fd.pin().keys().copied().collect()
        };
        for fd in suspects {
            let holder = |fd| {
                s.share
                    .table
                    .by_fd
                    .pin()
                    .get(&fd)
                    .map(|h| (h.group.clone(), h.inode, h.window))
            };
            let Some((group, inode, window)) = holder(fd) else {
                continue;
            };
            // Still the same lease after the look at it (its fd number was
            // not given back and reused meanwhile).
            let same = |(g, i, w): (Weak<Group>, (u64, u64), bool)| {
                g.ptr_eq(&group) && i == inode && w == window
            };
            if breaking(fd) && holder(fd).is_some_and(same) {
                match group.upgrade() {
                    Some(g) if window => g.window_broken(fd),
                    Some(g) => g.lease_broken(inode, "truncated (its read lease broke)"),
                    None => {}
                }
            }
        }
    }
}

/// Whether the lease held through `fd` is being broken (or is gone): a
/// lease under a break reports the type it is going to, F_UNLCK.
fn breaking(fd: RawFd) -> bool {
    // SAFETY: fcntl on an fd with no pointer arguments.
    unsafe { libc::fcntl(fd, libc::F_GETLEASE) != libc::F_RDLCK }
}

// <linux/fcntl.h> values the libc crate does not carry.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// Makes the lease thread the one signalled when the lease on `fd` breaks.
fn own(fd: RawFd, tid: libc::pid_t) -> Result<(), SysError> {
    let o = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: fcntl with a pointer to a live f_owner_ex, and an int.
    let r = unsafe { libc::fcntl(fd, F_SETSIG, lease_signal()) | libc::fcntl(fd, F_SETOWN_EX, &o) };
    if r != 0 {
        return Err(SysError::last("F_SETOWN_EX"));
    }
    Ok(())
}

/// Takes a read lease through `file` (our own read-only open file) for
/// the watched `inode` of `group`, a file of `pod`. Refused while anyone
/// has the file open for writing (the kernel's rule for read leases), and
/// past [`PER_POD`](super::share::PER_POD) or the process's share of fds.
pub(super) fn take(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<Lease, LeaseError> {
    take_as(file, group, inode, pod, false)
}

/// As [`take`], for an execution's window (`window.rs`): a break is the
/// window's to handle, not a watch's.
pub(super) fn take_window(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<Lease, LeaseError> {
    take_as(file, group, inode, pod, true)
}

fn take_as(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
    window: bool,
) -> Result<Lease, LeaseError> {
    let s = service()?;
    s.share
        .reserve(pod, if window { Use::Window } else { Use::Watch })?;
    let fd = file.as_raw_fd();
    let given_back = || s.share.table.release(pod, false);
    own(fd, s.tid).inspect_err(|_| given_back())?;
    // SAFETY: fcntl with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } != 0 {
        let e = nix::errno::Errno::last();
        given_back();
        return Err(match e {
            nix::errno::Errno::EAGAIN => LeaseError::Writers,
            e => SysError::call("read lease", e).into(),
        });
    }
    // Setting a lease up may have made the process the owner again.
    own(fd, s.tid).inspect_err(|_| given_back())?;
    let lease = register(s, file, group, inode, pod, window);
    if breaking(fd) {
        return Err(LeaseError::Breaking);
    }
    Ok(lease)
}

/// One open file of a pod's that imacri keeps other than a lease's (a held
/// writer, `held.rs`): counted with the pod's leases, as it uses the same
/// fds; given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    pod: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(s) = service() {
            s.share.table.release(&self.pod, true);
        }
    }
}

/// Whether `pod` holds its [`PER_POD`](super::share::PER_POD) files: a new watch of its would go
/// without a lease.
pub(super) fn pod_full(pod: &str) -> bool {
    service().is_ok_and(|s| s.share.full(pod))
}

/// Counts one more held writer of `pod`'s; refused past [`PER_POD`](super::share::PER_POD), the
/// pod's [`held_share`](super::share::held_share), or the process's share of fds (once no pod has a
/// watch lease to give up). `kept`: the last imacri held it, so
/// it is counted whatever the limits.
pub(super) fn slot(pod: &str, kept: bool) -> Result<Slot, LeaseError> {
    let s = service()?;
    if kept {
        s.share.table.count_kept(pod, true);
    } else {
        s.share.reserve(pod, Use::Held)?;
    }
    Ok(Slot { pod: pod.into() })
}

/// Takes back a lease the fd keeper held for the last imacri: Ok(true)
/// when it is still whole, Ok(false) when it broke while nobody listened
/// (the file may have been cut since).
pub(super) fn adopt(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<(Lease, bool), LeaseError> {
    let s = service()?;
    own(file.as_raw_fd(), s.tid)?;
    let fd = file.as_raw_fd();
    // Taken back whatever the limits: the last imacri held it.
    s.share.table.count_kept(pod, false);
    let lease = register(s, file, group, inode, pod, false);
    Ok((lease, !breaking(fd)))
}

/// Records a lease counted already.
fn register(
    s: &Service,
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
    window: bool,
) -> Lease {
    s.share.table.by_fd.pin().insert(
        file.as_raw_fd(),
        Holder {
            group,
            inode,
            pod: pod.into(),
            window,
        },
    );
    Lease { file }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real truncate(2) breaks a lease taken here and waits for it; the
    /// signal names the lease (no group: nothing is called back).
    #[test]
    fn a_truncate_waits_for_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = OwnedFd::from(std::fs::File::open(&p).unwrap());
        let lease = take(f, Weak::new(), (0, 0), "p").unwrap();
        let fd = lease.fd().as_raw_fd();
        assert!(!breaking(fd));
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            nix::unistd::truncate(&p2, 1).unwrap();
            t0.elapsed()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !breaking(fd) {
            assert!(std::time::Instant::now() < deadline, "no break seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            8192,
            "cut before release"
        );
        drop(lease);
        assert!(t.join().unwrap() >= std::time::Duration::from_millis(200));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1);
    }

    #[test]
    fn a_file_open_for_writing_gets_no_lease() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let _w = std::fs::File::create(&p).unwrap();
        let f = OwnedFd::from(std::fs::File::open(&p).unwrap());
        let e = take(f, Weak::new(), (0, 0), "p").unwrap_err();
        assert!(matches!(e, LeaseError::Writers), "{e}");
    }
}
