//! ListContainers and StreamContainers.

use imacri_api::cri;

use super::container_status::{cri_state, image_spec};
use super::validate::labels_match;
use super::CriServer;

impl CriServer {
    pub(crate) fn list_containers(
        &self,
        filter: Option<&cri::ContainerFilter>,
    ) -> Vec<cri::Container> {
        let mut out: Vec<cri::Container> = self
            .containers
            .all()
            .into_iter()
            .filter_map(|c| {
                let st = c.state();
                if let Some(f) = filter {
                    if !f.id.is_empty() && !c.id.starts_with(&f.id) {
                        return None;
                    }
                    if !f.pod_sandbox_id.is_empty() && !st.sandbox_id.starts_with(&f.pod_sandbox_id)
                    {
                        return None;
                    }
                    if let Some(s) = &f.state {
                        if cri_state(st.phase) as i32 != s.state {
                            return None;
                        }
                    }
                    if !labels_match(&f.label_selector, &c.config.labels) {
                        return None;
                    }
                }
                Some(cri::Container {
                    id: c.id.clone(),
                    pod_sandbox_id: st.sandbox_id.clone(),
                    metadata: c.config.metadata.clone(),
                    image: Some(image_spec(&c)),
                    image_ref: st.image_ref.clone(),
                    state: cri_state(st.phase) as i32,
                    created_at: st.created_at,
                    labels: c.config.labels.clone(),
                    annotations: c.config.annotations.clone(),
                    image_id: st.image_id.clone(),
                })
            })
            .collect();
        out.sort_by_key(|c| c.created_at);
        out
    }
}
