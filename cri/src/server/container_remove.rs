//! RemoveContainer: kill if running, then remove task, FIFOs and the
//! record; containerd's container and snapshot go after the response
//! (`orphans.rs`). The CRI log stays (kubelet owns it). Idempotent.

use imacri_api::cri;
use imacri_runtime::{Error, Result};
use std::sync::Arc;

use super::orphans::Records;
use super::{ContainerEntry, CriServer};

impl CriServer {
    pub(crate) async fn remove_container(
        self: &Arc<Self>,
        req: cri::RemoveContainerRequest,
    ) -> Result<cri::RemoveContainerResponse> {
        let c = match self.container(&req.container_id) {
            Ok(c) => c,
            Err(Error::NotFound(_)) => return Ok(cri::RemoveContainerResponse {}),
            Err(e) => return Err(e),
        };
        let pod = c.state().sandbox_id;
        self.remove_container_entry(&c, Records::Later { pod: &pod })
            .await?;
        Ok(cri::RemoveContainerResponse {})
    }

    pub(crate) async fn remove_container_entry(
        &self,
        c: &Arc<ContainerEntry>,
        when: Records<'_>,
    ) -> Result<()> {
        let _op = c.op.write().await;
        let mut laps = super::laps::Laps::new("RemoveContainer", &c.id);
        self.teardown_container(&c.id, when).await?;
        laps.step("teardown")?;
        // Plugins hear a stop before every removal (of a container never
        // started, or whose stop they were not told of yet).
        self.nri_stop(c).await;
        self.emit(
            imacri_api::cri::ContainerEventType::ContainerDeletedEvent,
            &c.id,
        );
        self.nri_remove(&c.id).await;
        laps.step("nri")?;
        self.containers.remove(&c.id)?;
        laps.lap("record");
        tracing::info!(container_id = %c.id, "container removed");
        Ok(())
    }
}
