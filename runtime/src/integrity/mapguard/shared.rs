//! Who could change what the kernel reads again after seccomp's CONTINUE.
//! When imacri lets a guarded call through, the kernel reads its arguments
//! again: the fd number of an `mmap`, the address range of an `mprotect`.
//! A task that shares the caller's fd table (or address space) could swap
//! what those name between imacri's check and the kernel's (`dup2` another
//! file onto the fd; `munmap` + `mmap` under the range). The caller itself
//! cannot: it waits in the call.
//!
//! So each call is classified while its caller waits: if no other task
//! shares the table (`shared` is false), nothing can change it before the
//! caller returns (a new sharer can only be cloned by an existing one), and
//! CONTINUE maps exactly what was measured. Sharers are looked for among
//! the tasks of the caller's cgroup, which an ima pod cannot leave (no
//! CAP_SYS_ADMIN, its cgroupfs read-only, its root unprivileged on the
//! host). Otherwise (a multi-threaded process, say) the sharers are held
//! still for the call ([`super::hold`]).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// What the kernel reads again after CONTINUE: the caller's fd table (an
/// `mmap` of an fd) or its address space (an `mprotect` of a range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Table {
    Files,
    Vm,
}

const KCMP_VM: libc::c_int = 1;
const KCMP_FILES: libc::c_int = 2;

/// How often the tasks of a cgroup are listed again when they changed
/// while being compared, before the call counts as shared.
const LIST_TRIES: usize = 4;

/// `shared` with the listing of the candidate tasks given (`list`: every
/// task that could share, `tid` included).
fn shared_among(
    tid: u32,
    mut list: impl FnMut() -> std::io::Result<Vec<u32>>,
    table: Table,
) -> bool {
    let mut compared: HashSet<u32> = HashSet::new();
    let mut last: Option<HashSet<u32>> = None;
    for _ in 0..LIST_TRIES {
        let Ok(tasks) = list() else {
            return true;
        };
        if !tasks.contains(&tid) {
            // Not the caller's cgroup after all: nothing was learnt.
            return true;
        }
        let others: HashSet<u32> = tasks.into_iter().filter(|t| *t != tid).collect();
        let fresh: Vec<u32> = others.difference(&compared).copied().collect();
        if shares_with_any(tid, &fresh, table) {
            return true;
        }
        compared.extend(fresh);
        // The same tasks listed twice, each compared: a sharer cloned and
        // gone between the listings would have changed the list.
        if last.as_ref() == Some(&others) {
            return false;
        }
        last = Some(others);
    }
    true
}

/// Whether any of `others` shares `tid`'s table (kcmp). A task that is gone
/// shares nothing any more; any other error counts as sharing.
pub(super) fn shares_with_any(tid: u32, others: &[u32], table: Table) -> bool {
    let kind = match table {
        Table::Files => KCMP_FILES,
        Table::Vm => KCMP_VM,
    };
    others.iter().any(|&o| {
        // SAFETY: integer arguments only; the result is checked.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                tid as libc::pid_t,
                o as libc::pid_t,
                kind,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        match r {
            0 => true,
            r if r > 0 => false,
            _ => nix::errno::Errno::last() != nix::errno::Errno::ESRCH,
        }
    })
}

/// Whether kcmp answers on this kernel (it needs CONFIG_KCMP).
pub(super) fn kcmp_works() -> bool {
    // SAFETY: integer arguments only; a task compared with itself.
    unsafe {
        let me = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        libc::syscall(
            libc::SYS_kcmp,
            me,
            me,
            KCMP_FILES,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) == 0
    }
}

/// Where the tasks (threads) of a listener's cgroup are listed.
#[derive(Debug)]
enum TaskList {
    /// cgroup v2 `cgroup.threads`, kept open: every read from offset 0 walks
    /// the cgroup afresh (~2 us, where opening the file costs ~8 us).
    Threads(std::fs::File),
    /// A v1 cgroup's `tasks` file, opened for each listing: an open one
    /// serves the list it loaded first again for a second (the kernel's
    /// pidlist cache). The cgroup's directory.
    Tasks(PathBuf),
}

