//! The fanotify source of the measurement engine: executions (and, per
//! policy, reads) of an ima pod's containers, on kernels without IMA
//! namespaces.
//!
//! One fanotify group per container, marked with `FAN_MARK_FILESYSTEM` on the
//! container's root (`/proc/<init pid>/root` once the task exists and before
//! it starts): each overlay rootfs is its own superblock, so the mark sees
//! exactly that container's accesses, through whichever mount namespace they
//! come (another container's `/proc/<pid>/root` included). A group per
//! container also means an event needs no lookup to know whose it is.
//!
//! Each group has a reader thread that hands regular files to the
//! [`Engine`]. A second group per container asks for `FAN_CLOSE_WRITE`
//! where the digest cache needs it, so a file written in the container
//! loses its cached digest (the cache key also carries mtime/ctime;
//! `closes.rs`).
//!
//! Executable *mappings* (`mmap`/`mprotect` with PROT_EXEC), which fanotify
//! cannot see, come from the seccomp map guard (`mapguard`) into the same
//! engine: no open of a library is guessed to be a mapping.
//!
//! If imacri dies, the kernel answers the group's pending events with "allow"
//! when the group's fd closes and stops sending events: fanotify fails open.
//! A restarted imacri re-marks every running container and logs a `gap` entry
//! for it, so the unmeasured interval is visible to the verifier.
//!
//! Execution from anywhere but the rootfs is refused by the spec: every other
//! mount of a container in a fanotify-measured pod (volumes, /dev, tmpfs) is
//! mounted `noexec` (see `spec::noexec_outside_rootfs`), except volumes
//! under `volumes = "measure"`, which are marked too (`volumes.rs`).

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use super::digest::FileKey;
use super::engine::{Engine, Measured};

pub mod closes;
pub mod groups;
mod held;
mod inpod;
mod leases;
mod loader;
mod pending;
mod readback;
mod reader;
mod share;
mod sweep;
mod volumes;
mod window;
mod writes;
use super::keeper::{self, Keeper};
use super::log::Event;
use crate::integrity::policy::Rule;
pub use held::needs_holding;
pub use leases::probe as lease_probe;
pub use pending::deny_errno_probe;
pub use share::{held_share, share_of, FULL_NODE_NEED, PER_POD as LEASES_PER_POD};
use volumes::container_mount;
pub use volumes::{mount_markable_view, own_tmpfs_view, volume_mark, MountedVolume, VolumeMark};

#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error(
        "fanotify_init: {0} (needs CAP_SYS_ADMIN and a kernel with fanotify permission events)"
    )]
    Init(nix::Error),
    #[error(
        "fanotify_init: EMFILE: the node's fanotify groups are used up (fs.fanotify.max_user_groups = {limit}; one or two per measured container that runs) or imacri's open files are; raise ima.fanotify_groups in imacri's config (applied at its start) or the sysctl"
    )]
    Groups { limit: String },
    #[error("fanotify_mark on {path}: {source}")]
    Mark { path: PathBuf, source: nix::Error },
    #[error("starting the fanotify reader: {0}")]
    Thread(std::io::Error),
    #[error("the container's mount of a volume at {path} cannot be marked: {why}")]
    VolumeMount { path: PathBuf, why: String },
}

/// What the pod's policy asks fanotify to measure. Executions and
/// executable mappings are always measured in an ima pod (the map guard
/// takes the mappings); the policy adds reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggers {
    /// Executions (BPRM_CHECK): always on.
    pub exec: bool,
    /// Opens for reading (FILE_CHECK): by anyone (`Some(None)`) or only by
    /// these openers (any of them: one per rule).
    pub read: Option<Option<Vec<Opener>>>,
}

/// A FILE_CHECK rule's condition on who opens: as IMA, `uid=` is the
/// opening thread's real uid, `euid=` its effective uid (host uids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opener {
    pub uid: u32,
    pub effective: bool,
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers {
            exec: true,
            read: None,
        }
    }
}

