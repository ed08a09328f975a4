//! ListMetricDescriptors and ListPodSandboxMetrics: the cAdvisor metric set
//! kubelet's CRI stats provider reads (names, help and label keys as
//! cAdvisor and containerd name them). Every metric carries the labels
//! `id` and `name` (container or pod), then its own (`cpu`, `interface`,
//! `device`, ...), in the order its descriptor lists them.

use imacri_api::cri;
use imacri_runtime::metrics::{self, Sample};
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use imacri_runtime::{spec, stats, sysinfo};
use std::path::Path;

use super::{ContainerEntry, CriServer};

const BASE: [&str; 2] = ["id", "name"];

use cri::MetricType::{Counter as C, Gauge as G};

/// (name, help, type, labels after `id`, `name`).
const DEFS: &[(&str, &str, cri::MetricType, &[&str])] = &[
    (
        "container_blkio_device_usage_total",
        "Blkio device bytes usage",
        C,
        &["device", "major", "minor", "operation"],
    ),
    (
        "container_cpu_cfs_periods_total",
        "Number of elapsed enforcement period intervals.",
        C,
        &[],
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        C,
        &[],
    ),
    (
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        C,
        &[],
    ),
    (
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        C,
        &[],
    ),
    (
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        C,
        &["cpu"],
    ),
    (
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        C,
        &[],
    ),
    (
        "container_file_descriptors",
        "Number of open file descriptors for the container.",
        G,
        &[],
    ),
    (
        "container_fs_inodes_free",
        "Number of available Inodes",
        G,
        &["device"],
    ),
    (
        "container_fs_inodes_total",
        "Number of Inodes",
        G,
        &["device"],
    ),
    (
        "container_fs_limit_bytes",
        "Number of bytes that can be consumed by the container on this filesystem.",
        G,
        &["device"],
    ),
    (
        "container_fs_reads_bytes_total",
        "Cumulative count of bytes read",
        C,
        &["device"],
    ),
    (
        "container_fs_reads_total",
        "Cumulative count of reads completed",
        C,
        &["device"],
    ),
    (
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        G,
        &["device"],
    ),
    (
        "container_fs_writes_bytes_total",
        "Cumulative count of bytes written",
        C,
        &["device"],
    ),
    (
        "container_fs_writes_total",
        "Cumulative count of writes completed",
        C,
        &["device"],
    ),
    (
        "container_last_seen",
        "Last time a container was seen by the exporter",
        G,
        &[],
    ),
    (
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        G,
        &[],
    ),
    (
        "container_memory_failcnt",
        "Number of memory usage hits limits",
        C,
        &[],
    ),
    (
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures.",
        C,
        &["failure_type", "scope"],
    ),
    (
        "container_memory_kernel_usage",
        "Size of kernel memory allocated in bytes.",
        G,
        &[],
    ),
    (
        "container_memory_mapped_file",
        "Size of memory mapped files in bytes.",
        G,
        &[],
    ),
    (
        "container_memory_max_usage_bytes",
        "Maximum memory usage recorded in bytes",
        G,
        &[],
    ),
    ("container_memory_rss", "Size of RSS in bytes.", G, &[]),
    (
        "container_memory_swap",
        "Container swap usage in bytes.",
        G,
        &[],
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        G,
        &[],
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        G,
        &[],
    ),
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received",
        C,
        &["interface"],
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
        C,
        &["interface"],
    ),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving",
        C,
        &["interface"],
    ),
    (
        "container_network_receive_packets_total",
        "Cumulative count of packets received",
        C,
        &["interface"],
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
        C,
        &["interface"],
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
        C,
        &["interface"],
    ),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting",
        C,
        &["interface"],
    ),
    (
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted",
        C,
        &["interface"],
    ),
    (
        "container_oom_events_total",
        "Count of out of memory events observed for the container",
        C,
        &[],
    ),
    (
        "container_processes",
        "Number of processes running inside the container.",
        G,
        &[],
    ),
    (
        "container_sockets",
        "Number of open sockets for the container.",
        G,
        &[],
    ),
    (
        "container_spec_cpu_period",
        "CPU period of the container.",
        G,
        &[],
    ),
    (
        "container_spec_cpu_quota",
        "CPU quota of the container.",
        G,
        &[],
    ),
    (
        "container_spec_cpu_shares",
        "CPU share of the container.",
        G,
        &[],
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit for the container.",
        G,
        &[],
    ),
    (
        "container_spec_memory_swap_limit_bytes",
        "Memory swap limit for the container.",
        G,
        &[],
    ),
    (
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        G,
        &[],
    ),
    (
        "container_threads",
        "Number of threads running inside the container",
        G,
        &[],
    ),
    (
        "container_threads_max",
        "Maximum number of threads allowed inside the container, infinity if value is zero",
        G,
        &[],
    ),
];

