//! The UTS and IPC namespaces of a pod without a pause process, pinned as
//! bind mounts under `<state>/podns/<id>-{uts,ipc}` (as CRI-O's pinns does
//! for its infra-less pods): made, named and given the pod's sysctls on a
//! throwaway thread, so they outlive it and containers join them by path.

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What a pod's containers join.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pinned {
    /// None: the host's (hostNetwork pods keep the node's hostname).
    pub uts: Option<PathBuf>,
    /// None: the host's (hostIPC).
    pub ipc: Option<PathBuf>,
}

/// The pod's request.
pub struct Request<'a> {
    pub dir: &'a Path,
    pub id: &'a str,
    /// Some: a UTS namespace of its own with this hostname.
    pub hostname: Option<&'a str>,
    pub ipc: bool,
    /// The pod's network namespace (None: the host's), where `net.*`
    /// sysctls are written.
    pub netns: Option<&'a Path>,
    /// The pod's user namespace: the UTS and IPC namespaces are made inside
    /// it (owned by it, as pause's would be), so its containers can join
    /// them after joining it.
    pub userns: Option<&'a Path>,
    pub sysctls: &'a HashMap<String, String>,
}

/// Which namespace a sysctl lives in; as runc decides (a sysctl in none of
/// the pod's own namespaces would change the node).
fn sysctl_namespace(key: &str, r: &Request<'_>) -> Result<()> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let refuse = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "linux.sysctls {key:?}: {why}"
        )))
    };
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        return if r.ipc {
            Ok(())
        } else {
            refuse("not allowed in the host's IPC namespace")
        };
    }
    if key.starts_with("net.") {
        return if r.netns.is_some() {
            Ok(())
        } else {
            refuse("not allowed in the host's network namespace")
        };
    }
    if r.hostname.is_some() {
        match key {
            "kernel.domainname" => return Ok(()),
            "kernel.hostname" => return refuse("conflicts with the pod's hostname"),
            _ => {}
        }
    }
    refuse("not in a namespace of the pod's own")
}

/// Checks the pod's sysctls without making anything.
pub fn validate(r: &Request<'_>) -> Result<()> {
    for k in r.sysctls.keys() {
        sysctl_namespace(k, r)?;
    }
    Ok(())
}

fn pin_path(r: &Request<'_>, kind: &str) -> PathBuf {
    r.dir.join(format!("{}-{kind}", r.id))
}

/// Where [`create`] pins the namespaces (recorded before they exist, so a
/// rollback finds them).
pub fn planned(r: &Request<'_>) -> Pinned {
    Pinned {
        uts: r.hostname.map(|_| pin_path(r, "uts")),
        ipc: r.ipc.then(|| pin_path(r, "ipc")),
    }
}

/// Makes and pins the pod's UTS and IPC namespaces (those it asks for),
/// sets its hostname and writes its sysctls in them (and `net.*` in its
/// network namespace). Nothing is left behind on failure.
pub fn create(r: &Request<'_>) -> Result<Pinned> {
    validate(r)?;
    std::fs::create_dir_all(r.dir).map_err(|e| Error::io("creating", r.dir, e))?;
    let pinned = planned(r);
    if let Err(e) = make(r, &pinned) {
        let _ = remove(&pinned);
        return Err(e);
    }
    Ok(pinned)
}

