//! A container's volumes before its spec: host paths resolved once (what
//! is checked is what is bound), missing hostPaths created, and in a user
//! namespace each bound through an ID-mapped view of imacri's own.

use imacri_api::cri;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::{Error, Result};

use super::CriServer;

/// The config with every volume's host_path resolved on the host
/// (symlinks followed, so the spec binds what the path names now).
pub(super) fn resolve_host_paths(config: &cri::ContainerConfig) -> Result<cri::ContainerConfig> {
    let mut out = config.clone();
    for m in out
        .mounts
        .iter_mut()
        .filter(|m| !super::image_volume::is_image_mount(m))
    {
        let real = std::fs::canonicalize(&m.host_path).map_err(|e| {
            Error::InvalidArgument(format!("mount host_path {:?}: {e}", m.host_path))
        })?;
        m.host_path = real.to_string_lossy().into_owned();
    }
    Ok(out)
}

/// A hostPath that does not exist becomes an empty directory, as in
/// containerd (kubelet's `DirectoryOrCreate` and plain hostPath rely on it).
pub(super) fn create_missing_host_path(m: &cri::Mount) -> Result<()> {
    let p = std::path::Path::new(&m.host_path);
    if !p.is_absolute() {
        return Ok(()); // user_mount names the field
    }
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(p).map_err(|e| Error::io("creating host path", p, e))
        }
        _ => Ok(()),
    }
}

/// `IMACRI_TEST_VOLUME_CHECK_WINDOW` (milliseconds): pauses after
/// resolving a container's volumes and after binding them, for the test
/// that swaps a volume's path in between.
pub(super) fn volume_check_window() -> Option<std::time::Duration> {
    static WINDOW: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| imacri_runtime::crash::hook_ms("IMACRI_TEST_VOLUME_CHECK_WINDOW"))
}

impl CriServer {
    /// In a pod with its own user namespace, volumes are bind-mounted from
    /// ID-mapped copies (`<state>/idmap/<container>/<n>`), so host files
    /// appear owned by the matching in-pod IDs. Returns the config to build
    /// the spec from, or None when nothing changes.
    pub(super) fn idmap_volumes(
        &self,
        id: &str,
        sb: &SandboxState,
        config: &cri::ContainerConfig,
    ) -> Result<Option<cri::ContainerConfig>> {
        let Some(u) = &sb.userns else { return Ok(None) };
        if config.mounts.is_empty() {
            return Ok(None);
        }
        let mut mapped = config.clone();
        let dir = self.cfg.state.join("idmap").join(id);
        for (i, m) in mapped.mounts.iter_mut().enumerate() {
            let src = std::path::PathBuf::from(&m.host_path);
            let staged = dir.join(i.to_string());
            imacri_runtime::idmap::idmapped_bind(&src, &staged, &u.path)?;
            m.host_path = staged.to_string_lossy().into_owned();
        }
        Ok(Some(mapped))
    }

    /// Removes a container's ID-mapped volume copies.
    pub(crate) fn remove_idmapped_volumes(&self, id: &str) {
        let dir = self.cfg.state.join("idmap").join(id);
        if let Err(e) = imacri_runtime::mount::remove_mount_dir(&dir) {
            tracing::warn!(container_id = %id, error = %e, "ID-mapped volume binds left behind");
        }
    }
}