pub(crate) fn descriptors() -> Vec<cri::MetricDescriptor> {
    DEFS.iter()
        .map(|(name, help, _, extra)| cri::MetricDescriptor {
            name: name.to_string(),
            help: help.to_string(),
            label_keys: BASE
                .iter()
                .chain(extra.iter())
                .map(|s| s.to_string())
                .collect(),
        })
        .collect()
}

/// Metrics of one object (a container, or a pod for network counters).
struct Out {
    base: [String; 2],
    ts: i64,
    metrics: Vec<cri::Metric>,
}

impl Out {
    fn new(id: &str, name: &str) -> Out {
        Out {
            base: [id.to_string(), name.to_string()],
            ts: imacri_runtime::ids::now_nanos(),
            metrics: Vec::new(),
        }
    }

    /// Adds `name` with its own label values; None (not measurable here)
    /// adds nothing.
    fn put(&mut self, name: &str, extra: &[&str], v: Option<u64>) {
        let Some(value) = v else { return };
        let Some((_, _, kind, keys)) = DEFS.iter().find(|d| d.0 == name) else {
            return;
        };
        debug_assert_eq!(keys.len(), extra.len(), "{name}");
        self.metrics.push(cri::Metric {
            name: name.to_string(),
            timestamp: self.ts,
            metric_type: *kind as i32,
            label_values: self
                .base
                .iter()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
            value: Some(cri::UInt64Value { value }),
        });
    }
}

const NS: u64 = 1_000_000_000;

/// Filesystem figures of the container's writable layer.
struct Fs {
    device: String,
    used: u64,
    limit: u64,
    inodes: u64,
    inodes_free: u64,
}

