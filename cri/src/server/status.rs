//! Version, Status, RuntimeConfig, UpdateRuntimeConfig.

use imacri_api::cri;
use imacri_runtime::Result;
use std::collections::HashMap;

use super::CriServer;

pub const RUNTIME_NAME: &str = "imacri";
pub const CRI_VERSION: &str = "v1";

impl CriServer {
    pub(crate) fn version(&self, _req: cri::VersionRequest) -> cri::VersionResponse {
        cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_VERSION.into(),
        }
    }

    pub(crate) async fn snapshotter_root(&self) -> Result<String> {
        self.c
            .snapshotter_root(&self.cfg.containerd.snapshotter)
            .await
    }

    pub(crate) async fn status(&self, req: cri::StatusRequest) -> Result<cri::StatusResponse> {
        let containerd = self.c.version().await;
        let runtime_ready = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: containerd.is_ok(),
            reason: if containerd.is_ok() {
                String::new()
            } else {
                "ContainerdUnreachable".into()
            },
            message: containerd
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        };
        let cni = self.cni.config();
        let network_ready = cri::RuntimeCondition {
            r#type: "NetworkReady".into(),
            status: cni.is_ok(),
            reason: if cni.is_ok() {
                String::new()
            } else {
                "NetworkPluginNotReady".into()
            },
            message: match &cni {
                Ok(c) => format!("CNI network {:?} from {}", c.name, c.file.display()),
                Err(e) => format!("CNI is not initialized: {e}"),
            },
        };
        let ima = match imacri_runtime::integrity::setting::resolve_backend(
            self.cfg.ima.backend,
            &self.ima_node,
        ) {
            Ok(b @ imacri_runtime::integrity::setting::Backend::None(_)) => {
                (true, "MeasurementUnavailable", b.to_string())
            }
            Ok(b) => (
                true,
                "",
                format!("ima pods are measured by the {b} backend"),
            ),
            Err(e) => (false, "ImaBackendUnavailable", e.to_string()),
        };
        let ima_ready = cri::RuntimeCondition {
            r#type: "ImaPodsReady".into(),
            status: ima.0,
            reason: ima.1.into(),
            message: ima.2,
        };
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "containerd": containerd.as_ref().map(|v| format!("{} ({})", v.version, v.revision)).ok(),
                "containerdNamespace": self.c.namespace(),
                "snapshotter": self.cfg.containerd.snapshotter,
                "runtimes": self.cfg.runtimes.keys().collect::<Vec<_>>(),
                "sandboxImage": self.sandbox_image,
                "cgroupVersion": format!("{:?}", imacri_runtime::sysinfo::cgroup_version()),
                "minOomScoreAdj": self.node.min_oom_score_adj,
                "integrity": self.integrity_info(),
                "records": self.records_info(),
            });
            info.insert("config".to_string(), v.to_string());
        }
        Ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime_ready, network_ready, ima_ready],
            }),
            info,
            runtime_handlers: std::iter::once(String::new())
                .chain(self.cfg.runtimes.keys().cloned())
                .map(|name| cri::RuntimeHandler {
                    features: Some(
                        self.handler_features
                            .get(&name)
                            .copied()
                            .unwrap_or_default(),
                    ),
                    name,
                })
                .collect(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
                user_namespaces_host_network: false,
            }),
        })
    }

    /// How many records imacri holds per container and pod beside its
    /// stores: each goes with its container or pod, so these follow what
    /// exists (a leak shows as a count that only grows).
    fn records_info(&self) -> serde_json::Value {
        fn len<T>(m: &std::sync::Mutex<T>, f: impl Fn(&T) -> usize) -> Option<usize> {
            m.lock().ok().map(|g| f(&g))
        }
        serde_json::json!({
            "sandboxes": self.sandboxes.all().len(),
            "containers": self.containers.all().len(),
            "liveIo": len(&self.io, |m| m.len()),
            "exitWatches": len(&self.exits, |m| m.len()),
            "createdMounts": len(&self.created_mounts, |m| m.len()),
            "deletedTasks": len(&self.deleted_tasks, |m| m.len()),
            "cpuSamples": len(&self.cpu_samples, |m| m.len()),
            "nriViews": len(&self.nri_views, |m| m.len()),
        })
    }

    pub(crate) fn runtime_config(&self) -> cri::RuntimeConfigResponse {
        cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }
    }
}
