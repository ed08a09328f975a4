//! cAdvisor-style samples of a container's cgroup and processes, for
//! ListPodSandboxMetrics: what kubelet's cAdvisor-less stats provider
//! expects a runtime to report. Every reader takes its root directory (the
//! cgroup filesystem, /proc) as a parameter so it is unit-tested on a tree.

use std::collections::HashMap;
use std::path::Path;

use crate::stats::parse_kv;
use crate::sysinfo::CgroupVersion;

/// USER_HZ: cpuacct.stat counts in these ticks (100 on every Linux ABI).
const TICK_NS: u64 = 10_000_000;

/// One block-device counter: (major, minor, operation, value).
pub type BlkioCounter = (u64, u64, String, u64);

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub cpu_total_ns: Option<u64>,
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    pub cfs_periods: Option<u64>,
    pub cfs_throttled_periods: Option<u64>,
    pub cfs_throttled_ns: Option<u64>,
    pub memory_usage: Option<u64>,
    pub memory_max_usage: Option<u64>,
    pub memory_cache: Option<u64>,
    pub memory_rss: Option<u64>,
    pub memory_swap: Option<u64>,
    pub memory_mapped_file: Option<u64>,
    pub memory_kernel: Option<u64>,
    pub memory_working_set: Option<u64>,
    pub memory_failcnt: Option<u64>,
    pub pgfault: Option<u64>,
    pub pgmajfault: Option<u64>,
    pub oom_kills: Option<u64>,
    pub threads_max: Option<u64>,
    /// Bytes per device and operation (Read, Write).
    pub io_bytes: Vec<BlkioCounter>,
    /// Requests per device and operation.
    pub io_ops: Vec<BlkioCounter>,
    /// Processes in the cgroup.
    pub pids: Vec<u32>,
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn num(p: &Path) -> Option<u64> {
    let s = read(p)?;
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse().ok().filter(|v: &u64| *v < (1u64 << 62))
}

fn kv(p: &Path) -> HashMap<String, u64> {
    read(p).map(|t| parse_kv(&t)).unwrap_or_default()
}

fn pids(p: &Path) -> Vec<u32> {
    read(p)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// `8:0 Read 4096` lines (cgroup v1 blkio).
fn blkio_v1(p: &Path) -> Vec<BlkioCounter> {
    let Some(t) = read(p) else { return vec![] };
    t.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let op = it.next()?;
            let v = it.next()?.parse().ok()?;
            matches!(op, "Read" | "Write")
                .then(|| Some((maj.parse().ok()?, min.parse().ok()?, op.to_string(), v)))?
        })
        .collect()
}

/// `8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...` lines (cgroup v2 io.stat).
fn io_v2(p: &Path) -> (Vec<BlkioCounter>, Vec<BlkioCounter>) {
    let (mut bytes, mut ops) = (vec![], vec![]);
    let Some(t) = read(p) else {
        return (bytes, ops);
    };
    for l in t.lines() {
        let mut it = l.split_whitespace();
        let Some((maj, min)) = it.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse::<u64>(), min.parse::<u64>()) else {
            continue;
        };
        for f in it {
            let Some((k, v)) = f.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse() else { continue };
            match k {
                "rbytes" => bytes.push((maj, min, "Read".into(), v)),
                "wbytes" => bytes.push((maj, min, "Write".into(), v)),
                "rios" => ops.push((maj, min, "Read".into(), v)),
                "wios" => ops.push((maj, min, "Write".into(), v)),
                _ => {}
            }
        }
    }
    (bytes, ops)
}

