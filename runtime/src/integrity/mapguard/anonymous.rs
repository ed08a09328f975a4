//! Executable memory no file backs, where the pod's policy denies it
//! (`setting::AnonymousExec::Deny`; SELinux's execmem and execmod): what
//! the seccomp filter refuses outright ([`deny_calls`]; the anonymous
//! `mmap` rule sits with the other mmap rules in `profile.rs`) and what the
//! map guard looks at when an `mprotect` asks for PROT_EXEC ([`unbacked`]).

use oci_spec::runtime::{
    LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};

use super::profile::{allows, rule, MapGuardError};
use crate::integrity::sys::SysError;

/// `ptrace` requests that write another process's memory (FOLL_FORCE: its
/// code pages too), refused where the policy denies anonymous executable
/// memory.
const PTRACE_POKETEXT: u64 = 4;
const PTRACE_POKEDATA: u64 = 5;

fn compared(
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
) -> Result<oci_spec::runtime::LinuxSeccompArg, MapGuardError> {
    LinuxSeccompArgBuilder::default()
        .index(index as usize)
        .value(value)
        .op(op)
        .build()
        .map_err(|e| MapGuardError::Build(e.to_string()))
}

/// Where the policy denies anonymous executable memory: `userfaultfd`
/// refused (it fills the pages of an executable private mapping of a
/// memfd or tmpfs file with what its caller chooses), and ptrace's pokes
/// (written with FOLL_FORCE, into code pages too), wherever the profile
/// would let them run. A profile that allows ptrace only under conditions
/// of its own is refused, as for the guarded calls.
pub(super) fn deny_calls(
    syscalls: &mut Vec<LinuxSyscall>,
    default_allows: bool,
) -> Result<(), MapGuardError> {
    let mut ptrace_allowed = default_allows;
    for r in syscalls.iter_mut() {
        if !r
            .names()
            .iter()
            .any(|n| n == "ptrace" || n == "userfaultfd")
        {
            continue;
        }
        let conditional = r.args().as_ref().is_some_and(|a| !a.is_empty());
        if r.names().iter().any(|n| n == "ptrace") {
            if conditional || r.action() == LinuxSeccompAction::ScmpActTrace {
                return Err(MapGuardError::Profile(
                    "allows ptrace under conditions of its own (or hands it to a tracer),                      while the pod's policy denies anonymous executable memory"
                        .into(),
                ));
            }
            ptrace_allowed = allows(r.action());
        }
        if allows(r.action()) || r.action() == LinuxSeccompAction::ScmpActTrace {
            let names = r
                .names()
                .iter()
                .filter(|n| *n != "ptrace" && *n != "userfaultfd")
                .cloned()
                .collect();
            r.set_names(names);
        }
    }
    let mut added = Vec::new();
    if default_allows {
        added.push(rule(
            "userfaultfd",
            LinuxSeccompAction::ScmpActErrno,
            vec![],
        )?);
    }
    if ptrace_allowed {
        use LinuxSeccompOperator::{ScmpCmpEq, ScmpCmpGt, ScmpCmpLt};
        for poke in [PTRACE_POKETEXT, PTRACE_POKEDATA] {
            let args = vec![compared(0, ScmpCmpEq, poke)?];
            added.push(rule("ptrace", LinuxSeccompAction::ScmpActErrno, args)?);
        }
        if !default_allows {
            for (op, v) in [(ScmpCmpLt, PTRACE_POKETEXT), (ScmpCmpGt, PTRACE_POKEDATA)] {
                let args = vec![compared(0, op, v)?];
                added.push(rule("ptrace", LinuxSeccompAction::ScmpActAllow, args)?);
            }
        }
    }
    syscalls.extend(added);
    Ok(())
}

/// The misc device that hands out userfaultfds to whoever may open it
/// (`/dev/userfaultfd`, Linux >= 6.1): (major, minor), from /proc/misc, so
/// a node that names it otherwise is not missed. A container given it
/// would not need the refused system call.
pub fn userfaultfd_device() -> Option<(i64, i64)> {
    const MISC_MAJOR: i64 = 10;
    let misc = std::fs::read_to_string("/proc/misc").ok()?;
    misc.lines().find_map(|l| {
        let (minor, name) = l.trim().split_once(' ')?;
        (name.trim() == "userfaultfd")
            .then(|| minor.parse().ok())
            .flatten()
            .map(|m| (MISC_MAJOR, m))
    })
}

/// Where the pod's policy denies anonymous executable memory: why part of
/// `[addr, addr+len)` of task `pid` is not a file's own content, or None.
/// Anonymous memory has no `map_files` link; a file's VMA with anonymous
/// pages holds copies the process wrote (a private mapping written, by the
/// process or through FOLL_FORCE, or filled by userfaultfd: SELinux's
/// execmod), which no measurement of the file covers.
pub(super) fn unbacked(pid: u32, addr: u64, len: u64) -> Result<Option<String>, SysError> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| SysError::io(format!("reading /proc/{pid}/smaps"), e))?;
    let end = addr.saturating_add(len.max(1));
    // The file of the VMA whose fields are being read, if it is in range.
    let mut file: Option<String> = None;
    for line in smaps.lines() {
        if let Some((range, s, e, perms)) = vma_header(line) {
            file = None;
            if s >= end || e <= addr {
                continue;
            }
            let link = format!("/proc/{pid}/map_files/{range}");
            let name = match std::fs::read_link(&link) {
                Ok(p) => p.to_string_lossy().into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Some("anonymous memory".into()));
                }
                Err(e) => return Err(SysError::io(format!("reading {link}"), e)),
            };
            // Writable until now: another process of the pod could write
            // it (process_vm_writev, /proc/<pid>/mem) between this look
            // and the call. Made read-only first, nobody can.
            if perms.contains('w') {
                return Ok(Some(format!("{name} mapped writable until now")));
            }
            file = Some(name);
            continue;
        }
        if let (Some(f), Some(v)) = (&file, line.strip_prefix("Anonymous:")) {
            let kb = v.trim().trim_end_matches("kB").trim().parse::<u64>();
            if kb.map_or(true, |kb| kb > 0) {
                return Ok(Some(format!("pages of {f} written since they were mapped")));
            }
        }
    }
    Ok(None)
}