impl Triggers {
    /// Compiles the policy's `measure` rules; `to_host` maps an in-pod uid
    /// (a rule's `uid=`/`euid=`) to the host uid the kernel reports.
    pub fn from_rules(rules: &[Rule], to_host: impl Fn(u32) -> u32) -> Triggers {
        let mut t = Triggers::default();
        for r in rules.iter().filter(|r| r.action == "measure") {
            match r.condition("func") {
                Some("FILE_CHECK") => {
                    let opener = |key: &str, effective: bool| {
                        r.condition(key)
                            .and_then(|v| v.parse().ok())
                            .map(|u| Opener {
                                uid: to_host(u),
                                effective,
                            })
                    };
                    // Rules add up: a rule for anyone wins over rules for
                    // some openers.
                    let this = opener("euid", true).or_else(|| opener("uid", false));
                    t.read = match (t.read.take(), this) {
                        (Some(None), _) | (_, None) => Some(None),
                        (Some(Some(mut v)), Some(o)) => {
                            v.push(o);
                            Some(Some(v))
                        }
                        (None, Some(o)) => Some(Some(vec![o])),
                    };
                }
                None => t.read = Some(None),
                _ => {}
            }
        }
        t
    }

    /// What the container's group asks of its filesystems (closes after
    /// writing come through a group of their own, `closes.rs`).
    fn mask(&self) -> MaskFlags {
        let mut m = MaskFlags::FAN_OPEN_EXEC_PERM;
        if self.read.is_some() {
            m |= MaskFlags::FAN_OPEN_PERM;
        }
        m
    }
}

/// One container to measure.
#[derive(Debug, Clone)]
pub struct Target {
    pub measured: Arc<Measured>,
    /// The container's root as the host sees it: `/proc/<pid>/root`.
    pub root: PathBuf,
    pub triggers: Triggers,
    /// Volumes measured like the rootfs (each a filesystem of its own).
    pub volumes: Vec<PathBuf>,
    /// Every other executable volume: the container's own mount of each is
    /// marked (`volumes.rs`).
    pub mounted: Vec<MountedVolume>,
    /// imacri's init as the host reaches it in the container
    /// (`/proc/<pid>/root/dev/.imacri-init`): its bind mount is marked for
    /// executions (a mount mark: the file is on a host filesystem).
    pub init: Option<PathBuf>,
}

struct Group {
    fan: Fanotify,
    target: Target,
    /// Where an event being hashed is handed over, so that the next imacri
    /// measures it if this one dies meanwhile.
    keeper: Option<Keeper>,
    /// The kernel sends an execve's open as two events, FAN_OPEN_EXEC_PERM
    /// then FAN_OPEN_PERM (the second only after the first is allowed): the
    /// open that follows an *allowed* exec of the same file by the same task
    /// is the exec itself, not a read. Only an answered "allow" sets it.
    last_exec: Mutex<Option<(i32, FileKey)>>,
    /// Tasks loading the interpreter of a program they were allowed to
    /// execute (`loader.rs`).
    loading: loader::Loading,
    /// Executions between their answer and the kernel's writers check
    /// (`window.rs`).
    windows: window::Windows,
    /// Closes after writing on its filesystems, for the digest cache
    /// (`closes.rs`; None where none needs them).
    closes: Option<closes::Closes>,
    /// Files mapped executable in the container, watched for writers
    /// (inode marks, `writes::WATCHED`, and read leases).
    mapped: Mutex<writes::WatchedFiles>,
    /// Overlay files the container mapped shared and writable, held open
    /// for writing while it runs (`held.rs`).
    held: Mutex<held::HeldFiles>,
    /// How many watches the table had when a sweep was last made for the
    /// pod's lease limit (`sweep.rs`).
    swept_at: std::sync::atomic::AtomicUsize,
    /// This group, for the leases to call back (they must not keep it).
    me: Weak<Group>,
    engine: Weak<Engine>,
}

impl Drop for Group {
    fn drop(&mut self) {
        tracing::debug!(container_id = %self.target.measured.container, "fanotify group closed");
    }
}

/// A container's group as the last imacri left it with the keeper, with
/// the events it was measuring.
pub struct KeptGroup {
    pub group: OwnedFd,
    pub events: Vec<keeper::KeptEvent>,
    /// Read leases on its watched files, by the keeper's key.
    pub leases: Vec<(String, OwnedFd)>,
    /// Files it held open for writing, by the keeper's key.
    pub held: Vec<(String, OwnedFd)>,
}

