//! Closing seccomp's CONTINUE window by holding still everyone who could
//! reopen it. When a guarded call's fd table (mmap) or address space
//! (mprotect) is shared with other tasks, each of them is stopped with
//! ptrace (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`: a stop the process's parent
//! never sees, unlike SIGSTOP) *before* the call's file is taken and
//! measured, and kept stopped until the call has returned (the caller
//! itself is interrupted after the answer: it stops on its way out of the
//! call). Nobody can then `dup2` another file onto the fd or map one under
//! the range between the check and the kernel's second read: what is
//! measured is what is mapped, before any code of it can run.
//!
//! io_uring's kernel threads (workers, and a ring's SQPOLL thread) share
//! the caller's tables but cannot be stopped (ptrace refuses them) and run
//! no code of the process. No request they run maps memory, so they are
//! left out of an mprotect's holding; they can close and open files, so an
//! mmap they share the fd table of is checked once it returned: the file
//! now mapped at the address it returned must be the one measured, or the
//! process is killed while it is still stopped, before any of it runs.
//! The caller stops there for sure because a breakpoint (`int3`) waits
//! where it returns to (seccomp reports the address), written before the
//! answer and taken out once it stopped: an interrupt sent after the
//! answer races the caller's return, and lost the race often enough for
//! the swapped code to run first. A caller whose return cannot be trapped
//! so (not x86-64, or the address not writable through /proc) is refused.
//!
//! Each held call runs on a thread of its own (the ptrace tracer is a
//! thread; when it ends the kernel detaches whatever it still holds), one
//! at a time per container. A call whose sharers cannot all be stopped in
//! time (one blocked in the kernel, or traced by someone else) is refused
//! (EPERM): nothing else could tell what the kernel maps.
//!
//! A stop interrupts a sharer's blocking call; it is restarted when it
//! resumes, as after SIGSTOP/SIGCONT (a few calls, such as `epoll_wait`,
//! return EINTR instead, as they do then).

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::shared::{shares_with_any, Table};
use super::CallError;
use crate::integrity::sys::SysError;

/// How long the sharers (and then the caller) get to reach their stop.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// How many times a stop is checked for between yields of the CPU before
/// waiting for it in sleeps.
const YIELDS: u32 = 200;

/// How often the caller's cgroup is listed again for sharers cloned while
/// the known ones were being stopped.
const LIST_TRIES: usize = 8;

/// Tasks this thread holds in a ptrace stop; let go when dropped (or by
/// the kernel, when the thread ends).
#[derive(Default)]
pub(super) struct Held {
    tasks: Vec<Task>,
    /// io_uring workers share the caller's fd table and cannot be held
    /// (ptrace refuses kernel-made threads): a request they run could put
    /// another file under the call's fd, so what the call mapped is
    /// checked after it returned ([`Held::io_workers`]).
    io_workers: bool,
}

/// `PF_IO_WORKER` in a task's flags (`/proc/<tid>/stat`, field 9): a
/// thread the kernel made to run a process's io_uring requests. It runs
/// no code of the process; it can open and close files in its fd table
/// (IORING_OP_OPENAT, IORING_OP_CLOSE), but no io_uring request maps
/// memory.
const PF_IO_WORKER: u64 = 0x10;

fn is_io_worker(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(") ")?;
            rest.split(' ').nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_IO_WORKER != 0)
}

/// x86-64's breakpoint instruction.
const INT3: u8 = 0xcc;

/// A breakpoint written where a caller returns to.
pub(super) struct Trap {
    mem: std::fs::File,
    ip: u64,
    orig: u8,
}

struct Task {
    pid: Pid,
    /// A signal the task dequeued while being stopped, handed back on
    /// release.
    signal: Option<Signal>,
    stopped: bool,
    gone: bool,
}

