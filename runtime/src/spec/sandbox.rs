//! The pause container's spec.

use super::*;

/// Spec of the pause container.
// Older kubelets still send the deprecated profile-path fields.
#[allow(deprecated)]
pub fn sandbox_spec(
    id: &str,
    config: &cri::PodSandboxConfig,
    image: &ImageConfiguration,
    shared: &SandboxShared,
    node: NodeFacts,
) -> Result<Spec> {
    let netns = shared.netns.as_deref();
    let linux_cfg = config.linux.clone().unwrap_or_default();
    let sc = linux_cfg.security_context.clone().unwrap_or_default();
    let (_, pid_mode, ipc_mode) = ns_mode(sc.namespace_options.as_ref());
    let host_pid = pid_mode == cri::NamespaceMode::Node as i32;
    let host_ipc = ipc_mode == cri::NamespaceMode::Node as i32;

    let mut args: Vec<String> = image
        .config()
        .as_ref()
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    args.extend(
        image
            .config()
            .as_ref()
            .and_then(|c| c.cmd().clone())
            .unwrap_or_default(),
    );
    if args.is_empty() {
        args = vec!["/pause".into()];
    }
    let image_env = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let (uid, gid) = match (&sc.run_as_user, &sc.run_as_group) {
        (Some(u), g) => (u.value as u32, g.as_ref().map_or(0, |g| g.value as u32)),
        (None, Some(_)) => {
            return Err(Error::InvalidArgument(
                "linux.security_context.run_as_group requires run_as_user".into(),
            ))
        }
        (None, None) => image_user_numeric(image).unwrap_or((0, 0)),
    };
    let process = oci(ProcessBuilder::default()
        .args(args)
        .env(merge_env(&image_env, &[]))
        .cwd("/")
        .user(oci(UserBuilder::default().uid(uid).gid(gid).build())?)
        .no_new_privileges(true)
        .oom_score_adj(clamp_oom(-998, node))
        .capabilities(capability_sets(&HashSet::new(), &HashSet::new())?)
        .build())?;

    let mut namespaces = vec![
        ns(LinuxNamespaceType::Mount, None)?,
        ns(LinuxNamespaceType::Network, netns.map(Path::to_path_buf))?,
        ns(LinuxNamespaceType::Uts, None)?,
    ];
    if !host_pid {
        namespaces.push(ns(LinuxNamespaceType::Pid, None)?);
    }
    if !host_ipc {
        namespaces.push(ns(LinuxNamespaceType::Ipc, None)?);
    }
    if netns.is_none() {
        // Host network: keep the host's network (and UTS, like containerd).
        namespaces.retain(|n| {
            n.typ() != LinuxNamespaceType::Network && n.typ() != LinuxNamespaceType::Uts
        });
    }
    let mut res = resources(linux_cfg.resources.as_ref())?;
    // Pause gets pod-level limits only through the parent cgroup.
    res.set_cpu(None);
    res.set_memory(None);
    let mut lb = with_userns(
        LinuxBuilder::default(),
        &mut namespaces,
        shared.userns.as_ref(),
    )?;
    if let Some(p) = crate::seccomp::profile(
        "linux.security_context.seccomp",
        sc.seccomp.as_ref(),
        &sc.seccomp_profile_path,
        &HashSet::new(),
    )? {
        lb = lb.seccomp(p);
    }
    let linux = oci(lb
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(cgroup_path(&linux_cfg.cgroup_parent, id)))
        .resources(res)
        .sysctl(linux_cfg.sysctls.clone())
        .masked_paths(
            DEFAULT_MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            DEFAULT_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .build())?;
    let b = SpecBuilder::default()
        .version("1.0.2")
        .root(oci(RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build())?)
        .process(process)
        .mounts(base_mounts(true)?)
        .linux(linux)
        .annotations({
            let mut a = sandbox_annotations(id, config);
            a.extend(shared.annotations.clone());
            a
        });
    let mut spec = oci(b.build())?;
    // oci-spec's defaults would name every host "youki".
    spec.set_hostname(
        (netns.is_some() && !config.hostname.is_empty()).then(|| config.hostname.clone()),
    );
    clear_process_defaults(&mut spec);
    Ok(spec)
}

pub(crate) fn sandbox_annotations(
    id: &str,
    config: &cri::PodSandboxConfig,
) -> HashMap<String, String> {
    let md = config.metadata.clone().unwrap_or_default();
    HashMap::from([
        ("io.kubernetes.cri.container-type".into(), "sandbox".into()),
        ("io.kubernetes.cri.sandbox-id".into(), id.to_string()),
        ("io.kubernetes.cri.sandbox-name".into(), md.name),
        ("io.kubernetes.cri.sandbox-namespace".into(), md.namespace),
        ("io.kubernetes.cri.sandbox-uid".into(), md.uid),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_support::*;

    #[test]
    fn sandbox_spec_uses_netns_and_hostname() {
        let img = image(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": []}
        }));
        let cfg = cri::PodSandboxConfig {
            hostname: "h".into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                sysctls: HashMap::from([("net.ipv4.ip_forward".into(), "1".into())]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sh = SandboxShared {
            pinned: None,
            netns: Some("/n".into()),
            ..Default::default()
        };
        let spec = sandbox_spec(
            "sid",
            &cfg,
            &img,
            &sh,
            NodeFacts {
                min_oom_score_adj: 0,
                hugetlb: true,
                apparmor: false,
                cap_bounding: u64::MAX,
            },
        )
        .unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("h"));
        let p = spec.process().clone().unwrap();
        assert_eq!(p.user().uid(), 65535);
        assert_eq!(p.oom_score_adj(), Some(0));
        let l = spec.linux().clone().unwrap();
        assert_eq!(l.sysctl().clone().unwrap()["net.ipv4.ip_forward"], "1");
        assert_eq!(
            l.cgroups_path().clone().unwrap(),
            PathBuf::from("/imacri/sid")
        );
    }
}
