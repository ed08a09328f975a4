//! PodSandboxStatus.

use imacri_api::cri;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::pod::SandboxPhase;
use imacri_runtime::Result;
use std::collections::HashMap;

use super::{CriServer, SandboxEntry};

pub(crate) fn cri_state(p: SandboxPhase) -> cri::PodSandboxState {
    match p {
        SandboxPhase::Ready => cri::PodSandboxState::SandboxReady,
        _ => cri::PodSandboxState::SandboxNotready,
    }
}

impl CriServer {
    pub(crate) fn sandbox_status_of(&self, sb: &SandboxEntry) -> cri::PodSandboxStatus {
        let st = sb.state();
        let ns = sb
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        cri::PodSandboxStatus {
            id: sb.id.clone(),
            metadata: sb.config.metadata.clone(),
            state: cri_state(st.phase) as i32,
            created_at: st.created_at,
            // Pod IPs come with CNI networking.
            network: Some(cri::PodSandboxNetworkStatus::default()),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace { options: ns }),
            }),
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            runtime_handler: st.runtime_handler,
        }
    }

    pub(crate) async fn pod_sandbox_status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse> {
        let sb = self.sandbox(&req.pod_sandbox_id)?;
        let status = self.sandbox_status_of(&sb);
        let mut info = HashMap::new();
        if req.verbose {
            let st = sb.state();
            let v = serde_json::json!({
                "pid": st.pid,
                "phase": format!("{:?}", st.phase),
                "netns": st.netns,
                "image": st.image_name,
                "imageID": st.image_id,
                "runtimeHandler": st.runtime_handler,
                "runtime": self.cfg.containerd.runtime,
                "snapshotter": self.cfg.containerd.snapshotter,
                "containerdNamespace": self.c.namespace(),
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: vec![],
            timestamp: now_nanos(),
        })
    }
}
