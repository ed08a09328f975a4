//! Task lifecycle shared by the RPCs: exit watching, stopping with a grace
//! period, and idempotent teardown used by Remove* and by rollback.

use imacri_api::cri;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use imacri_runtime::{Error, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::orphans::Records;
use super::{CriServer, SandboxEntry};

pub const SIGKILL: u32 = 9;

/// How long a SIGKILLed task may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Sandbox,
    Container,
}

/// Changes an object's state in memory (what happened is true whether or
/// not it is on disk yet) and writes its record; a write that fails (a
/// full disk, imacri at its open-file limit) is retried in the background
/// until it lands, or the record is gone (the object removed meanwhile).
pub(crate) fn record<C, S, T>(
    e: &Arc<imacri_runtime::store::Entry<C, S>>,
    what: &'static str,
    f: impl FnOnce(&mut S) -> T,
) -> Result<T>
where
    C: Send + Sync + 'static,
    S: Clone + serde::Serialize + Send + Sync + 'static,
{
    let out = e.update_in_memory(f)?;
    if let Err(first) = e.persist() {
        let e = e.clone();
        super::orphans::clean_up_later(&e.id.clone(), what, first, move || {
            let e = e.clone();
            async move {
                match e.dir().exists() {
                    true => e.persist(),
                    false => Ok(()),
                }
            }
        });
    }
    Ok(out)
}

impl CriServer {
    /// Registers an exit channel for a task about to start; the event
    /// monitor (`monitor.rs`) records the exit and wakes waiters.
    pub(crate) fn watch_exit(&self, id: &str) {
        let (tx, _) = watch::channel(false);
        if let Ok(mut m) = self.exits.lock() {
            m.insert(id.to_string(), tx);
        }
    }

    /// Records a task's exit once (state, CRI event), deletes the task and
    /// wakes anyone waiting for it.
    pub(crate) async fn task_exited(self: &Arc<Self>, id: &str, code: u32, at: i64) {
        let kind = if self.containers.get(id).is_some() {
            Kind::Container
        } else if self.sandboxes.get(id).is_some() {
            Kind::Sandbox
        } else {
            return;
        };
        self.on_exit(id, kind, code, at).await;
        if let Ok(m) = self.exits.lock() {
            if let Some(tx) = m.get(id) {
                tx.send_replace(true);
            }
        }
    }

    async fn on_exit(self: &Arc<Self>, id: &str, kind: Kind, code: u32, at: i64) {
        let mut start_in_flight = false;
        match kind {
            Kind::Container => {
                // Let the log copiers drain what the process wrote last.
                if let Some(io) = self.take_io(id) {
                    drop(io.holders);
                    let join = async {
                        for h in io.copiers {
                            let _ = h.await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), join).await;
                }
                if let Some(c) = self.containers.get(id) {
                    // containerd's OOM event can arrive after the exit; a
                    // SIGKILLed container whose cgroup counted an OOM kill
                    // was OOM-killed (the cgroup lives until the task is
                    // deleted).
                    let oom = code == 137
                        && !c.state().oom_killed
                        && imacri_runtime::metrics::sample(
                            std::path::Path::new("/sys/fs/cgroup"),
                            &self.cgroup_of(&c),
                            imacri_runtime::sysinfo::cgroup_version(),
                        )
                        .oom_kills
                        .is_some_and(|n| n > 0);
                    let _order = self.event_order.lock();
                    start_in_flight = self.start_in_flight(id);
                    // The exit is true whatever the disk says: recorded in
                    // memory and told (events, plugins) even if its write
                    // fails (a full disk, imacri at its open-file limit),
                    // which is retried.
                    let res = record(&c, "recording the exit", |s| {
                        if oom {
                            s.oom_killed = true;
                        }
                        let before = s.phase;
                        if s.phase != ContainerPhase::Exited {
                            if s.oom_killed {
                                s.reason = "OOMKilled".into();
                            }
                            s.phase = ContainerPhase::Exited;
                            s.finished_at = if at > 0 { at } else { now_nanos() };
                            if s.started_at == 0 || s.started_at > s.finished_at {
                                s.started_at = s.finished_at;
                            }
                            s.exit_code = code as i32;
                            if s.reason.is_empty() {
                                s.reason = if code == 0 { "Completed" } else { "Error" }.into();
                            }
                            s.pid = 0;
                        }
                        before
                    });
                    match res {
                        // Exited before StartContainer recorded the start: the
                        // started event goes first (StartContainer then skips it).
                        Ok(ContainerPhase::Created) => {
                            self.emit(cri::ContainerEventType::ContainerStartedEvent, id);
                            self.emit(cri::ContainerEventType::ContainerStoppedEvent, id);
                            self.nri_exited(c.clone());
                        }
                        Ok(ContainerPhase::Running) => {
                            self.emit(cri::ContainerEventType::ContainerStoppedEvent, id);
                            self.nri_exited(c.clone());
                        }
                        Ok(ContainerPhase::Exited) => {}
                        Err(e) => tracing::error!(container_id = %id, error = %e, "recording exit"),
                    }
                    tracing::info!(container_id = %id, exit_code = code, "container exited");
                }
            }
            Kind::Sandbox => {
                if let Some(s) = self.sandboxes.get(id) {
                    // As a container's exit: told even if not written yet.
                    let was = record(&s, "recording the pod's exit", |st| {
                        let was = st.phase;
                        if st.phase == SandboxPhase::Ready {
                            st.phase = SandboxPhase::NotReady;
                        }
                        st.pid = 0;
                        was
                    });
                    if matches!(was, Ok(SandboxPhase::Ready)) {
                        self.emit(cri::ContainerEventType::ContainerStoppedEvent, id);
                    }
                    tracing::info!(pod_sandbox_id = %id, exit_code = code, "sandbox exited");
                }
            }
        }
        if start_in_flight {
            // StartContainer deletes it once containerd's Start returned.
            return;
        }
        self.delete_exited_task(id).await;
    }

