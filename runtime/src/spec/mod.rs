//! OCI runtime specs for pod sandboxes (pause) and containers, built from CRI
//! configs and image configs, as small options composed in `container_spec`
//! (containerd's `opts`): process, capabilities, namespaces, mounts, devices,
//! resources, security, sandbox. Pure: the node's facts come in as a
//! [`NodeFacts`] value ([`NodeFacts::probe`] is the one reader of the host)
//! and host paths arrive resolved, so every option is unit-tested without
//! root.

use imacri_api::cri;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCpuBuilder, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder,
    LinuxDeviceType, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResources, LinuxResourcesBuilder, Mount,
    MountBuilder, Process, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

mod capabilities;
mod devices;
mod mounts;
mod namespaces;
mod process;
mod resources;
mod sandbox;
mod security;

pub use capabilities::*;
pub use devices::check_userns_devices;
pub(crate) use devices::*;
pub use mounts::*;
pub use namespaces::*;
pub use process::*;
pub use resources::*;
pub use sandbox::*;
pub use security::*;

fn oci<T>(r: std::result::Result<T, oci_spec::OciSpecError>) -> Result<T> {
    r.map_err(|e| Error::Internal(format!("building OCI spec: {e}")))
}

/// Namespaces and files the sandbox provides to its containers.
#[derive(Debug, Clone, Default)]
pub struct SandboxShared {
    /// Persisted network namespace, None for host network.
    pub netns: Option<PathBuf>,
    /// PID of the pause process, to join its ipc/uts/pid namespaces.
    pub pause_pid: u32,
    /// A pod without pause: the UTS/IPC namespaces imacri pinned instead.
    pub pinned: Option<crate::podns::Pinned>,
    /// Sandbox files bind-mounted into every container.
    pub hostname_file: Option<PathBuf>,
    pub hosts_file: Option<PathBuf>,
    pub resolv_file: Option<PathBuf>,
    /// tmpfs shared as /dev/shm when IPC is pod-wide.
    pub shm_dir: Option<PathBuf>,
    /// The pod's pinned user namespace and its mappings.
    pub userns: Option<(PathBuf, crate::userns::Mappings)>,
    /// Annotations every container of the pod carries (the ima setting).
    pub annotations: HashMap<String, String>,
}

/// Facts about the node the spec depends on, probed once by the caller and
/// passed in as a value: no option reads the host.
#[derive(Debug, Clone, Copy)]
pub struct NodeFacts {
    /// Lowest oom_score_adj we may ask for (our own when restricted).
    pub min_oom_score_adj: i32,
    /// The hugetlb cgroup controller exists. kubelet sends hugepage limits
    /// (often 0) for every container; without the controller runc fails,
    /// so they are dropped, as containerd's default
    /// `tolerate_missing_hugetlb_controller` does.
    pub hugetlb: bool,
    /// AppArmor is enabled (a Localhost profile can be applied).
    pub apparmor: bool,
    /// imacri's capability bounding set: nothing outside it can be granted.
    pub cap_bounding: u64,
}

impl NodeFacts {
    /// This node, as it is now.
    pub fn probe(min_oom_score_adj: i32) -> NodeFacts {
        NodeFacts {
            min_oom_score_adj,
            hugetlb: crate::sysinfo::hugetlb_controller(),
            apparmor: crate::sysinfo::apparmor_enabled(),
            cap_bounding: crate::sysinfo::cap_bounding(),
        }
    }
}

/// Everything CreateContainer resolved before building the spec.
pub struct ContainerInputs<'a> {
    pub id: &'a str,
    pub sandbox_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox_config: &'a cri::PodSandboxConfig,
    pub image: &'a ImageConfiguration,
    pub image_name: &'a str,
    pub user: ProcessUser,
    pub shared: &'a SandboxShared,
    pub node: NodeFacts,
    /// PID of the running container `namespace_options.target_id` names.
    pub pid_target: Option<u32>,
    /// The host's device nodes, for a privileged container.
    pub host_devices: Vec<oci_spec::runtime::LinuxDevice>,
}

