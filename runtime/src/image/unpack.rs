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
            // As for content: lease before the existence check.
            lease
                .add_snapshot(&self.c, &self.snapshotter, chain_id)
                .await?;
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

impl ImageService {
    /// A committed snapshot of the image's layers with every file chowned
    /// to the host IDs of `maps`: the parent for containers of pods with that
    /// user namespace (runc 1.1 has no idmapped rootfs). Cached per chain ID
    /// and mapping; it lives as long as a container snapshot uses it.
    pub async fn remapped_snapshot(
        &self,
        chain_id: &str,
        maps: &crate::userns::Mappings,
        lease: &Lease,
        scratch: &std::path::Path,
    ) -> Result<String> {
        let name = format!("remap-{}-{chain_id}", maps.fingerprint());
        // A cached copy nothing uses may be collected any moment: lease it,
        // then check it is still there.
        if self.snapshot_exists(&name).await?
            && lease
                .add_snapshot(&self.c, &self.snapshotter, &name)
                .await
                .is_ok()
            && self.snapshot_exists(&name).await?
        {
            return Ok(name);
        }
        let key = format!("remap-tmp-{}", &crate::ids::new_id()[..12]);
        let mounts = self
            .c
            .prepare_snapshot(&self.snapshotter, &key, chain_id, lease)
            .await?;
        let dir = scratch.join(&key);
        let res = async {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            crate::mount::mount_snapshot(&mounts, &dir, false)?;
            let chowned = crate::userns::remap_tree(&dir, maps);
            crate::mount::unmount_all(&dir)?;
            chowned?;
            match self
                .c
                .snapshots()
                .commit(self.c.leased(
                    CommitSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        name: name.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
            {
                Ok(_) => Ok(()),
                // Another pod with the same mapping got there first.
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    lease.add_snapshot(&self.c, &self.snapshotter, &name).await
                }
                Err(s) => Err(Error::containerd("committing remapped snapshot", s)),
            }
        }
        .await;
        let _ = std::fs::remove_dir(&dir);
        let _ = self
            .c
            .snapshots()
            .remove(self.c.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key,
            }))
            .await;
        res.map(|()| name)
    }
}
