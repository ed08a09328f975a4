//! Resource usage from cgroups (v1, including hybrid, and v2) and network
//! counters from a pod's network namespace. Parsers are pure and tested.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sysinfo::{cgroup_version, CgroupVersion};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupStats {
    pub cpu_usage_ns: Option<u64>,
    pub memory_usage: Option<u64>,
    pub memory_working_set: Option<u64>,
    pub memory_limit: Option<u64>,
    pub rss: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    pub pids: Option<u64>,
}

/// `key value` lines (memory.stat, cpu.stat).
pub fn parse_kv(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn read_u64(p: PathBuf) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    // "max" (v2) and the v1 "unlimited" value mean no limit.
    if s == "max" {
        return None;
    }
    s.parse().ok().filter(|v: &u64| *v < (1u64 << 62))
}

fn read_kv(p: PathBuf) -> HashMap<String, u64> {
    std::fs::read_to_string(p)
        .map(|t| parse_kv(&t))
        .unwrap_or_default()
}

/// Usage of the cgroup at `path` (as in the OCI spec's cgroupsPath), under
/// the cgroup filesystem mounted at `root` (normally /sys/fs/cgroup).
pub fn read_cgroup(root: &Path, path: &str, version: CgroupVersion) -> CgroupStats {
    let rel = path.trim_start_matches('/');
    match version {
        CgroupVersion::V1 => {
            let mem = root.join("memory").join(rel);
            let stat = read_kv(mem.join("memory.stat"));
            let usage = read_u64(mem.join("memory.usage_in_bytes"));
            let inactive = stat.get("total_inactive_file").copied().unwrap_or(0);
            CgroupStats {
                cpu_usage_ns: read_u64(root.join("cpuacct").join(rel).join("cpuacct.usage")),
                memory_usage: usage,
                memory_working_set: usage.map(|u| u.saturating_sub(inactive)),
                memory_limit: read_u64(mem.join("memory.limit_in_bytes")),
                rss: stat.get("total_rss").copied(),
                page_faults: stat.get("total_pgfault").copied(),
                major_page_faults: stat.get("total_pgmajfault").copied(),
                pids: read_u64(root.join("pids").join(rel).join("pids.current")),
            }
        }
        CgroupVersion::V2 => {
            let d = root.join(rel);
            let stat = read_kv(d.join("memory.stat"));
            let usage = read_u64(d.join("memory.current"));
            let inactive = stat.get("inactive_file").copied().unwrap_or(0);
            CgroupStats {
                cpu_usage_ns: read_kv(d.join("cpu.stat"))
                    .get("usage_usec")
                    .map(|u| u * 1000),
                memory_usage: usage,
                memory_working_set: usage.map(|u| u.saturating_sub(inactive)),
                memory_limit: read_u64(d.join("memory.max")),
                rss: stat.get("anon").copied(),
                page_faults: stat.get("pgfault").copied(),
                major_page_faults: stat.get("pgmajfault").copied(),
                pids: read_u64(d.join("pids.current")),
            }
        }
    }
}

/// Usage of a cgroup on this node.
pub fn cgroup(path: &str) -> CgroupStats {
    read_cgroup(Path::new("/sys/fs/cgroup"), path, cgroup_version())
}

/// Counters of one network interface.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// /proc/<pid>/net/dev, without the loopback.
pub fn parse_net_dev(text: &str) -> Vec<IfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() >= 16).then_some(())?;
            Some(IfaceStats {
                name: name.trim().to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
            })
        })
        .filter(|i| i.name != "lo")
        .collect()
}

/// Network counters of the namespace `pid` lives in.
pub fn net_of_pid(pid: u32) -> Vec<IfaceStats> {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default()
}

/// Interface counters of a pinned network namespace (a pod without pause):
/// read on a throwaway thread that joins it.
pub fn net_of_netns(netns: &std::path::Path) -> Vec<IfaceStats> {
    let Ok(f) = std::fs::File::open(netns) else {
        return Vec::new();
    };
    std::thread::spawn(move || {
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        std::fs::read_to_string("/proc/thread-self/net/dev").ok()
    })
    .join()
    .ok()
    .flatten()
    .map(|t| parse_net_dev(&t))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_and_v2_trees() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let w = |p: &str, c: &str| {
            let p = r.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        };
        w("memory/pod/c/memory.usage_in_bytes", "1000\n");
        w(
            "memory/pod/c/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        w("memory/pod/c/memory.stat", "cache 5\ntotal_inactive_file 300\ntotal_rss 600\ntotal_pgfault 7\ntotal_pgmajfault 1\n");
        w("cpuacct/pod/c/cpuacct.usage", "123456\n");
        w("pids/pod/c/pids.current", "3\n");
        let s = read_cgroup(r, "/pod/c", CgroupVersion::V1);
        assert_eq!(s.cpu_usage_ns, Some(123456));
        assert_eq!(s.memory_working_set, Some(700));
        assert_eq!(s.memory_limit, None, "v1 'unlimited' is no limit");
        assert_eq!(
            (s.rss, s.page_faults, s.major_page_faults, s.pids),
            (Some(600), Some(7), Some(1), Some(3))
        );

        w("pod/c/cpu.stat", "usage_usec 50\nuser_usec 20\n");
        w("pod/c/memory.current", "2048\n");
        w("pod/c/memory.max", "max\n");
        w(
            "pod/c/memory.stat",
            "anon 1024\ninactive_file 48\npgfault 9\npgmajfault 2\n",
        );
        w("pod/c/pids.current", "4\n");
        let s = read_cgroup(r, "/pod/c", CgroupVersion::V2);
        assert_eq!(s.cpu_usage_ns, Some(50_000));
        assert_eq!(s.memory_working_set, Some(2000));
        assert_eq!((s.memory_limit, s.rss, s.pids), (None, Some(1024), Some(4)));
    }

    #[test]
    fn parses_net_dev() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0:    5000      10    2    0    0     0          0         0     3000       8    1    0    0     0       0          0\n";
        let n = parse_net_dev(t);
        assert_eq!(
            n,
            vec![IfaceStats {
                name: "eth0".into(),
                rx_bytes: 5000,
                rx_packets: 10,
                rx_errors: 2,
                rx_dropped: 0,
                tx_bytes: 3000,
                tx_packets: 8,
                tx_errors: 1,
                tx_dropped: 0,
            }]
        );
    }
}