/// A container's spec, composed of one option per concern, each in its own
/// file and unit-tested there: process, namespaces, mounts, devices and
/// resources, security.
// Older kubelets still send the deprecated profile-path fields.
#[allow(deprecated)]
pub fn container_spec(i: &ContainerInputs<'_>) -> Result<Spec> {
    let lc = i.config.linux.clone().unwrap_or_default();
    let sc = lc.security_context.clone().unwrap_or_default();
    let caps = capabilities(Some(&sc), i.node.cap_bounding)?;
    let process = container_process(i, &sc, &caps)?;
    let mut namespaces = container_namespaces(i, &sc)?;
    let (mounts, rootfs_propagation) = container_mounts(i, &sc)?;
    let mut res = resources(lc.resources.as_ref())?;
    if !i.node.hugetlb {
        res.set_hugepage_limits(None);
    }
    let devices = container_devices(i, &sc, &mut res)?;

    let lb = with_userns(
        LinuxBuilder::default(),
        &mut namespaces,
        i.shared.userns.as_ref(),
    )?;
    let mut lb = lb
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(cgroup_path(
            i.sandbox_config
                .linux
                .as_ref()
                .map_or("", |l| l.cgroup_parent.as_str()),
            i.id,
        )))
        .resources(res)
        .devices(devices);
    lb = confine(lb, &sc, &caps)?;
    if let Some(p) = rootfs_propagation {
        lb = lb.rootfs_propagation(p);
    }
    let mut spec = oci(SpecBuilder::default()
        .version("1.0.2")
        .root(oci(RootBuilder::default()
            .path("rootfs")
            .readonly(sc.readonly_rootfs)
            .build())?)
        .process(process)
        .mounts(mounts)
        .linux(oci(lb.build())?)
        .annotations(container_annotations(i))
        .build())?;
    // The hostname is the sandbox's UTS namespace's.
    spec.set_hostname(None);
    clear_process_defaults(&mut spec);
    let apparmor = apparmor_profile(sc.apparmor.as_ref(), &sc.apparmor_profile, i.node.apparmor)?;
    if let (Some(a), Some(p)) = (apparmor, spec.process_mut()) {
        p.set_apparmor_profile(Some(a));
    }
    Ok(spec)
}