fn container_metrics(
    c: &ContainerEntry,
    s: &Sample,
    fs: Option<&Fs>,
    procs: &Path,
) -> Vec<cri::Metric> {
    let name = c
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or("");
    let mut o = Out::new(&c.id, name);
    let secs = |v: Option<u64>| v.map(|n| n / NS);
    o.put(
        "container_cpu_usage_seconds_total",
        &["total"],
        secs(s.cpu_total_ns),
    );
    o.put("container_cpu_user_seconds_total", &[], secs(s.cpu_user_ns));
    o.put(
        "container_cpu_system_seconds_total",
        &[],
        secs(s.cpu_system_ns),
    );
    o.put("container_cpu_cfs_periods_total", &[], s.cfs_periods);
    o.put(
        "container_cpu_cfs_throttled_periods_total",
        &[],
        s.cfs_throttled_periods,
    );
    o.put(
        "container_cpu_cfs_throttled_seconds_total",
        &[],
        secs(s.cfs_throttled_ns),
    );
    for (metric, v) in [
        ("container_memory_cache", s.memory_cache),
        ("container_memory_rss", s.memory_rss),
        ("container_memory_swap", s.memory_swap.or(Some(0))),
        ("container_memory_mapped_file", s.memory_mapped_file),
        ("container_memory_kernel_usage", s.memory_kernel),
        ("container_memory_max_usage_bytes", s.memory_max_usage),
        ("container_memory_usage_bytes", s.memory_usage),
        ("container_memory_working_set_bytes", s.memory_working_set),
        ("container_memory_failcnt", s.memory_failcnt),
        ("container_oom_events_total", s.oom_kills.or(Some(0))),
    ] {
        o.put(metric, &[], v);
    }
    // cAdvisor reports faults for the container and for its hierarchy; a
    // container's cgroup has no children, so both are the same counters.
    for scope in ["container", "hierarchy"] {
        o.put(
            "container_memory_failures_total",
            &["pgfault", scope],
            s.pgfault,
        );
        o.put(
            "container_memory_failures_total",
            &["pgmajfault", scope],
            s.pgmajfault,
        );
    }
    let counts = metrics::proc_counts(procs, &s.pids);
    o.put("container_processes", &[], Some(s.pids.len() as u64));
    o.put("container_file_descriptors", &[], Some(counts.fds));
    o.put("container_sockets", &[], Some(counts.sockets));
    o.put("container_threads", &[], Some(counts.threads));
    o.put(
        "container_threads_max",
        &[],
        Some(s.threads_max.unwrap_or(0)),
    );
    for (maj, min, op, v) in &s.io_bytes {
        let dev = format!("{maj}:{min}");
        o.put(
            "container_blkio_device_usage_total",
            &[&dev, &maj.to_string(), &min.to_string(), op],
            Some(*v),
        );
        let m = if op == "Read" {
            "container_fs_reads_bytes_total"
        } else {
            "container_fs_writes_bytes_total"
        };
        o.put(m, &[&dev], Some(*v));
    }
    for (maj, min, op, v) in &s.io_ops {
        let m = if op == "Read" {
            "container_fs_reads_total"
        } else {
            "container_fs_writes_total"
        };
        o.put(m, &[&format!("{maj}:{min}")], Some(*v));
    }
    if let Some(fs) = fs {
        o.put("container_fs_usage_bytes", &[&fs.device], Some(fs.used));
        o.put("container_fs_limit_bytes", &[&fs.device], Some(fs.limit));
        o.put("container_fs_inodes_total", &[&fs.device], Some(fs.inodes));
        o.put(
            "container_fs_inodes_free",
            &[&fs.device],
            Some(fs.inodes_free),
        );
    }
    let r = super::current_resources(c).unwrap_or_default();
    let nonneg = |v: i64| Some(v.max(0) as u64);
    o.put("container_spec_cpu_period", &[], nonneg(r.cpu_period));
    o.put("container_spec_cpu_quota", &[], nonneg(r.cpu_quota));
    o.put("container_spec_cpu_shares", &[], nonneg(r.cpu_shares));
    o.put(
        "container_spec_memory_limit_bytes",
        &[],
        nonneg(r.memory_limit_in_bytes),
    );
    o.put(
        "container_spec_memory_swap_limit_bytes",
        &[],
        nonneg(r.memory_swap_limit_in_bytes),
    );
    let st = c.state();
    o.put(
        "container_start_time_seconds",
        &[],
        nonneg(st.started_at / NS as i64),
    );
    o.put("container_last_seen", &[], Some(o.ts as u64 / NS));
    o.metrics
}

fn network_metrics(o: &mut Out, ifaces: &[stats::IfaceStats]) {
    for i in ifaces {
        let l = [i.name.as_str()];
        o.put(
            "container_network_receive_bytes_total",
            &l,
            Some(i.rx_bytes),
        );
        o.put(
            "container_network_receive_packets_total",
            &l,
            Some(i.rx_packets),
        );
        o.put(
            "container_network_receive_errors_total",
            &l,
            Some(i.rx_errors),
        );
        o.put(
            "container_network_receive_packets_dropped_total",
            &l,
            Some(i.rx_dropped),
        );
        o.put(
            "container_network_transmit_bytes_total",
            &l,
            Some(i.tx_bytes),
        );
        o.put(
            "container_network_transmit_packets_total",
            &l,
            Some(i.tx_packets),
        );
        o.put(
            "container_network_transmit_errors_total",
            &l,
            Some(i.tx_errors),
        );
        o.put(
            "container_network_transmit_packets_dropped_total",
            &l,
            Some(i.tx_dropped),
        );
    }
}

