//! ID-mapped mounts for user-namespace pods: volumes, and the image layers
//! under a container's root filesystem. Files keep their host owners on
//! disk; the mount shows them shifted into the pod's ID range, so no pod
//! costs a chowned copy of its image (runc 1.1 cannot idmap by itself).

use containerd_client::types::Mount;
use nix::mount::{mount, MsFlags};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::mount::{mount_setattr, MountAttr, MOUNT_ATTR_IDMAP};
use crate::userns::Mappings;
use crate::{Error, Result};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} has a NUL byte", p.display())))
}

/// A detached, ID-mapped clone of the mount tree at `src` (not attached
/// anywhere: it vanishes with its fd unless moved or used as a layer).
fn idmapped_tree(src: &Path, userns: &std::fs::File, recursive: bool) -> Result<OwnedFd> {
    let c_src = cstr(src)?;
    let empty = CString::default();
    let rec = if recursive {
        libc::AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    // SAFETY: plain syscall with a valid C string.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c_src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | rec,
        )
    };
    if tree < 0 {
        return Err(Error::io(
            "cloning mount of",
            src,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: open_tree returned a new file descriptor we now own.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: `empty` is a valid C string and `attr` a properly sized struct.
    let r = unsafe {
        mount_setattr(
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | rec,
            &attr,
        )
    };
    if r < 0 {
        return Err(Error::FailedPrecondition(format!(
            "ID-mapping {}: {} (the filesystem must support idmapped mounts)",
            src.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(tree)
}

fn open_userns(userns: &Path) -> Result<std::fs::File> {
    std::fs::File::open(userns).map_err(|e| Error::io("opening", userns, e))
}

/// Makes an ID-mapped copy of the mount at `src` at `dst`, mapped through
/// the user namespace pinned at `userns`: files owned by host IDs appear
/// owned by the matching in-pod IDs inside that namespace (and what the pod
/// writes lands with the host IDs). The container then bind-mounts `dst`.
pub fn idmapped_bind(src: &Path, dst: &Path, userns: &Path) -> Result<()> {
    let tree = idmapped_tree(src, &open_userns(userns)?, true)?;
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    if src.is_dir() {
        std::fs::create_dir_all(dst).map_err(|e| Error::io("creating", dst, e))?;
    } else {
        std::fs::File::create(dst).map_err(|e| Error::io("creating", dst, e))?;
    }
    let (c_dst, empty) = (cstr(dst)?, CString::default());
    // SAFETY: valid fd and C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c_dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(Error::io(
            "attaching ID-mapped mount at",
            dst,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The parts of containerd's overlay mount for an active snapshot.
#[derive(Debug, PartialEq)]
struct Overlay<'a> {
    lowers: Vec<&'a str>,
    upper: &'a str,
    /// Every other option, kept as given (workdir, index=off, ...).
    rest: Vec<&'a str>,
}

fn parse_overlay(mounts: &[Mount]) -> Option<Overlay<'_>> {
    let [m] = mounts else { return None };
    if m.r#type != "overlay" {
        return None;
    }
    let (mut lowers, mut upper, mut rest) = (Vec::new(), None, Vec::new());
    for o in &m.options {
        if let Some(l) = o.strip_prefix("lowerdir=") {
            lowers = l.split(':').filter(|s| !s.is_empty()).collect();
        } else if let Some(u) = o.strip_prefix("upperdir=") {
            upper = Some(u);
            rest.push(o.as_str());
        } else {
            rest.push(o.as_str());
        }
    }
    (!lowers.is_empty()).then_some(Overlay {
        lowers,
        upper: upper?,
        rest,
    })
}

/// Mounts a container's root filesystem at `target` from containerd's
/// overlay mount of its snapshot, with every image layer ID-mapped through
/// the pod's user namespace. The layers are referred to by their detached
/// mounts' fds (short options whatever the layer count; overlay keeps its
/// own reference to each, so nothing is left to clean up but `target`).
/// The (empty) upper directory's root is given to the pod's root, as the
/// image's root directory appears to be.
pub fn idmapped_rootfs(
    mounts: &[Mount],
    target: &Path,
    userns: &Path,
    maps: &Mappings,
) -> Result<()> {
    let ov = parse_overlay(mounts).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "snapshot mounts {:?} are not an overlay with image layers",
            mounts.iter().map(|m| &m.r#type).collect::<Vec<_>>()
        ))
    })?;
    let ns = open_userns(userns)?;
    let trees = ov
        .lowers
        .iter()
        .map(|l| idmapped_tree(Path::new(l), &ns, false))
        .collect::<Result<Vec<_>>>()?;
    let (uid, gid) = (
        Mappings::to_host(&maps.uids, 0).unwrap_or(0),
        Mappings::to_host(&maps.gids, 0).unwrap_or(0),
    );
    nix::unistd::chown(ov.upper, Some(uid.into()), Some(gid.into()))
        .map_err(|e| Error::io("chown", ov.upper, e.into()))?;
    let me = std::process::id();
    let lowerdir = trees
        .iter()
        .map(|t| format!("/proc/{me}/fd/{}", t.as_raw_fd()))
        .collect::<Vec<_>>()
        .join(":");
    let mut data = ov.rest.clone();
    let lower_opt = format!("lowerdir={lowerdir}");
    data.push(&lower_opt);
    std::fs::create_dir_all(target).map_err(|e| Error::io("creating", target, e))?;
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.join(",").as_str()),
    )
    .map_err(|e| Error::io("mounting ID-mapped rootfs at", target, e.into()))?;
    Ok(())
}

