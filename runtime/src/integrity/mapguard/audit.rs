//! Closing seccomp's CONTINUE window. When imacri lets a guarded call
//! through, the kernel reads its arguments again: the fd number of an
//! `mmap`, the address range of an `mprotect`. A task that shares the
//! caller's fd table (or address space) can swap what those name between
//! imacri's check and the kernel's (`dup2` another file onto the fd;
//! `munmap` + `mmap` under the range), and have a file mapped executable
//! that was never measured. The caller itself cannot: it waits in the call.
//!
//! So each call is classified while its caller waits:
//! - Nobody else shares the table (`shared` is false): nothing can change
//!   it before the caller returns (a new sharer can only be cloned by an
//!   existing one), and CONTINUE maps exactly what was measured. Sharers
//!   are looked for among the tasks of the caller's cgroup, which an ima
//!   pod cannot leave (no CAP_SYS_ADMIN, its cgroupfs read-only, its root
//!   unprivileged on the host).
//! - Otherwise (a multi-threaded process, say) the call is let through and
//!   audited once it has returned ([`Auditor`]): every executable file
//!   mapping of the process must be one the engine allowed. One that is not
//!   is measured now (its digest lands in the log), and if the policy
//!   refuses it, or it cannot be measured, the container is killed with a
//!   `gap` (ImaUnmeasured). The code may have run for the audit's latency;
//!   a process that swaps, maps, runs and exits before the audit reads its
//!   mappings is the remaining limit (README, "Known limits").

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::super::digest::FileKey;
use super::super::engine::{Engine, Pending};
use super::super::log::Event;

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
    Threads { file: std::fs::File, dir: PathBuf },
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
                    Some(TaskList::Threads { file, dir })
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

    /// The processes (thread groups) of the cgroup.
    fn processes(&self) -> std::io::Result<Vec<u32>> {
        let dir = match self {
            TaskList::Threads { dir, .. } | TaskList::Tasks(dir) => dir,
        };
        Ok(ids(&std::fs::read_to_string(dir.join("cgroup.procs"))?))
    }

    fn read(&self) -> std::io::Result<Vec<u32>> {
        let text = match self {
            TaskList::Tasks(dir) => std::fs::read_to_string(dir.join("tasks"))?,
            TaskList::Threads { file, .. } => {
                use std::os::unix::fs::FileExt;
                let mut text = Vec::with_capacity(512);
                let mut chunk = [0u8; 4096];
                loop {
                    let n = file.read_at(&mut chunk, text.len() as u64)?;
                    if n == 0 {
                        break;
                    }
                    text.extend_from_slice(&chunk[..n]);
                }
                String::from_utf8_lossy(&text).into_owned()
            }
        };
        Ok(ids(&text))
    }
}

/// The ids of a cgroup listing, one per line.
fn ids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// A call let through while shared: audit the caller's process once the
/// call has returned.
#[derive(Clone, Copy)]
pub(super) struct Job {
    pub(super) tid: u32,
    pub(super) nr: i64,
    pub(super) args: [u64; 6],
}

/// One container's audits, on a thread of their own started by the first
/// call that needs one (most containers never share a table mid-call).
pub(super) struct Auditor {
    engine: Weak<Engine>,
    container: String,
    /// Files the engine allowed this container to map executable.
    approved: Arc<Mutex<HashSet<FileKey>>>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// The cgroup task list of this listener's tasks (see `shared`).
    tasks: Mutex<Option<TaskList>>,
}

/// Bounds the approved set; past it, files are decided (from the digest
/// cache) again.
const APPROVED_LIMIT: usize = 50_000;

impl Auditor {
    pub(super) fn new(engine: Weak<Engine>, container: &str) -> Arc<Auditor> {
        Arc::new(Auditor {
            engine,
            container: container.to_string(),
            approved: Arc::default(),
            tx: Mutex::new(None),
            tasks: Mutex::new(None),
        })
    }

    /// A file the engine allowed to be mapped: the audit need not ask again.
    pub(super) fn approve(&self, key: FileKey) {
        approve(&self.approved, key);
    }

    /// Whether a task other than `tid` may share its `table`, so could
    /// change what the kernel reads after CONTINUE. Fails towards "shared"
    /// (audited).
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

