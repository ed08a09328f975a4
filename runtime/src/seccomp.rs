//! Seccomp profiles: the runtime default (an allowlist equivalent to
//! containerd's/Docker's default: everything a normal workload needs, no
//! kernel-module, mount, namespace, reboot, clock or keyring calls unless
//! the matching capability is granted), Localhost profiles (OCI JSON), and
//! Unconfined.

use imacri_api::cri;
use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use std::collections::HashSet;
use std::path::Path;

use crate::{Error, Result};

/// Allowed for every container.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_getfd",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// Allowed only with a capability.
const BY_CAPABILITY: &[(Capability, &[&str])] = &[
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &["get_mempolicy", "mbind", "set_mempolicy"],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
    (Capability::DacReadSearch, &["open_by_handle_at"]),
];

/// Namespace flags a container without CAP_SYS_ADMIN may not pass to clone.
const CLONE_NS_FLAGS: u64 = 0x7E02_0000;

fn rule(names: &[&str], action: LinuxSeccompAction) -> Result<LinuxSyscall> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(action)
        .build()
        .map_err(|e| Error::Internal(format!("seccomp rule: {e}")))
}

/// The runtime default profile for a container with `caps`.
pub fn runtime_default(caps: &HashSet<Capability>) -> Result<LinuxSeccomp> {
    let mut allowed: Vec<&str> = ALLOWED.to_vec();
    for (cap, names) in BY_CAPABILITY {
        if caps.contains(cap) {
            allowed.extend_from_slice(names);
        }
    }
    allowed.sort();
    allowed.dedup();
    let mut syscalls = vec![rule(&allowed, LinuxSeccompAction::ScmpActAllow)?];
    // socket: everything but AF_VSOCK? Keep it simple and allowed.
    syscalls.push(rule(&["socket"], LinuxSeccompAction::ScmpActAllow)?);
    // personality: only the harmless values.
    for v in [0x0u64, 0x0008, 0x20000, 0x20008, 0xffff_ffff] {
        let mut r = rule(&["personality"], LinuxSeccompAction::ScmpActAllow)?;
        r.set_args(Some(vec![LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(v)
            .op(LinuxSeccompOperator::ScmpCmpEq)
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?]));
        syscalls.push(r);
    }
    if !caps.contains(&Capability::SysAdmin) {
        // clone without namespace flags; clone3 cannot be filtered by flags,
        // so it fails with ENOSYS and libc falls back to clone.
        let mut c = rule(&["clone"], LinuxSeccompAction::ScmpActAllow)?;
        c.set_args(Some(vec![LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(CLONE_NS_FLAGS)
            .value_two(0u64)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?]));
        syscalls.push(c);
        let mut c3 = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno)?;
        c3.set_errno_ret(Some(libc::ENOSYS as u32));
        syscalls.push(c3);
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
        .map_err(|e| Error::Internal(format!("seccomp profile: {e}")))
}

/// The profile a CRI security profile asks for; None = unconfined.
pub fn profile(
    field: &str,
    p: Option<&cri::SecurityProfile>,
    legacy_path: &str,
    caps: &HashSet<Capability>,
) -> Result<Option<LinuxSeccomp>> {
    use cri::security_profile::ProfileType;
    let (kind, reference) = match (p, legacy_path) {
        (Some(p), _) => (
            ProfileType::try_from(p.profile_type).map_err(|_| {
                Error::InvalidArgument(format!(
                    "{field}.profile_type {} is unknown",
                    p.profile_type
                ))
            })?,
            p.localhost_ref.clone(),
        ),
        (None, "" | "unconfined") => return Ok(None),
        (None, "runtime/default" | "docker/default") => {
            (ProfileType::RuntimeDefault, String::new())
        }
        (None, l) => match l.strip_prefix("localhost/") {
            Some(path) => (ProfileType::Localhost, path.to_string()),
            None => {
                return Err(Error::InvalidArgument(format!(
                "seccomp_profile_path {l:?}: use runtime/default, unconfined or localhost/<path>"
            )))
            }
        },
    };
    match kind {
        ProfileType::Unconfined => Ok(None),
        ProfileType::RuntimeDefault => runtime_default(caps).map(Some),
        ProfileType::Localhost => {
            let path = Path::new(&reference);
            if !path.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "{field}.localhost_ref {reference:?} must be an absolute path"
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::InvalidArgument(format!("{field}.localhost_ref {reference:?}: {e}"))
            })?;
            serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{field}.localhost_ref {reference:?} is not an OCI seccomp profile: {e}"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &LinuxSeccomp) -> Vec<String> {
        s.syscalls()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow && r.args().is_none())
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn default_denies_privileged_calls_unless_capable() {
        let plain = runtime_default(&HashSet::new()).unwrap();
        let n = names(&plain);
        assert!(n.contains(&"read".to_string()) && n.contains(&"execve".to_string()));
        for denied in [
            "mount",
            "unshare",
            "setns",
            "reboot",
            "init_module",
            "kexec_load",
            "add_key",
            "ptrace",
            "bpf",
        ] {
            assert!(!n.contains(&denied.to_string()), "{denied} allowed");
        }
        assert_eq!(plain.default_action(), LinuxSeccompAction::ScmpActErrno);
        let admin = runtime_default(&HashSet::from([
            Capability::SysAdmin,
            Capability::SysPtrace,
        ]))
        .unwrap();
        let n = names(&admin);
        assert!(n.contains(&"mount".to_string()) && n.contains(&"ptrace".to_string()));
    }

    #[test]
    fn cri_profiles() {
        use cri::security_profile::ProfileType;
        let caps = HashSet::new();
        assert!(profile("s", None, "", &caps).unwrap().is_none());
        let rd = cri::SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        };
        assert!(profile("s", Some(&rd), "", &caps).unwrap().is_some());
        let un = cri::SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        };
        assert!(profile("s", Some(&un), "", &caps).unwrap().is_none());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.json");
        std::fs::write(&f, r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#).unwrap();
        let lh = cri::SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: f.to_string_lossy().into(),
        };
        let p = profile("s", Some(&lh), "", &caps).unwrap().unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let rel = cri::SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: "p.json".into(),
        };
        assert!(profile("s", Some(&rel), "", &caps)
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(profile("s", None, "localhost/nope.json", &caps).is_err());
    }
}
