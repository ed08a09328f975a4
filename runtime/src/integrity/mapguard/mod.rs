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
//! - `mmap` with MAP_SHARED of a file, whatever its protection: one of an
//!   overlay file open for writing is held open for writing until the
//!   container is gone (`fanotify/held.rs`: the mapping holds the upper
//!   layer's file, whose writers the kernel's rules for the overlay file do
//!   not count),
//!
//! and refuses `shmat` with SHM_EXEC outright. runc sends the filter's
//! listener fd to imacri's socket (`linux.seccomp.listenerPath`) when it
//! creates the container or an exec process. For each notification imacri
//! takes the very file object the calling task maps ([`task`]: pidfd_getfd for mmap,
//! `/proc/<pid>/map_files` for mprotect) and measures it in the engine like
//! an execution: from any filesystem, memfds and SysV shm included.
//! Anonymous memory is not a file and is left alone, as IMA leaves it,
//! unless the pod's policy denies it ([`anonymous`]).
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

use super::{charge, keeper, park};
mod anonymous;
pub use anonymous::userfaultfd_device;
mod call;
mod hold;
mod profile;
mod shared;
mod task;

use call::{respond, still_valid, Listener, MapPending, Reply};
pub use profile::{guard_profile, MapGuardError};

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Weak};

use super::digest::FileKey;
use super::engine::Engine;
use super::log::Event;
use super::sys::{SysError, WatchError};

/// Why a guarded call was refused without a measurement (logged with it;
/// the caller gets EPERM), or why what it mapped was killed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A shared writable mapping's file cannot be held open.
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("pidfd_getfd({tid}, {fd}): the task is gone")]
    TaskGone { tid: u32, fd: i32 },
    #[error("{0}: no flags")]
    NoFlags(String),
    #[error("unexpected syscall {0}")]
    UnexpectedSyscall(i64),
    #[error("the caller's cgroup kept changing while its sharers were stopped")]
    CgroupChanging,
    #[error("task {tid} did not stop within {wait:?}")]
    NotStopped { tid: i32, wait: std::time::Duration },
    #[error("returns are trapped on x86-64 only")]
    NotX86,
    /// Tests only (`map_no_hold`): every held call is refused.
    #[error("not held (test)")]
    NotHeldInTest,
    #[error("a file other than the one measured")]
    NotMeasured,
}

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
    // Held in the keeper until answered (as the fanotify events taken back).
    kept.0.remember(&event_key, file.as_fd());
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
        caller: None,
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

/// The thread a listener runs on.
const THREAD: park::Spawn = park::Spawn {
    name: "imacri-seccomp",
    stack: Some(256 * 1024),
};

/// Answers the notifications of one seccomp listener fd, for `container`
/// (registered with the engine), on a thread of its own until no task uses
/// the filter (the keeper, holding it under `kept`, lets it go then too).
/// A listener with nothing to do parks ([`park`]): its thread ends, and one
/// starts again when a call comes.
pub fn listen(
    engine: Weak<Engine>,
    fd: OwnedFd,
    container: String,
    ids: Option<keeper::IdFile>,
    kept: Option<Arc<(keeper::Keeper, String)>>,
) -> std::io::Result<()> {
    sync_wake_up(&fd, &container);
    let serving = Serving {
        engine,
        listener: Listener::new(fd, &container, kept.as_ref()),
        ids,
        kept,
    };
    THREAD.start(move || serving.run())
}

/// A listener, whichever thread runs it now.
struct Serving {
    engine: Weak<Engine>,
    listener: Listener,
    ids: Option<keeper::IdFile>,
    kept: Option<Arc<(keeper::Keeper, String)>>,
}

/// Why a listener's thread stops answering.
enum Served {
    /// No task uses the filter any more (or the listener failed).
    Done,
    /// imacri is stopping: the next one answers.
    Stopping,
    /// Nothing came for a while.
    Quiet,
}

impl Serving {
    fn run(mut self) {
        loop {
            match self.serve() {
                Served::Quiet => {
                    let fd = self.listener.notify.as_raw_fd();
                    match park::park(&[fd], THREAD, self, Serving::run) {
                        Ok(()) => return,
                        Err(back) => self = back,
                    }
                }
                Served::Stopping => return charge::leave(),
                Served::Done => {
                    charge::leave();
                    if let Some(i) = self.ids {
                        i.remove();
                    }
                    if let Some(k) = self.kept {
                        k.0.forget(&k.1);
                    }
                    return;
                }
            }
        }
    }

    /// Answers notifications until the listener is done, imacri stops or
    /// nothing came for [`park::QUIET`].
    fn serve(&self) -> Served {
        use nix::poll::{poll, PollFd, PollFlags};
        let (listener, container) = (&self.listener, &self.listener.container);
        let notify = &listener.notify;
        // The pidfds of the calling tasks, kept while the thread lives.
        let mut tasks = task::Tasks::default();
        let mut idle = park::Idle::default();
        loop {
            let mut fds = [PollFd::new(notify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, idle.poll_timeout(None)) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(container_id = %container, error = %e, "map guard: poll");
                    return Served::Done;
                }
                Ok(0) if idle.is_over() => return Served::Quiet,
                Ok(0) => continue,
                Ok(_) => {}
            }
            let rev = fds[0].revents().unwrap_or(PollFlags::POLLHUP);
            if !rev.contains(PollFlags::POLLIN) {
                // POLLHUP: every task of this filter is gone.
                return Served::Done;
            }
            let Some(engine) = self.engine.upgrade() else {
                return Served::Stopping;
            };
            // imacri is stopping: what is not received yet waits in the
            // kernel (the keeper holds the listener) for the next imacri.
            let Some(_reading) = engine.reading() else {
                return Served::Stopping;
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
                        return Served::Done;
                    }
                }
            }
            if let Some(i) = &self.ids {
                i.record(req.id);
            }
            // A loop of guarded calls costs the pod's CPU, not the node's
            // (moves once the pod's uncharged budget is spent; a check of a
            // pointer after that).
            if let Some(t) = engine.target(container) {
                charge::work_for(t.charge.as_ref());
            }
            listener.handle(&engine, &mut tasks, &req);
            idle.worked();
        }
    }
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