    /// Every process of the listener's cgroup. None found (the cgroup is
    /// unknown or unreadable) is an audit that cannot be made: the
    /// container is stopped, as for any mapping that cannot be audited.
    fn processes(&self) -> Vec<u32> {
        let found = self
            .tasks
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(TaskList::processes))
            .and_then(Result::ok);
        match found {
            Some(p) => p,
            None => {
                if let (Some(engine), Some(target)) = (self.engine.upgrade(), self.target()) {
                    engine.stopped(
                        &target,
                        "the processes of a container whose mapping needs an audit cannot be listed"
                            .into(),
                    );
                }
                Vec::new()
            }
        }
    }

    /// Audits the caller's process once its call (`job`) has returned.
    pub(super) fn after(self: &Arc<Self>, job: Job) {
        let Ok(mut tx) = self.tx.lock() else { return };
        let mut job = job;
        if let Some(t) = tx.as_ref() {
            match t.send(job) {
                Ok(()) => return,
                // The thread ended (it outlived its auditor once): again.
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        let (t, rx) = mpsc::channel();
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("imacri-mapaudit".into())
            .spawn(move || run(&me, &rx));
        match spawned {
            Ok(_) => {
                let _ = t.send(job);
                *tx = Some(t);
            }
            Err(e) => {
                tracing::error!(container_id = %self.container, error = %e, "map guard: cannot start the audit thread; the container is killed");
                if let (Some(engine), Some(target)) = (self.engine.upgrade(), self.target()) {
                    engine.stopped(&target, "its executable mappings cannot be audited".into());
                }
            }
        }
    }

    fn target(&self) -> Option<Arc<super::super::engine::Measured>> {
        self.engine.upgrade()?.target(&self.container)
    }
}

fn approve(set: &Mutex<HashSet<FileKey>>, key: FileKey) {
    if let Ok(mut s) = set.lock() {
        if s.len() >= APPROVED_LIMIT {
            s.clear();
        }
        s.insert(key);
    }
}

fn run(me: &Weak<Auditor>, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        // Calls let through meanwhile are audited together: one read of
        // each process's mappings once all of them returned.
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let Some(a) = me.upgrade() else { return };
        let (mut processes, mut again) = (Vec::new(), Vec::new());
        for job in &jobs {
            let sure = wait_returned(job);
            // A thread that made the call and exited left its mapping in
            // its process, which it no longer names: every process of the
            // container is audited then.
            let tgids = match tgid_of(job.tid) {
                Some(t) => vec![t],
                None => a.processes(),
            };
            for tgid in tgids {
                if !processes.contains(&tgid) {
                    processes.push(tgid);
                }
                if !sure && !again.contains(&tgid) {
                    again.push(tgid);
                }
            }
        }
        for p in processes {
            audit(&a, p);
        }
        if !again.is_empty() {
            // Not seen leaving the call: its mapping may come later.
            std::thread::sleep(Duration::from_millis(100));
            for p in again {
                audit(&a, p);
            }
        }
    }
}

/// A live task of process `tgid` and its mappings; None once the process
/// has none left (gone, or exiting: its maps read empty). Not always the
/// process's own maps: once its main thread has exited they read empty
/// while its other threads run on with everything it mapped.
fn address_space(tgid: u32) -> Option<(u32, String)> {
    if let Some(m) = task_maps(tgid) {
        return Some((tgid, m));
    }
    std::fs::read_dir(format!("/proc/{tgid}/task"))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find_map(|tid| Some((tid, task_maps(tid)?)))
}

/// The mappings as task `tid` sees them; None once it has exited.
fn task_maps(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{tid}/maps"))
        .ok()
        .filter(|m| !m.is_empty())
}