impl TaskList {
    /// `tid`'s own cgroup: its v2 cgroup (runc puts each container in one,
    /// also on hybrid hosts), else its v1 `pids` cgroup, else the v2 root.
    fn of(tid: u32) -> Option<TaskList> {
        let text = std::fs::read_to_string(format!("/proc/{tid}/cgroup")).ok()?;
        let root = std::path::Path::new("/sys/fs/cgroup");
        let (mut v2, mut pids) = (None, None);
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            if ctrls.is_empty() {
                v2 = Some(rel.to_string());
            } else if ctrls.split(',').any(|c| c == "pids") {
                pids = Some(root.join(ctrls).join(rel));
            }
        }
        let threads = |rel: &str| {
            [root.join("unified"), root.to_path_buf()]
                .into_iter()
                .find_map(|m| {
                    let dir = m.join(rel);
                    let file = std::fs::File::open(dir.join("cgroup.threads")).ok()?;
                    Some(TaskList::Threads(file))
                })
        };
        match v2.as_deref() {
            Some(rel) if !rel.is_empty() => threads(rel),
            _ => None,
        }
        .or_else(|| {
            pids.filter(|d| d.join("tasks").exists())
                .map(TaskList::Tasks)
        })
        .or_else(|| threads(v2.as_deref()?))
    }

    fn read(&self) -> std::io::Result<Vec<u32>> {
        let text = match self {
            TaskList::Tasks(dir) => std::fs::read_to_string(dir.join("tasks"))?,
            TaskList::Threads(file) => {
                use std::os::unix::fs::FileExt;
                let mut text = Vec::with_capacity(512);
                let mut chunk = [0u8; 4096];
                loop {
                    let n = file.read_at(&mut chunk, text.len() as u64)?;
                    text.extend_from_slice(&chunk[..n]);
                    // A seq file fills the reader's buffer line by line and
                    // returns short before its end only when the next line
                    // did not fit its own buffer (a page or more): a read
                    // more than a line short of the asked size reached the
                    // end, and the read that would say so (as much again
                    // as the listing) is spared.
                    if n + LONGEST_LINE <= chunk.len() {
                        break;
                    }
                }
                String::from_utf8_lossy(&text).into_owned()
            }
        };
        Ok(ids(&text))
    }
}

/// The longest line of a cgroup listing: a thread id (at most
/// 4294967295) and its newline.
const LONGEST_LINE: usize = 11;

/// The ids of a cgroup listing, one per line.
fn ids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// One listener's view of its tasks' cgroup.
pub(super) struct Sharing {
    /// The cgroup task list of this listener's tasks (see `shared`).
    tasks: Mutex<Option<TaskList>>,
}

impl Sharing {
    pub(super) fn new() -> Arc<Sharing> {
        Arc::new(Sharing {
            tasks: Mutex::new(None),
        })
    }

    /// Every task (thread) of the listener's cgroup now (known once
    /// `shared` has looked it up).
    pub(super) fn tasks_now(&self) -> std::io::Result<Vec<u32>> {
        let known = self
            .tasks
            .lock()
            .map_err(|_| std::io::Error::other("task list poisoned"))?;
        match known.as_ref() {
            Some(list) => list.read(),
            None => Err(std::io::Error::other("the caller's cgroup is unknown")),
        }
    }

