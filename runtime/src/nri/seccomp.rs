//! Whether a seccomp policy a plugin offers is at least as strict as the
//! container's: it may allow nothing the current one denies. Conservative:
//! argument conditions must match exactly, and a user-space listener is
//! never accepted (it would take decisions away from the kernel and from
//! imacri's own map guard).

use imacri_nri_api::api;

fn allows(action: &str) -> bool {
    matches!(action, "SCMP_ACT_ALLOW" | "SCMP_ACT_LOG" | "")
}

/// Whether `cur` allows `name` (with argument conditions `args`) in every
/// case the new rule would.
fn cur_allows(cur: &api::LinuxSeccomp, name: &str, args: &[api::LinuxSeccompArg]) -> bool {
    let rules: Vec<&api::LinuxSyscall> = cur
        .syscalls
        .iter()
        .filter(|r| r.names.iter().any(|n| n == name))
        .collect();
    if allows(&cur.default_action) {
        // Any rule for it that denies makes the answer depend on arguments.
        return rules.iter().all(|r| allows(&r.action));
    }
    rules
        .iter()
        .any(|r| allows(&r.action) && (r.args.is_empty() || r.args == args))
}

/// Ok when `new` allows nothing `cur` denies (None: unconfined, so anything
/// is at least as strict). Conservative: argument conditions must match.
pub fn no_weaker(cur: Option<&api::LinuxSeccomp>, new: &api::LinuxSeccomp) -> Result<(), String> {
    if !new.listener_path.is_empty()
        || new.syscalls.iter().any(|r| r.action == "SCMP_ACT_NOTIFY")
        || new.default_action == "SCMP_ACT_NOTIFY"
    {
        return Err("it hands decisions to a user-space listener".into());
    }
    let Some(cur) = cur.filter(|c| !c.default_action.is_empty()) else {
        return Ok(());
    };
    if allows(&new.default_action) {
        if !allows(&cur.default_action) {
            return Err(format!(
                "its default action {} allows what the current default {} denies",
                new.default_action, cur.default_action
            ));
        }
        for r in cur.syscalls.iter().filter(|r| !allows(&r.action)) {
            for name in &r.names {
                let still_denied = new.syscalls.iter().any(|n| {
                    !allows(&n.action)
                        && n.names.iter().any(|x| x == name)
                        && (n.args.is_empty() || n.args == r.args)
                });
                if !still_denied {
                    return Err(format!("it allows {name}, which the current policy denies"));
                }
            }
        }
        return Ok(());
    }
    for r in new.syscalls.iter().filter(|r| allows(&r.action)) {
        for name in &r.names {
            if !cur_allows(cur, name, &r.args) {
                return Err(format!("it allows {name}, which the current policy denies"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A policy with `default` and one rule per (syscall, action).
    pub(in crate::nri) fn sc(default: &str, calls: &[(&str, &str)]) -> api::LinuxSeccomp {
        api::LinuxSeccomp {
            default_action: default.into(),
            syscalls: calls
                .iter()
                .map(|(n, a)| api::LinuxSyscall {
                    names: vec![n.to_string()],
                    action: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn seccomp_strictness() {
        let cur = sc(
            "SCMP_ACT_ERRNO",
            &[("read", "SCMP_ACT_ALLOW"), ("write", "SCMP_ACT_ALLOW")],
        );
        assert!(no_weaker(
            Some(&cur),
            &sc("SCMP_ACT_ERRNO", &[("read", "SCMP_ACT_ALLOW")])
        )
        .is_ok());
        assert!(no_weaker(
            Some(&cur),
            &sc("SCMP_ACT_ERRNO", &[("mount", "SCMP_ACT_ALLOW")])
        )
        .is_err());
        assert!(no_weaker(Some(&cur), &sc("SCMP_ACT_ALLOW", &[])).is_err());
        let open = sc("SCMP_ACT_ALLOW", &[("mount", "SCMP_ACT_ERRNO")]);
        assert!(no_weaker(
            Some(&open),
            &sc(
                "SCMP_ACT_ALLOW",
                &[("mount", "SCMP_ACT_ERRNO"), ("ptrace", "SCMP_ACT_ERRNO")]
            )
        )
        .is_ok());
        assert!(no_weaker(Some(&open), &sc("SCMP_ACT_ALLOW", &[])).is_err());
        assert!(no_weaker(None, &sc("SCMP_ACT_ALLOW", &[])).is_ok());
        let mut notify = sc("SCMP_ACT_ERRNO", &[]);
        notify.listener_path = "/tmp/x".into();
        assert!(no_weaker(None, &notify).is_err());
    }
}
