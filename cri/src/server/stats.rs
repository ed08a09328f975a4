//! ContainerStats, PodSandboxStats (and their List/Stream forms) and
//! resource updates (metrics: `metrics.rs`). Usage comes from cgroups and the pod's network
//! namespace; CPU rate is the change since the previous sample.

use imacri_api::cri;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use imacri_runtime::stats::{self, CgroupStats};
use imacri_runtime::{spec, Result};

use super::validate::labels_match;
use super::{ContainerEntry, CriServer, SandboxEntry};

/// Where a pod's own CPU sample is kept, beside its containers'.
pub(crate) fn pod_sample_key(pod: &str) -> String {
    format!("pod/{pod}")
}

fn u(v: Option<u64>) -> Option<cri::UInt64Value> {
    v.map(|value| cri::UInt64Value { value })
}

impl CriServer {
    pub(crate) fn cgroup_of(&self, c: &ContainerEntry) -> String {
        let parent = self
            .sandboxes
            .get(&c.state().sandbox_id)
            .and_then(|sb| sb.config.linux.as_ref().map(|l| l.cgroup_parent.clone()))
            .unwrap_or_default();
        spec::cgroup_path(&parent, &c.id)
    }

    /// CPU usage and its rate since the last sample of `key` (forgotten
    /// when its container or pod is torn down).
    fn cpu(&self, key: &str, s: &CgroupStats, ts: i64) -> cri::CpuUsage {
        let rate = s.cpu_usage_ns.and_then(|now| {
            let mut prev = self.cpu_samples.lock().ok()?;
            let last = prev.insert(key.to_string(), (ts, now));
            let (t0, u0) = last?;
            let dt = ts.checked_sub(t0).filter(|d| *d > 0)? as u128;
            Some((u128::from(now.saturating_sub(u0)) * 1_000_000_000 / dt) as u64)
        });
        cri::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: u(s.cpu_usage_ns),
            usage_nano_cores: u(rate.or(Some(0))),
            psi: None,
        }
    }

    fn memory(s: &CgroupStats, ts: i64) -> cri::MemoryUsage {
        cri::MemoryUsage {
            timestamp: ts,
            working_set_bytes: u(s.memory_working_set),
            available_bytes: u(s
                .memory_limit
                .zip(s.memory_working_set)
                .map(|(l, w)| l.saturating_sub(w))),
            usage_bytes: u(s.memory_usage),
            rss_bytes: u(s.rss),
            page_faults: u(s.page_faults),
            major_page_faults: u(s.major_page_faults),
            psi: None,
        }
    }

    pub(crate) async fn container_stats_of(&self, c: &ContainerEntry) -> cri::ContainerStats {
        let ts = now_nanos();
        let s = if c.state().phase == ContainerPhase::Running {
            stats::cgroup(&self.cgroup_of(c))
        } else {
            CgroupStats::default()
        };
        let (used, inodes) = self
            .c
            .snapshot_usage(&self.cfg.containerd.snapshotter, &c.id)
            .await
            .unwrap_or((0, 0));
        let mountpoint = self.snapshotter_root().await.unwrap_or_default();
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: c.id.clone(),
                metadata: c.config.metadata.clone(),
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
            }),
            cpu: Some(self.cpu(&c.id, &s, ts)),
            memory: Some(Self::memory(&s, ts)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp: ts,
                fs_id: Some(cri::FilesystemIdentifier { mountpoint }),
                used_bytes: u(Some(used)),
                inodes_used: u(Some(inodes)),
            }),
            swap: None,
            io: None,
        }
    }

    pub(crate) async fn pod_stats_of(&self, sb: &SandboxEntry) -> cri::PodSandboxStats {
        let ts = now_nanos();
        let st = sb.state();
        let mut containers = Vec::new();
        for c in self.containers_of(&sb.id) {
            containers.push(self.container_stats_of(&c).await);
        }
        // The pod cgroup kubelet made, else the sum of the containers (+pause).
        let parent = sb
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let total = if st.phase != SandboxPhase::Ready {
            CgroupStats::default()
        } else if !parent.is_empty() {
            stats::cgroup(&parent)
        } else {
            let mut parts = vec![stats::cgroup(&spec::cgroup_path("", &sb.id))];
            for c in self.containers_of(&sb.id) {
                if c.state().phase == ContainerPhase::Running {
                    parts.push(stats::cgroup(&self.cgroup_of(&c)));
                }
            }
            let sum = |f: fn(&CgroupStats) -> Option<u64>| {
                parts.iter().filter_map(f).reduce(|a, b| a + b)
            };
            CgroupStats {
                cpu_usage_ns: sum(|s| s.cpu_usage_ns),
                memory_usage: sum(|s| s.memory_usage),
                memory_working_set: sum(|s| s.memory_working_set),
                memory_limit: None,
                rss: sum(|s| s.rss),
                page_faults: sum(|s| s.page_faults),
                major_page_faults: sum(|s| s.major_page_faults),
                pids: sum(|s| s.pids),
            }
        };
        let net = match (&st.netns, st.pid) {
            (Some(_), pid) if pid > 0 => stats::net_of_pid(pid),
            (Some(ns), _) if st.pinned.is_some() => stats::net_of_netns(ns),
            _ => vec![],
        };
        let iface = |i: &stats::IfaceStats| cri::NetworkInterfaceUsage {
            name: i.name.clone(),
            rx_bytes: u(Some(i.rx_bytes)),
            rx_errors: u(Some(i.rx_errors)),
            tx_bytes: u(Some(i.tx_bytes)),
            tx_errors: u(Some(i.tx_errors)),
        };
        let default = net.iter().find(|i| i.name == "eth0").or(net.first());
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: sb.id.clone(),
                metadata: sb.config.metadata.clone(),
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(self.cpu(&pod_sample_key(&sb.id), &total, ts)),
                memory: Some(Self::memory(&total, ts)),
                network: Some(cri::NetworkUsage {
                    timestamp: ts,
                    default_interface: default.map(iface),
                    interfaces: net
                        .iter()
                        .filter(|i| Some(*i) != default)
                        .map(iface)
                        .collect(),
                }),
                process: Some(cri::ProcessUsage {
                    timestamp: ts,
                    process_count: u(total.pids),
                }),
                containers,
                io: None,
            }),
            windows: None,
        }
    }

    pub(crate) async fn list_container_stats(
        &self,
        f: Option<&cri::ContainerStatsFilter>,
    ) -> Vec<cri::ContainerStats> {
        let mut out = Vec::new();
        for c in self.containers.all() {
            let st = c.state();
            if let Some(f) = f {
                if (!f.id.is_empty() && !c.id.starts_with(&f.id))
                    || (!f.pod_sandbox_id.is_empty()
                        && !st.sandbox_id.starts_with(&f.pod_sandbox_id))
                    || !labels_match(&f.label_selector, &c.config.labels)
                {
                    continue;
                }
            }
            out.push(self.container_stats_of(&c).await);
        }
        out
    }

    pub(crate) async fn list_pod_stats(
        &self,
        f: Option<&cri::PodSandboxStatsFilter>,
    ) -> Vec<cri::PodSandboxStats> {
        let mut out = Vec::new();
        for sb in self.sandboxes.all() {
            if sb.state().phase == SandboxPhase::Creating {
                continue;
            }
            if let Some(f) = f {
                if (!f.id.is_empty() && !sb.id.starts_with(&f.id))
                    || !labels_match(&f.label_selector, &sb.config.labels)
                {
                    continue;
                }
            }
            out.push(self.pod_stats_of(&sb).await);
        }
        out
    }

    pub(crate) async fn update_container_resources(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<cri::UpdateContainerResourcesResponse> {
        let c = self.container(&req.container_id)?;
        // No Linux resources (a Windows request): nothing to change here,
        // and no error, as in containerd.
        let Some(linux) = req.linux else {
            return Ok(cri::UpdateContainerResourcesResponse {});
        };
        let nri_updates = self.nri_update(&c.id, &linux).await?;
        let _op = c.op.write().await;
        let mut res = spec::resources(Some(&linux))?;
        if !self.node.hugetlb {
            res.set_hugepage_limits(None);
        }
        // Devices stay as created; only limits change.
        res.set_devices(None);
        match c.state().phase {
            // A task that exited meanwhile has nothing to update (containerd
            // takes that as done too).
            ContainerPhase::Running => self.c.update_task(&c.id, &res).await.ignore_not_found()?,
            // Applied when it starts: its task is made from this spec.
            ContainerPhase::Created => self.c.update_container_resources(&c.id, &res).await?,
            // As containerd: an exited container's record takes them (its
            // status reports them); nothing runs to update.
            ContainerPhase::Exited => {}
        }
        let mut merged = c
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .unwrap_or_default();
        merged.cpu_period = linux.cpu_period;
        merged.cpu_quota = linux.cpu_quota;
        merged.cpu_shares = linux.cpu_shares;
        merged.memory_limit_in_bytes = linux.memory_limit_in_bytes;
        merged.cpuset_cpus = linux.cpuset_cpus;
        merged.cpuset_mems = linux.cpuset_mems;
        merged.hugepage_limits = linux.hugepage_limits;
        merged.unified = linux.unified;
        merged.memory_swap_limit_in_bytes = linux.memory_swap_limit_in_bytes;
        c.update(|s| s.updated_resources = Some(prost::Message::encode_to_vec(&merged)))?;
        drop(_op);
        self.nri_apply_updates(nri_updates).await;
        self.nri_post_update(&c.id).await;
        Ok(cri::UpdateContainerResourcesResponse {})
    }
}
