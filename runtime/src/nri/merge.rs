//! Combining the adjustments of several plugins, in index order, with
//! upstream's conflict rule: each field (an annotation key, a mount
//! destination, an env name, a resource value...) has at most one owner per
//! container; a second plugin touching it fails the request. Later plugins
//! see what earlier ones changed.

use super::apply::removal;
use super::NriError;
use imacri_nri_api::api;
use std::collections::HashMap;

#[derive(Default)]
pub struct Merge {
    owners: HashMap<String, String>,
    /// The last plugin that added hooks (hooks accumulate, unowned).
    hooks_owner: Option<String>,
    pub adjust: api::ContainerAdjustment,
}

/// Our claim labels as upstream's `Field`: simple ones, and compound ones
/// with the entry's key.
fn field_of(label: &str) -> Option<(api::Field, Option<&str>)> {
    use api::Field as F;
    let simple = match label {
        "args" => Some(F::Args),
        "memory.limit" => Some(F::MemLimit),
        "memory.reservation" => Some(F::MemReservation),
        "memory.swap" => Some(F::MemSwapLimit),
        "memory.kernel" => Some(F::MemKernelLimit),
        "memory.kernel_tcp" => Some(F::MemTcpLimit),
        "memory.swappiness" => Some(F::MemSwappiness),
        "memory.disable_oom_killer" => Some(F::MemDisableOomKiller),
        "memory.use_hierarchy" => Some(F::MemUseHierarchy),
        "cpu.shares" => Some(F::CpuShares),
        "cpu.quota" => Some(F::CpuQuota),
        "cpu.period" => Some(F::CpuPeriod),
        "cpu.realtime_runtime" => Some(F::CpuRealtimeRuntime),
        "cpu.realtime_period" => Some(F::CpuRealtimePeriod),
        "cpu.cpus" => Some(F::CpuSetCpUs),
        "cpu.mems" => Some(F::CpuSetMems),
        "pids.limit" => Some(F::PidsLimit),
        "cgroups_path" => Some(F::CgroupsPath),
        "oom_score_adj" => Some(F::OomScoreAdj),
        "io_priority" => Some(F::IoPriority),
        "seccomp policy" => Some(F::SeccompPolicy),
        _ => None,
    };
    if let Some(f) = simple {
        return Some((f, None));
    }
    let (kind, key) = label.split_once(' ')?;
    let f = match kind {
        "annotation" => F::Annotations,
        "mount" => F::Mounts,
        "env" => F::Env,
        "rlimit" => F::Rlimits,
        "device" => F::Devices,
        "hugepages" => F::HugepageLimits,
        "unified" => F::CgroupsUnified,
        "namespace" => F::Namespace,
        "sysctl" => F::Sysctl,
        "CDI" => return Some((F::CdiDevices, key.strip_prefix("device "))),
        _ => return None,
    };
    Some((f, Some(key)))
}

impl Merge {
    fn claim(&mut self, plugin: &str, field: String) -> Result<(), NriError> {
        match self.owners.get(&field) {
            Some(o) if o != plugin => Err(NriError::Conflict(format!(
                "NRI plugins {o} and {plugin} both adjust {field}"
            ))),
            _ => {
                self.owners.insert(field, plugin.into());
                Ok(())
            }
        }
    }

    /// Who owns what, in upstream's form (for validator plugins).
    pub fn owners(&self) -> api::FieldOwners {
        let mut o = api::FieldOwners::default();
        for (label, plugin) in &self.owners {
            match field_of(label) {
                Some((f, None)) => {
                    o.simple.insert(f as i32, plugin.clone());
                }
                Some((f, Some(key))) => {
                    o.compound
                        .entry(f as i32)
                        .or_default()
                        .owners
                        .insert(key.to_string(), plugin.clone());
                }
                None => {}
            }
        }
        if let Some(p) = &self.hooks_owner {
            o.simple.insert(api::Field::OciHooks as i32, p.clone());
        }
        o
    }

