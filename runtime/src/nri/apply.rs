//! Between the OCI spec and NRI: the container a plugin sees (built from the
//! spec imacri is about to create) and the merged adjustment written back
//! into that spec. Both work on the spec's JSON, whose field names are the
//! runtime-spec's, so every NRI field maps to exactly one spec path.

use super::convert::{
    arr, obj, resources_from_json, seccomp_from_json, seccomp_to_json, set_resources, str_map,
    strs, to_json,
};
use super::NriError;
use imacri_nri_api::api;
use oci_spec::runtime::Spec;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Removal markers: a key, destination, path or type prefixed with '-'.
pub fn removal(key: &str) -> Option<&str> {
    key.strip_prefix('-')
}

/// What identifies a container besides its spec.
pub struct ContainerMeta<'a> {
    pub id: &'a str,
    pub pod_sandbox_id: &'a str,
    pub name: &'a str,
    pub labels: &'a HashMap<String, String>,
}

/// The NRI view of a container about to be created from `spec`.
pub fn container_from_spec(m: &ContainerMeta<'_>, spec: &Spec) -> Result<api::Container, NriError> {
    let v = to_json(spec)?;
    let p = &v["process"];
    let l = &v["linux"];
    Ok(api::Container {
        id: m.id.into(),
        pod_sandbox_id: m.pod_sandbox_id.into(),
        name: m.name.into(),
        state: api::ContainerState::ContainerCreated as i32,
        labels: m.labels.clone(),
        annotations: str_map(&v["annotations"]),
        args: strs(&p["args"]),
        env: strs(&p["env"]),
        mounts: v["mounts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| api::Mount {
                        destination: x["destination"].as_str().unwrap_or_default().into(),
                        r#type: x["type"].as_str().unwrap_or_default().into(),
                        source: x["source"].as_str().unwrap_or_default().into(),
                        options: strs(&x["options"]),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        hooks: None,
        linux: Some(api::LinuxContainer {
            namespaces: l["namespaces"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| api::LinuxNamespace {
                            r#type: n["type"].as_str().unwrap_or_default().into(),
                            path: n["path"].as_str().unwrap_or_default().into(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            devices: l["devices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| api::LinuxDevice {
                            path: d["path"].as_str().unwrap_or_default().into(),
                            r#type: d["type"].as_str().unwrap_or_default().into(),
                            major: d["major"].as_i64().unwrap_or(0),
                            minor: d["minor"].as_i64().unwrap_or(0),
                            ..Default::default()
                        })
                        .collect()
                })
                .unwrap_or_default(),
            resources: l["resources"]
                .is_object()
                .then(|| resources_from_json(&l["resources"])),
            oom_score_adj: p["oomScoreAdj"]
                .as_i64()
                .map(|value| api::OptionalInt { value }),
            cgroups_path: l["cgroupsPath"].as_str().unwrap_or_default().into(),
            seccomp_policy: seccomp_from_json(&l["seccomp"]),
            sysctl: str_map(&l["sysctl"]),
            ..Default::default()
        }),
        rlimits: p["rlimits"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| api::PosixRlimit {
                        r#type: r["type"].as_str().unwrap_or_default().into(),
                        hard: r["hard"].as_u64().unwrap_or(0),
                        soft: r["soft"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        user: Some(api::User {
            uid: p["user"]["uid"].as_u64().unwrap_or(0) as u32,
            gid: p["user"]["gid"].as_u64().unwrap_or(0) as u32,
            additional_gids: p["user"]["additionalGids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|g| g.as_u64().map(|g| g as u32))
                        .collect()
                })
                .unwrap_or_default(),
        }),
        ..Default::default()
    })
}

/// An NRI resource update as the OCI resources containerd's task update takes.
pub fn oci_resources(
    r: &api::LinuxResources,
) -> Result<oci_spec::runtime::LinuxResources, NriError> {
    let mut v = json!({});
    set_resources(&mut v, r)?;
    serde_json::from_value(v).map_err(|e| NriError::Spec(e.to_string()))
}

/// Writes the merged adjustment into `spec`. CDI devices are returned for
/// the caller, who owns the CDI registry.
pub fn adjust_spec(spec: &mut Spec, a: &api::ContainerAdjustment) -> Result<Vec<String>, NriError> {
    let mut v = to_json(spec)?;
    if !a.annotations.is_empty() {
        let ann = obj(&mut v, "annotations")?;
        for (k, val) in &a.annotations {
            match removal(k) {
                Some(k) => {
                    ann.remove(k);
                }
                None => {
                    ann.insert(k.clone(), json!(val));
                }
            }
        }
    }
    if !a.mounts.is_empty() {
        let mounts = arr(&mut v, "mounts")?;
        for m in &a.mounts {
            let dest = removal(&m.destination).unwrap_or(&m.destination);
            mounts.retain(|x| x["destination"].as_str() != Some(dest));
            if removal(&m.destination).is_none() {
                mounts.push(json!({"destination": m.destination, "type": m.r#type,
                                   "source": m.source, "options": m.options}));
            }
        }
    }
    if !a.env.is_empty() {
        let env = arr(&mut v["process"], "env")?;
        for kv in &a.env {
            let name = removal(&kv.key).unwrap_or(&kv.key);
            let prefix = format!("{name}=");
            env.retain(|e| {
                !e.as_str()
                    .is_some_and(|e| e.starts_with(&prefix) || e == name)
            });
            if removal(&kv.key).is_none() {
                env.push(json!(format!("{}={}", kv.key, kv.value)));
            }
        }
    }
    if !a.args.is_empty() {
        // A leading "" marks "replace"; either way the plugin's args win.
        let args: Vec<&String> = a.args.iter().skip_while(|s| s.is_empty()).collect();
        v["process"]["args"] = json!(args);
    }
    for r in &a.rlimits {
        let rl = arr(&mut v["process"], "rlimits")?;
        rl.retain(|x| x["type"].as_str() != Some(&r.r#type));
        rl.push(json!({"type": r.r#type, "hard": r.hard, "soft": r.soft}));
    }
    if let Some(h) = &a.hooks {
        let hooks = obj(&mut v, "hooks")?;
        for (key, list) in [
            ("prestart", &h.prestart),
            ("createRuntime", &h.create_runtime),
            ("createContainer", &h.create_container),
            ("startContainer", &h.start_container),
            ("poststart", &h.poststart),
            ("poststop", &h.poststop),
        ] {
            if list.is_empty() {
                continue;
            }
            let entry = hooks.entry(key).or_insert_with(|| Value::Array(Vec::new()));
            if let Some(arr) = entry.as_array_mut() {
                for hk in list {
                    let mut x = json!({"path": hk.path});
                    if !hk.args.is_empty() {
                        x["args"] = json!(hk.args);
                    }
                    if !hk.env.is_empty() {
                        x["env"] = json!(hk.env);
                    }
                    if let Some(t) = &hk.timeout {
                        x["timeout"] = json!(t.value);
                    }
                    arr.push(x);
                }
            }
        }
    }
    if let Some(l) = &a.linux {
        let lin = &mut v["linux"];
        for d in &l.devices {
            let path = removal(&d.path).unwrap_or(&d.path).to_string();
            arr(lin, "devices")?.retain(|x| x["path"].as_str() != Some(&path));
            if removal(&d.path).is_some() {
                continue;
            }
            let mut dev = json!({"path": d.path, "type": d.r#type,
                                 "major": d.major, "minor": d.minor});
            if let Some(m) = &d.file_mode {
                dev["fileMode"] = json!(m.value);
            }
            if let Some(u) = &d.uid {
                dev["uid"] = json!(u.value);
            }
            if let Some(g) = &d.gid {
                dev["gid"] = json!(g.value);
            }
            arr(lin, "devices")?.push(dev);
            // The device is usable only if its cgroup allows it.
            let res = &mut lin["resources"];
            if !res.is_object() {
                *res = json!({});
            }
            arr(res, "devices")?.push(json!({"allow": true, "type": d.r#type,
                "major": d.major, "minor": d.minor, "access": "rwm"}));
        }
        if let Some(r) = &l.resources {
            if !lin["resources"].is_object() {
                lin["resources"] = json!({});
            }
            set_resources(&mut lin["resources"], r)?;
        }
        if !l.cgroups_path.is_empty() {
            lin["cgroupsPath"] = json!(l.cgroups_path);
        }
        if let Some(s) = &l.seccomp_policy {
            lin["seccomp"] = seccomp_to_json(s);
        }
        for n in &l.namespaces {
            let ty = removal(&n.r#type).unwrap_or(&n.r#type).to_string();
            let ns = arr(lin, "namespaces")?;
            ns.retain(|x| x["type"].as_str() != Some(&ty));
            if removal(&n.r#type).is_none() {
                let mut x = json!({"type": n.r#type});
                if !n.path.is_empty() {
                    x["path"] = json!(n.path);
                }
                ns.push(x);
            }
        }
        if !l.sysctl.is_empty() {
            let s = obj(lin, "sysctl")?;
            for (k, val) in &l.sysctl {
                match removal(k) {
                    Some(k) => {
                        s.remove(k);
                    }
                    None => {
                        s.insert(k.clone(), json!(val));
                    }
                }
            }
        }
        if let Some(o) = &l.oom_score_adj {
            v["process"]["oomScoreAdj"] = json!(o.value);
        }
        if let Some(p) = &l.io_priority {
            let class = match api::IoPrioClass::try_from(p.class) {
                Ok(api::IoPrioClass::IoprioClassRt) => "IOPRIO_CLASS_RT",
                Ok(api::IoPrioClass::IoprioClassBe) => "IOPRIO_CLASS_BE",
                Ok(api::IoPrioClass::IoprioClassIdle) => "IOPRIO_CLASS_IDLE",
                _ => "",
            };
            if !class.is_empty() {
                v["process"]["ioPriority"] = json!({"class": class, "priority": p.priority});
            }
        }
    }
    *spec = serde_json::from_value(v).map_err(|e| NriError::Spec(e.to_string()))?;
    Ok(a.cdi_devices.iter().map(|d| d.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": ["A=1", "B=2"], "cwd": "/",
                        "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/data", "type": "bind", "source": "/x", "options": ["rbind"]}],
            "annotations": {"keep": "1", "drop": "2"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}],
                      "resources": {"memory": {"limit": 1000}}}
        }))
        .unwrap()
    }

    #[test]
    fn container_view_carries_the_spec() {
        let labels = HashMap::from([("l".to_string(), "v".to_string())]);
        let c = container_from_spec(
            &ContainerMeta {
                id: "c",
                pod_sandbox_id: "p",
                name: "n",
                labels: &labels,
            },
            &spec(),
        )
        .unwrap();
        assert_eq!(c.args, vec!["sh"]);
        assert_eq!(c.env, vec!["A=1", "B=2"]);
        assert_eq!(c.mounts[0].destination, "/data");
        let l = c.linux.unwrap();
        assert_eq!(l.namespaces.len(), 2);
        assert_eq!(
            l.resources.unwrap().memory.unwrap().limit.unwrap().value,
            1000
        );
    }

    #[test]
    fn adjustments_land_in_the_spec() {
        let mut s = spec();
        let a = api::ContainerAdjustment {
            annotations: HashMap::from([
                ("-drop".to_string(), String::new()),
                ("new".to_string(), "x".to_string()),
            ]),
            mounts: vec![
                api::Mount {
                    destination: "-/data".into(),
                    ..Default::default()
                },
                api::Mount {
                    destination: "/scratch".into(),
                    r#type: "tmpfs".into(),
                    source: "tmpfs".into(),
                    options: vec!["ro".into(), "noexec".into()],
                },
            ],
            env: vec![
                api::KeyValue {
                    key: "-A".into(),
                    value: String::new(),
                },
                api::KeyValue {
                    key: "C".into(),
                    value: "3".into(),
                },
            ],
            rlimits: vec![api::PosixRlimit {
                r#type: "RLIMIT_NOFILE".into(),
                hard: 64,
                soft: 32,
            }],
            linux: Some(api::LinuxContainerAdjustment {
                resources: Some(api::LinuxResources {
                    memory: Some(api::LinuxMemory {
                        limit: Some(api::OptionalInt64 { value: 2000 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                namespaces: vec![api::LinuxNamespace {
                    r#type: "ipc".into(),
                    path: String::new(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        adjust_spec(&mut s, &a).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["annotations"], json!({"keep": "1", "new": "x"}));
        assert_eq!(v["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(v["mounts"][0]["destination"], "/scratch");
        assert_eq!(v["process"]["env"], json!(["B=2", "C=3"]));
        assert_eq!(v["process"]["rlimits"][0]["hard"], 64);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 2000);
        assert_eq!(v["linux"]["namespaces"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn seccomp_round_trips() {
        let j = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]}]});
        let s = seccomp_from_json(&j).unwrap();
        assert_eq!(seccomp_to_json(&s), j);
    }
}
