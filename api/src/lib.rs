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

/// `imacri.attestation.v1`: evidence about ima pods for remote verifiers.
pub mod attestation {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("imacri.attestation.v1");
}

#[cfg(test)]
mod tests {
    use super::cri;
    use prost::Message;

    /// `ima` is field 3702, so a kubelet's supplemental_groups_policy
    /// (field 11) = Strict never reads as `ima: true`.
    #[test]
    fn ima_does_not_alias_supplemental_groups_policy() {
        let strict = cri::LinuxSandboxSecurityContext {
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..Default::default()
        };
        let decoded =
            cri::LinuxSandboxSecurityContext::decode(strict.encode_to_vec().as_slice()).unwrap();
        assert!(!decoded.ima);
        let ima = cri::LinuxSandboxSecurityContext {
            ima: true,
            ..Default::default()
        };
        // Key (3702 << 3 | varint) as a varint is b0 e7 01, then the value 1.
        assert_eq!(ima.encode_to_vec(), vec![0xb0, 0xe7, 0x01, 0x01]);
    }

    #[test]
    fn upstream_rpcs_are_generated() {
        // Compile-time check that the Stream* RPCs of the current upstream
        // api.proto exist.
        let _ = cri::StreamPodSandboxesRequest::default();
        let _ = cri::StreamImagesResponse::default();
        let _ = cri::UpdatePodSandboxResourcesRequest::default();
    }
}
