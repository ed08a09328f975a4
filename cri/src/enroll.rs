//! `imacri attest enroll` and `attest ek`: the verifier's side of enrolling
//! a node (see `imacri_runtime::integrity::enroll` for the checks). The
//! verifier trusts the node's EK only through a CA certificate or an
//! operator's pin, and the AK only once the node's TPM has answered a
//! credential made for that EK and bound to that AK's name.

use crate::attest::rpc;
use anyhow::{anyhow, bail, Context, Result};
use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_client::AttestationClient;
use imacri_runtime::integrity::enroll::{self, AkRecord, EkRecord, NodeIdentity};
use std::path::Path;
use tonic::transport::Channel;

async fn enrollment(c: &mut AttestationClient<Channel>) -> Result<pb::GetEnrollmentResponse> {
    Ok(c.get_enrollment(pb::GetEnrollmentRequest {})
        .await
        .map_err(|s| rpc("GetEnrollment", s))?
        .into_inner())
}

/// `attest ek`: the node's EK public key, PEM, for an operator to pin
/// when the TPM carries no EK certificate (read it while the node is
/// known good, e.g. at provisioning).
pub async fn ek(c: &mut AttestationClient<Channel>) -> Result<String> {
    let e = enrollment(c).await?;
    let key = enroll::ek_from_public_area(&e.ek_public)?;
    Ok(enroll::ek_pem(&key)?)
}

/// `attest enroll`: check EK and AK, challenge the node, and return what
/// the verifier keeps.
pub async fn enroll(
    c: &mut AttestationClient<Channel>,
    ek_ca: Option<&Path>,
    ek_pin: Option<&Path>,
) -> Result<NodeIdentity> {
    let e = enrollment(c).await?;
    let ek = match (ek_pin, ek_ca) {
        (Some(pin), _) => {
            let text = std::fs::read_to_string(pin)
                .with_context(|| format!("reading {}", pin.display()))?;
            enroll::ek_pinned(&text)?
        }
        (None, Some(ca)) => {
            if e.ek_certificate.is_empty() {
                bail!(
                    "the node's TPM holds no EK certificate (NV index 0x01c00002): pin its EK instead \
                     (--ek-pubkey, from `imacri attest ek` run while the node is known good)"
                );
            }
            let ca_pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            enroll::ek_from_certificate(&e.ek_certificate, &ca_pem)?
        }
        (None, None) => bail!(
            "nothing to trust the node's EK with: give --ek-ca (the TPM vendor's CA certificates) \
             or --ek-pubkey (a pinned EK public key)"
        ),
    };
    // The node's own EK must be the trusted one (a mismatch would only
    // fail activation later, less clearly).
    let node_ek = enroll::ek_from_public_area(&e.ek_public)?;
    if node_ek != ek.key {
        bail!(
            "endorsement key refused: the node's EK is not the one its {} names",
            if ek_pin.is_some() {
                "pin"
            } else {
                "certificate"
            }
        );
    }
    let ak = enroll::check_ak(&e.ak_public)?;
    // The challenge: a fresh secret only the TPM holding this EK can
    // unwrap, and only for an object named `ak.name` loaded in it.
    let secret: [u8; 32] = rand::random();
    let cred = enroll::make_credential(&ek.key, &ak.name, &secret)?;
    let answer = c
        .activate_credential(pb::ActivateCredentialRequest {
            credential_blob: cred.blob,
            encrypted_secret: cred.encrypted_secret,
        })
        .await
        .map_err(|s| {
            anyhow!(
                "attestation key refused: the node could not activate the credential \
                 (its AK is not in the TPM whose EK was trusted): {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    if answer.secret.len() != secret.len() || !constant_time_eq(&answer.secret, &secret) {
        bail!(
            "attestation key refused: the node's answer is not the credential's secret \
             (a replayed or forged answer)"
        );
    }
    Ok(NodeIdentity {
        version: 1,
        hostname: e.hostname,
        enrolled_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default(),
        pcr: e.pcr,
        ek: EkRecord {
            public_key_pem: ek.pem()?,
            anchor: ek.anchor.clone(),
            certificate_pem: if ek_pin.is_none() && !e.ek_certificate.is_empty() {
                enroll::certificate_pem(&e.ek_certificate)?
            } else {
                String::new()
            },
        },
        ak: AkRecord {
            public_key_pem: ak.pem,
            name: hex::encode(&ak.name),
            public_area: hex::encode(&e.ak_public),
        },
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
