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

/// The `ima` object of verbose status: enabled, backend, policy, mappings,
/// and from the journal the measurement count and last violation.
pub(crate) fn ima_info(
    st: &imacri_runtime::pod::SandboxState,
    summary: imacri_runtime::integrity::journal::PodSummary,
) -> serde_json::Value {
    match &st.ima {
        None => serde_json::json!({"enabled": false}),
        Some(i) => serde_json::json!({
            "enabled": true,
            "backend": i.backend,
            "policy": i.policy,
            "mode": i.mode,
            "mappings": st.userns.as_ref().map(|u| &u.mappings),
            "state": if st.phase == SandboxPhase::Ready { "active" } else { "inactive" },
            "measurementCount": summary.measurements,
            "violationCount": summary.violations,
            "lastViolation": summary.last_violation,
        }),
    }
}

impl CriServer {
    pub(crate) fn sandbox_status_of(&self, sb: &SandboxEntry) -> cri::PodSandboxStatus {
        let st = sb.state();
        let mut ns = sb
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        // Report the mappings the pod really has (an ima pod's are ours).
        if let Some(u) = &st.userns {
            let conv = |m: &[imacri_runtime::userns::IdMap]| {
                m.iter()
                    .map(|m| cri::IdMapping {
                        host_id: m.host_id,
                        container_id: m.container_id,
                        length: m.size,
                    })
                    .collect()
            };
            ns.get_or_insert_with(Default::default).userns_options = Some(cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                uids: conv(&u.mappings.uids),
                gids: conv(&u.mappings.gids),
            });
        }
        cri::PodSandboxStatus {
            id: sb.id.clone(),
            metadata: sb.config.metadata.clone(),
            state: cri_state(st.phase) as i32,
            created_at: st.created_at,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: st.ips.first().cloned().unwrap_or_default(),
                additional_ips: st
                    .ips
                    .iter()
                    .skip(1)
                    .map(|ip| cri::PodIp { ip: ip.clone() })
                    .collect(),
            }),
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
                "ima": ima_info(&st, self.integrity.journal.summary(&sb.id)),
                "userNamespace": st.userns,
                "pid": st.pid,
                // false: no pause process; the pinned UTS/IPC namespaces.
                "infraContainer": st.pinned.is_none(),
                "pinnedNamespaces": st.pinned,
                "phase": format!("{:?}", st.phase),
                "netns": st.netns,
                "image": st.image_name,
                "imageID": st.image_id,
                "runtimeHandler": st.runtime_handler,
                "runtime": self.runtime_of(&st.runtime_handler).ok().map(|r| (&r.runtime_type, &r.binary_name)),
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
