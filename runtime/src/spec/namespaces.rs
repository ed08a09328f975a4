//! Namespaces: joining the sandbox's, the pod user namespace and its ID mappings.

use super::*;

pub(crate) fn id_maps(
    maps: &[crate::userns::IdMap],
) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>> {
    maps.iter()
        .map(|m| {
            oci(oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(m.container_id)
                .host_id(m.host_id)
                .size(m.size)
                .build())
        })
        .collect()
}

/// Joins the pod's user namespace: path plus the mappings runc validates.
pub(crate) fn with_userns(
    mut lb: LinuxBuilder,
    namespaces: &mut Vec<LinuxNamespace>,
    userns: Option<&(PathBuf, crate::userns::Mappings)>,
) -> Result<LinuxBuilder> {
    if let Some((path, maps)) = userns {
        namespaces.push(ns(LinuxNamespaceType::User, Some(path.clone()))?);
        lb = lb
            .uid_mappings(id_maps(&maps.uids)?)
            .gid_mappings(id_maps(&maps.gids)?);
    }
    Ok(lb)
}

pub fn ns_mode(opts: Option<&cri::NamespaceOption>) -> (i32, i32, i32) {
    opts.map_or((0, 0, 0), |n| (n.network, n.pid, n.ipc))
}

pub(crate) fn ns(typ: LinuxNamespaceType, path: Option<PathBuf>) -> Result<LinuxNamespace> {
    let b = LinuxNamespaceBuilder::default().typ(typ);
    oci(match path {
        Some(p) => b.path(p).build(),
        None => b.build(),
    })
}

/// The container's namespaces: a mount namespace of its own, the pod's
/// network/UTS, pid and IPC unless asked otherwise (NODE, CONTAINER, or a
/// debug TARGET), and the pod's user namespace added by `with_userns`.
pub fn container_namespaces(
    i: &ContainerInputs<'_>,
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<Vec<LinuxNamespace>> {
    let sandbox_sc = i
        .sandbox_config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let (_, pid_mode, ipc_mode) = ns_mode(sc.namespace_options.as_ref());
    let (net_mode, _, _) = ns_mode(sandbox_sc.namespace_options.as_ref());
    let pause = format!("/proc/{}/ns", i.shared.pause_pid);
    let mut namespaces = vec![ns(LinuxNamespaceType::Mount, None)?];
    if net_mode != cri::NamespaceMode::Node as i32 {
        namespaces.push(ns(
            LinuxNamespaceType::Network,
            Some(
                i.shared
                    .netns
                    .clone()
                    .unwrap_or_else(|| format!("{pause}/net").into()),
            ),
        )?);
        let uts = match &i.shared.pinned {
            Some(p) => p.uts.clone(),
            None => Some(format!("{pause}/uts").into()),
        };
        namespaces.push(ns(LinuxNamespaceType::Uts, uts)?);
    }
    match cri::NamespaceMode::try_from(pid_mode).unwrap_or(cri::NamespaceMode::Pod) {
        // A pod without pause shares no pid namespace (imacri keeps pause
        // for pods whose config asks to share one): POD in a container of
        // such a pod, which kubelet never sends, gets its own.
        cri::NamespaceMode::Pod if i.shared.pinned.is_some() => {
            namespaces.push(ns(LinuxNamespaceType::Pid, None)?)
        }
        cri::NamespaceMode::Pod => namespaces.push(ns(
            LinuxNamespaceType::Pid,
            Some(format!("{pause}/pid").into()),
        )?),
        cri::NamespaceMode::Container => namespaces.push(ns(LinuxNamespaceType::Pid, None)?),
        cri::NamespaceMode::Node => {}
        // `kubectl debug --target`: the target container's own pid
        // namespace, resolved by the caller.
        cri::NamespaceMode::Target => match i.pid_target {
            Some(pid) => namespaces.push(ns(
                LinuxNamespaceType::Pid,
                Some(format!("/proc/{pid}/ns/pid").into()),
            )?),
            None => {
                return Err(Error::InvalidArgument(
                    "linux.security_context.namespace_options.pid is TARGET but target_id names no running container".into(),
                ))
            }
        },
    }
    if ipc_mode != cri::NamespaceMode::Node as i32 {
        let ipc = match &i.shared.pinned {
            Some(p) => p.ipc.clone(),
            None => Some(format!("{pause}/ipc").into()),
        };
        namespaces.push(ns(LinuxNamespaceType::Ipc, ipc)?);
    }
    Ok(namespaces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_support::*;

    #[test]
    fn pid_target_joins_the_target_namespace() {
        let sc = cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: "t".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec_with(sc.clone(), Some(4242)).unwrap();
        let nss = spec.linux().clone().unwrap().namespaces().clone().unwrap();
        let pid = nss
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(pid.path().clone(), Some("/proc/4242/ns/pid".into()));
        assert!(spec_with(sc, None)
            .unwrap_err()
            .to_string()
            .contains("TARGET"));
    }

    #[test]
    fn userns_pods_join_by_path_with_mappings_and_annotations() {
        let mut sh = shared();
        sh.userns = Some((
            "/run/imacri/userns/p".into(),
            crate::userns::Mappings::range(1 << 20, 65536),
        ));
        sh.annotations = HashMap::from([("imacri.dev/ima".to_string(), "true".to_string())]);
        let cfg = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            ..Default::default()
        };
        let (sb, img) = (cri::PodSandboxConfig::default(), busybox());
        let spec = container_spec(&inputs(&cfg, &sb, &img, &sh)).unwrap();
        let l = spec.linux().clone().unwrap();
        let user = l
            .namespaces()
            .clone()
            .unwrap()
            .into_iter()
            .find(|n| n.typ() == LinuxNamespaceType::User)
            .unwrap();
        assert_eq!(
            user.path().clone().unwrap(),
            PathBuf::from("/run/imacri/userns/p")
        );
        let m = &l.uid_mappings().clone().unwrap()[0];
        assert_eq!(
            (m.container_id(), m.host_id(), m.size()),
            (0, 1 << 20, 65536)
        );
        assert_eq!(
            spec.annotations().clone().unwrap()["imacri.dev/ima"],
            "true"
        );
    }
}
