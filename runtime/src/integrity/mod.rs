//! Per-pod file integrity on stock kernels: the measurement engine and its
//! two sources (fanotify for executions and reads, the seccomp map guard for
//! executable mappings), the guards that make the rest impossible, the
//! measurement log and journal, TPM anchoring, appraisal policies and the
//! verifier of attestation evidence.

pub mod allowlist;
mod appender;
pub mod charge;
pub mod digest;
pub mod elf;
pub mod engine;
pub mod enroll;
pub mod fanotify;
pub mod golden;
pub mod guard;
mod hashq;
pub mod init;
pub mod journal;
pub mod keeper;
pub mod kept;
pub mod kernel;
pub mod log;
pub mod mapguard;
pub mod overlay;
pub mod park;
mod pidfd;
mod podlogs;
pub mod policy;
pub mod quiet;
pub mod retained;
pub mod setting;
pub mod sys;
pub mod tpm;
pub mod verify;

use crate::Error;

// Each integrity error becomes the gRPC code a CRI client acts on, here,
// once: the request's own mistakes are InvalidArgument, a node that cannot
// measure now is FailedPrecondition, a broken TPM link Unavailable.

impl From<guard::GuardError> for Error {
    fn from(e: guard::GuardError) -> Error {
        Error::FailedPrecondition(format!(
            "cannot forbid unmeasured execution in this ima pod: {e}"
        ))
    }
}

impl From<fanotify::FanotifyError> for Error {
    fn from(e: fanotify::FanotifyError) -> Error {
        let m = format!("cannot measure the container: {e}");
        match e {
            fanotify::FanotifyError::Groups { .. } => Error::ResourceExhausted(m),
            fanotify::FanotifyError::Mark {
                source: nix::errno::Errno::ENOSPC,
                ..
            } => Error::ResourceExhausted(format!(
                "{m}: the node's fanotify marks are used up (fs.fanotify.max_user_marks)"
            )),
            _ => Error::FailedPrecondition(m),
        }
    }
}

impl From<mapguard::MapGuardError> for Error {
    fn from(e: mapguard::MapGuardError) -> Error {
        match e {
            mapguard::MapGuardError::Profile(_) => {
                Error::InvalidArgument(format!("linux.security_context.seccomp: {e}"))
            }
            _ => Error::FailedPrecondition(format!("ima map guard: {e}")),
        }
    }
}

impl From<tpm::TpmError> for Error {
    fn from(e: tpm::TpmError) -> Error {
        match e {
            tpm::TpmError::Open { .. } => Error::FailedPrecondition(format!(
                "{e}; check ima.tpm_tcti (or --tpm-tcti), or leave it empty to run unanchored"
            )),
            tpm::TpmError::Gone => Error::Unavailable(e.to_string()),
            tpm::TpmError::Refused(m) => Error::InvalidArgument(m),
            _ => Error::Internal(e.to_string()),
        }
    }
}

impl From<journal::JournalError> for Error {
    fn from(e: journal::JournalError) -> Error {
        match e {
            journal::JournalError::Tpm(t) => t.into(),
            journal::JournalError::Quota { .. } => Error::FailedPrecondition(e.to_string()),
            _ => Error::Internal(format!("measurement journal: {e}")),
        }
    }
}

/// The node's own AK has no PEM form: nothing a client can mend.
impl From<verify::AkKeyError> for Error {
    fn from(e: verify::AkKeyError) -> Error {
        Error::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_clients_act_on() {
        let e: Error =
            mapguard::MapGuardError::Profile("allows mmap under conditions".into()).into();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("seccomp") && m.contains("mmap"))
        );
        let e: Error = guard::GuardError::Abnormal("x".into()).into();
        assert!(matches!(e, Error::FailedPrecondition(_)));
        let e: Error = journal::JournalError::Quota {
            pod: "p".into(),
            quota: 3,
        }
        .into();
        assert!(matches!(&e, Error::FailedPrecondition(m) if m.contains("quota of 3")));
        let e: Error = journal::JournalError::Tpm(tpm::TpmError::Gone).into();
        assert!(matches!(e, Error::Unavailable(_)));
        let mark = |source| fanotify::FanotifyError::Mark {
            path: "/proc/1/root".into(),
            source,
        };
        let e: Error = mark(nix::errno::Errno::ENOSPC).into();
        assert!(
            matches!(&e, Error::ResourceExhausted(m) if m.contains("fs.fanotify.max_user_marks"))
        );
        let e: Error = mark(nix::errno::Errno::EINVAL).into();
        assert!(matches!(e, Error::FailedPrecondition(_)));
    }
}
