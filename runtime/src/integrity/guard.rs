//! What the fanotify engine cannot see is made impossible in ima pods
//! (issue 9). fanotify marks the filesystems of a container's rootfs and its
//! measured volumes; two ways around that need no file on those:
//!
//! - a memfd (`memfd_create` + `execveat`/`fexecve`) lives on the kernel's
//!   internal shm mount. `vm.memfd_noexec = 2` forbids executable memfds; it
//!   is per pid namespace (Linux >= 6.3), inherited by child namespaces and
//!   cannot be lowered, so it is written into each pid namespace of the pod.
//! - a nested user namespace gives in-pod root a mount namespace of its own
//!   and so a fresh, unmarked tmpfs. `user.max_user_namespaces = 0` in the
//!   pod's user namespace makes nested ones fail (ENOSPC); raising it back
//!   needs CAP_SYS_RESOURCE there, which ima pods are refused (see
//!   `FORBIDDEN_CAPABILITIES`), as is CAP_SYS_ADMIN (mounts).
//!
//! - an interpreter the node registered with binfmt_misc's `F` flag was
//!   opened when it was registered, with the registrant's credentials:
//!   executing a matching file in the pod runs that node file, which no
//!   mark of the pod covers and Landlock does not judge. Each ima pod's user
//!   namespace gets a binfmt_misc instance of its own (Linux >= 6.7), empty
//!   and out of the pod's reach (mounting one needs CAP_SYS_ADMIN), so the
//!   node's entries do not apply in the pod.
//!
//! Both sysctls are read from the writer's own namespaces (the pid namespace
//! it runs in, the user namespace it is in), not from a /proc mount, so a
//! short-lived helper is forked into the target pid namespace, joins the
//! pod's user namespace and writes them, before the container's entrypoint
//! (or the pause process) runs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// Capabilities an ima pod's containers may not add: each undoes a guard
/// (SYS_RESOURCE raises `max_user_namespaces`; SYS_ADMIN mounts an unmarked
/// filesystem), or reaches code outside the measurement (SYS_MODULE,
/// SYS_RAWIO, BPF, PERFMON; SYS_PTRACE rewrites other processes' code).
pub const FORBIDDEN_CAPABILITIES: &[&str] = &[
    "ALL",
    "SYS_ADMIN",
    "SYS_RESOURCE",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_PTRACE",
    "BPF",
    "PERFMON",
];

/// The capability in `caps` (CRI spelling, with or without `CAP_`) an ima
/// pod may not have, if any.
pub fn forbidden_capability(caps: &[String]) -> Option<&str> {
    caps.iter()
        .map(String::as_str)
        .find(|c| FORBIDDEN_CAPABILITIES.contains(&bare_capability(c).as_str()))
}

/// A capability's name as the spec builder reads it: any case, one `CAP_`
/// prefix or none (`cap_sys_admin` is SYS_ADMIN). The check above must read
/// names exactly so: it once stripped `CAP_` before upper-casing, and a
/// lowercase `cap_sys_admin` passed it and was granted.
pub fn bare_capability(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("opening the namespaces of pid {pid}: {source}")]
    Namespaces { pid: u32, source: std::io::Error },
    #[error("entering the pid namespace of pid {pid}: {source}")]
    EnterPid { pid: u32, source: nix::Error },
    #[error("forking the guard helper: {0}")]
    Fork(nix::Error),
    #[error("the guard helper failed to {step} (errno {errno}: {})", nix::errno::Errno::from_raw(*errno))]
    Helper { step: &'static str, errno: i32 },
    #[error("the guard helper ended abnormally: {0}")]
    Abnormal(String),
    #[error(
        "the node registered binfmt_misc interpreters that are opened in advance (flag F: {entries}), \
         which would run in the pod unmeasured, and this kernel cannot give the pod a binfmt_misc \
         of its own ({why}; Linux >= 6.7 can): remove those entries or their F flag"
    )]
    Binfmt { entries: String, why: String },
}

const MEMFD_NOEXEC: &str = "/proc/sys/vm/memfd_noexec";
const MAX_USER_NAMESPACES: &str = "/proc/sys/user/max_user_namespaces";

