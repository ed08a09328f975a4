//! imacri's CRI layer: tonic services over the `runtime` crate, the daemon
//! that serves them on the CRI socket, and the CLI.

pub mod attest;
pub mod check;
pub mod daemon;
pub mod enroll;
pub mod evidence;
pub mod server;
pub mod streaming;