/// Whether this node can build ID-mapped root filesystems: a real
/// overlay of an ID-mapped layer in `scratch` (which must be on the
/// snapshotter's filesystem to say anything about it). Err says why not.
pub fn probe_rootfs(scratch: &Path) -> std::result::Result<(), String> {
    let run = || -> Result<()> {
        let d = scratch.join(format!("idmap-probe-{}", std::process::id()));
        let (lower, upper, work, merged) = (
            d.join("lower"),
            d.join("upper"),
            d.join("work"),
            d.join("merged"),
        );
        for p in [&lower, &upper, &work] {
            std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
        }
        std::fs::write(lower.join("f"), "x").map_err(|e| Error::io("writing", &lower, e))?;
        let res = (|| {
            let ns = crate::userns::create(&d, "probe", &Mappings::range(700_000, 65536), false)?;
            let m = Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", work.display()),
                    format!("upperdir={}", upper.display()),
                    format!("lowerdir={}", lower.display()),
                ],
                ..Default::default()
            };
            let r = idmapped_rootfs(&[m], &merged, &ns.userns, &Mappings::range(700_000, 65536))
                .and_then(|()| {
                    use std::os::unix::fs::MetadataExt;
                    let uid = std::fs::metadata(merged.join("f"))
                        .map_err(|e| Error::io("stat", &merged, e))?
                        .uid();
                    if uid == 700_000 {
                        Ok(())
                    } else {
                        Err(Error::FailedPrecondition(format!(
                            "overlay shows an ID-mapped layer's file as uid {uid}, not 700000"
                        )))
                    }
                });
            let _ = crate::mount::unmount_all(&merged);
            let _ = crate::userns::remove(&ns);
            r
        })();
        let _ = std::fs::remove_dir_all(&d);
        res
    };
    run().map_err(|e| e.to_string())
}

