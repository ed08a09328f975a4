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

/// `sha256:<hex>` of [`BINARY`].
pub fn digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| format!("sha256:{}", hex::encode(Sha256::digest(BINARY))))
}

/// Whether an entry is the init's own execution from this build: allowed by
/// every appraisal policy, as the node's own code.
pub fn allowed(path: &str, digest: &str) -> bool {
    path == PATH && digest == self::digest()
}

#[derive(Debug, thiserror::Error)]
#[error("writing imacri's container init to {path}: {source}")]
pub struct InstallError {
    path: PathBuf,
    source: std::io::Error,
}

/// Writes the binary under `root` (once per build: its name carries the
/// digest) and returns its path, the source of the containers' bind mount.
/// Written to a temporary name and renamed, so a container never binds a
/// half-written file; root-owned, mode 0755, never written again.
pub fn install(root: &Path) -> Result<PathBuf, InstallError> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = root.join("bin");
    let hex = digest().trim_start_matches("sha256:");
    let path = dir.join(format!("imacri-init-{}", &hex[..16]));
    let err = |source| InstallError {
        path: path.clone(),
        source,
    };
    if std::fs::read(&path).is_ok_and(|b| b == BINARY) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(err)?;
    let tmp = dir.join(format!(".imacri-init.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(BINARY).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
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
