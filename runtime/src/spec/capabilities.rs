//! Capabilities: the default set, CRI adds and drops, ambient ones (KEP-2763).

use super::*;

/// containerd's default capability set for containers.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

pub(crate) fn parse_capability(name: &str) -> Result<Capability> {
    // One reading of a name for the spec and for the ima pods' check of
    // forbidden capabilities: they must never disagree.
    crate::integrity::guard::bare_capability(name)
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("unknown capability {name:?}")))
}

/// The first capability of `caps` (any of its sets) an ima pod may not
/// have. CreateContainer refuses such requests by name; this looks at the
/// spec that is about to run, whatever added to it.
pub fn forbidden_capability_in(caps: &oci_spec::runtime::LinuxCapabilities) -> Option<Capability> {
    let forbidden: HashSet<Capability> = crate::integrity::guard::FORBIDDEN_CAPABILITIES
        .iter()
        .filter_map(|c| parse_capability(c).ok())
        .collect();
    [
        caps.bounding(),
        caps.effective(),
        caps.permitted(),
        caps.inheritable(),
        caps.ambient(),
    ]
    .into_iter()
    .flatten()
    .flatten()
    .find(|c| forbidden.contains(c))
    .copied()
}

/// Every capability this process may grant (its `bounding` set): root here
/// may lack some (e.g. CAP_SYS_RESOURCE), and runc fails on those.
pub(crate) fn all_caps(bounding: u64) -> HashSet<Capability> {
    strum_like::ALL
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
        .filter_map(|(_, n)| parse_capability(n).ok())
        .collect()
}

/// Names of every capability runc 1.1 knows, in capability-number order.
mod strum_like {
    pub const ALL: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
}

/// Capability set from defaults, add and drop ("ALL" allowed in both).
pub fn capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    bounding: u64,
) -> Result<HashSet<Capability>> {
    let mut caps: HashSet<Capability> = DEFAULT_CAPS
        .iter()
        .map(|c| parse_capability(c))
        .collect::<Result<_>>()?;
    let Some(sc) = sc else { return Ok(caps) };
    if sc.privileged {
        return Ok(all_caps(bounding));
    }
    if let Some(c) = &sc.capabilities {
        for a in &c.add_capabilities {
            if a.eq_ignore_ascii_case("ALL") {
                caps = all_caps(bounding);
            } else {
                caps.insert(parse_capability(a)?);
            }
        }
        for d in &c.drop_capabilities {
            if d.eq_ignore_ascii_case("ALL") {
                caps.clear();
            } else {
                caps.remove(&parse_capability(d)?);
            }
        }
        // Adds win over "drop ALL", as in containerd.
        for a in &c.add_capabilities {
            if !a.eq_ignore_ascii_case("ALL")
                && c.drop_capabilities
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case("ALL"))
            {
                caps.insert(parse_capability(a)?);
            }
        }
    }
    Ok(caps)
}

pub(crate) fn capability_sets(
    caps: &HashSet<Capability>,
    ambient: &HashSet<Capability>,
) -> Result<oci_spec::runtime::LinuxCapabilities> {
    // Without ambient capabilities, inheritable and ambient stay empty as in
    // containerd (oci-spec's defaults would fill them). Ambient ones
    // (KEP-2763) must also be permitted and inheritable for the kernel to
    // keep them, and in the bounding set to survive exec.
    let all: HashSet<Capability> = caps.union(ambient).copied().collect();
    oci(oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(all.clone())
        .effective(all.clone())
        .permitted(all)
        .inheritable(ambient.clone())
        .ambient(ambient.clone())
        .build())
}

/// `add_ambient_capabilities` (KEP-2763): capabilities a non-root process
/// keeps across exec. containerd and CRI-O drop them; imacri honours them.
pub fn ambient_capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    bounding: u64,
) -> Result<HashSet<Capability>> {
    let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) else {
        return Ok(HashSet::new());
    };
    let mut out = HashSet::new();
    for a in &c.add_ambient_capabilities {
        if a.eq_ignore_ascii_case("ALL") {
            out.extend(all_caps(bounding));
        } else {
            out.insert(parse_capability(a).map_err(|e| {
                Error::InvalidArgument(format!(
                    "linux.security_context.capabilities.add_ambient_capabilities: {e}"
                ))
            })?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_support::*;

    #[test]
    fn capabilities_add_drop_all() {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        assert_eq!(
            capabilities(Some(&sc), u64::MAX).unwrap().len(),
            DEFAULT_CAPS.len()
        );
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        let caps = capabilities(Some(&sc), u64::MAX).unwrap();
        assert_eq!(caps, HashSet::from([Capability::NetAdmin]));
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["CAP_BOGUS".into()],
            ..Default::default()
        });
        assert!(capabilities(Some(&sc), u64::MAX).is_err());
        sc.capabilities = None;
        sc.privileged = true;
        assert!(capabilities(Some(&sc), u64::MAX)
            .unwrap()
            .contains(&Capability::SysAdmin));
    }

    /// Whatever spelling the spec builder grants, the ima pods' checks (of
    /// the request, then of the spec) find.
    #[test]
    fn forbidden_capabilities_are_found_however_spelt() {
        let granted = |name: &str| {
            let sc = cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec![name.into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            caps_of(&spec_with(sc, None).unwrap())
        };
        for name in [
            "cap_sys_admin",
            "Sys_Resource",
            "CAP_SYS_PTRACE",
            "bpf",
            "all",
        ] {
            let caps = granted(name);
            assert!(forbidden_capability_in(&caps).is_some(), "{name}");
            assert_eq!(
                crate::integrity::guard::forbidden_capability(&[name.to_string()]),
                Some(name),
                "{name}"
            );
        }
        assert_eq!(forbidden_capability_in(&granted("net_admin")), None);
        assert_eq!(
            forbidden_capability_in(&caps_of(&spec_with(Default::default(), None).unwrap())),
            None
        );
    }

    fn caps_of(spec: &Spec) -> oci_spec::runtime::LinuxCapabilities {
        spec.process()
            .clone()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap()
    }

    #[test]
    fn ambient_capabilities_are_kept_across_exec() {
        let sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec!["CAP_NET_BIND_SERVICE".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec_with(sc, None).unwrap();
        let caps = caps_of(&spec);
        let nbs = HashSet::from([Capability::NetBindService]);
        for set in [
            caps.ambient(),
            caps.inheritable(),
            caps.permitted(),
            caps.bounding(),
            caps.effective(),
        ] {
            assert_eq!(set.clone().unwrap(), nbs);
        }
        // Without any, inheritable and ambient stay empty (containerd's sets).
        let spec = spec_with(cri::LinuxContainerSecurityContext::default(), None).unwrap();
        let caps = caps_of(&spec);
        assert!(caps.ambient().clone().unwrap().is_empty());
        assert!(caps.inheritable().clone().unwrap().is_empty());
        let bad = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_ambient_capabilities: vec!["CAP_BOGUS".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(spec_with(bad, None)
            .unwrap_err()
            .to_string()
            .contains("add_ambient_capabilities"));
    }
}