/// Samples the cgroup `path` (the OCI spec's cgroupsPath) under the cgroup
/// filesystem at `root`.
pub fn sample(root: &Path, path: &str, version: CgroupVersion) -> Sample {
    let rel = path.trim_start_matches('/');
    match version {
        CgroupVersion::V1 => {
            let c = |ctl: &str, f: &str| root.join(ctl).join(rel).join(f);
            let acct = kv(&c("cpuacct", "cpuacct.stat"));
            let cpu = kv(&c("cpu", "cpu.stat"));
            let mem = kv(&c("memory", "memory.stat"));
            let usage = num(&c("memory", "memory.usage_in_bytes"));
            let inactive = mem.get("total_inactive_file").copied().unwrap_or(0);
            Sample {
                cpu_total_ns: num(&c("cpuacct", "cpuacct.usage")),
                cpu_user_ns: acct.get("user").map(|t| t * TICK_NS),
                cpu_system_ns: acct.get("system").map(|t| t * TICK_NS),
                cfs_periods: cpu.get("nr_periods").copied(),
                cfs_throttled_periods: cpu.get("nr_throttled").copied(),
                cfs_throttled_ns: cpu.get("throttled_time").copied(),
                memory_usage: usage,
                memory_max_usage: num(&c("memory", "memory.max_usage_in_bytes")),
                memory_cache: mem.get("total_cache").copied(),
                memory_rss: mem.get("total_rss").copied(),
                memory_swap: mem.get("total_swap").copied(),
                memory_mapped_file: mem.get("total_mapped_file").copied(),
                memory_kernel: num(&c("memory", "memory.kmem.usage_in_bytes")),
                memory_working_set: usage.map(|u| u.saturating_sub(inactive)),
                memory_failcnt: num(&c("memory", "memory.failcnt")),
                pgfault: mem.get("total_pgfault").copied(),
                pgmajfault: mem.get("total_pgmajfault").copied(),
                oom_kills: kv(&c("memory", "memory.oom_control"))
                    .get("oom_kill")
                    .copied(),
                threads_max: num(&c("pids", "pids.max")),
                io_bytes: blkio_v1(&c("blkio", "blkio.throttle.io_service_bytes_recursive")),
                io_ops: blkio_v1(&c("blkio", "blkio.throttle.io_serviced_recursive")),
                pids: pids(&c("pids", "cgroup.procs")),
            }
        }
        CgroupVersion::V2 => {
            let d = root.join(rel);
            let cpu = kv(&d.join("cpu.stat"));
            let mem = kv(&d.join("memory.stat"));
            let usage = num(&d.join("memory.current"));
            let inactive = mem.get("inactive_file").copied().unwrap_or(0);
            let events = kv(&d.join("memory.events"));
            let (io_bytes, io_ops) = io_v2(&d.join("io.stat"));
            let us = |k: &str| cpu.get(k).map(|v| v * 1000);
            Sample {
                cpu_total_ns: us("usage_usec"),
                cpu_user_ns: us("user_usec"),
                cpu_system_ns: us("system_usec"),
                cfs_periods: cpu.get("nr_periods").copied(),
                cfs_throttled_periods: cpu.get("nr_throttled").copied(),
                cfs_throttled_ns: us("throttled_usec"),
                memory_usage: usage,
                memory_max_usage: num(&d.join("memory.peak")),
                memory_cache: mem.get("file").copied(),
                memory_rss: mem.get("anon").copied(),
                memory_swap: num(&d.join("memory.swap.current")),
                memory_mapped_file: mem.get("file_mapped").copied(),
                memory_kernel: mem.get("kernel").copied(),
                memory_working_set: usage.map(|u| u.saturating_sub(inactive)),
                // v2 has no failcnt; "max" counts the times usage hit the limit.
                memory_failcnt: events.get("max").copied(),
                pgfault: mem.get("pgfault").copied(),
                pgmajfault: mem.get("pgmajfault").copied(),
                oom_kills: events.get("oom_kill").copied(),
                threads_max: num(&d.join("pids.max")),
                io_bytes,
                io_ops,
                pids: pids(&d.join("cgroup.procs")),
            }
        }
    }
}

/// Open files, sockets and threads of `pids`, from the proc filesystem at
/// `proc_root`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcCounts {
    pub fds: u64,
    pub sockets: u64,
    pub threads: u64,
}

