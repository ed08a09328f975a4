//! Pulling: registry (oci-client) -> containerd content store -> snapshots.
//! Everything is written under one lease; on failure the lease is deleted
//! synchronously so GC removes every half-pulled blob and snapshot.

use base64::Engine;
use futures::StreamExt;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use std::collections::HashMap;

use super::hosts::{self, Endpoint};
use super::reference::ImageRef;
use super::{labels, media, Descriptor, ImageService};
use crate::containerd::{Lease, WriteOptions};
use crate::{Error, Result};

/// Credentials from CRI's AuthConfig.
#[derive(Default, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64("user:password")
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub(super) fn to_registry_auth(&self) -> Result<RegistryAuth> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.auth.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|_| Error::InvalidArgument("auth.auth is not valid base64".into()))?;
            let text = String::from_utf8(raw)
                .map_err(|_| Error::InvalidArgument("auth.auth is not UTF-8".into()))?;
            let (u, p) = text.split_once(':').ok_or_else(|| {
                Error::InvalidArgument("auth.auth must encode \"username:password\"".into())
            })?;
            return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
        }
        if !self.username.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        Ok(RegistryAuth::Anonymous)
    }
}

/// What the registry said the reference points at.
pub(super) struct Fetched {
    pub target: Descriptor,
    pub manifest_digest: String,
}

pub(super) fn registry_error(
    ep: &Endpoint,
    reference: &str,
    e: oci_client::errors::OciDistributionError,
) -> Error {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::AuthenticationFailure(m) => Error::FailedPrecondition(format!(
            "pulling {reference} from {}: authentication failed: {m}",
            ep.host
        )),
        E::UnauthorizedError { url } => Error::FailedPrecondition(format!(
            "pulling {reference}: not authorized at {url}; check the pull credentials"
        )),
        E::ImageManifestNotFoundError(m) => {
            Error::NotFound(format!("image {reference} not found at {}: {m}", ep.host))
        }
        E::RegistryError { envelope, url } => {
            let codes: Vec<_> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}", e.code).to_uppercase())
                .collect();
            let msg = format!("pulling {reference}: registry {url} answered {envelope}");
            if codes
                .iter()
                .any(|c| c.contains("UNKNOWN") || c.contains("NOT_FOUND"))
            {
                Error::NotFound(msg)
            } else if codes
                .iter()
                .any(|c| c.contains("UNAUTHORIZED") || c.contains("DENIED"))
            {
                Error::FailedPrecondition(msg)
            } else {
                Error::Registry(msg)
            }
        }
        E::ServerError { code: 404, url, .. } => {
            Error::NotFound(format!("image {reference} not found ({url})"))
        }
        E::RequestError(e) => Error::Unavailable(format!(
            "pulling {reference}: registry {} unreachable: {e}",
            ep.host
        )),
        other => Error::Registry(format!("pulling {reference} from {}: {other}", ep.host)),
    }
}

pub(super) const MANIFEST_TYPES: [&str; 4] = [
    media::OCI_INDEX,
    media::DOCKER_LIST,
    media::OCI_MANIFEST,
    media::DOCKER_MANIFEST,
];

/// rustls needs a process-wide crypto provider before any TLS client is
/// built; the daemon installs ring at start, other callers (the `attest`
/// CLI, tests) get it here. A second install is a harmless no-op.
/// The manifest an image index names for this platform: (bytes, digest),
/// the digest checked.
pub(super) async fn platform_manifest(
    client: &Client,
    ep: &Endpoint,
    oref: &Reference,
    auth: &RegistryAuth,
    index_bytes: &[u8],
) -> Result<(Vec<u8>, String)> {
    let name = oref.whole();
    let index: ImageIndex = serde_json::from_slice(index_bytes)
        .map_err(|e| Error::Registry(format!("{name}: bad image index: {e}")))?;
    let entry = super::select_platform(&index).ok_or_else(|| {
        Error::NotFound(format!(
            "{name} has no image for this platform ({})",
            super::platform_string()
        ))
    })?;
    let digest = entry.digest().to_string();
    let by_digest = oref.clone_with_digest(digest.clone());
    let (bytes, got) = client
        .pull_manifest_raw(&by_digest, auth, &MANIFEST_TYPES)
        .await
        .map_err(|e| registry_error(ep, &name, e))?;
    if got != digest {
        return Err(Error::Registry(format!(
            "{name}: manifest digest mismatch: got {got}, want {digest}"
        )));
    }
    Ok((bytes.to_vec(), digest))
}

