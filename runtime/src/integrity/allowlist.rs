//! Appraisal policies: which file digests a pod may run. The same JSON file
//! serves the node (enforce mode denies what it does not allow) and the
//! verifier (`imacri attest verify --policy`); `imacri attest golden IMAGE`
//! writes one from an image's files.
//!
//! ```json
//! { "version": 1,
//!   "source": "golden policy of 127.0.0.1:5000/busybox:latest",
//!   "files": { "/bin/busybox": ["sha256:<hex>"] },
//!   "digests": ["sha256:<hex>"],
//!   "exclude": ["/var/cache/*"] }
//! ```
//! `files`: allowed digests per path. `digests`: allowed at any path.
//! `exclude`: paths whose *reads* are not checked (exact, or a prefix ending
//! in `*`). Executions and executable mappings are checked everywhere: an
//! exclusion is never a place to run unapproved code from.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::log::{Entry, Event};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowlist {
    #[serde(default = "one")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default)]
    pub files: BTreeMap<String, BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub digests: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

fn one() -> u32 {
    1
}

/// Why an entry is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub path: String,
    pub digest: String,
    pub container: String,
    pub event: Event,
    pub reason: String,
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading policy {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {path}: {error}")]
    In {
        path: std::path::PathBuf,
        error: Box<PolicyError>,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("unsupported version {0}")]
    Version(u32),
    #[error("digest {0:?} is not sha256:<64 hex digits>")]
    Digest(String),
}

impl Allowlist {
    pub fn load(path: &Path) -> Result<Allowlist, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Allowlist::parse(&text).map_err(|e| PolicyError::In {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    pub fn parse(text: &str) -> Result<Allowlist, PolicyError> {
        let a: Allowlist = serde_json::from_str(text)?;
        if a.version != 1 {
            return Err(PolicyError::Version(a.version));
        }
        for d in a.files.values().flatten().chain(&a.digests) {
            let ok = d
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(PolicyError::Digest(d.clone()));
            }
        }
        Ok(a)
    }

    /// Adds another policy's allowed files and exclusions.
    pub fn merge(&mut self, other: Allowlist) {
        for (p, ds) in other.files {
            self.files.entry(p).or_default().extend(ds);
        }
        self.digests.extend(other.digests);
        self.exclude.extend(other.exclude);
    }

    fn excluded(&self, path: &str) -> bool {
        self.exclude.iter().any(|x| match x.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => path == x,
        })
    }

    /// Whether this digest may be accessed this way at this path (None =
    /// allowed). Exclusions apply to reads only. imacri's own container init
    /// (`integrity::init`) is allowed at its path by every policy.
    pub fn check_file(&self, path: &str, digest: &str, ev: Event) -> Option<String> {
        if (ev == Event::Read && self.excluded(path))
            || self.digests.contains(digest)
            || super::init::allowed(path, digest)
        {
            return None;
        }
        match self.files.get(path) {
            Some(ds) if ds.contains(digest) => None,
            Some(_) => Some("digest differs from the policy's for this path".into()),
            None => Some("path is not in the policy".into()),
        }
    }

    /// Checks one log entry. Gaps are not violations (the report lists them);
    /// a denied execution always is.
    pub fn check(&self, e: &Entry) -> Option<Violation> {
        let digest = e.digest_hex();
        let reason = match e.event {
            // Gaps and start entries are the verifier's (it knows the flags).
            Event::Gap | Event::Start => return None,
            Event::Deny => Some(
                "refused by the node's enforce policy (an execution or mapping, or a write to a mapped file), \
                 or by a guard of ima pods in any mode (a 32-bit program)"
                    .into(),
            ),
            Event::Writers => Some(
                "executed or mapped while open for writing: what ran may differ from the digest"
                    .into(),
            ),
            Event::Quota => Some(
                "the pod reached its measurement quota: later executions were refused unmeasured"
                    .into(),
            ),
            Event::Tomtou => Some(
                "mapped executable, then opened for writing while the container ran: what ran may differ from the digest"
                    .into(),
            ),
            Event::Exec | Event::Mmap | Event::Read => self.check_file(&e.path, &digest, e.event),
        }?;
        Some(Violation {
            path: e.path.clone(),
            digest,
            container: e.container.clone(),
            event: e.event,
            reason,
        })
    }

