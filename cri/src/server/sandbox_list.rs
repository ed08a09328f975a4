//! ListPodSandbox and StreamPodSandboxes.

use imacri_api::cri;

use super::sandbox_status::cri_state;
use super::validate::labels_match;
use super::CriServer;

impl CriServer {
    pub(crate) fn list_pod_sandboxes(
        &self,
        filter: Option<&cri::PodSandboxFilter>,
    ) -> Vec<cri::PodSandbox> {
        let mut out: Vec<cri::PodSandbox> = self
            .sandboxes
            .all()
            .into_iter()
            .filter_map(|sb| {
                let st = sb.state();
                if st.phase == imacri_runtime::pod::SandboxPhase::Creating {
                    return None;
                }
                if let Some(f) = filter {
                    if !f.id.is_empty() && !sb.id.starts_with(&f.id) {
                        return None;
                    }
                    if let Some(s) = &f.state {
                        if cri_state(st.phase) as i32 != s.state {
                            return None;
                        }
                    }
                    if !labels_match(&f.label_selector, &sb.config.labels) {
                        return None;
                    }
                }
                Some(cri::PodSandbox {
                    id: sb.id.clone(),
                    metadata: sb.config.metadata.clone(),
                    state: cri_state(st.phase) as i32,
                    created_at: st.created_at,
                    labels: sb.config.labels.clone(),
                    annotations: sb.config.annotations.clone(),
                    runtime_handler: st.runtime_handler,
                })
            })
            .collect();
        out.sort_by_key(|s| s.created_at);
        out
    }
}
