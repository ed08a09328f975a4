//! The files a guarded call names, taken from the calling task itself.
//!
//! A notification names a *task* (a thread id), not a process: a library
//! loaded by a worker thread (a JVM's main thread, a Python thread
//! importing an extension) is mapped by a task that is not its process's
//! leader, and a thread can have an fd table of its own
//! (`unshare(CLONE_FILES)`). So the fd is taken from that very task: a
//! thread pidfd (`PIDFD_THREAD`, Linux 6.9), else `/proc/<tid>/fd/<n>`.
//! Never from the thread group leader: its fd `n` may be another file.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use super::CallError;
use crate::integrity::digest::FileKey;
use crate::integrity::pidfd;
use crate::integrity::sys::SysError;
use nix::errno::Errno;

/// `pidfd_open` flag for a pidfd of a thread rather than a process
/// (Linux 6.9; the value is O_EXCL's).
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// How many tasks' pidfds a listener keeps (each is an fd of imacri's, and
/// keeps a gone task's `struct pid`): the calls that reuse one come in a
/// burst from one task (ld.so mapping a program's libraries).
const KEPT: usize = 32;

/// One listener's pidfds of the tasks that made its calls, kept: opening
/// and closing one per call costs as much as the rest of a cached
/// decision. A kept pidfd names the task it was opened for, never a later
/// task given the same id: for a task that is gone `pidfd_getfd` fails
/// (ESRCH) and a fresh pidfd is opened.
#[derive(Default)]
pub(super) struct Tasks {
    pidfds: HashMap<u32, OwnedFd>,
    /// This kernel has no thread pidfds: fds are reopened through /proc.
    no_thread_pidfds: bool,
}

impl Tasks {
    /// The file behind fd number `fd` of task `tid`.
    pub(super) fn file_of(&mut self, tid: u32, fd: i32) -> Result<OwnedFd, CallError> {
        for fresh in [false, true] {
            if self.no_thread_pidfds {
                return reopen(tid, fd);
            }
            if fresh || !self.pidfds.contains_key(&tid) {
                let Some(pidfd) = thread_pidfd(tid)? else {
                    self.no_thread_pidfds = true;
                    return reopen(tid, fd);
                };
                if self.pidfds.len() >= KEPT {
                    self.pidfds.clear();
                }
                self.pidfds.insert(tid, pidfd);
            }
            let Some(pidfd) = self.pidfds.get(&tid) else {
                continue;
            };
            match pidfd::getfd(pidfd.as_fd(), fd) {
                Ok(f) => return Ok(f),
                // A kept pidfd of an earlier task with this id.
                Err(Errno::ESRCH) if !fresh => {
                    self.pidfds.remove(&tid);
                }
                Err(e) => return Err(SysError::call(format!("pidfd_getfd({tid}, {fd})"), e).into()),
            }
        }
        Err(CallError::TaskGone { tid, fd })
    }

    /// The caller's open file behind `fd`, to hold open for writing
    /// (`fanotify/held.rs`): a copy of `taken` (what [`file_of`] gave)
    /// where that is the caller's own open file; on kernels without thread
    /// pidfds (`taken` a read-only reopen) the file opened again with the
    /// caller's access mode, by `open` (imacri's own opens go through the
    /// engine, so that its readers let them through).
    ///
    /// [`file_of`]: Self::file_of
    pub(super) fn for_holding(
        &self,
        tid: u32,
        fd: i32,
        taken: &OwnedFd,
        open: impl FnOnce(&dyn Fn() -> std::io::Result<OwnedFd>) -> std::io::Result<OwnedFd>,
    ) -> Result<OwnedFd, CallError> {
        let copy = || {
            taken
                .try_clone()
                .map_err(|e| SysError::io("copying the taken fd", e).into())
        };
        if !self.no_thread_pidfds {
            return copy();
        }
        let info = format!("/proc/{tid}/fdinfo/{fd}");
        let text = match std::fs::read_to_string(&info) {
            Ok(t) => t,
            Err(e) => return Err(SysError::io(info, e).into()),
        };
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok());
        let Some(flags) = flags else {
            return Err(CallError::NoFlags(info));
        };
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return copy();
        }
        let path = format!("/proc/{tid}/fd/{fd}");
        open(&|| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&path)
                .map(OwnedFd::from)
        })
        .map_err(|e| SysError::io(format!("opening {path} for writing"), e).into())
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.pidfds.len()
    }
}

/// Whether this kernel gives pidfds of threads (else fds are reopened
/// through /proc, slower).
pub(super) fn thread_pidfds() -> bool {
    // SAFETY: no arguments.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    matches!(thread_pidfd(me), Ok(Some(_)))
}

/// A pidfd of task `tid` itself; `None` when this kernel has no thread
/// pidfds (Linux < 6.9).
fn thread_pidfd(tid: u32) -> Result<Option<OwnedFd>, SysError> {
    match pidfd::open(tid as i32, PIDFD_THREAD) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::EINVAL) => Ok(None),
        Err(e) => Err(SysError::call(format!("pidfd_open({tid})"), e)),
    }
}

/// Kernels without thread pidfds: the same file opened again through the
/// task's own fd table (`/proc/<tid>/fd` is per task). A new open of the
/// same inode: what is hashed and checked for writers is that inode.
fn reopen(tid: u32, fd: i32) -> Result<OwnedFd, CallError> {
    let path = format!("/proc/{tid}/fd/{fd}");
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| SysError::io(format!("opening {path}"), e).into())
}

