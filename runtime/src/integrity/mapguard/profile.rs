//! The map guard's seccomp rules, merged into a container's profile (see
//! the parent module for what the supervisor does with them).

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum MapGuardError {
    #[error("the seccomp profile {0}; an ima pod's profile may deny mmap, mprotect, pkey_mprotect, personality and shmat, or allow them outright, but not allow them under conditions of its own nor hand them to a tracer (imacri adds the conditions)")]
    Profile(String),
    #[error("building the seccomp profile: {0}")]
    Build(String),
    #[error("listening for seccomp notifications on {path}: {source}")]
    Listen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const MAP_ANONYMOUS: u64 = libc::MAP_ANONYMOUS as u64;
/// Set in MAP_SHARED and MAP_SHARED_VALIDATE, clear in MAP_PRIVATE.
const MAP_SHARED: u64 = libc::MAP_SHARED as u64;
const READ_IMPLIES_EXEC: u64 = 0x0040_0000;
const SHM_EXEC: u64 = 0o100000;
/// personality(0xffffffff) only queries the current persona.
pub(super) const PERSONALITY_QUERY: u64 = 0xffff_ffff;

/// The syscalls the guard takes over, with the argument (index, mask) whose
/// set bits make a call need imacri's answer.
const GUARDED: [(&str, u32, u64); 5] = [
    ("mmap", 2, PROT_EXEC),
    ("mprotect", 2, PROT_EXEC),
    ("pkey_mprotect", 2, PROT_EXEC),
    ("personality", 0, READ_IMPLIES_EXEC),
    ("shmat", 2, SHM_EXEC),
];

/// The calls imacri's init (`integrity::init`) restricts each process of the
/// pod with: allowed whatever the pod's profile says (Landlock only takes
/// rights away; without them no container of the pod could start).
const INIT_CALLS: [&str; 3] = [
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
];

#[cfg(target_arch = "x86_64")]
const NATIVE: Arch = Arch::ScmpArchX86_64;
#[cfg(target_arch = "aarch64")]
const NATIVE: Arch = Arch::ScmpArchAarch64;

fn masked(
    index: u32,
    mask: u64,
    value: u64,
) -> Result<oci_spec::runtime::LinuxSeccompArg, MapGuardError> {
    LinuxSeccompArgBuilder::default()
        .index(index as usize)
        .value(mask)
        .value_two(value)
        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
        .build()
        .map_err(|e| MapGuardError::Build(e.to_string()))
}

pub(super) fn rule(
    name: &str,
    action: LinuxSeccompAction,
    args: Vec<oci_spec::runtime::LinuxSeccompArg>,
) -> Result<LinuxSyscall, MapGuardError> {
    let mut r = LinuxSyscallBuilder::default()
        .names(vec![name.to_string()])
        .action(action)
        .build()
        .map_err(|e| MapGuardError::Build(e.to_string()))?;
    if !args.is_empty() {
        r.set_args(Some(args));
    }
    if action == LinuxSeccompAction::ScmpActErrno {
        r.set_errno_ret(Some(libc::EPERM as u32));
    }
    Ok(r)
}

pub(super) fn allows(a: LinuxSeccompAction) -> bool {
    matches!(
        a,
        LinuxSeccompAction::ScmpActAllow | LinuxSeccompAction::ScmpActLog
    )
}

/// A conditional allow rule the guard can keep: personality values that
/// cannot set READ_IMPLIES_EXEC (the runtime default's list).
fn harmless_personality(r: &LinuxSyscall) -> bool {
    r.args().iter().flatten().all(|a| {
        a.index() == 0
            && a.op() == LinuxSeccompOperator::ScmpCmpEq
            && (a.value() & READ_IMPLIES_EXEC == 0 || a.value() == PERSONALITY_QUERY)
    })
}

/// The container's seccomp profile with the guard's rules: `base` (None:
/// unconfined) keeps every decision it made, and the guarded calls it
/// allows go through imacri when they would make something executable.
/// `deny_anonymous`: the pod's policy denies executable memory no file
/// backs (`setting::AnonymousExec::Deny`): anonymous `mmap` with PROT_EXEC,
/// `userfaultfd` and ptrace's pokes are refused here; the map guard refuses
/// the rest (writable or written memory made executable) when asked.
pub fn guard_profile(
    base: Option<LinuxSeccomp>,
    listener: &Path,
    pod: &str,
    deny_anonymous: bool,
) -> Result<LinuxSeccomp, MapGuardError> {
    let mut p = match base {
        Some(p) => p,
        None => LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .build()
            .map_err(|e| MapGuardError::Build(e.to_string()))?,
    };
    if p.listener_path().is_some() {
        return Err(MapGuardError::Profile("has its own listenerPath".into()));
    }
    let default_allows = allows(p.default_action());
    let mut syscalls = p.syscalls().clone().unwrap_or_default();
    if p.default_action() == LinuxSeccompAction::ScmpActNotify
        || syscalls
            .iter()
            .any(|r| r.action() == LinuxSeccompAction::ScmpActNotify)
    {
        return Err(MapGuardError::Profile("uses SCMP_ACT_NOTIFY".into()));
    }
    // Per guarded call: denied by the profile outright (left alone), or
    // else taken over wherever the profile would let it run: by a rule
    // allowing it unconditionally, or by its default for the cases its own
    // rules leave (a rule denying only some cases decides only those:
    // until 2026-12-04 any mention left the call alone, and a default
    // allow let the rest through unguarded). A call handed to a tracer
    // (SCMP_ACT_TRACE) runs when the tracer resumes it, which no guard
    // could follow: refused.
    let traced = |name: &str| {
        MapGuardError::Profile(format!(
            "hands {name} to a tracer (SCMP_ACT_TRACE), which can let it run unmeasured"
        ))
    };
    let mut take_over = Vec::new();
    for (name, _, _) in GUARDED {
        let mut allowed = false;
        let mut denied = false;
        for r in syscalls.iter_mut() {
            if !r.names().iter().any(|n| n == name) {
                continue;
            }
            let conditional = r.args().as_ref().is_some_and(|a| !a.is_empty());
            if r.action() == LinuxSeccompAction::ScmpActTrace {
                return Err(traced(name));
            }
            if !allows(r.action()) {
                denied |= !conditional;
                continue;
            }
            if conditional {
                if name == "personality" && harmless_personality(r) {
                    continue;
                }
                return Err(MapGuardError::Profile(format!(
                    "allows {name} under conditions of its own"
                )));
            }
            allowed = true;
            let names: Vec<String> = r.names().iter().filter(|n| *n != name).cloned().collect();
            r.set_names(names);
        }
        if denied && !allowed {
            continue;
        }
        if !allowed && p.default_action() == LinuxSeccompAction::ScmpActTrace {
            return Err(traced(name));
        }
        if allowed || default_allows {
            take_over.push(name);
        }
    }
    for r in syscalls.iter_mut() {
        let names: Vec<String> = r
            .names()
            .iter()
            .filter(|n| !INIT_CALLS.contains(&n.as_str()))
            .cloned()
            .collect();
        r.set_names(names);
    }
    if deny_anonymous {
        super::anonymous::deny_calls(&mut syscalls, default_allows)?;
    }
    syscalls.retain(|r| !r.names().is_empty());
    if !default_allows {
        let mut r = rule(INIT_CALLS[0], LinuxSeccompAction::ScmpActAllow, vec![])?;
        r.set_names(INIT_CALLS.map(String::from).to_vec());
        syscalls.push(r);
    }
    for (name, index, mask) in GUARDED {
        if !take_over.contains(&name) {
            continue;
        }
        let guarded = if name == "shmat" {
            LinuxSeccompAction::ScmpActErrno
        } else {
            LinuxSeccompAction::ScmpActNotify
        };
        let mut args = vec![masked(index, mask, mask)?];
        if name == "mmap" {
            args.push(masked(3, MAP_ANONYMOUS, 0)?);
        }
        syscalls.push(rule(name, guarded, args)?);
        if name == "mmap" && deny_anonymous {
            // Anonymous memory made executable: no file, nothing to measure.
            let anonymous = vec![
                masked(2, PROT_EXEC, PROT_EXEC)?,
                masked(3, MAP_ANONYMOUS, MAP_ANONYMOUS)?,
            ];
            syscalls.push(rule(name, LinuxSeccompAction::ScmpActErrno, anonymous)?);
        }
        if name == "mmap" {
            // A shared mapping of a file, whatever its protection (one
            // made read-only of a writable file can be made writable):
            // see `fanotify/held.rs`.
            let shared = masked(3, MAP_SHARED | MAP_ANONYMOUS, MAP_SHARED)?;
            syscalls.push(rule(name, guarded, vec![shared])?);
        }
        if !default_allows {
            // What the rules above do not take, and nothing else (libseccomp
            // wants rules of different actions that never both match).
            let mut rest = vec![masked(index, mask, 0)?];
            if name == "mmap" {
                rest.push(masked(3, MAP_SHARED, 0)?);
            }
            syscalls.push(rule(name, LinuxSeccompAction::ScmpActAllow, rest)?);
            if name == "mmap" {
                let mut anonymous = vec![masked(3, MAP_ANONYMOUS, MAP_ANONYMOUS)?];
                if deny_anonymous {
                    anonymous.push(masked(2, PROT_EXEC, 0)?);
                }
                syscalls.push(rule(name, LinuxSeccompAction::ScmpActAllow, anonymous)?);
            }
        }
    }
    p.set_syscalls(Some(syscalls));
    p.set_architectures(Some(vec![NATIVE]));
    p.set_listener_path(Some(listener.to_path_buf()));
    p.set_listener_metadata(Some(pod.to_string()));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &LinuxSeccomp, action: LinuxSeccompAction) -> Vec<String> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == action)
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn unconfined_gets_an_allow_all_profile_with_the_guard() {
        let p = guard_profile(None, Path::new("/run/x.sock"), "pod1", false).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(
            names(&p, LinuxSeccompAction::ScmpActNotify),
            ["mmap", "mmap", "mprotect", "pkey_mprotect", "personality"]
        );
        assert_eq!(names(&p, LinuxSeccompAction::ScmpActErrno), ["shmat"]);
        // Under a default allow no allow rule is needed (runc rejects them).
        assert!(names(&p, LinuxSeccompAction::ScmpActAllow).is_empty());
        let mmap = p
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names()[0] == "mmap")
            .unwrap();
        let a = mmap.args().clone().unwrap();
        assert_eq!(
            (a[0].index(), a[0].value(), a[0].value_two()),
            (2, 4, Some(4))
        );
        assert_eq!(
            (a[1].index(), a[1].value(), a[1].value_two()),
            (3, 0x20, Some(0))
        );
        // And every shared mapping of a file, whatever its protection.
        let shared = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.names()[0] == "mmap")
            .nth(1)
            .unwrap();
        let a = shared.args().clone().unwrap();
        assert_eq!(
            (a.len(), a[0].index(), a[0].value(), a[0].value_two()),
            (1, 3, 0x21, Some(0x01))
        );
        assert_eq!(p.architectures().clone().unwrap(), vec![NATIVE]);
        assert_eq!(p.listener_path().clone().unwrap(), Path::new("/run/x.sock"));
        assert_eq!(p.listener_metadata().as_deref(), Some("pod1"));
    }

    #[test]
    fn runtime_default_keeps_its_decisions() {
        let base = crate::seccomp::runtime_default(&Default::default()).unwrap();
        let p = guard_profile(Some(base), Path::new("/s"), "p", false).unwrap();
        // mmap and friends move from the big allow rule to split rules.
        let allow_rules: Vec<&LinuxSyscall> = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
            .collect();
        let unconditional: Vec<&String> = allow_rules
            .iter()
            .filter(|r| r.args().as_ref().is_none_or(|a| a.is_empty()))
            .flat_map(|r| r.names())
            .collect();
        for g in ["mmap", "mprotect", "pkey_mprotect", "shmat"] {
            assert!(
                !unconditional.iter().any(|n| *n == g),
                "{g} still unconditional"
            );
            assert!(allow_rules
                .iter()
                .any(|r| r.names()[0] == g && r.args().is_some()));
        }
        // The default's personality values cannot set READ_IMPLIES_EXEC: kept.
        assert!(!names(&p, LinuxSeccompAction::ScmpActNotify).contains(&"personality".to_string()));
        assert!(names(&p, LinuxSeccompAction::ScmpActNotify).contains(&"mprotect".to_string()));
    }

    #[test]
    fn profiles_the_guard_cannot_combine_with_are_refused() {
        let conditional = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActErrno)
            .syscalls(vec![rule(
                "mmap",
                LinuxSeccompAction::ScmpActAllow,
                vec![masked(2, 1, 1).unwrap()],
            )
            .unwrap()])
            .build()
            .unwrap();
        let e = guard_profile(Some(conditional), Path::new("/s"), "p", false).unwrap_err();
        assert!(e.to_string().contains("mmap"), "{e}");
        // A profile that denies mmap outright keeps denying it.
        let denied = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![
                rule("mmap", LinuxSeccompAction::ScmpActErrno, vec![]).unwrap()
            ])
            .build()
            .unwrap();
        let p = guard_profile(Some(denied), Path::new("/s"), "p", false).unwrap();
        assert!(!names(&p, LinuxSeccompAction::ScmpActNotify).contains(&"mmap".to_string()));
        // A tracer resumes what it is handed: by a rule or by the default.
        let traced = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![rule(
                "mprotect",
                LinuxSeccompAction::ScmpActTrace,
                vec![masked(2, 4, 4).unwrap()],
            )
            .unwrap()])
            .build()
            .unwrap();
        let e = guard_profile(Some(traced), Path::new("/s"), "p", false).unwrap_err();
        assert!(
            e.to_string().contains("mprotect") && e.to_string().contains("SCMP_ACT_TRACE"),
            "{e}"
        );
        let trace_default = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActTrace)
            .build()
            .unwrap();
        let e = guard_profile(Some(trace_default), Path::new("/s"), "p", false).unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_TRACE"), "{e}");
        let notify_default = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActNotify)
            .build()
            .unwrap();
        let e = guard_profile(Some(notify_default), Path::new("/s"), "p", false).unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    }

    /// A rule denying a guarded call in some cases decides only those; the
    /// rest, left to a default allow, is taken over.
    #[test]
    fn calls_denied_only_in_some_cases_are_guarded_in_the_others() {
        let partial = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![
                rule(
                    "mmap",
                    LinuxSeccompAction::ScmpActErrno,
                    vec![masked(3, 0x40000, 0x40000).unwrap()],
                )
                .unwrap(),
                rule(
                    "personality",
                    LinuxSeccompAction::ScmpActAllow,
                    vec![LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(0u64)
                        .op(LinuxSeccompOperator::ScmpCmpEq)
                        .build()
                        .unwrap()],
                )
                .unwrap(),
            ])
            .build()
            .unwrap();
        let p = guard_profile(Some(partial), Path::new("/s"), "p", false).unwrap();
        let notified = names(&p, LinuxSeccompAction::ScmpActNotify);
        for g in ["mmap", "mprotect", "pkey_mprotect", "personality"] {
            assert!(notified.contains(&g.to_string()), "{g}: {notified:?}");
        }
        // Its own decision stands.
        assert!(names(&p, LinuxSeccompAction::ScmpActErrno).contains(&"mmap".to_string()));
        // Under a default deny the rest is denied: left alone.
        let strict = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActErrno)
            .syscalls(vec![rule(
                "mprotect",
                LinuxSeccompAction::ScmpActKillProcess,
                vec![masked(2, 8, 8).unwrap()],
            )
            .unwrap()])
            .build()
            .unwrap();
        let p = guard_profile(Some(strict), Path::new("/s"), "p", false).unwrap();
        assert!(!names(&p, LinuxSeccompAction::ScmpActNotify).contains(&"mprotect".to_string()));
    }

    #[test]
    fn the_inits_landlock_calls_are_allowed_by_every_profile() {
        let init: Vec<String> = INIT_CALLS.map(String::from).to_vec();
        // A deny-by-default profile that never heard of Landlock.
        let strict = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActErrno)
            .syscalls(vec![
                rule("read", LinuxSeccompAction::ScmpActAllow, vec![]).unwrap()
            ])
            .build()
            .unwrap();
        let p = guard_profile(Some(strict), Path::new("/s"), "p", false).unwrap();
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        assert!(init.iter().all(|c| allowed.contains(c)), "{allowed:?}");
        // One that denies it outright under a default allow: the denial goes
        // (and no allow rule is added, which runc would reject).
        let denying = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![rule(
                "landlock_restrict_self",
                LinuxSeccompAction::ScmpActErrno,
                vec![],
            )
            .unwrap()])
            .build()
            .unwrap();
        let p = guard_profile(Some(denying), Path::new("/s"), "p", false).unwrap();
        let mentioned: Vec<String> = p
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names().clone())
            .collect();
        assert!(!mentioned.iter().any(|n| init.contains(n)), "{mentioned:?}");
        // RuntimeDefault lists them already: listed once.
        let base = crate::seccomp::runtime_default(&Default::default()).unwrap();
        let p = guard_profile(Some(base), Path::new("/s"), "p", false).unwrap();
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        for c in &init {
            assert_eq!(allowed.iter().filter(|n| *n == c).count(), 1, "{c}");
        }
    }
}
