//! Leaving nothing behind: what one test process made outside its memory
//! (containers, shims, mounts, bridges, directories) is found from its
//! directory and removed, at its exit or, if it died, by the next run.
//! `scripts/test.sh` checks at the end of `make test` that nothing remains
//! (`leftovers`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Processes whose command line mentions `needle`: (pid, argv).
fn processes_with(needle: &str) -> Vec<(i32, Vec<String>)> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.iter().any(|a| a.contains(needle)) {
            found.push((pid, argv));
        }
    }
    found
}

fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// Shims serving a containerd whose socket lies under `dir`.
fn shims_of(dir: &Path) -> Vec<(i32, Vec<String>)> {
    let d = dir.to_string_lossy();
    processes_with("containerd-shim")
        .into_iter()
        .filter(|(_, argv)| flag(argv, "-address").is_some_and(|a| a.starts_with(&*d)))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(&*d))
        .map(String::from)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points
}

/// Unmounts everything below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Kills the containers and shims of the containerds under `dir` (by the
/// runc state of their namespaces), unmounts everything below it and
/// removes it.
pub fn reap_run(dir: &Path) {
    let shims = shims_of(dir);
    let mut roots: Vec<PathBuf> = shims
        .iter()
        .filter_map(|(_, argv)| flag(argv, "-namespace"))
        .map(|ns| Path::new("/run/containerd/runc").join(ns))
        .collect();
    roots.sort();
    roots.dedup();
    for root in &roots {
        if let Ok(out) = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(root)
                    .args(["delete", "-f", id])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(root);
    }
    // A shim killed leaves its socket file: gone with it, or /run/containerd/s
    // collects one per pod of every run.
    let sockets: Vec<PathBuf> = shims.iter().flat_map(|(pid, _)| sockets_of(*pid)).collect();
    for (pid, _) in &shims {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    unmount_under(dir);
    remove_settled(dir);
}

/// The socket files under /run/containerd/s that process `pid` listens on
/// (its fds' socket inodes, named in its network namespace's unix table).
fn sockets_of(pid: i32) -> Vec<PathBuf> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, f.get(7)?);
            (inodes.contains(*inode) && path.starts_with("/run/containerd/s/"))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Removes `dir`, again while processes that are still dying (the run's
/// containerd and imacri, killed with it) write into it: one pass can fail
/// with ENOTEMPTY when a file appears behind it.
fn remove_settled(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            _ => return,
        }
    }
}

/// Deletes the test bridges (`imit<pid>`, `imv6<pid>`) whose pid suffix
/// `select` picks; their veths go with the pods' network namespaces.
pub fn reap_bridges(select: impl Fn(&str) -> bool) {
    for name in test_bridges() {
        let pid = &name[4..];
        if select(pid) {
            let _ = Command::new("ip").args(["link", "del", &name]).output();
        }
    }
}

fn test_bridges() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("imit") || n.starts_with("imv6"))
                .collect()
        })
        .unwrap_or_default()
}

/// imacri daemons and fd keepers of test runs under `dir` (a keeper
/// outlives its imacri by design, but not once nothing is left to keep).
fn imacris_of(dir: &Path) -> Vec<(i32, Vec<String>)> {
    let d = dir.to_string_lossy();
    processes_with(&d)
        .into_iter()
        .filter(|(_, argv)| {
            argv.first().is_some_and(|a| a.ends_with("/imacri"))
                && matches!(argv.get(1).map(String::as_str), Some("serve" | "internal"))
        })
        .collect()
}

/// What test runs left on this machine: shims, imacri daemons and fd
/// keepers, mounts, bridges, veths on them, temp dirs. Empty after a clean
/// `make test`.
pub fn leftovers() -> Vec<String> {
    let tmp = std::env::temp_dir().join("imacri-it-");
    let mut found: Vec<String> = shims_of(&tmp)
        .into_iter()
        .map(|(pid, argv)| format!("shim {pid}: {}", argv.join(" ")))
        .collect();
    found.extend(
        imacris_of(&tmp)
            .into_iter()
            .map(|(pid, argv)| format!("imacri {pid}: {}", argv.join(" "))),
    );
    found.extend(mounts_under(&tmp).into_iter().map(|m| format!("mount {m}")));
    found.extend(test_bridges().into_iter().map(|b| format!("bridge {b}")));
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("imacri-it-") {
                found.push(format!("directory {}", e.path().display()));
            }
        }
    }
    found
}