/// [`probe_rootfs`] on the snapshotter's own filesystem: inside a
/// throwaway empty snapshot, removed again.
pub async fn probe_snapshotter(
    c: &crate::containerd::Containerd,
    snapshotter: &str,
) -> std::result::Result<(), String> {
    use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
    let key = format!("imacri-idmap-probe-{}", std::process::id());
    let lease = c.lease("idmap-probe").await.map_err(|e| e.to_string())?;
    let res = match c.prepare_snapshot(snapshotter, &key, "", &lease).await {
        Ok(m) => match m.first().filter(|m| m.r#type == "bind") {
            Some(m) => probe_rootfs(Path::new(&m.source)),
            None => Err(format!(
                "snapshotter {snapshotter} gave {:?} for an empty snapshot",
                m.iter().map(|m| &m.r#type).collect::<Vec<_>>()
            )),
        },
        Err(e) => Err(e.to_string()),
    };
    let _ = c
        .snapshots()
        .remove(c.req(RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key,
        }))
        .await;
    let _ = lease.delete(c, false).await;
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userns::{create, remove};

    fn overlay(opts: &[&str]) -> Mount {
        Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn overlay_options_are_split() {
        let m = [overlay(&[
            "index=off",
            "workdir=/s/2/work",
            "upperdir=/s/2/fs",
            "lowerdir=/s/1/fs:/s/0/fs",
        ])];
        let o = parse_overlay(&m).unwrap();
        assert_eq!(o.lowers, ["/s/1/fs", "/s/0/fs"]);
        assert_eq!(o.upper, "/s/2/fs");
        assert_eq!(
            o.rest,
            ["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs"]
        );
        // No layers (an empty parent) or not overlay: nothing to map.
        let bind = Mount {
            r#type: "bind".into(),
            ..Default::default()
        };
        assert!(parse_overlay(&[bind]).is_none());
        assert!(parse_overlay(&[overlay(&["upperdir=/u", "workdir=/w"])]).is_none());
    }

    #[test]
    fn rootfs_probe_passes_here() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        probe_rootfs(d.path()).unwrap();
    }

    #[test]
    fn idmapped_rootfs_shifts_layers_and_keeps_writes_shifted() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path();
        for s in ["l0/bin", "l1/etc", "up", "work"] {
            std::fs::create_dir_all(p.join(s)).unwrap();
        }
        std::fs::write(p.join("l0/bin/sh"), "x").unwrap();
        std::fs::write(p.join("l1/etc/passwd"), "root").unwrap();
        let maps = Mappings::range(600_000, 65536);
        let ns = create(p, "pod", &maps, false).unwrap();
        let m = overlay(&[
            &format!("workdir={}", p.join("work").display()),
            &format!("upperdir={}", p.join("up").display()),
            &format!(
                "lowerdir={}:{}",
                p.join("l1").display(),
                p.join("l0").display()
            ),
        ]);
        let root = p.join("rootfs");
        idmapped_rootfs(&[m], &root, &ns.userns, &maps).unwrap();
        for f in ["bin/sh", "etc/passwd", "."] {
            assert_eq!(
                std::fs::metadata(root.join(f)).unwrap().uid(),
                600_000,
                "{f}"
            );
        }
        // Layers themselves stay untouched.
        assert_eq!(std::fs::metadata(p.join("l0/bin/sh")).unwrap().uid(), 0);
        // A copied-up file keeps the shifted owner on the upper layer.
        std::fs::write(root.join("etc/passwd"), "root2").unwrap();
        assert_eq!(
            std::fs::metadata(p.join("up/etc/passwd")).unwrap().uid(),
            600_000
        );
        crate::mount::unmount_all(&root).unwrap();
        remove(&ns).unwrap();
    }

    #[test]
    fn idmapped_volume_shows_host_files_shifted() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("f"), "x").unwrap();
        let ns = create(d.path(), "pod", &Mappings::range(500_000, 65536), false).unwrap();
        let dst = d.path().join("mapped");
        idmapped_bind(&vol, &dst, &ns.userns).unwrap();
        // Seen from the host, the host-root-owned file is shifted up.
        assert_eq!(std::fs::metadata(dst.join("f")).unwrap().uid(), 500_000);
        crate::mount::unmount_all(&dst).unwrap();
        remove(&ns).unwrap();
    }
}
