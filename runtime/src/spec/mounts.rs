//! Mounts: the base set every container gets, CRI volumes as binds, and the ima rule that nothing outside the rootfs executes.

use super::*;

pub(crate) fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    oci(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build())
}

pub(crate) fn bind(dest: &str, source: &Path, options: &[&str]) -> Result<Mount> {
    let mut opts = vec!["rbind"];
    opts.extend_from_slice(options);
    mount(dest, "bind", &source.to_string_lossy(), &opts)
}

pub(crate) fn base_mounts(readonly_sys: bool) -> Result<Vec<Mount>> {
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &[
                "nosuid",
                "noexec",
                "nodev",
                if readonly_sys { "ro" } else { "rw" },
            ],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &[
                "nosuid",
                "noexec",
                "nodev",
                "relatime",
                if readonly_sys { "ro" } else { "rw" },
            ],
        )?,
    ])
}

/// Checks a container path: absolute, no `..`.
pub fn validate_container_path(field: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{field} {p:?} must be an absolute path"
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Error::InvalidArgument(format!(
            "{field} {p:?} must not contain \"..\""
        )));
    }
    Ok(())
}

pub(crate) fn sort_mounts(mounts: &mut [Mount]) {
    mounts.sort_by_key(|m| m.destination().components().count());
}

/// A CRI volume mount: bind with propagation and read-only flags.
pub fn user_mount(m: &cri::Mount) -> Result<(Mount, &'static str)> {
    validate_container_path("mount container_path", &m.container_path)?;
    if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "mount {}: image volumes are not supported by this runtime",
            m.container_path
        )));
    }
    if !Path::new(&m.host_path).is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "mount host_path {:?} must be an absolute path",
            m.host_path
        )));
    }
    // The caller resolved host_path on the host (symlinks, existence):
    // nothing here touches the host.
    let src = PathBuf::from(&m.host_path);
    if m.recursive_read_only
        && (!m.readonly || m.propagation != cri::MountPropagation::PropagationPrivate as i32)
    {
        return Err(Error::InvalidArgument(format!(
            "mount {}: recursive_read_only needs readonly and private propagation",
            m.container_path
        )));
    }
    let prop = match cri::MountPropagation::try_from(m.propagation) {
        Ok(cri::MountPropagation::PropagationPrivate) => "rprivate",
        Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
        Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "mount {}: unknown propagation {}",
                m.container_path, m.propagation
            )))
        }
    };
    let mut opts = vec![prop];
    opts.push(if m.recursive_read_only {
        "rro"
    } else if m.readonly {
        "ro"
    } else {
        "rw"
    });
    Ok((bind(&m.container_path, &src, &opts)?, prop))
}

/// For pods measured by the fanotify backend: only the rootfs and the
/// `measured` volume destinations (whose filesystems are marked) may hold
/// executables, so every other mount (volumes, /dev, tmpfs, the pod's files)
/// gets `noexec`. An execution from there fails with EACCES instead of going
/// unmeasured.
pub fn noexec_outside_rootfs(spec: &mut Spec, measured: &[String]) {
    if let Some(mounts) = spec.mounts_mut() {
        for m in mounts.iter_mut() {
            // Volumes the backend marks itself keep exec.
            if measured.iter().any(|d| Path::new(d) == m.destination()) {
                continue;
            }
            let mut opts = m.options().clone().unwrap_or_default();
            // runc applies noexec on a bind by remounting it, which in a user
            // namespace must keep the source's locked nosuid/nodev: ask for
            // them too (a pod under measurement needs neither). That remount
            // is the bind's top mount only, and a bind brings the mounts
            // beneath its source along, each with its own flags: a hostPath
            // of a directory holding a tmpfs (`/run`, `/dev`, kubelet's pods)
            // ran that tmpfs's files unmeasured until 2026-12-04. The
            // recursive attributes (runc >= 1.1, mount_setattr AT_RECURSIVE)
            // cover every mount of the tree.
            let bind = opts.iter().any(|o| o == "bind" || o == "rbind");
            let mut want = vec!["noexec"];
            if bind {
                want.extend(["nosuid", "nodev", "rnoexec", "rnosuid", "rnodev"]);
            }
            opts.retain(|o| o != "exec" && o != "suid" && o != "dev");
            for w in want {
                if !opts.iter().any(|o| o == w) {
                    opts.push(w.into());
                }
            }
            m.set_options(Some(opts));
        }
    }
}