/// A running watch; dropping it stops measuring (the group closes, and
/// the keeper's copy with it).
pub struct Watch {
    stop: Option<OwnedFd>,
    /// Hangs up when the reader ends (its last thread, parked or not).
    ended: Option<std::sync::mpsc::Receiver<()>>,
    engine: Arc<Engine>,
    container: String,
    kept: Option<(Keeper, String)>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.engine.unregister(&self.container);
        if let Some((k, key)) = self.kept.take().filter(|_| !self.engine.detached()) {
            if let Err(e) = k.drop_key(&key) {
                // It notices the marks going with the container's filesystems.
                tracing::debug!(container_id = %self.container, error = %e, "fd keeper: fanotify group not dropped");
            }
        }
        // Closing the pipe's write end wakes the reader (a parked one is
        // started for it), which closes the group.
        self.stop.take();
        // Waited for when it ends at once (the usual case). A reader waiting
        // for room in its pod's hash queue ends by itself once it gets it;
        // the caller (a task of the server's runtime) must not wait for a
        // pod that keeps its queue full.
        if let Some(ended) = self.ended.take() {
            use std::sync::mpsc::RecvTimeoutError;
            // Disconnected as the reader lets go of its sender.
            let waited = ended.recv_timeout(std::time::Duration::from_millis(200));
            if waited == Err(RecvTimeoutError::Timeout) {
                tracing::debug!(container_id = %self.container, "fanotify reader still waiting for queue room; it ends by itself");
            }
        }
    }
}

/// Probes whether this node can run the backend (root, permission events,
/// filesystem marks).
pub fn probe() -> Result<(), String> {
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )
    .map_err(|e| format!("fanotify permission events are unavailable: {e}"))?;
    fan.mark(
        MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
        MaskFlags::FAN_OPEN_EXEC_PERM,
        None,
        Some("/proc/self/root"),
    )
    .map_err(|e| format!("fanotify filesystem marks with FAN_OPEN_EXEC_PERM are unavailable: {e}"))
}

/// Marks the container's filesystem and starts answering its events; the
/// container is registered with the engine for its other sources. With
/// `keeper`, a copy of the group is kept there before any of the
/// container's processes run, so its executions wait while imacri is down.
pub fn watch(
    engine: &Arc<Engine>,
    target: Target,
    keeper: Option<&Keeper>,
) -> Result<Watch, FanotifyError> {
    // FAN_REPORT_TID: an event names the thread that opened the file, whose
    // credentials a `uid=` rule is about (a thread's can differ from its
    // process leader's: a raw setresuid changes the caller's only).
    // O_NONBLOCK for the fds the kernel opens for us: an open waits for a
    // write lease's holder (up to fs.lease-break-time, 45 s), so a process
    // leasing its file would stall this reader (and whoever joins it). The
    // kernel instead fails the open, denies that event and reads on
    // (EWOULDBLOCK: the read loop's EAGAIN).
    // FAN_CLASS_PRE_CONTENT: the class whose answers may carry an errno
    // (an execution refused as the kernel refuses it, `refuse`).
    // FAN_UNLIMITED_MARKS: the group's marks do not count against root's
    // `fs.fanotify.max_user_marks`, which every measured container shared:
    // pods that filled it (50 containers at `ima.max_watched_files` here)
    // had every other pod's new mappings refused. Each container's own
    // limit bounds its marks instead (`writes.rs`).
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_PRE_CONTENT
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE
            | InitFlags::FAN_UNLIMITED_MARKS
            | InitFlags::FAN_REPORT_TID,
        EventFFlags::O_RDONLY
            | EventFFlags::O_LARGEFILE
            | EventFFlags::O_CLOEXEC
            | EventFFlags::O_NONBLOCK,
    )
    .map_err(init_failed)?;
    for path in std::iter::once(&target.root).chain(&target.volumes) {
        mark_path(
            &fan,
            MarkFlags::FAN_MARK_FILESYSTEM,
            target.triggers.mask(),
            path,
        )?;
    }
    let mut marked = std::collections::HashSet::new();
    for v in &target.mounted {
        let (fd, mount) = container_mount(&target.root, v)?;
        if !marked.insert(mount) {
            return Err(FanotifyError::VolumeMount {
                path: target.root.join(v.dest.trim_start_matches('/')),
                why: "another volume destination leads to the same mount".into(),
            });
        }
        // Through the O_PATH fd's link: fanotify_mark takes no O_PATH fd
        // (EBADF), and opening the volume's root could block or act (a
        // FIFO, a leased file).
        let at = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
            target.triggers.mask(),
            None,
            Some(&at),
        )
        .map_err(|source| FanotifyError::Mark {
            path: target.root.join(v.dest.trim_start_matches('/')),
            source,
        })?;
    }
    if let Some(init) = &target.init {
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
            MaskFlags::FAN_OPEN_EXEC_PERM,
            None,
            Some(init),
        )
        .map_err(|source| FanotifyError::Mark {
            path: init.clone(),
            source,
        })?;
    }
    let kept = keeper.and_then(|k| {
        let key = format!("{}{}", keeper::FANOTIFY, target.measured.container);
        match k.put(&key, fan.as_fd()) {
            Ok(()) => Some((k.clone(), key)),
            Err(e) => {
                tracing::warn!(container_id = %target.measured.container, error = %e, "fd keeper: fanotify group not kept; while imacri is down the container runs unmeasured");
                None
            }
        }
    });
    let key = kept.as_ref().map(|(k, key)| (k.clone(), key.clone()));
    start(
        engine,
        fan,
        target,
        kept,
        Vec::new(),
        Vec::new(),
        Vec::new(),
    )
    .inspect_err(|_| {
        if let Some((k, key)) = key {
            let _ = k.drop_key(&key);
        }
    })
}

