//! `/etc/imacri/config.toml`. Every field has a default; `imacri config default`
//! prints [`DEFAULT_TOML`], which a unit test keeps equal to `Config::default()`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

mod ima;
pub use ima::*;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/imacri/config.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// CRI unix socket (mode 0660).
    pub socket: PathBuf,
    /// Persistent state: object records, container logs' metadata.
    pub root: PathBuf,
    /// Volatile state: FIFOs, network namespaces, shm mounts.
    pub state: PathBuf,
    /// Image for pod sandboxes; empty means imacri's built-in pause image.
    pub sandbox_image: String,
    /// Pods that share no pid namespace and are no user-namespace or ima
    /// pods run without a pause process (CRI-O's drop_infra_ctr): imacri
    /// pins their UTS and IPC namespaces itself.
    pub drop_infra_container: bool,
    /// Containerd's restriction: never ask for an oom_score_adj below our own.
    pub restrict_oom_score_adj: bool,
    /// How long ExecSync waits, after its process exited, for the output a
    /// process it left running still holds open (containerd 1.7's
    /// drain_exec_sync_io_timeout); 0: as long as that runs (containerd 1.6).
    pub drain_exec_sync_io_timeout_ms: u64,
    pub containerd: ContainerdConfig,
    pub registry: RegistryConfig,
    pub log: LogConfig,
    pub ima: ImaConfig,
    pub cni: CniConfig,
    pub streaming: StreamingConfig,
    pub attestation: AttestationConfig,
    /// Handler used when kubelet names none ("").
    pub default_runtime: String,
    /// Runtime handlers (RuntimeClass handler names) and their OCI runtimes.
    pub runtimes: std::collections::BTreeMap<String, RuntimeHandler>,
    /// CDI spec directories, lowest priority first.
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// NRI plugins and what each may change.
    pub nri: crate::nri::NriConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeHandler {
    /// containerd shim, e.g. "io.containerd.runc.v2".
    pub runtime_type: String,
    /// OCI runtime binary the shim runs ("" = runc from PATH), e.g. /usr/bin/crun.
    pub binary_name: String,
}

impl Default for RuntimeHandler {
    fn default() -> Self {
        RuntimeHandler {
            runtime_type: "io.containerd.runc.v2".into(),
            binary_name: String::new(),
        }
    }
}

/// The verifier-only endpoint: the attestation service alone on its own
/// socket, so verifiers never need the CRI socket (which controls the node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationConfig {
    /// Unix socket serving only `imacri.attestation.v1`; empty: none.
    pub socket: PathBuf,
    /// Its mode (octal in the file: `socket_mode = 0o660`).
    pub socket_mode: u32,
    /// Group owning it (e.g. the verifier agent's), empty: root's.
    pub socket_group: String,
    /// Also serve it on TCP ("0.0.0.0:7443") for verifiers off the node,
    /// always with mutual TLS; empty: not served.
    pub tcp: String,
    /// PEM certificate chain and key of this node's endpoint.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// PEM CA whose certificates verifiers must present.
    pub client_ca: PathBuf,
    /// How long a removed ima pod stays quotable (seconds).
    pub retention_secs: u64,
    /// An evidence response its client reads none of for this long is
    /// dropped, with its memory and its share of the evidence budget
    /// (seconds; 0: never, until ten minutes).
    pub unread_secs: u64,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            socket: "/run/imacri/attest.sock".into(),
            socket_mode: 0o660,
            socket_group: String::new(),
            tcp: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            client_ca: PathBuf::new(),
            retention_secs: 86400,
            unread_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// Exec/Attach/PortForward URLs point here; loopback keeps them local.
    pub address: String,
    /// 0 picks a free port at start.
    pub port: u16,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1".into(),
            port: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// Network configs (.conflist/.conf); the first valid one by name is used.
    pub conf_dir: PathBuf,
    /// Where plugin executables are looked up, in order.
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: crate::cni::default_bin_dirs(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// How long `serve` waits for containerd to come up.
    pub connect_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// containerd's hosts.toml directory layout: `<config_path>/<host>/hosts.toml`.
    pub config_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: String,
    /// tracing filter, e.g. "info" or "imacri=debug".
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: "/run/imacri/imacri.sock".into(),
            root: "/var/lib/imacri".into(),
            state: "/run/imacri".into(),
            sandbox_image: String::new(),
            drop_infra_container: true,
            restrict_oom_score_adj: true,
            drain_exec_sync_io_timeout_ms: 0,
            containerd: ContainerdConfig::default(),
            registry: RegistryConfig::default(),
            log: LogConfig::default(),
            ima: ImaConfig::default(),
            cni: CniConfig::default(),
            streaming: StreamingConfig::default(),
            attestation: AttestationConfig::default(),
            default_runtime: "runc".into(),
            runtimes: [("runc".to_string(), RuntimeHandler::default())].into(),
            cdi_spec_dirs: crate::cdi::DEFAULT_SPEC_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
            nri: crate::nri::NriConfig::default(),
        }
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "k8s.io".into(),
            snapshotter: "overlayfs".into(),
            connect_timeout_secs: 30,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            config_path: "/etc/containerd/certs.d".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// The default configuration, commented; what `imacri config default` prints.
