//! CreateContainer: snapshot from the image, identity from the image's
//! /etc/passwd, OCI spec, containerd container. Rolled back on failure.

use imacri_api::cri;
use imacri_runtime::containerd::NewContainer;
use imacri_runtime::ids::{new_id, now_nanos};
use imacri_runtime::integrity::fanotify::VolumeMark;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::pod::{ContainerPhase, ContainerState};
use imacri_runtime::spec::{self, ContainerInputs};
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::container_volumes::{create_missing_host_path, resolve_host_paths, volume_check_window};
use super::orphans::Records;
use super::validate::{container_name, log_path, non_empty, require};
use super::{CriServer, LABEL_KIND, LABEL_SANDBOX_ID};

/// The CRI signal enum to a signal number (0 = runtime default).
pub(crate) fn signal_number(s: i32) -> i32 {
    use cri::Signal as S;
    match S::try_from(s).unwrap_or(S::RuntimeDefault) {
        S::RuntimeDefault => 0,
        S::Sighup => 1,
        S::Sigint => 2,
        S::Sigquit => 3,
        S::Sigill => 4,
        S::Sigtrap => 5,
        S::Sigabrt | S::Sigiot => 6,
        S::Sigbus => 7,
        S::Sigfpe => 8,
        S::Sigkill => 9,
        S::Sigusr1 => 10,
        S::Sigsegv => 11,
        S::Sigusr2 => 12,
        S::Sigpipe => 13,
        S::Sigalrm => 14,
        S::Sigterm => 15,
        S::Sigstkflt => 16,
        S::Sigchld | S::Sigcld => 17,
        S::Sigcont => 18,
        S::Sigstop => 19,
        S::Sigtstp => 20,
        S::Sigttin => 21,
        S::Sigttou => 22,
        S::Sigurg => 23,
        S::Sigxcpu => 24,
        S::Sigxfsz => 25,
        S::Sigvtalrm => 26,
        S::Sigprof => 27,
        S::Sigwinch => 28,
        S::Sigio | S::Sigpoll => 29,
        S::Sigpwr => 30,
        S::Sigsys => 31,
        other => {
            // SIGRTMIN (34) .. SIGRTMAX (64) are numbered in order in the enum.
            let n = other as i32 - S::Sigrtmin as i32;
            34 + n
        }
    }
}

/// What CreateContainer resolved from the request before touching anything.
struct Validated<'a> {
    /// As kubelet sent it (what ContainerStatus reports).
    config: &'a cri::ContainerConfig,
    /// With host paths resolved: what the spec is built from.
    resolved: &'a cri::ContainerConfig,
    image: &'a imacri_runtime::image::ImageRecord,
    image_name: &'a str,
    log: std::path::PathBuf,
    cdi: &'a [imacri_runtime::cdi::Edits],
}

/// A signal number to the CRI enum (the first name of aliases such as
/// SIGABRT/SIGIOT); RuntimeDefault when it has none.
pub(crate) fn signal_enum(n: i32) -> i32 {
    (1..100)
        .find(|&e| cri::Signal::try_from(e).is_ok() && signal_number(e) == n)
        .unwrap_or(cri::Signal::RuntimeDefault as i32)
}

impl CriServer {
    /// The PID of the container `namespace_options.target_id` names, when
    /// pid is TARGET: a running container of the same pod (containerd's
    /// rule; `kubectl debug --target`).
    fn pid_target(&self, pod: &str, config: &cri::ContainerConfig) -> Result<Option<u32>> {
        let Some(n) = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .filter(|n| n.pid == cri::NamespaceMode::Target as i32)
        else {
            return Ok(None);
        };
        let field = "linux.security_context.namespace_options.target_id";
        non_empty(field, &n.target_id)?;
        let target = self.container(&n.target_id).map_err(|e| match e {
            Error::NotFound(m) => Error::NotFound(format!("{field}: {m}")),
            e => e,
        })?;
        let st = target.state();
        if st.sandbox_id != pod {
            return Err(Error::InvalidArgument(format!(
                "{field}: container {} is not in pod sandbox {pod}",
                target.id
            )));
        }
        if st.phase != ContainerPhase::Running || st.pid == 0 {
            return Err(Error::FailedPrecondition(format!(
                "{field}: container {} is not running",
                target.id
            )));
        }
        Ok(Some(st.pid))
    }