/// Adds a mark (`how`: its kind) asking for `mask` on `path`.
fn mark_path(
    fan: &Fanotify,
    how: MarkFlags,
    mask: MaskFlags,
    path: &std::path::Path,
) -> Result<(), FanotifyError> {
    fan.mark(MarkFlags::FAN_MARK_ADD | how, mask, None, Some(path))
        .map_err(|source| FanotifyError::Mark {
            path: path.to_path_buf(),
            source,
        })
}

/// Why `fanotify_init` failed: past the node's groups (EMFILE), named.
fn init_failed(e: nix::Error) -> FanotifyError {
    match e {
        nix::Error::EMFILE => FanotifyError::Groups {
            limit: groups::limit(std::path::Path::new(groups::SYSCTL))
                .map_or_else(|e| format!("unreadable: {e}"), |n| n.to_string()),
        },
        e => FanotifyError::Init(e),
    }
}

/// After a restart: takes back a container's group from the keeper. Its
/// marks are in place and its queued events waited for us. The events the
/// last imacri read but never answered are denied first (their tasks get
/// EPERM: nothing measured them), because the kernel matches answers by fd
/// number and one of ours could otherwise answer an old event; those it
/// handed to the keeper while hashing them are measured now instead, before
/// anything new is read.
pub fn adopt(
    engine: &Arc<Engine>,
    target: Target,
    kept_group: KeptGroup,
    keeper: &Keeper,
) -> Result<(Watch, usize), FanotifyError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let KeptGroup {
        group,
        events,
        leases,
        held,
    } = kept_group;
    // SAFETY: the keeper handed us a fanotify group fd we now own.
    let fan = unsafe { Fanotify::from_raw_fd(group.into_raw_fd()) };
    let numbers: Vec<i32> = events.iter().map(|e| e.number).collect();
    let denied = keeper::deny_unanswered(fan.as_fd(), &numbers);
    let key = format!("{}{}", keeper::FANOTIFY, target.measured.container);
    Ok((
        start(
            engine,
            fan,
            target,
            Some((keeper.clone(), key)),
            events,
            leases,
            held,
        )?,
        denied,
    ))
}

fn start(
    engine: &Arc<Engine>,
    fan: Fanotify,
    target: Target,
    kept: Option<(Keeper, String)>,
    events: Vec<keeper::KeptEvent>,
    leases: Vec<(String, OwnedFd)>,
    held: Vec<(String, OwnedFd)>,
) -> Result<Watch, FanotifyError> {
    let (stop_r, stop_w) = nix::unistd::pipe().map_err(|e| FanotifyError::Thread(e.into()))?;
    let container = target.measured.container.clone();
    let devices = std::iter::once(&target.root)
        .chain(&target.volumes)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .collect();
    engine.register(target.measured.clone(), devices);
    let closes = closes::Closes::open(&target).inspect_err(|_| engine.unregister(&container))?;
    let marked = readback::marked_inodes(fan.as_fd());
    let group = Arc::new_cyclic(|me| Group {
        fan,
        target,
        keeper: kept.as_ref().map(|(k, _)| k.clone()),
        last_exec: Mutex::new(None),
        loading: Default::default(),
        windows: Default::default(),
        closes,
        mapped: Mutex::new(Default::default()),
        held: Mutex::new(Default::default()),
        swept_at: Default::default(),
        me: me.clone(),
        engine: Arc::downgrade(engine),
    });
    readback::take_back(&group, marked, leases);
    held::take_back(&group, held);
    engine.set_write_watch(&container, group.clone());
    for event in events {
        let key = match nix::sys::stat::fstat(event.file.as_raw_fd()) {
            Ok(st) => FileKey::of(&st),
            Err(_) => {
                keeper::respond(group.fan.as_fd(), event.number, false);
                continue;
            }
        };
        let exec = event.access.is_exec();
        let kind = if exec { Event::Exec } else { Event::Read };
        let exec_of = exec.then_some((event.tid, key));
        tracing::info!(container_id = %container, number = event.number, "measuring an access the last imacri was measuring");
        // Held in the keeper until answered (`KeptPending` drops it): a
        // round that settles the keeper must not make it let go before.
        if let Some(k) = &group.keeper {
            let key = keeper::event_key(&container, event.number, event.access, event.tid);
            k.remember(&key, event.file.as_fd());
        }
        let pending = Box::new(pending::KeptPending {
            group: group.clone(),
            event,
            exec_of,
            names_interpreter: false,
        });
        engine.measure_now(group.target.measured.clone(), pending, key, kind);
    }
    let (ending, ended) = std::sync::mpsc::channel::<()>();
    let reader = reader::Reader {
        engine: engine.clone(),
        group,
        stop: stop_r,
        handled: 0,
        unopened: 0,
        _ending: ending,
    };
    reader::THREAD.start(move || reader.run()).map_err(|err| {
        engine.unregister(&container);
        FanotifyError::Thread(err)
    })?;
    Ok(Watch {
        stop: Some(stop_w),
        ended: Some(ended),
        engine: engine.clone(),
        container,
        kept,
    })
}