pub const DEFAULT_TOML: &str = r#"# imacri configuration (/etc/imacri/config.toml).
# Command-line flags of `imacri serve` override these values.

# CRI socket kubelet and crictl connect to (created with mode 0660).
socket = "/run/imacri/imacri.sock"
# Persistent state: pod and container records. Survives restarts and reboots.
root = "/var/lib/imacri"
# Volatile state: FIFOs, network namespaces, /dev/shm mounts.
state = "/run/imacri"
# Image for pod sandboxes. Empty: imacri's built-in pause image, imported into
# containerd at start (no registry needed).
sandbox_image = ""
# Run pods without a pause process where nothing needs one (as CRI-O's
# drop_infra_ctr): pods that share no pid namespace (kubelet's default) and
# are neither user-namespace nor ima pods. imacri pins their UTS and IPC
# namespaces (hostname, IPC sysctls) itself; their containers join those and
# the pod's network namespace. Saves the pause task's runc create and start
# (a third of a pod start) and a process per pod.
drop_infra_container = true
# Never give a container an oom_score_adj below imacri's own (as containerd's
# restrict_oom_score_adj): without CAP_SYS_RESOURCE runc fails otherwise.
restrict_oom_score_adj = true
# How long ExecSync waits, once its command exited, for output a process the
# command left running still holds open (as containerd 1.7's
# drain_exec_sync_io_timeout); past it the call fails with Unknown. 0: as long
# as that process runs, as containerd 1.6 does (a probe's `cmd &` then hangs).
drain_exec_sync_io_timeout_ms = 0
# Runtime handler of pods whose RuntimeClass names none.
default_runtime = "runc"
# CDI spec directories (JSON or YAML), lowest priority first: a device a
# later directory defines replaces an earlier one's.
cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]

[containerd]
address = "/run/containerd/containerd.sock"
# Shared with `ctr -n k8s.io` and nerdctl. imacri refuses to start while
# containerd's own CRI plugin is loaded and would manage the same namespace.
namespace = "k8s.io"
snapshotter = "overlayfs"
# How long `imacri serve` waits for containerd to answer at start.
connect_timeout_secs = 30

[registry]
# containerd's hosts.toml layout: <config_path>/<host>/hosts.toml (mirrors,
# plain-HTTP registries, TLS). See README "Registries".
config_path = "/etc/containerd/certs.d"

[log]
# "text" or "json"; every request line carries its pod or container ID.
format = "text"
level = "info"

[attestation]
# The verifier socket: the attestation service alone (evidence, logs, keys,
# golden policies), nothing that can change the node. Hand this one to
# verifiers, never the CRI socket. Empty: not served.
socket = "/run/imacri/attest.sock"
socket_mode = 0o660
# Group owning the socket (e.g. a verifier agent's); empty: root's.
socket_group = ""
# For verifiers off the node: the same service on TCP, only with mutual TLS
# (this node's certificate and key, and the CA verifiers' client
# certificates must chain to). Empty: not served.
tcp = ""
tls_cert = ""
tls_key = ""
client_ca = ""
# A removed ima pod stays quotable this long (seconds; its entries stay in
# the log regardless, since the PCR includes them). 0: not at all.
retention_secs = 86400
# An evidence response (up to 64 MiB) its client reads none of for this long
# is dropped and the client's stream reset: meanwhile it holds a share of
# the memory all evidence requests wait for. 0: never (all of it must still
# be sent within ten minutes).
unread_secs = 30

