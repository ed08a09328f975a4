//! The moment between imacri's answer to an execution and the kernel's own
//! writers check of it. The kernel refuses to execute a file open for
//! writing (ETXTBSY), but it checks after the permission event is answered
//! (`do_open_execat`: the open, with our event, then `deny_write_access`).
//! A writer that opens the file in that moment, writes and closes leaves
//! no writer for that check to see, and the execution runs what it wrote
//! under the digest measured before: on any filesystem, for an execution
//! held back there (`escape exec-swap` starves its child on a busy CPU
//! once it is answered; on a measured tmpfs volume it ran the rewritten
//! copy at its first try until 2026-12-05, when only overlay files were
//! held). And on overlayfs that check counts the writers of the overlay
//! file only, while a shared writable mapping holds the upper layer's
//! file: a process outside the pod's guards (a host daemon, a helper in
//! another pod the pod passed a writable fd to) that maps the file shared
//! and writable and closes its fd in that moment leaves no writer for the
//! kernel to see, and then changes the running program through its
//! mapping. (At our own check such a mapping is found: `overlay.rs`. The
//! pod's own processes are held to the kernel's rules by the map guard:
//! `held.rs`.)
//!
//! So an execution is answered only with a read lease taken on the file
//! (through the event's own open file), held until the execution is past
//! the kernel's check. An open for writing meanwhile takes the file's
//! write count first and then waits for the lease to break: the kernel's
//! check then refuses the execution (ETXTBSY), and the writer gets its file
//! only once the execution is settled. A file open for writing at the
//! answer gets no lease: that execution is refused (ETXTBSY, as the kernel
//! refuses it) rather than left to a check a writer could slip past.
//!
//! The lease stays for the file's next executions (until a writer breaks
//! it). An execution is settled once its task is seen running the file
//! (`/proc/<tid>/exe`), in another system call than `execve`, having run
//! in user mode since, gone (a thread that executed takes its leader's
//! ID), or executing again (the kernel opens an ELF interpreter or a
//! script's only after the program's check). A window whose lease breaks and does not settle within
//! [`SETTLE`] (a task held back so long, with a writer waiting) is closed
//! by killing the task's process: nothing of what runs after it could be
//! told from what was measured.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::leases::{self, Lease};
use super::Group;
use crate::integrity::digest::{fd_path, FileKey};
use crate::integrity::sys::{LeaseError, SysError, WatchError};

/// How long a broken window may wait for its execution to settle.
const SETTLE: Duration = Duration::from_secs(5);

/// How often the reader looks at the executions in their window.
const LOOK_EVERY: Duration = Duration::from_millis(5);

/// Leases a container keeps on files it executed, for the next execution
/// to find in place; past this many, those no execution is in the window
/// of are let go.
const KEPT: usize = 64;

/// The executions of a container between their answer and the kernel's
/// check, and the leases held for them.
#[derive(Debug, Default)]
pub(super) struct Windows {
    inner: Mutex<Inner>,
    /// Executions in their window: the reader settles none when there
    /// are none.
    count: AtomicUsize,
}

#[derive(Debug, Default)]
struct Inner {
    /// A read lease per executed overlay file, kept after its executions
    /// settled (taking one costs an execution ~6 us; finding one, a look
    /// up), until a writer breaks it or [`KEPT`] is passed.
    leases: HashMap<(u64, u64), Held>,
    /// Executions in their window: task and file.
    open: Vec<(i32, (u64, u64))>,
    /// When they were last looked at in `/proc`.
    looked: Option<Instant>,
}

#[derive(Debug)]
struct Held {
    lease: Lease,
    /// A writer waits on it: a thread lets it go once the file's
    /// executions settled.
    broken: bool,
}

/// Why an execution cannot be let through.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The file is open for writing: the kernel would refuse it too.
    Writers,
    /// No lease can be held (the pod's or imacri's share of fds).
    Unheld(WatchError),
}

impl Windows {
    pub(super) fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }
}

impl Inner {
    fn counted(&self, count: &AtomicUsize) {
        count.store(self.open.len(), Ordering::Release);
    }
}

impl Group {
    /// Lets the kept lease held through `fd` on `inode` go for another
    /// file's (`leases.rs`: imacri's share, or the pod's own limit, taken)
    /// when no execution is
    /// in its window: it is kept only for the next execution of the file
    /// to find in place, which then takes one anew. Not while the table is
    /// busy (the caller may hold another group's). Whether it went.
    pub(super) fn give_up_window(&self, inode: (u64, u64), fd: RawFd) -> bool {
        let Ok(mut inner) = self.windows.inner.try_lock() else {
            return false;
        };
        if inner.open.iter().any(|(_, i)| *i == inode) {
            return false;
        }
        let idle = inner
            .leases
            .get(&inode)
            .is_some_and(|h| !h.broken && h.lease.fd().as_raw_fd() == fd);
        idle && inner.leases.remove(&inode).is_some()
    }

