//! Floods an attacker inside an ima pod can make: new paths past the log's
//! quota, refused accesses repeated, huge files, held mapping calls, files
//! mapped shared and writable (each held open), a pod at its CPU limit. Each is bounded and paid for by the pod; other pods
//! are not held up.

use imacri_integration::client::{exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, Env};

mod cpu;
mod gone;
mod held;
mod quota;
mod watches;

/// The tests that time what a pod sees or pays hold this alone, the others
/// share it: beside another test's load (two huge files hashed at a full
/// core each, on two cores) the bystander's new executions took up to 75 ms
/// in `make test` (p50 2.4 ms where they take 1 ms alone), which says
/// nothing about the throttled pod.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
