//! The map guard: measures executable *mappings* of files, which fanotify
//! cannot see, with seccomp user notification.
//!
//! Every container of a fanotify-measured pod runs under a seccomp filter
//! (its own profile, or an allow-all one, with these rules added) that hands
//! imacri, before the kernel acts on it:
//! - `mmap` with PROT_EXEC of a file (not MAP_ANONYMOUS),
//! - `mprotect`/`pkey_mprotect` adding PROT_EXEC,
//! - `personality` setting READ_IMPLIES_EXEC (which would make every
//!   PROT_READ mapping executable without asking),
//!
//! and refuses `shmat` with SHM_EXEC outright. runc sends the filter's
//! listener fd to imacri's socket (`linux.seccomp.listenerPath`) when it
//! creates the container or an exec process. For each notification imacri
//! takes the very file object the calling task maps ([`task`]: pidfd_getfd for mmap,
//! `/proc/<pid>/map_files` for mprotect) and measures it in the engine like
//! an execution: from any filesystem, memfds and SysV shm included.
//! Anonymous memory is not a file and is left alone, as IMA leaves it.
//!
//! Only the native architecture is allowed in a guarded container: a 32-bit
//! `mmap` takes its arguments through memory a filter cannot read.
//!
//! Fail-closed properties: a container cannot start without its listener fd
//! reaching imacri (runc fails the create); while imacri is down the fd
//! keeper ([`keeper`]) holds a copy, so guarded calls wait for the next
//! imacri, which takes the fds back; without the keeper the kernel answers
//! them with ENOSYS. Either way nothing is mapped executable unmeasured.
//!
//! seccomp's CONTINUE lets the kernel read the fd number (or range) again
//! after our check: [`shared`] says when that matters, [`hold`] what is
//! done then.

use super::{charge, keeper};
mod hold;
mod profile;
mod shared;
mod task;

use profile::PERSONALITY_QUERY;
pub use profile::{guard_profile, MapGuardError};

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::digest::{fd_path, FileKey};
use super::engine::{Engine, Pending};
use super::log::Event;

/// Whether this kernel can run the guard: seccomp user notification and
/// pidfd_getfd (Linux 5.6+).
pub fn probe() -> Result<(), String> {
    let avail = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
        .map_err(|e| format!("reading /proc/sys/kernel/seccomp/actions_avail: {e}"))?;
    if !avail.split_whitespace().any(|a| a == "user_notif") {
        return Err("seccomp user notification is unavailable (Linux < 5.0)".into());
    }
    // SAFETY: a raw syscall with invalid fds: only its errno is looked at.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, -1, 0) };
    if r < 0 && nix::errno::Errno::last() == nix::errno::Errno::ENOSYS {
        return Err("pidfd_getfd is unavailable (Linux < 5.6)".into());
    }
    // Without kcmp every call counts as shared and is held: still
    // closed, only slower, so it is no reason to refuse ima pods.
    if !shared::kcmp_works() {
        tracing::warn!("kcmp is unavailable (CONFIG_KCMP): every guarded call holds its container's other tasks");
    }
    Ok(())
}

/// How a call's file is taken from the calling thread on this kernel (for
/// `imacri check`).
pub fn file_source() -> &'static str {
    if task::thread_pidfds() {
        "each call's file taken from the calling thread (thread pidfds)"
    } else {
        "each call's file reopened through the calling thread's /proc fd table (no thread pidfds: Linux < 6.9)"
    }
}

