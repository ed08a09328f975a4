//! Enrollment, verifier side: proving that a node's attestation key (AK)
//! lives in the TPM whose endorsement key (EK) a trusted CA certified, or
//! the operator pinned. This is TCG's credential activation as Keylime's
//! registrar does it: the verifier checks the AK's public area, then
//! encrypts a fresh secret to the EK bound to the AK's name
//! (TPM2_MakeCredential, here in software: the verifier host has no TPM),
//! and only `TPM2_ActivateCredential` in the TPM that holds both keys
//! recovers it.
//!
//! The EK is the RSA 2048 EK of the TCG EK Credential Profile's template
//! L-1 (nameAlg SHA-256, AES-128-CFB), whose certificate TPMs carry at NV
//! index 0x01c00002: the one EK every TPM 2.0 certificate authority issues.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::{BigUint, Oaep, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{EccScheme, Public};
use tss_esapi::traits::{Marshall, UnMarshall};
use x509_parser::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("attestation key refused: {0}")]
    Ak(String),
    #[error("endorsement key refused: {0}")]
    Ek(String),
    #[error("EK certificate refused: {0}")]
    Certificate(String),
    #[error("making the credential: {0}")]
    Credential(String),
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An enrolled node's record that is not one (or was edited).
    #[error("{path}: {why}")]
    NodeFile {
        path: std::path::PathBuf,
        why: NodeFileError,
    },
}

/// What is wrong with an enrolled node's record ([`NodeIdentity::load`]).
#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    #[error("not an enrolled node's file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("ak.public_area: {0}")]
    PublicArea(#[from] hex::FromHexError),
    #[error(transparent)]
    Ak(Box<EnrollError>),
    #[error("the AK key or name does not match its public area")]
    Mismatch,
}

type Result<T> = std::result::Result<T, EnrollError>;

/// TPM_ALG_SHA256, the first two bytes of a SHA-256 name.
const ALG_SHA256: [u8; 2] = [0x00, 0x0b];

/// An AK whose public area passed [`check_ak`].
#[derive(Debug, Clone)]
pub struct CheckedAk {
    /// TPM name: nameAlg || SHA-256(TPMT_PUBLIC).
    pub name: Vec<u8>,
    /// Its public key as PEM SubjectPublicKeyInfo (what quotes verify with).
    pub pem: String,
}

/// Checks the AK's public area (a marshalled TPMT_PUBLIC) is a key the TPM
/// made and will never let out, usable only to sign what the TPM itself
/// produced (quotes): fixedTPM, fixedParent, sensitiveDataOrigin,
/// restricted, sign, no decrypt; ECDSA P-256 with SHA-256.
pub fn check_ak(public_area: &[u8]) -> Result<CheckedAk> {
    let ak = |m: &str| EnrollError::Ak(m.to_string());
    let public = Public::unmarshall(public_area)
        .map_err(|e| EnrollError::Ak(format!("not a TPMT_PUBLIC: {e}")))?;
    // The name the TPM computes covers these exact bytes: refuse any
    // encoding other than the one the parsed fields marshal to.
    match public.marshall() {
        Ok(b) if b == public_area => {}
        _ => return Err(ak("the public area is not canonically encoded")),
    }
    let a = public.object_attributes();
    for (set, what) in [
        (a.fixed_tpm(), "fixedTPM"),
        (a.fixed_parent(), "fixedParent"),
        (a.sensitive_data_origin(), "sensitiveDataOrigin"),
        (a.restricted(), "restricted"),
        (a.sign_encrypt(), "sign"),
    ] {
        if !set {
            return Err(EnrollError::Ak(format!(
                "{what} is not set: the key could exist outside the TPM or sign anything"
            )));
        }
    }
    if a.decrypt() {
        return Err(ak("it can decrypt: an attestation key must only sign"));
    }
    if public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(ak("its name algorithm is not SHA-256"));
    }
    let Public::Ecc {
        parameters, unique, ..
    } = &public
    else {
        return Err(ak("not an ECC key (imacri's AK is ECDSA P-256)"));
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(ak("not on curve P-256"));
    }
    match parameters.ecc_scheme() {
        EccScheme::EcDsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        _ => return Err(ak("its scheme is not ECDSA with SHA-256")),
    }
    let mut sec1 = vec![4u8];
    for c in [unique.x().value(), unique.y().value()] {
        if c.len() > 32 {
            return Err(ak("point coordinate longer than 32 bytes"));
        }
        sec1.extend(std::iter::repeat_n(0u8, 32 - c.len()));
        sec1.extend_from_slice(c);
    }
    let pem = super::verify::ak_pem(&sec1).map_err(|e| EnrollError::Ak(e.to_string()))?;
    let mut name = ALG_SHA256.to_vec();
    name.extend(Sha256::digest(public_area));
    Ok(CheckedAk { name, pem })
}

