//! Registry hosts from containerd's `hosts.toml` directory layout:
//! `<config_path>/<host>/hosts.toml` (else `<config_path>/_default/hosts.toml`).
//! Mirrors are tried in file order, then `server`.

use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One place to fetch an image from.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// "http" or "https".
    pub scheme: String,
    /// host[:port]
    pub host: String,
    pub capabilities: Vec<String>,
    pub skip_verify: bool,
    pub ca: Vec<PathBuf>,
    pub headers: HashMap<String, String>,
}

impl Endpoint {
    pub fn can_pull(&self) -> bool {
        self.capabilities.iter().any(|c| c == "pull")
    }
    pub fn can_resolve(&self) -> bool {
        self.capabilities.iter().any(|c| c == "resolve")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    header: Option<HashMap<String, OneOrMany>>,
    override_path: Option<bool>,
    client: Option<toml::Value>,
    #[serde(default)]
    host: IndexMap<String, HostEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    header: Option<HashMap<String, OneOrMany>>,
    override_path: Option<bool>,
    client: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

const ALL_CAPS: [&str; 3] = ["pull", "resolve", "push"];

/// The endpoints for `registry` (the host named in the image reference).
pub fn resolve(config_path: &Path, registry: &str) -> Result<Vec<Endpoint>> {
    let dir_name = registry.replace(':', "_");
    let candidates = [
        config_path.join(registry).join("hosts.toml"),
        config_path.join(&dir_name).join("hosts.toml"),
        config_path.join("_default").join("hosts.toml"),
    ];
    for file in candidates {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                return parse(&text, registry)
                    .map_err(|e| Error::InvalidArgument(format!("{}: {e}", file.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("reading registry hosts", file, e)),
        }
    }
    Ok(vec![default_endpoint(registry)])
}

/// docker.io is served from registry-1.docker.io; loopback registries speak
/// plain HTTP (as containerd falls back to for localhost).
fn default_endpoint(registry: &str) -> Endpoint {
    let host = if registry == "docker.io" {
        "registry-1.docker.io".to_string()
    } else {
        registry.to_string()
    };
    Endpoint {
        scheme: if is_loopback(registry) {
            "http"
        } else {
            "https"
        }
        .into(),
        host,
        capabilities: ALL_CAPS.iter().map(|s| s.to_string()).collect(),
        skip_verify: false,
        ca: vec![],
        headers: HashMap::new(),
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

fn split_url(url: &str) -> std::result::Result<(String, String), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_string(), r),
        None => ("https".to_string(), url),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("{url:?}: scheme must be http or https"));
    }
    let rest = rest.trim_end_matches('/');
    let host = rest.trim_end_matches("/v2");
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "{url:?}: only scheme://host[:port] URLs are supported (no path prefixes)"
        ));
    }
    Ok((scheme, host.to_string()))
}

fn headers(h: Option<HashMap<String, OneOrMany>>) -> HashMap<String, String> {
    h.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_vec().join(",")))
        .collect()
}

pub fn parse(text: &str, registry: &str) -> std::result::Result<Vec<Endpoint>, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.client.is_some() || file.host.values().any(|h| h.client.is_some()) {
        return Err("client certificates (`client`) are not supported yet".into());
    }
    if file.override_path == Some(true) || file.host.values().any(|h| h.override_path == Some(true))
    {
        return Err("`override_path` is not supported".into());
    }
    let mut out = Vec::new();
    for (url, entry) in file.host {
        let (scheme, host) = split_url(&url)?;
        out.push(Endpoint {
            scheme,
            host,
            capabilities: entry
                .capabilities
                .unwrap_or_else(|| ALL_CAPS.iter().map(|s| s.to_string()).collect()),
            skip_verify: entry.skip_verify.unwrap_or(false),
            ca: entry
                .ca
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            headers: headers(entry.header),
        });
    }
    let server = match file.server {
        Some(url) => {
            let (scheme, host) = split_url(&url)?;
            Endpoint {
                scheme,
                host,
                ..default_endpoint(registry)
            }
        }
        None => default_endpoint(registry),
    };
    out.push(Endpoint {
        capabilities: file
            .capabilities
            .unwrap_or_else(|| server.capabilities.clone()),
        skip_verify: file.skip_verify.unwrap_or(false),
        ca: file
            .ca
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        headers: headers(file.header),
        ..server
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_then_server() {
        let eps = parse(
            r#"
server = "https://registry.k8s.io"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror.example:8443"]
  skip_verify = true
  ca = "/etc/ca.pem"
  [host."https://mirror.example:8443".header]
    x-token = "abc"
"#,
            "registry.k8s.io",
        )
        .unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].scheme, "http");
        assert_eq!(eps[0].host, "127.0.0.1:5000");
        assert!(eps[0].can_pull() && eps[0].can_resolve());
        assert_eq!(eps[1].host, "mirror.example:8443");
        assert!(eps[1].skip_verify);
        assert_eq!(eps[1].ca, vec![PathBuf::from("/etc/ca.pem")]);
        assert_eq!(eps[1].headers["x-token"], "abc");
        assert_eq!(eps[2].host, "registry.k8s.io");
        assert_eq!(eps[2].scheme, "https");
    }

    #[test]
    fn defaults_without_file() {
        let dir = tempfile::tempdir().unwrap();
        let eps = resolve(dir.path(), "docker.io").unwrap();
        assert_eq!(eps[0].host, "registry-1.docker.io");
        assert_eq!(eps[0].scheme, "https");
        let eps = resolve(dir.path(), "127.0.0.1:5000").unwrap();
        assert_eq!(eps[0].scheme, "http");
    }

    #[test]
    fn reads_directory_layout() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("registry.k8s.io")).unwrap();
        std::fs::write(
            dir.path().join("registry.k8s.io/hosts.toml"),
            "[host.\"http://127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let eps = resolve(dir.path(), "registry.k8s.io").unwrap();
        assert_eq!(eps[0].host, "127.0.0.1:5000");
        assert_eq!(eps[1].host, "registry.k8s.io");
    }

    #[test]
    fn rejects_unsupported_and_typos() {
        assert!(parse("override_path = true", "x").is_err());
        assert!(parse("sever = \"https://x\"", "x").is_err());
        assert!(parse("[host.\"ftp://x\"]", "x").is_err());
    }
}