/// Accepts runc's listener fds and answers their notifications.
pub struct Supervisor {
    path: std::path::PathBuf,
    keeper: Option<keeper::Keeper>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What runc sends with the fd (`specs.ContainerProcessState`).
#[derive(serde::Deserialize)]
struct ProcessState {
    #[serde(default)]
    metadata: String,
    state: ContainerState,
}

#[derive(serde::Deserialize)]
struct ContainerState {
    id: String,
}

impl Supervisor {
    /// Listens on `path` (replacing a stale socket) for runc's connections.
    /// With `keeper`, a copy of every listener fd is kept there, so the
    /// containers' guarded calls wait for the next imacri instead of failing
    /// while this one is gone.
    pub fn start(
        path: &Path,
        engine: &Arc<Engine>,
        keeper: Option<keeper::Keeper>,
    ) -> Result<Supervisor, MapGuardError> {
        let err = |source| MapGuardError::Listen {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(err)?;
        let weak = Arc::downgrade(engine);
        let kept = keeper.clone();
        std::thread::Builder::new()
            .name("imacri-mapguard".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => accept(&weak, c, kept.as_ref()),
                        Err(e) => tracing::warn!(error = %e, "map guard: accept failed"),
                    }
                    if weak.strong_count() == 0 {
                        return;
                    }
                }
            })
            .map_err(err)?;
        Ok(Supervisor {
            path: path.to_path_buf(),
            keeper,
        })
    }

    /// The fd keeper, if one runs.
    pub fn keeper(&self) -> Option<&keeper::Keeper> {
        self.keeper.as_ref()
    }

    /// After a restart: answers the listeners a previous imacri left with
    /// the keeper (`kept`: its seccomp listeners; calls made meanwhile
    /// waited for this). Returns how many.
    pub fn adopt(&self, engine: &Arc<Engine>, kept: Vec<KeptListener>) -> usize {
        let Some(k) = &self.keeper else { return 0 };
        let n = kept.len();
        for KeptListener { key, fd, mappings } in kept {
            let container = key.split('/').next().unwrap_or_default().to_string();
            // What the last imacri received and never answered first, but
            // what it was hashing: that is measured now, before anything
            // new is received.
            let ids = keeper::IdFile::open(&k.ids_dir(), &key).ok();
            let handed: Vec<u64> = mappings.iter().map(|(id, _)| *id).collect();
            let denied = ids
                .as_ref()
                .map_or(0, |i| i.deny_orphans(fd.as_fd(), &handed));
            tracing::info!(container_id = %container, denied, measured = handed.len(), "map guard: listening again after a restart");
            let kept = Arc::new((k.clone(), key.clone()));
            for (id, file) in mappings {
                measure_kept(engine, &fd, &container, &kept, id, file);
            }
            k.remember(&key, fd.as_fd());
            if let Err(e) = listen(Arc::downgrade(engine), fd, container, ids, Some(kept)) {
                tracing::error!(error = %e, "map guard: cannot start a listener thread");
            }
        }
        n
    }
}

/// A listener the last imacri left with the keeper, with the mappings it
/// was hashing (notification id, mapped file).
pub struct KeptListener {
    pub key: String,
    pub fd: OwnedFd,
    pub mappings: Vec<(u64, OwnedFd)>,
}

/// Measures a mapping the last imacri received and handed to the keeper
/// while hashing, and answers it by its notification id. Only calls of a
/// task that shared nothing were handed over (see [`MapPending::queued`]):
/// the file it maps cannot have changed under the fd since.
fn measure_kept(
    engine: &Arc<Engine>,
    notify: &OwnedFd,
    container: &str,
    kept: &Arc<(keeper::Keeper, String)>,
    id: u64,
    file: OwnedFd,
) {
    let event_key = keeper::mapping_key(&kept.1, id);
    let (Ok(dup), Some(target)) = (notify.try_clone(), engine.target(container)) else {
        respond(notify, id, false);
        let _ = kept.0.drop_key(&event_key);
        return;
    };
    let key = match nix::sys::stat::fstat(file.as_raw_fd()) {
        Ok(st) if still_valid(notify, id) => FileKey::of(&st),
        _ => {
            respond(notify, id, false);
            let _ = kept.0.drop_key(&event_key);
            return;
        }
    };
    let reply = Arc::new(Reply {
        notify: Arc::new(dup),
        id,
        remaining: AtomicUsize::new(1),
        allowed: AtomicBool::new(true),
        sink: None,
        files: 1,
        kept: Some(kept.clone()),
        handed: std::sync::Mutex::new(Some(event_key)),
    });
    let pending = Box::new(MapPending { file, reply });
    engine.measure_now(target, pending, key, Event::Mmap);
}

fn accept(
    engine: &Weak<Engine>,
    conn: std::os::unix::net::UnixStream,
    keeper: Option<&keeper::Keeper>,
) {
    let (text, fds) = match receive(&conn) {
        Ok(r) => r,
        Err(e) => return tracing::error!(error = %e, "map guard: reading runc's listener message"),
    };
    let state: ProcessState = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => return tracing::error!(error = %e, "map guard: runc's state is not JSON"),
    };
    let Some(fd) = fds.into_iter().next() else {
        return tracing::error!(container_id = %state.state.id, "map guard: runc sent no seccomp fd");
    };
    tracing::debug!(container_id = %state.state.id, pod_sandbox_id = %state.metadata, "map guard: listening");
    let mut ids = None;
    let mut kept = None;
    if let Some(k) = keeper {
        // Unique per listener (a container's exec processes have their own).
        let key = format!(
            "{}/{}/{}",
            state.state.id,
            state.metadata,
            crate::ids::now_nanos()
        );
        ids = keeper::IdFile::open(&k.ids_dir(), &key)
            .inspect_err(|e| tracing::warn!(container_id = %state.state.id, error = %e, "map guard: no id file; calls in flight at a crash wait until killed"))
            .ok();
        match k.put(&key, fd.as_fd()) {
            Ok(()) => kept = Some(Arc::new((k.clone(), key))),
            Err(e) => {
                tracing::warn!(container_id = %state.state.id, error = %e, "map guard: fd not kept; its calls fail while imacri is down")
            }
        }
    }
    if let Err(e) = listen(engine.clone(), fd, state.state.id, ids, kept) {
        // The fd was dropped: the container's guarded calls fail (ENOSYS),
        // closed.
        tracing::error!(error = %e, "map guard: cannot start a listener thread");
    }
}

