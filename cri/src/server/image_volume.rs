//! Image volumes (CRI `Mount.image`, KEP-4639): an image's root filesystem,
//! or a sub path of it, mounted read-only into a container. Each volume is a
//! containerd view snapshot of the image's top layer, mounted on the host at
//! `<state>/image-volumes/<container>/<n>` and then handed to the spec as an
//! ordinary read-only bind, so everything volumes get (ID-mapping in user
//! namespace pods, `noexec` in measured pods) applies to it too. The
//! containerd container references the views (gc.ref labels), so GC takes
//! them with the container even if imacri dies in between.

use imacri_api::cri;
use imacri_runtime::containerd::Lease;
use imacri_runtime::{spec, Error, Result};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use super::CriServer;

pub(crate) fn is_image_mount(m: &cri::Mount) -> bool {
    m.image.as_ref().is_some_and(|i| !i.image.is_empty())
}

/// Checks an image volume's request before anything is made.
pub(crate) fn check_image_mount(m: &cri::Mount) -> Result<()> {
    spec::validate_container_path("mount container_path", &m.container_path)?;
    if !m.readonly {
        return Err(Error::InvalidArgument(format!(
            "mount {}: an image volume is read-only; set readonly",
            m.container_path
        )));
    }
    let sub = Path::new(&m.image_sub_path);
    if sub.is_absolute() || sub.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::InvalidArgument(format!(
            "mount {}: image_sub_path {:?} must be a relative path inside the image",
            m.container_path, m.image_sub_path
        )));
    }
    Ok(())
}

fn view_key(id: &str, n: usize) -> String {
    format!("imgvol-{id}-{n}")
}

impl CriServer {
    fn image_volume_dir(&self, id: &str) -> PathBuf {
        self.cfg.state.join("image-volumes").join(id)
    }

    /// Mounts the container's image volumes and returns the config with
    /// each one as a read-only bind of its host mount (None if it has
    /// none), and the labels by which the containerd container keeps the
    /// view snapshots.
    pub(crate) async fn image_volumes(
        &self,
        id: &str,
        config: &cri::ContainerConfig,
        lease: &Lease,
    ) -> Result<(Option<cri::ContainerConfig>, HashMap<String, String>)> {
        let mut labels = HashMap::new();
        if !config.mounts.iter().any(is_image_mount) {
            return Ok((None, labels));
        }
        let snapshotter = &self.cfg.containerd.snapshotter;
        let mut out = config.clone();
        for (n, m) in out.mounts.iter_mut().enumerate() {
            if !is_image_mount(m) {
                continue;
            }
            let wanted = m
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default();
            let image = self.images.get(&wanted).ok_or_else(|| {
                Error::NotFound(format!(
                    "mount {}: image {wanted:?} not found; pull it first",
                    m.container_path
                ))
            })?;
            let key = view_key(id, n);
            let mounts = self
                .c
                .view_snapshot(snapshotter, &key, &image.chain_id, lease)
                .await?;
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{snapshotter}/imgvol{n}"),
                key,
            );
            let target = self.image_volume_dir(id).join(n.to_string());
            std::fs::create_dir_all(&target).map_err(|e| Error::io("creating", &target, e))?;
            imacri_runtime::mount::mount_snapshot(&mounts, &target, true)?;
            let source = target.join(&m.image_sub_path);
            // A sub path must exist and stay inside the image (no symlink out).
            let real = std::fs::canonicalize(&source)
                .ok()
                .filter(|r| r.starts_with(&target));
            let Some(real) = real else {
                return Err(Error::InvalidArgument(format!(
                    "mount {}: image_sub_path {:?} does not exist in image {wanted}",
                    m.container_path, m.image_sub_path
                )));
            };
            m.host_path = real.to_string_lossy().into_owned();
            m.image = None;
            m.image_sub_path.clear();
            m.readonly = true;
            m.propagation = cri::MountPropagation::PropagationPrivate as i32;
        }
        Ok((Some(out), labels))
    }

    /// Unmounts a container's image volumes and removes their views.
    pub(crate) async fn remove_image_volumes(&self, id: &str, config: &cri::ContainerConfig) {
        let dir = self.image_volume_dir(id);
        if let Err(e) = imacri_runtime::mount::remove_mount_dir(&dir) {
            tracing::warn!(container_id = %id, error = %e, "image volume mounts left behind");
        }
        for (n, _) in config
            .mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| is_image_mount(m))
        {
            let _ = self
                .c
                .remove_snapshot(&self.cfg.containerd.snapshotter, &view_key(id, n))
                .await;
        }
    }

    /// The mounts ContainerStatus reports: image volumes name the image they
    /// mount by its ID (`image_ref`, KEP-5365).
    pub(crate) fn status_mounts(&self, config: &cri::ContainerConfig) -> Vec<cri::Mount> {
        let mut mounts = config.mounts.clone();
        for m in mounts.iter_mut().filter(|m| is_image_mount(m)) {
            if let Some(i) = m.image.as_mut() {
                if let Some(rec) = self.images.get(&i.image) {
                    i.image_ref = rec.id.clone();
                }
            }
        }
        mounts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str, ro: bool, sub: &str) -> cri::Mount {
        cri::Mount {
            container_path: path.into(),
            readonly: ro,
            image_sub_path: sub.into(),
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn image_mounts_are_read_only_with_a_relative_sub_path() {
        assert!(is_image_mount(&m("/v", true, "")));
        check_image_mount(&m("/v", true, "")).unwrap();
        check_image_mount(&m("/v", true, "etc/ssl")).unwrap();
        let e = check_image_mount(&m("/v", false, "")).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        for bad in ["/etc", "../x", "a/../../b"] {
            let e = check_image_mount(&m("/v", true, bad)).unwrap_err();
            assert!(e.to_string().contains("image_sub_path"), "{bad}: {e}");
        }
        assert!(check_image_mount(&m("relative", true, "")).is_err());
    }
}
