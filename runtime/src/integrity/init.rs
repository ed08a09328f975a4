//! imacri's init for the processes of fanotify-measured ima pods
//! (`runtime/init/init.rs`): run before each container's command and each
//! exec's, it restricts execution with Landlock to files beneath the
//! container's root, so a file on a filesystem no mark of the pod watches
//! (handed in over a unix socket by a helper outside the pod, reached
//! through a directory fd or a root there) cannot run unseen.
//!
//! The binary is written once per build under imacri's root directory and
//! bind-mounted read-only (not `noexec`) at [`PATH`]; the container's group
//! marks that mount, so the init's own execution is measured like any other
//! and its digest is one every policy allows ([`allowed`]).

use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The init executable, built by build.rs.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/imacri-init"));

/// Where a container sees it: on its `/dev` tmpfs, so nothing is added to
/// the image's filesystem.
pub const PATH: &str = "/dev/.imacri-init";

/// The environment variable (`=1`) that makes the init also refuse opening
/// files beneath procfs for writing (`runtime/init/init.rs`); the init takes
/// it out of the command's environment.
pub const DENY_PROC_WRITES: &str = "IMACRI_INIT_DENY_PROC_WRITES";

/// `sha256:<hex>` of [`BINARY`].
pub fn digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| format!("sha256:{}", hex::encode(Sha256::digest(BINARY))))
}

/// The word a container's `start` entry carries when it runs through the
/// init: `init=sha256:<hex>`, the digest of the init imacri embeds. The
/// verifier accepts the init's execution at [`PATH`] with that digest
/// whatever build it is itself (a node's own component, declared when
/// marking began); a file on the node that differs from what imacri
/// embeds is measured with another digest and stays a violation.
pub fn start_word() -> String {
    format!("init={}", digest())
}

/// The init digest a start entry's text declares, if any.
pub fn declared(start: &str) -> Option<&str> {
    start.split(' ').find_map(|w| w.strip_prefix("init="))
}

/// Whether `process` runs through the init (its first argument).
pub fn runs_through(process: &oci_spec::runtime::Process) -> bool {
    process
        .args()
        .as_ref()
        .and_then(|a| a.first())
        .is_some_and(|a| a == PATH)
}

/// Whether an entry is the init's own execution from this build: allowed by
/// every appraisal policy, as the node's own code.
pub fn allowed(path: &str, digest: &str) -> bool {
    path == PATH && digest == self::digest()
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("writing imacri's container init to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "imacri's container init at {path} cannot run: its filesystem is mounted noexec (a bind \
         mount of it is too); give imacri a root directory on a filesystem that allows execution"
    )]
    Noexec { path: PathBuf },
}

/// Why runc's lookup of a container's command fails ([`look_path`]), in
/// runc's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookPathError {
    #[error("opening {root}: {errno}")]
    Root {
        root: PathBuf,
        errno: nix::errno::Errno,
    },
    /// A name with a slash that is no executable file.
    #[error("exec: {name:?}: {why}")]
    NotExecutable { name: String, why: FindError },
    /// A bare name in no directory of `PATH`.
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotInPath(String),
}

/// Why one candidate path is no executable (Go's `findExecutable`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error("stat {path}: {}", go_errno(*errno))]
    Stat {
        path: String,
        errno: nix::errno::Errno,
    },
    /// A directory, or a file without any execute bit.
    #[error("permission denied")]
    Denied,
}

/// Writes the binary under `root` (once per build: its name carries the
/// digest) and returns its path, the source of the containers' bind mount.
/// Written to a temporary name and renamed, so a container never binds a
/// half-written file; root-owned, mode 0755, never written again.
pub fn install(root: &Path) -> Result<PathBuf, InstallError> {
    let dir = root.join("bin");
    let hex = digest().trim_start_matches("sha256:");
    let path = dir.join(format!("imacri-init-{}", &hex[..16]));
    let err = |source| InstallError::Write {
        path: path.clone(),
        source,
    };
    if !std::fs::read(&path).is_ok_and(|b| b == BINARY) {
        write(&dir, &path).map_err(err)?;
    }
    // The containers' bind mounts keep the source mount's noexec (and in a
    // user namespace cannot drop it): such a node cannot run the init.
    if noexec(&path) {
        return Err(InstallError::Noexec { path });
    }
    Ok(path)
}

/// Whether the filesystem of `path` (or of its nearest existing ancestor)
/// is mounted noexec.
pub fn noexec(path: &Path) -> bool {
    path.ancestors()
        .find_map(|p| nix::sys::statvfs::statvfs(p).ok())
        .is_some_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
}