    /// A policy allowing every regular file under `root` (an image's
    /// mounted rootfs) at its in-container path. Symlinks are not followed:
    /// their targets are files of the tree and listed themselves.
    pub fn from_tree(root: &Path, source: &str) -> std::io::Result<Allowlist> {
        use std::os::fd::AsFd;
        let mut a = Allowlist {
            version: 1,
            source: source.to_string(),
            ..Default::default()
        };
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir)? {
                let e = e?;
                let ft = e.file_type()?;
                let p = e.path();
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    let f = std::fs::File::open(&p)?;
                    let (d, _) = super::digest::hash_fd(f.as_fd())?;
                    let rel = p.strip_prefix(root).unwrap_or(&p);
                    a.files
                        .entry(format!("/{}", super::digest::path_text(rel.as_os_str())))
                        .or_default()
                        .insert(format!("sha256:{}", hex::encode(d)));
                }
            }
        }
        Ok(a)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: u8) -> String {
        format!("sha256:{}", hex::encode([b; 32]))
    }

    #[test]
    fn checks_path_digest_pairs() {
        let mut a = Allowlist::parse(&format!(
            r#"{{"files": {{"/bin/busybox": ["{}"]}}, "exclude": ["/scratch/*"]}}"#,
            d(1)
        ))
        .unwrap();
        let x = Event::Exec;
        assert_eq!(a.check_file("/bin/busybox", &d(1), x), None);
        assert!(a
            .check_file("/bin/busybox", &d(2), x)
            .unwrap()
            .contains("differs"));
        // Same bytes at a new path are not allowed: a dropped-in copy is a change.
        assert!(a.check_file("/tmp/x", &d(1), x).unwrap().contains("not in"));
        // Exclusions cover reads only: never a place to run code from.
        assert_eq!(a.check_file("/scratch/anything", &d(9), Event::Read), None);
        assert!(a.check_file("/scratch/anything", &d(9), x).is_some());
        assert!(a
            .check_file("/scratch/lib.so", &d(9), Event::Mmap)
            .is_some());
        a.merge(Allowlist {
            digests: [d(3)].into(),
            ..Default::default()
        });
        assert_eq!(a.check_file("/anywhere", &d(3), x), None);
        // imacri's own container init, and only at its path.
        let init = super::super::init::digest();
        assert_eq!(a.check_file(super::super::init::PATH, init, x), None);
        assert!(a.check_file("/bin/init", init, x).is_some());
    }

    #[test]
    fn entries_by_event() {
        let a = Allowlist::parse(&format!(r#"{{"files": {{"/bin/sh": ["{}"]}}}}"#, d(1))).unwrap();
        let ok = Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec);
        assert_eq!(a.check(&ok), None);
        let gap = Entry::new(15, [0; 32], "-", "p", "c", Event::Gap);
        assert_eq!(a.check(&gap), None);
        let denied = Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Deny);
        assert!(a.check(&denied).unwrap().reason.contains("refused"));
        let start = Entry::new(15, [2; 32], "img t", "p", "c", Event::Start);
        assert_eq!(a.check(&start), None);
        for ev in [Event::Writers, Event::Quota, Event::Tomtou] {
            assert!(a
                .check(&Entry::new(15, [1; 32], "/bin/sh", "p", "c", ev))
                .is_some());
        }
        let new = Entry::new(15, [5; 32], "/tmp/evil", "p", "c", Event::Exec);
        let v = a.check(&new).unwrap();
        assert_eq!((v.path.as_str(), v.digest), ("/tmp/evil", d(5)));
    }

    #[test]
    fn golden_from_a_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/tool"), b"abc").unwrap();
        std::os::unix::fs::symlink("tool", d.path().join("bin/link")).unwrap();
        let a = Allowlist::from_tree(d.path(), "test").unwrap();
        assert_eq!(a.files.len(), 1);
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(a.check_file("/bin/tool", abc, Event::Exec), None);
        let back = Allowlist::parse(&a.to_json()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn rejects_malformed_policies() {
        assert!(matches!(
            Allowlist::parse(r#"{"files": {"/x": ["md5:00"]}}"#),
            Err(PolicyError::Digest(d)) if d == "md5:00"
        ));
        assert!(matches!(
            Allowlist::parse(r#"{"version": 2}"#),
            Err(PolicyError::Version(2))
        ));
        assert!(Allowlist::parse(r#"{"allow": []}"#).is_err());
    }
}
