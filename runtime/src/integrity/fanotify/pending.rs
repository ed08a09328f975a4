//! The answers to a container's permission events: an event read now
//! ([`FanPending`]) or one the last imacri handed to the fd keeper while it
//! hashed it ([`KeptPending`]). Before an execution is allowed, its window
//! up to the kernel's writers check is held (`window.rs`) and a program's
//! interpreter is expected next (`loader.rs`).

use nix::sys::fanotify::{FanotifyEvent, FanotifyResponse, Response};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use super::super::digest::{fd_path, FileKey};
use super::super::engine::{Mapper, Pending};
use super::super::keeper;
use super::{window, Group};

/// An event waiting for its answer.
pub(super) struct FanPending {
    pub(super) group: Arc<Group>,
    pub(super) event: FanotifyEvent,
    pub(super) fd: i32,
    /// Set as the allowed exec of this (pid, file) when answered "allow".
    pub(super) exec_of: Option<(i32, FileKey)>,
    /// The keeper's key for a copy of this event, while it is hashed.
    pub(super) kept: Option<String>,
    /// The kernel loads this file as a program's interpreter.
    pub(super) interpreter: bool,
    /// The executed program names an interpreter (its ELF headers, as
    /// the engine learnt them with its digest).
    pub(super) names_interpreter: bool,
}

impl Pending for FanPending {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the event owns the fd and lives as long as self.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    fn loads(&self) -> bool {
        self.interpreter
    }

    fn mapper(&self) -> Mapper {
        match self.exec_of {
            Some((tid, _)) => Mapper::Execution(tid as u32),
            None => Mapper::Unknown,
        }
    }

    fn program(&mut self, elf: crate::integrity::elf::Facts) {
        self.names_interpreter = elf.interpreter;
    }

    fn answer(self: Box<Self>, allow: bool) {
        let refused = allow
            .then(|| {
                let execution = Execution {
                    of: self.exec_of,
                    interpreter: self.interpreter,
                    names_interpreter: self.names_interpreter,
                };
                self.group.executing(execution, self.fd())
            })
            .flatten();
        let FanPending {
            group,
            event,
            exec_of,
            kept,
            ..
        } = *self;
        if let (true, None, Some(x)) = (allow, refused, exec_of) {
            if let Ok(mut last) = group.last_exec.lock() {
                *last = Some(x);
            }
        }
        match (event.fd(), refused) {
            (Some(fd), Some(errno)) => refuse(&group, fd.as_raw_fd(), errno),
            _ => answer(&group, &event, allow),
        }
        if let (Some(key), Some(k)) = (kept, &group.keeper) {
            // Our fd number must not be reused while the keeper may still
            // have it under this key (a next imacri would answer a later
            // event by it with this file's verdict): the keeper's client
            // holds it until the keeper let go.
            if let Some(raw) = event.fd().map(|f| f.as_raw_fd()) {
                std::mem::forget(event);
                // SAFETY: the event owned this fd and was forgotten, so
                // nothing else closes it.
                let fd =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                k.drop_event(&key, fd);
            } else {
                let _ = k.drop_key(&key);
            }
        }
    }

    /// Hashing takes a while: a copy goes to the keeper first, so that if
    /// imacri dies meanwhile the next one measures the access instead of
    /// refusing it (only the number we got can answer it).
    fn queued(&mut self) {
        let Some(k) = &self.group.keeper else { return };
        let key = keeper::event_key(
            &self.group.target.measured.container,
            self.fd,
            keeper::Access::of(self.exec_of.is_some(), self.interpreter),
            self.event.pid(),
        );
        match k.put(&key, self.fd()) {
            Ok(()) => self.kept = Some(key),
            Err(e) => {
                tracing::debug!(container_id = %self.group.target.measured.container, error = %e, "fd keeper: event not kept; a crash now refuses it")
            }
        }
    }
}

/// An allowed access as [`Group::executing`] needs it.
pub(super) struct Execution {
    /// The task and file of an execution (None: no execution).
    pub(super) of: Option<(i32, FileKey)>,
    /// The kernel loads the file as a program's interpreter.
    pub(super) interpreter: bool,
    /// The file is a program naming an interpreter.
    pub(super) names_interpreter: bool,
}

impl Group {
    /// An allowed access, before its answer: for an execution (`of`)
    /// of the file open as `fd`, the window up to the kernel's writers
    /// check is held, and a program's interpreter is expected next.
    /// Some(errno) when the execution must be refused after all: ETXTBSY
    /// for a file open for writing (as the kernel refuses it), EPERM when
    /// no lease can be held. An `interpreter` needs no window: it is
    /// watched for writers from before the answer on (`loader.rs`). It may
    /// yet be a program of its own (the task's execution before failed
    /// before its interpreter was opened): then its interpreter comes next,
    /// so it is noted all the same (an interpreter names none). Until
    /// 2026-12-04 it was not, and the loader after such a program went
    /// unwatched (`ima_writes/`, `loader-rewrite ... hide`).
    fn executing(&self, execution: Execution, fd: BorrowedFd<'_>) -> Option<i32> {
        let (tid, key) = execution.of?;
        let loads_next = || {
            if execution.names_interpreter {
                self.loading.executed(tid);
            }
        };
        if execution.interpreter {
            loads_next();
            return None;
        }
        match self.open_window(tid, key.inode(), fd) {
            Ok(()) => {}
            Err(window::Refusal::Writers) => return Some(libc::ETXTBSY),
            Err(window::Refusal::Unheld(why)) => {
                tracing::warn!(container_id = %self.target.measured.container, path = %fd_path(fd), reason = %why, "an execution refused: its file cannot be held until the kernel's writers check");
                return Some(libc::EPERM);
            }
        }
        // The interpreter's event follows the answer.
        loads_next();
        None
    }
}

