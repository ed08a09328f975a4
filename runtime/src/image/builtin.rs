//! The built-in sandbox image: imacri's static pause program in a one-layer
//! OCI image, imported into containerd at start so pods need no registry.

use sha2::{Digest as _, Sha256};
use std::collections::HashMap;

use super::reference::ImageRef;
use super::{labels, media, pull::Fetched, Descriptor, ImageRecord, ImageService};
use crate::containerd::WriteOptions;
use crate::{Error, Result};

/// The pause executable, built by build.rs.
pub const PAUSE_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pause"));

/// Name of the built-in image; the version ties it to this imacri build.
pub fn image_name() -> String {
    format!("imacri.dev/pause:{}", env!("CARGO_PKG_VERSION"))
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The image's blobs: (layer tar, config, manifest). Deterministic, so the
/// image ID only changes when the pause program does.
pub fn blobs() -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(PAUSE_BINARY.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, "pause", PAUSE_BINARY)
        .map_err(|e| Error::Internal(format!("building pause layer: {e}")))?;
    let layer = tar
        .into_inner()
        .map_err(|e| Error::Internal(format!("building pause layer: {e}")))?;
    let diff_id = sha256(&layer);
    let config = serde_json::json!({
        "architecture": super::platform_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": ["/pause"],
            "User": "65535:65535",
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.opencontainers.image.title": "imacri pause"}
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "imacri (built in)"}]
    });
    let config = serde_json::to_vec(&config).map_err(|e| Error::Internal(e.to_string()))?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": media::OCI_LAYER_TAR, "digest": diff_id, "size": layer.len()}]
    });
    let manifest = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    Ok((layer, config, manifest))
}

impl ImageService {
    /// Imports the built-in pause image if containerd does not have it yet.
    pub async fn ensure_builtin_pause(&self) -> Result<ImageRecord> {
        let name = image_name();
        if let Some(rec) = self.get(&name) {
            return Ok(rec);
        }
        let (layer, config, manifest_bytes) = blobs()?;
        let manifest: oci_spec::image::ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| Error::Internal(format!("pause manifest: {e}")))?;
        let diff_id = sha256(&layer);
        let lease = self.c.lease("pause").await?;
        let result = async {
            let mut content = self.c.content();
            content
                .write_bytes(
                    WriteOptions {
                        digest: &diff_id,
                        size: layer.len() as i64,
                        labels: HashMap::from([(
                            "containerd.io/uncompressed".to_string(),
                            diff_id.clone(),
                        )]),
                        lease: &lease,
                    },
                    layer,
                )
                .await?;
            let config_digest = sha256(&config);
            content
                .write_bytes(
                    WriteOptions {
                        digest: &config_digest,
                        size: config.len() as i64,
                        labels: HashMap::from([(
                            labels::snapshot_ref(&self.snapshotter),
                            diff_id.clone(),
                        )]),
                        lease: &lease,
                    },
                    config,
                )
                .await?;
            let manifest_digest = sha256(&manifest_bytes);
            let size = manifest_bytes.len() as i64;
            content
                .write_bytes(
                    WriteOptions {
                        digest: &manifest_digest,
                        size,
                        labels: HashMap::from([
                            (
                                "containerd.io/gc.ref.content.config".to_string(),
                                config_digest,
                            ),
                            (
                                "containerd.io/gc.ref.content.l.0".to_string(),
                                diff_id.clone(),
                            ),
                        ]),
                        lease: &lease,
                    },
                    manifest_bytes,
                )
                .await?;
            self.unpack(&manifest, std::slice::from_ref(&diff_id), &lease)
                .await?;
            let r = ImageRef::parse(&name)?;
            self.register(
                &r,
                &Fetched {
                    target: Descriptor {
                        media_type: media::OCI_MANIFEST.to_string(),
                        digest: manifest_digest.clone(),
                        size,
                    },
                    manifest_digest,
                },
            )
            .await
        }
        .await;
        let sync = result.is_err();
        let del = lease.delete(&self.c, sync).await;
        let rec = result?;
        del?;
        Ok(rec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ELF executable without a PT_INTERP program header: a static
    /// binary, which runs in a rootfs without a loader.
    pub(crate) fn is_static_elf(b: &[u8]) -> bool {
        if b.get(..4) != Some(b"\x7fELF") {
            return false;
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        (0..phnum)
            .all(|i| u32::from_le_bytes(b[phoff + i * phentsize..][..4].try_into().unwrap()) != 3)
    }

    #[test]
    fn pause_is_a_static_elf() {
        assert!(is_static_elf(PAUSE_BINARY));
    }

    #[test]
    fn blobs_are_deterministic_and_consistent() {
        let (l1, c1, m1) = blobs().unwrap();
        let (_, c2, m2) = blobs().unwrap();
        assert_eq!((c1.clone(), m1.clone()), (c2, m2));
        let cfg: serde_json::Value = serde_json::from_slice(&c1).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], sha256(&l1));
        assert_eq!(cfg["config"]["Entrypoint"][0], "/pause");
    }
}