    /// Adds `plugin`'s (already screened) adjustment; `view` is the container
    /// as the next plugin will see it.
    pub fn add(
        &mut self,
        plugin: &str,
        a: api::ContainerAdjustment,
        view: &mut api::Container,
    ) -> Result<(), NriError> {
        for (k, v) in a.annotations {
            let key = removal(&k).unwrap_or(&k).to_string();
            self.claim(plugin, format!("annotation {key}"))?;
            if removal(&k).is_some() {
                view.annotations.remove(&key);
            } else {
                view.annotations.insert(key, v.clone());
            }
            self.adjust.annotations.insert(k, v);
        }
        for m in a.mounts {
            let dest = removal(&m.destination)
                .unwrap_or(&m.destination)
                .to_string();
            self.claim(plugin, format!("mount {dest}"))?;
            view.mounts.retain(|x| x.destination != dest);
            if removal(&m.destination).is_none() {
                view.mounts.push(m.clone());
            }
            self.adjust.mounts.push(m);
        }
        for kv in a.env {
            let name = removal(&kv.key).unwrap_or(&kv.key).to_string();
            self.claim(plugin, format!("env {name}"))?;
            let prefix = format!("{name}=");
            view.env.retain(|e| !e.starts_with(&prefix));
            if removal(&kv.key).is_none() {
                view.env.push(format!("{}={}", kv.key, kv.value));
            }
            self.adjust.env.push(kv);
        }
        if !a.args.is_empty() {
            self.claim(plugin, "args".into())?;
            view.args = a
                .args
                .iter()
                .skip_while(|s| s.is_empty())
                .cloned()
                .collect();
            self.adjust.args = a.args;
        }
        if let Some(h) = a.hooks {
            // Hooks accumulate; nobody owns them.
            self.hooks_owner = Some(plugin.to_string());
            let m = self.adjust.hooks.get_or_insert_with(Default::default);
            m.prestart.extend(h.prestart);
            m.create_runtime.extend(h.create_runtime);
            m.create_container.extend(h.create_container);
            m.start_container.extend(h.start_container);
            m.poststart.extend(h.poststart);
            m.poststop.extend(h.poststop);
        }
        for r in a.rlimits {
            self.claim(plugin, format!("rlimit {}", r.r#type))?;
            self.adjust.rlimits.push(r);
        }
        for d in a.cdi_devices {
            self.claim(plugin, format!("CDI device {}", d.name))?;
            self.adjust.cdi_devices.push(d);
        }
        let Some(l) = a.linux else { return Ok(()) };
        let vl = view.linux.get_or_insert_with(Default::default);
        let out = self.adjust.linux.get_or_insert_with(Default::default);
        let mut claims = Vec::new();
        for d in l.devices {
            claims.push(format!("device {}", removal(&d.path).unwrap_or(&d.path)));
            out.devices.push(d);
        }
        if let Some(r) = l.resources {
            // No blockio or RDT class configuration on imacri nodes: refused
            // rather than silently not applied.
            for (f, set) in [
                ("resources.blockio_class", r.blockio_class.is_some()),
                ("resources.rdt_class", r.rdt_class.is_some()),
            ] {
                if set {
                    return Err(NriError::Unsupported(format!(
                        "NRI plugin {plugin} adjusts linux.{f}, which imacri does not apply"
                    )));
                }
            }
            let o = out.resources.get_or_insert_with(Default::default);
            if let Some(m) = r.memory {
                let om = o.memory.get_or_insert_with(Default::default);
                for (f, v, t) in [
                    ("memory.limit", m.limit, &mut om.limit),
                    ("memory.reservation", m.reservation, &mut om.reservation),
                    ("memory.swap", m.swap, &mut om.swap),
                    ("memory.kernel", m.kernel, &mut om.kernel),
                    ("memory.kernel_tcp", m.kernel_tcp, &mut om.kernel_tcp),
                ] {
                    if v.is_some() {
                        claims.push(f.into());
                        *t = v;
                    }
                }
                if m.swappiness.is_some() {
                    claims.push("memory.swappiness".into());
                    om.swappiness = m.swappiness;
                }
                for (f, v, t) in [
                    (
                        "memory.disable_oom_killer",
                        m.disable_oom_killer,
                        &mut om.disable_oom_killer,
                    ),
                    (
                        "memory.use_hierarchy",
                        m.use_hierarchy,
                        &mut om.use_hierarchy,
                    ),
                ] {
                    if v.is_some() {
                        claims.push(f.into());
                        *t = v;
                    }
                }
            }
            if let Some(c) = r.cpu {
                let oc = o.cpu.get_or_insert_with(Default::default);
                for (f, v, t) in [
                    ("cpu.shares", c.shares, &mut oc.shares),
                    ("cpu.period", c.period, &mut oc.period),
                ] {
                    if v.is_some() {
                        claims.push(f.into());
                        *t = v;
                    }
                }
                if c.realtime_runtime.is_some() {
                    claims.push("cpu.realtime_runtime".into());
                    oc.realtime_runtime = c.realtime_runtime;
                }
                if c.realtime_period.is_some() {
                    claims.push("cpu.realtime_period".into());
                    oc.realtime_period = c.realtime_period;
                }
                if c.quota.is_some() {
                    claims.push("cpu.quota".into());
                    oc.quota = c.quota;
                }
                if !c.cpus.is_empty() {
                    claims.push("cpu.cpus".into());
                    oc.cpus = c.cpus;
                }
                if !c.mems.is_empty() {
                    claims.push("cpu.mems".into());
                    oc.mems = c.mems;
                }
            }
            if r.pids.is_some() {
                claims.push("pids.limit".into());
                o.pids = r.pids;
            }
            for h in r.hugepage_limits {
                claims.push(format!("hugepages {}", h.page_size));
                o.hugepage_limits.push(h);
            }
            for (k, v) in r.unified {
                claims.push(format!("unified {k}"));
                o.unified.insert(k, v);
            }
        }
        if !l.cgroups_path.is_empty() {
            claims.push("cgroups_path".into());
            out.cgroups_path = l.cgroups_path;
        }
        if l.oom_score_adj.is_some() {
            claims.push("oom_score_adj".into());
            out.oom_score_adj = l.oom_score_adj;
        }
        if l.io_priority.is_some() {
            claims.push("io_priority".into());
            out.io_priority = l.io_priority;
        }
        if let Some(s) = l.seccomp_policy {
            claims.push("seccomp policy".into());
            vl.seccomp_policy = Some(s.clone());
            out.seccomp_policy = Some(s);
        }
        for n in l.namespaces {
            let ty = removal(&n.r#type).unwrap_or(&n.r#type).to_string();
            claims.push(format!("namespace {ty}"));
            vl.namespaces.retain(|x| x.r#type != ty);
            if removal(&n.r#type).is_none() {
                vl.namespaces.push(n.clone());
            }
            out.namespaces.push(n);
        }
        for (k, v) in l.sysctl {
            claims.push(format!("sysctl {}", removal(&k).unwrap_or(&k)));
            out.sysctl.insert(k, v);
        }
        for (f, set) in [
            ("scheduler", l.scheduler.is_some()),
            ("rdt", l.rdt.is_some()),
            ("net devices", !l.net_devices.is_empty()),
            ("memory policy", l.memory_policy.is_some()),
        ] {
            if set {
                return Err(NriError::Unsupported(format!(
                    "NRI plugin {plugin} adjusts linux.{f}, which imacri does not apply yet"
                )));
            }
        }
        for c in claims {
            self.claim(plugin, c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> api::ContainerAdjustment {
        api::ContainerAdjustment {
            env: vec![api::KeyValue {
                key: k.into(),
                value: "v".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn two_plugins_on_one_field_conflict() {
        let mut m = Merge::default();
        let mut view = api::Container::default();
        m.add("10-a", env("X"), &mut view).unwrap();
        m.add("20-b", env("Y"), &mut view).unwrap();
        let e = m.add("30-c", env("X"), &mut view).unwrap_err();
        assert!(e.to_string().contains("10-a and 30-c"), "{e}");
        assert_eq!(view.env, vec!["X=v", "Y=v"]);
        // Validators see the owners in upstream's form.
        let o = m.owners();
        let env = &o.compound[&(api::Field::Env as i32)].owners;
        assert_eq!(env["X"], "10-a");
        assert_eq!(env["Y"], "20-b");
    }

    #[test]
    fn memory_limit_has_one_owner() {
        let mem = |v| api::ContainerAdjustment {
            linux: Some(api::LinuxContainerAdjustment {
                resources: Some(api::LinuxResources {
                    memory: Some(api::LinuxMemory {
                        limit: Some(api::OptionalInt64 { value: v }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = Merge::default();
        let mut view = api::Container::default();
        m.add("10-a", mem(1), &mut view).unwrap();
        assert!(m.add("20-b", mem(2), &mut view).is_err());
    }
}
