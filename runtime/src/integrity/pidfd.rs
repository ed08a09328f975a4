//! Process fds (`pidfd_open`, `pidfd_getfd`, `pidfd_send_signal`), which
//! the libc crate names but does not wrap. A leaf.

use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `pidfd_open(pid, flags)`.
pub(crate) fn open(pid: i32, flags: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: a raw syscall with integer arguments; the result is checked.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    owned(r)
}

/// A copy (close-on-exec) of the process's fd `n`: needs nothing of the
/// process, stopped or not; the caller needs ptrace access to it.
pub(crate) fn getfd(pidfd: BorrowedFd<'_>, n: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: a raw syscall with integer arguments; the result is checked.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
    owned(r)
}

/// SIGKILL through a pidfd: it reaches the process the pidfd was opened
/// on or none (never one that took its pid since).
pub(crate) fn kill(pidfd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: a pidfd, a signal number, no siginfo; the result is checked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

fn owned(r: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = Errno::result(r)?;
    // SAFETY: a new fd the kernel just returned, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
