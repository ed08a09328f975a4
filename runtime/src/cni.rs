//! CNI networking per the CNI spec: the first valid network config in the
//! conf dir, plugins run as executables with CNI_* environment, results
//! chained as prevResult, cached for DEL. Kubelet's CNI_ARGS are passed.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct NetConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    pub file: PathBuf,
}

/// What the pod is, for CNI_ARGS and runtimeConfig.
#[derive(Debug, Clone, Default)]
pub struct PodNetwork {
    pub id: String,
    pub netns: PathBuf,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// (container port, host port, protocol, host ip)
    pub port_mappings: Vec<(i32, i32, String, String)>,
    /// (ingress, egress) in bits per second, from the pod's
    /// kubernetes.io/{ingress,egress}-bandwidth annotations.
    pub bandwidth: (Option<u64>, Option<u64>),
    /// (servers, searches, options) from the pod's DNS config.
    pub dns: Option<(Vec<String>, Vec<String>, Vec<String>)>,
}

/// A Kubernetes quantity ("10M", "1Gi", "500k") as a number.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub ips: Vec<String>,
}

pub struct Cni {
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
}

fn parse_conf(file: &Path) -> std::result::Result<NetConfList, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let name = v["name"].as_str().ok_or("no \"name\"")?.to_string();
    let cni_version = v["cniVersion"].as_str().unwrap_or("0.4.0").to_string();
    let plugins = if file.extension().is_some_and(|e| e == "conflist") {
        v["plugins"]
            .as_array()
            .ok_or("no \"plugins\" list")?
            .clone()
    } else {
        if v["type"].as_str().is_none() {
            return Err("no \"type\"".into());
        }
        vec![v.clone()]
    };
    if plugins.is_empty() || plugins.iter().any(|p| p["type"].as_str().is_none()) {
        return Err("every plugin needs a \"type\"".into());
    }
    Ok(NetConfList {
        name,
        cni_version,
        plugins,
        file: file.to_path_buf(),
    })
}

