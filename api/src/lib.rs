//! Generated gRPC code for the CRI v1 API (vendored upstream `api.proto` plus
//! `LinuxSandboxSecurityContext.ima = 3702`).

/// `runtime.v1`: the Kubernetes Container Runtime Interface.
pub mod runtime {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("runtime.v1");
    }
}

pub use runtime::v1 as cri;