/// Whether task `tid` is one of `openers`.
fn opened_by(tid: i32, openers: &[Opener]) -> bool {
    let Some((real, effective)) = uids_of(tid) else {
        return false;
    };
    openers
        .iter()
        .any(|o| o.uid == if o.effective { effective } else { real })
}

/// Task `tid`'s real and effective uids.
fn uids_of(tid: i32) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    // "Uid:" real effective saved filesystem
    let mut f = line.split_whitespace().skip(1);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::policy::parse;

    #[test]
    fn uid_rules_read_the_real_or_the_effective_uid() {
        // SAFETY: plain getters.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        let me = std::process::id() as i32;
        assert_eq!(uids_of(me), Some((uid, euid)));
        let o = |uid, effective| Opener { uid, effective };
        assert!(opened_by(me, &[o(uid + 1, false), o(uid, false)]));
        assert!(opened_by(me, &[o(euid, true)]));
        assert!(!opened_by(me, &[o(uid + 1, false), o(euid + 1, true)]));
    }

    #[test]
    fn policy_rules_compile_to_triggers() {
        // Executions are always measured; mapping rules go to the map guard.
        let t = Triggers::from_rules(
            &parse("measure func=BPRM_CHECK mask=MAY_EXEC\nmeasure func=FILE_MMAP mask=MAY_EXEC\n")
                .unwrap(),
            |u| u,
        );
        assert_eq!(t, Triggers::default());
        assert_eq!(t.mask(), MaskFlags::FAN_OPEN_EXEC_PERM);
        let t = Triggers::from_rules(
            &parse("measure func=FILE_CHECK mask=^MAY_READ uid=0\ndont_measure func=BPRM_CHECK\n")
                .unwrap(),
            |u| u + 100000,
        );
        assert_eq!(
            t.read,
            Some(Some(vec![Opener {
                uid: 100000,
                effective: false
            }]))
        );
        let t = Triggers::from_rules(
            &parse(
                "measure func=FILE_CHECK mask=^MAY_READ euid=1000
",
            )
            .unwrap(),
            |u| u,
        );
        assert_eq!(
            t.read,
            Some(Some(vec![Opener {
                uid: 1000,
                effective: true
            }]))
        );
        // Every FILE_CHECK rule counts, not only the last.
        let t = Triggers::from_rules(
            &parse("measure func=FILE_CHECK uid=0\nmeasure func=FILE_CHECK euid=1000\n").unwrap(),
            |u| u,
        );
        assert_eq!(
            t.read,
            Some(Some(vec![
                Opener {
                    uid: 0,
                    effective: false
                },
                Opener {
                    uid: 1000,
                    effective: true
                }
            ]))
        );
        // A rule for anyone covers the others, in either order.
        for rules in [
            "measure func=FILE_CHECK uid=0\nmeasure func=FILE_CHECK\n",
            "measure func=FILE_CHECK\nmeasure func=FILE_CHECK uid=0\n",
        ] {
            let t = Triggers::from_rules(&parse(rules).unwrap(), |u| u);
            assert_eq!(t.read, Some(None), "{rules}");
        }
        assert!(t.exec, "executions cannot be switched off in an ima pod");
        assert!(t.mask().contains(MaskFlags::FAN_OPEN_PERM));
    }
}
