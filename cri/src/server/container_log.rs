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
        let st = c.state();
        if st.phase != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        // A container without a log path has nothing to reopen: its output
        // goes nowhere, as in containerd (which "reopens" a discarding
        // logger and succeeds).
        if st.log_path.as_os_str().is_empty() {
            return Ok(cri::ReopenContainerLogResponse {});
        }
        let log = self.log_of(&c.id).ok_or_else(|| {
            Error::FailedPrecondition(format!("container {} has no log open", c.id))
        })?;
        log.reopen()?;
        Ok(cri::ReopenContainerLogResponse {})
    }
}
