//! Images: pull from registries, keep them in containerd's image and content
//! stores, unpack them into snapshots, and answer ImageService queries.
//!
//! Naming follows containerd's CRI plugin: one containerd image per tag
//! (`repo:tag`), per digest (`repo@sha256:...`) and per ID (`sha256:<config>`),
//! all pointing at the same target, so `ctr -n k8s.io images ls` shows them.

pub mod builtin;
mod client;
pub mod hosts;
mod pull;
pub mod reference;
pub mod remote;
mod token;
mod unpack;

pub use pull::Credentials;

use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, Image as CtdImage, ListImagesRequest,
    UpdateImageRequest,
};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::RwLock;

use crate::containerd::Containerd;
use crate::{Error, Result};
use reference::{as_image_id, ImageRef};

pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

    pub fn is_index(t: &str) -> bool {
        t == OCI_INDEX || t == DOCKER_LIST
    }

    /// The media type a manifest declares, or what its shape says it is.
    pub fn sniff(bytes: &[u8]) -> String {
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        match serde_json::from_slice::<Probe>(bytes) {
            Ok(Probe {
                media_type: Some(t),
                ..
            }) => t,
            Ok(Probe {
                manifests: Some(_), ..
            }) => OCI_INDEX.into(),
            _ => OCI_MANIFEST.into(),
        }
    }
}

pub mod labels {
    /// Marks containerd images imacri manages.
    pub const MANAGED: &str = "imacri.dev/image";
    pub fn snapshot_ref(snapshotter: &str) -> String {
        format!("containerd.io/gc.ref.snapshot.{snapshotter}")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

/// One image as CRI sees it: an ID with all the names pointing at it.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    /// Config digest.
    pub id: String,
    /// containerd image names (tags, digests), without the ID name.
    pub names: BTreeSet<String>,
    pub target: Descriptor,
    pub size: u64,
    pub config: ImageConfiguration,
    /// Chain ID of the top layer: the snapshot containers are made from.
    pub chain_id: String,
    pub pinned: bool,
}

impl ImageRecord {
    pub fn repo_tags(&self) -> Vec<String> {
        self.names
            .iter()
            .filter(|n| !n.contains('@'))
            .cloned()
            .collect()
    }
    pub fn repo_digests(&self) -> Vec<String> {
        self.names
            .iter()
            .filter(|n| n.contains('@'))
            .cloned()
            .collect()
    }
}

pub struct ImageService {
    c: Containerd,
    snapshotter: String,
    hosts_dir: PathBuf,
    sandbox_image: RwLock<String>,
    cache: RwLock<HashMap<String, ImageRecord>>,
    clients: client::Clients,
}

pub fn platform_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn platform_string() -> String {
    format!("linux/{}", platform_arch())
}

fn select_platform(index: &ImageIndex) -> Option<&oci_spec::image::Descriptor> {
    index.manifests().iter().find(|m| {
        m.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == platform_arch()
        })
    })
}

/// Chain IDs per the OCI image spec: chain[0] = diff[0],
/// chain[i] = sha256(chain[i-1] + " " + diff[i]).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