    fn handler_supports_rro(&self, handler: &str) -> bool {
        self.handler_features
            .get(handler)
            .is_some_and(|f| f.recursive_read_only_mounts)
    }

    pub(crate) async fn create_container(
        self: &Arc<Self>,
        req: cri::CreateContainerRequest,
    ) -> Result<cri::CreateContainerResponse> {
        non_empty("pod_sandbox_id", &req.pod_sandbox_id)?;
        let config = require("config", req.config.as_ref())?.clone();
        // An empty name is taken, as containerd takes it.
        require("config.metadata", config.metadata.as_ref())?;
        let image_name = require("config.image", config.image.as_ref())?
            .image
            .clone();
        non_empty("config.image.image", &image_name)?;
        let sb = self.sandbox(&req.pod_sandbox_id)?;
        // A pod not ready yet (its RunPodSandbox in flight, NRI hooks
        // included) fails the call at once, as in containerd, rather than
        // wait for it.
        self.still_ready(&sb)?;
        // Until the container is recorded: a stop or removal of the pod
        // waits, then stops or removes it with the others.
        let _pod = sb.op.read().await;
        self.still_ready(&sb)?;
        let sb_state = sb.state();
        let image = self.images.get(&image_name).ok_or_else(|| {
            Error::NotFound(format!("image {image_name:?} not found; pull it first"))
        })?;
        let log = log_path(&sb.config, &config)?;
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        if sc.is_some_and(|s| s.privileged)
            && !sb
                .config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .is_some_and(|s| s.privileged)
        {
            return Err(Error::InvalidArgument(
                "linux.security_context.privileged needs a privileged pod sandbox".into(),
            ));
        }
        self.check_pod_isolation(&sb.state(), &config)?;
        // Fail on bad mounts and devices before touching containerd.
        for m in &config.mounts {
            if super::image_volume::is_image_mount(m) {
                super::image_volume::check_image_mount(m)?;
            } else {
                create_missing_host_path(m)?;
                spec::user_mount(m)?;
                if m.recursive_read_only && !self.handler_supports_rro(&sb_state.runtime_handler) {
                    return Err(Error::InvalidArgument(format!(
                        "mount {}: recursive_read_only is not supported by runtime handler {:?} \
                         on this node (its runtime lacks the rro mount option or the kernel \
                         mount_setattr)",
                        m.container_path, sb_state.runtime_handler
                    )));
                }
            }
        }

        let resolved = resolve_host_paths(&config)?;
        // CDI devices: an unknown one is an error, never dropped.
        let names: Vec<String> = config.cdi_devices.iter().map(|d| d.name.clone()).collect();
        let wanted = imacri_runtime::cdi::requested(&names, &config.annotations);
        let cdi = if wanted.is_empty() {
            Vec::new()
        } else {
            imacri_runtime::cdi::Registry::load(&self.cfg.cdi_spec_dirs)
                .resolve(&wanted)
                .map_err(|e| match e {
                    Error::InvalidArgument(m) => {
                        Error::InvalidArgument(format!("CDI_devices: {m}"))
                    }
                    e => e,
                })?
        };

        let id = new_id();
        let name = container_name(&config, &sb.config);
        self.containers.reserve(&name, &id)?;
        let res = self
            .make_container(
                &id,
                &sb,
                &Validated {
                    config: &config,
                    resolved: &resolved,
                    image: &image,
                    image_name: &image_name,
                    log,
                    cdi: &cdi,
                },
            )
            .await;
        match res {
            Ok(()) => {
                tracing::info!(container_id = %id, pod_sandbox_id = %sb.id, name = %name, "container created");
                self.emit(cri::ContainerEventType::ContainerCreatedEvent, &id);
                self.nri_post_create(&id).await;
                Ok(cri::CreateContainerResponse { container_id: id })
            }
            Err(e) => {
                match self.teardown_container(&id, Records::Now).await {
                    Ok(()) => {
                        tracing::info!(container_id = %id, pod_sandbox_id = %sb.id, "container's creation rolled back")
                    }
                    Err(te) => self.roll_back_later(&id, te),
                }
                let _ = self.containers.remove(&id);
                self.containers.release(&name, &id);
                if let Ok(mut m) = self.nri_views.lock() {
                    m.remove(&id);
                }
                Err(e)
            }
        }
    }

