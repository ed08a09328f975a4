//! The containerd event monitor: task exits and OOM kills update state as
//! they happen. After every (re)subscription, tasks are reconciled once, so
//! exits during a gap (imacri or containerd restarting) are not lost.

use imacri_runtime::containerd::events::{decode, TaskEvent};
use imacri_runtime::containerd::TaskStatus;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::CriServer;

impl CriServer {
    /// Subscribes (so no exit after this returns is missed) and spawns the
    /// monitor loop.
    pub(crate) async fn start_monitor(self: &Arc<Self>) {
        let first = self.c.subscribe_tasks().await;
        let me = Arc::downgrade(self);
        tokio::spawn(async move { monitor(me, first.ok()).await });
    }

    /// Tasks we think run but containerd says stopped or gone.
    async fn reconcile(self: &Arc<Self>) {
        let running: Vec<String> = self
            .containers
            .all()
            .into_iter()
            .filter(|c| c.state().phase == ContainerPhase::Running)
            .map(|c| c.id.clone())
            .chain(
                self.sandboxes
                    .all()
                    .into_iter()
                    .filter(|s| s.state().phase == SandboxPhase::Ready)
                    // A pod without pause has no task of its own.
                    .filter(|s| s.state().pinned.is_none())
                    .map(|s| s.id.clone()),
            )
            .collect();
        for id in running {
            match self.c.task_info(&id).await {
                Ok(Some(t)) if t.status == TaskStatus::Stopped => {
                    self.task_exited(&id, t.exit_status, t.exited_at).await
                }
                Ok(None) => self.task_exited(&id, 255, now_nanos()).await,
                _ => {}
            }
        }
    }
}

async fn monitor(
    server: Weak<CriServer>,
    mut stream: Option<imacri_runtime::containerd::events::EventStream>,
) {
    loop {
        let Some(me) = server.upgrade() else { return };
        let Some(s) = stream.as_mut() else {
            drop(me);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(me) = server.upgrade() else { return };
            match me.c.subscribe_tasks().await {
                Ok(s) => {
                    tracing::info!("containerd event stream (re)connected");
                    stream = Some(s);
                }
                Err(e) => tracing::warn!(error = %e, "subscribing to containerd events"),
            }
            continue;
        };
        me.reconcile().await;
        drop(me);
        loop {
            match s.message().await {
                Ok(Some(env)) => {
                    let Some(me) = server.upgrade() else { return };
                    match decode(&env) {
                        Some(TaskEvent::Exit {
                            container_id,
                            exec_id,
                            exit_status,
                            exited_at,
                        }) if exec_id == container_id => {
                            me.task_exited(&container_id, exit_status, exited_at).await
                        }
                        Some(TaskEvent::Oom { container_id }) => {
                            if let Some(c) = me.containers.get(&container_id) {
                                tracing::warn!(container_id = %container_id, "OOM kill");
                                let _ = c.update(|s| s.oom_killed = true);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("containerd event stream ended; resubscribing");
                    break;
                }
            }
        }
        stream = None;
    }
}
