//! StopPodSandbox: stop every container, then the pause task; free the
//! network namespace and shm. Idempotent, and an unknown ID succeeds.

use imacri_api::cri;
use imacri_runtime::pod::SandboxPhase;
use imacri_runtime::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

use super::lifecycle::SIGKILL;
use super::CriServer;

impl CriServer {
    pub(crate) async fn stop_pod_sandbox(
        self: &Arc<Self>,
        req: cri::StopPodSandboxRequest,
    ) -> Result<cri::StopPodSandboxResponse> {
        let sb = match self.sandbox(&req.pod_sandbox_id) {
            Ok(sb) => sb,
            // Idempotent as in containerd: nothing left to stop.
            Err(Error::NotFound(_)) => return Ok(cri::StopPodSandboxResponse {}),
            Err(e) => return Err(e),
        };
        // Held from before its containers are listed: a creation or start
        // in flight ends first, and what it made is stopped here.
        let op = sb.op.write().await;
        for c in self.containers_of(&sb.id) {
            // kubelet stops containers with their grace period first; what is
            // left is killed.
            self.stop_container_entry(&c, Duration::ZERO).await?;
        }
        imacri_runtime::crash::step("StopPodSandbox", "containers")?;
        {
            self.stop_task(&sb.id, Some(SIGKILL), Duration::ZERO)
                .await?;
            self.release_sandbox_resources(&sb)?;
            imacri_runtime::crash::step("StopPodSandbox", "released")?;
            let was = sb.update(|s| {
                let was = s.phase;
                s.phase = SandboxPhase::NotReady;
                s.pid = 0;
                was
            })?;
            if was == SandboxPhase::Ready {
                self.emit(cri::ContainerEventType::ContainerStoppedEvent, &sb.id);
            }
        }
        drop(op);
        // Plugins hear of the first StopPodSandbox, also of a pod whose pause
        // process had already died.
        self.nri_held(self.nri_stop_pod(&sb)).await;
        Ok(cri::StopPodSandboxResponse {})
    }
}
