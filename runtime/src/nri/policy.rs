//! The administrator's lockdown: which kinds of adjustment a plugin may make
//! and, for fields that change a pod's confinement, whether it may only make
//! the pod stricter. In ima pods a fixed set of guards holds whatever the
//! config says: no plugin can take a container out of measurement.

use super::apply::removal;
use super::config::{OnRefused, PluginRule, Security};
use imacri_nri_api::api;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Annotations,
    Mounts,
    Env,
    Args,
    Hooks,
    Devices,
    CdiDevices,
    Resources,
    Rlimits,
    Seccomp,
    Namespaces,
    OomScoreAdj,
    Sysctl,
    CgroupsPath,
    IoPriority,
    Scheduler,
    Rdt,
    NetDevices,
    MemoryPolicy,
    /// Resource updates of other containers (and unsolicited ones).
    Updates,
}

impl Kind {
    pub const ALL: [Kind; 20] = [
        Kind::Annotations,
        Kind::Mounts,
        Kind::Env,
        Kind::Args,
        Kind::Hooks,
        Kind::Devices,
        Kind::CdiDevices,
        Kind::Resources,
        Kind::Rlimits,
        Kind::Seccomp,
        Kind::Namespaces,
        Kind::OomScoreAdj,
        Kind::Sysctl,
        Kind::CgroupsPath,
        Kind::IoPriority,
        Kind::Scheduler,
        Kind::Rdt,
        Kind::NetDevices,
        Kind::MemoryPolicy,
        Kind::Updates,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Annotations => "annotations",
            Kind::Mounts => "mounts",
            Kind::Env => "env",
            Kind::Args => "args",
            Kind::Hooks => "hooks",
            Kind::Devices => "devices",
            Kind::CdiDevices => "cdi-devices",
            Kind::Resources => "resources",
            Kind::Rlimits => "rlimits",
            Kind::Seccomp => "seccomp",
            Kind::Namespaces => "namespaces",
            Kind::OomScoreAdj => "oom-score-adj",
            Kind::Sysctl => "sysctl",
            Kind::CgroupsPath => "cgroups-path",
            Kind::IoPriority => "io-priority",
            Kind::Scheduler => "scheduler",
            Kind::Rdt => "rdt",
            Kind::NetDevices => "net-devices",
            Kind::MemoryPolicy => "memory-policy",
            Kind::Updates => "updates",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One refused part of an adjustment: who, what, and which rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub plugin: String,
    pub field: String,
    pub rule: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NRI plugin {} may not adjust {}: {}",
            self.plugin, self.field, self.rule
        )
    }
}

/// Everything the checks need about the plugin and the container.
pub struct Ctx<'a> {
    pub plugin: &'a str,
    pub rule: &'a PluginRule,
    /// The container belongs to an ima pod.
    pub ima: bool,
    /// The container as it stands before this plugin's adjustment.
    pub container: &'a api::Container,
}

impl Ctx<'_> {
    fn allows(&self, k: Kind) -> bool {
        self.rule.allow.iter().any(|a| a == "all" || a == k.name())
    }

    fn refuse(&self, field: &str, rule: impl Into<String>) -> Refusal {
        Refusal {
            plugin: self.plugin.into(),
            field: field.into(),
            rule: rule.into(),
        }
    }

    fn kind(&self, k: Kind, field: &str) -> Result<(), Refusal> {
        if self.allows(k) {
            Ok(())
        } else {
            Err(self.refuse(
                field,
                format!(
                    "kind {:?} is not in the plugin's allow list {:?}",
                    k.name(),
                    self.rule.allow
                ),
            ))
        }
    }

    /// A change that does not make the pod stricter.
    fn weakening(&self, field: &str, what: &str) -> Result<(), Refusal> {
        match self.rule.security {
            Security::All => Ok(()),
            s => Err(self.refuse(
                field,
                format!(
                    "{what}; the plugin's security rule is {:?}",
                    match s {
                        Security::None => "none",
                        _ => "confine-only",
                    }
                ),
            )),
        }
    }

    /// A change that only confines: refused only under `none`.
    fn confining(&self, field: &str) -> Result<(), Refusal> {
        if self.rule.security == Security::None {
            Err(self.refuse(field, "the plugin's security rule is \"none\""))
        } else {
            Ok(())
        }
    }

    fn ima(&self, field: &str, what: &str) -> Result<(), Refusal> {
        if self.ima {
            Err(self.refuse(
                field,
                format!("{what} in an ima pod (no rule allows it: the pod stays measured)"),
            ))
        } else {
            Ok(())
        }
    }
}

fn has_opt(m: &api::Mount, o: &str) -> bool {
    m.options.iter().any(|x| x == o)
}

fn is_bind(m: &api::Mount) -> bool {
    m.r#type == "bind" || has_opt(m, "bind") || has_opt(m, "rbind")
}