[ima]
# Who measures pods with `ima` (field 3702 or annotation imacri.dev/ima=true):
# "kernel" (IMA namespaces, not in mainline kernels), "fanotify" (imacri
# itself), or "auto": kernel where supported, else fanotify. The backend a
# pod got is always shown in its status.
backend = "auto"
# Add the draft OCI namespace {"type": "ima"} to specs (runc 1.1 rejects it).
oci_namespace = false
# Policy of pods without the annotation imacri.dev/ima-policy.
default_policy = "default"
# TPM anchoring the measurement log: a TCTI such as "device:/dev/tpmrm0" or
# "swtpm:host=127.0.0.1,port=2321". Empty: measurements are kept but the
# evidence says "unanchored".
tpm_tcti = ""
# The PCR every measurement extends. 15: not used by firmware (0-7), boot
# loaders (8, 9, 14), IMA (10) or systemd-stub (11-13), and not resettable
# like 16 and 23. imacri refuses to vouch for a PCR something else extends.
pcr = 15
# While imacri is down fanotify lets everything run (the kernel releases its
# waiters). At restart, "open" measures running ima containers again and logs
# a `gap` entry for each; "closed" also kills them, so nothing that ran
# unmeasured keeps running (kubelet restarts them, measured from the start).
fail_mode = "open"
# Log entries one pod may add (hard links and renames of one file would
# otherwise grow the node log without bound). Past it a `quota` entry is
# logged (a violation) and the pod's new executions are refused.
max_entries_per_pod = 20000
# Bytes. A file is hashed before it runs, by threads every pod shares (a
# slice at a time, pods in turn); an execution or executable mapping of a
# larger file is refused unhashed (a `gap` entry and a violation), so a pod
# cannot keep them busy with huge sparse files. 4 GiB.
max_file_size = 4294967296
# fanotify groups the node must allow (fs.fanotify.max_user_groups, per user:
# imacri's are root's). The fanotify backend opens one or two per measured
# container that runs (the second for closes after writing where the digest
# cache needs them), the pause container included; the kernel's default,
# 128, failed the 129th. Raised to this when imacri starts if lower, never lowered; 0
# leaves the sysctl as it is.
fanotify_groups = 8192
# Files one container may hold at a time mapped executable or executed as
# scripts: each is watched for writers (an inode mark, which keeps the file's
# inode in the kernel's memory, ~1.2 KiB, and an entry in imacri's; imacri's
# marks do not count against fs.fanotify.max_user_marks). At the
# limit the watches of files nothing of the container holds any more end;
# past it a new mapping or script is refused (EPERM) in every mode, so a pod
# cannot grow them without bound nor run unwatched past it.
max_watched_files = 4096

# What the pods of a Kubernetes namespace (their metadata's) must do and may
# pick, whatever their annotations say: `require = true` refuses a pod that
# does not ask for ima (PermissionDenied); `policies` are the ones its pods
# may name in imacri.dev/ima-policy (another is PermissionDenied), the first
# being the policy of a pod that names none. "*" applies to every namespace
# without an entry of its own. No entry: any pod, any policy.
# [ima.namespaces.payments]
# require = true
# policies = ["strict"]

[ima.policies.default]
# Rules in the kernel's IMA policy syntax. With the fanotify backend,
# executions (fanotify) and executable mappings of files (seccomp map guard)
# are always measured in an ima pod; FILE_CHECK [uid=N] rules add opens.
rules = [
    "measure func=BPRM_CHECK mask=MAY_EXEC",
    "measure func=FILE_MMAP mask=MAY_EXEC",
]
# "measure" records; "enforce" also denies executions and executable
# mappings whose digest the allowlist does not allow (EPERM), logging a
# violation. Reads are never denied: `cat` of a binary works.
mode = "measure"
# Appraisal policies (JSON, e.g. from `imacri attest golden IMAGE`), checked
# at RunPodSandbox and read again as each container starts (a regenerated
# file applies to new containers). Required for "enforce"; with "measure"
# they flag violations in status, events and logs.
allowlist = []
# Executables on volumes: "deny" (every volume noexec) or "measure" (the
# pod's own tmpfs volumes are marked whole, every other volume on a local
# filesystem through the container's mount; network and FUSE filesystems and
# volumes with mounts beneath stay noexec).
volumes = "deny"
# Executable memory no file backs (anonymous, a file's privately written
# pages, writable and executable at once): "allow" (as IMA: not measured) or
# "deny" (SELinux's execmem/execmod: refused with EPERM, and userfaultfd and
# ptrace's pokes with it; for workloads without a JIT). `imacri check` line
# `ima-anonymous-exec` says whether /proc/<pid>/mem writes are closed too.
anonymous_exec = "allow"

[ima.userns_pool]
# ima pods without user-namespace mappings get 65536 host IDs from here,
# kept for the pod's life: [start, start + count * 65536).
start = 1048576
count = 1024

[cni]
# Pod networking: the first valid .conflist/.conf here (re-read when it
# changes); NetworkReady is false while there is none.
conf_dir = "/etc/cni/net.d"
# Plugin executables, searched in order.
bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]

