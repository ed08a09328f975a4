//! An image read straight from its registry, without containerd: what a
//! verifier host needs to compute reference values off the node. Same
//! hosts.toml handling, credentials and platform choice as a pull; the
//! layers land in a temporary directory the caller reads and drops.

use oci_client::manifest::OciDescriptor;
use oci_client::Reference;
use oci_spec::image::ImageManifest;
use std::path::{Path, PathBuf};

use super::client::client_for;
use super::hosts::{self, Endpoint};
use super::media;
use super::pull::{registry_error, Credentials, MANIFEST_TYPES};
use super::reference::ImageRef;
use crate::{Error, Result};

/// One layer blob on disk, in order, with its media type.
pub struct RemoteLayer {
    pub path: PathBuf,
    pub media_type: String,
}

/// An image fetched for reading: its ID (config digest) and its layers.
pub struct RemoteImage {
    pub id: String,
    pub layers: Vec<RemoteLayer>,
    /// Holds the layer files; they go with it.
    _dir: tempfile::TempDir,
}

/// Downloads `image`'s manifest for this platform, its config digest and
/// every layer into a temporary directory under `scratch`.
pub async fn fetch(
    image: &str,
    hosts_dir: &Path,
    creds: &Credentials,
    scratch: &Path,
) -> Result<RemoteImage> {
    let r = ImageRef::parse(image)?;
    let auth = creds.to_registry_auth()?;
    let endpoints: Vec<Endpoint> = hosts::resolve(hosts_dir, r.registry())?
        .into_iter()
        .filter(|e| e.can_pull())
        .collect();
    let mut last = None;
    for ep in &endpoints {
        let mut oref: Reference = r.as_oci().clone();
        if ep.host != r.registry() {
            oref.set_mirror_registry(ep.host.clone());
        }
        let auth = if creds.identity_token.is_empty() || !creds.registry_token.is_empty() {
            auth.clone()
        } else {
            oci_client::secrets::RegistryAuth::Bearer(
                super::token::exchange(ep, oref.repository(), &creds.identity_token).await?,
            )
        };
        match fetch_from(ep, &oref, &auth, scratch).await {
            Ok(img) => return Ok(img),
            Err(e @ (Error::NotFound(_) | Error::Unavailable(_) | Error::Registry(_))) => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::FailedPrecondition(format!(
            "no registry host with the \"pull\" capability is configured for {}",
            r.registry()
        ))
    }))
}

async fn fetch_from(
    ep: &Endpoint,
    oref: &Reference,
    auth: &oci_client::secrets::RegistryAuth,
    scratch: &Path,
) -> Result<RemoteImage> {
    let client = client_for(ep)?;
    let name = oref.whole();
    let (top, _) = client
        .pull_manifest_raw(oref, auth, &MANIFEST_TYPES)
        .await
        .map_err(|e| registry_error(ep, &name, e))?;
    let manifest_bytes = if media::is_index(&media::sniff(&top)) {
        super::pull::platform_manifest(&client, ep, oref, auth, &top)
            .await?
            .0
    } else {
        top.to_vec()
    };
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Error::Registry(format!("{name}: bad manifest: {e}")))?;
    std::fs::create_dir_all(scratch).map_err(|e| Error::io("creating", scratch, e))?;
    let dir = tempfile::tempdir_in(scratch).map_err(|e| Error::io("creating in", scratch, e))?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers().iter().enumerate() {
        let path = dir.path().join(format!("layer-{i}"));
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io("creating", &path, e))?;
        let desc = OciDescriptor {
            media_type: l.media_type().to_string(),
            digest: l.digest().to_string(),
            size: l.size() as i64,
            urls: None,
            annotations: None,
            artifact_type: None,
        };
        // oci-client checks the blob against its digest while writing.
        client
            .pull_blob(oref, &desc, &mut f)
            .await
            .map_err(|e| registry_error(ep, &name, e))?;
        layers.push(RemoteLayer {
            path,
            media_type: l.media_type().to_string(),
        });
    }
    Ok(RemoteImage {
        id: manifest.config().digest().to_string(),
        layers,
        _dir: dir,
    })
}
