//! One guarded call: its files taken from the caller and measured, the
//! answer given once they are decided; a call whose table the caller shares
//! is held ([`hold`]) on a thread of its own, one at a time
//! ([`HeldCalls`]).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::profile::PERSONALITY_QUERY;
use super::{hold, shared, task, CallError};
use crate::integrity::digest::{fd_path, FileKey};
use crate::integrity::engine::{Caller, Engine, Mapper, Pending, WatchedAs};
use crate::integrity::keeper;
use crate::integrity::log::Event;
use crate::integrity::sys::SysError;

/// The answer to one notification, given once every file it maps is decided.
pub(super) struct Reply {
    pub(super) notify: Arc<OwnedFd>,
    pub(super) id: u64,
    pub(super) remaining: AtomicUsize,
    pub(super) allowed: AtomicBool,
    /// Set for a held call ([`hold`]): the verdict goes to its thread,
    /// which answers and lets the sharers go.
    pub(super) sink: Option<std::sync::Mutex<std::sync::mpsc::Sender<bool>>>,
    /// How many files the call maps.
    pub(super) files: usize,
    /// The keeper and the listener's key there.
    pub(super) kept: Option<Arc<(keeper::Keeper, String)>>,
    /// The keeper's key for the mapped file while it is hashed.
    pub(super) handed: std::sync::Mutex<Option<String>>,
    /// The call (None: received by the last imacri, known by its id only).
    pub(super) caller: Option<Caller>,
}

impl Reply {
    fn part(&self, allow: bool) {
        if !allow {
            self.allowed.store(false, Ordering::SeqCst);
        }
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            let allowed = self.allowed.load(Ordering::SeqCst);
            if let Some(sink) = &self.sink {
                if let Ok(tx) = sink.lock() {
                    let _ = tx.send(allowed);
                }
                return;
            }
            respond(&self.notify, self.id, allowed);
            let handed = self.handed.lock().ok().and_then(|mut h| h.take());
            if let (Some(key), Some(k)) = (handed, &self.kept) {
                // Ids are never reused: a stale key is harmless.
                let _ = k.0.drop_key(&key);
            }
        }
    }
}

pub(super) struct MapPending {
    pub(super) file: OwnedFd,
    pub(super) reply: Arc<Reply>,
}

impl Pending for MapPending {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
    fn answer(self: Box<Self>, allow: bool) {
        self.reply.part(allow);
    }

    fn wanted(&self) -> bool {
        still_valid(&self.reply.notify, self.reply.id)
    }

    fn mapper(&self) -> Mapper {
        self.reply.caller.map_or(Mapper::Unknown, Mapper::Call)
    }

    /// Hashing takes a while: the file goes to the keeper first, so that a
    /// next imacri measures the call if this one dies meanwhile. Only a
    /// call of one file by a task that shares nothing (not a held one):
    /// then nothing can change what the kernel maps once it goes on.
    fn queued(&mut self) {
        let r = &self.reply;
        // A held call is not: a next imacri would answer it with the
        // sharers of this one's thread let go.
        let (None, 1, Some(k)) = (&r.sink, r.files, &r.kept) else {
            return;
        };
        let key = keeper::mapping_key(&k.1, r.id);
        match k.0.put(&key, self.file.as_fd()) {
            Ok(()) => {
                if let Ok(mut h) = r.handed.lock() {
                    *h = Some(key);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "fd keeper: mapping not kept; a crash now refuses it")
            }
        }
    }
}