fn write(dir: &Path, path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".imacri-init.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(BINARY)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// runc looks the container's command up (Go's `exec.LookPath`) before it
/// starts anything and fails the task's creation if it is not there; for a
/// container that runs through the init, runc finds the init instead, and
/// the command would only be missed once started. This is runc's lookup of
/// `name` in the container whose root the host reaches at `root`
/// (`/proc/<pid>/root`), with its working directory and environment: Ok, or
/// runc's message, so StartContainer fails the same way in every pod.
pub fn look_path(root: &Path, cwd: &str, env: &[String], name: &str) -> Result<(), LookPathError> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let dir = nix::fcntl::open(
        root,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|errno| LookPathError::Root {
        root: root.to_path_buf(),
        errno,
    })?;
    // SAFETY: open returned a new fd we own.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    // Go's os.Stat: follows symlinks, here without leaving the root.
    let stat = |p: &str| -> Result<nix::sys::stat::FileStat, nix::Error> {
        let full = if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{}/{p}", cwd.trim_end_matches('/'))
        };
        let how = nix::fcntl::OpenHow::new()
            .flags(nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC)
            .resolve(nix::fcntl::ResolveFlag::RESOLVE_IN_ROOT);
        let fd = nix::fcntl::openat2(dir.as_raw_fd(), full.as_str(), how)?;
        // SAFETY: openat2 returned a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::sys::stat::fstat(fd.as_raw_fd())
    };
    // Go's findExecutable (as runc 1.1 is built): a directory or a file
    // without any execute bit is "permission denied".
    let find = |p: &str| -> Result<(), FindError> {
        let st = stat(p).map_err(|errno| FindError::Stat {
            path: p.to_string(),
            errno,
        })?;
        let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if dir || st.st_mode & 0o111 == 0 {
            return Err(FindError::Denied);
        }
        Ok(())
    };
    if name.contains('/') {
        return find(name).map_err(|why| LookPathError::NotExecutable {
            name: name.to_string(),
            why,
        });
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("");
    if !path.is_empty() {
        for d in path.split(':') {
            let d = if d.is_empty() { "." } else { d };
            if find(&format!("{}/{name}", d.trim_end_matches('/'))).is_ok() {
                return Ok(());
            }
        }
    }
    Err(LookPathError::NotInPath(name.to_string()))
}

/// An errno as Go's syscall package spells it (lower case, no number).
fn go_errno(e: nix::Error) -> String {
    let s = e.desc();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The Landlock ABI version of this kernel, or why the init cannot work.
pub fn probe() -> Result<i64, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with the version flag the call reads no attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v >= 1 {
        Ok(v)
    } else {
        Err(format!(
            "Landlock is unavailable ({}; Linux >= 5.13 with landlock in the lsm= list): \
             execution of files from outside a pod's marked filesystems cannot be forbidden",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_is_a_static_elf() {
        // It runs in images without a loader.
        assert!(crate::image::builtin::tests::is_static_elf(BINARY));
    }

    #[test]
    fn commands_are_looked_up_as_runc_does_inside_the_root() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("app")).unwrap();
        for (f, mode) in [
            ("bin/busybox", 0o755),
            ("bin/data", 0o644),
            ("app/run", 0o700),
        ] {
            std::fs::write(r.join(f), b"x").unwrap();
            std::fs::set_permissions(r.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        // An absolute link resolves inside the root, not on the host.
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/env", r.join("bin/hostenv")).unwrap();
        let env = vec!["A=1".to_string(), "PATH=/usr/bin:/bin".to_string()];
        let look = |cwd: &str, env: &[String], name: &str| {
            look_path(r, cwd, env, name).map_err(|e| e.to_string())
        };
        assert_eq!(look("/", &env, "busybox"), Ok(()));
        assert_eq!(look("/", &env, "sh"), Ok(()));
        assert_eq!(look("/", &env, "/bin/sh"), Ok(()));
        assert_eq!(look("/app", &env, "./run"), Ok(()));
        assert_eq!(
            look("/", &env, "nothere"),
            Err(r#"exec: "nothere": executable file not found in $PATH"#.into())
        );
        assert_eq!(
            look("/", &env, "data"),
            Err(r#"exec: "data": executable file not found in $PATH"#.into())
        );
        assert_eq!(
            look("/", &env, "/bin/nothere"),
            Err(r#"exec: "/bin/nothere": stat /bin/nothere: no such file or directory"#.into())
        );
        assert_eq!(
            look("/", &env, "/bin"),
            Err(r#"exec: "/bin": permission denied"#.into())
        );
        assert!(look("/", &env, "hostenv").is_err(), "left the root");
        // Without PATH a bare name is not found (runc's init has none).
        assert!(look("/", &["A=1".to_string()], "busybox").is_err());
    }

    #[test]
    fn a_root_is_judged_by_its_nearest_existing_directory() {
        // (A noexec root is tested in integration/tests/ima_guards/.)
        let dir = tempfile::tempdir().unwrap();
        assert!(!noexec(dir.path()));
        assert!(!noexec(&dir.path().join("not/there/yet")));
        let e = install(Path::new("/proc/sys")).unwrap_err();
        assert!(matches!(e, InstallError::Write { .. }), "{e}");
    }

    #[test]
    fn installed_once_and_only_its_own_digest_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = install(dir.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), BINARY);
        let again = install(dir.path()).unwrap();
        assert_eq!(p, again);
        assert!(allowed(PATH, digest()));
        assert!(!allowed("/bin/sh", digest()));
        assert!(!allowed(PATH, &format!("sha256:{}", "0".repeat(64))));
    }
}