/// The EK a verifier encrypts to, and why it trusts it.
#[derive(Debug, Clone)]
pub struct TrustedEk {
    pub key: RsaPublicKey,
    /// "certificate issued by <issuer>, serial <n>" or "pinned".
    pub anchor: String,
}

impl TrustedEk {
    pub fn pem(&self) -> Result<String> {
        ek_pem(&self.key)
    }
}

/// An EK as PEM SubjectPublicKeyInfo (what `--ek-pubkey` pins).
pub fn ek_pem(key: &RsaPublicKey) -> Result<String> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| EnrollError::Ek(format!("encoding: {e}")))
}

/// The EK's RSA public key from its public area (marshalled TPMT_PUBLIC),
/// checked to be a storage-style EK of template L-1.
pub fn ek_from_public_area(public_area: &[u8]) -> Result<RsaPublicKey> {
    let ek = |m: &str| EnrollError::Ek(m.to_string());
    let public = Public::unmarshall(public_area)
        .map_err(|e| EnrollError::Ek(format!("not a TPMT_PUBLIC: {e}")))?;
    let Public::Rsa {
        object_attributes: a,
        parameters,
        unique,
        name_hashing_algorithm,
        ..
    } = &public
    else {
        return Err(ek("not an RSA key"));
    };
    if !(a.fixed_tpm() && a.restricted() && a.decrypt()) || a.sign_encrypt() {
        return Err(ek(
            "not a restricted decryption key fixed to its TPM (template L-1)",
        ));
    }
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(ek("its name algorithm is not SHA-256"));
    }
    let e = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    RsaPublicKey::new(BigUint::from_bytes_be(unique.value()), BigUint::from(e))
        .map_err(|e| EnrollError::Ek(format!("RSA key: {e}")))
}

/// An operator-pinned EK (PEM SubjectPublicKeyInfo, as `attest ek` prints).
pub fn ek_pinned(pem: &str) -> Result<TrustedEk> {
    let key = RsaPublicKey::from_public_key_pem(pem.trim())
        .map_err(|e| EnrollError::Ek(format!("pinned key is not an RSA PEM public key: {e}")))?;
    Ok(TrustedEk {
        key,
        anchor: "pinned by the operator".into(),
    })
}

/// Checks the EK certificate (DER, as read from the TPM's NV index, which
/// may pad it) chains to a certificate in `ca_pem` (roots and
/// intermediates the operator trusts, PEM), and returns its key.
pub fn ek_from_certificate(cert_der: &[u8], ca_pem: &[u8]) -> Result<TrustedEk> {
    let bad = |m: String| EnrollError::Certificate(m);
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let mut cas = Vec::new();
    for pem in Pem::iter_from_buffer(ca_pem) {
        let pem = pem.map_err(|e| bad(format!("CA file: {e}")))?;
        if pem.label == "CERTIFICATE" {
            cas.push(pem);
        }
    }
    if cas.is_empty() {
        return Err(bad("the CA file holds no certificate".into()));
    }
    let mut parsed = Vec::new();
    for p in &cas {
        parsed.push(
            p.parse_x509()
                .map_err(|e| bad(format!("CA file: a certificate does not parse: {e}")))?,
        );
    }
    let now = ASN1Time::now();
    if !cert.validity().is_valid_at(now) {
        return Err(bad("it is expired or not yet valid".into()));
    }
    // Walk up through the trusted set: every certificate on the way must
    // be valid, and every issuer a CA whose key signed the one below.
    let mut current = &cert;
    for _ in 0..8 {
        let issuer = parsed.iter().find(|ca| {
            ca.subject() == current.issuer()
                && current.verify_signature(Some(ca.public_key())).is_ok()
        });
        let Some(issuer) = issuer else {
            return Err(bad(format!(
                "no trusted CA certificate signed {:?} (issuer {:?})",
                if std::ptr::eq(current, &cert) {
                    "the EK certificate".to_string()
                } else {
                    current.subject().to_string()
                },
                current.issuer().to_string()
            )));
        };
        let is_ca = matches!(issuer.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(bad(format!(
                "{} signed it but is not a CA certificate",
                issuer.subject()
            )));
        }
        if !issuer.validity().is_valid_at(now) {
            return Err(bad(format!("CA {} is expired", issuer.subject())));
        }
        if issuer.subject() == issuer.issuer() {
            let key = RsaPublicKey::from_public_key_der(cert.public_key().raw).map_err(|e| {
                bad(format!(
                    "its key is not RSA (imacri enrolls the RSA 2048 EK): {e}"
                ))
            })?;
            return Ok(TrustedEk {
                key,
                anchor: format!(
                    "certificate serial {} issued by {} (root {})",
                    cert.raw_serial_as_string(),
                    cert.issuer(),
                    issuer.subject()
                ),
            });
        }
        current = issuer;
    }
    Err(bad("the chain is longer than 8 certificates".into()))
}