/// An event a previous imacri read and handed to the keeper: answered by
/// the number its reader got. An interpreter's is watched for writers as
/// one read now is (its key says so: nothing else here could tell).
pub(super) struct KeptPending {
    pub(super) group: Arc<Group>,
    pub(super) event: keeper::KeptEvent,
    pub(super) exec_of: Option<(i32, FileKey)>,
    /// As [`FanPending::names_interpreter`].
    pub(super) names_interpreter: bool,
}

impl Pending for KeptPending {
    fn fd(&self) -> BorrowedFd<'_> {
        self.event.file.as_fd()
    }

    fn loads(&self) -> bool {
        self.event.access == keeper::Access::Interpreter
    }

    fn program(&mut self, elf: crate::integrity::elf::Facts) {
        self.names_interpreter = elf.interpreter;
    }

    fn answer(self: Box<Self>, allow: bool) {
        let refused = allow
            .then(|| {
                let execution = Execution {
                    of: self.exec_of,
                    interpreter: self.loads(),
                    names_interpreter: self.names_interpreter,
                };
                self.group.executing(execution, self.event.file.as_fd())
            })
            .flatten();
        if let (true, None, Some(x)) = (allow, refused, self.exec_of) {
            if let Ok(mut last) = self.group.last_exec.lock() {
                *last = Some(x);
            }
        }
        match refused {
            Some(errno) => refuse(&self.group, self.event.number, errno),
            None => {
                keeper::respond(self.group.fan.as_fd(), self.event.number, allow);
            }
        }
        if let Some(k) = &self.group.keeper {
            let key = keeper::event_key(
                &self.group.target.measured.container,
                self.event.number,
                self.event.access,
                self.event.tid,
            );
            let _ = k.drop_key(&key);
        }
    }
}

/// Refuses the event answered by fd `number` with `errno` (ETXTBSY as the
/// kernel refuses to execute a file open for writing; EPERM where the
/// kernel takes no errno in an answer).
fn refuse(group: &Group, number: i32, errno: i32) {
    if errno == libc::EPERM || keeper::respond_errno(group.fan.as_fd(), number, errno).is_err() {
        keeper::respond(group.fan.as_fd(), number, false);
    }
}

pub(super) fn answer(group: &Group, ev: &FanotifyEvent, allow: bool) {
    let Some(fd) = ev.fd() else { return };
    let r = if allow {
        Response::FAN_ALLOW
    } else {
        Response::FAN_DENY
    };
    if let Err(e) = group.fan.write_response(FanotifyResponse::new(fd, r)) {
        tracing::error!(container_id = %group.target.measured.container, error = %e, "answering a fanotify event failed");
    }
}

/// Whether this kernel takes an errno in a fanotify answer (FAN_DENY_ERRNO,
/// Linux 6.13), so that an execution of a file open for writing is refused
/// with ETXTBSY as the kernel refuses it (else EPERM): a thread opens a file
/// of our own that a group of ours watches, and the answer asks for ETXTBSY.
pub fn deny_errno_probe() -> Result<(), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("probe");
    std::fs::write(&path, b"").map_err(|e| e.to_string())?;
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_PRE_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )
    .map_err(|e| format!("fanotify_init: {e}"))?;
    fan.mark(
        MarkFlags::FAN_MARK_ADD,
        MaskFlags::FAN_OPEN_PERM,
        None,
        Some(&path),
    )
    .map_err(|e| format!("fanotify_mark: {e}"))?;
    let opened = path.clone();
    let opener = std::thread::spawn(move || std::fs::File::open(opened).map(drop));
    let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::from(2000u16)).unwrap_or(0) == 0 {
        return Err("no fanotify event for the probe's open".into());
    }
    let events = fan.read_events().map_err(|e| e.to_string())?;
    let mut taken = false;
    for ev in &events {
        if let Some(fd) = ev.fd() {
            taken |= keeper::respond_errno(fan.as_fd(), fd.as_raw_fd(), libc::ETXTBSY).is_ok();
            if !taken {
                keeper::respond(fan.as_fd(), fd.as_raw_fd(), false);
            }
        }
    }
    let got = opener
        .join()
        .map_err(|_| "the probe's opener panicked".to_string())?;
    match got {
        Err(e) if taken && e.raw_os_error() == Some(libc::ETXTBSY) => Ok(()),
        other => Err(format!(
            "the kernel takes no errno in fanotify answers (the probe's open: {other:?}): \
             executions of files open for writing are refused with EPERM, not ETXTBSY"
        )),
    }
}
