//! Security: masked and read-only /proc paths, AppArmor, the draft IMA
//! namespace, imacri's init for fanotify-measured ima containers.

use super::*;

pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// AppArmor: a Localhost profile needs AppArmor on the node (clear error
/// otherwise); the runtime default is skipped where AppArmor is off, as
/// containerd does.
pub fn apparmor_profile(
    p: Option<&cri::SecurityProfile>,
    legacy: &str,
    enabled: bool,
) -> Result<Option<String>> {
    use cri::security_profile::ProfileType;
    let wanted = match (p, legacy) {
        (Some(p), _) if p.profile_type == ProfileType::Localhost as i32 => {
            Some(p.localhost_ref.clone())
        }
        (None, l) if l.starts_with("localhost/") => {
            Some(l.trim_start_matches("localhost/").to_string())
        }
        _ => None,
    };
    let Some(name) = wanted else { return Ok(None) };
    if !enabled {
        return Err(Error::FailedPrecondition(format!(
            "linux.security_context.apparmor asks for profile {name:?} but AppArmor is not enabled on this node"
        )));
    }
    Ok(Some(name))
}

/// Adds the draft runtime-spec `{"type": "ima"}` namespace (PR #1164).
/// oci-spec's namespace enum is closed, so this works on the JSON.
pub fn add_ima_namespace(spec: &mut serde_json::Value) {
    if let Some(nss) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(|v| v.as_array_mut())
    {
        if !nss.iter().any(|n| n["type"] == "ima") {
            nss.push(serde_json::json!({"type": "ima"}));
        }
    }
}

