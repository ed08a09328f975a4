//! Evidence between its wire form (`imacri.attestation.v1.Evidence`) and the
//! verifier's (`imacri_runtime::integrity::verify::Evidence`).

use imacri_api::attestation as pb;
use imacri_runtime::integrity::journal::Epoch;
use imacri_runtime::integrity::verify::{Evidence, QuoteEvidence};

pub use imacri_runtime::integrity::journal::view::MAX_EVIDENCE;

/// Evidence past [`MAX_EVIDENCE`] (or `limit`) fails with why and what
/// ends it, not with tonic's bare "encoded message length too large".
pub fn fits(ev: &pb::Evidence, limit: usize) -> imacri_runtime::Result<()> {
    use prost::Message;
    // The response wraps it: a tag and a length more.
    let len = ev.encoded_len() + 16;
    if len <= limit {
        return Ok(());
    }
    Err(imacri_runtime::Error::ResourceExhausted(format!(
        "the evidence for pod {} is {} MiB, past the {} MiB a Quote carries: it holds the node's measurement log for this TPM epoch from entry {} ({} entries, other pods' redacted) so that the PCR replays; ask from the entry a verifier last checked (QuoteRequest.from_entry; `imacri attest verify --counters FILE` keeps that checkpoint), or wait for the epoch to end with the node's next reboot",
        ev.pod_sandbox_id,
        len.div_ceil(1 << 20),
        limit >> 20,
        ev.log_start,
        ev.log.len()
    )))
}

pub fn epoch_to_proto(e: Epoch) -> pb::Epoch {
    pb::Epoch {
        reset_count: e.reset_count,
        restart_count: e.restart_count,
        started_at: e.started_at,
        broken: e.broken.unwrap_or_default(),
    }
}

pub fn epoch_from_proto(e: pb::Epoch) -> Epoch {
    Epoch {
        reset_count: e.reset_count,
        restart_count: e.restart_count,
        started_at: e.started_at,
        broken: (!e.broken.is_empty()).then_some(e.broken),
    }
}

pub fn to_proto(e: Evidence) -> pb::Evidence {
    pb::Evidence {
        pod_sandbox_id: e.pod_sandbox_id,
        backend: e.backend,
        anchored: e.anchored,
        pcr: e.pcr,
        epoch: Some(epoch_to_proto(e.epoch)),
        nonce: e.nonce,
        log: e.log,
        log_start: e.log_start,
        pod_log: e.pod_log,
        pod_log_start: e.pod_log_start,
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
    Evidence {
        pod_sandbox_id: e.pod_sandbox_id,
        backend: e.backend,
        anchored: e.anchored,
        pcr: e.pcr,
        epoch: epoch_from_proto(e.epoch.unwrap_or_default()),
        nonce: e.nonce,
        log: e.log,
        log_start: e.log_start,
        pod_log: e.pod_log,
        pod_log_start: e.pod_log_start,
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
    fn evidence_past_the_limit_says_why_and_what_ends_it() {
        let ev = pb::Evidence {
            pod_sandbox_id: "p".into(),
            log: vec!["x".repeat(300); 40],
            ..Default::default()
        };
        assert!(fits(&ev, 1 << 20).is_ok());
        let e = fits(&ev, 4096).unwrap_err();
        assert!(matches!(e, imacri_runtime::Error::ResourceExhausted(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("40 entries") && msg.contains("next reboot"),
            "{msg}"
        );
    }

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
            log_start: 7,
            pod_log: vec![],
            pod_log_start: 2,
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