/// The certificate as PEM, without any padding the NV index added.
pub fn certificate_pem(der: &[u8]) -> Result<String> {
    use base64::Engine;
    let (rest, _) = X509Certificate::from_der(der)
        .map_err(|e| EnrollError::Certificate(format!("not an X.509 certificate: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der[..der.len() - rest.len()]);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    Ok(pem)
}

/// A credential for the TPM holding `ek` to unwrap, bound to `ak_name`.
#[derive(Debug, Clone)]
pub struct Credential {
    /// TPM2B_ID_OBJECT's buffer: integrity HMAC (as TPM2B) || encIdentity.
    pub blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET's buffer: the seed, RSA-OAEP encrypted.
    pub encrypted_secret: Vec<u8>,
}

/// TPM2_MakeCredential (TPM 2.0 Part 1, "Credential Protection") for an
/// RSA EK with SHA-256 name algorithm and AES-128-CFB.
pub fn make_credential(ek: &RsaPublicKey, ak_name: &[u8], secret: &[u8]) -> Result<Credential> {
    if secret.is_empty() || secret.len() > 32 {
        return Err(EnrollError::Credential(
            "the secret must be 1 to 32 bytes".into(),
        ));
    }
    let seed: [u8; 32] = rand::random();
    let encrypted_secret = ek
        .encrypt(
            &mut rand::thread_rng(),
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| EnrollError::Credential(format!("RSA-OAEP: {e}")))?;
    Ok(wrap(&seed, ak_name, secret, encrypted_secret))
}

/// The symmetric half of MakeCredential, given the seed.
fn wrap(seed: &[u8], ak_name: &[u8], secret: &[u8], encrypted_secret: Vec<u8>) -> Credential {
    let sym_key = kdfa(seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = (secret.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(secret);
    // AES-128-CFB with a zero IV: the key is fresh for every seed.
    let iv = [0u8; 16];
    cfb_mode::Encryptor::<Aes128>::new(sym_key.as_slice().into(), &iv.into())
        .encrypt(&mut enc_identity);
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let mut mac = hmac_sha256(&hmac_key);
    mac.update(&enc_identity);
    mac.update(ak_name);
    let integrity = mac.finalize().into_bytes();
    let mut blob = (integrity.len() as u16).to_be_bytes().to_vec();
    blob.extend_from_slice(&integrity);
    blob.extend_from_slice(&enc_identity);
    Credential {
        blob,
        encrypted_secret,
    }
}

fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    }
}

/// KDFa (TPM 2.0 Part 1, SP 800-108 counter mode with HMAC-SHA-256); the
/// label is hashed with its terminating zero, as the TPM does.
fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter = 1u32;
    while out.len() < bytes {
        let mut m = hmac_sha256(key);
        m.update(&counter.to_be_bytes());
        m.update(label.as_bytes());
        m.update(&[0]);
        m.update(context_u);
        m.update(context_v);
        m.update(&bits.to_be_bytes());
        out.extend_from_slice(&m.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// What a verifier keeps about an enrolled node (`attest enroll --out`):
/// `verify` and `watch` trust quotes from this AK only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeIdentity {
    pub version: u32,
    /// The node's own name for itself (informational).
    pub hostname: String,
    /// Unix seconds.
    pub enrolled_at: i64,
    pub pcr: u32,
    pub ek: EkRecord,
    pub ak: AkRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EkRecord {
    pub public_key_pem: String,
    /// Why the EK was trusted.
    pub anchor: String,
    /// The EK certificate as the TPM held it, PEM; empty when pinned.
    #[serde(default)]
    pub certificate_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AkRecord {
    pub public_key_pem: String,
    /// Hex of the TPM name (SHA-256 name algorithm).
    pub name: String,
    /// Hex of the marshalled TPMT_PUBLIC.
    pub public_area: String,
}

impl NodeIdentity {
    pub fn load(path: &std::path::Path) -> Result<NodeIdentity> {
        let text = std::fs::read_to_string(path).map_err(|source| EnrollError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_record(&text).map_err(|why| EnrollError::NodeFile {
            path: path.to_path_buf(),
            why,
        })
    }

    fn from_record(text: &str) -> std::result::Result<NodeIdentity, NodeFileError> {
        let n: NodeIdentity = serde_json::from_str(text)?;
        // The record's key must be the one its public area (whose name the
        // TPM proved) describes: a hand-edited key is refused.
        let area = hex::decode(&n.ak.public_area)?;
        let ak = check_ak(&area).map_err(|e| NodeFileError::Ak(Box::new(e)))?;
        if ak.pem.trim() != n.ak.public_key_pem.trim() || hex::encode(&ak.name) != n.ak.name {
            return Err(NodeFileError::Mismatch);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_labels() {
        let a = kdfa(b"seed", "STORAGE", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        let b = kdfa(b"seed", "INTEGRITY", &[], &[], 256);
        assert_eq!(b.len(), 32);
        assert_ne!(a, b[..16]);
        // Longer than one block: the counter moves on.
        let c = kdfa(b"seed", "X", &[], &[], 512);
        assert_ne!(c[..32], c[32..]);
    }

    #[test]
    fn credential_binds_the_name() {
        let seed = [7u8; 32];
        let a = wrap(&seed, b"\x00\x0bname-a", b"secret", vec![]);
        let b = wrap(&seed, b"\x00\x0bname-b", b"secret", vec![]);
        // Same layout, different key stream and integrity.
        assert_eq!(a.blob.len(), 2 + 32 + 2 + 6);
        assert_eq!(&a.blob[..2], &[0, 32]);
        assert_ne!(a.blob, b.blob);
    }

    /// A public area shaped like imacri's AK (what the TPM returns), with
    /// a real P-256 point.
    fn ak_area() -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use tss_esapi::attributes::ObjectAttributesBuilder;
        use tss_esapi::interface_types::algorithm::PublicAlgorithm;
        use tss_esapi::structures::{
            EccParameter, EccPoint, HashScheme, KeyDerivationFunctionScheme, PublicBuilder,
            PublicEccParametersBuilder, SymmetricDefinitionObject,
        };
        let key = p256::SecretKey::random(&mut rand::thread_rng()).public_key();
        let point = key.to_encoded_point(false);
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_restricted(true)
            .with_sign_encrypt(true)
            .build()
            .unwrap();
        let params = PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(true)
            .with_is_decryption_key(false)
            .with_restricted(true)
            .with_symmetric(SymmetricDefinitionObject::Null)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()
            .unwrap();
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(params)
            .with_ecc_unique_identifier(EccPoint::new(
                EccParameter::try_from(point.x().unwrap().to_vec()).unwrap(),
                EccParameter::try_from(point.y().unwrap().to_vec()).unwrap(),
            ))
            .build()
            .unwrap()
            .marshall()
            .unwrap()
    }

    #[test]
    fn ak_attributes_are_checked() {
        let area = ak_area();
        let ak = check_ak(&area).unwrap();
        assert_eq!(&ak.name[..2], &ALG_SHA256);
        assert_eq!(&ak.name[2..], Sha256::digest(&area).as_slice());
        // objectAttributes: bytes 4..8, big endian.
        for (bit, set, what) in [
            (1, false, "fixedTPM"),
            (4, false, "fixedParent"),
            (5, false, "sensitiveDataOrigin"),
            (16, false, "restricted"),
            (18, false, "sign"),
            (17, true, "decrypt"),
        ] {
            let mut a = area.clone();
            let mut attrs = u32::from_be_bytes([a[4], a[5], a[6], a[7]]);
            if set {
                attrs |= 1 << bit;
            } else {
                attrs &= !(1 << bit);
            }
            a[4..8].copy_from_slice(&attrs.to_be_bytes());
            match check_ak(&a) {
                Err(EnrollError::Ak(m)) => assert!(m.contains(what), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // Trailing bytes change the name the TPM would compute: refused.
        let mut long = area.clone();
        long.push(0);
        assert!(check_ak(&long).is_err());
    }

    #[test]
    fn garbage_public_areas_are_refused() {
        assert!(matches!(check_ak(b"\x00\x01"), Err(EnrollError::Ak(_))));
        assert!(matches!(
            ek_from_public_area(b"junk"),
            Err(EnrollError::Ek(_))
        ));
        assert!(ek_pinned("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
        assert!(matches!(
            ek_from_certificate(b"not der", b""),
            Err(EnrollError::Certificate(_))
        ));
    }
}
