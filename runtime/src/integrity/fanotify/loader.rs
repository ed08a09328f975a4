//! ELF interpreters (`ld.so`), which the kernel loads for a dynamically
//! linked program in the same `execve`: it opens the interpreter (a second
//! FAN_OPEN_EXEC_PERM from the same task, after the program's was allowed),
//! maps it executable itself (no `mmap` call, so the map guard never sees
//! it), and then lets it be written (`allow_write_access`: unlike the
//! program, which is ETXTBSY while it runs). A loader rewritten in place
//! under a running program runs what was written the next time the program
//! calls into it (a lazily bound symbol, `dlopen`). So the interpreter's
//! execution is watched for writers as a mapped file is (`writes.rs`),
//! which IMA does too: it measures the interpreter at its mapping
//! (MMAP_CHECK) and reports writers of it as ToMToU.
//!
//! Which execution is an interpreter's is known from the program's: an
//! allowed execution of an ELF program with a `PT_INTERP` header leaves its
//! task here, and that task's next execution event is the interpreter.

use std::collections::HashSet;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

/// Tasks whose allowed execution of a dynamically linked program is
/// loading its interpreter now.
#[derive(Debug, Default)]
pub(super) struct Loading {
    tasks: Mutex<HashSet<i32>>,
}

/// Past this many, tasks that are gone are dropped (an execution that
/// failed after it was allowed never loads its interpreter).
const PRUNE_AT: usize = 1024;

impl Loading {
    /// Task `tid` was allowed to execute the file open as `fd`: if it is a
    /// program with an interpreter, its next execution event is that.
    pub(super) fn executed(&self, tid: i32, fd: BorrowedFd<'_>) {
        if !has_interpreter(fd) {
            return;
        }
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        if tasks.len() >= PRUNE_AT {
            tasks.retain(|t| std::path::Path::new(&format!("/proc/{t}")).exists());
        }
        tasks.insert(tid);
    }

    /// Whether task `tid`'s execution event is the interpreter of the
    /// program it was just allowed to execute (forgotten once asked).
    pub(super) fn is_interpreter(&self, tid: i32) -> bool {
        self.tasks.lock().is_ok_and(|mut t| t.remove(&tid))
    }
}

/// Whether the file open as `fd` is a 64-bit ELF program naming an
/// interpreter (a `PT_INTERP` program header).
pub(super) fn has_interpreter(fd: BorrowedFd<'_>) -> bool {
    const PT_INTERP: u32 = 3;
    let mut eh = [0u8; 64];
    let n = nix::sys::uio::pread(fd, &mut eh, 0).unwrap_or(0);
    // ELFCLASS64 little-endian (the only kind this node runs natively;
    // a 32-bit program cannot run under the map guard).
    if n < eh.len() || eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return false;
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as usize;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as usize;
    if phentsize < 4 || phnum == 0 || phnum > 256 {
        return false;
    }
    let mut table = vec![0u8; phentsize * phnum];
    let Ok(offset) = i64::try_from(phoff) else {
        return false;
    };
    let n = nix::sys::uio::pread(fd, &mut table, offset).unwrap_or(0);
    table[..n.min(table.len())]
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_dynamic_program_names_an_interpreter_and_a_static_one_does_not() {
        let sh = std::fs::File::open("/bin/sh").unwrap();
        assert!(has_interpreter(sh.as_fd()), "/bin/sh is dynamically linked");
        let ld = std::fs::File::open("/lib64/ld-linux-x86-64.so.2").unwrap();
        assert!(!has_interpreter(ld.as_fd()), "ld.so is its own");
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\necho\n").unwrap();
        let f = std::fs::File::open(script.path()).unwrap();
        assert!(!has_interpreter(f.as_fd()));
    }

    #[test]
    fn a_tasks_next_execution_is_its_interpreter_once() {
        let l = Loading::default();
        let sh = std::fs::File::open("/bin/sh").unwrap();
        l.executed(41, sh.as_fd());
        assert!(!l.is_interpreter(42));
        assert!(l.is_interpreter(41));
        assert!(!l.is_interpreter(41), "asked once");
        let ld = std::fs::File::open("/lib64/ld-linux-x86-64.so.2").unwrap();
        l.executed(43, ld.as_fd());
        assert!(!l.is_interpreter(43), "ld.so run as a program loads none");
    }
}