/// Applies the rule to one plugin's adjustment. Refused parts are removed
/// (and returned) when the rule says "drop"; with "fail" the first refusal
/// is the error.
pub fn screen(a: &mut api::ContainerAdjustment, ctx: &Ctx<'_>) -> Result<Vec<Refusal>, Refusal> {
    let mut dropped = Vec::new();
    let mut decide = |r: Result<(), Refusal>| -> Result<bool, Refusal> {
        match r {
            Ok(()) => Ok(true),
            Err(e) if ctx.rule.on_refused == OnRefused::Drop => {
                dropped.push(e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    };

    if !a.annotations.is_empty() {
        let keys: Vec<String> = a.annotations.keys().cloned().collect();
        for k in keys {
            let name = removal(&k).unwrap_or(&k);
            let r = ctx.kind(Kind::Annotations, "annotations").and_then(|_| {
                if name.starts_with("imacri.dev/") {
                    ctx.ima(&format!("annotation {name}"), "imacri's own annotations")?;
                    ctx.weakening(&format!("annotation {name}"), "imacri's own annotations")
                } else {
                    Ok(())
                }
            });
            if !decide(r)? {
                a.annotations.remove(&k);
            }
        }
    }

    let mut mounts = std::mem::take(&mut a.mounts);
    let mut kept = Vec::new();
    for m in mounts.drain(..) {
        let field = format!("mount {}", m.destination);
        let r = ctx.kind(Kind::Mounts, &field).and_then(|_| {
            if removal(&m.destination).is_some() {
                ctx.ima(&field, "removing a mount")?;
                return ctx.weakening(&field, "removing a mount can unmask paths");
            }
            if !has_opt(&m, "noexec") {
                ctx.ima(&field, "an executable mount (no noexec)")?;
            }
            // The host's later mounts beneath it would come executable.
            if ["slave", "rslave", "shared", "rshared"]
                .iter()
                .any(|o| has_opt(&m, o))
            {
                ctx.ima(
                    &field,
                    "a mount that takes the host's later mounts (propagation)",
                )?;
            }
            let confines =
                !is_bind(&m) && has_opt(&m, "ro") && has_opt(&m, "noexec") && has_opt(&m, "nosuid");
            if confines {
                ctx.confining(&field)
            } else {
                ctx.weakening(
                    &field,
                    "only read-only, noexec, nosuid mounts of no host path confine",
                )
            }
        });
        if decide(r)? {
            kept.push(m);
        }
    }
    a.mounts = kept;

    if !a.env.is_empty() && !decide(ctx.kind(Kind::Env, "env"))? {
        a.env.clear();
    }
    if !a.args.is_empty() && !decide(ctx.kind(Kind::Args, "args"))? {
        a.args.clear();
    }
    if !a.rlimits.is_empty() && !decide(ctx.kind(Kind::Rlimits, "rlimits"))? {
        a.rlimits.clear();
    }
    if let Some(h) = &a.hooks {
        let in_container = !h.create_container.is_empty() || !h.start_container.is_empty();
        let r = ctx.kind(Kind::Hooks, "hooks").and_then(|_| {
            if in_container {
                ctx.ima("hooks", "a hook that runs in the container")?;
            }
            ctx.weakening("hooks", "hooks run as root outside the pod's confinement")
        });
        if !decide(r)? {
            a.hooks = None;
        }
    }
    if !a.cdi_devices.is_empty() {
        let r = ctx.kind(Kind::CdiDevices, "CDI devices").and_then(|_| {
            ctx.ima("CDI devices", "CDI devices (they may add hooks and mounts)")?;
            ctx.weakening(
                "CDI devices",
                "CDI devices add device nodes, mounts and hooks",
            )
        });
        if !decide(r)? {
            a.cdi_devices.clear();
        }
    }

    let Some(l) = a.linux.as_mut() else {
        return Ok(dropped);
    };
    let mut devices = std::mem::take(&mut l.devices);
    for d in devices.drain(..) {
        let field = format!("device {}", d.path);
        let r = ctx.kind(Kind::Devices, &field).and_then(|_| {
            if removal(&d.path).is_some() {
                ctx.confining(&field)
            } else {
                ctx.weakening(&field, "adding a device node")
            }
        });
        if decide(r)? {
            l.devices.push(d);
        }
    }
    if l.resources.is_some() && !decide(ctx.kind(Kind::Resources, "linux.resources"))? {
        l.resources = None;
    }
    if !l.cgroups_path.is_empty() {
        let r = ctx
            .kind(Kind::CgroupsPath, "linux.cgroups_path")
            .and_then(|_| {
                ctx.ima(
                    "linux.cgroups_path",
                    "moving the container out of its pod's cgroup",
                )?;
                ctx.weakening(
                    "linux.cgroups_path",
                    "moving the container out of its pod's cgroup",
                )
            });
        if !decide(r)? {
            l.cgroups_path.clear();
        }
    }
    if l.oom_score_adj.is_some() && !decide(ctx.kind(Kind::OomScoreAdj, "linux.oom_score_adj"))? {
        l.oom_score_adj = None;
    }
    if l.io_priority.is_some() && !decide(ctx.kind(Kind::IoPriority, "linux.io_priority"))? {
        l.io_priority = None;
    }
    if !l.sysctl.is_empty() {
        // The pod's pid namespace holds vm.memfd_noexec = 2 (no executable
        // memfds); runc would write a plugin's value into that namespace.
        let guarded = l
            .sysctl
            .keys()
            .find(|k| removal(k).unwrap_or(k).starts_with("vm.") || k.starts_with("kernel."))
            .cloned();
        let r = ctx
            .kind(Kind::Sysctl, "linux.sysctl")
            .and_then(|_| match &guarded {
                Some(k) => ctx.ima(&format!("sysctl {k}"), "vm.* and kernel.* sysctls"),
                None => Ok(()),
            });
        if !decide(r)? {
            l.sysctl.clear();
        }
    }
    if !l.net_devices.is_empty() {
        let r = ctx
            .kind(Kind::NetDevices, "linux.net_devices")
            .and_then(|_| {
                ctx.weakening(
                    "linux.net_devices",
                    "moving host network devices into the pod",
                )
            });
        if !decide(r)? {
            l.net_devices.clear();
        }
    }
    if l.scheduler.is_some() && !decide(ctx.kind(Kind::Scheduler, "linux.scheduler"))? {
        l.scheduler = None;
    }
    if l.rdt.is_some() && !decide(ctx.kind(Kind::Rdt, "linux.rdt"))? {
        l.rdt = None;
    }
    if l.memory_policy.is_some() && !decide(ctx.kind(Kind::MemoryPolicy, "linux.memory_policy"))? {
        l.memory_policy = None;
    }
    if let Some(new) = &l.seccomp_policy {
        let current = ctx
            .container
            .linux
            .as_ref()
            .and_then(|l| l.seccomp_policy.as_ref());
        let r = ctx
            .kind(Kind::Seccomp, "linux.seccomp_policy")
            .and_then(|_| {
                let verdict = super::seccomp::no_weaker(current, new);
                if ctx.rule.security == Security::None {
                    return Err(ctx.refuse(
                        "linux.seccomp_policy",
                        "the plugin's security rule is \"none\"",
                    ));
                }
                match verdict {
                    Ok(()) => Ok(()),
                    Err(why) => {
                        ctx.ima(
                            "linux.seccomp_policy",
                            &format!("a weaker seccomp policy ({why})"),
                        )?;
                        ctx.weakening(
                            "linux.seccomp_policy",
                            &format!("the new policy is weaker: {why}"),
                        )
                    }
                }
            });
        if !decide(r)? {
            l.seccomp_policy = None;
        }
    }
    let mut namespaces = std::mem::take(&mut l.namespaces);
    let current: Vec<&api::LinuxNamespace> = ctx
        .container
        .linux
        .as_ref()
        .map(|l| l.namespaces.iter().collect())
        .unwrap_or_default();
    for n in namespaces.drain(..) {
        let ty = removal(&n.r#type).unwrap_or(&n.r#type).to_string();
        let field = format!("namespace {ty}");
        let r = ctx.kind(Kind::Namespaces, &field).and_then(|_| {
            let exists = current.iter().any(|c| c.r#type == ty);
            if ctx.ima && (ty == "user" || ty == "pid" || ty == "mount") {
                return ctx.ima(&field, "changing the pod's user, pid or mount namespace");
            }
            if removal(&n.r#type).is_some() {
                ctx.ima(&field, "removing a namespace")?;
                return ctx.weakening(&field, "removing a namespace shares the host's");
            }
            if !n.path.is_empty() {
                ctx.ima(&field, "joining another namespace")?;
                return ctx.weakening(&field, "joining an existing namespace by path");
            }
            if exists {
                // Replacing the pod's shared namespace with a new one.
                ctx.ima(&field, "replacing a namespace")?;
                return ctx.weakening(&field, "replacing a namespace the pod shares");
            }
            ctx.confining(&field)
        });
        if decide(r)? {
            l.namespaces.push(n);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::super::seccomp::tests::sc;
    use super::*;

    fn rule(security: Security, on_refused: OnRefused) -> PluginRule {
        PluginRule {
            allow: vec!["all".into()],
            security,
            on_refused,
            uids: Vec::new(),
        }
    }

    fn container(seccomp: Option<api::LinuxSeccomp>) -> api::Container {
        api::Container {
            linux: Some(api::LinuxContainer {
                namespaces: vec![
                    api::LinuxNamespace {
                        r#type: "pid".into(),
                        path: "/proc/1/ns/pid".into(),
                    },
                    api::LinuxNamespace {
                        r#type: "user".into(),
                        path: "/proc/1/ns/user".into(),
                    },
                ],
                seccomp_policy: seccomp,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn seccomp_adj(s: api::LinuxSeccomp) -> api::ContainerAdjustment {
        api::ContainerAdjustment {
            linux: Some(api::LinuxContainerAdjustment {
                seccomp_policy: Some(s),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn confine_only_refuses_weaker_seccomp_all_allows_it() {
        let c = container(Some(sc("SCMP_ACT_ERRNO", &[("read", "SCMP_ACT_ALLOW")])));
        let weaker = || seccomp_adj(sc("SCMP_ACT_ALLOW", &[]));
        let r = rule(Security::ConfineOnly, OnRefused::Fail);
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: false,
            container: &c,
        };
        let e = screen(&mut weaker(), &ctx).unwrap_err();
        assert_eq!(e.field, "linux.seccomp_policy");
        assert!(e.to_string().contains("10-x"), "{e}");
        let r = rule(Security::All, OnRefused::Fail);
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: false,
            container: &c,
        };
        assert!(screen(&mut weaker(), &ctx).is_ok());
        // In an ima pod even "all" does not allow it.
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: true,
            container: &c,
        };
        assert!(screen(&mut weaker(), &ctx)
            .unwrap_err()
            .rule
            .contains("ima pod"));
    }

    #[test]
    fn drop_removes_only_the_refused_part() {
        let c = container(None);
        let r = rule(Security::ConfineOnly, OnRefused::Drop);
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: false,
            container: &c,
        };
        let mut a = api::ContainerAdjustment {
            env: vec![api::KeyValue {
                key: "A".into(),
                value: "1".into(),
            }],
            hooks: Some(api::Hooks {
                prestart: vec![api::Hook {
                    path: "/bin/true".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let dropped = screen(&mut a, &ctx).unwrap();
        assert_eq!(dropped.len(), 1);
        assert!(a.hooks.is_none());
        assert_eq!(a.env.len(), 1);
    }

    #[test]
    fn ima_pods_keep_their_namespaces_and_noexec() {
        let c = container(None);
        let r = rule(Security::All, OnRefused::Fail);
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: true,
            container: &c,
        };
        for ty in ["-user", "user", "pid", "-pid"] {
            let mut a = api::ContainerAdjustment {
                linux: Some(api::LinuxContainerAdjustment {
                    namespaces: vec![api::LinuxNamespace {
                        r#type: ty.into(),
                        path: String::new(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert!(screen(&mut a, &ctx).is_err(), "{ty}");
        }
        let mut a = api::ContainerAdjustment {
            mounts: vec![api::Mount {
                destination: "/x".into(),
                r#type: "tmpfs".into(),
                source: "tmpfs".into(),
                options: vec!["rw".into()],
            }],
            ..Default::default()
        };
        assert!(screen(&mut a, &ctx).is_err());
        // noexec, but taking the host's later mounts.
        let mut a = api::ContainerAdjustment {
            mounts: vec![api::Mount {
                destination: "/x".into(),
                r#type: "bind".into(),
                source: "/srv".into(),
                options: vec!["rbind".into(), "noexec".into(), "rslave".into()],
            }],
            ..Default::default()
        };
        let e = screen(&mut a, &ctx).unwrap_err();
        assert!(e.rule.contains("later mounts"), "{e:?}");
        let mut a = api::ContainerAdjustment {
            hooks: Some(api::Hooks {
                start_container: vec![api::Hook {
                    path: "/bin/sh".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(screen(&mut a, &ctx).is_err());
        let mut a = api::ContainerAdjustment {
            linux: Some(api::LinuxContainerAdjustment {
                sysctl: [("vm.memfd_noexec".to_string(), "0".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(screen(&mut a, &ctx).unwrap_err().rule.contains("ima pod"));
        let mut a = api::ContainerAdjustment {
            linux: Some(api::LinuxContainerAdjustment {
                cgroups_path: "/elsewhere".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(screen(&mut a, &ctx).is_err());
    }

    #[test]
    fn kinds_outside_the_allow_list_are_refused() {
        let c = container(None);
        let mut r = rule(Security::All, OnRefused::Fail);
        r.allow = vec!["env".into()];
        let ctx = Ctx {
            plugin: "10-x",
            rule: &r,
            ima: false,
            container: &c,
        };
        let mut a = api::ContainerAdjustment {
            rlimits: vec![api::PosixRlimit {
                r#type: "RLIMIT_NOFILE".into(),
                hard: 1,
                soft: 1,
            }],
            ..Default::default()
        };
        assert!(screen(&mut a, &ctx)
            .unwrap_err()
            .rule
            .contains("allow list"));
    }
}
