//! What an attacker inside an ima pod would try to run code its owner
//! cannot see: executable mappings of memory-backed files (memfd, SysV shm),
//! of non-ELF files and through the loader (`ld.so FILE`), files mapped or
//! executed (fexecve) through an fd another process passed over a unix
//! socket (in the pod, or from a helper outside it), ptrace of the
//! entrypoint by an exec, `personality` tricks, 32-bit calls and
//! programs, a seccomp
//! listener of the process's own, other processes' roots (pause's
//! included), /dev/shm, scripts, and a file swapped in during the map
//! guard's check. Each works in a plain pod (the control); in an ima pod
//! each is measured (measure mode: its digest is in the log) or refused
//! (enforce mode with the image's golden policy: EPERM and a `deny` entry),
//! with kubelet's default (no seccomp profile) and with RuntimeDefault.
//! The rest of the attacker's tests: `ima_writes/` (files written while
//! or after they ran), `ima_crashes.rs` (imacri down mid-access),
//! `ima_floods/` (floods, quotas, a pod's CPU).

use imacri_integration::client::{create_container, exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, pod_config, Env};

mod idle;
mod mappings;
mod roots;
mod volumes;

/// How a file handed in over a unix socket can be executed.
const RECEIVED: [&str; 5] = [
    "recv-fexecve",
    "recv-proc",
    "recv-dirfd",
    "recv-cwd",
    "recv-chroot",
];