    async fn make_container(
        &self,
        id: &str,
        sb: &super::SandboxEntry,
        v: &Validated<'_>,
    ) -> Result<()> {
        let Validated {
            config,
            resolved,
            image,
            image_name,
            ref log,
            cdi,
        } = *v;
        let log = log.clone();
        let sb_state = sb.state();
        let snapshotter = self.cfg.containerd.snapshotter.clone();
        let mut laps = super::laps::Laps::new("CreateContainer", id);
        let lease = self.c.lease("container").await?;
        let res = async {
            laps.step("lease")?;
            let (parent, idmapped_rootfs) = self
                .rootfs_parent(&image.chain_id, &sb_state, &lease)
                .await?;
            let mounts = self
                .c
                .prepare_snapshot(&snapshotter, id, &parent, &lease)
                .await?;
            laps.step("snapshot")?;
            // Resolve the user from the container's own root filesystem,
            // which is its image's until its process runs: read once per
            // image.
            let sc = config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref());
            let accounts = match self.accounts.get(&image.chain_id) {
                Some(a) => a,
                None => {
                    let probe = self.cfg.state.join("probe").join(id);
                    std::fs::create_dir_all(&probe)
                        .map_err(|e| Error::io("creating", &probe, e))?;
                    let read = imacri_runtime::mount::mount_snapshot(&mounts, &probe, true)
                        .map(|()| {
                            let a = imacri_runtime::user::Accounts::read(&probe);
                            let _ = imacri_runtime::mount::unmount_all(&probe);
                            a
                        });
                    let _ = std::fs::remove_dir(&probe);
                    self.accounts.put(&image.chain_id, read?)
                }
            };
            let user = imacri_runtime::user::resolve_with(&accounts, sc, &image.config)?;
            laps.step("user")?;
            let shared = self.shared_of(&sb_state);
            // Image volumes become read-only binds; then, in a user
            // namespace pod, every bind is ID-mapped.
            if let Some(window) = volume_check_window() {
                // Test only: the moments between resolving a container's
                // volumes, binding them and checking them, widened.
                tokio::time::sleep(window).await;
            }
            let (with_images, volume_labels) = self.image_volumes(id, resolved, &lease).await?;
            let volumes = with_images.as_ref().unwrap_or(resolved);
            let mapped = self.idmap_volumes(id, &sb_state, volumes)?;
            if let Some(window) = volume_check_window() {
                tokio::time::sleep(window).await;
            }
            let mut spec = spec::container_spec(&ContainerInputs {
                id,
                sandbox_id: &sb.id,
                config: mapped.as_ref().unwrap_or(volumes),
                sandbox_config: &sb.config,
                image: &image.config,
                image_name,
                user: user.clone(),
                shared: &shared,
                node: self.node,
                pid_target: self.pid_target(&sb.id, config)?,
                host_devices: if sc.is_some_and(|s| s.privileged) {
                    imacri_runtime::sysinfo::host_devices(std::path::Path::new("/dev"))
                } else {
                    Vec::new()
                },
            })?;
            laps.step("volumes+spec")?;
            // Before the ima rules below, which then cover CDI mounts too.
            imacri_runtime::cdi::apply(&mut spec, cdi, &imacri_runtime::cdi::HostNodes)?;
            // NRI plugins adjust the spec before the ima rules, so what they
            // add is covered by them like everything else.
            self.nri_adjust(sb, id, config, &mut spec).await?;
            if sb_state.userns.is_some() {
                spec::check_userns_devices(&spec)?;
            }
            if sb_state.ima.is_some() {
                // The request's names were checked; this is what will run.
                let caps = spec.process().as_ref().and_then(|p| p.capabilities().as_ref());
                if let Some(cap) = caps.and_then(spec::forbidden_capability_in) {
                    return Err(Error::FailedPrecondition(format!(
                        "the container's spec grants {cap}, which an ima pod may not have"
                    )));
                }
                self.anonymous_exec_rules(&sb_state, &spec)?;
            }
            let mut tmpfs_volumes = Vec::new();
            if super::integrity::is_fanotify(&sb_state) {
                let measured = self.measured_volumes(
                    &sb_state,
                    super::integrity::pod_uid(&sb.config),
                    volumes,
                    mapped.as_ref(),
                );
                tmpfs_volumes = measured
                    .iter()
                    .filter(|(_, m)| *m == VolumeMark::Filesystem)
                    .map(|(dest, _)| dest.clone())
                    .collect();
                let measured: Vec<String> = measured.into_iter().map(|(dest, _)| dest).collect();
                spec::noexec_outside_rootfs(&mut spec, &measured);
                let init = self.integrity.init.as_ref().map_err(|why| {
                    Error::FailedPrecondition(format!(
                        "the pod is measured by the fanotify backend, which this node cannot run now: {why}"
                    ))
                })?;
                let deny_proc_writes = self.pod_denies_anonymous_exec(&sb_state);
                spec::run_through_init(&mut spec, init, deny_proc_writes)?;
            }
            self.guard_mappings(&sb_state, &sb.id, &mut spec)?;
            laps.step("nri+rules")?;
            let mut labels: HashMap<String, String> = config.labels.clone();
            labels.extend(volume_labels);
            labels.insert(LABEL_KIND.into(), "container".into());
            labels.insert(LABEL_SANDBOX_ID.into(), sb.id.clone());
            self.c
                .create_container(
                    NewContainer {
                        id,
                        image: image_name,
                        labels,
                        spec: &spec,
                        snapshotter: &snapshotter,
                        runtime: self.runtime_of(&sb_state.runtime_handler)?,
                        ima_namespace: sb_state.ima.is_some() && self.cfg.ima.oci_namespace,
                    },
                    &lease,
                )
                .await?;
            laps.step("containerd")?;
            let stop_signal = match signal_number(config.stop_signal) {
                0 => image
                    .config
                    .config()
                    .as_ref()
                    .and_then(|c| c.stop_signal().clone())
                    .and_then(|s| parse_signal(&s))
                    .unwrap_or(15),
                n => n,
            };
            let image_ref = image
                .repo_digests()
                .into_iter()
                .next()
                .unwrap_or_else(|| image.id.clone());
            let entry = self.containers.insert(
                id,
                &container_name(config, &sb.config),
                config.clone(),
                ContainerState {
                    phase: ContainerPhase::Created,
                    sandbox_id: sb.id.clone(),
                    created_at: now_nanos(),
                    started_at: 0,
                    finished_at: 0,
                    exit_code: 0,
                    reason: String::new(),
                    message: String::new(),
                    pid: 0,
                    image_id: image.id.clone(),
                    image_name: image_name.to_string(),
                    image_ref,
                    log_path: log,
                    uid: user.uid,
                    gid: user.gid,
                    additional_gids: user.additional_gids,
                    stop_signal,
                    oom_killed: false,
                    updated_resources: None,
                    idmapped_rootfs,
                    nri_stopped: false,
                    tmpfs_volumes,
                },
            )?;
            // For verbose ContainerStatus (kubelet's and critest's), which
            // would otherwise ask containerd for it every time.
            super::container_status::save_spec(&entry, &spec);
            if let Ok(mut m) = self.created_mounts.lock() {
                m.insert(id.to_string(), mounts);
            }
            laps.step("record")?;
            Ok(())
        }
        .await;
        self.end_lease(lease, res.is_ok()).await;
        laps.lap("lease-end");
        res
    }
}

