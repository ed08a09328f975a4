//! Container Device Interface (CDI, cncf-tags/container-device-interface):
//! vendor spec files in `/etc/cdi` and `/var/run/cdi` (JSON or YAML) name
//! devices `vendor.com/class=name`; a container asking for one (CRI
//! `CDI_devices`, or the older `cdi.k8s.io/*` annotations) gets that
//! device's edits and its spec's common edits applied to its OCI spec:
//! device nodes (with cgroup rules), mounts, env, hooks, extra groups.
//!
//! Our own small reader rather than the `container-device-interface`
//! crate: that one pulls a JSON-schema validator with an HTTP client and
//! clap into the daemon for what is a few structs and one merge.

use oci_spec::runtime::{
    Hook, HookBuilder, Hooks, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    MountBuilder, Spec,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where specs live, lowest priority first (a later directory's device
/// replaces an earlier one's of the same name), as CDI's defaults.
pub const DEFAULT_SPEC_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// Annotation prefix of the pre-`CDI_devices` way to ask for devices.
pub const ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CdiSpec {
    cdi_version: String,
    kind: String,
    #[serde(default)]
    devices: Vec<CdiDevice>,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CdiDevice {
    name: String,
    #[serde(default)]
    container_edits: Edits,
}

/// What a device (or its whole spec) changes in a container.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Edits {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    pub hooks: Vec<CdiHook>,
    #[serde(default)]
    pub mounts: Vec<CdiMount>,
    #[serde(default, rename = "additionalGIDs")]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
    pub host_path: Option<String>,
    #[serde(rename = "type")]
    pub typ: Option<String>,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub file_mode: Option<u32>,
    /// cgroup access ("rwm" when unset).
    pub permissions: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CdiHook {
    pub hook_name: String,
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CdiMount {
    pub host_path: String,
    pub container_path: String,
    #[serde(rename = "type")]
    pub typ: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// One resolvable device: its edits, its spec's common edits, its file.
#[derive(Debug, Clone)]
struct Entry {
    device: Edits,
    common: Edits,
    file: PathBuf,
    /// Another file of the same directory defines it too.
    conflict: Option<PathBuf>,
}

/// Every device the spec directories define, read fresh per request (the
/// directories are small and vendors rewrite them at any time).
#[derive(Debug, Default)]
pub struct Registry {
    devices: HashMap<String, Entry>,
    /// Files that could not be used, with why: named when a device is missing.
    broken: Vec<String>,
    dirs: Vec<PathBuf>,
}

/// `vendor.com/class=name` split into (kind, name), both checked as CDI does.
pub fn parse_qualified(q: &str) -> Result<(&str, &str)> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "CDI device {q:?}: {why} (want vendor.com/class=name)"
        ))
    };
    let (kind, name) = q.split_once('=').ok_or_else(|| bad("no '='"))?;
    check_kind(kind).map_err(|w| bad(&w))?;
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(bad("bad device name"));
    }
    Ok((kind, name))
}

fn check_kind(kind: &str) -> std::result::Result<(), String> {
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| format!("kind {kind:?} has no '/'"))?;
    let ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    };
    if !ok(vendor, "-_.") || !ok(class, "-_") {
        return Err(format!("kind {kind:?} is not vendor/class"));
    }
    Ok(())
}

impl Registry {
    /// Reads `*.json`, `*.yaml` and `*.yml` in `dirs` (missing ones are fine).
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut r = Registry {
            dirs: dirs.to_vec(),
            ..Default::default()
        };
        for dir in dirs {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("json" | "yaml" | "yml")
                    )
                })
                .collect();
            files.sort();
            let mut this_dir: HashMap<String, PathBuf> = HashMap::new();
            for f in files {
                let spec = match read_spec(&f) {
                    Ok(s) => s,
                    Err(why) => {
                        r.broken.push(format!("{}: {why}", f.display()));
                        continue;
                    }
                };
                for d in spec.devices {
                    let q = format!("{}={}", spec.kind, d.name);
                    let conflict = this_dir.get(&q).cloned();
                    this_dir.insert(q.clone(), f.clone());
                    r.devices.insert(
                        q,
                        Entry {
                            device: d.container_edits,
                            common: spec.container_edits.clone(),
                            file: f.clone(),
                            conflict,
                        },
                    );
                }
            }
        }
        r
    }

    /// The edits for `devices`, in order, each spec's common edits once.
    pub fn resolve(&self, devices: &[String]) -> Result<Vec<Edits>> {
        let mut out = Vec::new();
        let mut commons_done: Vec<&Path> = Vec::new();
        for q in devices {
            parse_qualified(q)?;
            let e = self.devices.get(q).ok_or_else(|| {
                let mut msg = format!(
                    "CDI device {q:?} is not defined by any spec in {}",
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if !self.broken.is_empty() {
                    msg.push_str(&format!(" (unreadable: {})", self.broken.join("; ")));
                }
                Error::InvalidArgument(msg)
            })?;
            if let Some(other) = &e.conflict {
                return Err(Error::InvalidArgument(format!(
                    "CDI device {q:?} is defined by both {} and {}",
                    other.display(),
                    e.file.display()
                )));
            }
            if !commons_done.contains(&e.file.as_path()) {
                commons_done.push(&e.file);
                out.push(e.common.clone());
            }
            out.push(e.device.clone());
        }
        Ok(out)
    }
}

