//! Facts about this node that specs and Status depend on.

use std::path::Path;

/// imacri's own oom_score_adj: without CAP_SYS_RESOURCE nothing we start may
/// go lower (containerd's restrict_oom_score_adj).
pub fn own_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// v2 when /sys/fs/cgroup itself is cgroup2 (unified); hybrid counts as v1.
pub fn cgroup_version() -> CgroupVersion {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// The capability bounding set of this process (CapBnd in /proc/self/status).
pub fn cap_bounding() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// Whether AppArmor is enabled on this node.
pub fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

/// Whether the hugetlb cgroup controller is available to containers.
pub fn hugetlb_controller() -> bool {
    match cgroup_version() {
        CgroupVersion::V1 => Path::new("/sys/fs/cgroup/hugetlb").exists(),
        CgroupVersion::V2 => std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "hugetlb")),
    }
}

/// The shim ima pods run under: containerd's runc v2 shim, whose task pid
/// is the container's init on this host.
pub const IMA_SHIM: &str = "io.containerd.runc.v2";

/// Whether a runtime handler can run ima pods: the runc v2 shim with runc
/// itself (`<binary> --version` says so), the runtime whose behaviour
/// their guards are built on and tested against (the seccomp listener
/// handed over or the create failed, devices in a user namespace, recursive
/// mount attributes, the task's init being the container's first process
/// on this host). Another runtime (crun, runsc, a VM's shim) may do any of
/// these differently: a VM's or a sandbox's shim reports a host process
/// whose root is no container's, so the marks would watch the wrong
/// filesystem. Ok: runc's version line; Err: why not.
pub fn ima_runtime(runtime_type: &str, binary: &str) -> Result<String, String> {
    if runtime_type != IMA_SHIM {
        return Err(format!("its shim is {runtime_type}, not {IMA_SHIM}"));
    }
    let bin = if binary.is_empty() { "runc" } else { binary };
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{bin} --version: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default().trim().to_string();
    if out.status.success() && first.starts_with("runc version ") {
        Ok(first)
    } else {
        Err(format!("its runtime {bin} is not runc ({first:?})"))
    }
}

