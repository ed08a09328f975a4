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

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::Group;

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
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Out of the table before the fd number can be reused.
        if let Ok(s) = service() {
            if let Ok(mut t) = s.leases.lock() {
                t.remove(self.file.as_raw_fd());
            }
        }
    }
}

/// Leases one pod may hold: each is an open file of imacri's (and of the
/// keeper's), so a pod mapping file after file must not use up the fds
/// every pod's measurement needs. Far above what a program maps.
pub const PER_POD: usize = 1024;

/// Why [`take`] fails on a file someone has open for writing.
pub(super) const WRITERS: &str = "a read lease is refused: the file is open for writing";

/// Whose lease an fd is.
struct Holder {
    group: Weak<Group>,
    inode: (u64, u64),
    pod: Arc<str>,
}

#[derive(Default)]
struct Table {
    by_fd: HashMap<RawFd, Holder>,
    per_pod: HashMap<Arc<str>, usize>,
}

impl Table {
    fn remove(&mut self, fd: RawFd) {
        if let Some(h) = self.by_fd.remove(&fd) {
            if let Some(n) = self.per_pod.get_mut(&h.pod) {
                *n -= 1;
                if *n == 0 {
                    self.per_pod.remove(&h.pod);
                }
            }
        }
    }
}

struct Service {
    /// The thread that reads the signals (the owner of every lease).
    tid: libc::pid_t,
    leases: Mutex<Table>,
    /// Leases the process may hold: a quarter of its open-file limit.
    limit: usize,
}

fn service() -> Result<&'static Service, String> {
    static SERVICE: OnceLock<Result<Service, String>> = OnceLock::new();
    SERVICE.get_or_init(start).as_ref().map_err(Clone::clone)
}

/// Whether this node lets imacri hold leases (`fs.leases-enable`).
pub fn probe() -> Result<(), String> {
    match std::fs::read_to_string("/proc/sys/fs/leases-enable") {
        Ok(v) if v.trim() == "0" => {
            Err("fs.leases-enable is 0: truncate(2) of a mapped file cannot be seen".into())
        }
        _ => service().map(|_| ()),
    }
}

extern "C" fn ignore(_: libc::c_int) {}