    /// Whether a task other than `tid` may share its `table`, so could
    /// change what the kernel reads after CONTINUE. Fails towards "shared"
    /// (held).
    pub(super) fn shared(&self, tid: u32, table: Table) -> bool {
        // The listener's tasks cannot leave their cgroup: found once. (A
        // caller that is not in the file found counts as shared.)
        let Ok(mut known) = self.tasks.lock() else {
            return true;
        };
        if known.is_none() {
            *known = TaskList::of(tid);
        }
        // Held while listing: a kept file has one read position.
        let Some(list) = known.as_ref() else {
            return true;
        };
        shared_among(tid, || list.read(), table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> u32 {
        // SAFETY: no arguments.
        unsafe { libc::syscall(libc::SYS_gettid) as u32 }
    }

    /// A second thread of this process, parked until the sender is used or
    /// dropped: its tid, the stop sender and the thread.
    fn parked_thread() -> (
        u32,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            let _ = stop_rx.recv();
        });
        (rx.recv().unwrap(), stop_tx, t)
    }

    #[test]
    fn threads_share_their_tables_and_children_do_not() {
        let me = gettid();
        let (other, stop_tx, t) = parked_thread();
        assert!(shares_with_any(me, &[other], Table::Files));
        assert!(shares_with_any(me, &[other], Table::Vm));
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        assert!(!shares_with_any(me, &[child.id()], Table::Files));
        assert!(!shares_with_any(me, &[child.id()], Table::Vm));
        // A single-threaded child shares nothing with the other tasks
        // listed with it; with its parent's thread listed, the parent does.
        let c = child.id();
        let list = || Ok(vec![me, other, c]);
        assert!(!shared_among(c, list, Table::Files));
        assert!(!shared_among(c, list, Table::Vm));
        assert!(shared_among(me, list, Table::Files));
        // Tasks that keep changing never prove anything: shared.
        let mut n = 100_000;
        let churn = || {
            n += 1;
            Ok(vec![c, n])
        };
        assert!(shared_among(c, churn, Table::Files));
        // A listing without the caller is the wrong one: shared.
        assert!(shared_among(c, || Ok(vec![me]), Table::Files));
        // This process's cgroup lists it.
        let list = TaskList::of(me).unwrap();
        for _ in 0..2 {
            let tasks = list.read().unwrap();
            assert!(tasks.contains(&me) && tasks.contains(&c), "{tasks:?}");
        }
        let _ = child.kill();
        let _ = child.wait();
        // A task that is gone shares nothing.
        assert!(!shares_with_any(me, &[c], Table::Files));
        stop_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_kept_threads_file_lists_tasks_started_after_it_was_opened() {
        // This process's cgroup v2 `cgroup.threads` (world-readable), kept
        // open as a listener keeps it: a thread started later is listed.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let rel = rel.trim_start_matches('/');
        let list = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .find_map(|m| {
                let dir = std::path::Path::new(m).join(rel);
                let file = std::fs::File::open(dir.join("cgroup.threads")).ok()?;
                Some(TaskList::Threads(file))
            })
            .unwrap();
        assert!(list.read().unwrap().contains(&gettid()));
        let (other, stop_tx, t) = parked_thread();
        assert!(list.read().unwrap().contains(&other));
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        // Gone from the next listing too.
        assert!(!list.read().unwrap().contains(&other));
        // A listing longer than one read (a page): every thread is in it,
        // however short the kernel's reads come. 2000 threads: past a page
        // even where their ids have three or four digits (800 were not, on
        // a machine whose ids had come round to four: 3740 bytes).
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = Arc::new(Mutex::new(stop_rx));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let many: Vec<_> = (0..2000)
            .map(|_| {
                let (stop_rx, tid_tx) = (stop_rx.clone(), tid_tx.clone());
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        tid_tx.send(gettid()).unwrap();
                        let _ = stop_rx.lock().map(|r| r.recv());
                    })
                    .unwrap()
            })
            .collect();
        let tids: Vec<u32> = (0..many.len()).map(|_| tid_rx.recv().unwrap()).collect();
        let listed = list.read().unwrap();
        let text_len: usize = listed.iter().map(|t| t.to_string().len() + 1).sum();
        assert!(text_len > 4096, "{text_len} bytes: one read");
        for t in &tids {
            assert!(listed.contains(t), "thread {t} not listed");
        }
        drop(stop_tx);
        for t in many {
            t.join().unwrap();
        }
    }
}