/// The files mapped in `[addr, addr+len)` of task `pid`, opened through
/// `/proc/<pid>/map_files`, which lists exactly the VMAs backed by a file.
/// (Not the inode column of `maps`: a SysV segment's inode is its id, 0 for
/// the first segment of an IPC namespace.) Anonymous ranges are skipped.
pub(super) fn mapped_files(pid: u32, addr: u64, len: u64) -> Result<Vec<OwnedFd>, SysError> {
    let mut out = Vec::new();
    for path in map_files(pid, addr, len)? {
        match std::fs::File::open(&path) {
            Ok(f) => out.push(f.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SysError::io(format!("opening {path}"), e)),
        }
    }
    Ok(out)
}

/// A mapped file's inode (device, number) and its path.
pub(super) type MappedInode = ((u64, u64), String);

/// The inodes (and paths) of the files mapped in `[addr, addr+len)` of task
/// `pid`, from their `map_files` links without opening them: a file that
/// cannot be opened (an io_uring ring's, an anonymous inode's) is named too.
pub(super) fn mapped_inodes(pid: u32, addr: u64, len: u64) -> Result<Vec<MappedInode>, SysError> {
    let mut out = Vec::new();
    for path in map_files(pid, addr, len)? {
        match nix::sys::stat::stat(path.as_str()) {
            Ok(st) => {
                let name = std::fs::read_link(&path)
                    .map_or_else(|_| path.clone(), |p| p.to_string_lossy().into_owned());
                out.push((FileKey::of(&st).inode(), name));
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(SysError::call(format!("stat {path}"), e)),
        }
    }
    Ok(out)
}

/// The `map_files` links of the VMAs of task `pid` that overlap
/// `[addr, addr+len)` (anonymous ones have none).
fn map_files(pid: u32, addr: u64, len: u64) -> Result<Vec<String>, SysError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| SysError::io(format!("reading /proc/{pid}/maps"), e))?;
    let end = addr.saturating_add(len.max(1));
    let mut out = Vec::new();
    for range in ranges(&maps) {
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if s >= end || e <= addr {
            continue;
        }
        out.push(format!("/proc/{pid}/map_files/{range}"));
    }
    Ok(out)
}

/// The address range of each line of a maps file.
fn ranges(maps: &str) -> impl Iterator<Item = &str> {
    maps.lines().filter_map(|l| l.split_whitespace().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_ranges() {
        let maps = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/dbus-daemon\n\
                    7f1000000000-7f1000001000 r--s 00000000 00:01 0 /SYSV00000000 (deleted)\n";
        let r: Vec<_> = ranges(maps).collect();
        assert_eq!(r, ["00400000-00452000", "7f1000000000-7f1000001000"]);
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;
    use std::os::fd::{AsRawFd, RawFd};

    fn id(fd: RawFd) -> (u64, u64) {
        let st = nix::sys::stat::fstat(fd).unwrap();
        (st.st_dev, st.st_ino)
    }

    fn gettid() -> u32 {
        // SAFETY: no arguments.
        unsafe { libc::syscall(libc::SYS_gettid) as u32 }
    }

    /// A thread with an fd table of its own: its fd `n` is not its
    /// process's fd `n`, and the file taken is the thread's.
    #[test]
    fn a_threads_fd_is_taken_from_the_thread_not_its_process() {
        let main_file = tempfile::tempfile().unwrap();
        let n = main_file.as_raw_fd();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: unshares this thread's fd table only; the copy of
            // `n` in it is replaced by dup2 and owned by nothing here.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_FILES) }, 0);
            let own = tempfile::tempfile().unwrap();
            assert_eq!(unsafe { libc::dup2(own.as_raw_fd(), n) }, n);
            tx.send((gettid(), id(own.as_raw_fd()))).unwrap();
            let _ = done_rx.recv();
        });
        let (tid, own) = rx.recv().unwrap();
        let mut tasks = Tasks::default();
        let got = tasks.file_of(tid, n).unwrap();
        assert_eq!(
            id(got.as_raw_fd()),
            own,
            "took the leader's fd, not the thread's"
        );
        assert_ne!(id(got.as_raw_fd()), id(main_file.as_raw_fd()));
        // Again: from the kept pidfd.
        let again = tasks.file_of(tid, n).unwrap();
        assert_eq!(id(again.as_raw_fd()), own);
        assert_eq!(tasks.kept(), 1);
        // Kernels without thread pidfds: reopened through the thread's own
        // /proc fd table, the same file.
        let mut old_kernel = Tasks {
            no_thread_pidfds: true,
            ..Tasks::default()
        };
        let reopened = old_kernel.file_of(tid, n).unwrap();
        assert_eq!(id(reopened.as_raw_fd()), own);
        done_tx.send(()).unwrap();
        t.join().unwrap();
        // The thread is gone: its kept pidfd does not answer for anyone.
        assert!(tasks.file_of(tid, n).is_err());
    }

    #[test]
    fn mapped_files_finds_shm_mappings_not_anonymous_ones() {
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, 4096, 0o700 | libc::IPC_CREAT);
            assert!(id >= 0);
            let s = libc::shmat(id, std::ptr::null(), 0);
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            let files = mapped_files(std::process::id(), s as u64, 4096).unwrap();
            assert_eq!(files.len(), 1);
            let path = super::super::super::digest::fd_path(files[0].as_fd());
            assert!(path.starts_with("/SYSV"), "{path}");
            // A SysV segment is never sealed against writes.
            assert!(super::super::super::engine::open_for_writing(
                files[0].as_fd()
            ));
            libc::shmdt(s);
            let anon = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(mapped_files(std::process::id(), anon as u64, 4096)
                .unwrap()
                .is_empty());
            libc::munmap(anon, 4096);
        }
    }
}
