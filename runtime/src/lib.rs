//! imacri's domain layer: everything below CRI. No gRPC server types live here;
//! the `cri` crate validates requests and maps [`Error`] to gRPC codes.

pub mod cdi;
pub mod cni;
pub mod config;
pub mod containerd;
pub mod crash;
pub mod error;
pub mod idmap;
pub mod ids;
pub mod image;
pub(crate) mod inbox;
pub mod integrity;
pub mod io;
pub mod logsink;
pub mod metrics;
pub mod mount;
pub mod netns;
pub mod nri;
pub mod pod;
pub mod podns;
pub mod seccomp;
pub mod spec;
pub mod stats;
pub mod store;
pub mod sysinfo;
pub mod user;
pub mod userns;

pub use error::{Error, Result};