/// The steps of the helper; it exits with the failed step's number (1..)
/// and sends the errno through a pipe.
const STEPS: [&str; 8] = [
    "join the pod's user namespace",
    "open vm.memfd_noexec",
    "set vm.memfd_noexec = 2",
    "open user.max_user_namespaces",
    "set user.max_user_namespaces = 0",
    "create a mount namespace of the pod's user namespace",
    "open a binfmt_misc filesystem context",
    "give the pod's user namespace its own binfmt_misc",
];

/// The first step of the binfmt_misc part: a failure from there on means
/// the kernel cannot give a user namespace its own instance.
const BINFMT_STEP: usize = 6;

/// Which process of the pod `apply` guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The pod's first process (pause): its user namespace also gets its
    /// own binfmt_misc, once.
    Pod,
    /// A later pid namespace of the pod (a container with pid CONTAINER).
    PidNamespace,
    /// A pod without pause: only its user namespace (max_user_namespaces,
    /// its own binfmt_misc), before any of its processes exists; each of
    /// its containers has a pid namespace of its own, guarded as
    /// `PidNamespace`. `pid` is unused.
    UserNamespace,
}

/// Applies the guards to the pid namespace of `pid` (a container's init or
/// pause, created but not started) and to the user namespace pinned at
/// `userns`.
pub fn apply(pid: u32, userns: &Path, scope: Scope) -> Result<(), GuardError> {
    match apply_steps(pid, userns, scope) {
        Err(GuardError::Helper { step, errno }) if STEPS[BINFMT_STEP - 1..].contains(&step) => {
            // An older kernel (< 6.7) has one binfmt_misc for all user
            // namespaces. That is only a way out if the node registered an
            // interpreter with `F`; refuse the pod then, go on otherwise.
            match node_open_file_interpreters() {
                v if v.is_empty() => Ok(()),
                v => Err(GuardError::Binfmt {
                    entries: v.join(", "),
                    why: format!("{step}: {}", nix::errno::Errno::from_raw(errno)),
                }),
            }
        }
        r => r,
    }
}

fn apply_steps(pid: u32, userns: &Path, scope: Scope) -> Result<(), GuardError> {
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(OwnedFd::from)
            .map_err(|source| GuardError::Namespaces { pid, source })
    };
    if scope == Scope::UserNamespace {
        // No pid namespace to enter (imacri's own must keep its setting):
        // the helper joins the user namespace alone.
        let user = open(userns)?;
        let paths = helper_paths();
        let user_fd = user.as_raw_fd();
        // SAFETY: the child calls only setns/open/write/close/unshare/syscall/_exit.
        return fork_helper(&STEPS, |report| unsafe {
            helper(user_fd, &paths, Some(None), false, report)
        });
    }
    let pidns = open(&Path::new("/proc").join(pid.to_string()).join("ns/pid"))?;
    let user = open(userns)?;
    // The pod's first process already has a mount namespace of the pod's
    // user namespace: joining it is cheaper than copying imacri's mount
    // table into a new one (whose cost grows with the node's mounts).
    let mnt = match scope {
        Scope::Pod => open(&Path::new("/proc").join(pid.to_string()).join("ns/mnt")).ok(),
        Scope::PidNamespace | Scope::UserNamespace => None,
    };
    // A thread of its own enters the pid namespace (for its children only)
    // and forks the helper there; the thread then ends, so no other work
    // ever runs with that setting.
    std::thread::scope(|s| {
        s.spawn(|| run_helper(pid, &pidns, &user, mnt.as_ref(), scope))
            .join()
            .unwrap_or_else(|_| Err(GuardError::Abnormal("guard thread panicked".into())))
    })
}

/// Whether two processes are in one pid namespace (false when either is
/// gone, so the caller guards rather than skips).
pub fn same_pid_namespace(a: u32, b: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns =
        |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| (m.dev(), m.ino()));
    matches!((ns(a), ns(b)), (Ok(x), Ok(y)) if x == y)
}

