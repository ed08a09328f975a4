//! A container's fanotify reader: reads its group's events and hands each
//! to the engine (or answers it at once), until its watch is dropped; a
//! reader that cannot go on fails closed. A reader with nothing to do parks
//! ([`park`]): its thread ends and one starts again when events come.

use nix::sys::fanotify::{FanotifyEvent, MaskFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use super::super::charge;
use super::super::digest::FileKey;
use super::super::engine::Engine;
use super::super::log::Event;
use super::super::park::{self, Idle};
use super::pending::{answer, FanPending};
use super::{opened_by, writes, Group};

/// How often executions in their window are looked at while no event comes.
const WINDOW_LOOK: std::time::Duration = std::time::Duration::from_millis(10);

/// The thread a reader runs on.
pub(super) const THREAD: park::Spawn = park::Spawn {
    name: "imacri-fanotify",
    stack: None,
};

/// A container's reader, whichever thread runs it now.
pub(super) struct Reader {
    pub(super) engine: Arc<Engine>,
    pub(super) group: Arc<Group>,
    /// Readable (hung up) once the watch is dropped.
    pub(super) stop: OwnedFd,
    /// Events handled (for a test's injected fault).
    pub(super) handled: u64,
    /// Reads in a row that failed opening an event's file.
    pub(super) unopened: u32,
    /// Dropped with the reader: its watch waits for that.
    pub(super) _ending: std::sync::mpsc::Sender<()>,
}

impl Reader {
    /// Reads until the watch is dropped, or parks once quiet.
    pub(super) fn run(mut self) {
        use nix::poll::{poll, PollFd, PollFlags};
        let (engine, group) = (self.engine.clone(), self.group.clone());
        let mut idle = Idle::default();
        loop {
            let closes = group
                .closes
                .as_ref()
                .map(|c| c.fd())
                .unwrap_or(self.stop.as_fd());
            let mut fds = [
                PollFd::new(group.fan.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(closes, PollFlags::POLLIN),
            ];
            // Executions in their window are looked at now and then, with or
            // without events.
            let windows = group.windows.any().then_some(WINDOW_LOOK);
            match poll(&mut fds, idle.poll_timeout(windows)) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return stopped(
                        &engine,
                        &group,
                        &self.stop,
                        format!("fanotify poll failed: {e}"),
                    )
                }
                Ok(0) => {
                    group.settle_windows(None, true);
                    if idle.is_over() && !group.windows.any() {
                        let fds = [
                            group.fan.as_fd().as_raw_fd(),
                            self.stop.as_raw_fd(),
                            closes.as_raw_fd(),
                        ];
                        match park::park(&fds, THREAD, self, Reader::run) {
                            Ok(()) => return,
                            Err(back) => self = back,
                        }
                        idle.worked();
                    }
                    continue;
                }
                Ok(_) => {}
            }
            if fds[1].any().unwrap_or(true) {
                return charge::leave();
            }
            if engine.fail_after.is_some_and(|n| self.handled >= n) {
                return stopped(
                    &engine,
                    &group,
                    &self.stop,
                    "injected reader fault (test)".into(),
                );
            }
            // imacri is stopping: what is not read yet waits in the kernel
            // (the keeper holds the group) for the next imacri.
            let Some(_reading) = engine.reading() else {
                return charge::leave();
            };
            // A flood of accesses costs the pod's CPU, not the node's (moves
            // once the pod's uncharged budget is spent; a check of a pointer
            // after that).
            charge::work_for(group.target.measured.charge.as_ref());
            let events = match group.fan.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                    // Only closes came.
                    if let Some(c) = &group.closes {
                        if let Some(delay) = engine.closes_delay {
                            std::thread::sleep(delay);
                        }
                        c.read(&engine);
                    }
                    continue;
                }
                Err(e) if refused_by_the_kernel(e) && self.unopened < UNOPENED_IN_A_ROW => {
                    // The kernel could not open an event's file for us
                    // (imacri at its open-file limit, the node's, memory):
                    // it refused that access itself (its task's call
                    // failed, EPERM), so nothing ran unmeasured. Reading
                    // goes on; the container is not killed for it.
                    self.unopened += 1;
                    engine.unopened(&group.target.measured, e, self.unopened == 1);
                    continue;
                }
                Err(e) => {
                    return stopped(
                        &engine,
                        &group,
                        &self.stop,
                        format!("reading fanotify events failed: {e}"),
                    )
                }
            };
            self.unopened = 0;
            // Every close queued before an event of this batch is queued
            // now: its digest is forgotten before that event is decided.
            if let Some(c) = &group.closes {
                c.read(&engine);
            }
            for ev in events {
                self.handled += 1;
                handle(&engine, &group, ev);
            }
            group.settle_windows(None, true);
            idle.worked();
        }
    }
}

