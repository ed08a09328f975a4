//! Root filesystems of user-namespace pods. Where the node can (probed at
//! start, `imacri check` line `idmapped-rootfs`), a container's snapshot
//! sits directly on the image's layers and they are ID-mapped when its task
//! is created: no copy, a cost independent of image size. Otherwise the
//! layers are copied once per (image, mapping) with files chowned.

use containerd_client::types::Mount;
use imacri_runtime::containerd::Lease;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::io::StdioPaths;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::{Error, Result};

use super::CriServer;

impl CriServer {
    /// Ends the lease a creation held its snapshot (and image volumes) by.
    /// `created`: the container record holds them now, so the lease goes
    /// after the answer, which need not wait for one more round trip to
    /// containerd (one left by a crash expires within the hour). A failed
    /// creation's goes before its error does: what it held must be gone
    /// by then (the rollback's promise).
    pub(crate) async fn end_lease(&self, lease: Lease, created: bool) {
        // A failed creation's debris (a prepared snapshot) goes with its
        // lease before the call answers; a lease that cannot be deleted
        // (containerd restarting) is tried again in the background rather
        // than left to its expiry an hour later.
        if !created && lease.delete(&self.c, false).await.is_ok() {
            return;
        }
        let c = self.c.clone();
        tokio::spawn(async move {
            let deleted = super::orphans::retrying(|| async {
                lease.delete(&c, false).await.ignore_not_found()
            })
            .await;
            if let Err(e) = deleted {
                tracing::warn!(lease = lease.id(), error = %e, "a creation's lease not deleted; it expires, or the next start deletes it");
            }
        });
    }

    /// The snapshot a pod's containers start from, and whether its layers
    /// are to be ID-mapped at task creation: the image's layers, or their
    /// chowned copy when this node cannot ID-map them.
    pub(crate) async fn rootfs_parent(
        &self,
        chain_id: &str,
        st: &SandboxState,
        lease: &Lease,
    ) -> Result<(String, bool)> {
        match &st.userns {
            None => Ok((chain_id.to_string(), false)),
            Some(_) if self.rootfs_idmap.is_ok() => Ok((chain_id.to_string(), true)),
            Some(u) => self
                .images
                .remapped_snapshot(chain_id, &u.mappings, lease, &self.cfg.state.join("remap"))
                .await
                .map(|name| (name, false)),
        }
    }

    /// Creates a container's task. With `idmapped`, the snapshot's overlay
    /// is mounted here with its layers ID-mapped through the pod's user
    /// namespace and handed to the shim as a bind; ours is detached once
    /// the shim holds its own, so nothing of it outlives the task.
    pub(crate) async fn create_task_on(
        &self,
        id: &str,
        st: &SandboxState,
        mounts: Vec<Mount>,
        stdio: &StdioPaths,
        idmapped: bool,
    ) -> Result<u32> {
        let userns = match (&st.userns, idmapped) {
            (Some(u), true) => u,
            _ => return self.c.create_task(id, mounts, stdio).await,
        };
        let staged = self.cfg.state.join("rootfs").join(id);
        let mut laps = super::laps::Laps::new("IdmappedRootfs", id);
        imacri_runtime::idmap::idmapped_rootfs(&mounts, &staged, &userns.path, &userns.mappings)?;
        laps.lap("mount");
        drop(laps);
        let bind = Mount {
            r#type: "bind".into(),
            source: staged.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        let res = self.c.create_task(id, vec![bind], stdio).await;
        let cleanup = imacri_runtime::mount::unmount_all(&staged).and_then(|()| {
            std::fs::remove_dir(&staged).map_err(|e| Error::io("removing", &staged, e))
        });
        if let Err(e) = cleanup {
            tracing::warn!(container_id = %id, error = %e, "staged rootfs left behind");
        }
        res
    }

    /// Staged root filesystems a crash left between mounting and handing
    /// them to the shim.
    pub(crate) fn clean_staged_rootfs(&self) {
        let dir = self.cfg.state.join("rootfs");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = imacri_runtime::mount::unmount_all(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