/// Mount options an OCI runtime binary says it understands (`<binary>
/// features`, runtime-spec features.md); empty when it cannot say.
pub fn runtime_mount_options(binary: &str) -> Vec<String> {
    let bin = if binary.is_empty() { "runc" } else { binary };
    std::process::Command::new(bin)
        .arg("features")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| {
            v.get("mountOptions")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether the kernel makes a mount tree read-only recursively
/// (`mount_setattr(MOUNT_ATTR_RDONLY, AT_RECURSIVE)`, Linux 5.12), tried on
/// a detached clone of `dir` so nothing visible changes.
pub fn kernel_recursive_readonly(dir: &Path) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: u64 = 1;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: open_tree returned a new fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = crate::mount::MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = std::ffi::CString::default();
    // SAFETY: valid fd, C string and struct.
    unsafe {
        crate::mount::mount_setattr(
            fd.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr,
        ) == 0
    }
}

/// Whether this node can create a user namespace with a mapping (a pinned
/// one under `scratch`, removed again).
pub fn user_namespaces(scratch: &Path) -> bool {
    let d = scratch.join(format!("userns-probe-{}", std::process::id()));
    let ok = crate::userns::create(
        &d,
        "probe",
        &crate::userns::Mappings::range(800_000, 65536),
        false,
    )
    .and_then(|ns| crate::userns::remove(&ns))
    .is_ok();
    let _ = std::fs::remove_dir_all(&d);
    ok
}

/// The host's device nodes under `dev` for a privileged container, as
/// runc's GetDevices walks them: char and block devices, skipping the
/// per-container trees (pts, shm, fd, mqueue) and the console.
pub fn host_devices(dev: &Path) -> Vec<oci_spec::runtime::LinuxDevice> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    const SKIP: [&str; 7] = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
    let mut out = Vec::new();
    let mut stack = vec![dev.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let ft = m.file_type();
            if ft.is_dir() {
                if !SKIP.contains(&name.as_ref()) {
                    stack.push(e.path());
                }
                continue;
            }
            let typ = if ft.is_char_device() {
                oci_spec::runtime::LinuxDeviceType::C
            } else if ft.is_block_device() {
                oci_spec::runtime::LinuxDeviceType::B
            } else {
                continue;
            };
            if name == "console" {
                continue;
            }
            let rdev = m.rdev();
            if let Ok(d) = oci_spec::runtime::LinuxDeviceBuilder::default()
                .path(e.path())
                .typ(typ)
                .major(i64::from(nix::sys::stat::major(rdev) as u32))
                .minor(i64::from(nix::sys::stat::minor(rdev) as u32))
                .file_mode(m.mode() & 0o777)
                .uid(m.uid())
                .gid(m.gid())
                .build()
            {
                out.push(d);
            }
        }
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

/// Whether CRIU can checkpoint on this node (`criu check`); Err carries
/// CRIU's own first error line.
pub fn criu_check() -> Result<(), String> {
    let out = std::process::Command::new("criu")
        .arg("check")
        .output()
        .map_err(|e| format!("criu: {e} (apt-get install criu)"))?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Err(text
        .lines()
        .find(|l| l.contains("Error"))
        .or_else(|| text.lines().next())
        .unwrap_or("failed")
        .trim()
        .to_string())
}

/// Why `runc exec` may give an exec'd process a wrong RLIMIT_NOFILE soft
/// limit, from `runc --version` output; None when this runc is not affected.
///
/// runc before 1.1.13 built with Go 1.19 or later sets an exec's rlimits
/// with prlimit(2) from the parent while the child's Go runtime is raising
/// its own soft NOFILE limit to the hard one (opencontainers/runc#4195, fixed
/// by #4265 in 1.1.13): once in a while an exec sees soft = hard. The
/// container's own process is not affected (runc sets those in the child).
pub fn runc_exec_nofile_race(version_output: &str) -> Option<String> {
    let field = |key: &str| {
        version_output
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let numbers = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .take(3)
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let runc = numbers(field("runc version")?);
    let go = numbers(field("go:")?.trim_start_matches("go"));
    let affected_runc = runc.len() == 3 && (runc[0], runc[1], runc[2]) < (1, 1, 13);
    let raising_go = go.len() >= 2 && (go[0], go[1]) >= (1, 19);
    (affected_runc && raising_go).then(|| {
        format!(
            "runc {} built with go{}: an exec's RLIMIT_NOFILE soft limit is now and then \
             raised to its hard limit (opencontainers/runc#4195, fixed in runc 1.1.13)",
            runc.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("."),
            go.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runc_under_the_runc_shim_runs_ima_pods() {
        use std::os::unix::fs::PermissionsExt;
        let v = ima_runtime(IMA_SHIM, "").expect("runc is installed here");
        assert!(v.starts_with("runc version "), "{v}");
        let e = ima_runtime("io.containerd.kata.v2", "").unwrap_err();
        assert!(e.contains("io.containerd.kata.v2"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let other = d.path().join("other");
        std::fs::write(&other, "#!/bin/sh\necho \"crun version 1.8.1\"\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ima_runtime(IMA_SHIM, other.to_str().unwrap()).unwrap_err();
        assert!(e.contains("is not runc (\"crun version 1.8.1\")"), "{e}");
        let e = ima_runtime(IMA_SHIM, "/nonexistent/runtime").unwrap_err();
        assert!(e.contains("/nonexistent/runtime --version"), "{e}");
    }

    #[test]
    fn node_facts_here() {
        // This workplace's runc 1.1.5 lists "rro"; a missing binary lists nothing.
        assert!(runtime_mount_options("").iter().any(|o| o == "rro"));
        assert!(runtime_mount_options("/nonexistent/runc").is_empty());
        if nix::unistd::geteuid().is_root() {
            let d = tempfile::tempdir().unwrap();
            assert!(kernel_recursive_readonly(d.path()));
            assert!(user_namespaces(d.path()));
            let devs = host_devices(Path::new("/dev"));
            let null = devs
                .iter()
                .find(|d| d.path() == Path::new("/dev/null"))
                .unwrap();
            assert_eq!((null.major(), null.minor()), (1, 3));
            assert!(!devs.iter().any(|d| d.path().starts_with("/dev/pts")));
        }
    }

    #[test]
    fn runc_exec_nofile_race_by_version() {
        let here = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4\n";
        let why = runc_exec_nofile_race(here).unwrap();
        assert!(why.contains("runc 1.1.5 built with go1.19.8"), "{why}");
        let fixed = here.replace("1.1.5+ds1\n", "1.1.13\n");
        assert_eq!(runc_exec_nofile_race(&fixed), None);
        assert_eq!(
            runc_exec_nofile_race(&here.replace("go1.19.8", "go1.17.13")),
            None
        );
        assert_eq!(
            runc_exec_nofile_race("runc version 1.2.0\ngo: go1.22.4\n"),
            None
        );
        assert_eq!(runc_exec_nofile_race("garbage"), None);
    }
}
