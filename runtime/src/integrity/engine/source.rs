//! What an event source (fanotify's reader, the map guard) hands the engine
//! with each access, and what the engine asks of the container's watch for
//! writers once it lets a file be mapped.

use std::os::fd::{BorrowedFd, OwnedFd};

use super::super::elf;
use super::super::sys::WatchError;

/// An access waiting for its answer: the file (an fd the kernel or the
/// process gave us) and how to answer.
pub trait Pending: Send {
    fn fd(&self) -> BorrowedFd<'_>;
    fn answer(self: Box<Self>, allow: bool);
    /// Whether the access is the kernel loading a program's ELF
    /// interpreter: mapped executable without a call the map guard sees,
    /// and writable while it runs, so watched for writers as a mapping.
    fn loads(&self) -> bool {
        false
    }
    /// Called when the access waits for hashing (not decided at once).
    fn queued(&mut self) {}
    /// An execution's file, before its answer: what its ELF headers say
    /// (an execution of a program naming an interpreter is followed by
    /// the interpreter's).
    fn program(&mut self, _elf: elf::Facts) {}
    /// Whether the caller still waits for the answer (a huge file is not
    /// hashed on for a caller that is gone).
    fn wanted(&self) -> bool {
        true
    }
    /// Who maps the file once a mapping access is allowed (asked of
    /// mappings only: an executable mapping call, or the kernel loading a
    /// program's interpreter).
    fn mapper(&self) -> Mapper {
        Mapper::Unknown
    }
}

/// Who maps a file the engine lets be mapped executable: what its watch
/// (`WriteWatch`) must wait for before it may count the file as mapped by
/// nobody (`fanotify/inpod.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapper {
    /// The kernel, loading a program's interpreter in task `tid`'s
    /// execution: in flight from the answer until the kernel's own writers
    /// check of the interpreter (`do_open_execat`, after the permission
    /// event), which then holds writers off until the mapping is in place;
    /// so until the task is out of its `execve`.
    Execution(u32),
    /// A guarded system call, in flight from the answer until it returns.
    Call(Caller),
    /// A guarded call whose caller is not known (one the last imacri
    /// received and handed over).
    Unknown,
}

/// A guarded system call: its task (a thread id, as imacri's procfs names
/// it), number and arguments, as `/proc/<tid>/syscall` shows them while
/// the task is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// Where the files a container maps executable are watched for writers
/// (its fanotify group): a mapping keeps running the page cache, so a file
/// rewritten in place under it runs what was written (IMA's ToMToU).
pub trait WriteWatch: Send + Sync {
    /// From now on, asks before the file open as `fd` is opened for writing
    /// and reports writes to it (in place before its writers are checked
    /// and the mapping exists), and that `by` maps it. Ok(true) when this
    /// call placed the watch, Ok(false) when it was in place already.
    fn watch(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<bool, WatchError>;
    /// As [`watch`](Self::watch), for a file `fd` that is imacri's own
    /// open file (a fanotify event's, decided on the reader that would
    /// have to answer an open of it): its lease is taken through a copy.
    fn watch_own(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<bool, WatchError>;
    /// The mapping a watch was placed for was refused after all.
    fn unwatch(&self, fd: BorrowedFd<'_>);
    /// From now on, while a process of the pod has the executed script
    /// open as `fd` open (its interpreter), asks before it is opened for
    /// writing (in place before the execution is answered). `by`: the
    /// execution.
    fn watch_script(&self, fd: BorrowedFd<'_>, by: Mapper) -> Result<(), WatchError>;
    /// Holds `file`, a file of an overlay filesystem open for writing that
    /// a process of the container maps shared, open until the container is
    /// gone (the mapping holds the upper layer's file, which the kernel's
    /// writer rules do not see). Err: it cannot be held (the pod's share
    /// of fds), and the mapping must be refused.
    fn hold_writer(&self, file: OwnedFd) -> Result<(), WatchError>;
    /// Reads the container's closes after writing queued now (their
    /// digests forgotten), for a decision made off its reader.
    fn read_closes(&self) {}
}