impl CriServer {
    async fn writable_fs(&self, c: &ContainerEntry) -> Option<Fs> {
        let (used, _) = self
            .c
            .snapshot_usage(&self.cfg.containerd.snapshotter, &c.id)
            .await
            .ok()?;
        let root = self.snapshotter_root().await.ok()?;
        let v = nix::sys::statvfs::statvfs(root.as_str()).ok()?;
        Some(Fs {
            device: root,
            used,
            limit: v.blocks() * v.fragment_size(),
            inodes: v.files(),
            inodes_free: v.files_free(),
        })
    }

    pub(crate) async fn pod_metrics(&self) -> Vec<cri::PodSandboxMetrics> {
        let version = sysinfo::cgroup_version();
        let cgroot = Path::new("/sys/fs/cgroup");
        let procs = Path::new("/proc");
        let mut out = Vec::new();
        for sb in self.sandboxes.all() {
            let st = sb.state();
            if st.phase != SandboxPhase::Ready {
                continue;
            }
            let name = sb
                .config
                .metadata
                .as_ref()
                .map(|m| m.name.as_str())
                .unwrap_or("");
            let mut pod = Out::new(&sb.id, name);
            match (&st.netns, st.pid) {
                (Some(_), pid) if pid > 0 => network_metrics(&mut pod, &stats::net_of_pid(pid)),
                (Some(ns), _) if st.pinned.is_some() => {
                    network_metrics(&mut pod, &stats::net_of_netns(ns))
                }
                _ => {}
            }
            let parent = sb
                .config
                .linux
                .as_ref()
                .map(|l| l.cgroup_parent.clone())
                .unwrap_or_default();
            let mut container_metrics_list = Vec::new();
            for c in self.containers_of(&sb.id) {
                if c.state().phase != ContainerPhase::Running {
                    continue;
                }
                let s = metrics::sample(cgroot, &spec::cgroup_path(&parent, &c.id), version);
                let fs = self.writable_fs(&c).await;
                container_metrics_list.push(cri::ContainerMetrics {
                    container_id: c.id.clone(),
                    metrics: container_metrics(&c, &s, fs.as_ref(), procs),
                });
            }
            out.push(cri::PodSandboxMetrics {
                pod_sandbox_id: sb.id.clone(),
                metrics: pod.metrics,
                container_metrics: container_metrics_list,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_descriptor_has_help_and_labels_starting_with_id_name() {
        let d = descriptors();
        assert!(d.len() >= 45);
        for m in &d {
            assert!(!m.help.is_empty(), "{}", m.name);
            assert_eq!(&m.label_keys[..2], &["id", "name"], "{}", m.name);
        }
        let mut names: Vec<_> = d.iter().map(|m| &m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), d.len(), "no duplicate names");
    }

    #[test]
    fn label_values_match_the_descriptor_keys() {
        let mut o = Out::new("id1", "n");
        network_metrics(
            &mut o,
            &[stats::IfaceStats {
                name: "eth0".into(),
                ..Default::default()
            }],
        );
        o.put("container_cpu_usage_seconds_total", &["total"], Some(1));
        o.put("container_memory_rss", &[], None);
        assert_eq!(o.metrics.len(), 9, "None adds nothing");
        let d = descriptors();
        for m in &o.metrics {
            let keys = &d.iter().find(|x| x.name == m.name).unwrap().label_keys;
            assert_eq!(keys.len(), m.label_values.len(), "{}", m.name);
            assert_eq!(&m.label_values[..2], &["id1", "n"]);
        }
    }
}
