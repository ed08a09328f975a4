//! The pod `ima` setting: which backend measures a pod, with which policy.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::{Error, Result};

/// Pod annotation enabling `ima` for kubelets that drop unknown fields.
pub const ANNOTATION: &str = "imacri.dev/ima";
/// Pod annotation selecting a named policy from the config.
pub const POLICY_ANNOTATION: &str = "imacri.dev/ima-policy";
/// Annotation put on every container's OCI spec in an ima pod.
pub const BACKEND_ANNOTATION: &str = "imacri.dev/ima-backend";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// kernel if the node supports IMA namespaces, else fanotify.
    #[default]
    Auto,
    Kernel,
    Fanotify,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "kernel" => Ok(BackendChoice::Kernel),
            "fanotify" => Ok(BackendChoice::Fanotify),
            other => Err(format!(
                "ima backend {other:?}: use auto, kernel or fanotify"
            )),
        }
    }
}

/// The backend an ima pod actually gets, always reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    Kernel,
    Fanotify,
    /// No measurement on this node; the reason is reported in status.
    None(String),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Kernel => f.write_str("kernel"),
            Backend::Fanotify => f.write_str("fanotify"),
            Backend::None(r) => write!(f, "none (measurement unavailable: {r})"),
        }
    }
}

/// Node facts the backend choice depends on.
#[derive(Debug, Clone)]
pub struct NodeSupport {
    /// Ok, or why the kernel has no IMA namespaces.
    pub kernel: std::result::Result<(), String>,
    /// Ok, or why the fanotify backend cannot run.
    pub fanotify: std::result::Result<(), String>,
}

/// The backend ima pods get under `choice`, or why they cannot run.
pub fn resolve_backend(choice: BackendChoice, node: &NodeSupport) -> Result<Backend> {
    match choice {
        BackendChoice::Kernel => match &node.kernel {
            Ok(()) => Ok(Backend::Kernel),
            Err(r) => Err(Error::FailedPrecondition(format!(
                "ima backend \"kernel\" is configured but {r}; use backend \"auto\" or \"fanotify\""
            ))),
        },
        BackendChoice::Fanotify => match &node.fanotify {
            Ok(()) => Ok(Backend::Fanotify),
            Err(r) => Err(Error::FailedPrecondition(format!(
                "ima backend \"fanotify\" is configured but {r}"
            ))),
        },
        BackendChoice::Auto => Ok(match (&node.kernel, &node.fanotify) {
            (Ok(()), _) => Backend::Kernel,
            (_, Ok(())) => Backend::Fanotify,
            (Err(k), Err(f)) => Backend::None(format!("{k}; {f}")),
        }),
    }
}

/// `ima` for a pod: the field, or the annotation `"true"`/`"false"`.
pub fn requested(field: bool, annotations: &HashMap<String, String>) -> Result<bool> {
    match annotations.get(ANNOTATION).map(String::as_str) {
        None => Ok(field),
        Some("true") => Ok(true),
        Some("false") => Ok(field),
        Some(other) => Err(Error::InvalidArgument(format!(
            "annotation {ANNOTATION}={other:?}: must be \"true\" or \"false\""
        ))),
    }
}

/// A named policy from the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Rules in the kernel's IMA policy syntax.
    pub rules: Vec<String>,
    pub mode: super::policy::Mode,
    /// Appraisal policies (JSON allowlists), merged.
    pub allowlist: Vec<std::path::PathBuf>,
    /// Executions from volumes (fanotify backend).
    pub volumes: VolumeExec,
    /// Executable memory that no file backs (fanotify backend).
    pub anonymous_exec: AnonymousExec,
}

/// What the map guard does about executable memory that is not a file's
/// content: anonymous memory, a file's privately written (copied) pages,
/// writable and executable at once. IMA leaves it alone, and so does the
/// default; `deny` is SELinux's execmem/execmod for an ima pod, for
/// workloads without a JIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousExec {
    #[default]
    Allow,
    /// `mmap` of anonymous memory with PROT_EXEC fails with EACCES; an
    /// `mmap` of a file both writable and executable, and an `mprotect`
    /// making executable anything writable, anonymous or written since it
    /// was mapped, with EPERM; so do `userfaultfd` (which fills pages of an
    /// executable mapping with content of its caller's choosing) and
    /// `ptrace(PTRACE_POKETEXT/POKEDATA)`; and imacri's init lets no
    /// process open a file beneath procfs for writing (`/proc/<pid>/mem`).
    Deny,
}

impl AnonymousExec {
    /// The word a container's `start` entry carries when its policy denies
    /// executable memory no file backs: the verifier can require it
    /// (nothing in the log shows code that no file held).
    pub const START_WORD: &'static str = "anonymous_exec=deny";

    /// Whether a start entry's text declares [`Self::START_WORD`].
    pub fn denied_by(start: &str) -> bool {
        start.split(' ').any(|w| w == Self::START_WORD)
    }
}

/// What the fanotify backend does about executables on volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VolumeExec {
    /// Every volume is mounted noexec: executing from one fails (EACCES).
    #[default]
    Deny,
    /// Volumes keep exec and are measured: the pod's own tmpfs volumes
    /// (emptyDir with medium Memory, projected volumes) marked whole like
    /// the rootfs, every other volume on a local filesystem through the
    /// container's own mount of it; volumes on other filesystems (network,
    /// FUSE) or with mounts beneath stay noexec.
    Measure,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            rules: vec![
                "measure func=BPRM_CHECK mask=MAY_EXEC".into(),
                "measure func=FILE_MMAP mask=MAY_EXEC".into(),
            ],
            mode: super::policy::Mode::Measure,
            allowlist: Vec::new(),
            volumes: VolumeExec::Deny,
            anonymous_exec: AnonymousExec::Allow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kernel: bool, fan: bool) -> NodeSupport {
        NodeSupport {
            kernel: if kernel {
                Ok(())
            } else {
                Err("no ima ns".into())
            },
            fanotify: if fan {
                Ok(())
            } else {
                Err("no fanotify backend".into())
            },
        }
    }

    #[test]
    fn backend_resolution() {
        assert_eq!(
            resolve_backend(BackendChoice::Auto, &node(true, true)).unwrap(),
            Backend::Kernel
        );
        assert_eq!(
            resolve_backend(BackendChoice::Auto, &node(false, true)).unwrap(),
            Backend::Fanotify
        );
        let none = resolve_backend(BackendChoice::Auto, &node(false, false)).unwrap();
        assert!(none
            .to_string()
            .starts_with("none (measurement unavailable: no ima ns"));
        let e = resolve_backend(BackendChoice::Kernel, &node(false, true)).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)) && e.to_string().contains("no ima ns"));
        assert!("bogus".parse::<BackendChoice>().is_err());
    }

    #[test]
    fn annotation_validation() {
        let a = |v: &str| HashMap::from([(ANNOTATION.to_string(), v.to_string())]);
        assert!(requested(false, &a("true")).unwrap());
        assert!(!requested(false, &a("false")).unwrap());
        assert!(requested(true, &HashMap::new()).unwrap());
        let e = requested(false, &a("yes")).unwrap_err().to_string();
        assert!(e.contains("imacri.dev/ima") && e.contains("yes"), "{e}");
    }

    #[test]
    fn default_policy_parses() {
        for r in PolicyConfig::default().rules {
            crate::integrity::policy::parse_rule(&r).unwrap();
        }
    }
}
