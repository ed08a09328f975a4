//! The container process: arguments, environment, user, oom_score_adj, and exec processes derived from it.

use super::*;

pub(crate) const DEFAULT_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Image environment overlaid with CRI envs (CRI wins per key).
pub fn merge_env(image_env: &[String], cri_env: &[cri::KeyValue]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    let mut put = |k: &str, v: String| {
        if !values.contains_key(k) {
            order.push(k.to_string());
        }
        values.insert(k.to_string(), v);
    };
    for e in image_env {
        let (k, _) = e.split_once('=').unwrap_or((e, ""));
        put(k, e.clone());
    }
    for kv in cri_env {
        put(&kv.key, format!("{}={}", kv.key, kv.value));
    }
    if !values.contains_key("PATH") {
        order.insert(0, "PATH".into());
        values.insert("PATH".into(), DEFAULT_PATH.into());
    }
    order
        .into_iter()
        .filter_map(|k| values.remove(&k))
        .collect()
}

/// containerd's rule: command replaces the entrypoint (and drops image cmd);
/// args alone replace the image cmd.
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<Vec<String>> {
    let ic = image.config().as_ref();
    let entrypoint = ic.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = ic.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let args = if !config.command.is_empty() {
        config.command.iter().chain(&config.args).cloned().collect()
    } else if !config.args.is_empty() {
        entrypoint.into_iter().chain(config.args.clone()).collect()
    } else {
        entrypoint.into_iter().chain(cmd).collect::<Vec<_>>()
    };
    if args.is_empty() {
        return Err(Error::InvalidArgument(
            "no command specified: neither the container config (command/args) nor the image has one"
                .into(),
        ));
    }
    Ok(args)
}

pub fn clamp_oom(requested: i64, node: NodeFacts) -> i32 {
    let r = requested.clamp(-1000, 1000) as i32;
    r.max(node.min_oom_score_adj)
}

/// Drops what oci-spec's `Default` adds and containerd does not: rlimits
/// (NOFILE 1024) and a console size.
pub(crate) fn clear_process_defaults(spec: &mut Spec) {
    if let Some(p) = spec.process_mut() {
        p.set_rlimits(None);
        p.set_console_size(None);
    }
}

/// The image's `User` when it is numeric ("1000", "1000:1000").
pub fn image_user_numeric(image: &ImageConfiguration) -> Option<(u32, u32)> {
    let user = image.config().as_ref()?.user().clone()?;
    if user.is_empty() {
        return Some((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((&user, ""));
    let uid = u.parse().ok()?;
    let gid = if g.is_empty() { 0 } else { g.parse().ok()? };
    Some((uid, gid))
}

/// The identity a container's first process runs as.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Process for ExecSync / Exec: the container's process with another command.
pub fn exec_process(base: &Process, cmd: &[String], tty: bool) -> Result<Process> {
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("cmd must not be empty".into()));
    }
    let mut p = base.clone();
    // A container that runs through imacri's init runs its execs through it
    // too: each is a process of its own, outside the init's restriction.
    let mut args = Vec::with_capacity(cmd.len() + 1);
    if crate::integrity::init::runs_through(base) {
        args.push(crate::integrity::init::PATH.to_string());
    }
    args.extend_from_slice(cmd);
    p.set_args(Some(args));
    p.set_terminal(Some(tty));
    p.set_console_size(None);
    Ok(p)
}

/// The container's process: image and CRI arguments and environment,
/// working directory, user, oom_score_adj, capabilities.
pub fn container_process(
    i: &ContainerInputs<'_>,
    sc: &cri::LinuxContainerSecurityContext,
    caps: &HashSet<Capability>,
) -> Result<Process> {
    let config = i.config;
    let args = process_args(config, i.image)?;
    let ic = i.image.config().clone().unwrap_or_default();
    let mut env = merge_env(&ic.env().clone().unwrap_or_default(), &config.envs);
    if !i.sandbox_config.hostname.is_empty() && !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", i.sandbox_config.hostname));
    }
    let cwd = if !config.working_dir.is_empty() {
        validate_container_path("working_dir", &config.working_dir)?;
        config.working_dir.clone()
    } else {
        ic.working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    let oom = clamp_oom(
        config
            .linux
            .as_ref()
            .and_then(|l| l.resources.as_ref())
            .map_or(0, |r| r.oom_score_adj),
        i.node,
    );
    let ambient = ambient_capabilities(Some(sc), i.node.cap_bounding)?;
    oci(ProcessBuilder::default()
        .terminal(config.tty)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(oci(UserBuilder::default()
            .uid(i.user.uid)
            .gid(i.user.gid)
            .additional_gids(i.user.additional_gids.clone())
            .build())?)
        .no_new_privileges(sc.no_new_privs)
        .oom_score_adj(oom)
        .capabilities(capability_sets(caps, &ambient)?)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_support::*;

    #[test]
    fn env_merge_overrides_and_keeps_order() {
        let env = merge_env(
            &["PATH=/bin".into(), "A=1".into()],
            &[kv("A", "2"), kv("B", "3")],
        );
        assert_eq!(env, vec!["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(merge_env(&[], &[])[0], DEFAULT_PATH);
    }

    #[test]
    fn args_follow_containerd_rules() {
        let img = image(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/ep"], "Cmd": ["c1"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        }));
        let mut c = cri::ContainerConfig::default();
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/ep", "c1"]);
        c.args = vec!["a".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/ep", "a"]);
        c.command = vec!["/cmd".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/cmd", "a"]);
        let empty = image(
            serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        );
        assert!(process_args(&cri::ContainerConfig::default(), &empty).is_err());
    }

    #[test]
    fn oom_is_clamped() {
        let l = NodeFacts {
            min_oom_score_adj: -500,
            hugetlb: true,
            apparmor: false,
            cap_bounding: u64::MAX,
        };
        assert_eq!(clamp_oom(-998, l), -500);
        assert_eq!(clamp_oom(100, l), 100);
        assert_eq!(clamp_oom(5000, l), 1000);
    }
}