impl Cni {
    pub fn new(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Cni {
        Cni {
            conf_dir,
            bin_dirs,
            cache_dir,
        }
    }

    /// The first valid config (by file name), re-read on every call so
    /// changes to the directory take effect without a restart.
    pub fn config(&self) -> std::result::Result<NetConfList, String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| format!("cni config dir {}: {e}", self.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
            })
            .collect();
        files.sort();
        let mut problems = Vec::new();
        for f in files {
            match parse_conf(&f) {
                Ok(c) => {
                    let missing: Vec<_> = c
                        .plugins
                        .iter()
                        .filter_map(|p| p["type"].as_str())
                        .filter(|t| self.find_plugin(t).is_none())
                        .collect();
                    if missing.is_empty() {
                        return Ok(c);
                    }
                    problems.push(format!(
                        "{}: plugins not found: {}",
                        f.display(),
                        missing.join(", ")
                    ));
                }
                Err(e) => problems.push(format!("{}: {e}", f.display())),
            }
        }
        Err(if problems.is_empty() {
            format!("no network config in {}", self.conf_dir.display())
        } else {
            problems.join("; ")
        })
    }

    fn find_plugin(&self, t: &str) -> Option<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(t))
            .find(|p| p.is_file())
    }

    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn exec(&self, cmd: &str, plugin: &Value, pod: &PodNetwork, ifname: &str) -> Result<Value> {
        let t = plugin["type"].as_str().unwrap_or_default();
        let bin = self.find_plugin(t).ok_or_else(|| {
            Error::FailedPrecondition(format!("CNI plugin {t:?} not found in {}", self.cni_path()))
        })?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.id, pod.uid
        );
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", &pod.id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", self.cni_path())
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("running CNI plugin", &bin, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            let data = serde_json::to_vec(plugin).map_err(|e| Error::Internal(e.to_string()))?;
            match stdin.write_all(&data) {
                // A plugin that exits without reading its config (a
                // failure of its own): its output says why, as libcni's
                // (Go's exec ignores EPIPE) does.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.map_err(|e| Error::io("writing to CNI plugin", &bin, e))?,
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io("running CNI plugin", &bin, e))?;
        if !out.status.success() {
            let detail = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    Some(format!(
                        "{} {}",
                        v["msg"].as_str()?,
                        v["details"].as_str().unwrap_or_default()
                    ))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
            return Err(Error::Unavailable(format!(
                "CNI plugin {t} {cmd} failed: {}",
                detail.trim()
            )));
        }
        if out.stdout.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Internal(format!("CNI plugin {t} returned bad JSON: {e}")))
    }

    /// The plugin config as the plugin sees it: name, version, prevResult,
    /// and runtimeConfig for the capabilities it declares.
    fn plugin_conf(list: &NetConfList, plugin: &Value, prev: &Value, pod: &PodNetwork) -> Value {
        let mut p = plugin.clone();
        p["name"] = json!(list.name);
        p["cniVersion"] = json!(list.cni_version);
        if !prev.is_null() {
            p["prevResult"] = prev.clone();
        }
        let mut rc = serde_json::Map::new();
        if plugin["capabilities"]["bandwidth"] == json!(true) {
            // The plugin needs a burst with each rate; effectively unlimited.
            let burst = 2_147_483_647u64;
            let mut bw = serde_json::Map::new();
            if let Some(i) = pod.bandwidth.0 {
                bw.insert("ingressRate".into(), json!(i));
                bw.insert("ingressBurst".into(), json!(burst));
            }
            if let Some(e) = pod.bandwidth.1 {
                bw.insert("egressRate".into(), json!(e));
                bw.insert("egressBurst".into(), json!(burst));
            }
            if !bw.is_empty() {
                rc.insert("bandwidth".into(), Value::Object(bw));
            }
        }
        if plugin["capabilities"]["dns"] == json!(true) {
            if let Some((servers, searches, options)) = &pod.dns {
                rc.insert(
                    "dns".into(),
                    json!({"servers": servers, "searches": searches, "options": options}),
                );
            }
        }
        if plugin["capabilities"]["portMappings"] == json!(true) && !pod.port_mappings.is_empty() {
            let pm: Vec<Value> = pod
                .port_mappings
                .iter()
                .map(|(c, h, proto, ip)| {
                    let mut m = json!({"hostPort": h, "containerPort": c, "protocol": proto});
                    if !ip.is_empty() {
                        m["hostIP"] = json!(ip);
                    }
                    m
                })
                .collect();
            rc.insert("portMappings".into(), Value::Array(pm));
        }
        if !rc.is_empty() {
            p["runtimeConfig"] = Value::Object(rc);
        }
        p
    }

    fn cache_file(&self, id: &str) -> PathBuf {
        self.cache_dir.join(format!("{id}.json"))
    }

    /// ADD: loopback, then the network's plugins in order. A failure undoes
    /// what was added.
    pub fn add(&self, pod: &PodNetwork) -> Result<Attachment> {
        let list = self
            .config()
            .map_err(|e| Error::FailedPrecondition(format!("pod networking is not ready: {e}")))?;
        let lo =
            json!({"cniVersion": list.cni_version, "name": "cni-loopback", "type": "loopback"});
        if self.find_plugin("loopback").is_some() {
            self.exec("ADD", &lo, pod, "lo")?;
        }
        std::fs::create_dir_all(&self.cache_dir)
            .map_err(|e| Error::io("creating", &self.cache_dir, e))?;
        // Cache the config first: DEL must work after a half-done ADD.
        // Written whole (renamed into place): a crash leaves the old file or
        // the new one, never a torn one DEL could not read.
        let cache = json!({"config": list.plugins, "name": list.name, "cniVersion": list.cni_version, "result": null});
        crate::store::write_atomic(&self.cache_file(&pod.id), cache.to_string().as_bytes())?;
        let mut prev = Value::Null;
        for plugin in &list.plugins {
            let conf = Self::plugin_conf(&list, plugin, &prev, pod);
            match self.exec("ADD", &conf, pod, "eth0") {
                Ok(r) => prev = r,
                Err(e) => {
                    if let Err(d) = self.del(pod) {
                        tracing::warn!(pod_sandbox_id = %pod.id, error = %d, "CNI DEL after failed ADD");
                    }
                    return Err(e);
                }
            }
        }
        let cache = json!({"config": list.plugins, "name": list.name, "cniVersion": list.cni_version, "result": prev});
        crate::store::write_atomic(&self.cache_file(&pod.id), cache.to_string().as_bytes())?;
        Ok(Attachment {
            ips: result_ips(&prev),
        })
    }

    /// DEL in reverse order with the cached config and result; succeeds when
    /// nothing was ever added. Idempotent.
    pub fn del(&self, pod: &PodNetwork) -> Result<()> {
        let file = self.cache_file(&pod.id);
        // A write a crash cut short (`write_atomic`'s staging file).
        let _ = std::fs::remove_file(file.with_extension("tmp"));
        let cached = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("reading", &file, e)),
        };
        let Ok(cached) = serde_json::from_slice::<Value>(&cached) else {
            // Not ours (cache files are written whole): nothing to DEL by.
            tracing::warn!(pod_sandbox_id = %pod.id, file = %file.display(), "unreadable CNI cache removed");
            let _ = std::fs::remove_file(&file);
            return Ok(());
        };
        let list = NetConfList {
            name: cached["name"].as_str().unwrap_or_default().to_string(),
            cni_version: cached["cniVersion"].as_str().unwrap_or("0.4.0").to_string(),
            plugins: cached["config"].as_array().cloned().unwrap_or_default(),
            file: PathBuf::new(),
        };
        let prev = cached["result"].clone();
        let mut errors = Vec::new();
        for plugin in list.plugins.iter().rev() {
            let conf = Self::plugin_conf(&list, plugin, &prev, pod);
            // A netns that is gone: plugins must still free IPAM and rules.
            if let Err(e) = self.exec("DEL", &conf, pod, "eth0") {
                errors.push(e.to_string());
            }
        }
        if !errors.is_empty() {
            return Err(Error::Unavailable(errors.join("; ")));
        }
        let _ = std::fs::remove_file(&file);
        Ok(())
    }

    /// IPs a pod got, from the cache (after restarts).
    pub fn cached_ips(&self, id: &str) -> Vec<String> {
        std::fs::read(self.cache_file(id))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| result_ips(&v["result"]))
            .unwrap_or_default()
    }
}