const CNS: &str = "linux.security_context.namespace_options";

impl CriServer {
    /// A creation's rollback that failed (containerd down: what the call
    /// made there cannot be deleted) is tried again in the background until
    /// containerd is back, as a removed container's deletion is; the
    /// container is forgotten now, as containerd's CRI forgets it, so
    /// nothing lists it meanwhile.
    fn roll_back_later(self: &Arc<Self>, id: &str, first: Error) {
        let (me, owned) = (self.clone(), id.to_string());
        let retry = move || {
            let (me, id) = (me.clone(), owned.clone());
            async move { me.teardown_container(&id, Records::Now).await }
        };
        super::orphans::clean_up_later(id, "rollback of the container's creation", first, retry);
    }

    /// A container stays inside its pod's user namespace (and, in an ima
    /// pod, inside everything the pod's measurement covers).
    fn check_pod_isolation(&self, sb: &SandboxState, config: &cri::ContainerConfig) -> Result<()> {
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        let nso = sc.namespace_options.as_ref();
        if let Some(u) = nso.and_then(|n| n.userns_options.as_ref()) {
            let pod_default =
                u.mode == cri::NamespaceMode::Pod as i32 && u.uids.is_empty() && u.gids.is_empty();
            let asked = if pod_default {
                None
            } else {
                super::sandbox_plan::requested_userns(nso)?
            };
            let pod = sb.userns.as_ref().map(|u| &u.mappings);
            let allocated = sb.userns.as_ref().is_some_and(|u| u.allocated);
            let same = match (&asked, pod) {
                (None, None) => true,
                // Kubelet repeats the pod's request; an allocation is ours.
                (Some(a), Some(p)) => a == p,
                // NODE is kubelet's default for a pod without hostUsers:
                // false; in a pod imacri gave a user namespace (an ima pod)
                // it joins that one, like every container of the pod.
                (None, Some(_)) => u.mode == cri::NamespaceMode::Pod as i32 || allocated,
                (Some(_), None) => false,
            };
            if !same {
                return Err(Error::InvalidArgument(format!(
                    "{CNS}.userns_options differs from the pod's user namespace; containers must share it"
                )));
            }
        }
        if sb.ima.is_none() {
            return Ok(());
        }
        if sc.privileged {
            return Err(Error::InvalidArgument(
                "linux.security_context.privileged is not allowed in an ima pod".into(),
            ));
        }
        if let Some(caps) = sc.capabilities.as_ref() {
            for (field, list) in [
                ("add_capabilities", &caps.add_capabilities),
                ("add_ambient_capabilities", &caps.add_ambient_capabilities),
            ] {
                if let Some(cap) = imacri_runtime::integrity::guard::forbidden_capability(list) {
                    return Err(Error::InvalidArgument(format!(
                        "linux.security_context.capabilities.{field}: {cap} is not allowed in an ima pod: \
                         it would let the pod undo the guards that keep it measured \
                         (forbidden: {})",
                        imacri_runtime::integrity::guard::FORBIDDEN_CAPABILITIES.join(", ")
                    )));
                }
            }
        }
        if super::integrity::is_fanotify(sb) {
            // A volume that takes the host's later mounts (rslave/rshared)
            // brings filesystems no mark of the pod covers, executable,
            // beneath the container's root (where the init's Landlock rule
            // lets executions be): `noexec` and the marks are set once, at
            // creation.
            let private = cri::MountPropagation::PropagationPrivate as i32;
            if let Some((i, m)) = config
                .mounts
                .iter()
                .enumerate()
                .find(|(_, m)| m.propagation != private)
            {
                let name = cri::MountPropagation::try_from(m.propagation).map_or_else(
                    |_| m.propagation.to_string(),
                    |p| p.as_str_name().to_string(),
                );
                return Err(Error::InvalidArgument(format!(
                    "mounts[{i}].propagation={name} ({}) is not allowed in an ima pod measured by the \
                     fanotify backend: filesystems the host mounts beneath the volume later would run \
                     unmeasured; use PROPAGATION_PRIVATE",
                    m.container_path
                )));
            }
        }
        let node = cri::NamespaceMode::Node as i32;
        if let Some(n) = nso {
            for (field, mode) in [("network", n.network), ("pid", n.pid), ("ipc", n.ipc)] {
                if mode == node {
                    return Err(Error::InvalidArgument(format!(
                        "{CNS}.{field}=NODE is not allowed in an ima pod: it would step outside the pod's measurement"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// "SIGTERM", "TERM" or "15".
pub(crate) fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    let table = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("TERM", 15),
        ("STOP", 19),
        ("WINCH", 28),
        ("PWR", 30),
    ];
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(signal_number(cri::Signal::Sigterm as i32), 15);
        assert_eq!(signal_number(cri::Signal::Sigkill as i32), 9);
        assert_eq!(signal_number(cri::Signal::Sigrtmin as i32), 34);
        assert_eq!(signal_number(cri::Signal::Sigrtmax as i32), 64);
        assert_eq!(signal_number(cri::Signal::RuntimeDefault as i32), 0);
        assert_eq!(parse_signal("SIGQUIT"), Some(3));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("bogus"), None);
        for n in 1..=64 {
            if !(32..34).contains(&n) {
                assert_eq!(signal_number(signal_enum(n)), n, "{n}");
            }
        }
        assert_eq!(signal_enum(15), cri::Signal::Sigterm as i32);
        assert_eq!(signal_enum(0), cri::Signal::RuntimeDefault as i32);
    }
}
