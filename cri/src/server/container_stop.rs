//! StopContainer: the stop signal, then SIGKILL after the timeout.
//! Stopping a container that is not running, or is unknown, succeeds.

use imacri_api::cri;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{ContainerEntry, CriServer};

impl CriServer {
    pub(crate) async fn stop_container(
        self: &Arc<Self>,
        req: cri::StopContainerRequest,
    ) -> Result<cri::StopContainerResponse> {
        let c = match self.container(&req.container_id) {
            Ok(c) => c,
            // Idempotent as in containerd: nothing left to stop.
            Err(Error::NotFound(_)) => return Ok(cri::StopContainerResponse {}),
            Err(e) => return Err(e),
        };
        // A negative timeout is none, as in containerd: SIGKILL at once.
        let grace = Duration::from_secs(req.timeout.max(0) as u64);
        self.stop_container_entry(&c, grace).await?;
        Ok(cri::StopContainerResponse {})
    }

    pub(crate) async fn stop_container_entry(
        &self,
        c: &Arc<ContainerEntry>,
        grace: Duration,
    ) -> Result<()> {
        {
            // Checked with the container's calls held off (a start in
            // progress ends first); the stop itself holds nothing, as
            // containerd's: a later stop with a shorter grace period
            // (kubelet's forced deletion) or a removal kills at once
            // instead of waiting out this one's grace period.
            let _op = c.op.write().await;
            if c.state().phase != ContainerPhase::Running {
                return Ok(());
            }
        }
        let signal = match grace.is_zero() || c.stop_signaled.swap(true, Ordering::SeqCst) {
            // No grace period, or a stop signal sent already: only the
            // grace period of this call, then SIGKILL.
            true => None,
            false => Some(c.state().stop_signal.max(1) as u32),
        };
        self.stop_task(&c.id, signal, grace).await?;
        tracing::info!(container_id = %c.id, "container stopped");
        // Plugins hear it with synchronization held off only now: a plugin
        // connecting during a grace period does not wait for it.
        self.nri_held(async {
            let _op = c.op.write().await;
            self.nri_stop(c).await
        })
        .await;
        Ok(())
    }
}