fn run_helper(
    pid: u32,
    pidns: &OwnedFd,
    user: &OwnedFd,
    mnt: Option<&OwnedFd>,
    scope: Scope,
) -> Result<(), GuardError> {
    nix::sched::setns(pidns, nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|source| GuardError::EnterPid { pid, source })?;
    // Everything the child touches is prepared before fork: after it only
    // async-signal-safe calls run (this process has other threads).
    let paths = helper_paths();
    let user_fd = user.as_raw_fd();
    let mnt_fd = mnt.map(|m| m.as_raw_fd());
    // SAFETY: the child calls only setns/open/write/close/unshare/syscall/_exit.
    fork_helper(&STEPS, |report| unsafe {
        helper(
            user_fd,
            &paths,
            (scope == Scope::Pod).then_some(mnt_fd),
            true,
            report,
        )
    })
}

fn helper_paths() -> HelperPaths {
    HelperPaths {
        memfd: CString::new(MEMFD_NOEXEC).expect("static path"),
        maxns: CString::new(MAX_USER_NAMESPACES).expect("static path"),
        binfmt: CString::new("binfmt_misc").expect("static name"),
    }
}

struct HelperPaths {
    memfd: CString,
    maxns: CString,
    binfmt: CString,
}

/// Forks a single-threaded helper running `child` (async-signal-safe calls
/// only; a failed step is reported with [`fail`]) and waits for it.
fn fork_helper(steps: &[&'static str], child: impl FnOnce(i32)) -> Result<(), GuardError> {
    let (rd, wr) = nix::unistd::pipe().map_err(GuardError::Fork)?;
    let report = wr.as_raw_fd();
    // SAFETY: the child runs only `child`, which ends in _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(GuardError::Fork(nix::Error::last()));
    }
    if pid == 0 {
        child(report);
        // The helpers end in _exit; never run on in a copy of this process.
        unsafe { libc::_exit(127) }
    }
    drop(wr);
    reap(pid, &rd, steps)
}

/// In a forked helper: sends errno through `report` and exits with `step`.
unsafe fn fail(report: i32, step: i32) -> ! {
    let b = (*libc::__errno_location()).to_ne_bytes();
    libc::write(report, b.as_ptr().cast(), 4);
    libc::_exit(step)
}

/// The forked helper: in the target pid namespace, joins the pod's user
/// namespace and writes both sysctls; for the pod (`pod` is `Some`, with
/// the pod's mount namespace if it has one), also gives its user namespace
/// its own binfmt_misc. Never returns.
unsafe fn helper(
    user: i32,
    p: &HelperPaths,
    pod: Option<Option<i32>>,
    memfd: bool,
    report: i32,
) -> ! {
    let fail = |step: i32| -> ! { fail(report, step) };
    if libc::setns(user, libc::CLONE_NEWUSER) != 0 {
        fail(1);
    }
    // `max_user_namespaces` again for each pid namespace: the same user
    // namespace, so a no-op unless something raised it. vm.memfd_noexec
    // only where the helper runs in the pod's pid namespace.
    let sysctls = [(&p.memfd, b"2\n", 2), (&p.maxns, b"0\n", 4)];
    for (path, value, step) in sysctls.into_iter().skip(usize::from(!memfd)) {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            fail(step);
        }
        if libc::write(fd, value.as_ptr().cast(), value.len()) != value.len() as isize {
            fail(step + 1);
        }
        libc::close(fd);
    }
    if let Some(mnt) = pod {
        own_binfmt_misc(&p.binfmt, mnt, report, BINFMT_STEP as i32);
    }
    libc::_exit(0)
}