/// The container's annotations, the pod's (its ima setting) and the CRI
/// ones runtimes and NRI plugins read.
fn container_annotations(i: &ContainerInputs<'_>) -> HashMap<String, String> {
    let mut annotations = i.config.annotations.clone();
    annotations.extend(i.shared.annotations.clone());
    annotations.extend([
        (
            "io.kubernetes.cri.container-type".to_string(),
            "container".to_string(),
        ),
        (
            "io.kubernetes.cri.sandbox-id".to_string(),
            i.sandbox_id.to_string(),
        ),
        (
            "io.kubernetes.cri.container-name".to_string(),
            i.config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
        ),
        (
            "io.kubernetes.cri.image-name".to_string(),
            i.image_name.to_string(),
        ),
    ]);
    annotations
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A node that allows everything (the facts a test varies are set on top).
    pub(crate) fn node() -> NodeFacts {
        NodeFacts {
            min_oom_score_adj: 0,
            hugetlb: true,
            apparmor: false,
            cap_bounding: u64::MAX,
        }
    }

    /// Inputs for container "c" of sandbox "s" (override fields on top).
    pub(crate) fn inputs<'a>(
        config: &'a cri::ContainerConfig,
        sandbox_config: &'a cri::PodSandboxConfig,
        image: &'a ImageConfiguration,
        shared: &'a SandboxShared,
    ) -> ContainerInputs<'a> {
        ContainerInputs {
            id: "c",
            sandbox_id: "s",
            config,
            sandbox_config,
            image,
            image_name: "b",
            user: ProcessUser::default(),
            shared,
            node: node(),
            pid_target: None,
            host_devices: Vec::new(),
        }
    }

    pub(crate) fn image(json: serde_json::Value) -> ImageConfiguration {
        serde_json::from_value(json).unwrap()
    }

    pub(crate) fn busybox() -> ImageConfiguration {
        image(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
    }

    pub(crate) fn kv(k: &str, v: &str) -> cri::KeyValue {
        cri::KeyValue {
            key: k.into(),
            value: v.into(),
        }
    }

    pub(crate) fn shared() -> SandboxShared {
        SandboxShared {
            pinned: None,
            netns: Some("/run/netns/x".into()),
            pause_pid: 42,
            hostname_file: Some("/s/hostname".into()),
            hosts_file: Some("/s/hosts".into()),
            resolv_file: Some("/s/resolv.conf".into()),
            shm_dir: Some("/s/shm".into()),
            userns: None,
            annotations: HashMap::new(),
        }
    }

    pub(crate) fn spec_with(
        sc: cri::LinuxContainerSecurityContext,
        pid_target: Option<u32>,
    ) -> Result<Spec> {
        let cfg = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(sc),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (sb, img, sh) = (cri::PodSandboxConfig::default(), busybox(), shared());
        container_spec(&ContainerInputs {
            pid_target,
            ..inputs(&cfg, &sb, &img, &sh)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::*;

    #[test]
    fn container_joins_sandbox_namespaces() {
        let img = busybox();
        let cfg = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            envs: vec![kv("X", "y")],
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    cpu_shares: 512,
                    oom_score_adj: -999,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    readonly_rootfs: true,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let sb = cri::PodSandboxConfig {
            hostname: "pod".into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/pod1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sh = shared();
        let spec = container_spec(&ContainerInputs {
            id: "cid",
            sandbox_id: "sid",
            image_name: "busybox",
            node: NodeFacts {
                min_oom_score_adj: -100,
                ..node()
            },
            ..inputs(&cfg, &sb, &img, &sh)
        })
        .unwrap();
        let linux = spec.linux().clone().unwrap();
        let nss = linux.namespaces().clone().unwrap();
        let path_of = |t| {
            nss.iter()
                .find(|n| n.typ() == t)
                .and_then(|n| n.path().clone())
        };
        assert_eq!(
            path_of(LinuxNamespaceType::Network),
            Some("/run/netns/x".into())
        );
        assert_eq!(
            path_of(LinuxNamespaceType::Pid),
            Some("/proc/42/ns/pid".into())
        );
        assert_eq!(
            path_of(LinuxNamespaceType::Ipc),
            Some("/proc/42/ns/ipc".into())
        );
        assert_eq!(
            linux.cgroups_path().clone().unwrap(),
            PathBuf::from("/kubepods/pod1/cid")
        );
        let p = spec.process().clone().unwrap();
        assert_eq!(p.cwd(), &PathBuf::from("/w"));
        assert_eq!(p.oom_score_adj(), Some(-100));
        let env = p.env().clone().unwrap();
        assert!(env.contains(&"X=y".to_string()) && env.contains(&"HOSTNAME=pod".to_string()));
        assert!(spec.root().clone().unwrap().readonly().unwrap());
        let mounts = spec.mounts().clone().unwrap();
        let shm = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/dev/shm"))
            .unwrap();
        assert_eq!(shm.source().clone().unwrap(), PathBuf::from("/s/shm"));
        let res = linux.resources().clone().unwrap();
        assert_eq!(res.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().clone().unwrap().shares(), Some(512));
        // None sent, none applied (containerd; kubelet always sends them).
        assert!(linux.masked_paths().clone().unwrap_or_default().is_empty());
        assert_eq!(spec.hostname(), &None);
        assert_eq!(p.rlimits(), &None);
    }
}
