//! RunPodSandbox: netns, /etc files, shm, and the pause container. A failure
//! at any step tears down everything made so far.

use imacri_api::cri;
use imacri_runtime::containerd::NewContainer;
use imacri_runtime::ids::{new_id, now_nanos};
use imacri_runtime::integrity::guard::Scope;
use imacri_runtime::pod::{SandboxPhase, SandboxState, UsernsState};
use imacri_runtime::{spec, Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::validate::{sandbox_metadata, sandbox_name};
use super::{CriServer, LABEL_KIND, LABEL_SANDBOX_ID};

/// /dev/shm size of a pod (as containerd's default).
const SHM_SIZE: u64 = 64 * 1024 * 1024;

fn write(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).map_err(|e| Error::io("writing", path, e))
}

fn resolv_conf(dns: Option<&cri::DnsConfig>) -> Result<String> {
    match dns {
        Some(d) if !d.servers.is_empty() || !d.searches.is_empty() || !d.options.is_empty() => {
            let mut s = String::new();
            if !d.searches.is_empty() {
                s += &format!("search {}\n", d.searches.join(" "));
            }
            for n in &d.servers {
                s += &format!("nameserver {n}\n");
            }
            if !d.options.is_empty() {
                s += &format!("options {}\n", d.options.join(" "));
            }
            Ok(s)
        }
        // No DNS config: the node's, as containerd does.
        _ => std::fs::read_to_string("/etc/resolv.conf")
            .or_else(|_| Ok::<_, std::io::Error>(String::new()))
            .map_err(|e| Error::io("reading", "/etc/resolv.conf", e)),
    }
}

fn node_hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn hosts_file(hostname: &str) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        s += &format!("127.0.1.1\t{hostname}\n");
    }
    s
}

impl CriServer {
    /// Namespaces and files a sandbox gives its containers.
    pub(crate) fn shared_of(&self, st: &SandboxState) -> spec::SandboxShared {
        let mut annotations = HashMap::new();
        if let Some(i) = &st.ima {
            annotations.insert(
                imacri_runtime::integrity::setting::ANNOTATION.to_string(),
                "true".to_string(),
            );
            annotations.insert(
                imacri_runtime::integrity::setting::BACKEND_ANNOTATION.to_string(),
                i.backend.clone(),
            );
            annotations.insert(
                imacri_runtime::integrity::setting::POLICY_ANNOTATION.to_string(),
                i.policy.clone(),
            );
        }
        spec::SandboxShared {
            netns: st.netns.clone(),
            pause_pid: st.pid,
            pinned: st.pinned.clone(),
            hostname_file: Some(st.dir.join("hostname")),
            hosts_file: Some(st.dir.join("hosts")),
            resolv_file: Some(st.dir.join("resolv.conf")),
            shm_dir: st.shm.then(|| st.dir.join("shm")),
            userns: st
                .userns
                .as_ref()
                .map(|u| (u.path.clone(), u.mappings.clone())),
            annotations,
        }
    }

