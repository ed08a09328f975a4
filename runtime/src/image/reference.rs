//! Image references as kubelet sends them ("busybox", "registry.k8s.io/pause:3.9",
//! "repo@sha256:..."), normalized the way containerd names images.

use oci_client::Reference;

use crate::{Error, Result};

/// A normalized image reference: `docker.io/library/busybox:latest`.
#[derive(Debug, Clone)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::InvalidArgument("image reference is empty".into()));
        }
        let inner: Reference = s
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("image reference {s:?}: {e}")))?;
        Ok(ImageRef { inner })
    }

    /// Registry host as written in the reference ("docker.io", "127.0.0.1:5000").
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// `docker.io/library/busybox`
    pub fn repo(&self) -> String {
        format!("{}/{}", self.inner.registry(), self.inner.repository())
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// `repo:tag` when the reference names a tag (a digest-only reference has none).
    pub fn tagged_name(&self) -> Option<String> {
        if self.inner.digest().is_some() && self.inner.tag() == Some("latest") {
            // oci-client adds a default tag even to digest references.
            return None;
        }
        self.inner.tag().map(|t| format!("{}:{}", self.repo(), t))
    }

    /// `repo@digest`
    pub fn digested_name(&self, digest: &str) -> String {
        format!("{}@{}", self.repo(), digest)
    }

    /// The reference to fetch: by digest if given, else by tag.
    pub fn as_oci(&self) -> &Reference {
        &self.inner
    }
}

/// An image ID is the config digest, `sha256:<64 hex>`; bare hex is accepted.
pub fn as_image_id(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_docker_hub_short_names() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.repo(), "docker.io/library/busybox");
        assert_eq!(
            r.tagged_name().as_deref(),
            Some("docker.io/library/busybox:latest")
        );
    }

    #[test]
    fn keeps_registry_port_and_tag() {
        let r = ImageRef::parse("127.0.0.1:5000/test/busybox:1.36").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/busybox");
        assert_eq!(
            r.tagged_name().as_deref(),
            Some("127.0.0.1:5000/test/busybox:1.36")
        );
    }

    #[test]
    fn digest_references_have_no_tag() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("registry.k8s.io/pause@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.tagged_name(), None);
        assert_eq!(r.digested_name(&d), format!("registry.k8s.io/pause@{d}"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("UPPER/Case").is_err());
        assert!(ImageRef::parse("a b").is_err());
    }

    #[test]
    fn image_ids() {
        let hex = "0".repeat(64);
        assert_eq!(as_image_id(&hex), Some(format!("sha256:{hex}")));
        assert_eq!(
            as_image_id(&format!("sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(as_image_id("busybox"), None);
    }
}