/// Answers the notifications of one seccomp listener fd, for `container`
/// (registered with the engine), on a thread of its own until no task uses
/// the filter (the keeper, holding it under `kept`, lets it go then too).
pub fn listen(
    engine: Weak<Engine>,
    fd: OwnedFd,
    container: String,
    ids: Option<keeper::IdFile>,
    kept: Option<Arc<(keeper::Keeper, String)>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("imacri-seccomp".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let done = serve(&engine, fd, &container, ids.as_ref(), kept.as_ref());
            charge::home();
            // Not when imacri is stopping: the next one answers it.
            if done {
                if let Some(i) = ids {
                    i.remove();
                }
                if let Some(k) = kept {
                    k.0.forget(&k.1);
                }
            }
        })
        .map(|_| ())
}

/// The message (JSON, to EOF) and the fds of its first part.
fn receive(conn: &std::os::unix::net::UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut text = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just gave us these fds.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    Ok((text, fds))
}

/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6): the caller waits for
/// its answer anyway, so the kernel wakes this listener on the caller's CPU
/// and the caller on ours. Without it each guarded call pays two
/// cross-CPU wake-ups, on a VM ~30 us each (bench_ima: 65 us a call against
/// 1.6 us unguarded). An older kernel only loses the speed.
fn sync_wake_up(notify: &OwnedFd, container: &str) {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: the ioctl takes the flags by value in a u64 it only reads.
    let r = unsafe {
        libc::ioctl(
            notify.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    if r != 0 {
        tracing::debug!(container_id = %container, error = %nix::errno::Errno::last(), "map guard: no synchronous wake-ups (kernel < 6.6)");
    }
}

/// Answers one listener's notifications until no task uses its filter.
/// Returns true when the listener is done with (no task uses its filter,
/// or it failed), false when imacri is stopping.
fn serve(
    engine: &Weak<Engine>,
    notify: OwnedFd,
    container: &str,
    ids: Option<&keeper::IdFile>,
    kept: Option<&Arc<(keeper::Keeper, String)>>,
) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let notify = Arc::new(notify);
    sync_wake_up(&notify, container);
    let sharing = shared::Sharing::new();
    let mut tasks = task::Tasks::default();
    loop {
        let mut fds = [PollFd::new(notify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(container_id = %container, error = %e, "map guard: poll");
                return true;
            }
            Ok(_) => {}
        }
        let rev = fds[0].revents().unwrap_or(PollFlags::POLLHUP);
        if !rev.contains(PollFlags::POLLIN) {
            // POLLHUP: every task of this filter is gone.
            return true;
        }
        let Some(engine) = engine.upgrade() else {
            return false;
        };
        // imacri is stopping: what is not received yet waits in the kernel
        // (the keeper holds the listener) for the next imacri.
        let Some(_reading) = engine.reading() else {
            return false;
        };
        // SAFETY: the kernel requires a zeroed struct; plain old data.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::ioctl(
                notify.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV as _,
                &mut req as *mut libc::seccomp_notif,
            )
        };
        if r != 0 {
            match nix::errno::Errno::last() {
                // The task died before we read it, or a signal: next one.
                nix::errno::Errno::ENOENT | nix::errno::Errno::EINTR => continue,
                e => {
                    tracing::error!(container_id = %container, error = %e, "map guard: receiving");
                    return true;
                }
            }
        }
        if let Some(i) = ids {
            i.record(req.id);
        }
        // A loop of guarded calls costs the pod's CPU, not the node's
        // (moves once; a check of a pointer after that).
        if let Some(t) = engine.target(container) {
            charge::enter(t.charge.as_ref());
        }
        handle(
            &engine, &notify, &sharing, &mut tasks, container, &req, kept,
        );
    }
}

