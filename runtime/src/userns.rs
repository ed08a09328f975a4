//! User namespaces of pods: created once per pod, pinned under
//! `<state>/userns/<id>` with the pod's network namespace made inside it, and
//! image files remapped so they appear owned by in-pod IDs.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, read, write, ForkResult};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One ID mapping line: `container_id host_id size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mappings {
    pub uids: Vec<IdMap>,
    pub gids: Vec<IdMap>,
}

impl Mappings {
    /// The same range for users and groups.
    pub fn range(host_start: u32, size: u32) -> Mappings {
        let m = vec![IdMap {
            container_id: 0,
            host_id: host_start,
            size,
        }];
        Mappings {
            uids: m.clone(),
            gids: m,
        }
    }

    /// Rejects empty, overflowing or overlapping mappings.
    pub fn validate(&self, field: &str) -> Result<()> {
        for (kind, maps) in [("uids", &self.uids), ("gids", &self.gids)] {
            if maps.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{field}.{kind} must not be empty"
                )));
            }
            for m in maps.iter() {
                if m.size == 0
                    || m.container_id.checked_add(m.size).is_none()
                    || m.host_id.checked_add(m.size).is_none()
                {
                    return Err(Error::InvalidArgument(format!(
                        "{field}.{kind}: mapping {m:?} is empty or overflows"
                    )));
                }
            }
            for (i, a) in maps.iter().enumerate() {
                for b in &maps[i + 1..] {
                    let overlap = |s1: u32, s2: u32| s1 < s2 + b.size && s2 < s1 + a.size;
                    if overlap(a.container_id, b.container_id) || overlap(a.host_id, b.host_id) {
                        return Err(Error::InvalidArgument(format!(
                            "{field}.{kind}: mappings {a:?} and {b:?} overlap"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Host ID of an in-pod ID, None when unmapped.
    pub fn to_host(maps: &[IdMap], id: u32) -> Option<u32> {
        maps.iter()
            .find(|m| id >= m.container_id && id - m.container_id < m.size)
            .map(|m| m.host_id + (id - m.container_id))
    }

    /// A stable short name for snapshot caching.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = serde_json::to_string(self).unwrap_or_default();
        hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string()
    }
}

fn map_text(maps: &[IdMap]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect()
}

/// Pinned namespaces of a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodNamespaces {
    pub userns: PathBuf,
    pub netns: Option<PathBuf>,
}

/// Runs `child` in a forked process (which must only make syscalls), lets
/// `parent` act on its PID while it waits, then releases and reaps it.
pub(crate) fn with_child(
    child: impl FnOnce() -> std::result::Result<(), nix::Error>,
    parent: impl FnOnce(nix::unistd::Pid) -> Result<()>,
) -> Result<()> {
    let (ready_r, ready_w) = pipe().map_err(|e| Error::Internal(format!("pipe: {e}")))?;
    let (go_r, go_w) = pipe().map_err(|e| Error::Internal(format!("pipe: {e}")))?;
    // SAFETY: the child only makes raw syscalls (unshare, mount, read, write,
    // _exit) before exiting; no allocation or locks.
    match unsafe { fork() }.map_err(|e| Error::Internal(format!("fork: {e}")))? {
        ForkResult::Child => {
            let res = child();
            let ok = res.is_ok();
            // "1", or "0" and the errno (for the parent's message).
            let errno = res.err().map_or(0, |e| e as i32).clamp(0, 255) as u8;
            let failed = [b'0', errno];
            let _ = write(ready_w.as_fd(), if ok { b"1" } else { &failed });
            let mut b = [0u8; 1];
            let _ = read(go_r.as_raw_fd(), &mut b);
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child: pid } => {
            drop(ready_w);
            drop(go_r);
            let mut b = [0u8; 2];
            let n = read(ready_r.as_raw_fd(), &mut b).unwrap_or(0);
            let res = if n >= 1 && b[0] == b'1' {
                parent(pid)
            } else {
                let why = if n == 2 {
                    nix::Error::from_raw(b[1] as i32).desc()
                } else {
                    "no answer"
                };
                Err(Error::Internal(format!(
                    "namespace helper process failed: {why}"
                )))
            };
            let _ = write(go_w.as_fd(), b"x");
            drop(go_w);
            let _ = waitpid(pid, None);
            res
        }
    }
}

fn pin(src: &Path, dst: &Path) -> Result<()> {
    std::fs::File::create(dst).map_err(|e| Error::io("creating", dst, e))?;
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| Error::io("pinning namespace at", dst, e.into()))
}

/// Creates a user namespace with `maps` (and, if asked, a network namespace
/// owned by it) and pins them under `dir`.
pub fn create(dir: &Path, id: &str, maps: &Mappings, with_netns: bool) -> Result<PodNamespaces> {
    let user_dir = dir.join("userns");
    let net_dir = dir.join("netns");
    for d in [&user_dir, &net_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, e))?;
    }
    let userns = user_dir.join(id);
    let netns = with_netns.then(|| net_dir.join(id));
    let mut flags = CloneFlags::CLONE_NEWUSER;
    if with_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let res = with_child(
        || unshare(flags),
        |pid| {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            std::fs::write(proc.join("uid_map"), map_text(&maps.uids))
                .map_err(|e| Error::io("writing", proc.join("uid_map"), e))?;
            std::fs::write(proc.join("gid_map"), map_text(&maps.gids))
                .map_err(|e| Error::io("writing", proc.join("gid_map"), e))?;
            pin(&proc.join("ns/user"), &userns)?;
            if let Some(n) = &netns {
                pin(&proc.join("ns/net"), n)?;
            }
            Ok(())
        },
    );
    if let Err(e) = res {
        let _ = remove(&PodNamespaces {
            userns: userns.clone(),
            netns: netns.clone(),
        });
        return Err(e);
    }
    Ok(PodNamespaces { userns, netns })
}

