//! Network namespaces persisted as bind mounts under `<state>/netns/<id>`,
//! so they outlive the pause process and CNI (later) can use them.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Creates a new network namespace and pins it at `dir/<id>`.
pub fn create(dir: &Path, id: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let path = dir.join(id);
    std::fs::File::create(&path).map_err(|e| Error::io("creating netns file", &path, e))?;
    let target = path.clone();
    // unshare affects only the calling thread: do it on a throwaway thread so
    // no runtime thread ends up in the new namespace.
    let res = std::thread::spawn(move || -> std::result::Result<(), nix::Error> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .map_err(|_| Error::Internal("netns thread panicked".into()))?;
    if let Err(e) = res {
        let _ = std::fs::remove_file(&path);
        return Err(Error::io("creating network namespace", &path, e.into()));
    }
    Ok(path)
}

/// Unpins and removes a network namespace; a missing one is fine.
pub fn remove(path: &Path) -> Result<()> {
    crate::mount::unmount_all(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing netns", path, e)),
    }
}