fn read_spec(f: &Path) -> std::result::Result<CdiSpec, String> {
    let text = std::fs::read_to_string(f).map_err(|e| e.to_string())?;
    let spec: CdiSpec = if f.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())?
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())?
    };
    if spec.cdi_version.is_empty() {
        return Err("no cdiVersion".into());
    }
    check_kind(&spec.kind)?;
    Ok(spec)
}

/// Devices a container asks for: `CDI_devices`, then any in `cdi.k8s.io/*`
/// annotations (comma-separated), without repeats.
pub fn requested(cdi_devices: &[String], annotations: &HashMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = annotations
        .keys()
        .filter(|k| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    keys.sort();
    let mut out: Vec<String> = Vec::new();
    let from_annotations = keys
        .into_iter()
        .flat_map(|k| annotations[k].split(',').map(|s| s.trim().to_string()));
    for d in cdi_devices.iter().cloned().chain(from_annotations) {
        if !d.is_empty() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// Major, minor and type of a device node on the host.
pub trait NodeInfo {
    fn node(&self, path: &Path) -> Result<(LinuxDeviceType, i64, i64)>;
}

/// The real host: `stat(2)`.
pub struct HostNodes;

impl NodeInfo for HostNodes {
    fn node(&self, path: &Path) -> Result<(LinuxDeviceType, i64, i64)> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(path).map_err(|e| {
            Error::InvalidArgument(format!("CDI device node {}: {e}", path.display()))
        })?;
        let t = if m.file_type().is_char_device() {
            LinuxDeviceType::C
        } else if m.file_type().is_block_device() {
            LinuxDeviceType::B
        } else if m.file_type().is_fifo() {
            LinuxDeviceType::P
        } else {
            return Err(Error::InvalidArgument(format!(
                "CDI device node {} is not a device",
                path.display()
            )));
        };
        let rdev = m.rdev();
        Ok((
            t,
            i64::from(nix::sys::stat::major(rdev) as u32),
            i64::from(nix::sys::stat::minor(rdev) as u32),
        ))
    }
}

fn internal(e: oci_spec::OciSpecError) -> Error {
    Error::Internal(format!("applying CDI edits: {e}"))
}

fn device_type(t: &str) -> Result<LinuxDeviceType> {
    Ok(match t {
        "c" | "u" => LinuxDeviceType::C,
        "b" => LinuxDeviceType::B,
        "p" => LinuxDeviceType::P,
        other => {
            return Err(Error::InvalidArgument(format!(
                "CDI device node type {other:?} (want c, b, u or p)"
            )))
        }
    })
}

/// Applies resolved edits to a container's spec.
pub fn apply(spec: &mut Spec, edits: &[Edits], nodes: &dyn NodeInfo) -> Result<()> {
    for e in edits {
        apply_one(spec, e, nodes)?;
    }
    Ok(())
}

fn apply_one(spec: &mut Spec, e: &Edits, nodes: &dyn NodeInfo) -> Result<()> {
    if let Some(p) = spec.process_mut() {
        let mut env = p.env().clone().unwrap_or_default();
        for kv in &e.env {
            let key = kv.split('=').next().unwrap_or_default();
            env.retain(|x| x.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        p.set_env(Some(env));
        if !e.additional_gids.is_empty() {
            let mut user = p.user().clone();
            let mut gids = user.additional_gids().clone().unwrap_or_default();
            for g in &e.additional_gids {
                if *g != 0 && !gids.contains(g) {
                    gids.push(*g);
                }
            }
            user.set_additional_gids(Some(gids));
            p.set_user(user);
        }
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut devices = linux.devices().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    let mut rules = resources.devices().clone().unwrap_or_default();
    for n in &e.device_nodes {
        let host = PathBuf::from(n.host_path.as_deref().unwrap_or(&n.path));
        let (typ, major, minor) = match (n.major, &n.typ) {
            (Some(maj), Some(t)) if t != "p" => (device_type(t)?, maj, n.minor.unwrap_or(0)),
            (_, Some(t)) if t == "p" => (LinuxDeviceType::P, 0, 0),
            _ => nodes.node(&host)?,
        };
        let mut b = LinuxDeviceBuilder::default()
            .path(PathBuf::from(&n.path))
            .typ(typ)
            .major(major)
            .minor(minor);
        if let Some(m) = n.file_mode {
            b = b.file_mode(m);
        }
        if let Some(u) = n.uid {
            b = b.uid(u);
        }
        if let Some(g) = n.gid {
            b = b.gid(g);
        }
        devices.retain(|d| d.path() != Path::new(&n.path));
        devices.push(b.build().map_err(internal)?);
        if typ != LinuxDeviceType::P {
            rules.push(
                LinuxDeviceCgroupBuilder::default()
                    .allow(true)
                    .typ(typ)
                    .major(major)
                    .minor(minor)
                    .access(n.permissions.clone().unwrap_or_else(|| "rwm".into()))
                    .build()
                    .map_err(internal)?,
            );
        }
    }
    resources.set_devices(Some(rules));
    linux.set_resources(Some(resources));
    linux.set_devices(Some(devices));
    spec.set_linux(Some(linux));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &e.mounts {
        if !Path::new(&m.container_path).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "CDI mount containerPath {:?} must be absolute",
                m.container_path
            )));
        }
        mounts.retain(|x| x.destination() != Path::new(&m.container_path));
        let typ = m.typ.clone().unwrap_or_else(|| "bind".into());
        let mut opts = m.options.clone();
        if typ == "bind" && !opts.iter().any(|o| o == "bind" || o == "rbind") {
            opts.insert(0, "bind".into());
        }
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(&m.container_path))
                .source(PathBuf::from(&m.host_path))
                .typ(typ)
                .options(opts)
                .build()
                .map_err(internal)?,
        );
    }
    spec.set_mounts(Some(mounts));

    if !e.hooks.is_empty() {
        let mut hooks: Hooks = spec.hooks().clone().unwrap_or_default();
        for h in &e.hooks {
            let mut b = HookBuilder::default().path(PathBuf::from(&h.path));
            if !h.args.is_empty() {
                b = b.args(h.args.clone());
            }
            if !h.env.is_empty() {
                b = b.env(h.env.clone());
            }
            if let Some(t) = h.timeout {
                b = b.timeout(t);
            }
            let hook = b.build().map_err(internal)?;
            let add = |v: &Option<Vec<Hook>>| {
                let mut v = v.clone().unwrap_or_default();
                v.push(hook.clone());
                Some(v)
            };
            #[allow(deprecated)] // prestart: still what runtimes run
            match h.hook_name.as_str() {
                "prestart" => hooks.set_prestart(add(hooks.prestart())),
                "createRuntime" => hooks.set_create_runtime(add(hooks.create_runtime())),
                "createContainer" => hooks.set_create_container(add(hooks.create_container())),
                "startContainer" => hooks.set_start_container(add(hooks.start_container())),
                "poststart" => hooks.set_poststart(add(hooks.poststart())),
                "poststop" => hooks.set_poststop(add(hooks.poststop())),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "CDI hook {:?}: unknown hookName {other:?}",
                        h.path
                    )))
                }
            };
        }
        spec.set_hooks(Some(hooks));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeNodes;
    impl NodeInfo for FakeNodes {
        fn node(&self, path: &Path) -> Result<(LinuxDeviceType, i64, i64)> {
            match path.to_str() {
                Some("/dev/fake0") => Ok((LinuxDeviceType::C, 240, 7)),
                _ => Err(Error::InvalidArgument(format!("{}", path.display()))),
            }
        }
    }

    const YAML: &str = r#"