    /// Deletes the task of a process that exited (its exit recorded).
    pub(crate) async fn delete_exited_task(&self, id: &str) {
        match self.c.delete_task(id).await.ignore_not_found() {
            Ok(()) => {
                if let Ok(mut d) = self.deleted_tasks.lock() {
                    d.insert(id.to_string());
                }
            }
            Err(e) => tracing::warn!(id = %id, error = %e, "deleting exited task"),
        }
    }

    /// Whether containerd is starting `id`'s task (under `event_order`).
    fn start_in_flight(&self, id: &str) -> bool {
        self.starting.lock().is_ok_and(|s| s.contains(id))
    }

    /// Marks `id`'s task as being started (`true`) or no longer (under
    /// `event_order`).
    pub(crate) fn set_starting(&self, id: &str, starting: bool) {
        if let Ok(mut s) = self.starting.lock() {
            if starting {
                s.insert(id.to_string());
            } else {
                s.remove(id);
            }
        }
    }

    /// Waits up to `d` for the task's exit to be recorded; true if it was.
    pub(crate) async fn wait_exit(&self, id: &str, d: Duration) -> bool {
        let Some(mut rx) = self
            .exits
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|tx| tx.subscribe()))
        else {
            return true;
        };
        if *rx.borrow() {
            return true;
        }
        let res = tokio::time::timeout(d, rx.wait_for(|v| *v)).await;
        matches!(res, Ok(Ok(_)))
    }

    /// Signals a task (`None`: a stop before this one did), then SIGKILLs
    /// it when `grace` runs out.
    pub(crate) async fn stop_task(
        &self,
        id: &str,
        signal: Option<u32>,
        grace: Duration,
    ) -> Result<()> {
        if !grace.is_zero() && signal != Some(SIGKILL) {
            if let Some(signal) = signal {
                match self.c.kill_task(id, "", signal).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            if self.wait_exit(id, grace).await {
                return Ok(());
            }
            tracing::info!(id = %id, "grace period over, killing");
        }
        match self.c.kill_task(id, "", SIGKILL).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        }
        if self.wait_exit(id, KILL_WAIT).await {
            Ok(())
        } else {
            Err(Error::DeadlineExceeded(format!(
                "task {id} did not exit {}s after SIGKILL",
                KILL_WAIT.as_secs()
            )))
        }
    }

    /// Kills the task of `id` if it runs, waits for its exit (containerd
    /// refuses to delete a task whose process has not exited yet), and
    /// deletes it.
    pub(crate) async fn end_task(&self, id: &str) -> Result<()> {
        if let Some(info) = self.c.task_info(id).await? {
            if info.status == imacri_runtime::containerd::TaskStatus::Running {
                self.c.kill_task(id, "", SIGKILL).await.ignore_not_found()?;
                if !self.wait_exit(id, KILL_WAIT).await {
                    let _ = self.c.wait_task(id, "").await;
                }
            }
            self.c.delete_task(id).await.ignore_not_found()?;
        }
        Ok(())
    }

    /// Removes every containerd object and file of a container. Safe to call
    /// on a half-created container; missing pieces are skipped.
    /// `when` says whether the containerd records go before it returns
    /// (`orphans.rs`).
    pub(crate) async fn teardown_container(&self, id: &str, when: Records<'_>) -> Result<()> {
        let mut laps = super::laps::Laps::new("teardown", id);
        let deleted = self
            .deleted_tasks
            .lock()
            .map(|mut d| d.remove(id))
            .unwrap_or(false);
        if !deleted {
            self.end_task(id).await?;
        }
        laps.step("task")?;
        self.take_io(id);
        if let Ok(mut m) = self.created_mounts.lock() {
            m.remove(id);
        }
        self.delete_records(id, when).await?;
        laps.step("containerd")?;
        self.remove_fifos(id);
        self.remove_idmapped_volumes(id);
        let config = self.containers.get(id).map(|c| c.config.clone());
        self.remove_image_volumes(id, &config.unwrap_or_default())
            .await;
        if let Ok(mut m) = self.exits.lock() {
            m.remove(id);
        }
        // A sandbox's own pod-level sample too (its ID is torn down here).
        if let Ok(mut m) = self.cpu_samples.lock() {
            m.remove(id);
            m.remove(&super::stats::pod_sample_key(id));
        }
        Ok(())
    }

    pub(crate) fn remove_fifos(&self, prefix: &str) {
        if let Ok(rd) = std::fs::read_dir(self.cfg.fifo_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes the pause container, its snapshot, netns, userns, shm and files.
    pub(crate) async fn teardown_sandbox(&self, sb: &SandboxEntry) -> Result<()> {
        let (id, st) = (&sb.id, &sb.state());
        self.teardown_container(id, Records::Now).await?;
        self.release_sandbox_resources(sb)?;
        if let Some(u) = &st.userns {
            imacri_runtime::netns::remove(&u.path)?;
        }
        match std::fs::remove_dir_all(&st.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", &st.dir, e)),
        }
    }

    /// What StopPodSandbox frees: the pod's network (CNI DEL first, while
    /// the netns exists), the network namespace, the shm mount and a pod
    /// without pause's UTS and IPC namespaces.
    pub(crate) fn release_sandbox_resources(&self, sb: &SandboxEntry) -> Result<()> {
        let st = sb.state();
        if let Some(ns) = &st.netns {
            tokio::task::block_in_place(|| self.cni.del(&pod_network(sb, ns)))?;
            imacri_runtime::netns::remove(ns)?;
        }
        imacri_runtime::mount::unmount_all(&st.dir.join("shm"))?;
        if let Some(p) = &st.pinned {
            imacri_runtime::podns::remove(p)?;
        }
        Ok(())
    }
}

/// The pod as CNI sees it.
pub(crate) fn pod_network(
    sb: &SandboxEntry,
    netns: &std::path::Path,
) -> imacri_runtime::cni::PodNetwork {
    let md = sb.config.metadata.clone().unwrap_or_default();
    let bandwidth = |key: &str| {
        sb.config
            .annotations
            .get(key)
            .and_then(|q| imacri_runtime::cni::parse_quantity(q))
    };
    imacri_runtime::cni::PodNetwork {
        id: sb.id.clone(),
        netns: netns.to_path_buf(),
        name: md.name,
        namespace: md.namespace,
        uid: md.uid,
        port_mappings: sb
            .config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let proto = match imacri_api::cri::Protocol::try_from(p.protocol) {
                    Ok(imacri_api::cri::Protocol::Udp) => "udp",
                    Ok(imacri_api::cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                };
                (
                    p.container_port,
                    p.host_port,
                    proto.to_string(),
                    p.host_ip.clone(),
                )
            })
            .collect(),
        bandwidth: (
            bandwidth("kubernetes.io/ingress-bandwidth"),
            bandwidth("kubernetes.io/egress-bandwidth"),
        ),
        dns: sb
            .config
            .dns_config
            .as_ref()
            .map(|d| (d.servers.clone(), d.searches.clone(), d.options.clone())),
    }
}