impl ImageService {
    /// Pulls `image` and returns its ID (config digest).
    pub async fn pull(&self, image: &str, creds: &Credentials) -> Result<super::ImageRecord> {
        let r = ImageRef::parse(image)?;
        let auth = creds.to_registry_auth()?;
        let endpoints: Vec<Endpoint> = hosts::resolve(&self.hosts_dir, r.registry())?
            .into_iter()
            .filter(|e| e.can_pull())
            .collect();
        if endpoints.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "no registry host with the \"pull\" capability is configured for {}",
                r.registry()
            )));
        }
        let mut last_err = None;
        for ep in &endpoints {
            let mut oref: Reference = r.as_oci().clone();
            if ep.host != r.registry() {
                oref.set_mirror_registry(ep.host.clone());
            }
            // An identity token is traded per host, at the realm it names.
            let host_auth = if creds.identity_token.is_empty() || !creds.registry_token.is_empty() {
                auth.clone()
            } else {
                match super::token::exchange(ep, oref.repository(), &creds.identity_token).await {
                    Ok(t) => RegistryAuth::Bearer(t),
                    Err(e @ Error::Unavailable(_)) => {
                        tracing::warn!(image, host = %ep.host, error = %e, "token exchange failed");
                        last_err = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            let client = self.clients.get(ep, &host_auth)?;
            match self.pull_from(&client, ep, &oref, &r, &host_auth).await {
                Ok(rec) => return Ok(rec),
                // Auth and input errors are final; a mirror miss tries the next host.
                Err(e @ (Error::NotFound(_) | Error::Unavailable(_) | Error::Registry(_))) => {
                    tracing::warn!(image, host = %ep.host, error = %e, "pull from host failed");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::NotFound(format!("image {image} not found"))))
    }

    async fn pull_from(
        &self,
        client: &Client,
        ep: &Endpoint,
        oref: &Reference,
        r: &ImageRef,
        auth: &RegistryAuth,
    ) -> Result<super::ImageRecord> {
        let name = oref.whole();
        let (top_bytes, top_digest) = client
            .pull_manifest_raw(oref, auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| registry_error(ep, &name, e))?;
        if let Some(d) = r.digest() {
            if d != top_digest {
                return Err(Error::Registry(format!(
                    "{name}: registry returned digest {top_digest}, expected {d}"
                )));
            }
        }
        let lease = self.c.lease("pull").await?;
        let result = self
            .fetch_and_unpack(
                client,
                ep,
                oref,
                r,
                auth,
                &lease,
                top_bytes.to_vec(),
                top_digest,
            )
            .await;
        match result {
            Ok(fetched) => {
                let rec = self.register(r, &fetched).await;
                crate::crash::at("PullImage", "registered");
                // The image record now references everything; the lease can go.
                let del = lease.delete(&self.c, false).await;
                let rec = rec?;
                del?;
                Ok(rec)
            }
            Err(e) => {
                if let Err(del) = lease.delete(&self.c, true).await {
                    tracing::warn!(error = %del, "deleting pull lease after failure");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_and_unpack(
        &self,
        client: &Client,
        ep: &Endpoint,
        oref: &Reference,
        r: &ImageRef,
        auth: &RegistryAuth,
        lease: &Lease,
        top_bytes: Vec<u8>,
        top_digest: String,
    ) -> Result<Fetched> {
        let name = oref.whole();
        let top_type = media::sniff(&top_bytes);
        let top = Descriptor {
            media_type: top_type.clone(),
            digest: top_digest.clone(),
            size: top_bytes.len() as i64,
        };
        let source_label = (
            format!("containerd.io/distribution.source.{}", r.registry()),
            r.repository().to_string(),
        );

        // Resolve an index to this platform's manifest.
        let (manifest_bytes, manifest_digest, index) = if media::is_index(&top_type) {
            let (bytes, digest) = platform_manifest(client, ep, oref, auth, &top_bytes).await?;
            (bytes, digest, Some(top_bytes))
        } else {
            (top_bytes, top_digest, None)
        };
        let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| Error::Registry(format!("{name}: bad manifest: {e}")))?;

        // Config.
        let cfg_desc = manifest.config();
        let mut config_bytes = Vec::new();
        client
            .pull_blob(oref, cfg_desc.digest().as_ref(), &mut config_bytes)
            .await
            .map_err(|e| registry_error(ep, &name, e))?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::Registry(format!("{name}: bad image config: {e}")))?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != manifest.layers().len() {
            return Err(Error::Registry(format!(
                "{name}: config lists {} diff IDs for {} layers",
                diff_ids.len(),
                manifest.layers().len()
            )));
        }

        // Layers, streamed into the content store (digest checked on both sides).
        let mut content = self.c.content();
        for (layer, diff_id) in manifest.layers().iter().zip(&diff_ids) {
            let digest = layer.digest().to_string();
            let labels = HashMap::from([
                ("containerd.io/uncompressed".to_string(), diff_id.clone()),
                source_label.clone(),
            ]);
            let opts = WriteOptions {
                digest: &digest,
                size: layer.size() as i64,
                labels,
                lease,
            };
            // Already there (and now leased): nothing to download.
            if content.keep_existing(&opts).await? {
                continue;
            }
            let desc = OciDescriptor {
                media_type: layer.media_type().to_string(),
                digest: digest.clone(),
                size: layer.size() as i64,
                urls: None,
                annotations: None,
                artifact_type: None,
            };
            let stream = client
                .pull_blob_stream(oref, &desc)
                .await
                .map_err(|e| registry_error(ep, &name, e))?;
            let name2 = name.clone();
            let stream = stream.map(move |c| {
                c.map_err(|e| Error::Registry(format!("{name2}: downloading layer: {e}")))
            });
            content.write_new(opts, Box::pin(stream)).await?;
        }

        let chain = super::chain_ids(&diff_ids);
        let top_chain = chain.last().cloned().unwrap_or_default();
        let mut cfg_labels = HashMap::from([source_label.clone()]);
        if !top_chain.is_empty() {
            cfg_labels.insert(labels::snapshot_ref(&self.snapshotter), top_chain.clone());
        }
        content
            .write_bytes(
                WriteOptions {
                    digest: cfg_desc.digest().as_ref(),
                    size: config_bytes.len() as i64,
                    labels: cfg_labels,
                    lease,
                },
                config_bytes,
            )
            .await?;
        let mut m_labels = HashMap::from([
            (
                "containerd.io/gc.ref.content.config".to_string(),
                cfg_desc.digest().to_string(),
            ),
            source_label.clone(),
        ]);
        for (i, l) in manifest.layers().iter().enumerate() {
            m_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest().to_string(),
            );
        }
        content
            .write_bytes(
                WriteOptions {
                    digest: &manifest_digest,
                    size: manifest_bytes.len() as i64,
                    labels: m_labels,
                    lease,
                },
                manifest_bytes,
            )
            .await?;
        if let Some(index_bytes) = index {
            let labels = HashMap::from([
                (
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    manifest_digest.clone(),
                ),
                source_label,
            ]);
            content
                .write_bytes(
                    WriteOptions {
                        digest: &top.digest,
                        size: top.size,
                        labels,
                        lease,
                    },
                    index_bytes,
                )
                .await?;
        }

        crate::crash::at("PullImage", "fetched");
        self.unpack(&manifest, &diff_ids, lease).await?;
        crate::crash::at("PullImage", "unpacked");
        Ok(Fetched {
            target: top,
            manifest_digest,
        })
    }
}
