//! imacri as an NRI runtime: the pods and containers plugins see, the events
//! each RPC sends them, CreateContainer's adjustments, and what plugins may
//! ask of the node ([`Host`]). The protocol and the lockdown live in
//! `imacri_runtime::nri`.

use imacri_api::cri;
use imacri_runtime::nri::{api, apply, Host, Nri};
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{ContainerEntry, CriServer, SandboxEntry};

impl CriServer {
    /// Starts NRI when the config enables it.
    pub async fn start_nri(self: &Arc<Self>) -> Result<()> {
        let host: std::sync::Weak<dyn Host> = Arc::downgrade(self) as _;
        if let Some(n) = Nri::start(&self.cfg.nri, host, env!("CARGO_PKG_VERSION")).await? {
            let _ = self.nri.set(n);
        }
        Ok(())
    }

    pub async fn stop_nri(&self) {
        if let Some(n) = self.nri.get() {
            n.shutdown().await;
        }
    }

    pub(crate) fn nri_pod(&self, sb: &SandboxEntry) -> api::PodSandbox {
        let st = sb.state();
        let md = sb.config.metadata.clone().unwrap_or_default();
        let linux = sb.config.linux.as_ref();
        let mut namespaces = Vec::new();
        if let Some(n) = &st.netns {
            namespaces.push(api::LinuxNamespace {
                r#type: "network".into(),
                path: n.display().to_string(),
            });
        }
        // A pod without pause (pid 0): the namespaces its containers join.
        if let Some(p) = &st.pinned {
            for (kind, path) in [("uts", &p.uts), ("ipc", &p.ipc)] {
                if let Some(path) = path {
                    namespaces.push(api::LinuxNamespace {
                        r#type: kind.into(),
                        path: path.display().to_string(),
                    });
                }
            }
        }
        api::PodSandbox {
            id: sb.id.clone(),
            name: md.name,
            uid: md.uid,
            namespace: md.namespace,
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            runtime_handler: st.runtime_handler.clone(),
            linux: Some(api::LinuxPodSandbox {
                cgroup_parent: linux.map(|l| l.cgroup_parent.clone()).unwrap_or_default(),
                namespaces,
                ..Default::default()
            }),
            pid: st.pid,
            ips: st.ips.clone(),
        }
    }

    /// A container as plugins see it: the view built at creation (from its
    /// spec), with its state now.
    pub(crate) fn nri_container(&self, c: &ContainerEntry) -> api::Container {
        let st = c.state();
        let cached = self
            .nri_views
            .lock()
            .ok()
            .and_then(|m| m.get(&c.id).cloned());
        // After a restart: the view saved at creation.
        let saved = || {
            let b = std::fs::read(c.dir().join(VIEW_FILE)).ok()?;
            let v =
                <api::Container as imacri_nri_api::prost::Message>::decode(b.as_slice()).ok()?;
            if let Ok(mut m) = self.nri_views.lock() {
                m.insert(c.id.clone(), v.clone());
            }
            Some(v)
        };
        let mut v = cached.or_else(saved).unwrap_or_else(|| api::Container {
            id: c.id.clone(),
            pod_sandbox_id: st.sandbox_id.clone(),
            name: c
                .config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            args: c
                .config
                .command
                .iter()
                .chain(&c.config.args)
                .cloned()
                .collect(),
            ..Default::default()
        });
        v.state = match st.phase {
            ContainerPhase::Created => api::ContainerState::ContainerCreated,
            ContainerPhase::Running => api::ContainerState::ContainerRunning,
            ContainerPhase::Exited => api::ContainerState::ContainerStopped,
        } as i32;
        v.pid = st.pid;
        v.created_at = st.created_at;
        v.started_at = st.started_at;
        v.finished_at = st.finished_at;
        v.exit_code = st.exit_code;
        v.status_reason = st.reason.clone();
        v.status_message = st.message.clone();
        v
    }

    /// Runs a CRI request that sends NRI events with plugin synchronization
    /// held off until it is done (see `Nri::holding_sync`).
    pub(crate) async fn nri_held<F: std::future::Future>(&self, f: F) -> F::Output {
        match self.nri.get() {
            Some(n) => n.holding_sync(f).await,
            None => f.await,
        }
    }

