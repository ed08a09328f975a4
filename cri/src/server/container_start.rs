//! StartContainer: FIFOs and log copiers first (the shim opens the FIFOs at
//! task creation), then the task. A failed start leaves the container Exited
//! with reason StartError, as containerd does.

use imacri_api::cri;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::io::{self, LogFile};
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{Error, Result};
use std::sync::Arc;

use super::{ContainerEntry, CriServer, LiveIo};

impl CriServer {
    pub(crate) async fn start_container(
        self: &Arc<Self>,
        req: cri::StartContainerRequest,
    ) -> Result<cri::StartContainerResponse> {
        let c = self.container(&req.container_id)?;
        let sb = self.sandbox(&c.state().sandbox_id)?;
        // A pod not ready (being made or stopped) fails it at once.
        self.pod_ready_to_start(&sb, &c.id)?;
        // The pod first (the order its stop takes them in): its stop waits
        // for this start, then stops what it started; a start that waited
        // for a stop finds the pod not ready.
        let _pod = sb.op.read().await;
        let _op = c.op.write().await;
        let st = c.state();
        if st.phase != ContainerPhase::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {:?}, only a created container can be started",
                c.id, st.phase
            )));
        }
        self.pod_ready_to_start(&sb, &c.id)?;
        let started_at = now_nanos();
        let started = match self.nri_start(&c.id).await {
            Ok(()) => self.start_task_io(&c).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(pid) => {
                // A fast process may have exited (and been recorded) already;
                // its task was then left for us to delete.
                let _order = self.event_order.lock();
                self.set_starting(&c.id, false);
                // The process runs: recorded as running even if the record
                // cannot be written yet (retried), rather than failing the
                // call while it runs on.
                let recorded = super::lifecycle::record(&c, "recording the start", |s| {
                    s.started_at = started_at;
                    let created = s.phase == ContainerPhase::Created;
                    if created {
                        s.phase = ContainerPhase::Running;
                        s.pid = pid;
                    }
                    created
                })?;
                tracing::info!(container_id = %c.id, pid, "container started");
                if recorded {
                    self.emit(cri::ContainerEventType::ContainerStartedEvent, &c.id);
                }
                drop(_order);
                if !recorded {
                    tracing::debug!(container_id = %c.id, "exited while containerd started it; its task is deleted now");
                    self.delete_exited_task(&c.id).await;
                }
                self.nri_post_start(&c.id).await;
                Ok(cri::StartContainerResponse {})
            }
            Err(e) => {
                {
                    let _order = self.event_order.lock();
                    self.set_starting(&c.id, false);
                }
                if let Err(te) = self.teardown_task_only(&c.id).await {
                    // Its process must not run on (containerd down): an
                    // exited container's process would run beside its
                    // replacement.
                    let (me, id) = (self.clone(), c.id.clone());
                    let retry = move || {
                        let (me, id) = (me.clone(), id.clone());
                        async move { me.teardown_task_only(&id).await }
                    };
                    super::orphans::clean_up_later(
                        &c.id,
                        "deletion of a failed start's task",
                        te,
                        retry,
                    );
                }
                let msg = e.to_string();
                let _ = super::lifecycle::record(&c, "recording the failed start", |s| {
                    s.phase = ContainerPhase::Exited;
                    s.exit_code = 128;
                    s.reason = "StartError".into();
                    s.message = msg;
                    s.finished_at = now_nanos();
                });
                // As containerd: plugins told of the start hear it stopped.
                self.nri_stop(&c).await;
                Err(e)
            }
        }
    }

    async fn start_task_io(self: &Arc<Self>, c: &Arc<ContainerEntry>) -> Result<u32> {
        let st = c.state();
        let mut laps = super::laps::Laps::new("StartContainer", &c.id);
        let stdio = io::create_fifos(&self.cfg.fifo_dir(), &c.id, c.config.stdin, c.config.tty)?;
        let log = if st.log_path.as_os_str().is_empty() {
            None
        } else {
            Some(LogFile::open(&st.log_path)?)
        };
        let mut live = LiveIo::default();
        live.copy_output(stdio.stdout.clone(), stdio.stderr.clone(), log)?;
        if let Some(p) = &stdio.stdin {
            live.stdin = Some(io::hold_open(p)?);
        }
        self.set_io(&c.id, live);
        let result = async {
            let created = self
                .created_mounts
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&c.id));
            let mounts = match created {
                Some(m) => m,
                // Created by an imacri before a restart.
                None => {
                    self.c
                        .snapshot_mounts(&self.cfg.containerd.snapshotter, &c.id)
                        .await?
                }
            };
            laps.step("io+mounts")?;
            let pod = self.sandbox(&st.sandbox_id)?;
            self.sealed(&st.sandbox_id).await?;
            let pid = self
                .create_task_on(&c.id, &pod.state(), mounts, &stdio, st.idmapped_rootfs)
                .await?;
            laps.step("task")?;
            let pod_state = pod.state();
            self.own_task(&pod_state, &c.id, pid).await?;
            // Both before the entrypoint can run (the task waits for start);
            // they touch different things, so they run side by side.
            let (guarded, watch) = tokio::join!(
                self.guard_process(
                    &pod_state,
                    &c.id,
                    pid,
                    imacri_runtime::integrity::guard::Scope::PidNamespace
                ),
                self.measure_new_container(&st.sandbox_id, &c.id, pid)
            );
            guarded?;
            if let Some(w) = watch? {
                self.set_measure(&c.id, w);
            }
            laps.step("guards+measure")?;
            self.watch_exit(&c.id);
            {
                let _order = self.event_order.lock();
                self.set_starting(&c.id, true);
            }
            let pid = self.c.start_task(&c.id, "").await?;
            laps.step("start")?;
            Ok(pid)
        }
        .await;
        // On failure the caller's teardown drops the copiers' holders.
        result
    }

    fn pod_ready_to_start(&self, sb: &Arc<super::SandboxEntry>, id: &str) -> Result<()> {
        self.still_ready(sb).map_err(|e| match e {
            Error::FailedPrecondition(m) => {
                Error::FailedPrecondition(format!("{m}: container {id} not started"))
            }
            e => e,
        })
    }

    /// Deletes a task that failed to start, keeping the container.
    pub(crate) async fn teardown_task_only(&self, id: &str) -> Result<()> {
        self.end_task(id).await?;
        self.take_io(id);
        self.remove_fifos(id);
        Ok(())
    }
}