    /// Kernel backend: activate the pod's IMA namespace before any of its
    /// processes run, from a single-threaded helper process.
    async fn activate_kernel_ima(&self, dir: &Path, userns: &Path, policy: &str) -> Result<()> {
        let rules: Vec<_> = self
            .cfg
            .ima
            .policies
            .get(policy)
            .map(|p| {
                p.rules
                    .iter()
                    .map(|r| imacri_runtime::integrity::policy::parse_rule(r))
                    .collect()
            })
            .unwrap_or_else(|| Ok(Vec::new()))?;
        let policy_file = dir.join("ima-policy");
        write(
            &policy_file,
            &imacri_runtime::integrity::policy::render(&rules),
        )?;
        let exe = std::env::current_exe().map_err(|e| Error::io("locating", "imacri", e))?;
        let out = tokio::process::Command::new(exe)
            .args([
                "internal",
                "ima-activate",
                "--hash",
                "sha256",
                "--template",
                "ima-ng",
                "--userns",
            ])
            .arg(userns)
            .arg("--policy-file")
            .arg(&policy_file)
            .output()
            .await
            .map_err(|e| Error::io("running", "imacri internal ima-activate", e))?;
        if !out.status.success() {
            return Err(Error::FailedPrecondition(format!(
                "activating the pod's IMA namespace: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    pub(crate) async fn run_pod_sandbox(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<cri::RunPodSandboxResponse> {
        let mut config = req
            .config
            .ok_or_else(|| Error::InvalidArgument("config is required".into()))?;
        sandbox_metadata(&config)?;
        self.runtime_of(&req.runtime_handler)?;
        let linux = config.linux.clone().unwrap_or_default();
        let sc = linux.security_context.clone().unwrap_or_default();
        let plan = self.plan_pod(&config)?;
        if plan.ima.is_some() {
            self.ima_runtime(&req.runtime_handler)?;
        }
        if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "config.log_directory {:?} must be absolute",
                config.log_directory
            )));
        }
        let (net_mode, pid_mode, ipc_mode) = spec::ns_mode(sc.namespace_options.as_ref());
        let host_net = net_mode == cri::NamespaceMode::Node as i32;
        let host_ipc = ipc_mode == cri::NamespaceMode::Node as i32;
        if !host_net && config.hostname.is_empty() {
            // containerd gives a pod without a hostname the node's (crictl's
            // example configs carry none).
            config.hostname = node_hostname();
        }
        // No pause process where nothing needs one: no shared pid namespace
        // to hold (an ima pod's guards then go to its user namespace and to
        // each container's own pid namespace), no kernel IMA namespace to
        // activate before its first process.
        let kernel_ima = plan.ima.as_ref().is_some_and(|i| {
            i.backend == imacri_runtime::integrity::setting::Backend::Kernel.to_string()
        });
        let infra_less = self.cfg.drop_infra_container
            && pid_mode != cri::NamespaceMode::Pod as i32
            && !kernel_ima;
        let image = if infra_less {
            None
        } else {
            Some(self.images.get(&self.sandbox_image).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "sandbox image {} is not present; pull it first",
                    self.sandbox_image
                ))
            })?)
        };

        let id = new_id();
        let netns_path = (!host_net).then(|| self.cfg.netns_dir().join(&id));
        let podns_dir = self.cfg.state.join("podns");
        let podns = imacri_runtime::podns::Request {
            dir: &podns_dir,
            id: &id,
            hostname: (!host_net).then_some(config.hostname.as_str()),
            ipc: !host_ipc,
            netns: netns_path.as_deref(),
            userns: None,
            sysctls: &linux.sysctls,
        };
        // A sysctl in no namespace of the pod's own is refused before
        // anything is made, by runc's rules (runc would refuse it at the
        // pause task, as an unknown error).
        imacri_runtime::podns::validate(&podns)?;
        let pinned = infra_less.then(|| imacri_runtime::podns::planned(&podns));
        let name = sandbox_name(&config);
        self.sandboxes.reserve(&name, &id)?;
        let dir = self.cfg.state.join("sandboxes").join(&id);
        let entry = {
            // Allocation and record go together so no range is handed out twice.
            let _alloc = self
                .userns_lock
                .lock()
                .map_err(|_| Error::Internal("userns lock poisoned".into()))?;
            let userns = match (&plan.userns, plan.allocate) {
                (Some(m), _) => Some((Ok(m.clone()), false)),
                (None, true) => Some((self.allocate_userns(), true)),
                (None, false) => None,
            };
            let userns = match userns {
                Some((Ok(m), allocated)) => Some(UsernsState {
                    mappings: m,
                    path: self.cfg.state.join("userns").join(&id),
                    allocated,
                }),
                Some((Err(e), _)) => {
                    self.sandboxes.release(&name, &id);
                    return Err(e);
                }
                None => None,
            };
            self.sandboxes.insert(
                &id,
                &name,
                config.clone(),
                SandboxState {
                    phase: SandboxPhase::Creating,
                    created_at: now_nanos(),
                    runtime_handler: req.runtime_handler.clone(),
                    pid: 0,
                    netns: netns_path.clone(),
                    image_id: image.as_ref().map(|i| i.id.clone()).unwrap_or_default(),
                    image_name: if image.is_some() {
                        self.sandbox_image.clone()
                    } else {
                        String::new()
                    },
                    dir: dir.clone(),
                    shm: !host_ipc,
                    userns,
                    ima: plan.ima.clone(),
                    ips: Vec::new(),
                    pinned,
                    nri_stopped: false,
                },
            )
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                self.sandboxes.release(&name, &id);
                return Err(e);
            }
        };
        let _op = entry.op.write().await;
        let res = async {
            imacri_runtime::crash::step("RunPodSandbox", "recorded")?;
            let pid = match &image {
                Some(image) => self.start_sandbox(&entry, image, host_net).await?,
                None => self.start_infra_less(&entry, host_net).await?,
            };
            if self.nri.get().is_some() {
                // NRI plugins hear of the pod (with its pid) before anyone
                // can use it; one that fails it rolls it back.
                entry.update(|s| s.pid = pid)?;
                self.nri_run_pod(&entry).await?;
            }
            imacri_runtime::crash::step("RunPodSandbox", "ready")?;
            Ok(pid)
        }
        .await;
        match res {
            Ok(pid) => {
                entry.update(|s| {
                    s.phase = SandboxPhase::Ready;
                    s.pid = pid;
                })?;
                let st = entry.state();
                tracing::info!(
                    pod_sandbox_id = %id,
                    name = %name,
                    pid,
                    ima = ?st.ima.as_ref().map(|i| &i.backend),
                    userns = ?st.userns.as_ref().map(|u| &u.mappings.uids),
                    "sandbox ready"
                );
                // containerd reports a sandbox as a container of its own.
                self.emit(cri::ContainerEventType::ContainerCreatedEvent, &id);
                self.emit(cri::ContainerEventType::ContainerStartedEvent, &id);
                Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
            }
            Err(e) => {
                self.roll_back_sandbox(&entry).await;
                Err(e)
            }
        }
    }

    /// Undoes a pod whose creation failed or a crash cut short. A rollback
    /// that fails keeps the record, not ready, rather than forget what is
    /// left (a network namespace, an address, mounts): kubelet's garbage
    /// collection removes such a pod, and RemovePodSandbox tears it down
    /// again, as containerd keeps a sandbox it could not clean up.
    pub(crate) async fn roll_back_sandbox(&self, sb: &super::SandboxEntry) {
        self.forget_pod(&sb.id);
        match self.teardown_sandbox(sb).await {
            Ok(()) => {
                let _ = self.sandboxes.remove(&sb.id);
                tracing::info!(pod_sandbox_id = %sb.id, "pod's creation rolled back");
            }
            Err(e) => {
                tracing::error!(pod_sandbox_id = %sb.id, error = %e, "rollback of the pod's creation failed; it is kept, not ready, for RemovePodSandbox");
                let _ = sb.update(|s| {
                    s.phase = SandboxPhase::NotReady;
                    s.pid = 0;
                });
            }
        }
    }

    async fn start_sandbox(
        self: &Arc<Self>,
        entry: &super::SandboxEntry,
        image: &imacri_runtime::image::ImageRecord,
        host_net: bool,
    ) -> Result<u32> {
        let (id, st) = (entry.id.as_str(), &entry.state());
        let mut laps = super::laps::Laps::new("RunPodSandbox", id);
        let dir = &st.dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        // The namespaces (user namespace first, the netns inside it) are made
        // while the pause container's files and snapshot are prepared; CNI
        // ADD (plugin executables, mostly waiting) starts as soon as the
        // netns exists and runs while the pause container is made and
        // started: the pause process needs no network. ADD is always joined
        // before returning, so a rollback's DEL never races one in flight.
        let namespaces = async {
            let (me, id, state) = (self.clone(), id.to_string(), st.clone());
            tokio::task::spawn_blocking(move || me.create_namespaces(&id, &state, host_net))
                .await
                .map_err(|e| Error::Internal(format!("namespace task: {e}")))??;
            Ok::<_, Error>(st.netns.as_ref().map(|ns| {
                let pod = super::lifecycle::pod_network(entry, ns);
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.cni.add(&pod))
            }))
        };
        let (cni, prepared) = tokio::join!(namespaces, self.prepare_pause(entry, image, host_net));
        // A failure here still joins the ADD in flight below.
        let failed = laps.step("namespaces+prepare");
        let (cni, started) = match (cni, prepared) {
            (Ok(cni), Ok(p)) => match failed {
                Ok(()) => (cni, self.run_pause(entry, p, &mut laps).await),
                Err(e) => (cni, Err(e)),
            },
            (Ok(cni), Err(e)) => (cni, Err(e)),
            (Err(e), _) => (None, Err(e)),
        };
        if let Some(h) = cni {
            let att = h
                .await
                .map_err(|e| Error::Internal(format!("CNI ADD task: {e}")))?;
            let pid = started?;
            laps.step("cni-wait")?;
            let ips = att?.ips;
            entry.update(|s| s.ips = ips)?;
            return Ok(pid);
        }
        started
    }

    /// A pod without pause: its network namespace (CNI ADD in it) and its
    /// UTS and IPC namespaces, pinned; the pid is 0.
    async fn start_infra_less(
        self: &Arc<Self>,
        entry: &super::SandboxEntry,
        host_net: bool,
    ) -> Result<u32> {
        let (id, st) = (entry.id.as_str(), entry.state());
        let mut laps = super::laps::Laps::new("RunPodSandbox", id);
        std::fs::create_dir_all(&st.dir).map_err(|e| Error::io("creating", &st.dir, e))?;
        write_pod_files(entry, host_net)?;
        let (me, sid, state) = (self.clone(), id.to_string(), st.clone());
        let config = entry.config.clone();
        tokio::task::spawn_blocking(move || {
            me.create_namespaces(&sid, &state, host_net)?;
            let linux = config.linux.unwrap_or_default();
            let dir = me.cfg.state.join("podns");
            imacri_runtime::podns::create(&imacri_runtime::podns::Request {
                dir: &dir,
                id: &sid,
                hostname: state
                    .pinned
                    .as_ref()
                    .and_then(|p| p.uts.as_ref())
                    .map(|_| config.hostname.as_str()),
                ipc: state.pinned.as_ref().is_some_and(|p| p.ipc.is_some()),
                netns: state.netns.as_deref(),
                userns: state.userns.as_ref().map(|u| u.path.as_path()),
                sysctls: &linux.sysctls,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("namespace task: {e}")))??;
        laps.step("namespaces")?;
        // An ima pod's user namespace is guarded before any of its processes
        // exists (no nested user namespaces, a binfmt_misc of its own).
        self.guard_process(&entry.state(), id, 0, Scope::UserNamespace)
            .await?;
        laps.step("guards")?;
        if let Some(ns) = &st.netns {
            let pod = super::lifecycle::pod_network(entry, ns);
            let me = self.clone();
            let ips = tokio::task::spawn_blocking(move || me.cni.add(&pod))
                .await
                .map_err(|e| Error::Internal(format!("CNI ADD task: {e}")))??
                .ips;
            entry.update(|s| s.ips = ips)?;
            laps.step("cni")?;
        }
        Ok(0)
    }

    /// The pod's pinned namespaces, as recorded in `st`.
    fn create_namespaces(&self, id: &str, st: &SandboxState, host_net: bool) -> Result<()> {
        match (&st.userns, host_net) {
            (Some(u), _) => {
                imacri_runtime::userns::create(&self.cfg.state, id, &u.mappings, !host_net)?;
            }
            (None, true) => {}
            (None, false) => {
                imacri_runtime::netns::create(&self.cfg.netns_dir(), id)?;
            }
        }
        Ok(())
    }

    /// The pause container's files, spec, snapshot and containerd record:
    /// everything before its task, which needs the pod's namespaces.
    async fn prepare_pause(
        self: &Arc<Self>,
        entry: &super::SandboxEntry,
        image: &imacri_runtime::image::ImageRecord,
        host_net: bool,
    ) -> Result<(Vec<containerd_client::types::Mount>, bool)> {
        let (id, config, st) = (entry.id.as_str(), &entry.config, &entry.state());
        write_pod_files(entry, host_net)?;

        let shared = self.shared_of(st);
        let mut spec = spec::sandbox_spec(id, config, &image.config, &shared, self.node)?;
        if st.ima.is_some() {
            // Like its containers' mounts: a container sharing the pod's pid
            // namespace reaches pause's through /proc/1/root.
            spec::noexec_outside_rootfs(&mut spec, &[]);
        }
        let snapshotter = self.cfg.containerd.snapshotter.clone();
        let lease = self.c.lease("sandbox").await?;
        let created = async {
            let (parent, idmapped) = self.rootfs_parent(&image.chain_id, st, &lease).await?;
            let mounts = self
                .c
                .prepare_snapshot(&snapshotter, id, &parent, &lease)
                .await?;
            let mut labels: HashMap<String, String> = config.labels.clone();
            labels.insert(LABEL_KIND.into(), "sandbox".into());
            labels.insert(LABEL_SANDBOX_ID.into(), id.into());
            self.c
                .create_container(
                    NewContainer {
                        id,
                        image: &self.sandbox_image,
                        labels,
                        spec: &spec,
                        snapshotter: &snapshotter,
                        runtime: self.runtime_of(&st.runtime_handler)?,
                        ima_namespace: st.ima.is_some() && self.cfg.ima.oci_namespace,
                    },
                    &lease,
                )
                .await?;
            Ok::<_, Error>((mounts, idmapped))
        }
        .await;
        // The container record holds the snapshot now; the lease can go.
        self.end_lease(lease, created.is_ok()).await;
        created
    }

    /// Creates and starts the pause task in the pod's namespaces.
    async fn run_pause(
        self: &Arc<Self>,
        entry: &super::SandboxEntry,
        (mounts, idmapped): (Vec<containerd_client::types::Mount>, bool),
        laps: &mut super::laps::Laps,
    ) -> Result<u32> {
        let (id, st) = (entry.id.as_str(), &entry.state());
        if let (Some(u), Some(i)) = (&st.userns, &st.ima) {
            if i.backend == imacri_runtime::integrity::setting::Backend::Kernel.to_string() {
                self.activate_kernel_ima(&st.dir, &u.path, &i.policy)
                    .await?;
            }
        }
        let stdio = imacri_runtime::io::StdioPaths::default();
        let pid = self
            .create_task_on(id, st, mounts, &stdio, idmapped)
            .await?;
        laps.step("task")?;
        self.own_task(st, id, pid).await?;
        // The pod's pid namespace (shared by containers with pid POD) gets
        // its guards while pause starts: pause is the pod's own trusted
        // program, and no container can run before this returns.
        self.watch_exit(id);
        let (guarded, started) = tokio::join!(
            self.guard_process(st, id, pid, Scope::Pod),
            self.c.start_task(id, "")
        );
        guarded?;
        let started = started?;
        laps.step("guards+start")?;
        // Sealing waits for pause to settle; its containers' starts wait
        // for the seal instead of this call.
        self.seal_pause_later(st, id, pid);
        Ok(started)
    }
}

/// The files every container of the pod mounts: hostname, hosts,
/// resolv.conf, and its /dev/shm.
fn write_pod_files(entry: &super::SandboxEntry, host_net: bool) -> Result<()> {
    let (config, st) = (&entry.config, entry.state());
    let dir = &st.dir;
    let hostname = if host_net {
        node_hostname()
    } else {
        config.hostname.clone()
    };
    write(&dir.join("hostname"), &format!("{hostname}\n"))?;
    let hosts = if host_net {
        std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| hosts_file(&hostname))
    } else {
        hosts_file(&hostname)
    };
    write(&dir.join("hosts"), &hosts)?;
    write(
        &dir.join("resolv.conf"),
        &resolv_conf(config.dns_config.as_ref())?,
    )?;
    if st.shm {
        imacri_runtime::mount::mount_shm(&dir.join("shm"), SHM_SIZE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let d = cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d)).unwrap(),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_has_localhost_and_hostname() {
        let h = hosts_file("pod-a");
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("127.0.1.1\tpod-a\n"));
    }
}