pub(super) fn respond(notify: &OwnedFd, id: u64, allow: bool) {
    // SAFETY: plain old data, zeroed then filled.
    let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
    resp.id = id;
    if allow {
        resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
    } else {
        resp.error = -libc::EPERM;
    }
    // ENOENT: the task is gone (killed while waiting); nothing to answer.
    unsafe {
        libc::ioctl(
            notify.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    };
}

/// Whether the notification is still pending: the pid we resolved files of
/// is the task that made the call (not a recycled pid).
pub(super) fn still_valid(notify: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    unsafe {
        libc::ioctl(
            notify.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        ) == 0
    }
}

/// A listener's own: what its calls share.
pub(super) struct Listener {
    pub(super) notify: Arc<OwnedFd>,
    pub(super) container: String,
    kept: Option<Arc<(keeper::Keeper, String)>>,
    sharing: Arc<shared::Sharing>,
    held: Arc<HeldCalls>,
}

impl Listener {
    pub(super) fn new(
        notify: OwnedFd,
        container: &str,
        kept: Option<&Arc<(keeper::Keeper, String)>>,
    ) -> Listener {
        Listener {
            notify: Arc::new(notify),
            container: container.to_string(),
            kept: kept.cloned(),
            sharing: shared::Sharing::new(),
            held: Arc::default(),
        }
    }

    /// Answers one notification, or has it answered once its files are
    /// measured.
    pub(super) fn handle(
        &self,
        engine: &Arc<Engine>,
        tasks: &mut task::Tasks,
        req: &libc::seccomp_notif,
    ) {
        let (notify, container) = (&self.notify, &self.container);
        let nr = req.data.nr as libc::c_long;
        let args = req.data.args;
        if nr == libc::SYS_personality {
            // Only reached with READ_IMPLIES_EXEC set: a query is fine.
            return respond(notify, req.id, args[0] == PERSONALITY_QUERY);
        }
        let Some(target) = engine.target(container) else {
            tracing::warn!(container_id = %container, "map guard: the container is not measured now; executable mapping refused");
            return respond(notify, req.id, false);
        };
        let call = Call {
            engine: engine.clone(),
            notify: notify.clone(),
            sharing: self.sharing.clone(),
            target,
            container: container.clone(),
            req: *req,
            kept: self.kept.clone(),
        };
        // Decided while the caller waits: whether anyone can change what the
        // kernel reads again after our answer. If so, they are held still
        // while the call is checked and made ([`HeldCalls`]).
        if self.sharing.shared(req.pid, call.table()) {
            return self.held.push(call);
        }
        call.decide(tasks, None);
    }
}

/// A listener's held calls, run one at a time (two holders would interrupt
/// each other's callers), each on a thread of its own: the ptrace tracer,
/// whose end lets go whatever it still holds. A call's thread, done,
/// starts the next one's. So a container whose 300 threads each wait in a
/// held call costs imacri one or two threads, not 300 (and more: holding a
/// sharer that waits in a guarded call of its own interrupts that call,
/// which the kernel restarts as a new notification; until 2026-12-03 each
/// had a thread, +3212 in 3 s). The threads start in the listener's
/// cgroups, the pod's: a multi-threaded loop of `mprotect(PROT_EXEC)`,
/// ~100 us of imacri a call, is the pod's to pay.
#[derive(Default)]
struct HeldCalls {
    state: Mutex<HeldState>,
}

#[derive(Default)]
struct HeldState {
    queue: VecDeque<Call>,
    /// A call's thread runs (and will start the next one's).
    running: bool,
}

impl HeldCalls {
    fn state(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(self: &Arc<Self>, call: Call) {
        let mut st = self.state();
        // A task waits in one call at a time: one queued from it before was
        // withdrawn (interrupted, to be made again, or the task died).
        st.queue.retain(|c| c.req.pid != call.req.pid);
        st.queue.push_back(call);
        if !st.running {
            st.running = true;
            drop(st);
            self.start();
        }
    }

    /// Starts the thread for the next call (`running` is set).
    fn start(self: &Arc<Self>) {
        let me = self.clone();
        let here = crate::integrity::charge::here();
        let started = std::thread::Builder::new()
            .name("imacri-maphold".into())
            .spawn(move || {
                here.adopt();
                me.run_next()
            });
        if let Err(e) = started {
            let mut st = self.state();
            st.running = false;
            let e = SysError::io("starting a hold thread", e).into();
            for c in st.queue.drain(..) {
                c.refuse_unheld(&e, "no thread to hold a call's sharers");
            }
        }
    }

    /// On a call's thread: the next call still waiting, then the thread of
    /// the one after it, if any.
    fn run_next(self: Arc<Self>) {
        loop {
            let Some(call) = self.state().queue.pop_front() else {
                break;
            };
            // Withdrawn while it waited: nobody to hold still for it.
            if !still_valid(&call.notify, call.req.id) {
                continue;
            }
            call.engine.stats.held_calls.fetch_add(1, Ordering::Relaxed);
            // Holding a call's sharers costs the pod's CPU too.
            crate::integrity::charge::work_for(call.target.charge.as_ref());
            call.held();
            // Where it is: going home would hold up the next call's thread.
            crate::integrity::charge::settle();
            break;
        }
        let mut st = self.state();
        if st.queue.is_empty() {
            st.running = false;
            return;
        }
        drop(st);
        self.start();
    }
}

/// One guarded mmap/mprotect call.
struct Call {
    engine: Arc<Engine>,
    notify: Arc<OwnedFd>,
    sharing: Arc<shared::Sharing>,
    target: Arc<crate::integrity::engine::Measured>,
    container: String,
    req: libc::seccomp_notif,
    kept: Option<Arc<(keeper::Keeper, String)>>,
}

impl Call {
    /// What the kernel reads again after CONTINUE.
    fn table(&self) -> shared::Table {
        if self.req.data.nr as libc::c_long == libc::SYS_mmap {
            shared::Table::Files
        } else {
            shared::Table::Vm
        }
    }

    /// A call whose table is shared: its sharers are stopped first, the
    /// call is checked, answered and waited for, then they go on. A call
    /// whose sharers cannot all be stopped is refused.
    fn held(self) {
        // This thread's sleeps as short as asked (the default slack adds
        // 50 us to each): the held tasks wait for it.
        // SAFETY: an integer option of this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        let mut tasks = task::Tasks::default();
        let mut held = hold::Held::default();
        let sharing = self.sharing.clone();
        let stopped = match self.engine.map_no_hold {
            true => Err(CallError::NotHeldInTest),
            false => held.sharers_of(self.req.pid, self.table(), || sharing.tasks_now()),
        };
        if let Err(e) = stopped {
            return self.refuse_unheld(&e, "the call's sharers cannot be held still");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let measured = self.decide(&mut tasks, Some(tx));
        // No verdict: the call went away (the task was killed).
        let Ok(allowed) = rx.recv() else { return };
        // Attached before the answer: one that cannot be stopped after the
        // call could run what it mapped before anyone looked.
        let attached = match allowed {
            true => held.attach_caller(self.req.pid),
            false => Ok(()),
        };
        if let Err(e) = attached {
            return self.refuse_unheld(&e, "the caller cannot be held after its call");
        }
        // With io_uring threads about, what was mapped is checked once the
        // call returned, before the caller runs an instruction more.
        let trap = match allowed && held.io_workers() {
            true => match held.trap_return(self.req.pid, self.req.data.instruction_pointer) {
                Ok(t) => Some(t),
                Err(e) => return self.refuse_unheld(&e, "the caller's return cannot be trapped"),
            },
            false => None,
        };
        respond(&self.notify, self.req.id, allowed);
        if !allowed {
            return;
        }
        let returned = match trap {
            Some(t) => held.caller_trapped(self.req.pid, t),
            None => held.caller_returned(self.req.pid),
        };
        if !held.io_workers() {
            if let Err(e) = returned {
                tracing::debug!(container_id = %self.container, error = %e, "map guard: the caller was not seen leaving the call");
            }
            return;
        }
        // An io_uring request may have put another file under the fd since
        // it was taken: the caller and every thread that runs its code are
        // still stopped, so a mapping of anything but what was measured is
        // killed before any of it runs.
        let checked = returned
            .map_err(|e| ("-".to_string(), e))
            .and_then(|()| self.mapped_as_measured(&held, &measured));
        if let Err((path, e)) = checked {
            tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, %path, error = %e, "ima violation: a mapping is not what was measured; the processes sharing it are killed");
            held.kill_address_space(self.req.pid);
            let how = format!(
                "put under a mapping call after the check ({e}); the processes sharing the mapping were killed"
            );
            self.engine
                .tomtou(&self.target, &path, WatchedAs::Mapping, &how);
        }
    }

    /// Refuses a call that cannot be held (counted as `unheldCalls`).
    fn refuse_unheld(&self, error: &CallError, why: &str) {
        self.engine
            .stats
            .unheld_calls
            .fetch_add(1, Ordering::Relaxed);
        if let Some(unsaid) = self.target.quiet.take() {
            tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, %error, unsaid, "map guard: {why}; refused");
        }
        respond(&self.notify, self.req.id, false);
    }

    /// The file(s) a held mmap that returned has mapped are the ones it
    /// measured (`measured`: their inodes). Else: what is mapped, and why.
    fn mapped_as_measured(
        &self,
        held: &hold::Held,
        measured: &[(u64, u64)],
    ) -> Result<(), (String, CallError)> {
        let unknown = |e: CallError| ("-".to_string(), e);
        let ret = held.returned(self.req.pid).map_err(unknown)?;
        if (-4095..0).contains(&ret) {
            return Ok(()); // the call failed: nothing was mapped
        }
        let files = task::mapped_inodes(self.req.pid, ret as u64, self.req.data.args[1])
            .map_err(|e| unknown(e.into()))?;
        for (inode, path) in files {
            if !measured.contains(&inode) {
                return Err((path, CallError::NotMeasured));
            }
        }
        Ok(())
    }

    /// A shared mapping of an overlay file open for writing: the caller's
    /// open file is held open until the container is gone
    /// (`fanotify/held.rs`). Err: it must be and cannot be.
    fn hold_if_writable(&self, tasks: &task::Tasks, taken: &OwnedFd) -> Result<(), CallError> {
        // Most shared mappings (/dev/shm, devices) end here, with no copy.
        if !crate::integrity::overlay::on_overlayfs(taken.as_fd())
            .map_err(|e| SysError::call("statfs", e))?
        {
            return Ok(());
        }
        let (pid, fd) = (self.req.pid, self.req.data.args[4] as i32);
        let file = tasks.for_holding(pid, fd, taken, |open| self.engine.own_open(open))?;
        if !crate::integrity::fanotify::needs_holding(file.as_fd())? {
            return Ok(());
        }
        Ok(self.engine.hold_writer(&self.target, file)?)
    }

    /// Under a policy denying anonymous executable memory: why the call
    /// would make executable memory no file backs, or None. Anonymous
    /// `mmap`s are refused by the filter already.
    fn unbacked(&self, nr: libc::c_long, args: &[u64; 6]) -> Option<String> {
        let writable = args[2] & libc::PROT_WRITE as u64 != 0;
        let exec = args[2] & libc::PROT_EXEC as u64 != 0;
        let mprotect = matches!(nr, libc::SYS_mprotect | libc::SYS_pkey_mprotect);
        if (nr == libc::SYS_mmap && exec || mprotect) && writable {
            return Some("memory writable and executable at once".into());
        }
        if !mprotect {
            return None;
        }
        super::anonymous::unbacked(self.req.pid, args[0], args[1])
            .unwrap_or_else(|e| Some(format!("its memory cannot be looked at ({e})")))
    }

    /// Takes the call's files from the caller and measures them; the answer
    /// goes to the caller, or to `sink` for a held call.
    /// Returns the inodes of the files submitted.
    fn decide(
        &self,
        tasks: &mut task::Tasks,
        sink: Option<std::sync::mpsc::Sender<bool>>,
    ) -> Vec<(u64, u64)> {
        let (engine, notify, req) = (&self.engine, &self.notify, &self.req);
        let answer = |allow: bool| match &sink {
            Some(tx) => {
                let _ = tx.send(allow);
            }
            None => respond(notify, req.id, allow),
        };
        let nr = req.data.nr as libc::c_long;
        let args = req.data.args;
        if self.target.no_anonymous_exec {
            let unbacked = self.unbacked(nr, &args);
            if let Some(why) = unbacked {
                if let Some(unsaid) = self.target.quiet.take() {
                    tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, %why, unsaid, "map guard: executable memory that no file backs, which the pod's policy denies; refused");
                }
                answer(false);
                return Vec::new();
            }
        }
        let files = match nr {
            libc::SYS_mmap => tasks.file_of(req.pid, args[4] as i32).map(|f| vec![f]),
            libc::SYS_mprotect | libc::SYS_pkey_mprotect => {
                task::mapped_files(req.pid, args[0], args[1]).map_err(CallError::from)
            }
            _ => Err(CallError::UnexpectedSyscall(nr)),
        };
        // Everything above read the task by pid: it must still be the caller.
        let files = match files {
            Ok(f) if still_valid(notify, req.id) => f,
            Ok(_) => return Vec::new(),
            Err(e) => {
                if let Some(unsaid) = self.target.quiet.take() {
                    tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, error = %e, unsaid, "map guard: cannot resolve the mapped file; refused");
                }
                answer(false);
                return Vec::new();
            }
        };
        if let (Some(window), true) = (engine.map_swap_window, sink.is_some()) {
            // Test only: a wide window between the check and the answer.
            std::thread::sleep(window);
        }
        if files.is_empty() {
            // Anonymous memory only (e.g. a JIT's mprotect): not a file.
            answer(true);
            return Vec::new();
        }
        if nr == libc::SYS_mmap && args[3] & libc::MAP_SHARED as u64 != 0 {
            // Held (if it must be) before the call goes on, and before an
            // executable one is checked for writers: then that check sees it.
            if let Err(e) = self.hold_if_writable(tasks, &files[0]) {
                if let Some(unsaid) = self.target.quiet.take() {
                    tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, path = %fd_path(files[0].as_fd()), error = %e, unsaid, "map guard: a shared writable mapping cannot be held; refused");
                }
                answer(false);
                return Vec::new();
            }
            if args[2] & libc::PROT_EXEC as u64 == 0 {
                // Nothing executable: that is all. The file is what a
                // held call checks the kernel mapped.
                let inode =
                    nix::sys::stat::fstat(files[0].as_raw_fd()).map(|st| FileKey::of(&st).inode());
                answer(true);
                return inode.into_iter().collect();
            }
        }
        if let Some(stall) = &engine.map_stall {
            let stalled = files.iter().any(|f| {
                std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .is_ok_and(|p| p.to_string_lossy().contains(stall.as_str()))
            });
            if stalled {
                // Test only: received and never answered.
                return Vec::new();
            }
        }
        let reply = Arc::new(Reply {
            notify: notify.clone(),
            id: req.id,
            remaining: AtomicUsize::new(files.len()),
            allowed: AtomicBool::new(true),
            sink: sink.map(std::sync::Mutex::new),
            files: files.len(),
            kept: self.kept.clone(),
            handed: std::sync::Mutex::new(None),
            caller: Some(Caller {
                tid: req.pid,
                nr,
                args,
            }),
        });
        let mut submitted = Vec::with_capacity(files.len());
        for file in files {
            let st = match nix::sys::stat::fstat(file.as_raw_fd()) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
                _ => {
                    reply.part(false);
                    continue;
                }
            };
            let key = FileKey::of(&st);
            submitted.push(key.inode());
            let pending = Box::new(MapPending {
                file,
                reply: reply.clone(),
            });
            engine.submit(self.target.clone(), pending, key, Event::Mmap);
        }
        submitted
    }
}
