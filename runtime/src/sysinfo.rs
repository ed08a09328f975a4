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