/// Unpins a pod's namespaces; missing ones are fine.
pub fn remove(ns: &PodNamespaces) -> Result<()> {
    if let Some(n) = &ns.netns {
        crate::netns::remove(n)?;
    }
    crate::netns::remove(&ns.userns)
}

/// Chowns every file below `root` from in-pod IDs to host IDs, keeping
/// setuid/setgid bits (chown clears them).
pub fn remap_tree(root: &Path, maps: &Mappings) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
        let uid = Mappings::to_host(&maps.uids, meta.uid()).unwrap_or(meta.uid());
        let gid = Mappings::to_host(&maps.gids, meta.gid()).unwrap_or(meta.gid());
        nix::unistd::fchownat(
            None,
            &p,
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io("chown", &p, e.into()))?;
        let ft = meta.file_type();
        if !ft.is_symlink() && meta.mode() & 0o6000 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| Error::io("chmod", &p, e))?;
        }
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io("reading", &p, e))? {
                stack.push(e.map_err(|e| Error::io("reading", &p, e))?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_translate_ids() {
        let m = Mappings::range(100_000, 65536);
        assert_eq!(Mappings::to_host(&m.uids, 0), Some(100_000));
        assert_eq!(Mappings::to_host(&m.uids, 1000), Some(101_000));
        assert_eq!(Mappings::to_host(&m.uids, 65536), None);
        assert_eq!(map_text(&m.uids), "0 100000 65536\n");
        assert_eq!(
            m.fingerprint(),
            Mappings::range(100_000, 65536).fingerprint()
        );
        assert_ne!(
            m.fingerprint(),
            Mappings::range(200_000, 65536).fingerprint()
        );
    }

    #[test]
    fn validation() {
        assert!(Mappings::range(1, 10).validate("u").is_ok());
        let bad = Mappings {
            uids: vec![],
            gids: vec![],
        };
        assert!(bad
            .validate("u")
            .unwrap_err()
            .to_string()
            .contains("u.uids"));
        let overlap = Mappings {
            uids: vec![
                IdMap {
                    container_id: 0,
                    host_id: 100,
                    size: 10,
                },
                IdMap {
                    container_id: 5,
                    host_id: 200,
                    size: 10,
                },
            ],
            gids: vec![IdMap {
                container_id: 0,
                host_id: 100,
                size: 10,
            }],
        };
        assert!(overlap
            .validate("u")
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        let overflow = Mappings::range(u32::MAX, 2);
        assert!(overflow.validate("u").is_err());
    }

    #[test]
    fn remap_chowns_and_keeps_setuid() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), "x").unwrap();
        std::fs::set_permissions(
            d.path().join("sub/f"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::os::unix::fs::symlink("f", d.path().join("sub/l")).unwrap();
        remap_tree(d.path(), &Mappings::range(300_000, 65536)).unwrap();
        let m = std::fs::metadata(d.path().join("sub/f")).unwrap();
        assert_eq!((m.uid(), m.gid()), (300_000, 300_000));
        assert_eq!(m.mode() & 0o7777, 0o4755);
        let l = std::fs::symlink_metadata(d.path().join("sub/l")).unwrap();
        assert_eq!(l.uid(), 300_000);
    }

    #[test]
    fn pinned_userns_has_the_mapping() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let ns = create(d.path(), "pod", &Mappings::range(400_000, 65536), true).unwrap();
        assert!(ns.userns.exists() && ns.netns.as_ref().unwrap().exists());
        // The pin is a nsfs mount: its inode differs from an empty file's.
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&ns.userns).unwrap().ino();
        let own = std::fs::metadata("/proc/self/ns/user").unwrap().ino();
        assert_ne!(ino, own);
        remove(&ns).unwrap();
        assert!(!ns.userns.exists());
    }
}