fn make(r: &Request<'_>, pinned: &Pinned) -> Result<()> {
    for p in [&pinned.uts, &pinned.ipc].into_iter().flatten() {
        std::fs::File::create(p).map_err(|e| Error::io("creating", p, e))?;
    }
    let netns = match r.netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|e| Error::io("opening", p, e))?),
        None => None,
    };
    let hostname = r.hostname.map(str::to_string);
    let sysctls: Vec<(String, String)> = r
        .sysctls
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(userns) = r.userns {
        return create_in_userns(userns, netns.as_ref(), &hostname, &sysctls, pinned);
    }
    let target = pinned.clone();
    // setns and unshare change only the calling thread: a throwaway one, so
    // no runtime thread ends up in the pod's namespaces.
    std::thread::spawn(move || -> Result<()> {
        let ns = |what: &'static str, e: nix::Error| Error::io(what, "pod namespaces", e.into());
        if let Some(f) = &netns {
            setns(f, CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns("joining the network namespace", e))?;
        }
        let mut flags = CloneFlags::empty();
        if target.uts.is_some() {
            flags |= CloneFlags::CLONE_NEWUTS;
        }
        if target.ipc.is_some() {
            flags |= CloneFlags::CLONE_NEWIPC;
        }
        unshare(flags).map_err(|e| ns("unsharing UTS/IPC", e))?;
        if let Some(h) = &hostname {
            nix::unistd::sethostname(h).map_err(|e| ns("setting the hostname", e))?;
        }
        // /proc/sys resolves in the writing thread's namespaces.
        for (k, v) in &sysctls {
            let p = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
            std::fs::write(&p, v)
                .map_err(|e| Error::InvalidArgument(format!("linux.sysctls {k:?} = {v:?}: {e}")))?;
        }
        pin_all(&target, "/proc/thread-self")
    })
    .join()
    .map_err(|_| Error::Internal("pod namespace thread panicked".into()))?
}

/// A user namespace can only be joined by a single-threaded process: a
/// forked helper joins it (and the pod's netns), makes the UTS and IPC
/// namespaces, names the pod and writes its sysctls, with raw syscalls on
/// what was prepared before the fork; imacri pins its namespaces.
fn create_in_userns(
    userns: &Path,
    netns: Option<&std::fs::File>,
    hostname: &Option<String>,
    sysctls: &[(String, String)],
    target: &Pinned,
) -> Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    let user = std::fs::File::open(userns).map_err(|e| Error::io("opening", userns, e))?;
    let cstr = |s: String| {
        CString::new(s).map_err(|_| Error::InvalidArgument("NUL in a sysctl or hostname".into()))
    };
    let writes: Vec<(CString, Vec<u8>)> = sysctls
        .iter()
        .map(|(k, v)| {
            Ok((
                cstr(format!("/proc/sys/{}", k.replace('.', "/")))?,
                v.as_bytes().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let host = hostname.clone().unwrap_or_default().into_bytes();
    let mut flags = 0;
    if target.uts.is_some() {
        flags |= libc::CLONE_NEWUTS;
    }
    if target.ipc.is_some() {
        flags |= libc::CLONE_NEWIPC;
    }
    let (user_fd, net_fd) = (user.as_raw_fd(), netns.map(|f| f.as_raw_fd()));
    let want_hostname = hostname.is_some();
    crate::userns::with_child(
        // Raw syscalls only: no allocation after fork.
        || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(nix::Error::last())
                } else {
                    Ok(())
                }
            };
            // SAFETY: plain syscalls on fds and buffers made before fork.
            unsafe {
                check(libc::setns(user_fd, libc::CLONE_NEWUSER))?;
                // The pod's root: IPC sysctls are writable by their
                // namespace's root uid alone (capabilities in the pod's user
                // namespace are kept: the uid becomes that namespace's 0).
                check(libc::setresgid(0, 0, 0))?;
                check(libc::setresuid(0, 0, 0))?;
                if let Some(fd) = net_fd {
                    check(libc::setns(fd, libc::CLONE_NEWNET))?;
                }
                check(libc::unshare(flags))?;
                if want_hostname {
                    check(libc::sethostname(host.as_ptr().cast(), host.len()))?;
                }
                for (path, value) in &writes {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    check(fd)?;
                    let n = libc::write(fd, value.as_ptr().cast(), value.len());
                    libc::close(fd);
                    if n < 0 {
                        return Err(nix::Error::last());
                    }
                }
            }
            Ok(())
        },
        |pid| pin_all(target, &format!("/proc/{pid}")),
    )
    .map_err(|e| match e {
        Error::Internal(m) if m.contains("helper process failed") => Error::InvalidArgument(
            format!("the pod's hostname or sysctls could not be set in its namespaces ({m})"),
        ),
        e => e,
    })
}