    /// Before task `tid`'s execution of `inode`, the file open as `fd` (the
    /// event's file), is allowed: Err(why) when it must be refused.
    pub(super) fn open_window(
        &self,
        tid: i32,
        inode: (u64, u64),
        fd: BorrowedFd<'_>,
    ) -> Result<(), Refusal> {
        use Refusal::Unheld;
        {
            let mut inner = self.windows.inner.lock().map_err(|e| Unheld(e.into()))?;
            // Held (unbroken: no writer opened it since), or broken with a
            // writer waiting that already counts for the kernel's check
            // (and the thread letting it go waits for this one too).
            if inner.leases.contains_key(&inode) {
                inner.open.push((tid, inode));
                inner.counted(&self.windows.count);
                return Ok(());
            }
        }
        let own = fd
            .try_clone_to_owned()
            .map_err(|e| Unheld(SysError::io("copying the file's fd", e).into()))?;
        let lease = match leases::take_window(
            own,
            self.me.clone(),
            inode,
            &self.target.measured.pod,
        ) {
            Ok(l) => l,
            Err(LeaseError::Writers | LeaseError::Breaking) => return Err(Refusal::Writers),
            Err(e) if super::lease_probe().is_err() => {
                // A node without leases: nothing to hold the window with
                // (`imacri check` says so).
                tracing::debug!(container_id = %self.target.measured.container, error = %e, "no lease for an execution's window");
                return Ok(());
            }
            Err(e) => return Err(Unheld(e.into())),
        };
        let mut inner = self.windows.inner.lock().map_err(|e| Unheld(e.into()))?;
        // Past KEPT, and for deleted files (no execution by a name can
        // find their lease, and it kept the file, its blocks or memory and
        // its watch's mark until the container ended: a container that
        // runs and deletes what it builds held 64 such files), the leases
        // no execution is in the window of go.
        let busy: Vec<(u64, u64)> = inner.open.iter().map(|(_, i)| *i).collect();
        let full = inner.leases.len() >= KEPT;
        inner
            .leases
            .retain(|i, h| h.broken || busy.contains(i) || (!full && linked(&h.lease)));
        // A racing execution's lease may be in place: one is enough.
        inner.leases.entry(inode).or_insert(Held {
            lease,
            broken: false,
        });
        inner.open.push((tid, inode));
        inner.counted(&self.windows.count);
        Ok(())
    }

    /// Forgets the executions that are settled. `executing`: a task whose
    /// execution event is being handled now, so past its earlier ones.
    /// With `look`, the others are looked at in `/proc`, at most every
    /// [`LOOK_EVERY`] (a storm of executions must not cost each event a
    /// look at every other one in flight). The reader looks after it has
    /// answered what it read, not before: a look costs two system calls
    /// per execution in its window, which a waiting execution would pay.
    pub(super) fn settle_windows(&self, executing: Option<i32>, look: bool) {
        if !self.windows.any() {
            return;
        }
        let Ok(mut inner) = self.windows.inner.lock() else {
            return;
        };
        let look = look && inner.looked.is_none_or(|t| t.elapsed() >= LOOK_EVERY);
        if look {
            inner.looked = Some(Instant::now());
        }
        let Inner { leases, open, .. } = &mut *inner;
        open.retain(|(tid, inode)| {
            // A broken lease's thread settles its file's executions.
            leases.get(inode).is_some_and(|h| h.broken)
                || !(executing == Some(*tid) || (look && settled(*tid, *inode)))
        });
        inner.counted(&self.windows.count);
    }