pub fn proc_counts(proc_root: &Path, pids: &[u32]) -> ProcCounts {
    let mut n = ProcCounts::default();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        if let Ok(rd) = std::fs::read_dir(dir.join("fd")) {
            for e in rd.flatten() {
                n.fds += 1;
                if std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                {
                    n.sockets += 1;
                }
            }
        }
        n.threads += read(&dir.join("status"))
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, impl Fn(&str, &str)) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().to_path_buf();
        let w = move |p: &str, c: &str| {
            let p = r.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        };
        (d, w)
    }

    #[test]
    fn samples_cgroup_v1() {
        let (d, w) = tree();
        w("cpuacct/p/c/cpuacct.usage", "3000000000\n");
        w("cpuacct/p/c/cpuacct.stat", "user 150\nsystem 50\n");
        w(
            "cpu/p/c/cpu.stat",
            "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n",
        );
        w("memory/p/c/memory.usage_in_bytes", "1000\n");
        w("memory/p/c/memory.max_usage_in_bytes", "2000\n");
        w("memory/p/c/memory.failcnt", "4\n");
        w("memory/p/c/memory.kmem.usage_in_bytes", "64\n");
        w(
            "memory/p/c/memory.stat",
            "total_cache 100\ntotal_rss 600\ntotal_swap 0\ntotal_mapped_file 30\n\
             total_inactive_file 300\ntotal_pgfault 7\ntotal_pgmajfault 1\n",
        );
        w(
            "memory/p/c/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        w("pids/p/c/pids.max", "max\n");
        w("pids/p/c/cgroup.procs", "12\n13\n");
        w(
            "blkio/p/c/blkio.throttle.io_service_bytes_recursive",
            "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 4608\nTotal 4608\n",
        );
        let s = sample(d.path(), "/p/c", CgroupVersion::V1);
        assert_eq!(s.cpu_total_ns, Some(3_000_000_000));
        assert_eq!(
            (s.cpu_user_ns, s.cpu_system_ns),
            (Some(1_500_000_000), Some(500_000_000))
        );
        assert_eq!(
            (s.cfs_periods, s.cfs_throttled_periods, s.cfs_throttled_ns),
            (Some(10), Some(2), Some(5000))
        );
        assert_eq!(s.memory_working_set, Some(700));
        assert_eq!(
            (s.memory_max_usage, s.memory_failcnt, s.memory_kernel),
            (Some(2000), Some(4), Some(64))
        );
        assert_eq!(
            (s.memory_cache, s.memory_rss, s.memory_mapped_file),
            (Some(100), Some(600), Some(30))
        );
        assert_eq!((s.oom_kills, s.threads_max), (Some(3), None));
        assert_eq!(s.pids, vec![12, 13]);
        assert_eq!(
            s.io_bytes,
            vec![(8, 0, "Read".into(), 4096), (8, 0, "Write".into(), 512)]
        );
    }

    #[test]
    fn samples_cgroup_v2() {
        let (d, w) = tree();
        w(
            "p/c/cpu.stat",
            "usage_usec 50\nuser_usec 20\nsystem_usec 30\nnr_periods 5\nnr_throttled 1\nthrottled_usec 7\n",
        );
        w("p/c/memory.current", "2048\n");
        w("p/c/memory.peak", "4096\n");
        w("p/c/memory.stat", "anon 1024\nfile 512\nfile_mapped 8\nkernel 16\ninactive_file 48\npgfault 9\npgmajfault 2\n");
        w(
            "p/c/memory.events",
            "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n",
        );
        w("p/c/pids.max", "512\n");
        w("p/c/cgroup.procs", "7\n");
        w(
            "p/c/io.stat",
            "8:16 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        let s = sample(d.path(), "p/c", CgroupVersion::V2);
        assert_eq!(
            (s.cpu_total_ns, s.cpu_user_ns, s.cpu_system_ns),
            (Some(50_000), Some(20_000), Some(30_000))
        );
        assert_eq!(s.cfs_throttled_ns, Some(7000));
        assert_eq!(
            (s.memory_working_set, s.memory_max_usage),
            (Some(2000), Some(4096))
        );
        assert_eq!(
            (s.memory_cache, s.memory_rss, s.memory_kernel),
            (Some(512), Some(1024), Some(16))
        );
        assert_eq!(
            (s.memory_failcnt, s.oom_kills, s.threads_max),
            (Some(6), Some(1), Some(512))
        );
        assert_eq!(
            s.io_ops,
            vec![(8, 16, "Read".into(), 1), (8, 16, "Write".into(), 2)]
        );
        assert_eq!(s.pids, vec![7]);
    }

    #[test]
    fn counts_fds_sockets_threads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("42");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("fd/0")).unwrap();
        std::os::unix::fs::symlink("socket:[1234]", p.join("fd/3")).unwrap();
        std::fs::write(p.join("status"), "Name:\tsh\nThreads:\t3\n").unwrap();
        assert_eq!(
            proc_counts(d.path(), &[42, 43]),
            ProcCounts {
                fds: 2,
                sockets: 1,
                threads: 3
            }
        );
    }
}
