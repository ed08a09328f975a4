//! OCI runtime specs for pod sandboxes (pause) and containers, built from CRI
//! configs and image configs. Pure: no I/O, so every rule is unit-tested.

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

/// containerd's default capability set for containers.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

fn id_maps(maps: &[crate::userns::IdMap]) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>> {
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
fn with_userns(
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

/// Node facts the spec depends on.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Lowest oom_score_adj we may ask for (our own when restricted).
    pub min_oom_score_adj: i32,
    /// The hugetlb cgroup controller exists. kubelet sends hugepage limits
    /// (often 0) for every container; without the controller runc fails,
    /// so they are dropped, as containerd's default
    /// `tolerate_missing_hugetlb_controller` does.
    pub hugetlb: bool,
}

pub fn ns_mode(opts: Option<&cri::NamespaceOption>) -> (i32, i32, i32) {
    opts.map_or((0, 0, 0), |n| (n.network, n.pid, n.ipc))
}

fn ns(typ: LinuxNamespaceType, path: Option<PathBuf>) -> Result<LinuxNamespace> {
    let b = LinuxNamespaceBuilder::default().typ(typ);
    oci(match path {
        Some(p) => b.path(p).build(),
        None => b.build(),
    })
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    oci(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build())
}

fn bind(dest: &str, source: &Path, options: &[&str]) -> Result<Mount> {
    let mut opts = vec!["rbind"];
    opts.extend_from_slice(options);
    mount(dest, "bind", &source.to_string_lossy(), &opts)
}

fn base_mounts(readonly_sys: bool) -> Result<Vec<Mount>> {
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

/// Image environment overlaid with CRI envs (CRI wins per key).
pub fn merge_env(image_env: &[String], cri_env: &[cri::KeyValue]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    let mut put = |k: &str, v: String| {
        if !values.contains_key(k) {
            order.push(k.to_string());
        }
        values.insert(k.to_string(), v);
    };
    for e in image_env {
        let (k, _) = e.split_once('=').unwrap_or((e, ""));
        put(k, e.clone());
    }
    for kv in cri_env {
        put(&kv.key, format!("{}={}", kv.key, kv.value));
    }
    if !values.contains_key("PATH") {
        order.insert(0, "PATH".into());
        values.insert("PATH".into(), DEFAULT_PATH.into());
    }
    order
        .into_iter()
        .filter_map(|k| values.remove(&k))
        .collect()
}

/// containerd's rule: command replaces the entrypoint (and drops image cmd);
/// args alone replace the image cmd.
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<Vec<String>> {
    let ic = image.config().as_ref();
    let entrypoint = ic.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = ic.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let args = if !config.command.is_empty() {
        config.command.iter().chain(&config.args).cloned().collect()
    } else if !config.args.is_empty() {
        entrypoint.into_iter().chain(config.args.clone()).collect()
    } else {
        entrypoint.into_iter().chain(cmd).collect::<Vec<_>>()
    };
    if args.is_empty() {
        return Err(Error::InvalidArgument(
            "no command specified: neither the container config (command/args) nor the image has one"
                .into(),
        ));
    }
    Ok(args)
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

fn parse_capability(name: &str) -> Result<Capability> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    bare.parse()
        .map_err(|_| Error::InvalidArgument(format!("unknown capability {name:?}")))
}

/// Every capability this process may grant (its bounding set): root here
/// may lack some (e.g. CAP_SYS_RESOURCE), and runc fails on those.
fn all_caps() -> HashSet<Capability> {
    let bounding = crate::sysinfo::cap_bounding();
    strum_like::ALL
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
        .filter_map(|(_, n)| parse_capability(n).ok())
        .collect()
}

/// Names of every capability runc 1.1 knows, in capability-number order.
mod strum_like {
    pub const ALL: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
}

/// Capability set from defaults, add and drop ("ALL" allowed in both).
pub fn capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<HashSet<Capability>> {
    let mut caps: HashSet<Capability> = DEFAULT_CAPS
        .iter()
        .map(|c| parse_capability(c))
        .collect::<Result<_>>()?;
    let Some(sc) = sc else { return Ok(caps) };
    if sc.privileged {
        return Ok(all_caps());
    }
    if let Some(c) = &sc.capabilities {
        for a in &c.add_capabilities {
            if a.eq_ignore_ascii_case("ALL") {
                caps = all_caps();
            } else {
                caps.insert(parse_capability(a)?);
            }
        }
        for d in &c.drop_capabilities {
            if d.eq_ignore_ascii_case("ALL") {
                caps.clear();
            } else {
                caps.remove(&parse_capability(d)?);
            }
        }
        // Adds win over "drop ALL", as in containerd.
        for a in &c.add_capabilities {
            if !a.eq_ignore_ascii_case("ALL")
                && c.drop_capabilities
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case("ALL"))
            {
                caps.insert(parse_capability(a)?);
            }
        }
    }
    Ok(caps)
}

pub fn clamp_oom(requested: i64, limits: NodeLimits) -> i32 {
    let r = requested.clamp(-1000, 1000) as i32;
    r.max(limits.min_oom_score_adj)
}

/// Linux resources from CRI (container or pod-level).
pub fn resources(r: Option<&cri::LinuxContainerResources>) -> Result<LinuxResources> {
    let deny_all = oci(LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build())?;
    let mut b = LinuxResourcesBuilder::default().devices(vec![deny_all]);
    if let Some(r) = r {
        let mut cpu = LinuxCpuBuilder::default();
        let mut any_cpu = false;
        if r.cpu_period > 0 {
            cpu = cpu.period(r.cpu_period as u64);
            any_cpu = true;
        }
        if r.cpu_quota != 0 {
            cpu = cpu.quota(r.cpu_quota);
            any_cpu = true;
        }
        if r.cpu_shares > 0 {
            cpu = cpu.shares(r.cpu_shares as u64);
            any_cpu = true;
        }
        if !r.cpuset_cpus.is_empty() {
            cpu = cpu.cpus(r.cpuset_cpus.clone());
            any_cpu = true;
        }
        if !r.cpuset_mems.is_empty() {
            cpu = cpu.mems(r.cpuset_mems.clone());
            any_cpu = true;
        }
        if any_cpu {
            b = b.cpu(oci(cpu.build())?);
        }
        if r.memory_limit_in_bytes > 0 || r.memory_swap_limit_in_bytes > 0 {
            let mut m = LinuxMemoryBuilder::default();
            if r.memory_limit_in_bytes > 0 {
                m = m.limit(r.memory_limit_in_bytes);
            }
            if r.memory_swap_limit_in_bytes > 0 {
                m = m.swap(r.memory_swap_limit_in_bytes);
            }
            b = b.memory(oci(m.build())?);
        }
        if !r.hugepage_limits.is_empty() {
            let limits = r
                .hugepage_limits
                .iter()
                .map(|h| {
                    oci(LinuxHugepageLimitBuilder::default()
                        .page_size(h.page_size.clone())
                        .limit(h.limit as i64)
                        .build())
                })
                .collect::<Result<Vec<_>>>()?;
            b = b.hugepage_limits(limits);
        }
        if !r.unified.is_empty() {
            b = b.unified(r.unified.clone());
        }
    }
    oci(b.build())
}

/// cgroupfs path: `<parent>/<id>` (kubelet passes the pod's parent).
pub fn cgroup_path(parent: &str, id: &str) -> String {
    if parent.is_empty() {
        format!("/imacri/{id}")
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    }
}

/// Spec of the pause container.
// Older kubelets still send the deprecated profile-path fields.
#[allow(deprecated)]
pub fn sandbox_spec(
    id: &str,
    config: &cri::PodSandboxConfig,
    image: &ImageConfiguration,
    shared: &SandboxShared,
    limits: NodeLimits,
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
        .oom_score_adj(clamp_oom(-998, limits))
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

/// Drops what oci-spec's `Default` adds and containerd does not: rlimits
/// (NOFILE 1024) and a console size.
fn clear_process_defaults(spec: &mut Spec) {
    if let Some(p) = spec.process_mut() {
        p.set_rlimits(None);
        p.set_console_size(None);
    }
}

fn sandbox_annotations(id: &str, config: &cri::PodSandboxConfig) -> HashMap<String, String> {
    let md = config.metadata.clone().unwrap_or_default();
    HashMap::from([
        ("io.kubernetes.cri.container-type".into(), "sandbox".into()),
        ("io.kubernetes.cri.sandbox-id".into(), id.to_string()),
        ("io.kubernetes.cri.sandbox-name".into(), md.name),
        ("io.kubernetes.cri.sandbox-namespace".into(), md.namespace),
        ("io.kubernetes.cri.sandbox-uid".into(), md.uid),
    ])
}

fn capability_sets(
    caps: &HashSet<Capability>,
    ambient: &HashSet<Capability>,
) -> Result<oci_spec::runtime::LinuxCapabilities> {
    // Without ambient capabilities, inheritable and ambient stay empty as in
    // containerd (oci-spec's defaults would fill them). Ambient ones
    // (KEP-2763) must also be permitted and inheritable for the kernel to
    // keep them, and in the bounding set to survive exec.
    let all: HashSet<Capability> = caps.union(ambient).copied().collect();
    oci(oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(all.clone())
        .effective(all.clone())
        .permitted(all)
        .inheritable(ambient.clone())
        .ambient(ambient.clone())
        .build())
}

/// `add_ambient_capabilities` (KEP-2763): capabilities a non-root process
/// keeps across exec. containerd and CRI-O drop them; imacri honours them.
pub fn ambient_capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<HashSet<Capability>> {
    let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) else {
        return Ok(HashSet::new());
    };
    let mut out = HashSet::new();
    for a in &c.add_ambient_capabilities {
        if a.eq_ignore_ascii_case("ALL") {
            out.extend(all_caps());
        } else {
            out.insert(parse_capability(a).map_err(|e| {
                Error::InvalidArgument(format!(
                    "linux.security_context.capabilities.add_ambient_capabilities: {e}"
                ))
            })?);
        }
    }
    Ok(out)
}

/// The image's `User` when it is numeric ("1000", "1000:1000").
pub fn image_user_numeric(image: &ImageConfiguration) -> Option<(u32, u32)> {
    let user = image.config().as_ref()?.user().clone()?;
    if user.is_empty() {
        return Some((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((&user, ""));
    let uid = u.parse().ok()?;
    let gid = if g.is_empty() { 0 } else { g.parse().ok()? };
    Some((uid, gid))
}

/// The identity a container's first process runs as.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
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
    pub limits: NodeLimits,
    /// PID of the running container `namespace_options.target_id` names.
    pub pid_target: Option<u32>,
    /// The host's device nodes, for a privileged container.
    pub host_devices: Vec<oci_spec::runtime::LinuxDevice>,
}

// Older kubelets still send the deprecated profile-path fields.
#[allow(deprecated)]
pub fn container_spec(i: &ContainerInputs<'_>) -> Result<Spec> {
    let config = i.config;
    let lc = config.linux.clone().unwrap_or_default();
    let sc = lc.security_context.clone().unwrap_or_default();
    let sandbox_sc = i
        .sandbox_config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let (_, pid_mode, ipc_mode) = ns_mode(sc.namespace_options.as_ref());
    let (net_mode, _, _) = ns_mode(sandbox_sc.namespace_options.as_ref());

    let args = process_args(config, i.image)?;
    let ic = i.image.config().clone().unwrap_or_default();
    let mut env = merge_env(&ic.env().clone().unwrap_or_default(), &config.envs);
    if !i.sandbox_config.hostname.is_empty() && !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", i.sandbox_config.hostname));
    }
    let cwd = if !config.working_dir.is_empty() {
        validate_container_path("working_dir", &config.working_dir)?;
        config.working_dir.clone()
    } else {
        ic.working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    let caps = capabilities(Some(&sc))?;
    let oom = clamp_oom(
        lc.resources.as_ref().map_or(0, |r| r.oom_score_adj),
        i.limits,
    );
    let process = oci(ProcessBuilder::default()
        .terminal(config.tty)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(oci(UserBuilder::default()
            .uid(i.user.uid)
            .gid(i.user.gid)
            .additional_gids(i.user.additional_gids.clone())
            .build())?)
        .no_new_privileges(sc.no_new_privs)
        .oom_score_adj(oom)
        .capabilities(capability_sets(&caps, &ambient_capabilities(Some(&sc))?)?)
        .build())?;

    // Namespaces: join the sandbox's unless asked otherwise.
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
        namespaces.push(ns(
            LinuxNamespaceType::Uts,
            Some(format!("{pause}/uts").into()),
        )?);
    }
    match cri::NamespaceMode::try_from(pid_mode).unwrap_or(cri::NamespaceMode::Pod) {
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
        namespaces.push(ns(
            LinuxNamespaceType::Ipc,
            Some(format!("{pause}/ipc").into()),
        )?);
    }

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

    let mut res = resources(lc.resources.as_ref())?;
    if !i.limits.hugetlb {
        res.set_hugepage_limits(None);
    }
    let mut devices = Vec::new();
    let mut dev_rules = res.devices().clone().unwrap_or_default();
    if sc.privileged {
        dev_rules = vec![oci(LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build())?];
        // Every device node of the host, as containerd's WithHostDevices.
        devices.extend(i.host_devices.iter().cloned());
    }
    for d in &config.devices {
        let (dev, rule) = device(d)?;
        devices.retain(|x| x.path() != dev.path());
        devices.push(dev);
        dev_rules.push(rule);
    }
    res.set_devices(Some(dev_rules));

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
    if !sc.privileged {
        let field = "linux.security_context.seccomp";
        if let Some(p) =
            crate::seccomp::profile(field, sc.seccomp.as_ref(), &sc.seccomp_profile_path, &caps)?
        {
            lb = lb.seccomp(p);
        }
    }
    let apparmor = apparmor_profile(sc.apparmor.as_ref(), &sc.apparmor_profile)?;
    if sc.privileged {
        lb = lb
            .masked_paths(Vec::<String>::new())
            .readonly_paths(Vec::<String>::new());
    } else {
        // Exactly what kubelet sends, as containerd does: kubelet sends the
        // default lists for procMount Default and empty ones for Unmasked.
        lb = lb
            .masked_paths(sc.masked_paths.clone())
            .readonly_paths(sc.readonly_paths.clone());
    }
    if let Some(p) = rootfs_propagation {
        lb = lb.rootfs_propagation(p);
    }
    let mut annotations = config.annotations.clone();
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
            config
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
    let mut spec = oci(SpecBuilder::default()
        .version("1.0.2")
        .root(oci(RootBuilder::default()
            .path("rootfs")
            .readonly(sc.readonly_rootfs)
            .build())?)
        .process(process)
        .mounts(mounts)
        .linux(oci(lb.build())?)
        .annotations(annotations)
        .build())?;
    // The hostname is the sandbox's UTS namespace's.
    spec.set_hostname(None);
    clear_process_defaults(&mut spec);
    if let (Some(a), Some(p)) = (apparmor, spec.process_mut()) {
        p.set_apparmor_profile(Some(a));
    }
    Ok(spec)
}

/// AppArmor: a Localhost profile needs AppArmor on the node (clear error
/// otherwise); the runtime default is skipped where AppArmor is off, as
/// containerd does.
pub fn apparmor_profile(p: Option<&cri::SecurityProfile>, legacy: &str) -> Result<Option<String>> {
    use cri::security_profile::ProfileType;
    let wanted = match (p, legacy) {
        (Some(p), _) if p.profile_type == ProfileType::Localhost as i32 => {
            Some(p.localhost_ref.clone())
        }
        (None, l) if l.starts_with("localhost/") => {
            Some(l.trim_start_matches("localhost/").to_string())
        }
        _ => None,
    };
    let Some(name) = wanted else { return Ok(None) };
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    if !enabled {
        return Err(Error::FailedPrecondition(format!(
            "linux.security_context.apparmor asks for profile {name:?} but AppArmor is not enabled on this node"
        )));
    }
    Ok(Some(name))
}

fn sort_mounts(mounts: &mut [Mount]) {
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
    let src = std::fs::canonicalize(&m.host_path)
        .map_err(|e| Error::InvalidArgument(format!("mount host_path {:?}: {e}", m.host_path)))?;
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

fn device(
    d: &cri::Device,
) -> Result<(
    oci_spec::runtime::LinuxDevice,
    oci_spec::runtime::LinuxDeviceCgroup,
)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    validate_container_path("device container_path", &d.container_path)?;
    let meta = std::fs::metadata(&d.host_path)
        .map_err(|e| Error::InvalidArgument(format!("device host_path {:?}: {e}", d.host_path)))?;
    let ft = meta.file_type();
    let typ = if ft.is_char_device() {
        LinuxDeviceType::C
    } else if ft.is_block_device() {
        LinuxDeviceType::B
    } else {
        return Err(Error::InvalidArgument(format!(
            "device host_path {:?} is not a device",
            d.host_path
        )));
    };
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev) as i64, libc::minor(rdev) as i64);
    let perms = if d.permissions.is_empty() {
        "rwm"
    } else {
        d.permissions.as_str()
    };
    if !perms.chars().all(|c| "rwm".contains(c)) {
        return Err(Error::InvalidArgument(format!(
            "device {}: permissions {perms:?} must be a combination of r, w, m",
            d.container_path
        )));
    }
    let dev = oci(LinuxDeviceBuilder::default()
        .path(PathBuf::from(&d.container_path))
        .typ(typ)
        .major(major)
        .minor(minor)
        .file_mode(meta.mode() & 0o777)
        .uid(meta.uid())
        .gid(meta.gid())
        .build())?;
    let rule = oci(LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .major(major)
        .minor(minor)
        .access(perms)
        .build())?;
    Ok((dev, rule))
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
            // them too (a pod under measurement needs neither).
            let bind = opts.iter().any(|o| o == "bind" || o == "rbind");
            let mut want = vec!["noexec"];
            if bind {
                want.extend(["nosuid", "nodev"]);
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

/// Adds the draft runtime-spec `{"type": "ima"}` namespace (PR #1164).
/// oci-spec's namespace enum is closed, so this works on the JSON.
pub fn add_ima_namespace(spec: &mut serde_json::Value) {
    if let Some(nss) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(|v| v.as_array_mut())
    {
        if !nss.iter().any(|n| n["type"] == "ima") {
            nss.push(serde_json::json!({"type": "ima"}));
        }
    }
}

/// Process for ExecSync / Exec: the container's process with another command.
pub fn exec_process(base: &Process, cmd: &[String], tty: bool) -> Result<Process> {
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("cmd must not be empty".into()));
    }
    let mut p = base.clone();
    p.set_args(Some(cmd.to_vec()));
    p.set_terminal(Some(tty));
    p.set_console_size(None);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: serde_json::Value) -> ImageConfiguration {
        serde_json::from_value(json).unwrap()
    }

    fn busybox() -> ImageConfiguration {
        image(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
    }

    fn kv(k: &str, v: &str) -> cri::KeyValue {
        cri::KeyValue {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn env_merge_overrides_and_keeps_order() {
        let env = merge_env(
            &["PATH=/bin".into(), "A=1".into()],
            &[kv("A", "2"), kv("B", "3")],
        );
        assert_eq!(env, vec!["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(merge_env(&[], &[])[0], DEFAULT_PATH);
    }

    #[test]
    fn args_follow_containerd_rules() {
        let img = image(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/ep"], "Cmd": ["c1"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        }));
        let mut c = cri::ContainerConfig::default();
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/ep", "c1"]);
        c.args = vec!["a".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/ep", "a"]);
        c.command = vec!["/cmd".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/cmd", "a"]);
        let empty = image(
            serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        );
        assert!(process_args(&cri::ContainerConfig::default(), &empty).is_err());
    }

    #[test]
    fn capabilities_add_drop_all() {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        assert_eq!(capabilities(Some(&sc)).unwrap().len(), DEFAULT_CAPS.len());
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        let caps = capabilities(Some(&sc)).unwrap();
        assert_eq!(caps, HashSet::from([Capability::NetAdmin]));
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["CAP_BOGUS".into()],
            ..Default::default()
        });
        assert!(capabilities(Some(&sc)).is_err());
        sc.capabilities = None;
        sc.privileged = true;
        assert!(capabilities(Some(&sc))
            .unwrap()
            .contains(&Capability::SysAdmin));
    }

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
        }
    }

    #[test]
    fn ima_namespace_is_added_once() {
        let mut v = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        add_ima_namespace(&mut v);
        add_ima_namespace(&mut v);
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "ima"}])
        );
    }

    #[test]
    fn oom_is_clamped() {
        let l = NodeLimits {
            min_oom_score_adj: -500,
            hugetlb: true,
        };
        assert_eq!(clamp_oom(-998, l), -500);
        assert_eq!(clamp_oom(100, l), 100);
        assert_eq!(clamp_oom(5000, l), 1000);
    }

    #[test]
    fn container_paths_are_checked() {
        assert!(validate_container_path("p", "/data").is_ok());
        assert!(validate_container_path("p", "data").is_err());
        assert!(validate_container_path("p", "/a/../../etc").is_err());
    }

    #[test]
    fn mounts_map_propagation_and_readonly() {
        let dir = tempfile::tempdir().unwrap();
        let m = cri::Mount {
            container_path: "/data".into(),
            host_path: dir.path().to_string_lossy().into(),
            readonly: true,
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        };
        let (mnt, prop) = user_mount(&m).unwrap();
        assert_eq!(prop, "rslave");
        let opts = mnt.options().clone().unwrap();
        assert!(opts.contains(&"ro".to_string()) && opts.contains(&"rbind".to_string()));
        let missing = cri::Mount {
            host_path: "/does/not/exist".into(),
            ..m.clone()
        };
        assert!(user_mount(&missing).is_err());
        let rel = cri::Mount {
            container_path: "../x".into(),
            ..m
        };
        assert!(user_mount(&rel).is_err());
    }

    fn shared() -> SandboxShared {
        SandboxShared {
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
            config: &cfg,
            sandbox_config: &sb,
            image: &img,
            image_name: "busybox",
            user: ProcessUser::default(),
            shared: &sh,
            limits: NodeLimits {
                min_oom_score_adj: -100,
                hugetlb: true,
            },
            pid_target: None,
            host_devices: Vec::new(),
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
        let spec = container_spec(&ContainerInputs {
            id: "c",
            sandbox_id: "s",
            config: &cfg,
            sandbox_config: &cri::PodSandboxConfig::default(),
            image: &busybox(),
            image_name: "b",
            user: ProcessUser::default(),
            shared: &sh,
            limits: NodeLimits {
                min_oom_score_adj: 0,
                hugetlb: true,
            },
            pid_target: None,
            host_devices: Vec::new(),
        })
        .unwrap();
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
            netns: Some("/n".into()),
            ..Default::default()
        };
        let spec = sandbox_spec(
            "sid",
            &cfg,
            &img,
            &sh,
            NodeLimits {
                min_oom_score_adj: 0,
                hugetlb: true,
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

    fn spec_with(sc: cri::LinuxContainerSecurityContext, pid_target: Option<u32>) -> Result<Spec> {
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
        container_spec(&ContainerInputs {
            id: "c",
            sandbox_id: "s",
            config: &cfg,
            sandbox_config: &cri::PodSandboxConfig::default(),
            image: &busybox(),
            image_name: "b",
            user: ProcessUser::default(),
            shared: &shared(),
            limits: NodeLimits {
                min_oom_score_adj: 0,
                hugetlb: true,
            },
            pid_target,
            host_devices: Vec::new(),
        })
    }

    #[test]
    fn ambient_capabilities_are_kept_across_exec() {
        let sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec!["CAP_NET_BIND_SERVICE".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec_with(sc, None).unwrap();
        let caps = spec
            .process()
            .clone()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        let nbs = HashSet::from([Capability::NetBindService]);
        for set in [
            caps.ambient(),
            caps.inheritable(),
            caps.permitted(),
            caps.bounding(),
            caps.effective(),
        ] {
            assert_eq!(set.clone().unwrap(), nbs);
        }
        // Without any, inheritable and ambient stay empty (containerd's sets).
        let spec = spec_with(cri::LinuxContainerSecurityContext::default(), None).unwrap();
        let caps = spec
            .process()
            .clone()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        assert!(caps.ambient().clone().unwrap().is_empty());
        assert!(caps.inheritable().clone().unwrap().is_empty());
        let bad = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_ambient_capabilities: vec!["CAP_BOGUS".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(spec_with(bad, None)
            .unwrap_err()
            .to_string()
            .contains("add_ambient_capabilities"));
    }

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
}
