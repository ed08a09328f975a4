//! `/etc/imacri/config.toml`. Every field has a default; `imacri config default`
//! prints [`DEFAULT_TOML`], which a unit test keeps equal to `Config::default()`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

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
    /// Containerd's restriction: never ask for an oom_score_adj below our own.
    pub restrict_oom_score_adj: bool,
    pub containerd: ContainerdConfig,
    pub registry: RegistryConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// containerd runtime (shim) for pods of the default handler.
    pub runtime: String,
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
            restrict_oom_score_adj: true,
            containerd: ContainerdConfig::default(),
            registry: RegistryConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "k8s.io".into(),
            snapshotter: "overlayfs".into(),
            runtime: "io.containerd.runc.v2".into(),
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
# Never give a container an oom_score_adj below imacri's own (as containerd's
# restrict_oom_score_adj): without CAP_SYS_RESOURCE runc fails otherwise.
restrict_oom_score_adj = true

[containerd]
address = "/run/containerd/containerd.sock"
# Shared with `ctr -n k8s.io` and nerdctl. imacri refuses to start while
# containerd's own CRI plugin is loaded and would manage the same namespace.
namespace = "k8s.io"
snapshotter = "overlayfs"
runtime = "io.containerd.runc.v2"
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

    pub fn parse(text: &str) -> std::result::Result<Config, toml::de::Error> {
        toml::from_str(text)
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
mod tests {
    use super::*;

    #[test]
    fn default_toml_matches_default() {
        assert_eq!(Config::parse(DEFAULT_TOML).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("sokcet = \"/x\"").unwrap_err().to_string();
        assert!(err.contains("sokcet"), "{err}");
    }

    #[test]
    fn partial_config_keeps_defaults() {
        let c = Config::parse("[containerd]\nnamespace = \"other\"\n").unwrap();
        assert_eq!(c.containerd.namespace, "other");
        assert_eq!(c.containerd.snapshotter, "overlayfs");
    }
}
