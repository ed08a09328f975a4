//! The quote's part of verification: the AK, its signature over
//! TPMS_ATTEST, the nonce, the PCR it covers and the TPM's counters.

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo, PcrSlot};
use tss_esapi::traits::UnMarshall;

use super::{Evidence, Expectations, TpmCounters};

/// Checks the quote; returns the TPM's counters when its signature holds.
pub(super) fn check_quote(
    ev: &Evidence,
    x: &Expectations<'_>,
    errors: &mut Vec<String>,
) -> Option<TpmCounters> {
    let Some(q) = &ev.quote else {
        errors.push("anchored evidence without a quote".into());
        return None;
    };
    let ak_pem = match x.ak_pem {
        Some(pinned) => {
            if normalize(pinned) != normalize(&ev.ak_public_pem) {
                errors.push("the evidence's attestation key is not the registered one".into());
            }
            pinned
        }
        None => ev.ak_public_pem.as_str(),
    };
    let key = match p256::ecdsa::VerifyingKey::from_public_key_pem(ak_pem.trim()) {
        Ok(k) => k,
        Err(e) => {
            errors.push(format!(
                "attestation key is not a P-256 PEM public key: {e}"
            ));
            return None;
        }
    };
    let sig = match (
        <[u8; 32]>::try_from(q.signature_r.as_slice()),
        <[u8; 32]>::try_from(q.signature_s.as_slice()),
    ) {
        (Ok(r), Ok(s)) => p256::ecdsa::Signature::from_scalars(r, s).ok(),
        _ => None,
    };
    let signed = match sig {
        Some(sig) if key.verify(&q.attest, &sig).is_ok() => true,
        _ => {
            errors.push("the quote's signature does not verify with the attestation key".into());
            false
        }
    };
    let attest = match Attest::unmarshall(&q.attest) {
        Ok(a) => a,
        Err(e) => {
            errors.push(format!("the quote is not a TPMS_ATTEST: {e}"));
            return None;
        }
    };
    if attest.attestation_type() != AttestationType::Quote {
        errors.push("the attestation is not a quote".into());
    }
    if attest.extra_data().value() != x.nonce {
        errors.push("the quote does not carry the nonce sent (stale or replayed quote)".into());
    }
    if let AttestInfo::Quote { info } = attest.attested() {
        let sel = info.pcr_selection().get_selections();
        let want = PcrSlot::try_from(1u32 << ev.pcr.min(31)).ok();
        let ok = sel.len() == 1
            && sel[0].hashing_algorithm() == HashingAlgorithm::Sha256
            && want.is_some_and(|w| sel[0].selected() == vec![w]);
        if !ok {
            errors.push(format!(
                "the quote does not cover exactly sha256 PCR {}",
                ev.pcr
            ));
        }
        let digest = Sha256::digest(&q.pcr_value);
        if info.pcr_digest().value() != digest.as_slice() {
            errors.push("the reported PCR value is not the one the TPM quoted".into());
        }
    }
    if ev.epoch.reset_count != Some(attest.clock_info().reset_count()) {
        errors.push(format!(
            "the log is from TPM epoch {:?} but the TPM is in epoch {} (rebooted since)",
            ev.epoch.reset_count,
            attest.clock_info().reset_count()
        ));
    }
    let ci = attest.clock_info();
    let now = TpmCounters {
        reset_count: ci.reset_count(),
        restart_count: ci.restart_count(),
        clock: ci.clock(),
    };
    if let Some(last) = x.last_seen {
        if now < last {
            errors.push(format!(
                "the TPM's counters went backwards (reset {}, restart {}, clock {} after reset {}, restart {}, clock {} seen before): a replayed quote or another TPM",
                now.reset_count, now.restart_count, now.clock, last.reset_count, last.restart_count, last.clock
            ));
        }
    }
    signed.then_some(now)
}

fn normalize(pem: &str) -> String {
    pem.split_whitespace().collect()
}
