//! ReopenContainerLog: after kubelet rotates a log, write to a new file at
//! the same path.

use imacri_api::cri;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{Error, Result};

use super::CriServer;

impl CriServer {
    pub(crate) async fn reopen_container_log(
        &self,
        req: cri::ReopenContainerLogRequest,
    ) -> Result<cri::ReopenContainerLogResponse> {
        let c = self.container(&req.container_id)?;
        if c.state().phase != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let log = self.log_of(&c.id).ok_or_else(|| {
            Error::FailedPrecondition(format!("container {} has no log path", c.id))
        })?;
        log.reopen()?;
        Ok(cri::ReopenContainerLogResponse {})
    }
}
