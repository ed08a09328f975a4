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
        let inner = grammar::parse(s)
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

/// The reference grammar of distribution/reference (what containerd and
/// docker accept), by hand: oci-spec's parser compiles it into a Unicode
/// regex that keeps 13 MB of heap for the life of the process.
mod grammar {
    use oci_client::Reference;

    const NAME_TOTAL_LENGTH_MAX: usize = 255;

    fn alnum_lower(c: char) -> bool {
        c.is_ascii_lowercase() || c.is_ascii_digit()
    }

    /// path-component := [a-z0-9]+ (separator [a-z0-9]+)*,
    /// separator := [._] | "__" | "-"+
    fn path_component(s: &str) -> bool {
        let b: Vec<char> = s.chars().collect();
        let mut i = 0;
        let run = |i: &mut usize| {
            let start = *i;
            while *i < b.len() && alnum_lower(b[*i]) {
                *i += 1;
            }
            *i > start
        };
        if !run(&mut i) {
            return false;
        }
        while i < b.len() {
            match b[i] {
                '.' => i += 1,
                '_' => {
                    i += 1;
                    if i < b.len() && b[i] == '_' {
                        i += 1;
                    }
                }
                '-' => {
                    while i < b.len() && b[i] == '-' {
                        i += 1;
                    }
                }
                _ => return false,
            }
            if !run(&mut i) {
                return false;
            }
        }
        true
    }

    /// domain := label ("." label)* (":" [0-9]+)?,
    /// label := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    fn domain(s: &str) -> bool {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let label = |l: &str| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        host.split('.').all(label)
            && port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    }

    /// tag := [\w][\w.-]{0,127} (ASCII word characters, as docker)
    fn tag(s: &str) -> bool {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut cs = s.chars();
        cs.next().is_some_and(word) && s.len() <= 128 && cs.all(|c| word(c) || c == '.' || c == '-')
    }

    /// digest := algorithm ":" hex; sha256/384/512 with their lengths.
    fn digest(s: &str) -> Result<(), &'static str> {
        let (alg, hex) = s.split_once(':').ok_or("invalid digest format")?;
        let want = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err("unsupported digest algorithm"),
        };
        if hex.len() != want || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("invalid digest length");
        }
        Ok(())
    }

    /// Splits off the registry as docker does (the first component is one
    /// if it has a dot or a port, or is "localhost").
    fn split_domain(name: &str) -> (String, String) {
        let (mut registry, mut repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if registry == "index.docker.io" {
            registry = "docker.io".into();
        }
        if registry == "docker.io" && !repo.contains('/') {
            repo = format!("library/{repo}");
        }
        (registry, repo)
    }

    pub fn parse(s: &str) -> Result<Reference, &'static str> {
        let (rest, dig) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if let Some(d) = dig {
            digest(d)?;
        }
        // A tag's colon comes after the last slash (a port's before it).
        let (name, tg) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if tg.is_some_and(|t| !tag(t)) {
            return Err("invalid tag");
        }
        let parts: Vec<&str> = name.split('/').collect();
        let valid = parts.iter().all(|p| path_component(p))
            || (parts.len() > 1
                && domain(parts[0])
                && parts[1..].iter().all(|p| path_component(p)));
        if !valid {
            return Err("invalid reference format");
        }
        let (registry, repo) = split_domain(name);
        if repo.len() > NAME_TOTAL_LENGTH_MAX {
            return Err("repository name must not be more than 255 characters");
        }
        Ok(match (tg, dig) {
            (Some(t), Some(d)) => {
                Reference::with_tag_and_digest(registry, repo, t.into(), d.into())
            }
            (None, Some(d)) => Reference::with_digest(registry, repo, d.into()),
            (Some(t), None) => Reference::with_tag(registry, repo, t.into()),
            (None, None) => Reference::with_tag(registry, repo, "latest".into()),
        })
    }
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

    /// The same answers as oci-spec's regex parser (what it replaced) on
    /// references kubelet, crictl and critest send and on malformed ones.
    #[test]
    fn agrees_with_the_regex_grammar() {
        let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/library/busybox:latest".into(),
            "index.docker.io/busybox".into(),
            "registry.k8s.io/pause:3.10".into(),
            "gcr.io/k8s-staging-cri-tools/test-image-user-uid:latest".into(),
            "localhost/foo".into(),
            "localhost:5000/foo/bar:tag".into(),
            "127.0.0.1:5000/test/busybox:1.36".into(),
            "Example.COM/a/b".into(),
            "a__b/c--d/e.f_g:T_1.2-x".into(),
            format!("busybox@{d}"),
            format!("busybox:1.0@{d}"),
            format!("127.0.0.1:5000/x@{d}"),
            "a___b".into(),
            "a_.b".into(),
            "-a".into(),
            "a-".into(),
            "a//b".into(),
            "/a".into(),
            "a/".into(),
            "a:".into(),
            "a:-tag".into(),
            "a@sha256:abc".into(),
            "a@md5:0123456789abcdef0123456789abcdef".into(),
            "UPPER".into(),
            "host:port/a".into(),
            "-host.com/a".into(),
            "host-.com/a".into(),
            "a:b:c".into(),
            "a b".into(),
            "ünicode".into(),
            "a:täg".into(),
            format!("a:{}", "t".repeat(128)),
            format!("a:{}", "t".repeat(129)),
            format!("a/{}", "b".repeat(260)),
        ];
        for c in cases {
            let ours = grammar::parse(&c).map(|r| r.whole());
            let theirs = c.parse::<oci_client::Reference>().map(|r| r.whole());
            // oci-spec's regex takes Unicode word characters in tags; docker
            // (and we) take ASCII only.
            if c == "a:täg" {
                assert!(ours.is_err() && theirs.is_ok(), "{c}");
                continue;
            }
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{c}: {ours:?} vs {theirs:?}");
            if let (Ok(a), Ok(b)) = (ours, theirs) {
                assert_eq!(a, b, "{c}");
            }
        }
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