/// Addresses without prefix length, IPv4 first (kubelet takes the first as
/// the pod IP).
pub fn result_ips(result: &Value) -> Vec<String> {
    let mut ips: Vec<String> = result["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default();
    ips.sort_by_key(|ip| ip.contains(':'));
    ips
}

/// For tests and defaults: the standard bin dirs.
pub fn default_bin_dirs() -> Vec<PathBuf> {
    vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_first_valid_config_and_reports_problems() {
        let conf = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        std::fs::write(bin.path().join("bridge"), "").unwrap();
        let cni = Cni::new(
            conf.path().into(),
            vec![bin.path().into()],
            conf.path().join("cache"),
        );
        assert!(cni.config().unwrap_err().contains("no network config"));
        std::fs::write(conf.path().join("05-broken.conflist"), "{").unwrap();
        std::fs::write(
            conf.path().join("10-missing.conflist"),
            r#"{"cniVersion":"1.0.0","name":"m","plugins":[{"type":"nothere"}]}"#,
        )
        .unwrap();
        let e = cni.config().unwrap_err();
        assert!(e.contains("05-broken") && e.contains("nothere"), "{e}");
        std::fs::write(
            conf.path().join("20-ok.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"b0"}]}"#,
        )
        .unwrap();
        let c = cni.config().unwrap();
        assert_eq!(c.name, "pods");
        assert_eq!(c.plugins.len(), 1);
    }

    #[test]
    fn del_clears_a_cache_a_crash_cut_short() {
        let conf = tempfile::tempdir().unwrap();
        let cache = conf.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let cni = Cni::new(conf.path().into(), default_bin_dirs(), cache.clone());
        let pod = PodNetwork {
            id: "p1".into(),
            ..Default::default()
        };
        // A staging file (a crash inside the write) and a file that is no
        // cache of ours: nothing to DEL by, both go.
        std::fs::write(cache.join("p1.tmp"), "{\"con").unwrap();
        std::fs::write(cache.join("p1.json"), "").unwrap();
        cni.del(&pod).unwrap();
        assert!(std::fs::read_dir(&cache).unwrap().next().is_none());
        cni.del(&pod).unwrap();
    }

    #[test]
    fn plugin_conf_chains_and_maps_ports() {
        let list = NetConfList {
            name: "n".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![],
            file: PathBuf::new(),
        };
        let pod = PodNetwork {
            port_mappings: vec![(80, 8080, "tcp".into(), String::new())],
            ..Default::default()
        };
        let plugin = json!({"type": "portmap", "capabilities": {"portMappings": true}});
        let c = Cni::plugin_conf(&list, &plugin, &json!({"ips": []}), &pod);
        assert_eq!(c["name"], "n");
        assert_eq!(c["prevResult"], json!({"ips": []}));
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        let plain = Cni::plugin_conf(&list, &json!({"type": "bridge"}), &Value::Null, &pod);
        assert!(plain.get("runtimeConfig").is_none() && plain.get("prevResult").is_none());
    }

    #[test]
    fn bandwidth_and_dns_capabilities() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_quantity("fast"), None);
        let list = NetConfList {
            name: "n".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![],
            file: PathBuf::new(),
        };
        let pod = PodNetwork {
            bandwidth: (Some(1_000_000), None),
            dns: Some((vec!["10.0.0.10".into()], vec!["svc".into()], vec![])),
            ..Default::default()
        };
        let c = Cni::plugin_conf(
            &list,
            &json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
            &Value::Null,
            &pod,
        );
        assert_eq!(c["runtimeConfig"]["bandwidth"]["ingressRate"], 1_000_000);
        assert!(c["runtimeConfig"]["bandwidth"].get("egressRate").is_none());
        let c = Cni::plugin_conf(
            &list,
            &json!({"type": "x", "capabilities": {"dns": true}}),
            &Value::Null,
            &pod,
        );
        assert_eq!(c["runtimeConfig"]["dns"]["servers"][0], "10.0.0.10");
    }

    #[test]
    fn ips_from_results() {
        let r = json!({"ips": [{"address": "fd00::2/64"}, {"address": "10.1.0.5/24", "gateway": "10.1.0.1"}]});
        assert_eq!(result_ips(&r), vec!["10.1.0.5", "fd00::2"]);
        assert!(result_ips(&Value::Null).is_empty());
    }
}
