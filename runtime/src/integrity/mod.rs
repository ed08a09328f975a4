//! Per-pod file integrity on stock kernels: the measurement engine and its
//! two sources (fanotify for executions and reads, the seccomp map guard for
//! executable mappings), the guards that make the rest impossible, the
//! measurement log and journal, TPM anchoring, appraisal policies and the
//! verifier of attestation evidence.

pub mod allowlist;
pub mod digest;
pub mod engine;
pub mod fanotify;
pub mod guard;
pub mod journal;
pub mod log;
pub mod mapguard;
pub mod tpm;
pub mod verify;
