//! Start-up recovery: reconcile imacri's records with containerd after a
//! restart (or a crash), so nothing a user created is lost or leaked.

use imacri_runtime::containerd::TaskStatus;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::io::LogFile;
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use std::sync::Arc;

use super::{CriServer, LiveIo};

impl CriServer {
    /// Returns the kept seccomp listeners for the map guard to adopt.
    pub(crate) async fn recover(
        self: &Arc<Self>,
        kept: imacri_runtime::integrity::kept::Kept,
    ) -> Vec<imacri_runtime::integrity::mapguard::KeptListener> {
        for sb in self.sandboxes.all() {
            let st = sb.state();
            if st.phase == SandboxPhase::Creating {
                // Crashed mid-RunPodSandbox: roll it back.
                tracing::warn!(pod_sandbox_id = %sb.id, "rolling back interrupted sandbox creation");
                self.roll_back_sandbox(&sb).await;
                continue;
            }
            if let Some(p) = &st.pinned {
                // No pause to ask containerd about: the pod is as ready as
                // its pinned namespaces (a reboot takes them).
                let netns_ok = st.netns.as_ref().is_none_or(|n| n.exists());
                if st.phase == SandboxPhase::Ready
                    && !(netns_ok && imacri_runtime::podns::exists(p))
                {
                    let _ = sb.update(|s| s.phase = SandboxPhase::NotReady);
                }
                continue;
            }
            match self.c.task_info(&sb.id).await {
                Ok(Some(t)) if t.status == TaskStatus::Running => {
                    let _ = sb.update(|s| s.pid = t.pid);
                    self.watch_exit(&sb.id);
                    // The last imacri may have died before its seal (it runs
                    // after RunPodSandbox's task start); sealing is idempotent.
                    self.seal_pause_later(&sb.state(), &sb.id, t.pid);
                }
                Ok(_) => {
                    let _ = sb.update(|s| {
                        s.phase = SandboxPhase::NotReady;
                        s.pid = 0;
                    });
                }
                Err(e) => {
                    tracing::error!(pod_sandbox_id = %sb.id, error = %e, "recovering sandbox")
                }
            }
        }
        // Running ima containers whose groups the keeper held waited for us.
        let mut groups = kept.groups;
        for c in self.containers.all() {
            let st = match c.state().phase {
                ContainerPhase::Running => c.state(),
                ContainerPhase::Created if self.started_before_the_crash(&c).await => c.state(),
                _ => continue,
            };
            match self.c.task_info(&c.id).await {
                Ok(Some(t)) if t.status == TaskStatus::Running => {
                    // Reattach the log copiers to the FIFOs the shim still holds.
                    let mut live = LiveIo::default();
                    let log = (!st.log_path.as_os_str().is_empty())
                        .then(|| LogFile::open(&st.log_path).ok())
                        .flatten();
                    let fifo = |suffix: &str| {
                        let p = self.cfg.fifo_dir().join(format!("{}-{suffix}", c.id));
                        p.exists().then_some(p)
                    };
                    if let Err(e) = live.copy_output(fifo("stdout"), fifo("stderr"), log) {
                        tracing::warn!(container_id = %c.id, error = %e, "reattaching log copiers");
                    }
                    let (watch, waited) = self
                        .remeasure_after_restart(&st.sandbox_id, &c.id, t.pid, &mut groups)
                        .await;
                    live.measure = watch;
                    self.set_io(&c.id, live);
                    self.watch_exit(&c.id);
                    if !waited && self.must_kill_unmeasured(&st.sandbox_id) {
                        tracing::warn!(container_id = %c.id, "killing a container that ran unmeasured while imacri was down (ima.fail_mode = \"closed\")");
                        let _ = c.update(|s| {
                            s.reason = "ImaUnmeasured".into();
                            s.message = "killed: it ran unmeasured while imacri was down (ima.fail_mode = \"closed\")".into();
                        });
                        let _ = self.c.kill_task(&c.id, "", super::lifecycle::SIGKILL).await;
                    }
                }
                Ok(Some(t)) => {
                    // Exited while we were down: record how.
                    let _ = c.update(|s| {
                        s.phase = ContainerPhase::Exited;
                        s.exit_code = t.exit_status as i32;
                        s.finished_at = if t.exited_at > 0 {
                            t.exited_at
                        } else {
                            now_nanos()
                        };
                        s.reason = if t.exit_status == 0 {
                            "Completed"
                        } else {
                            "Error"
                        }
                        .into();
                        s.pid = 0;
                    });
                    let _ = self.c.delete_task(&c.id).await;
                }
                Ok(None) => {
                    let _ = c.update(|s| {
                        s.phase = ContainerPhase::Exited;
                        s.exit_code = 255;
                        s.finished_at = now_nanos();
                        s.reason = "Unknown".into();
                        s.message = "the task disappeared while imacri was not running".into();
                        s.pid = 0;
                    });
                }
                Err(e) => tracing::error!(container_id = %c.id, error = %e, "recovering container"),
            }
        }
        self.release_groups(groups);
        kept.listeners
    }

    /// A created container whose StartContainer a crash cut short, as
    /// containerd settles it: a task made and not started is deleted (the
    /// container can be started again); one that started is the
    /// container's running process, recorded as such so that it is
    /// measured again (its fanotify groups wait with the keeper) rather
    /// than left to run on with its groups released, unmeasured.
    async fn started_before_the_crash(&self, c: &super::ContainerEntry) -> bool {
        match self.c.task_info(&c.id).await {
            Ok(Some(t)) if matches!(t.status, TaskStatus::Running | TaskStatus::Stopped) => {
                tracing::warn!(container_id = %c.id, pid = t.pid, "a start cut short by a crash had started the task: the container runs");
                let _ = c.update(|s| {
                    s.phase = ContainerPhase::Running;
                    s.pid = t.pid;
                    s.started_at = now_nanos();
                });
                self.emit(
                    imacri_api::cri::ContainerEventType::ContainerStartedEvent,
                    &c.id,
                );
                true
            }
            Ok(Some(t)) => {
                tracing::warn!(container_id = %c.id, status = ?t.status, "deleting the task of a start cut short by a crash");
                if let Err(e) = self.teardown_task_only(&c.id).await {
                    tracing::error!(container_id = %c.id, error = %e, "the task of a start cut short not deleted");
                }
                false
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(container_id = %c.id, error = %e, "recovering created container");
                false
            }
        }
    }
}
