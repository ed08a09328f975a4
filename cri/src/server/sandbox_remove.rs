//! RemovePodSandbox: remove every container, then the pause container and
//! all the sandbox's files. Removing a missing sandbox succeeds.

use imacri_api::cri;
use imacri_runtime::{Error, Result};
use std::sync::Arc;

use super::orphans::{Records, REMOVALS_WAIT};
use super::CriServer;

impl CriServer {
    pub(crate) async fn remove_pod_sandbox(
        self: &Arc<Self>,
        req: cri::RemovePodSandboxRequest,
    ) -> Result<cri::RemovePodSandboxResponse> {
        let sb = match self.sandbox(&req.pod_sandbox_id) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => return Ok(cri::RemovePodSandboxResponse {}),
            Err(e) => return Err(e),
        };
        // Held from before its containers are listed: a creation in flight
        // ends first, and what it made is removed here.
        let _op = sb.op.write().await;
        // Nothing of the pod is left in containerd once this returns: what
        // its RemoveContainers left to after their response goes first.
        for id in self.finish_removals(Some(&sb.id), REMOVALS_WAIT).await {
            // Tried once more here (containerd is back if this call gets
            // on); the background retry goes on if this fails too.
            match self.delete_records(&id, Records::Now).await {
                Ok(()) => self.removal_done(&sb.id, &id),
                Err(e) => {
                    tracing::warn!(pod_sandbox_id = %sb.id, container_id = %id, error = %e, "containerd records of a removed container not deleted")
                }
            }
        }
        for c in self.containers_of(&sb.id) {
            self.remove_container_entry(&c, Records::Now).await?;
        }
        imacri_runtime::crash::step("RemovePodSandbox", "containers")?;
        self.teardown_sandbox(&sb).await?;
        imacri_runtime::crash::step("RemovePodSandbox", "teardown")?;
        self.emit(
            imacri_api::cri::ContainerEventType::ContainerDeletedEvent,
            &sb.id,
        );
        if let Some(ima) = sb.state().ima {
            // Its entries stay in the log; a verifier may still quote it.
            let now = imacri_runtime::ids::now_nanos() / 1_000_000_000;
            if let Err(e) = self.integrity.retained.remember(&sb.id, &ima.backend, now) {
                tracing::warn!(pod_sandbox_id = %sb.id, error = %e, "removed pod not kept quotable");
            }
        }
        self.nri_remove_pod(&sb).await;
        self.sandboxes.remove(&sb.id)?;
        self.forget_pod(&sb.id);
        tracing::info!(pod_sandbox_id = %sb.id, "sandbox removed");
        Ok(cri::RemovePodSandboxResponse {})
    }
}
