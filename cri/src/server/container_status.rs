//! ContainerStatus.

use imacri_api::cri;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::Result;
use std::collections::HashMap;

use super::{ContainerEntry, CriServer};

pub(crate) fn cri_state(p: ContainerPhase) -> cri::ContainerState {
    match p {
        ContainerPhase::Created => cri::ContainerState::ContainerCreated,
        ContainerPhase::Running => cri::ContainerState::ContainerRunning,
        ContainerPhase::Exited => cri::ContainerState::ContainerExited,
    }
}

pub(crate) fn image_spec(c: &ContainerEntry) -> cri::ImageSpec {
    let st = c.state();
    let mut spec = c.config.image.clone().unwrap_or_default();
    spec.image = st.image_name;
    spec
}

/// The container's OCI spec as CreateContainer made it, next to its record.
const SPEC_FILE: &str = "spec.json";

pub(crate) fn save_spec(c: &ContainerEntry, spec: &oci_spec::runtime::Spec) {
    let path = c.dir().join(SPEC_FILE);
    let res = serde_json::to_vec(spec)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&path, b));
    if let Err(e) = res {
        tracing::warn!(container_id = %c.id, error = %e, "spec not kept for verbose status");
    }
}

fn saved_spec<T: serde::de::DeserializeOwned>(c: &ContainerEntry) -> Option<T> {
    let b = std::fs::read(c.dir().join(SPEC_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

impl CriServer {
    /// The container's OCI spec: the one kept at create, else containerd's
    /// copy (a container created before spec.json was kept).
    pub(crate) async fn spec_of(&self, c: &ContainerEntry) -> Result<oci_spec::runtime::Spec> {
        match saved_spec(c) {
            Some(s) => Ok(s),
            None => self.c.container_spec(&c.id).await,
        }
    }

    pub(crate) fn container_status_of(&self, c: &ContainerEntry) -> cri::ContainerStatus {
        let st = c.state();
        cri::ContainerStatus {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            state: cri_state(st.phase) as i32,
            created_at: st.created_at,
            started_at: st.started_at,
            finished_at: st.finished_at,
            exit_code: st.exit_code,
            image: Some(image_spec(c)),
            image_ref: st.image_ref.clone(),
            reason: st.reason.clone(),
            message: st.message.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            mounts: self.status_mounts(&c.config),
            log_path: st.log_path.to_string_lossy().into_owned(),
            resources: Some(cri::ContainerResources {
                linux: super::current_resources(c),
                windows: None,
            }),
            image_id: st.image_id.clone(),
            user: Some(cri::ContainerUser {
                linux: Some(cri::LinuxContainerUser {
                    uid: i64::from(st.uid),
                    gid: i64::from(st.gid),
                    supplemental_groups: st.additional_gids.iter().map(|g| i64::from(*g)).collect(),
                }),
            }),
            // The signal StopContainer sends: the config's, else the image's, else SIGTERM.
            stop_signal: super::container_create::signal_enum(st.stop_signal),
        }
    }

    pub(crate) async fn container_status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse> {
        let c = self.container(&req.container_id)?;
        let status = self.container_status_of(&c);
        let mut info = HashMap::new();
        if req.verbose {
            let st = c.state();
            let spec = match saved_spec::<serde_json::Value>(&c) {
                Some(s) => Some(s),
                // No kept spec (created before it was kept): containerd's.
                None => self
                    .c
                    .container_spec(&c.id)
                    .await
                    .ok()
                    .and_then(|s| serde_json::to_value(s).ok()),
            };
            let ima = self
                .sandboxes
                .get(&st.sandbox_id)
                .map(|sb| {
                    super::sandbox_status::ima_info(
                        &sb.state(),
                        self.integrity.journal.summary(&sb.id),
                    )
                })
                .unwrap_or(serde_json::Value::Null);
            let v = serde_json::json!({
                "ima": ima,
                "sandboxID": st.sandbox_id,
                "pid": st.pid,
                "phase": format!("{:?}", st.phase),
                "image": st.image_name,
                "imageID": st.image_id,
                "snapshotKey": c.id,
                "snapshotter": self.cfg.containerd.snapshotter,
                "runtimeSpec": spec,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }
}