/// A fanotify-measured ima container runs its command through imacri's init
/// (`integrity::init`), bind-mounted read-only from `host_init`, which
/// restricts execution to files beneath the container's root with Landlock.
/// Landlock needs no_new_privs for a process without CAP_SYS_ADMIN, and an
/// ima pod never has that capability: no_new_privs is set for the whole
/// container (setuid and file capabilities no longer raise privileges, as
/// under `allowPrivilegeEscalation: false`). Applied last, after NRI: the
/// command plugins chose is what runs through the init. The mount keeps
/// exec (it is imacri's own binary; the container's group marks the mount,
/// so its execution is measured too).
///
/// With `deny_proc_writes` (a policy denying anonymous executable memory)
/// the init also refuses opening files beneath procfs for writing: no
/// `/proc/<pid>/mem` writes into code pages. It learns that from its
/// environment ([`crate::integrity::init::DENY_PROC_WRITES`]), which the
/// container's execs inherit, and takes the variable out before the command
/// runs.
pub fn run_through_init(spec: &mut Spec, host_init: &Path, deny_proc_writes: bool) -> Result<()> {
    let init = crate::integrity::init::PATH;
    let mut process = spec.process().clone().unwrap_or_default();
    let mut args = process.args().clone().unwrap_or_default();
    if args.first().map(String::as_str) != Some(init) {
        args.insert(0, init.to_string());
    }
    process.set_args(Some(args));
    // Whatever the pod's own environment said, imacri's word decides.
    let key = crate::integrity::init::DENY_PROC_WRITES;
    let mut env = process.env().clone().unwrap_or_default();
    env.retain(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) != key);
    if deny_proc_writes {
        env.push(format!("{key}=1"));
    }
    process.set_env(Some(env));
    process.set_no_new_privileges(Some(true));
    spec.set_process(Some(process));
    let mount = oci(MountBuilder::default()
        .destination(init)
        .typ("bind")
        .source(host_init)
        .options(["bind", "ro", "nosuid", "nodev"].map(String::from).to_vec())
        .build())?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|m| m.destination() != Path::new(init));
    mounts.push(mount);
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// Seccomp (none when privileged) and the masked and read-only /proc
/// paths: none when privileged, else exactly what kubelet sends, as
/// containerd does (the default lists for procMount Default, empty ones
/// for Unmasked).
// Older kubelets still send the deprecated profile-path field.
#[allow(deprecated)]
pub fn confine(
    mut lb: LinuxBuilder,
    sc: &cri::LinuxContainerSecurityContext,
    caps: &HashSet<Capability>,
) -> Result<LinuxBuilder> {
    if sc.privileged {
        return Ok(lb
            .masked_paths(Vec::<String>::new())
            .readonly_paths(Vec::<String>::new()));
    }
    let field = "linux.security_context.seccomp";
    if let Some(p) =
        crate::seccomp::profile(field, sc.seccomp.as_ref(), &sc.seccomp_profile_path, caps)?
    {
        lb = lb.seccomp(p);
    }
    Ok(lb
        .masked_paths(sc.masked_paths.clone())
        .readonly_paths(sc.readonly_paths.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_comes_first_once_with_no_new_privs_and_its_mount() {
        let mut spec = Spec::default();
        let mut p = spec.process().clone().unwrap();
        p.set_args(Some(vec!["sleep".into(), "1".into()]));
        spec.set_process(Some(p));
        let host = Path::new("/var/lib/imacri/bin/imacri-init-0123");
        run_through_init(&mut spec, host, false).unwrap();
        run_through_init(&mut spec, host, false).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec![
                crate::integrity::init::PATH.to_string(),
                "sleep".into(),
                "1".into()
            ]
        );
        assert_eq!(p.no_new_privileges(), Some(true));
        let inits: Vec<&Mount> = spec
            .mounts()
            .iter()
            .flatten()
            .filter(|m| m.destination() == Path::new(crate::integrity::init::PATH))
            .collect();
        assert_eq!(inits.len(), 1);
        assert_eq!(inits[0].source().as_deref(), Some(host));
        let opts = inits[0].options().clone().unwrap();
        assert!(opts.contains(&"ro".to_string()));
        assert!(!opts.contains(&"noexec".to_string()));
        // An exec of the container runs through it too.
        let e = exec_process(p, &["ls".into()], false).unwrap();
        assert_eq!(
            e.args().as_ref().unwrap(),
            &vec![crate::integrity::init::PATH.to_string(), "ls".into()]
        );
    }

    #[test]
    fn the_init_is_told_to_deny_proc_writes_by_imacri_alone() {
        let key = crate::integrity::init::DENY_PROC_WRITES;
        let with = |env: Vec<String>, deny| {
            let mut spec = Spec::default();
            let mut p = spec.process().clone().unwrap();
            p.set_env(Some(env));
            spec.set_process(Some(p));
            run_through_init(&mut spec, Path::new("/i"), deny).unwrap();
            spec.process().as_ref().unwrap().env().clone().unwrap()
        };
        let env = with(vec!["A=b".into()], true);
        assert_eq!(env, vec!["A=b".to_string(), format!("{key}=1")]);
        // The pod's own value is replaced, either way; an exec inherits it.
        assert_eq!(
            with(vec![format!("{key}=1"), "A=b".into()], false),
            vec!["A=b"]
        );
        let env = with(vec![format!("{key}=0"), format!("{key}")], true);
        assert_eq!(env, vec![format!("{key}=1")]);
    }

    #[test]
    fn ima_namespace_is_added_once() {
        let mut v = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        add_ima_namespace(&mut v);
        add_ima_namespace(&mut v);
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "ima"}])
        );
    }

    #[test]
    fn confinement_follows_what_kubelet_sends() {
        let caps = HashSet::new();
        let masked = |sc: &cri::LinuxContainerSecurityContext| {
            let l = confine(LinuxBuilder::default(), sc, &caps)
                .unwrap()
                .build()
                .unwrap();
            (
                l.masked_paths().clone().unwrap_or_default(),
                l.readonly_paths().clone().unwrap_or_default(),
                l.seccomp().is_some(),
            )
        };
        let default = cri::LinuxContainerSecurityContext {
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            masked(&default),
            (
                vec!["/proc/kcore".to_string()],
                vec!["/proc/sys".to_string()],
                true
            )
        );
        // procMount Unmasked: empty lists, nothing masked.
        let unmasked = cri::LinuxContainerSecurityContext::default();
        assert_eq!(masked(&unmasked), (vec![], vec![], false));
        // Privileged: no masks, no seccomp, whatever was sent.
        let privileged = cri::LinuxContainerSecurityContext {
            privileged: true,
            ..default
        };
        assert_eq!(masked(&privileged), (vec![], vec![], false));
    }

    #[test]
    fn apparmor_needs_it_enabled_only_for_localhost() {
        let local = cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "mine".into(),
        };
        assert_eq!(
            apparmor_profile(Some(&local), "", true).unwrap().as_deref(),
            Some("mine")
        );
        let e = apparmor_profile(Some(&local), "", false).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        let rd = cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        };
        assert_eq!(apparmor_profile(Some(&rd), "", false).unwrap(), None);
    }
}