/// In a helper that joined a user namespace: creates (without mounting it
/// anywhere) a binfmt_misc superblock owned by that user namespace, which
/// makes the kernel look up formats there instead of in the node's
/// instance for good. Creating one needs CAP_SYS_ADMIN over a mount
/// namespace: `mnt` (one of the joined user namespace) or else a new one;
/// nothing is mounted in it, and the user namespace's instance stays.
/// Its three steps are reported as `step`, `step + 1` and `step + 2`.
unsafe fn own_binfmt_misc(name: &CString, mnt: Option<i32>, report: i32, step: i32) {
    let joined = mnt.is_some_and(|fd| libc::setns(fd, libc::CLONE_NEWNS) == 0);
    if !joined && libc::unshare(libc::CLONE_NEWNS) != 0 {
        fail(report, step);
    }
    let fs = libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC);
    if fs < 0 {
        fail(report, step + 1);
    }
    let fs = fs as libc::c_int;
    let create = libc::syscall(
        libc::SYS_fsconfig,
        fs,
        FSCONFIG_CMD_CREATE,
        std::ptr::null::<libc::c_char>(),
        std::ptr::null::<libc::c_void>(),
        0,
    );
    if create != 0 {
        fail(report, step + 2);
    }
    libc::close(fs);
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// The node's binfmt_misc entries that are enabled and opened in advance
/// (flag `F`), by name; empty when binfmt_misc is not mounted at its usual
/// place (entries then live only as long as some mount of it elsewhere).
pub fn node_open_file_interpreters() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/sys/fs/binfmt_misc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| !matches!(e.file_name().to_str(), Some("register" | "status")))
        .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|s| opens_in_advance(&s)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether a binfmt_misc entry's status text says enabled, with flag `F`.
fn opens_in_advance(status: &str) -> bool {
    let mut lines = status.lines();
    lines.next() == Some("enabled")
        && lines.any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')))
}

/// Makes the root mount of `pid`'s mount namespace `noexec` once `pid` has
/// settled: the pause container's rootfs holds only its pause binary, which
/// a container sharing the pod's pid namespace could otherwise run
/// unmeasured through `/proc/1/root`. runc's start returns before the exec,
/// and a dynamically linked pause maps its libraries after it, so this
/// waits (up to 5 s) until pause is blocked in a call that waits forever.
pub fn seal_root_noexec(pid: u32) -> Result<(), GuardError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match settled(pid) {
            Ok(true) => break,
            Ok(false) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Ok(false) => {
                return Err(GuardError::Abnormal(format!(
                    "pid {pid} did not settle into waiting within 5 s (is the sandbox image a pause program?)"
                )))
            }
            Err(source) => return Err(GuardError::Namespaces { pid, source }),
        }
    }
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map(OwnedFd::from)
        .map_err(|source| GuardError::Namespaces { pid, source })?;
    let root = CString::new("/").expect("static path");
    let mnt_fd = mnt.as_raw_fd();
    // SAFETY: the child calls only setns/mount_setattr/write/_exit.
    fork_helper(&SEAL_STEPS, |report| unsafe {
        seal_helper(mnt_fd, &root, report)
    })
}

/// Calls a pause program waits in forever (x86-64 numbers).
const WAITING: [libc::c_long; 12] = [
    libc::SYS_pause,
    libc::SYS_rt_sigsuspend,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_ppoll,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_wait4,
    libc::SYS_waitid,
];

/// Whether `pid` has exec'd its program (no longer runc's init) and is
/// blocked in one of the `WAITING` calls.
fn settled(pid: u32) -> std::io::Result<bool> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    if comm.starts_with("runc") {
        return Ok(false);
    }
    let sys = std::fs::read_to_string(format!("/proc/{pid}/syscall"))?;
    Ok(waiting_in(&sys))
}

/// `/proc/<pid>/syscall` says "running", or the number of the call the task
/// is blocked in followed by its arguments.
fn waiting_in(sys: &str) -> bool {
    sys.split_whitespace()
        .next()
        .and_then(|n| n.parse::<libc::c_long>().ok())
        .is_some_and(|n| WAITING.contains(&n))
}

const SEAL_STEPS: [&str; 2] = [
    "join the pause container's mount namespace",
    "set its root noexec",
];