/// Bind-mounts the UTS and IPC namespaces of `proc` (a /proc task
/// directory) onto the pins that exist in `target`.
fn pin_all(target: &Pinned, proc: &str) -> Result<()> {
    for (kind, p) in [("uts", &target.uts), ("ipc", &target.ipc)] {
        if let Some(p) = p {
            let src = format!("{proc}/ns/{kind}");
            mount(
                Some(src.as_str()),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::io("pinning", p, e.into()))?;
        }
    }
    Ok(())
}

/// Unpins and removes the pod's namespaces; missing ones are fine.
pub fn remove(p: &Pinned) -> Result<()> {
    for path in [&p.uts, &p.ipc].into_iter().flatten() {
        crate::netns::remove(path)?;
    }
    Ok(())
}

/// Whether the pins are still there (they are gone after a reboot).
pub fn exists(p: &Pinned) -> bool {
    [&p.uts, &p.ipc]
        .into_iter()
        .flatten()
        .all(|path| is_pinned(path))
}

/// A namespace file bind-mounted there (nsfs), not the empty file under it.
fn is_pinned(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        sysctls: &'a HashMap<String, String>,
        host_net: bool,
        ipc: bool,
        uts: bool,
    ) -> Request<'a> {
        Request {
            dir: Path::new("/nonexistent"),
            id: "p",
            hostname: uts.then_some("pod"),
            ipc,
            netns: (!host_net).then(|| Path::new("/run/netns/p")),
            userns: None,
            sysctls,
        }
    }

    /// Pinned, named and with its sysctl; and a value the kernel refuses
    /// leaves no pin behind (needs root, as imacri; skipped otherwise).
    #[test]
    fn pins_hold_the_pods_namespaces_and_failures_leave_none() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let ok = HashMap::from([("kernel.shm_rmid_forced".to_string(), "1".to_string())]);
        let r = Request {
            dir: d.path(),
            id: "p",
            hostname: Some("pinned-pod"),
            ipc: true,
            netns: None,
            userns: None,
            sysctls: &ok,
        };
        let p = create(&r).unwrap();
        assert!(exists(&p));
        let host = std::fs::read_link("/proc/self/ns/uts").unwrap();
        let f = std::fs::File::open(p.uts.as_ref().unwrap()).unwrap();
        let name = std::thread::spawn(move || {
            setns(&f, CloneFlags::CLONE_NEWUTS).unwrap();
            let own = std::fs::read_link("/proc/thread-self/ns/uts").unwrap();
            (nix::unistd::gethostname().unwrap(), own)
        })
        .join()
        .unwrap();
        assert_eq!(name.0, "pinned-pod");
        assert_ne!(name.1, host);
        remove(&p).unwrap();
        assert!(!p.uts.as_ref().unwrap().exists() && !p.ipc.as_ref().unwrap().exists());

        let bad = HashMap::from([("kernel.shm_rmid_forced".to_string(), "x".to_string())]);
        let e = create(&Request { sysctls: &bad, ..r }).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "pins left");
    }

    #[test]
    fn sysctls_go_where_runc_puts_them() {
        let s = |k: &str| HashMap::from([(k.to_string(), "1".to_string())]);
        let ok = |k: &str, host_net, ipc, uts| validate(&req(&s(k), host_net, ipc, uts)).is_ok();
        assert!(ok("net.ipv4.ip_forward", false, true, true));
        assert!(!ok("net.ipv4.ip_forward", true, true, false));
        assert!(ok("kernel.shm_rmid_forced", false, true, true));
        assert!(ok("fs.mqueue.msg_max", false, true, true));
        assert!(!ok("kernel.shm_rmid_forced", false, false, true));
        assert!(ok("kernel.domainname", false, true, true));
        assert!(!ok("kernel.hostname", false, true, true));
        assert!(!ok("kernel.domainname", true, true, false));
        assert!(!ok("vm.swappiness", false, true, true));
        let e = validate(&req(&s("vm.swappiness"), false, true, true)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}
