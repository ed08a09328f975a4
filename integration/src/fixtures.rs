//! Configs tests share: unique pods and simple containers.

use crate::cri;

/// A unique pod config for tests running in parallel.
pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    let uid = format!("{name}-{:08x}", rand::random::<u32>());
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        // Inside this test process's directory, which goes at its exit.
        log_directory: std::env::temp_dir()
            .join(format!("imacri-it-{}", std::process::id()))
            .join("pod-logs")
            .join(&uid)
            .to_string_lossy()
            .into(),
        labels: [("app".to_string(), name.to_string())].into(),
        annotations: [("test".to_string(), "yes".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// Shares no pid namespace, as kubelet sends a pod without
/// `shareProcessNamespace` (no namespace options at all would mean POD);
/// other namespace options (a user namespace) are kept. imacri runs such a
/// pod without pause.
pub fn own_pids(cfg: &mut cri::PodSandboxConfig) {
    namespace_options(cfg).pid = cri::NamespaceMode::Container as i32;
}

/// The pod's namespace options, made where missing.
fn namespace_options(cfg: &mut cri::PodSandboxConfig) -> &mut cri::NamespaceOption {
    cfg.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// A user namespace of the pod's own with the given host IDs (kubelet's
/// request for `hostUsers: false`); other namespace options are kept.
pub fn pod_userns(cfg: &mut cri::PodSandboxConfig, host_id: u32) {
    let map = vec![cri::IdMapping {
        host_id,
        container_id: 0,
        length: 65536,
    }];
    namespace_options(cfg).userns_options = Some(cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: map.clone(),
        gids: map,
    });
}

pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("container".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// A container's `linux` with only a security context, set up by `f`.
pub fn security_context(
    f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
) -> Option<cri::LinuxContainerConfig> {
    let mut s = cri::LinuxContainerSecurityContext::default();
    f(&mut s);
    Some(cri::LinuxContainerConfig {
        security_context: Some(s),
        ..Default::default()
    })
}

/// The directory kubelet keeps the pod's emptyDir volume `name` in,
/// beneath `root` (`<root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`),
/// created: a memory-backed volume is measured (`volumes = "measure"`) only
/// there, as the pod's own.
pub fn kubelet_volume(
    root: &std::path::Path,
    cfg: &cri::PodSandboxConfig,
    name: &str,
) -> std::path::PathBuf {
    let uid = cfg.metadata.as_ref().map_or("", |m| m.uid.as_str());
    let p = root
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// [`kubelet_volume`] with a tmpfs of its own (16 MiB) mounted there, as a
/// memory-backed emptyDir: a volume `volumes = "measure"` measures. The
/// caller unmounts it.
pub fn kubelet_tmpfs_volume(
    root: &std::path::Path,
    cfg: &cri::PodSandboxConfig,
    name: &str,
) -> std::path::PathBuf {
    let p = kubelet_volume(root, cfg, name);
    nix::mount::mount(
        Some("tmpfs"),
        &p,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();
    p
}