impl ImageService {
    pub fn new(c: Containerd, snapshotter: &str, hosts_dir: PathBuf) -> Self {
        ImageService {
            c,
            snapshotter: snapshotter.to_string(),
            hosts_dir,
            sandbox_image: RwLock::new(String::new()),
            cache: RwLock::new(HashMap::new()),
            clients: client::Clients::default(),
        }
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// Marks the sandbox image as pinned (kubelet must not GC it), by
    /// image ID or by name (a configured `sandbox_image`, pinned whenever
    /// an image carries that name).
    pub fn set_sandbox_image(&self, id_or_name: &str) {
        let key = match ImageRef::parse(id_or_name)
            .ok()
            .and_then(|r| r.tagged_name())
        {
            Some(name) if as_image_id(id_or_name).is_none() => name,
            _ => id_or_name.to_string(),
        };
        if let Ok(mut s) = self.sandbox_image.write() {
            *s = key;
        }
        if let Ok(mut c) = self.cache.write() {
            self.apply_pins(&mut c);
        }
    }

    /// Rebuilds the cache from containerd (at start, after restarts).
    pub async fn load(&self) -> Result<()> {
        let images = self
            .c
            .images()
            .list(self.c.req(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(|e| Error::containerd("listing images", e))?
            .into_inner()
            .images;
        let mut by_target: HashMap<String, Vec<CtdImage>> = HashMap::new();
        for img in images {
            if let Some(t) = &img.target {
                by_target.entry(t.digest.clone()).or_default().push(img);
            }
        }
        let mut cache = HashMap::new();
        for (_, imgs) in by_target {
            let Some(t) = imgs[0].target.clone() else {
                continue;
            };
            let target = Descriptor {
                media_type: t.media_type,
                digest: t.digest,
                size: t.size,
            };
            match self.describe(&target).await {
                Ok(mut rec) => {
                    for i in &imgs {
                        if as_image_id(&i.name).is_none() {
                            rec.names.insert(i.name.clone());
                        }
                    }
                    merge(&mut cache, rec);
                }
                Err(e) => tracing::debug!(target = %target.digest, error = %e, "skipping image"),
            }
        }
        self.apply_pins(&mut cache);
        if let Ok(mut c) = self.cache.write() {
            *c = cache;
        }
        Ok(())
    }

    fn apply_pins(&self, cache: &mut HashMap<String, ImageRecord>) {
        let pinned = self
            .sandbox_image
            .read()
            .map(|s| s.clone())
            .unwrap_or_default();
        for rec in cache.values_mut() {
            rec.pinned = rec.id == pinned || rec.names.contains(&pinned);
        }
    }

    /// Reads manifest and config of `target` from the content store and
    /// checks the image is unpacked.
    async fn describe(&self, target: &Descriptor) -> Result<ImageRecord> {
        let mut content = self.c.content();
        let mut size = target.size.max(0) as u64;
        let top = content.read_all(&target.digest).await?;
        let manifest_bytes = if media::is_index(&media::sniff(&top)) {
            let index: ImageIndex = serde_json::from_slice(&top)
                .map_err(|e| Error::Internal(format!("bad index {}: {e}", target.digest)))?;
            let entry = select_platform(&index).ok_or_else(|| {
                Error::NotFound(format!(
                    "{} has no {} manifest",
                    target.digest,
                    platform_string()
                ))
            })?;
            size += entry.size();
            content.read_all(entry.digest().as_ref()).await?
        } else {
            top
        };
        let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| Error::Internal(format!("bad manifest in {}: {e}", target.digest)))?;
        let config_bytes = content
            .read_all(manifest.config().digest().as_ref())
            .await?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::Internal(format!("bad config in {}: {e}", target.digest)))?;
        size += manifest.config().size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>();
        let chain_id = chain_ids(config.rootfs().diff_ids())
            .last()
            .cloned()
            .unwrap_or_default();
        if !chain_id.is_empty() && !self.snapshot_exists(&chain_id).await? {
            return Err(Error::NotFound(format!(
                "image {} is not unpacked",
                target.digest
            )));
        }
        Ok(ImageRecord {
            id: manifest.config().digest().to_string(),
            names: BTreeSet::new(),
            target: target.clone(),
            size,
            config,
            chain_id,
            pinned: false,
        })
    }

    /// Creates (or repoints) the containerd image names for a pulled image.
    async fn register(&self, r: &ImageRef, fetched: &pull::Fetched) -> Result<ImageRecord> {
        let mut rec = self.describe(&fetched.target).await?;
        let mut names = vec![r.digested_name(&fetched.target.digest), rec.id.clone()];
        if let Some(t) = r.tagged_name() {
            names.push(t);
        }
        let _ = &fetched.manifest_digest;
        for name in &names {
            self.put_image(name, &fetched.target).await?;
        }
        // A tag moved to this image is no longer a name of the old one.
        let mut cache = self
            .cache
            .write()
            .map_err(|_| Error::Internal("image cache poisoned".into()))?;
        for other in cache.values_mut() {
            for n in &names {
                other.names.remove(n);
            }
        }
        cache.retain(|_, v| !v.names.is_empty() || v.pinned);
        rec.names = names
            .into_iter()
            .filter(|n| as_image_id(n).is_none())
            .collect();
        merge(&mut cache, rec.clone());
        self.apply_pins(&mut cache);
        Ok(cache.get(&rec.id).cloned().unwrap_or(rec))
    }

    async fn put_image(&self, name: &str, target: &Descriptor) -> Result<()> {
        let image = CtdImage {
            name: name.to_string(),
            labels: HashMap::from([(labels::MANAGED.to_string(), "managed".to_string())]),
            target: Some(containerd_client::types::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.clone(),
                size: target.size,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        match self
            .c
            .images()
            .create(self.c.req(CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => self
                .c
                .images()
                .update(self.c.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    ..Default::default()
                }))
                .await
                .map(|_| ())
                .map_err(|e| Error::containerd(format!("updating image {name}"), e)),
            Err(s) => Err(Error::containerd(format!("creating image {name}"), s)),
        }
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<_> = self
            .cache
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Finds an image by ID, tag, digest reference or short name.
    pub fn get(&self, spec: &str) -> Option<ImageRecord> {
        let cache = self.cache.read().ok()?;
        if let Some(id) = as_image_id(spec) {
            if let Some(r) = cache.get(&id) {
                return Some(r.clone());
            }
        }
        let r = ImageRef::parse(spec).ok()?;
        let wanted: Vec<String> = match r.digest() {
            Some(d) => vec![r.digested_name(d)],
            None => r.tagged_name().into_iter().collect(),
        };
        cache
            .values()
            .find(|rec| wanted.iter().any(|w| rec.names.contains(w)))
            .cloned()
    }

    /// Removes an image and every name of it. Missing images are fine
    /// (RemoveImage is idempotent).
    pub async fn remove(&self, spec: &str) -> Result<()> {
        let Some(rec) = self.get(spec) else {
            return Ok(());
        };
        let mut names: Vec<String> = rec.names.iter().cloned().collect();
        names.push(rec.id.clone());
        for name in names {
            match self
                .c
                .images()
                .delete(self.c.req(DeleteImageRequest {
                    name: name.clone(),
                    sync: false,
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(Error::containerd(format!("deleting image {name}"), s)),
            }
        }
        if let Ok(mut c) = self.cache.write() {
            c.remove(&rec.id);
        }
        Ok(())
    }
}

fn merge(cache: &mut HashMap<String, ImageRecord>, rec: ImageRecord) {
    match cache.get_mut(&rec.id) {
        Some(existing) => existing.names.extend(rec.names),
        None => {
            cache.insert(rec.id.clone(), rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(c[1], format!("sha256:{want}"));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn sniffs_media_types() {
        assert_eq!(media::sniff(br#"{"manifests":[]}"#), media::OCI_INDEX);
        assert_eq!(
            media::sniff(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            media::DOCKER_MANIFEST
        );
        assert_eq!(media::sniff(br#"{"layers":[]}"#), media::OCI_MANIFEST);
    }
}