/// The process (thread group) of task `tid`.
fn tgid_of(tid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// How long a task seen on a CPU ("running") is taken to be possibly still
/// in the call: a file mapping does not keep a CPU in the kernel that
/// long, so past it the task runs its own code.
const RUNNING_GRACE: Duration = Duration::from_millis(5);

/// Waits until task `tid` is no longer in the call `job` (its
/// `/proc/<tid>/syscall` names another call or none). False when that
/// could not be told in time (the caller audits once more, later).
fn wait_returned(job: &Job) -> bool {
    let start = Instant::now();
    let mut running_since: Option<Instant> = None;
    let mut pause = Duration::from_micros(50);
    loop {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{}/syscall", job.tid)) else {
            return true; // gone
        };
        match phase(&s, job) {
            Phase::Returned => return true,
            Phase::Running => {
                if running_since.get_or_insert_with(Instant::now).elapsed() > RUNNING_GRACE {
                    return false;
                }
            }
            Phase::InCall => running_since = None,
        }
        if start.elapsed() > Duration::from_secs(1) {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Blocked or preempted in the call (or in the same call again).
    InCall,
    /// On a CPU: in the call or past it, /proc cannot say.
    Running,
    /// In another call, or in none.
    Returned,
}

/// What a `/proc/<tid>/syscall` line says about the call `job`.
fn phase(line: &str, job: &Job) -> Phase {
    let mut f = line.split_whitespace();
    match f.next() {
        Some("running") | None => Phase::Running,
        Some(nr) => {
            let same = nr.parse::<i64>().ok() == Some(job.nr)
                && f.zip(job.args.iter())
                    .all(|(a, v)| u64::from_str_radix(a.trim_start_matches("0x"), 16) == Ok(*v));
            if same {
                Phase::InCall
            } else {
                Phase::Returned
            }
        }
    }
}

/// How often an audit starts over with another thread of the process when
/// the one it read went away meanwhile, before it fails closed.
const AUDIT_TRIES: usize = 8;

/// Every executable file mapping of process `tgid` not yet allowed goes to
/// the engine; a refusal kills the container.
fn audit(a: &Arc<Auditor>, tgid: u32) {
    let (Some(engine), Some(target)) = (a.engine.upgrade(), a.target()) else {
        return;
    };
    for _ in 0..AUDIT_TRIES {
        let Some((tid, maps)) = address_space(tgid) else {
            return; // gone: what it mapped went with it
        };
        if audit_through(a, &engine, &target, tid, &maps) {
            return;
        }
    }
    tracing::error!(container_id = %a.container, tgid, "map guard: the threads of a process kept exiting while its mappings were audited");
    engine.stopped(
        &target,
        "an executable mapping cannot be audited: its threads kept exiting".into(),
    );
}

/// The audit of `maps`, read through task `tid`; false when that task went
/// away before it was done (its process may live on in other threads).
fn audit_through(
    a: &Arc<Auditor>,
    engine: &Engine,
    target: &Arc<super::super::engine::Measured>,
    tid: u32,
    maps: &str,
) -> bool {
    let mut asked: HashSet<FileKey> = HashSet::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.contains('x') {
            continue;
        }
        let file: OwnedFd = match std::fs::File::open(format!("/proc/{tid}/map_files/{range}")) {
            Ok(f) => f.into(),
            // A thread that exited (reaped: ENOENT; exiting: ESRCH) names
            // nothing any more, which says nothing of its process's
            // mappings: read them again through a live thread.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
                    && task_maps(tid).is_none() =>
            {
                return false
            }
            // Anonymous memory, or a range unmapped since.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::error!(container_id = %a.container, error = %e, "map guard: cannot open a mapped file to audit it");
                engine.stopped(
                    target,
                    format!("an executable mapping cannot be audited: {e}"),
                );
                return true;
            }
        };
        let Ok(st) = nix::sys::stat::fstat(file.as_raw_fd()) else {
            continue;
        };
        let key = FileKey::of(&st);
        let known = a.approved.lock().map(|s| s.contains(&key)).unwrap_or(false);
        if known || !asked.insert(key) {
            continue;
        }
        tracing::warn!(pod_sandbox_id = %target.pod, container_id = %a.container, range, "map guard: a file is mapped executable that was not measured when it was mapped (its fd or range changed during the check); measuring it now");
        engine.submit(
            target.clone(),
            Box::new(Audited {
                file,
                key,
                approved: a.approved.clone(),
                engine: a.engine.clone(),
                target: target.clone(),
            }),
            key,
            Event::Mmap,
        );
    }
    true
}

/// A mapping found by an audit: it exists already, so a refusal kills the
/// container instead of failing a call.
struct Audited {
    file: OwnedFd,
    key: FileKey,
    approved: Arc<Mutex<HashSet<FileKey>>>,
    engine: Weak<Engine>,
    target: Arc<super::super::engine::Measured>,
}

impl Pending for Audited {
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
    fn answer(self: Box<Self>, allow: bool) {
        if allow {
            return approve(&self.approved, self.key);
        }
        if let Some(engine) = self.engine.upgrade() {
            engine.stopped(
                &self.target,
                "a file the policy refuses was mapped executable (its fd or range changed while the map guard checked it)".into(),
            );
        }
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
                Some(TaskList::Threads { file, dir })
            })
            .unwrap();
        assert!(list.read().unwrap().contains(&gettid()));
        // Its processes: this one (a thread that exited is audited by them).
        assert!(list.processes().unwrap().contains(&std::process::id()));
        let (other, stop_tx, t) = parked_thread();
        assert!(list.read().unwrap().contains(&other));
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        // Gone from the next listing too.
        assert!(!list.read().unwrap().contains(&other));
    }

    #[test]
    fn syscall_lines_say_whether_the_call_returned() {
        let job = Job {
            tid: 1,
            nr: 9,
            args: [0, 4096, 5, 2, 3, 0],
        };
        let line = "9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffd 0x7f12\n";
        assert_eq!(phase(line, &job), Phase::InCall);
        assert_eq!(phase("running\n", &job), Phase::Running);
        let other = "202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f12\n";
        assert_eq!(phase(other, &job), Phase::Returned);
        let moved = "9 0x0 0x2000 0x5 0x2 0x3 0x0 0x7ffd 0x7f12\n";
        assert_eq!(phase(moved, &job), Phase::Returned);
        assert_eq!(phase("-1 0x7ffd 0x7f12\n", &job), Phase::Returned);
    }

    #[test]
    fn an_exited_process_has_nothing_left_to_audit() {
        assert!(address_space(std::process::id()).is_some());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie, /proc/<pid> still there, no mm.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "child {pid} never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(address_space(pid).is_none());
        child.wait().unwrap();
        assert!(address_space(pid).is_none());
    }
}