impl Held {
    /// Stops every task of `list` (the caller's cgroup) other than `tid`
    /// that shares `tid`'s `table`, including any cloned meanwhile.
    pub(super) fn sharers_of(
        &mut self,
        tid: u32,
        table: Table,
        mut list: impl FnMut() -> std::io::Result<Vec<u32>>,
    ) -> Result<(), CallError> {
        let mut compared: HashSet<u32> = HashSet::new();
        let deadline = Instant::now() + STOP_WAIT;
        for _ in 0..LIST_TRIES {
            let tasks = list().map_err(|e| SysError::io("listing the cgroup's tasks", e))?;
            let fresh: Vec<u32> = tasks
                .into_iter()
                .filter(|t| *t != tid && compared.insert(*t))
                .collect();
            if fresh.is_empty() {
                // Every sharer listed is stopped and cannot clone another.
                return Ok(());
            }
            for t in fresh {
                // For an mmap, a task sharing only the address space is
                // held too: it cannot change the fd, but where io_uring
                // can (checked after the return), it could jump into the
                // new mapping before the check.
                let shares = shares_with_any(tid, &[t], table)
                    || (table == Table::Files && shares_with_any(tid, &[t], Table::Vm));
                if !shares {
                    continue;
                }
                if is_io_worker(t) {
                    // An address space no request can map into: harmless.
                    self.io_workers |= table == Table::Files;
                    continue;
                }
                self.hold(t)?;
            }
            self.wait(deadline)?;
        }
        Err(CallError::CgroupChanging)
    }

    /// Whether an io_uring worker shares the call's fd table (see the
    /// field): then the caller's mapping must be checked once it returned.
    pub(super) fn io_workers(&self) -> bool {
        self.io_workers
    }