    /// RunPodSandbox's event; an error fails the pod (the caller rolls back).
    pub(crate) async fn nri_run_pod(&self, sb: &SandboxEntry) -> Result<()> {
        let Some(n) = self.nri.get() else {
            return Ok(());
        };
        Ok(n.run_pod_sandbox(&self.nri_pod(sb)).await?)
    }

    /// Stop and remove events never block the stop or removal: logged.
    /// Plugins hear a pod's stop once, as containerd tells them (critest's
    /// NRI contract): a repeated StopPodSandbox is no new event.
    pub(crate) async fn nri_stop_pod(&self, sb: &SandboxEntry) {
        let Some(n) = self.nri.get() else { return };
        match sb.update(|s| std::mem::replace(&mut s.nri_stopped, true)) {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(pod_sandbox_id = %sb.id, error = %e, "NRI StopPodSandbox not recorded");
                return;
            }
        }
        if let Err(e) = n.stop_pod_sandbox(&self.nri_pod(sb)).await {
            tracing::warn!(pod_sandbox_id = %sb.id, error = %e, "NRI StopPodSandbox");
        }
    }

    pub(crate) async fn nri_remove_pod(&self, sb: &SandboxEntry) {
        if let Some(n) = self.nri.get() {
            if let Err(e) = n.remove_pod_sandbox(&self.nri_pod(sb)).await {
                tracing::warn!(pod_sandbox_id = %sb.id, error = %e, "NRI RemovePodSandbox");
            }
        }
    }

    /// CreateContainer: plugins' adjustments, screened and merged, written
    /// into `spec` (before the ima rules, which then cover what they added).
    pub(crate) async fn nri_adjust(
        &self,
        sb: &SandboxEntry,
        id: &str,
        config: &cri::ContainerConfig,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<()> {
        let Some(n) = self.nri.get() else {
            return Ok(());
        };
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default();
        let meta = apply::ContainerMeta {
            id,
            pod_sandbox_id: &sb.id,
            name,
            labels: &config.labels,
        };
        let view = apply::container_from_spec(&meta, spec)?;
        let ima = sb.state().ima.is_some();
        let created = n.create_container(&self.nri_pod(sb), &view, ima).await?;
        // Nothing adjusted: the view plugins saw is the container as created.
        let adjusted = if created.adjust == api::ContainerAdjustment::default() {
            view
        } else {
            let cdi = apply::adjust_spec(spec, &created.adjust)?;
            if !cdi.is_empty() {
                let devices = imacri_runtime::cdi::Registry::load(&self.cfg.cdi_spec_dirs)
                    .resolve(&cdi)
                    .map_err(|e| Error::FailedPrecondition(format!("NRI CDI devices: {e}")))?;
                imacri_runtime::cdi::apply(spec, &devices, &imacri_runtime::cdi::HostNodes)?;
            }
            apply::container_from_spec(&meta, spec)?
        };
        if let Ok(mut m) = self.nri_views.lock() {
            m.insert(id.to_string(), adjusted);
        }
        self.nri_apply_updates(created.updates).await;
        if !created.evictions.is_empty() {
            self.evict(created.evictions).await;
        }
        Ok(())
    }

    pub(crate) async fn nri_post_create(&self, id: &str) {
        let Some(n) = self.nri.get() else { return };
        // Kept with the container's record, so plugins synchronized after a
        // restart see it as it was created.
        let view = self.nri_views.lock().ok().and_then(|m| m.get(id).cloned());
        if let (Some(c), Some(v)) = (self.containers.get(id), view) {
            let b = imacri_nri_api::prost::Message::encode_to_vec(&v);
            if let Err(e) = imacri_runtime::store::write_atomic(&c.dir().join(VIEW_FILE), &b) {
                tracing::warn!(container_id = %id, error = %e, "NRI view not saved");
            }
        }
        if let Some((pod, c)) = self.nri_pair(id) {
            if let Err(e) = n.post_create_container(&pod, &c).await {
                tracing::warn!(container_id = %id, error = %e, "NRI PostCreateContainer");
            }
        }
    }

    /// StartContainer's event comes before the task starts; an error fails
    /// the start.
    pub(crate) async fn nri_start(&self, id: &str) -> Result<()> {
        let Some(n) = self.nri.get() else {
            return Ok(());
        };
        if let Some((pod, c)) = self.nri_pair(id) {
            n.start_container(&pod, &c).await?;
        }
        Ok(())
    }

    pub(crate) async fn nri_post_start(&self, id: &str) {
        let Some(n) = self.nri.get() else { return };
        if let Some((pod, c)) = self.nri_pair(id) {
            if let Err(e) = n.post_start_container(&pod, &c).await {
                tracing::warn!(container_id = %id, error = %e, "NRI PostStartContainer");
            }
        }
    }

    /// UpdateContainerResources: plugins may change this container's new
    /// resources and other containers'. Their updates come back to be
    /// applied after the request's own (so theirs win, as upstream merges).
    pub(crate) async fn nri_update(
        &self,
        id: &str,
        res: &cri::LinuxContainerResources,
    ) -> Result<Vec<api::ContainerUpdate>> {
        let Some(n) = self.nri.get() else {
            return Ok(Vec::new());
        };
        match self.nri_pair(id) {
            Some((pod, c)) => Ok(n.update_container(&pod, &c, nri_resources(res)).await?),
            None => Ok(Vec::new()),
        }
    }

    /// Plugins' updates of existing containers; failures are logged.
    pub(crate) async fn nri_apply_updates(&self, updates: Vec<api::ContainerUpdate>) {
        if !updates.is_empty() {
            self.update(updates).await;
        }
    }

    /// UpdatePodSandboxResources: UpdatePodSandbox, then PostUpdatePodSandbox.
    pub(crate) async fn nri_update_pod(
        &self,
        sb: &SandboxEntry,
        res: Option<&cri::LinuxContainerResources>,
    ) -> Result<()> {
        let Some(n) = self.nri.get() else {
            return Ok(());
        };
        Ok(
            n.update_pod_sandbox(&self.nri_pod(sb), res.map(nri_resources))
                .await?,
        )
    }

    pub(crate) async fn nri_post_update(&self, id: &str) {
        let Some(n) = self.nri.get() else { return };
        if let Some((pod, c)) = self.nri_pair(id) {
            if let Err(e) = n.post_update_container(&pod, &c).await {
                tracing::warn!(container_id = %id, error = %e, "NRI PostUpdateContainer");
            }
        }
    }

    /// Plugins hear of a container's stop once, as soon as it stops: by
    /// StopContainer, on its own (an exit, see [`Self::nri_exited`]) or a
    /// failed start, else just before its removal (a created container).
    /// The caller holds the container's `op` lock, which orders this against
    /// the container's other events.
    pub(crate) async fn nri_stop(&self, c: &Arc<ContainerEntry>) {
        let Some(n) = self.nri.get() else { return };
        // Removed meanwhile: its removal told the plugins.
        if !self
            .containers
            .get(&c.id)
            .is_some_and(|x| Arc::ptr_eq(&x, c))
        {
            return;
        }
        match c.update(|s| std::mem::replace(&mut s.nri_stopped, true)) {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(container_id = %c.id, error = %e, "NRI StopContainer not recorded");
                return;
            }
        }
        if let Some((pod, view)) = self.nri_pair(&c.id) {
            match n.stop_container(&pod, &view).await {
                Ok(u) => {
                    self.nri_apply_updates(
                        u.into_iter().filter(|u| u.container_id != c.id).collect(),
                    )
                    .await
                }
                Err(e) => tracing::warn!(container_id = %c.id, error = %e, "NRI StopContainer"),
            }
        }
    }

    /// A container exited on its own: plugins hear its stop without waiting
    /// for a StopContainer kubelet may never send (off the exit monitor, so a
    /// slow plugin delays no other exit; behind the container's running
    /// operation, e.g. the StartContainer it exited during).
    pub(crate) fn nri_exited(self: &Arc<Self>, c: Arc<ContainerEntry>) {
        if self.nri.get().is_none() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // Synchronization first, then the container: the order every
            // request takes them in.
            me.nri_held(async {
                let _op = c.op.write().await;
                me.nri_stop(&c).await;
            })
            .await
        });
    }

    pub(crate) async fn nri_remove(&self, id: &str) {
        let Some(n) = self.nri.get() else { return };
        if let Some((pod, c)) = self.nri_pair(id) {
            if let Err(e) = n.remove_container(&pod, &c).await {
                tracing::warn!(container_id = %id, error = %e, "NRI RemoveContainer");
            }
        }
        if let Ok(mut m) = self.nri_views.lock() {
            m.remove(id);
        }
    }

    fn nri_pair(&self, id: &str) -> Option<(api::PodSandbox, api::Container)> {
        let c = self.containers.get(id)?;
        let sb = self.sandboxes.get(&c.state().sandbox_id)?;
        Some((self.nri_pod(&sb), self.nri_container(&c)))
    }

    async fn apply_update(&self, u: &api::ContainerUpdate) -> Result<()> {
        let c = self.container(&u.container_id)?;
        let Some(r) = u.linux.as_ref().and_then(|l| l.resources.as_ref()) else {
            return Ok(());
        };
        let res = apply::oci_resources(r)?;
        // A plugin may ask while the container's own operation waits on that
        // plugin (e.g. from its StartContainer handler): give up rather than
        // deadlock until the plugin's timeout.
        let _op = tokio::time::timeout(Duration::from_secs(1), c.op.write())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "container {} is busy with another operation",
                    c.id
                ))
            })?;
        match c.state().phase {
            ContainerPhase::Running => self.c.update_task(&c.id, &res).await,
            ContainerPhase::Created => self.c.update_container_resources(&c.id, &res).await,
            ContainerPhase::Exited => Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                c.id
            ))),
        }
    }
}

