//! The NRI protocol (github.com/containerd/nri v0.12.5, `pkg/api`): messages
//! and the ttrpc `Runtime` (served by imacri) and `Plugin` (served by each
//! plugin) services.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/_include.rs"));

pub use nri::pkg::api::v1alpha1 as api;
/// The prost these messages implement (0.13, not the workspace's).
pub use prost;