/// The answer to one notification, given once every file it maps is decided.
struct Reply {
    notify: Arc<OwnedFd>,
    id: u64,
    remaining: AtomicUsize,
    allowed: AtomicBool,
    /// Set for a held call ([`hold`]): the verdict goes to its thread,
    /// which answers and lets the sharers go.
    sink: Option<std::sync::Mutex<std::sync::mpsc::Sender<bool>>>,
    /// How many files the call maps.
    files: usize,
    /// The keeper and the listener's key there.
    kept: Option<Arc<(keeper::Keeper, String)>>,
    /// The keeper's key for the mapped file while it is hashed.
    handed: std::sync::Mutex<Option<String>>,
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

struct MapPending {
    file: OwnedFd,
    reply: Arc<Reply>,
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

fn respond(notify: &OwnedFd, id: u64, allow: bool) {
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
fn still_valid(notify: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    unsafe {
        libc::ioctl(
            notify.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        ) == 0
    }
}

fn handle(
    engine: &Arc<Engine>,
    notify: &Arc<OwnedFd>,
    sharing: &Arc<shared::Sharing>,
    tasks: &mut task::Tasks,
    container: &str,
    req: &libc::seccomp_notif,
    kept: Option<&Arc<(keeper::Keeper, String)>>,
) {
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
        sharing: sharing.clone(),
        target,
        container: container.to_string(),
        req: *req,
        kept: kept.cloned(),
    };
    // Decided while the caller waits: whether anyone can change what the
    // kernel reads again after our answer. If so, they are held still
    // while the call is checked and made, on a thread of its own.
    if sharing.shared(req.pid, call.table()) {
        engine.stats.held_calls.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("imacri-maphold".into())
            .spawn(move || call.held());
        if let Err(e) = spawned {
            tracing::error!(container_id = %container, error = %e, "map guard: no thread to hold a call's sharers; refused");
            respond(notify, req.id, false);
        }
        return;
    }
    call.decide(tasks, None);
}

/// One guarded mmap/mprotect call.
struct Call {
    engine: Arc<Engine>,
    notify: Arc<OwnedFd>,
    sharing: Arc<shared::Sharing>,
    target: Arc<super::engine::Measured>,
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
        let _one_at_a_time = self.sharing.hold_lock();
        let mut tasks = task::Tasks::default();
        let mut held = hold::Held::default();
        let sharing = self.sharing.clone();
        let stopped = match self.engine.map_no_hold {
            true => Err("not held (test)".to_string()),
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
            tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, %path, error = %e, "ima violation: a mapping is not what was measured; its process is killed");
            // SAFETY: a signal to a task of the container (SIGKILL ends its
            // whole process).
            unsafe { libc::kill(self.req.pid as i32, libc::SIGKILL) };
            let how =
                format!("put under a mapping call after the check ({e}); its process was killed");
            self.engine
                .tomtou(&self.target, &path, "mapped executable", &how);
        }
    }

    /// Refuses a call that cannot be held (counted as `unheldCalls`).
    fn refuse_unheld(&self, error: &str, why: &str) {
        self.engine
            .stats
            .unheld_calls
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, %error, "map guard: {why}; refused");
        respond(&self.notify, self.req.id, false);
    }

    /// The file(s) a held mmap that returned has mapped are the ones it
    /// measured (`measured`: their inodes). Else: what is mapped, and why.
    fn mapped_as_measured(
        &self,
        held: &hold::Held,
        measured: &[(u64, u64)],
    ) -> Result<(), (String, String)> {
        let unknown = |e: String| ("-".to_string(), e);
        let ret = held.returned(self.req.pid).map_err(unknown)?;
        if (-4095..0).contains(&ret) {
            return Ok(()); // the call failed: nothing was mapped
        }
        let files =
            task::mapped_files(self.req.pid, ret as u64, self.req.data.args[1]).map_err(unknown)?;
        for f in files {
            let st = nix::sys::stat::fstat(f.as_raw_fd()).map_err(|e| unknown(e.to_string()))?;
            if !measured.contains(&FileKey::of(&st).inode()) {
                let why = "a file other than the one measured".to_string();
                return Err((fd_path(f.as_fd()), why));
            }
        }
        Ok(())
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
        let files = match nr {
            libc::SYS_mmap => tasks.file_of(req.pid, args[4] as i32).map(|f| vec![f]),
            libc::SYS_mprotect | libc::SYS_pkey_mprotect => {
                task::mapped_files(req.pid, args[0], args[1])
            }
            _ => Err(format!("unexpected syscall {nr}")),
        };
        // Everything above read the task by pid: it must still be the caller.
        let files = match files {
            Ok(f) if still_valid(notify, req.id) => f,
            Ok(_) => return Vec::new(),
            Err(e) => {
                tracing::warn!(pod_sandbox_id = %self.target.pod, container_id = %self.container, error = %e, "map guard: cannot resolve the mapped file; refused");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_can_run_the_guard() {
        probe().unwrap();
        // Linux 6.9+ here (6.18).
        assert!(file_source().contains("thread pidfds)"));
    }
}
