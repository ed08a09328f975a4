//! Evidence between its wire form (`imacri.attestation.v1.Evidence`) and the
//! verifier's (`imacri_runtime::integrity::verify::Evidence`).

use imacri_api::attestation as pb;
use imacri_runtime::integrity::journal::Epoch;
use imacri_runtime::integrity::verify::{Evidence, QuoteEvidence};

pub fn to_proto(e: Evidence) -> pb::Evidence {
    pb::Evidence {
        pod_sandbox_id: e.pod_sandbox_id,
        backend: e.backend,
        anchored: e.anchored,
        pcr: e.pcr,
        epoch: Some(pb::Epoch {
            reset_count: e.epoch.reset_count,
            restart_count: e.epoch.restart_count,
            started_at: e.epoch.started_at,
            broken: e.epoch.broken.unwrap_or_default(),
        }),
        nonce: e.nonce,
        log: e.log,
        pod_log: e.pod_log,
        quote: e.quote.map(|q| pb::Quote {
            attest: q.attest,
            signature_r: q.signature_r,
            signature_s: q.signature_s,
            pcr_value: q.pcr_value,
        }),
        ak_public_pem: e.ak_public_pem,
    }
}

pub fn from_proto(e: pb::Evidence) -> Evidence {
    let epoch = e.epoch.unwrap_or_default();
    Evidence {
        pod_sandbox_id: e.pod_sandbox_id,
        backend: e.backend,
        anchored: e.anchored,
        pcr: e.pcr,
        epoch: Epoch {
            reset_count: epoch.reset_count,
            restart_count: epoch.restart_count,
            started_at: epoch.started_at,
            broken: (!epoch.broken.is_empty()).then_some(epoch.broken),
        },
        nonce: e.nonce,
        log: e.log,
        pod_log: e.pod_log,
        quote: e.quote.map(|q| QuoteEvidence {
            attest: q.attest,
            signature_r: q.signature_r,
            signature_s: q.signature_s,
            pcr_value: q.pcr_value,
        }),
        ak_public_pem: e.ak_public_pem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let e = Evidence {
            pod_sandbox_id: "p".into(),
            backend: "fanotify".into(),
            anchored: true,
            pcr: 15,
            epoch: Epoch {
                reset_count: Some(3),
                restart_count: Some(0),
                started_at: 5,
                broken: None,
            },
            nonce: vec![1; 16],
            log: vec!["a".into()],
            pod_log: vec![],
            quote: Some(QuoteEvidence {
                attest: vec![1],
                signature_r: vec![2],
                signature_s: vec![3],
                pcr_value: vec![4],
            }),
            ak_public_pem: "pem".into(),
        };
        assert_eq!(from_proto(to_proto(e.clone())), e);
    }
}