/// A maps/smaps line that starts a VMA: its range, start, end and
/// permissions.
fn vma_header(line: &str) -> Option<(&str, u64, u64, &str)> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    let perms = f.next()?;
    let (s, e) = range.split_once('-')?;
    Some((
        range,
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(e, 16).ok()?,
        perms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::mapguard::guard_profile;
    use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompBuilder};
    use std::path::Path;

    #[test]
    fn vma_headers_are_told_from_fields() {
        assert_eq!(
            vma_header("00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/x"),
            Some(("00400000-00452000", 0x400000, 0x452000, "r-xp"))
        );
        assert_eq!(vma_header("Anonymous:             4 kB"), None);
    }

    /// A policy denying anonymous executable memory: anonymous executable
    /// mmaps, userfaultfd and ptrace's pokes are refused by the filter,
    /// unconfined and under RuntimeDefault, and nothing else of ptrace.
    #[test]
    fn anonymous_exec_denied_in_the_filter() {
        let rules_of =
            |p: &LinuxSeccomp, name: &str, action| -> Vec<Vec<(usize, u64, Option<u64>)>> {
                p.syscalls()
                    .iter()
                    .flatten()
                    .filter(|r| r.action() == action && r.names().iter().any(|n| n == name))
                    .map(|r| {
                        r.args()
                            .iter()
                            .flatten()
                            .map(|a| (a.index(), a.value(), a.value_two()))
                            .collect()
                    })
                    .collect()
            };
        let errno = LinuxSeccompAction::ScmpActErrno;
        let allow = LinuxSeccompAction::ScmpActAllow;
        let p = guard_profile(None, Path::new("/s"), "p", true).unwrap();
        let anon_exec = vec![(2, 4, Some(4)), (3, 0x20, Some(0x20))];
        assert!(rules_of(&p, "mmap", errno).contains(&anon_exec));
        assert_eq!(rules_of(&p, "userfaultfd", errno), vec![vec![]]);
        assert_eq!(
            rules_of(&p, "ptrace", errno),
            vec![vec![(0, 4, None)], vec![(0, 5, None)]]
        );
        // Without the policy none of it.
        let plain = guard_profile(None, Path::new("/s"), "p", false).unwrap();
        assert!(!rules_of(&plain, "mmap", errno).contains(&anon_exec));
        assert!(rules_of(&plain, "ptrace", errno).is_empty());
        // RuntimeDefault (default errno) allows neither userfaultfd nor
        // ptrace (without CAP_SYS_PTRACE, which ima pods are refused): still
        // none; an anonymous mmap is allowed only without PROT_EXEC.
        let base = crate::seccomp::runtime_default(&Default::default()).unwrap();
        let p = guard_profile(Some(base), Path::new("/s"), "p", true).unwrap();
        let unconditional: Vec<String> = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == allow && r.args().iter().flatten().next().is_none())
            .flat_map(|r| r.names().clone())
            .collect();
        assert!(!unconditional
            .iter()
            .any(|n| n == "ptrace" || n == "userfaultfd"));
        assert!(rules_of(&p, "userfaultfd", allow).is_empty());
        assert!(rules_of(&p, "ptrace", allow).is_empty());
        // A default-deny profile that allows ptrace: every request but the
        // pokes.
        let mut base = crate::seccomp::runtime_default(&Default::default()).unwrap();
        let mut calls = base.syscalls().clone().unwrap();
        calls.push(rule("ptrace", allow, vec![]).unwrap());
        base.set_syscalls(Some(calls));
        let q = guard_profile(Some(base), Path::new("/s"), "p", true).unwrap();
        assert_eq!(
            rules_of(&q, "ptrace", allow),
            vec![vec![(0, 4, None)], vec![(0, 5, None)]]
        );
        assert_eq!(rules_of(&q, "ptrace", errno).len(), 2);
        assert!(rules_of(&p, "mmap", allow).contains(&vec![(3, 0x20, Some(0x20)), (2, 4, Some(0))]));
        assert!(rules_of(&p, "mmap", errno).contains(&anon_exec));
        // A profile allowing ptrace under conditions of its own is refused.
        let conditional = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![rule(
                "ptrace",
                allow,
                vec![compared(0, LinuxSeccompOperator::ScmpCmpEq, 0).unwrap()],
            )
            .unwrap()])
            .build()
            .unwrap();
        assert!(guard_profile(Some(conditional), Path::new("/s"), "p", true).is_err());
    }
}