cdiVersion: "0.6.0"
kind: "vendor.example/gpu"
containerEdits:
  env: ["VENDOR_COMMON=1"]
devices:
  - name: "gpu0"
    containerEdits:
      env: ["GPU=0"]
      deviceNodes:
        - path: "/dev/gpu0"
          hostPath: "/dev/fake0"
          permissions: "rw"
      mounts:
        - hostPath: "/opt/vendor/lib"
          containerPath: "/usr/lib/vendor"
          options: ["ro", "nosuid"]
      hooks:
        - hookName: "createContainer"
          path: "/usr/bin/vendor-hook"
          args: ["vendor-hook", "setup"]
  - name: "gpu1"
    containerEdits:
      env: ["GPU=1"]
      additionalGIDs: [44]
"#;

    fn registry(files: &[(&str, &str, &str)]) -> (tempfile::TempDir, Registry) {
        let d = tempfile::tempdir().unwrap();
        for (dir, name, text) in files {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            std::fs::write(d.path().join(dir).join(name), text).unwrap();
        }
        let r = Registry::load(&[d.path().join("etc"), d.path().join("run")]);
        (d, r)
    }

    #[test]
    fn qualified_names() {
        assert_eq!(
            parse_qualified("nvidia.com/gpu=0").unwrap(),
            ("nvidia.com/gpu", "0")
        );
        for bad in [
            "gpu=0",
            "nvidia.com/gpu",
            "nvidia.com/gpu=",
            "a/b=-x",
            "/b=x",
        ] {
            assert!(parse_qualified(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn yaml_and_json_resolve_with_common_edits_once() {
        let json = r#"{"cdiVersion":"0.5.0","kind":"other.example/nic","devices":[{"name":"n","containerEdits":{"env":["NIC=1"]}}]}"#;
        let (_d, r) = registry(&[("etc", "gpu.yaml", YAML), ("run", "nic.json", json)]);
        let e = r
            .resolve(&[
                "vendor.example/gpu=gpu0".into(),
                "vendor.example/gpu=gpu1".into(),
                "other.example/nic=n".into(),
            ])
            .unwrap();
        let envs: Vec<_> = e.iter().flat_map(|e| e.env.clone()).collect();
        assert_eq!(envs, ["VENDOR_COMMON=1", "GPU=0", "GPU=1", "NIC=1"]);
        let err = r.resolve(&["vendor.example/gpu=gpu9".into()]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(err.to_string().contains("gpu9"), "{err}");
    }

    #[test]
    fn later_directory_wins_same_directory_conflicts() {
        let over = YAML.replace("GPU=0", "GPU=zero");
        let (_d, r) = registry(&[("etc", "a.yaml", YAML), ("run", "b.yaml", &over)]);
        let e = r.resolve(&["vendor.example/gpu=gpu0".into()]).unwrap();
        assert_eq!(e[1].env, ["GPU=zero"]);
        let (_d, r) = registry(&[("etc", "a.yaml", YAML), ("etc", "b.yaml", &over)]);
        let err = r.resolve(&["vendor.example/gpu=gpu0".into()]).unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
        // A broken file is named when a device cannot be found.
        let (_d, r) = registry(&[("etc", "bad.yaml", "kind: [")]);
        let err = r.resolve(&["vendor.example/gpu=gpu0".into()]).unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
    }

    #[test]
    fn edits_land_in_the_spec() {
        let (_d, r) = registry(&[("etc", "gpu.yaml", YAML)]);
        let edits = r
            .resolve(&[
                "vendor.example/gpu=gpu0".into(),
                "vendor.example/gpu=gpu1".into(),
            ])
            .unwrap();
        let mut spec = Spec::default();
        apply(&mut spec, &edits, &FakeNodes).unwrap();
        let p = spec.process().clone().unwrap();
        let env = p.env().clone().unwrap();
        assert!(env.contains(&"GPU=1".to_string()) && !env.contains(&"GPU=0".to_string()));
        assert!(env.contains(&"VENDOR_COMMON=1".to_string()));
        assert!(p.user().additional_gids().clone().unwrap().contains(&44));
        let linux = spec.linux().clone().unwrap();
        let dev = &linux.devices().clone().unwrap()[0];
        assert_eq!(dev.path(), Path::new("/dev/gpu0"));
        assert_eq!((dev.major(), dev.minor()), (240, 7));
        let rule = linux
            .resources()
            .clone()
            .unwrap()
            .devices()
            .clone()
            .unwrap()
            .pop()
            .unwrap();
        assert!(rule.allow());
        assert_eq!((rule.major(), rule.minor()), (Some(240), Some(7)));
        assert_eq!(rule.access().as_deref(), Some("rw"));
        let m = spec
            .mounts()
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.destination() == Path::new("/usr/lib/vendor"))
            .unwrap();
        assert_eq!(m.options().clone().unwrap(), ["bind", "ro", "nosuid"]);
        let h = spec.hooks().clone().unwrap();
        assert_eq!(
            h.create_container().clone().unwrap()[0].path(),
            Path::new("/usr/bin/vendor-hook")
        );
    }

    #[test]
    fn annotations_add_devices() {
        let ann = HashMap::from([
            (
                "cdi.k8s.io/vendor".to_string(),
                "a.b/c=1, a.b/c=2".to_string(),
            ),
            ("other".to_string(), "x".to_string()),
        ]);
        assert_eq!(requested(&["a.b/c=2".into()], &ann), ["a.b/c=2", "a.b/c=1"]);
    }
}
