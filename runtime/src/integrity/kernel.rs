//! The kernel backend: IMA namespaces as in the v14+ patch series (in no
//! mainline kernel), files under a securityfs mounted inside the pod's user
//! namespace. Everything but the probe takes the `ima` directory as a
//! parameter, so it is unit-tested on a directory tree laid out like the
//! kernel's.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What a pod's IMA namespace is set up with.
#[derive(Debug, Clone, Default)]
pub struct Activation<'a> {
    /// e.g. "sha256"; None keeps the kernel default.
    pub hash: Option<&'a str>,
    /// e.g. "ima-ng"; None keeps the kernel default.
    pub template: Option<&'a str>,
    /// Rendered policy rules.
    pub policy: &'a str,
}

fn write(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => Error::FailedPrecondition(format!(
            "{}: the IMA namespace is already active",
            path.display()
        )),
        _ => Error::io("writing", path, e),
    })
}

/// True once `active` reads 1.
pub fn is_active(ima: &Path) -> Result<bool> {
    match std::fs::read_to_string(ima.join("active")) {
        Ok(s) => Ok(s.trim() == "1"),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::FailedPrecondition(format!(
            "{} has no `active` file: no IMA namespace support",
            ima.display()
        ))),
        Err(e) => Err(Error::io("reading", ima.join("active"), e)),
    }
}

/// Configures and activates the namespace: hash and template first (they are
/// fixed at activation), then `1` to `active`, then the policy. Activating
/// twice is EBUSY in the kernel and an error here.
pub fn activate(ima: &Path, a: &Activation<'_>) -> Result<()> {
    if is_active(ima)? {
        return Err(Error::FailedPrecondition(format!(
            "{}: the IMA namespace is already active (EBUSY)",
            ima.display()
        )));
    }
    if let Some(h) = a.hash {
        write(&ima.join("hash"), h)?;
    }
    if let Some(t) = a.template {
        write(&ima.join("template_name"), t)?;
    }
    write(&ima.join("active"), "1")?;
    write(&ima.join("policy"), a.policy)
}

/// One line of `ascii_runtime_measurements`.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub pcr: u32,
    pub template_hash: String,
    pub template: String,
    pub file_hash: String,
    pub path: String,
}

pub fn parse_measurements(text: &str) -> Result<Vec<Measurement>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, ' ').collect();
            if f.len() < 5 {
                return Err(Error::Internal(format!("bad measurement line {l:?}")));
            }
            Ok(Measurement {
                pcr: f[0]
                    .parse()
                    .map_err(|_| Error::Internal(format!("bad PCR in {l:?}")))?,
                template_hash: f[1].to_string(),
                template: f[2].to_string(),
                file_hash: f[3].to_string(),
                path: f[4].to_string(),
            })
        })
        .collect()
}

/// The pod's measurement log and counters.
pub fn read_log(ima: &Path) -> Result<(Vec<Measurement>, u64, u64)> {
    let read = |f: &str| {
        std::fs::read_to_string(ima.join(f)).map_err(|e| Error::io("reading", ima.join(f), e))
    };
    let log = parse_measurements(&read("ascii_runtime_measurements")?)?;
    let count = read("runtime_measurements_count")?
        .trim()
        .parse()
        .unwrap_or(0);
    let violations = read("violations")?.trim().parse().unwrap_or(0);
    Ok((log, count, violations))
}

/// Activates the IMA namespace of the user namespace pinned at `userns`, from
/// this process: join it, mount securityfs privately, write the files.
/// Must run single-threaded (setns into a user namespace requires it): the
/// daemon runs it in a helper process (`imacri internal ima-activate`).
pub fn activate_in_userns(userns: &Path, a: &Activation<'_>) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    use nix::sched::setns;
    let f = std::fs::File::open(userns).map_err(|e| Error::io("opening", userns, e))?;
    setns(&f, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| Error::io("joining user namespace", userns, e.into()))?;
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::Internal(format!("unshare mount ns: {e}")))?;
    private_mounts().map_err(|e| Error::Internal(format!("making mounts private: {e}")))?;
    let dir = std::env::temp_dir().join(format!("imacri-securityfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    mount(
        Some("securityfs"),
        &dir,
        Some("securityfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        Error::FailedPrecondition(format!(
            "mounting securityfs in the pod's user namespace: {e}: no IMA namespace support"
        ))
    })?;
    let res = activate(&dir.join("ima"), a);
    let _ = umount2(&dir, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&dir);
    res
}

