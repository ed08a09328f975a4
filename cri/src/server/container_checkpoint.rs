//! CheckpointContainer (KEP-2008, kubelet's checkpoint API). Checkpoints
//! need CRIU; the request is validated like containerd does, then the node
//! is asked whether CRIU can run here at all.

use imacri_api::cri;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{Error, Result};

use super::validate::non_empty;
use super::CriServer;

impl CriServer {
    pub(crate) async fn checkpoint_container(
        &self,
        req: cri::CheckpointContainerRequest,
    ) -> Result<cri::CheckpointContainerResponse> {
        non_empty("container_id", &req.container_id)?;
        non_empty("location", &req.location)?;
        let c = self.container(&req.container_id)?;
        if c.state().phase != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running; only a running container can be checkpointed",
                c.id
            )));
        }
        let why = match tokio::task::spawn_blocking(imacri_runtime::sysinfo::criu_check).await {
            Ok(Err(why)) => why,
            Ok(Ok(())) => "writing the checkpoint archive is not built yet".into(),
            Err(e) => e.to_string(),
        };
        Err(Error::Unimplemented(format!(
            "CheckpointContainer: CRIU cannot checkpoint on this node: `criu check`: {why}"
        )))
    }
}
