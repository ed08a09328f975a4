//! Measurement and attestation end to end, on this kernel's real fanotify,
//! real containers and a real TPM simulator (swtpm): executions are logged
//! and cached, a golden policy verifies, a dropped-in executable is caught
//! (and, under enforce, denied with EPERM), tampered logs, stale quotes and
//! foreign keys are rejected, and a restart keeps log and PCR in agreement.

use imacri_integration::attesting::{
    anchored_node, ima_pod, log_lines, save_quote, sleeper, verify,
};
use imacri_integration::client::{exec_sh, pod_info, run_pod, sh_ok, start_container};
use imacri_integration::{attest, container_config, cri, Env, Imacri};
use std::path::Path;
use std::time::{Duration, Instant};

mod access;
mod measured;
mod reads;
mod tpm;
