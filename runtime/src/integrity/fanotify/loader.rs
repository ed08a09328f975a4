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
    /// Task `tid` was allowed to execute a program naming an interpreter:
    /// its next execution event is that.
    pub(super) fn executed(&self, tid: i32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_next_execution_is_its_interpreter_once() {
        let l = Loading::default();
        l.executed(41);
        assert!(!l.is_interpreter(42));
        assert!(l.is_interpreter(41));
        assert!(!l.is_interpreter(41), "asked once");
    }
}
