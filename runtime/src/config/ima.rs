//! The `[ima]` section: backend, TPM anchoring, policies, the per-node
//! limits of the fanotify backend, namespace rules and the user-namespace
//! pool of ima pods.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImaConfig {
    /// "auto", "kernel" or "fanotify".
    pub backend: crate::integrity::setting::BackendChoice,
    /// Emit the draft OCI `{"type": "ima"}` namespace (runc 1.1 rejects it).
    pub oci_namespace: bool,
    /// Policy for pods without `imacri.dev/ima-policy`.
    pub default_policy: String,
    pub policies: std::collections::BTreeMap<String, crate::integrity::setting::PolicyConfig>,
    /// Host IDs handed out, 65536 per pod, to ima pods without mappings.
    pub userns_pool: UsernsPool,
    /// TPM for anchoring measurements, as a TCTI string
    /// ("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=2321"); empty: none.
    pub tpm_tcti: String,
    /// PCR the measurement log extends.
    pub pcr: u32,
    /// What happens to containers that ran unmeasured while imacri was down.
    pub fail_mode: FailMode,
    /// Log entries one pod may add; past it, a `quota` entry is logged and
    /// every new execution or mapping of the pod is refused.
    pub max_entries_per_pod: u64,
    /// Bytes: an ima pod's execution or executable mapping of a larger file
    /// is refused unhashed (a `gap` entry and a violation).
    pub max_file_size: u64,
    /// fanotify groups the node must allow (`fs.fanotify.max_user_groups`,
    /// root's): one or two per measured container that runs (`fanotify/closes.rs`). Raised to this at
    /// start when lower, never lowered; 0 leaves it.
    pub fanotify_groups: u64,
    /// Files one container may hold mapped executable or run as scripts at
    /// a time, each watched for writers (an inode mark and a table entry);
    /// past it such a mapping or script is refused in every mode.
    pub max_watched_files: usize,
    /// What a Kubernetes namespace's pods must do and may pick; `"*"`: every
    /// namespace without an entry of its own. The node's word on what a
    /// pod's annotation could otherwise choose (or leave out).
    pub namespaces: std::collections::BTreeMap<String, NamespaceRule>,
}

/// The ima rule of one Kubernetes namespace (`[ima.namespaces.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceRule {
    /// Every pod of the namespace must be an ima pod: one that does not
    /// ask for it is refused (PermissionDenied).
    pub require: bool,
    /// The policies its pods may pick with `imacri.dev/ima-policy`; the
    /// first is the policy of one that names none. Empty: any, and
    /// `default_policy`.
    pub policies: Vec<String>,
}

impl ImaConfig {
    /// The rule for pods of namespace `ns` and the name it is configured
    /// under (`ns` itself or `"*"`), if any.
    pub fn namespace_rule(&self, ns: &str) -> Option<(&str, &NamespaceRule)> {
        self.namespaces
            .get_key_value(ns)
            .or_else(|| self.namespaces.get_key_value("*"))
            .map(|(k, r)| (k.as_str(), r))
    }
}

/// fanotify fails open while imacri is down; this says what a restarted
/// imacri does about containers that ran meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Measure them again and log a `gap` entry (the verifier reports it).
    #[default]
    Open,
    /// Also kill them (kubelet restarts them, measured from the start).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsernsPool {
    /// First host ID of the pool.
    pub start: u32,
    /// Number of 65536-wide ranges.
    pub count: u32,
}

impl Default for UsernsPool {
    fn default() -> Self {
        UsernsPool {
            start: 1 << 20,
            count: 1024,
        }
    }
}

/// PCR 15: firmware owns 0-7, boot loaders 8, 9 and 14 (shim), IMA 10,
/// systemd-stub 11-13; 16 and 23 are resettable (a reset would let anyone
/// forge history) and 17-22 belong to D-RTM. systemd >= 255 may extend 15
/// on UKI systems: imacri detects a PCR it cannot replay and says so; pick
/// another with `ima.pcr` there.
pub const DEFAULT_PCR: u32 = 15;

/// The kernel's default, 128 groups per user, let a node run 128 measured
/// containers; kubelet's default of 110 pods, with a sidecar or two each,
/// needs more. Each group costs the kernel about a kilobyte.
pub const DEFAULT_FANOTIFY_GROUPS: u64 = 8192;

impl Default for ImaConfig {
    fn default() -> Self {
        ImaConfig {
            backend: crate::integrity::setting::BackendChoice::Auto,
            oci_namespace: false,
            default_policy: "default".into(),
            policies: [(
                "default".to_string(),
                crate::integrity::setting::PolicyConfig::default(),
            )]
            .into(),
            userns_pool: UsernsPool::default(),
            tpm_tcti: String::new(),
            pcr: DEFAULT_PCR,
            fail_mode: FailMode::Open,
            max_entries_per_pod: crate::integrity::journal::DEFAULT_POD_QUOTA,
            max_file_size: crate::integrity::engine::DEFAULT_MAX_FILE_SIZE,
            fanotify_groups: DEFAULT_FANOTIFY_GROUPS,
            max_watched_files: crate::integrity::engine::DEFAULT_MAX_WATCHED_FILES,
            namespaces: Default::default(),
        }
    }
}