    /// The lease held through `fd` broke: a writer waits. With every
    /// execution of its file settled it is let go at once; otherwise a
    /// thread waits for them to settle and kills the processes of those
    /// that do not within [`SETTLE`].
    pub(super) fn window_broken(self: &Arc<Self>, fd: RawFd) {
        let inode = {
            let Ok(mut inner) = self.windows.inner.lock() else {
                return;
            };
            let found = inner
                .leases
                .iter_mut()
                .find(|(_, h)| h.lease.fd().as_raw_fd() == fd && !h.broken);
            let Some((inode, held)) = found else { return };
            held.broken = true;
            *inode
        };
        let mut ran = HashMap::new();
        if self.settle_file(inode, false, &mut ran) {
            return;
        }
        let group = self.clone();
        let spawned = std::thread::Builder::new()
            .name("imacri-window".into())
            .spawn(move || {
                let deadline = Instant::now() + SETTLE;
                while !group.settle_file(inode, Instant::now() >= deadline, &mut ran) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        if spawned.is_err() {
            self.settle_file(inode, true, &mut HashMap::new());
        }
    }

    /// Forgets the settled executions of `inode`, and when none is left
    /// lets go of its lease (the waiting writer goes on): true then.
    /// `kill`: the others' processes are killed (and forgotten). `ran`:
    /// each task's user time when first looked at here; a task that has
    /// run in user mode since is out of its `execve` (a task on a CPU that
    /// [`settled`] cannot tell: its execution failed after the kernel's
    /// check and it runs on).
    fn settle_file(&self, inode: (u64, u64), kill: bool, ran: &mut HashMap<i32, u64>) -> bool {
        let Ok(mut inner) = self.windows.inner.lock() else {
            return true;
        };
        let mut killed = Vec::new();
        inner.open.retain(|(tid, i)| {
            if *i != inode {
                return true;
            }
            let before = *ran
                .entry(*tid)
                .or_insert_with(|| user_time(*tid).unwrap_or(u64::MAX));
            if settled(*tid, inode) || user_time(*tid).is_some_and(|t| t > before) {
                return false;
            }
            if kill {
                killed.push(*tid);
            }
            !kill
        });
        let done = !inner.open.iter().any(|(_, i)| *i == inode);
        let path = inner
            .leases
            .get(&inode)
            .map(|h| fd_path(h.lease.fd()))
            .unwrap_or_default();
        if done {
            // In the same lock as the look: an execution that finds the
            // lease in place is one this look saw.
            inner.leases.remove(&inode);
        }
        inner.counted(&self.windows.count);
        drop(inner);
        for tid in killed {
            // SAFETY: kill(2) with plain integers: SIGKILL to the thread's
            // process, which has not run the file (it never will).
            unsafe { libc::kill(tid, libc::SIGKILL) };
            if let Some(engine) = self.engine.upgrade() {
                engine.execution_stopped(&self.target.measured, &path);
            }
        }
        done
    }
}

/// Whether the lease's file still has a name (a deleted file has none).
fn linked(lease: &Lease) -> bool {
    nix::sys::stat::fstat(lease.fd().as_raw_fd()).map_or(true, |st| st.st_nlink > 0)
}

/// Task `tid`'s own time in user mode (clock ticks; `/proc/<tid>/stat` of
/// a process leader would add up its threads').
fn user_time(tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/task/{tid}/stat")).ok()?;
    // After "pid (comm) ": state is field 3, utime field 14.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(11)?.parse().ok()
}

/// Whether task `tid`'s execution of `inode` is past the kernel's writers
/// check (or over): the task is gone, runs the file, or is in another
/// system call. A task that runs (on a CPU) anything else cannot be told.
fn settled(tid: i32, inode: (u64, u64)) -> bool {
    match nix::sys::stat::stat(format!("/proc/{tid}/exe").as_str()) {
        Ok(st) if FileKey::of(&st).inode() == inode => return true,
        // No exe: gone (or a zombie, or a kernel thread).
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ESRCH)
            if !std::path::Path::new(&format!("/proc/{tid}")).exists() =>
        {
            return true
        }
        _ => {}
    }
    let Ok(syscall) = std::fs::read_to_string(format!("/proc/{tid}/syscall")) else {
        return !std::path::Path::new(&format!("/proc/{tid}")).exists();
    };
    match syscall.split_whitespace().next().map(str::parse::<i64>) {
        Some(Ok(nr)) => nr != libc::SYS_execve && nr != libc::SYS_execveat,
        // "running": on a CPU, in the kernel or not.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_blocked_elsewhere_or_gone_is_settled_and_a_running_one_is_not() {
        // A thread on a CPU (or waiting for one) cannot be told.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let spin = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = tx.send(nix::unistd::gettid().as_raw());
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let spinner = rx.recv().unwrap();
        assert!(!settled(spinner, (0, 0)));
        // But it runs in user mode, which a task in execve does not.
        let t0 = user_time(spinner).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while user_time(spinner).unwrap() <= t0 {
            assert!(Instant::now() < deadline, "no user time");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        spin.join().unwrap();
        // A sleeping child is in nanosleep (or clock_nanosleep).
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let tid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !settled(tid, (0, 0)) {
            assert!(Instant::now() < deadline, "a sleeping task is settled");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Running the file: settled whatever it does.
        let exe = nix::sys::stat::stat(format!("/proc/{tid}/exe").as_str()).unwrap();
        assert!(settled(tid, FileKey::of(&exe).inode()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(settled(tid, (0, 0)), "gone");
    }
}