/// The container's mounts: the base set, the pod's /etc files and
/// /dev/shm (unless a volume takes their place), then its volumes, sorted
/// parents first. Also the rootfs propagation its volumes need.
pub fn container_mounts(
    i: &ContainerInputs<'_>,
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<(Vec<Mount>, Option<&'static str>)> {
    let config = i.config;
    let (_, _, ipc_mode) = ns_mode(sc.namespace_options.as_ref());
    let mut mounts = base_mounts(!sc.privileged)?;
    let user_paths: HashSet<&str> = config
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    let etc = [
        ("/etc/hostname", &i.shared.hostname_file),
        ("/etc/hosts", &i.shared.hosts_file),
        ("/etc/resolv.conf", &i.shared.resolv_file),
    ];
    for (dest, src) in etc {
        if let Some(src) = src {
            if !user_paths.contains(dest) {
                let ro = if sc.readonly_rootfs { "ro" } else { "rw" };
                mounts.push(bind(dest, src, &[ro])?);
            }
        }
    }
    if !user_paths.contains("/dev/shm") {
        match (
            &i.shared.shm_dir,
            ipc_mode == cri::NamespaceMode::Node as i32,
        ) {
            (_, true) => mounts.push(bind("/dev/shm", Path::new("/dev/shm"), &["rw"])?),
            (Some(shm), false) => mounts.push(bind("/dev/shm", shm, &["rw"])?),
            (None, false) => mounts.push(mount(
                "/dev/shm",
                "tmpfs",
                "shm",
                &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            )?),
        }
    }
    let mut rootfs_propagation = None;
    for m in &config.mounts {
        let (mnt, prop) = user_mount(m)?;
        if prop == "rshared" || (prop == "rslave" && rootfs_propagation.is_none()) {
            rootfs_propagation = Some(prop);
        }
        mounts.push(mnt);
    }
    // Longer destinations after their parents, as runc mounts in order.
    sort_mounts(&mut mounts);
    Ok((mounts, rootfs_propagation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noexec_everywhere_but_rootfs() {
        let mut spec = Spec::default();
        let mut ms = base_mounts(false).unwrap();
        ms.push(bind("/data", Path::new("/srv/data"), &["rw", "exec"]).unwrap());
        ms.push(bind("/measured", Path::new("/srv/tmpfs"), &["rw"]).unwrap());
        spec.set_mounts(Some(ms));
        noexec_outside_rootfs(&mut spec, &["/measured".to_string()]);
        for m in spec.mounts().as_ref().unwrap() {
            if m.destination() == Path::new("/measured") {
                assert!(!m.options().clone().unwrap().iter().any(|o| o == "noexec"));
                continue;
            }
            let o = m.options().clone().unwrap_or_default();
            assert_eq!(o.iter().filter(|x| *x == "noexec").count(), 1, "{m:?}");
            assert!(!o.iter().any(|x| x == "exec"), "{m:?}");
            // A bind's mounts beneath it too.
            if o.iter().any(|x| x == "rbind") {
                assert!(o.iter().any(|x| x == "rnoexec"), "{m:?}");
            }
        }
    }

    #[test]
    fn container_paths_are_checked() {
        assert!(validate_container_path("p", "/data").is_ok());
        assert!(validate_container_path("p", "data").is_err());
        assert!(validate_container_path("p", "/a/../../etc").is_err());
    }

    #[test]
    fn mounts_map_propagation_and_readonly() {
        // Pure: the path need not exist (the caller resolved it).
        let m = cri::Mount {
            container_path: "/data".into(),
            host_path: "/srv/data".into(),
            readonly: true,
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        };
        let (mnt, prop) = user_mount(&m).unwrap();
        assert_eq!(prop, "rslave");
        let opts = mnt.options().clone().unwrap();
        assert!(opts.contains(&"ro".to_string()) && opts.contains(&"rbind".to_string()));
        assert_eq!(mnt.source().clone().unwrap(), PathBuf::from("/srv/data"));
        let relative = cri::Mount {
            host_path: "srv/data".into(),
            ..m.clone()
        };
        assert!(user_mount(&relative).is_err());
        let rel = cri::Mount {
            container_path: "../x".into(),
            ..m
        };
        assert!(user_mount(&rel).is_err());
    }
}