fn start() -> Result<Service, String> {
    let sig = lease_signal();
    for s in [sig, libc::SIGIO] {
        // SAFETY: installs a handler that does nothing, only where none
        // is set (SIGIO's default would end the process); sa is zeroed
        // plain data.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(s, std::ptr::null(), &mut old) != 0 {
                return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
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
                    let _ = tx.send(Err(format!(
                        "signalfd: {}",
                        std::io::Error::last_os_error()
                    )));
                    return;
                }
                OwnedFd::from_raw_fd(fd)
            };
            // SAFETY: gettid has no arguments.
            let _ = tx.send(Ok(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t));
            read_signals(sfd, sig);
        })
        .map_err(|e| format!("starting the lease thread: {e}"))?;
    let tid = rx
        .recv()
        .map_err(|_| "the lease thread did not start".to_string())??;
    // SAFETY: getrlimit on a local struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    Ok(Service {
        tid,
        leases: Mutex::new(Table::default()),
        limit: nofile / 4,
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
        let suspects: Vec<RawFd> = match s.leases.lock() {
            Ok(_) if si.ssi_signo as libc::c_int == sig => vec![si.ssi_fd],
            Ok(t) => t.by_fd.keys().copied().collect(),
            Err(_) => continue,
        };
        for fd in suspects {
            let holder = s.leases.lock().ok().and_then(|t| {
                t.by_fd
                    .get(&fd)
                    .filter(|_| breaking(fd))
                    .map(|h| (h.group.clone(), h.inode))
            });
            if let Some((group, inode)) = holder {
                if let Some(g) = group.upgrade() {
                    g.lease_broken(inode, "truncated (its read lease broke)");
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

/// Whether `pod` may take one more lease.
fn room(t: &Table, limit: usize, pod: &str) -> Result<(), String> {
    if t.by_fd.len() >= limit {
        return Err(format!("imacri holds {limit} leases, its limit"));
    }
    if t.per_pod.get(pod).is_some_and(|n| *n >= PER_POD) {
        return Err(format!("the pod holds {PER_POD} leases, its limit"));
    }
    Ok(())
}

/// Makes the lease thread the one signalled when the lease on `fd` breaks.
fn own(fd: RawFd, tid: libc::pid_t) -> Result<(), String> {
    let o = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: fcntl with a pointer to a live f_owner_ex, and an int.
    let r = unsafe { libc::fcntl(fd, F_SETSIG, lease_signal()) | libc::fcntl(fd, F_SETOWN_EX, &o) };
    if r != 0 {
        return Err(format!("F_SETOWN_EX: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Takes a read lease through `file` (our own read-only open file) for
/// the watched `inode` of `group`, a file of `pod`. Refused while anyone
/// has the file open for writing (the kernel's rule for read leases), and
/// past [`PER_POD`] or the process's share of fds.
pub(super) fn take(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<Lease, String> {
    let s = service()?;
    room(&*s.leases.lock().map_err(|e| e.to_string())?, s.limit, pod)?;
    let fd = file.as_raw_fd();
    own(fd, s.tid)?;
    // SAFETY: fcntl with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) => WRITERS.into(),
            _ => format!("read lease: {e}"),
        });
    }
    // Setting a lease up may have made the process the owner again.
    own(fd, s.tid)?;
    let lease = register(s, file, group, inode, pod)?;
    if breaking(fd) {
        return Err("the file is being truncated or opened for writing".into());
    }
    Ok(lease)
}

/// Takes back a lease the fd keeper held for the last imacri: Ok(true)
/// when it is still whole, Ok(false) when it broke while nobody listened
/// (the file may have been cut since).
pub(super) fn adopt(
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<(Lease, bool), String> {
    let s = service()?;
    own(file.as_raw_fd(), s.tid)?;
    let fd = file.as_raw_fd();
    let lease = register(s, file, group, inode, pod)?;
    Ok((lease, !breaking(fd)))
}

fn register(
    s: &Service,
    file: OwnedFd,
    group: Weak<Group>,
    inode: (u64, u64),
    pod: &str,
) -> Result<Lease, String> {
    let mut t = s.leases.lock().map_err(|e| e.to_string())?;
    let pod: Arc<str> = match t.per_pod.get_key_value(pod) {
        Some((k, _)) => k.clone(),
        None => pod.into(),
    };
    *t.per_pod.entry(pod.clone()).or_default() += 1;
    t.by_fd
        .insert(file.as_raw_fd(), Holder { group, inode, pod });
    Ok(Lease { file })
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
        assert!(e.contains("open for writing"), "{e}");
    }

    /// A pod's leases are bounded, and so are all of imacri's; a lease
    /// given back makes room.
    #[test]
    fn a_pod_holds_at_most_its_share() {
        let mut t = Table::default();
        let add = |t: &mut Table, fd: RawFd, pod: &str| {
            let pod: Arc<str> = pod.into();
            *t.per_pod.entry(pod.clone()).or_default() += 1;
            let group = Weak::new();
            t.by_fd.insert(
                fd,
                Holder {
                    group,
                    inode: (0, 0),
                    pod,
                },
            );
        };
        for fd in 0..PER_POD as RawFd {
            add(&mut t, fd, "a");
        }
        assert!(room(&t, 4 * PER_POD, "a").unwrap_err().contains("the pod"));
        assert!(room(&t, 4 * PER_POD, "b").is_ok());
        assert!(room(&t, PER_POD, "b").unwrap_err().contains("imacri holds"));
        t.remove(0);
        assert!(room(&t, 4 * PER_POD, "a").is_ok());
        for fd in 1..PER_POD as RawFd {
            t.remove(fd);
        }
        assert!(t.per_pod.is_empty());
    }
}