unsafe fn seal_helper(mnt: i32, root: &CString, report: i32) -> ! {
    let fail = |step: i32| -> ! { fail(report, step) };
    if libc::setns(mnt, libc::CLONE_NEWNS) != 0 {
        fail(1);
    }
    use crate::mount::{mount_setattr, MountAttr, MOUNT_ATTR_NOEXEC};
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let r = mount_setattr(libc::AT_FDCWD, root.as_ptr(), 0, &attr);
    if r != 0 {
        fail(2);
    }
    libc::_exit(0)
}

/// Waits for a helper and turns its report into a result.
fn reap(child: i32, rd: &OwnedFd, steps: &[&'static str]) -> Result<(), GuardError> {
    let mut buf = [0u8; 8];
    let n = nix::unistd::read(rd.as_raw_fd(), &mut buf).unwrap_or(0);
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .map_err(|e| GuardError::Abnormal(e.to_string()))?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, step) if n == 4 => Err(GuardError::Helper {
            step: steps.get(step as usize - 1).copied().unwrap_or("?"),
            errno: i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]),
        }),
        other => Err(GuardError::Abnormal(format!("{other:?}"))),
    }
}

/// Whether this kernel gives a user namespace a binfmt_misc of its own
/// (6.7+): a throwaway child in a new user and mount namespace tries.
pub fn probe_binfmt() -> Result<(), String> {
    let name = CString::new("binfmt_misc").expect("static name");
    let steps = [
        "create a user namespace",
        STEPS[BINFMT_STEP - 1],
        STEPS[BINFMT_STEP],
        STEPS[BINFMT_STEP + 1],
    ];
    // SAFETY: the child calls only unshare/syscall/close/write/_exit.
    fork_helper(&steps, |report| unsafe {
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(report, 1);
        }
        own_binfmt_misc(&name, None, report, 2);
        libc::_exit(0)
    })
    .map_err(|e| e.to_string())
}

/// Whether this kernel has a per-pid-namespace `vm.memfd_noexec` (6.3+).
pub fn probe() -> Result<(), String> {
    if Path::new(MEMFD_NOEXEC).exists() {
        Ok(())
    } else {
        Err(format!(
            "{MEMFD_NOEXEC} is missing (Linux < 6.3): memfd execution cannot be forbidden"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_means_blocked_in_a_waiting_call() {
        assert!(waiting_in("34 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x4011"));
        assert!(waiting_in("230 0x0 0x0 0x7ffd 0x0 0x0 0x0 0x7ffd 0x7f00"));
        assert!(!waiting_in("running"));
        assert!(!waiting_in("9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffd 0x7f00"));
        // This test's own thread is running, not waiting.
        assert!(!settled(std::process::id()).unwrap());
    }

    #[test]
    fn forbidden_capabilities_in_any_spelling() {
        let caps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(forbidden_capability(&caps(&["NET_BIND_SERVICE"])), None);
        assert_eq!(
            forbidden_capability(&caps(&["CHOWN", "CAP_SYS_ADMIN"])),
            Some("CAP_SYS_ADMIN")
        );
        assert_eq!(
            forbidden_capability(&caps(&["sys_resource"])),
            Some("sys_resource")
        );
        assert_eq!(forbidden_capability(&caps(&["ALL"])), Some("ALL"));
        for spelt in [
            "cap_sys_admin",
            "Cap_Sys_Resource",
            "sys_ptrace",
            "all",
            "cAp_BPF",
        ] {
            assert_eq!(forbidden_capability(&caps(&[spelt])), Some(spelt));
        }
        // Not a capability the spec builder knows: refused there instead.
        assert_eq!(forbidden_capability(&caps(&["CAP_CAP_SYS_ADMIN"])), None);
    }

    #[test]
    fn entries_opened_in_advance_are_enabled_ones_with_flag_f() {
        let entry = |state: &str, flags: &str| {
            format!("{state}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\noffset 0\nmagic 7f454c46\n")
        };
        assert!(opens_in_advance(&entry("enabled", "POCF")));
        assert!(opens_in_advance(&entry("enabled", "F")));
        assert!(!opens_in_advance(&entry("enabled", "POC")));
        assert!(!opens_in_advance(&entry("enabled", "")));
        assert!(!opens_in_advance(&entry("disabled", "F")));
    }
}
