//! Files written while or after they run: a mapped file rewritten in place
//! (ToMToU) or truncated, a script rewritten under its interpreter, a
//! program's loader rewritten under the program, a lease
//! holder that would stall the engine, and a gone container's watches,
//! which must hold up no open.

use imacri_integration::client::{exec_sh, exec_sh_within, run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};

mod leases;
mod races;
mod rewritten;
mod shared;
