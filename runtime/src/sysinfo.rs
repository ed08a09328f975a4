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

/// Whether the hugetlb cgroup controller is available to containers.
pub fn hugetlb_controller() -> bool {
    match cgroup_version() {
        CgroupVersion::V1 => Path::new("/sys/fs/cgroup/hugetlb").exists(),
        CgroupVersion::V2 => std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "hugetlb")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_facts_here() {
        // This workplace's runc 1.1.5 lists "rro"; a missing binary lists nothing.
        assert!(runtime_mount_options("").iter().any(|o| o == "rro"));
        assert!(runtime_mount_options("/nonexistent/runc").is_empty());
        if nix::unistd::geteuid().is_root() {
            let d = tempfile::tempdir().unwrap();
            assert!(kernel_recursive_readonly(d.path()));
            assert!(user_namespaces(d.path()));
        }
    }
}