/// The container as NRI plugins saw it at creation, in its record's dir.
const VIEW_FILE: &str = "nri.pb";

/// CRI resources as NRI's.
fn nri_resources(res: &cri::LinuxContainerResources) -> api::LinuxResources {
    api::LinuxResources {
        memory: Some(api::LinuxMemory {
            limit: (res.memory_limit_in_bytes != 0).then_some(api::OptionalInt64 {
                value: res.memory_limit_in_bytes,
            }),
            swap: (res.memory_swap_limit_in_bytes != 0).then_some(api::OptionalInt64 {
                value: res.memory_swap_limit_in_bytes,
            }),
            ..Default::default()
        }),
        cpu: Some(api::LinuxCpu {
            shares: (res.cpu_shares != 0).then_some(api::OptionalUInt64 {
                value: res.cpu_shares as u64,
            }),
            quota: (res.cpu_quota != 0).then_some(api::OptionalInt64 {
                value: res.cpu_quota,
            }),
            period: (res.cpu_period != 0).then_some(api::OptionalUInt64 {
                value: res.cpu_period as u64,
            }),
            cpus: res.cpuset_cpus.clone(),
            mems: res.cpuset_mems.clone(),
            ..Default::default()
        }),
        hugepage_limits: res
            .hugepage_limits
            .iter()
            .map(|h| api::HugepageLimit {
                page_size: h.page_size.clone(),
                limit: h.limit,
            })
            .collect(),
        unified: res.unified.clone(),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl Host for CriServer {
    async fn snapshot(&self) -> (Vec<api::PodSandbox>, Vec<api::Container>) {
        let pods = self
            .sandboxes
            .all()
            .iter()
            .filter(|s| s.state().phase != SandboxPhase::Creating)
            .map(|s| self.nri_pod(s))
            .collect();
        let containers = self
            .containers
            .all()
            .iter()
            .map(|c| self.nri_container(c))
            .collect();
        (pods, containers)
    }

    async fn update(&self, updates: Vec<api::ContainerUpdate>) -> Vec<api::ContainerUpdate> {
        let mut failed = Vec::new();
        for u in updates {
            if let Err(e) = self.apply_update(&u).await {
                tracing::warn!(container_id = %u.container_id, error = %e, "NRI container update failed");
                if !u.ignore_failure {
                    failed.push(u);
                }
            } else {
                tracing::info!(container_id = %u.container_id, "NRI container update applied");
            }
        }
        failed
    }

    async fn evict(&self, evictions: Vec<api::ContainerEviction>) {
        for ev in evictions {
            if let Ok(c) = self.container(&ev.container_id) {
                tracing::warn!(container_id = %ev.container_id, reason = %ev.reason, "NRI eviction: stopping");
                if let Err(e) = self.stop_container_entry(&c, Duration::ZERO).await {
                    tracing::warn!(container_id = %ev.container_id, error = %e, "NRI eviction failed");
                }
            }
        }
    }

    fn is_ima_container(&self, id: &str) -> bool {
        self.containers
            .get(id)
            .and_then(|c| self.sandboxes.get(&c.state().sandbox_id))
            .is_some_and(|s| s.state().ima.is_some())
    }
}

/// Containers as NRI plugins saw them after CreateContainer, by ID.
pub(crate) type NriViews = std::sync::Mutex<HashMap<String, api::Container>>;