# Runtime handlers (RuntimeClass `handler` names). Another OCI runtime behind
# the runc shim: [runtimes.crun] runtime_type = "io.containerd.runc.v2",
# binary_name = "/usr/bin/crun".
[runtimes.runc]
runtime_type = "io.containerd.runc.v2"
binary_name = ""

[streaming]
# Exec/Attach/PortForward server (WebSocket channel protocols); URLs carry
# single-use tokens that expire after a minute.
address = "127.0.0.1"
# 0: any free port.
port = 0

[nri]
# NRI plugins (github.com/containerd/nri protocol). Off by default: a plugin
# changes pods, so a node opts in.
enable = false
socket_path = "/var/run/nri/nri.sock"
# Executables `<index>-<name>` started by imacri, configured from
# `<index>-<name>.conf` or `<name>.conf` in plugin_config_path.
plugin_path = "/opt/nri/plugins"
plugin_config_path = "/etc/nri/conf.d"
# Registration and a new plugin's Synchronize (the node's whole state).
plugin_registration_timeout_ms = 5000
# Every other request.
plugin_request_timeout_ms = 2000
# true: only plugins from plugin_path, no socket.
disable_connections = false
# Largest Synchronize message; a larger node state is sent in parts.
sync_message_bytes = 3145728
plugins = {}

# The rule for plugins without their own [nri.plugins."<index>-<name>"].
# allow: kinds of adjustment ("all" or any of annotations, mounts, env, args,
# hooks, devices, cdi-devices, resources, rlimits, seccomp, namespaces,
# oom-score-adj, sysctl, cgroups-path, io-priority, scheduler, rdt,
# net-devices, memory-policy, updates).
# security: for seccomp, namespaces, hooks, devices and mounts: "none",
# "confine-only" (only stricter: drop devices, a seccomp policy allowing
# nothing the current one denies, new namespaces, read-only noexec nosuid
# non-bind mounts) or "all". In ima pods no rule lets a plugin weaken the pod.
# on_refused: "fail" (CreateContainer fails, FailedPrecondition) or "drop".
# uids: socket peers the rule applies to (empty: any).
[nri.default]
allow = ["all"]
security = "confine-only"
on_refused = "fail"
uids = []
"#;

impl Config {
    /// Loads `path`; a missing file at the default path means all defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text)
                .map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::io("reading config", path, e)),
        }
    }

    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Checks what serde cannot: policies parse, the default policy exists,
    /// the ID pool fits in 32 bits.
    pub fn validate(&self) -> Result<()> {
        self.nri.validate()?;
        for (name, p) in &self.ima.policies {
            for r in &p.rules {
                crate::integrity::policy::parse_rule(r)
                    .map_err(|e| Error::InvalidArgument(format!("ima.policies.{name}: {e}")))?;
            }
            if p.mode == crate::integrity::policy::Mode::Enforce && p.allowlist.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "ima.policies.{name}: mode \"enforce\" needs an allowlist (e.g. from `imacri attest golden IMAGE`)"
                )));
            }
        }
        if self.ima.pcr > 23 || (16..=23).contains(&self.ima.pcr) {
            return Err(Error::InvalidArgument(format!(
                "ima.pcr {}: use a non-resettable PCR below 16 that nothing else extends",
                self.ima.pcr
            )));
        }
        for (ns, rule) in &self.ima.namespaces {
            if let Some(p) = rule
                .policies
                .iter()
                .find(|p| !self.ima.policies.contains_key(*p))
            {
                return Err(Error::InvalidArgument(format!(
                    "ima.namespaces.{ns:?}.policies: {p:?} is not in ima.policies"
                )));
            }
        }
        if !self.ima.policies.contains_key(&self.ima.default_policy) {
            return Err(Error::InvalidArgument(format!(
                "ima.default_policy {:?} is not in ima.policies",
                self.ima.default_policy
            )));
        }
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err(Error::InvalidArgument(format!(
                "default_runtime {:?} is not in [runtimes]",
                self.default_runtime
            )));
        }
        let pool = self.ima.userns_pool;
        if pool.start == 0
            || u64::from(pool.start) + u64::from(pool.count) * 65536 > u64::from(u32::MAX)
        {
            return Err(Error::InvalidArgument(
                "ima.userns_pool must start above 0 and end below 2^32".into(),
            ));
        }
        Ok(())
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.state.join("netns")
    }

    pub fn fifo_dir(&self) -> PathBuf {
        self.state.join("io")
    }
}

#[cfg(test)]
mod tests;
