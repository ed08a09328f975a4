//! Per-pod file integrity on stock kernels: the fanotify measurement backend,
//! the measurement log and journal, TPM anchoring, appraisal policies and
//! the verifier of attestation evidence.

pub mod allowlist;
pub mod fanotify;
pub mod guard;
pub mod journal;
pub mod log;
pub mod tpm;
pub mod verify;