/// Makes every mount of this (new) mount namespace private, so what is
/// mounted next never propagates to the host.
fn private_mounts() -> nix::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// Whether a fresh user namespace can mount securityfs with `ima/active`
/// (the IMA-namespace kernel series). Err carries the reason it cannot.
pub fn probe() -> std::result::Result<(), String> {
    let dir = tempfile_dir().map_err(|e| format!("creating a probe directory: {e}"))?;
    let target = dir.clone();
    // Built before fork: the child must not allocate.
    let active =
        std::ffi::CString::new(dir.join("ima/active").into_os_string().into_encoded_bytes())
            .map_err(|_| "probe path has a NUL byte".to_string())?;
    let mut outcome = Err("probe did not run".to_string());
    let res = crate::userns::with_child(
        || {
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
            private_mounts()?;
            mount(
                Some("securityfs"),
                &target,
                Some("securityfs"),
                MsFlags::empty(),
                None::<&str>,
            )?;
            // SAFETY: access() on a valid C string.
            if unsafe { libc::access(active.as_ptr(), libc::F_OK) } == 0 {
                Ok(())
            } else {
                Err(nix::Error::ENOENT)
            }
        },
        |_| {
            outcome = Ok(());
            Ok(())
        },
    );
    let _ = std::fs::remove_dir(&dir);
    match res {
        Ok(()) => outcome,
        Err(_) => Err(
            "a user namespace cannot mount securityfs with ima/active: this kernel has no IMA namespace support (not in any mainline kernel)".into(),
        ),
    }
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("imacri-ima-probe-{}", crate::ids::new_id()));
    std::fs::create_dir(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like a namespaced securityfs `ima/`.
    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (f, c) in [
            ("active", "0\n"),
            ("policy", ""),
            ("ascii_runtime_measurements", ""),
            ("binary_runtime_measurements", ""),
            ("runtime_measurements_count", "0\n"),
            ("violations", "0\n"),
            ("hash", ""),
            ("template_name", ""),
        ] {
            std::fs::write(d.path().join(f), c).unwrap();
        }
        d
    }

    #[test]
    fn activation_writes_in_order_and_refuses_twice() {
        let d = tree();
        let a = Activation {
            hash: Some("sha256"),
            template: Some("ima-ng"),
            policy: "measure func=BPRM_CHECK\n",
        };
        activate(d.path(), &a).unwrap();
        let r = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(r("active"), "1");
        assert_eq!(r("hash"), "sha256");
        assert_eq!(r("template_name"), "ima-ng");
        assert_eq!(r("policy"), "measure func=BPRM_CHECK\n");
        let e = activate(d.path(), &a).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("EBUSY"));
    }

    #[test]
    fn missing_interface_is_a_precondition_error() {
        let d = tempfile::tempdir().unwrap();
        let e = activate(d.path(), &Activation::default()).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)));
        assert!(e.to_string().contains("no IMA namespace support"));
    }

    #[test]
    fn reads_the_log() {
        let d = tree();
        std::fs::write(
            d.path().join("ascii_runtime_measurements"),
            "10 91f34b5c671d73504b274a919661cf80dab1e127 ima-ng sha256:0123 /bin/busybox\n10 aa ima-ng sha256:4567 /usr/bin/with space\n",
        )
        .unwrap();
        std::fs::write(d.path().join("runtime_measurements_count"), "2\n").unwrap();
        let (log, count, violations) = read_log(d.path()).unwrap();
        assert_eq!(count, 2);
        assert_eq!(violations, 0);
        assert_eq!(log[0].pcr, 10);
        assert_eq!(log[0].file_hash, "sha256:0123");
        assert_eq!(log[1].path, "/usr/bin/with space");
    }

    #[test]
    fn this_kernel_has_no_ima_namespaces() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // Mainline kernels (including this machine's) lack IMA namespaces.
        let r = probe();
        assert!(r.unwrap_err().contains("IMA namespace"));
    }
}
