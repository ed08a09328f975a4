//! Unpacking layers into snapshots keyed by chain ID (containerd's layout, so
//! `ctr` and nerdctl see the same snapshots).

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use oci_spec::image::ImageManifest;
use std::collections::HashMap;

use super::{chain_ids, ImageService};
use crate::containerd::Lease;
use crate::{Error, Result};

impl ImageService {
    pub(super) async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        match self
            .c
            .snapshots()
            .stat(self.c.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(Error::containerd(format!("stat snapshot {key}"), s)),
        }
    }

    pub(super) async fn unpack(
        &self,
        manifest: &ImageManifest,
        diff_ids: &[String],
        lease: &Lease,
    ) -> Result<()> {
        let chain = chain_ids(diff_ids);
        let mut parent = String::new();
        for (i, layer) in manifest.layers().iter().enumerate() {
            let chain_id = &chain[i];
            if self.snapshot_exists(chain_id).await? {
                parent = chain_id.clone();
                continue;
            }
            let key = format!("extract-{} {chain_id}", &crate::ids::new_id()[..12]);
            let mounts = self
                .c
                .snapshots()
                .prepare(self.c.leased(
                    PrepareSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
                .map_err(|e| Error::containerd(format!("preparing snapshot for layer {i}"), e))?
                .into_inner()
                .mounts;
            let applied = self
                .c
                .diff()
                .apply(self.c.leased(
                    ApplyRequest {
                        diff: Some(containerd_client::types::Descriptor {
                            media_type: layer.media_type().to_string(),
                            digest: layer.digest().to_string(),
                            size: layer.size() as i64,
                            annotations: HashMap::new(),
                        }),
                        mounts,
                        payloads: HashMap::new(),
                        ..Default::default()
                    },
                    lease,
                ))
                .await;
            let result = match applied {
                Ok(r) => {
                    let got = r.into_inner().applied.map(|d| d.digest).unwrap_or_default();
                    if got != diff_ids[i] {
                        Err(Error::Registry(format!(
                            "layer {} unpacked to {got}, but the image config says {}",
                            layer.digest(),
                            diff_ids[i]
                        )))
                    } else {
                        self.c
                            .snapshots()
                            .commit(self.c.leased(
                                CommitSnapshotRequest {
                                    snapshotter: self.snapshotter.clone(),
                                    name: chain_id.clone(),
                                    key: key.clone(),
                                    labels: HashMap::new(),
                                },
                                lease,
                            ))
                            .await
                            .map(|_| ())
                            .or_else(|s| {
                                // Another pull committed the same layer first.
                                if s.code() == tonic::Code::AlreadyExists {
                                    Ok(())
                                } else {
                                    Err(Error::containerd("committing snapshot", s))
                                }
                            })
                    }
                }
                Err(s) => Err(Error::containerd(
                    format!("applying layer {}", layer.digest()),
                    s,
                )),
            };
            if let Err(e) = result {
                let _ = self
                    .c
                    .snapshots()
                    .remove(self.c.req(RemoveSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                    }))
                    .await;
                return Err(e);
            }
            // A committed-by-someone-else race leaves our active key behind.
            let _ = self
                .c
                .snapshots()
                .remove(self.c.req(RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key,
                }))
                .await;
            parent = chain_id.clone();
        }
        Ok(())
    }
}
