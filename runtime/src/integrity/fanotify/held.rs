//! Files of an overlay filesystem (a container's rootfs) that a container
//! mapped shared and writable, held open for writing until it is gone.
//!
//! On overlayfs a mapping holds the upper layer's file, not the overlay file
//! that was opened and mapped: once the mapping process closes its fd,
//! nothing counts the mapping as a writer of the file the container sees.
//! The kernel then executes that file (its ETXTBSY rule counts the overlay
//! file's writers), grants a read lease on it (the engine's writers check
//! for executable mappings), and writes through the mapping raise no
//! fanotify event and, to pages dirtied already, move no mtime: a running
//! program's code, an executable mapping and a remembered digest all
//! changed unseen (`ima_writes/shared.rs`
//! `a_file_mapped_shared_and_writable_runs_only_as_measured`). A file on
//! any other filesystem is counted by the kernel itself (the mapping holds
//! that very file).
//!
//! The map guard sees every shared mapping of a file; for one of an overlay
//! file open for writing it hands the caller's own open file here before
//! the call goes on, and the container's group holds it (and the fd keeper
//! a copy, across an imacri restart) until the container is gone. The file
//! counts as open for writing for as long as the mapping can exist (one
//! made outside the pod is found at the check instead: `overlay.rs`): its
//! execution fails with ETXTBSY and mapping it executable is a `writers`
//! violation, as on any other filesystem. What it costs: an open file per
//! such file (imacri's, its copy for the keeper, the keeper's), counted with
//! the pod's leases and held to the pod's share of a full node
//! ([`held_share`](super::share::held_share): past it the mapping is
//! refused; a held writer cannot be given back for another pod as a lease
//! can);
//! the file cannot be executed until the container is gone, and one deleted
//! meanwhile keeps its blocks until then.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::super::digest::FileKey;
use super::super::keeper;
use super::super::sys::{SysError, WatchError};
use super::leases::{self, Slot};
use super::Group;

/// One held file (the keeper's copy, if any, goes with the group).
#[derive(Debug)]
pub(super) struct Held {
    _file: OwnedFd,
    _slot: Option<Slot>,
}

/// Inode → the held file.
pub(super) type HeldFiles = HashMap<(u64, u64), Held>;

/// Whether a shared mapping of `file`, an overlay file (the caller checks
/// that first, with `overlay::on_overlayfs`, before it takes a copy to hold), must
/// be held: whether it is open for writing (a read-only open file cannot be
/// mapped writable, now or later).
pub fn needs_holding(file: std::os::fd::BorrowedFd<'_>) -> Result<bool, SysError> {
    // SAFETY: fcntl with integer arguments.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(SysError::last("F_GETFL"));
    }
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY)
}

impl Group {
    /// Holds `file` (a caller's own open file, open for writing) until the
    /// container is gone. Err past the pod's share of imacri's fds: the
    /// mapping must then be refused.
    pub(super) fn hold(&self, file: OwnedFd) -> Result<(), WatchError> {
        let st = nix::sys::stat::fstat(file.as_raw_fd()).map_err(|e| SysError::call("fstat", e))?;
        let inode = FileKey::of(&st).inode();
        let mut held = self.held.lock()?;
        if held.contains_key(&inode) {
            // Held already: one writer is all it takes.
            return Ok(());
        }
        let slot = leases::slot(&self.target.measured.pod, false)?;
        if let Some(k) = &self.keeper {
            let key = keeper::held_key(&self.target.measured.container, inode);
            if let Err(e) = k.put(&key, file.as_fd()) {
                tracing::warn!(container_id = %self.target.measured.container, error = %e, "fd keeper: a held writer not kept; after an imacri restart the file can be executed while mapped writable");
            }
        }
        held.insert(
            inode,
            Held {
                _file: file,
                _slot: Some(slot),
            },
        );
        Ok(())
    }
}

/// After a restart: the held files the keeper kept for the group.
pub(super) fn take_back(group: &Group, kept: Vec<(String, OwnedFd)>) {
    let Ok(mut held) = group.held.lock() else {
        return;
    };
    for (key, file) in kept {
        let Ok(st) = nix::sys::stat::fstat(file.as_raw_fd()) else {
            continue;
        };
        if let Some(k) = &group.keeper {
            k.remember(&key, file.as_fd());
        }
        held.insert(
            FileKey::of(&st).inode(),
            Held {
                _file: file,
                // Without the lease service it is held all the same.
                _slot: leases::slot(&group.target.measured.pod, true).ok(),
            },
        );
    }
}