    /// Attaches to the caller before its call is answered, without
    /// stopping it: a caller that cannot be attached to is refused, since
    /// nothing could then stop it on its way out. EPERM while the hold
    /// thread of the task's previous call is still attached (the kernel
    /// lets go as that thread ends) is waited out.
    pub(super) fn attach_caller(&mut self, tid: u32) -> Result<(), CallError> {
        let pid = Pid::from_raw(tid as i32);
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match ptrace::seize(pid, ptrace::Options::empty()) {
                Ok(()) => break,
                Err(Errno::EPERM) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    return Err(
                        SysError::call(format!("ptrace seize of the caller {tid}"), e).into(),
                    )
                }
            }
        }
        self.track(pid);
        Ok(())
    }

    /// Stops the caller (attached by [`attach_caller`]) once its call has
    /// returned (after the answer): the kernel is done reading what it
    /// names.
    pub(super) fn caller_returned(&mut self, tid: u32) -> Result<(), CallError> {
        match ptrace::interrupt(Pid::from_raw(tid as i32)) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                return Err(
                    SysError::call(format!("ptrace interrupt of the caller {tid}"), e).into(),
                )
            }
        }
        self.wait(Instant::now() + STOP_WAIT)
    }

    /// Writes a breakpoint where the caller (attached, not stopped: still
    /// in its call) returns to, so that it stops there before it runs an
    /// instruction; [`caller_trapped`] takes it out.
    pub(super) fn trap_return(&mut self, tid: u32, ip: u64) -> Result<Trap, CallError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(CallError::NotX86);
        }
        use std::os::unix::fs::FileExt;
        let err = |what: &str, e: std::io::Error| {
            SysError::io(format!("{what} the caller's code at {ip:#x}"), e)
        };
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{tid}/mem"))
            .map_err(|e| err("opening", e))?;
        let mut orig = [0u8];
        mem.read_exact_at(&mut orig, ip)
            .map_err(|e| err("reading", e))?;
        // A private copy of the page (FOLL_FORCE) is what gets the byte.
        mem.write_all_at(&[INT3], ip)
            .map_err(|e| err("writing", e))?;
        Ok(Trap {
            mem,
            ip,
            orig: orig[0],
        })
    }

    /// Waits for the caller to stop on its way out of its call (at the
    /// breakpoint, or at a signal it takes first: a tracee stops before a
    /// handler runs), takes the breakpoint out and, if the caller stopped
    /// on it, puts it back on the instruction it replaced.
    pub(super) fn caller_trapped(&mut self, tid: u32, trap: Trap) -> Result<(), CallError> {
        use std::os::unix::fs::FileExt;
        let stopped = self.wait(Instant::now() + STOP_WAIT);
        let restored = trap.mem.write_all_at(&[trap.orig], trap.ip).map_err(|e| {
            SysError::io(format!("restoring the caller's code at {:#x}", trap.ip), e).into()
        });
        stopped?;
        let pid = Pid::from_raw(tid as i32);
        let Some(t) = self.tasks.iter_mut().find(|t| t.pid == pid) else {
            return restored;
        };
        if t.gone {
            // Killed meanwhile: nothing ran, nothing to restore.
            return Ok(());
        }
        restored?;
        if t.signal != Some(Signal::SIGTRAP) {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        {
            let regs_err = |e| SysError::call(format!("registers of task {tid}"), e);
            let mut regs = ptrace::getregs(pid).map_err(regs_err)?;
            if regs.rip == trap.ip + 1 {
                regs.rip = trap.ip;
                ptrace::setregs(pid, regs).map_err(regs_err)?;
                // Ours: not delivered when it is let go.
                t.signal = None;
            }
        }
        Ok(())
    }

    /// Kills the caller's process and every held process sharing its
    /// address space (a `clone(CLONE_VM)` without CLONE_THREAD is a process
    /// of its own, and would run what was mapped once let go), while they
    /// are stopped: SIGKILL takes a task out of its ptrace stop straight to
    /// its end, with no instruction of the process run.
    pub(super) fn kill_address_space(&self, tid: u32) {
        let sharers: Vec<Pid> = self
            .tasks
            .iter()
            .filter(|t| !t.gone && shares_with_any(tid, &[t.pid.as_raw() as u32], Table::Vm))
            .map(|t| t.pid)
            .collect();
        for pid in std::iter::once(Pid::from_raw(tid as i32)).chain(sharers) {
            // SIGKILL ends the task's whole thread group.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
    }

    /// What the held caller's call returned (after [`caller_returned`]).
    pub(super) fn returned(&self, tid: u32) -> Result<i64, CallError> {
        let pid = Pid::from_raw(tid as i32);
        let regs = ptrace::getregs(pid)
            .map_err(|e| SysError::call(format!("registers of task {tid}"), e))?;
        #[cfg(target_arch = "x86_64")]
        let ret = regs.rax as i64;
        #[cfg(target_arch = "aarch64")]
        let ret = regs.regs[0] as i64;
        Ok(ret)
    }

    /// A task just attached to: let go on drop once stopped.
    fn track(&mut self, pid: Pid) {
        self.tasks.push(Task {
            pid,
            signal: None,
            stopped: false,
            gone: false,
        });
    }

    fn hold(&mut self, tid: u32) -> Result<(), CallError> {
        let pid = Pid::from_raw(tid as i32);
        match ptrace::seize(pid, ptrace::Options::empty()) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(()), // gone: it shares nothing now
            Err(e) => return Err(SysError::call(format!("ptrace seize of task {tid}"), e).into()),
        }
        self.track(pid);
        match ptrace::interrupt(pid) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SysError::call(format!("ptrace interrupt of task {tid}"), e).into()),
        }
    }

    /// Waits until every held task is stopped or gone: a stop takes a few
    /// microseconds (a context switch), so the first checks only yield the
    /// CPU; past them it backs off to sleeps.
    fn wait(&mut self, deadline: Instant) -> Result<(), CallError> {
        for t in self.tasks.iter_mut().filter(|t| !t.stopped) {
            let mut pause = Duration::from_micros(10);
            let mut spins = 0;
            loop {
                match waitpid(t.pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                    // The interrupt's stop, or a group stop.
                    Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::PtraceSyscall(_)) => {
                        t.stopped = true;
                        break;
                    }
                    // It dequeued a signal first: stopped too; the signal
                    // is delivered when it is let go.
                    Ok(WaitStatus::Stopped(_, sig)) => {
                        t.signal = Some(sig);
                        t.stopped = true;
                        break;
                    }
                    Ok(WaitStatus::Exited(..))
                    | Ok(WaitStatus::Signaled(..))
                    | Err(Errno::ECHILD) => {
                        t.stopped = true;
                        t.gone = true;
                        break;
                    }
                    Ok(WaitStatus::Continued(_)) => {}
                    Err(e) => {
                        let what = format!("waiting for task {} to stop", t.pid);
                        return Err(SysError::call(what, e).into());
                    }
                }
                if Instant::now() > deadline {
                    return Err(CallError::NotStopped {
                        tid: t.pid.as_raw(),
                        wait: STOP_WAIT,
                    });
                }
                if spins < YIELDS {
                    spins += 1;
                    std::thread::yield_now();
                    continue;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for t in self.tasks.iter().filter(|t| t.stopped && !t.gone) {
            let _ = ptrace::detach(t.pid, t.signal);
        }
        // Tasks that never stopped are let go by the kernel when this
        // thread ends (a running tracee cannot be detached).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task's state and its time on a CPU in ns (`schedstat`: exact,
    /// where `stat`'s ticks are an estimate split between user and system
    /// time that moved by a tick for a held thread, once in the full suite).
    fn stat(tid: u32) -> (char, u64) {
        let s = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit_once(") ").unwrap().1.split(' ').collect();
        let ran = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).unwrap();
        let ns = ran.split(' ').next().unwrap().parse::<u64>().unwrap();
        (f[0].chars().next().unwrap(), ns)
    }

    /// A process of two threads (ptrace cannot hold a thread of its own
    /// process): the spinning one, which shares the sleeping one's fd
    /// table, stands still while held and runs on once let go; then the
    /// sleeping one is stopped as a caller is.
    #[test]
    fn a_held_sharer_stands_still_until_released() {
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import threading,time\n\
                 def spin():\n    while True: pass\n\
                 threading.Thread(target=spin, daemon=True).start()\n\
                 time.sleep(60)",
            ])
            .spawn()
            .unwrap();
        let main = child.id();
        let task_dir = format!("/proc/{main}/task");
        let threads = || -> Vec<u32> {
            std::fs::read_dir(&task_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads().len() < 2 {
            assert!(Instant::now() < deadline, "no second thread");
            std::thread::sleep(Duration::from_millis(10));
        }
        let spinner = *threads().iter().find(|t| **t != main).unwrap();
        let mut held = Held::default();
        held.sharers_of(main, Table::Files, || Ok(threads()))
            .unwrap();
        assert_eq!(held.tasks.len(), 1);
        assert_eq!(stat(spinner).0, 't', "held, not stopped");
        // A task reads as stopped a moment before it is off its CPU, whose
        // last slice can still cross a clock tick: sampled once the kernel
        // says it is off (/proc/<tid>/syscall answers "running" for a task
        // on a CPU or runnable). Its time standing still for 20 ms was the
        // sign before, which a running spinner also shows on a loaded
        // machine that gives it no CPU for that long (one failure under the
        // full suite).
        let deadline = Instant::now() + Duration::from_secs(2);
        let syscall = format!("/proc/{spinner}/syscall");
        while std::fs::read_to_string(&syscall)
            .unwrap()
            .starts_with("running")
        {
            assert!(Instant::now() < deadline, "a held thread runs on");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A held thread may still be woken into the kernel (a signal's
        // trap stop) for microseconds; running, it would spin for most of
        // the 200 ms.
        let ran = stat(spinner).1;
        std::thread::sleep(Duration::from_millis(200));
        let more = stat(spinner).1 - ran;
        assert!(more < 2_000_000, "a held thread ran {more} ns");
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat(spinner).1 < ran + 2_000_000 {
            assert!(Instant::now() < deadline, "a released thread stood still");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(stat(spinner).0, 't');

        let mut held = Held::default();
        held.attach_caller(main).unwrap();
        assert_ne!(stat(main).0, 't', "attached, not stopped");
        held.caller_returned(main).unwrap();
        assert_eq!(stat(main).0, 't');
        drop(held);
        assert_ne!(stat(main).0, 't');
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A caller blocked in a call (here `read`, at the address
    /// /proc/<pid>/syscall reports, as seccomp does) stops at the
    /// breakpoint where it returns, before running on; once let go it runs
    /// the instruction the breakpoint replaced and goes on unharmed.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_trapped_caller_stops_where_it_returns_and_runs_on() {
        use std::io::{Read, Write};
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; sys.stdin.buffer.read(1); print('ran on')",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ip = loop {
            // `nr args... sp pc` while in a call: read (0) of fd 0, asleep
            // (not one of the start's reads of files).
            let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
            let f: Vec<&str> = s.split_whitespace().collect();
            if f.len() == 9 && f[0] == "0" && f[1] == "0x0" && stat(pid).0 == 'S' {
                break u64::from_str_radix(f[8].trim_start_matches("0x"), 16).unwrap();
            }
            assert!(Instant::now() < deadline, "not in read: {s}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut held = Held::default();
        held.attach_caller(pid).unwrap();
        let trap = held.trap_return(pid, ip).unwrap();
        child.stdin.take().unwrap().write_all(b"x").unwrap();
        held.caller_trapped(pid, trap).unwrap();
        assert_eq!(stat(pid).0, 't', "stopped on its way out");
        let regs = ptrace::getregs(Pid::from_raw(pid as i32)).unwrap();
        assert_eq!(regs.rip, ip, "back on the replaced instruction");
        assert_eq!(regs.rax, 1, "what the call returned");
        drop(held);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let st = child.wait().unwrap();
        assert!(st.success(), "{st:?}");
        assert_eq!(out.trim(), "ran on");
    }
}