/// Reads in a row whose event the kernel could not open for us, past
/// which the reader takes it for its own failure (each such read took one
/// event off the queue and refused it; this many with none read means
/// reading no longer works).
const UNOPENED_IN_A_ROW: u32 = 10_000;

/// Whether a failed read is the kernel's failure to open one event's file
/// for the reader (`create_fd` in `fanotify_read`): it then answered that
/// permission event FAN_DENY itself and took it off the queue. Anything
/// else (a bad fd or buffer) is the reader's own.
fn refused_by_the_kernel(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    !matches!(e, Errno::EBADF | Errno::EFAULT | Errno::EINVAL)
}

/// A reader that cannot go on fails closed: the gap is logged, the server is
/// told to kill the container, and the group stays open with nothing
/// answered, so the container's next execution waits (killably) instead of
/// running unmeasured, until its watch is dropped.
fn stopped(engine: &Engine, group: &Group, stop: &OwnedFd, reason: String) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    engine.stopped(&group.target.measured, reason);
    loop {
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return charge::leave(),
        }
    }
}

fn handle(engine: &Engine, group: &Arc<Group>, ev: FanotifyEvent) {
    // A task's next execution event comes after the kernel's check of its
    // last one (an ELF interpreter, a script's interpreter).
    let executing = ev
        .mask()
        .contains(MaskFlags::FAN_OPEN_EXEC_PERM)
        .then(|| ev.pid());
    group.settle_windows(executing, false);
    let Some(fd) = ev.fd() else {
        tracing::warn!(container_id = %group.target.measured.container, "fanotify queue overflow");
        return;
    };
    if let Some(stall) = &engine.stall {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        if link.is_ok_and(|p| p.to_string_lossy().contains(stall.as_str())) {
            // Test only: unanswered, its fd (the answer's key) kept open.
            std::mem::forget(ev);
            return;
        }
    }
    let mask = ev.mask();
    if mask.contains(MaskFlags::FAN_OPEN_PERM) && engine.is_own_open(ev.pid()) {
        // imacri's own open, for a lease (before anything else: the opener
        // may be what this reader would wait for).
        return answer(group, &ev, true);
    }
    let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
        return answer(group, &ev, false);
    };
    let key = FileKey::of(&st);
    if mask.intersects(MaskFlags::FAN_MODIFY | MaskFlags::FAN_CLOSE_WRITE) {
        // A notification: nothing to answer. A write forgets the old digest.
        if mask.contains(MaskFlags::FAN_CLOSE_WRITE) {
            engine.invalidate(key.inode());
        }
        return writes::written(engine, group, mask, fd, key.inode());
    }
    if mask.contains(MaskFlags::FAN_OPEN_PERM)
        && writes::write_open(engine, group, fd, key.inode()) == Some(false)
    {
        return answer(group, &ev, false);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return answer(group, &ev, true);
    }
    let exec = mask.contains(MaskFlags::FAN_OPEN_EXEC_PERM);
    let this = (ev.pid(), key);
    let kind = if exec {
        Event::Exec
    } else {
        let follows_exec = group
            .last_exec
            .lock()
            .map(|mut last| {
                let same = *last == Some(this);
                if same {
                    *last = None;
                }
                same
            })
            .unwrap_or(false);
        match &group.target.triggers.read {
            _ if follows_exec => return answer(group, &ev, true),
            Some(Some(openers)) if !opened_by(ev.pid(), openers) => {
                return answer(group, &ev, true)
            }
            Some(_) => Event::Read,
            None => return answer(group, &ev, true),
        }
    };
    let raw = fd.as_raw_fd();
    let interpreter = exec && group.loading.is_interpreter(ev.pid());
    let pending = Box::new(FanPending {
        group: group.clone(),
        event: ev,
        fd: raw,
        exec_of: exec.then_some(this),
        kept: None,
        interpreter,
        names_interpreter: false,
    });
    engine.submit(group.target.measured.clone(), pending, key, kind);
}
