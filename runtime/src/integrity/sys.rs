//! The kernel plumbing's failures (a system call refused, a /proc file that
//! cannot be read), typed once for the whole integrity module, and the
//! errors of the file watches the engine asks its sources for (leases,
//! watches for writers, held files), which both sides name: the engine
//! defines the watch, fanotify provides it. Modules wrap these in errors of
//! their own that say what was being decided; callers match on variants
//! instead of comparing strings. A leaf: it imports nothing of the crate.

use std::borrow::Cow;
use std::sync::Arc;

/// A system call or file access of the integrity engine that failed, with
/// what it was for (`what` names the call and its object, e.g.
/// `pidfd_getfd(42, 3)` or `reading /proc/42/maps`).
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what}: {source}")]
    Call {
        what: Cow<'static, str>,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: Cow<'static, str>,
        #[source]
        source: std::io::Error,
    },
}

impl SysError {
    pub fn call(what: impl Into<Cow<'static, str>>, source: nix::errno::Errno) -> Self {
        SysError::Call {
            what: what.into(),
            source,
        }
    }

    pub fn io(what: impl Into<Cow<'static, str>>, source: std::io::Error) -> Self {
        SysError::Io {
            what: what.into(),
            source,
        }
    }

    /// The calling thread's errno, right after a raw call failed.
    pub fn last(what: impl Into<Cow<'static, str>>) -> Self {
        Self::call(what, nix::errno::Errno::last())
    }
}

/// Which of the two bounds on the files imacri keeps open for pods (a
/// lease's, a held writer's) a new one would cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FdQuota {
    #[error("imacri holds {0} leases, its limit")]
    Imacri(usize),
    #[error("the pod holds {0} leases, its limit")]
    Pod(usize),
    #[error(
        "the pod holds {0} files mapped shared and writable, its share of imacri's open files"
    )]
    Held(usize),
}

/// Why a read lease could not be taken (`fanotify/leases.rs`).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The kernel's rule for read leases: someone has the file open for
    /// writing (the caller's writers check finds who).
    #[error("a read lease is refused: the file is open for writing")]
    Writers,
    /// Taken while a truncate or an open for writing broke it.
    #[error("the file is being truncated or opened for writing")]
    Breaking,
    #[error(transparent)]
    Full(#[from] FdQuota),
    #[error("fs.leases-enable is 0: truncate(2) of a mapped file cannot be seen")]
    Disabled,
    /// The lease service could not start (once for the process).
    #[error("the lease service cannot run: {0}")]
    Service(Arc<SysError>),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Why a file cannot be watched for writers or held open (the engine's
/// `WriteWatch`).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the container has no fanotify group to hold it")]
    NoGroup,
    #[error(
        "the container holds {0} files mapped executable or scripts run (ima.max_watched_files), each watched for writers; no more can be"
    )]
    Full(usize),
    #[error(
        "the node's fanotify marks are used up (fs.fanotify.max_user_marks = {limit}), which this container's group, opened by an imacri from before 2026-12-06, counts against; raise the sysctl, or recreate the container"
    )]
    NodeMarks { limit: String },
    #[error("a watch table's lock is poisoned")]
    Poisoned,
}

impl WatchError {
    /// Whether the access must be refused whatever the pod's mode: past the
    /// container's or the node's watch limit, letting it through unwatched
    /// would make the limit a way out of the writers check (a pod could use
    /// up the node's marks, then rewrite what it maps).
    pub fn refuses(&self) -> bool {
        matches!(self, WatchError::Full(_) | WatchError::NodeMarks { .. })
    }
}

impl<T> From<std::sync::PoisonError<T>> for WatchError {
    fn from(_: std::sync::PoisonError<T>) -> Self {
        WatchError::Poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_failed_and_keeps_the_errno() {
        let e = SysError::call(
            format!("pidfd_getfd({}, {})", 42, 3),
            nix::errno::Errno::EPERM,
        );
        assert_eq!(
            e.to_string(),
            "pidfd_getfd(42, 3): EPERM: Operation not permitted"
        );
        assert!(matches!(
            e,
            SysError::Call {
                source: nix::errno::Errno::EPERM,
                ..
            }
        ));
        let e = SysError::io(
            "reading /proc/1/maps",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(
            matches!(&e, SysError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
        );
        assert!(e.to_string().starts_with("reading /proc/1/maps: "));
    }
}
