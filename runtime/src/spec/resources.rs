//! Cgroup resources and paths.

use super::*;

/// Linux resources from CRI (container or pod-level).
pub fn resources(r: Option<&cri::LinuxContainerResources>) -> Result<LinuxResources> {
    let deny_all = oci(LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build())?;
    let mut b = LinuxResourcesBuilder::default().devices(vec![deny_all]);
    if let Some(r) = r {
        let mut cpu = LinuxCpuBuilder::default();
        let mut any_cpu = false;
        if r.cpu_period > 0 {
            cpu = cpu.period(r.cpu_period as u64);
            any_cpu = true;
        }
        if r.cpu_quota != 0 {
            cpu = cpu.quota(r.cpu_quota);
            any_cpu = true;
        }
        if r.cpu_shares > 0 {
            cpu = cpu.shares(r.cpu_shares as u64);
            any_cpu = true;
        }
        if !r.cpuset_cpus.is_empty() {
            cpu = cpu.cpus(r.cpuset_cpus.clone());
            any_cpu = true;
        }
        if !r.cpuset_mems.is_empty() {
            cpu = cpu.mems(r.cpuset_mems.clone());
            any_cpu = true;
        }
        if any_cpu {
            b = b.cpu(oci(cpu.build())?);
        }
        if r.memory_limit_in_bytes > 0 || r.memory_swap_limit_in_bytes > 0 {
            let mut m = LinuxMemoryBuilder::default();
            if r.memory_limit_in_bytes > 0 {
                m = m.limit(r.memory_limit_in_bytes);
            }
            if r.memory_swap_limit_in_bytes > 0 {
                m = m.swap(r.memory_swap_limit_in_bytes);
            }
            b = b.memory(oci(m.build())?);
        }
        if !r.hugepage_limits.is_empty() {
            let limits = r
                .hugepage_limits
                .iter()
                .map(|h| {
                    oci(LinuxHugepageLimitBuilder::default()
                        .page_size(h.page_size.clone())
                        .limit(h.limit as i64)
                        .build())
                })
                .collect::<Result<Vec<_>>>()?;
            b = b.hugepage_limits(limits);
        }
        if !r.unified.is_empty() {
            b = b.unified(r.unified.clone());
        }
    }
    oci(b.build())
}

/// cgroupfs path: `<parent>/<id>` (kubelet passes the pod's parent).
pub fn cgroup_path(parent: &str, id: &str) -> String {
    if parent.is_empty() {
        format!("/imacri/{id}")
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    }
}
