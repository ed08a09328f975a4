//! The TPM, through tss-esapi: PCR extends, PCR reads and quotes by an
//! attestation key. An ESAPI context blocks on every command, so it lives
//! on one dedicated thread; callers send commands over a channel, which also
//! keeps them in order (a quote sees every extend queued before it).
//!
//! Attestation key: a restricted ECC P-256 ECDSA-SHA256 signing key under the
//! endorsement key (the EK is a primary key re-derived from the TPM's seed at
//! every start, so the AK blobs saved under imacri's root load again). Being
//! in the endorsement hierarchy also keeps the quote's reset and restart
//! counters unobfuscated, which the verifier needs to tell epochs apart.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, HashScheme, IdObject, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Private, Public, Signature, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("TPM TCTI {tcti:?}: {source}")]
    Open {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM {op}: {source}")]
    Command {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM: {0}")]
    Other(String),
    /// The caller's input, refused by the TPM or before it.
    #[error("{0}")]
    Refused(String),
    #[error("the TPM thread has stopped")]
    Gone,
}

type TResult<T> = std::result::Result<T, TpmError>;

fn cmd<T>(op: &'static str, r: tss_esapi::Result<T>) -> TResult<T> {
    r.map_err(|source| TpmError::Command { op, source })
}

/// A quote with what a verifier needs to check it.
#[derive(Debug, Clone)]
pub struct Quote {
    /// TPMS_ATTEST as the TPM marshalled it (what the signature covers).
    pub attest: Vec<u8>,
    /// ECDSA r and s, 32 bytes each.
    pub signature_r: Vec<u8>,
    pub signature_s: Vec<u8>,
    /// The quoted PCR's value, read in the same command sequence.
    pub pcr_value: [u8; 32],
    pub reset_count: u32,
    pub restart_count: u32,
}

/// What a verifier enrolls this TPM with (see `enroll`).
#[derive(Debug, Clone)]
pub struct Endorsement {
    /// The RSA 2048 EK certificate (DER) from NV index 0x01c00002, if the
    /// TPM's manufacturer (or `swtpm_setup --create-ek-cert`) stored one.
    pub certificate: Option<Vec<u8>>,
    /// The RSA 2048 EK's public area (marshalled TPMT_PUBLIC, template L-1).
    pub public_area: Vec<u8>,
}

type Reply<T> = tokio::sync::oneshot::Sender<TResult<T>>;

enum Cmd {
    /// Fire and forget: a failure is logged (the log then no longer replays).
    Extend([u8; 32]),
    Quote(Vec<u8>, Reply<Quote>),
    Endorsement(Reply<Endorsement>),
    /// TPM2_ActivateCredential for the AK with the RSA EK: (blob, secret).
    Activate(Vec<u8>, Vec<u8>, Reply<Vec<u8>>),
}

/// Handle to the TPM thread. Cheap to clone.
#[derive(Clone)]
pub struct Tpm {
    tx: mpsc::Sender<Cmd>,
    pcr: u32,
    /// The AK's public point, SEC1 uncompressed (0x04 || x || y).
    ak_sec1: Vec<u8>,
    /// The AK's public area (marshalled TPMT_PUBLIC), whose hash is its name.
    ak_public: Vec<u8>,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").field("pcr", &self.pcr).finish()
    }
}

impl Tpm {
    /// Opens the TPM, loads or creates the AK (blobs in `key_dir`) and starts
    /// the TPM thread. Blocking: call from a blocking context.
    pub fn open(tcti: &str, pcr: u32, key_dir: &Path) -> TResult<Tpm> {
        if pcr > 23 {
            return Err(TpmError::Other(format!("PCR {pcr} does not exist (0-23)")));
        }
        let mut ctx = context(tcti)?;
        flush_stale(&mut ctx);
        let ek = cmd(
            "creating the endorsement key",
            ek::create_ek_object_2(
                &mut ctx,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                None,
            ),
        )?;
        let loaded = load_or_create_ak(&mut ctx, ek, key_dir);
        // The AK stays loaded without its parent: free the slot (a TPM
        // holds only a few objects, and enrollment loads the RSA EK).
        let _ = ctx.flush_context(ek.into());
        let (ak, public) = loaded?;
        let ak_public = cmd("marshalling the AK", public.marshall())?;
        let ak_sec1 = match &public {
            Public::Ecc { unique, .. } => {
                let mut v = vec![4u8];
                v.extend(pad32(unique.x().value()));
                v.extend(pad32(unique.y().value()));
                v
            }
            _ => return Err(TpmError::Other("the AK is not an ECC key".into())),
        };
        let (tx, rx) = mpsc::channel();
        let selection = selection(pcr)?;
        let handle = PcrHandle::try_from(pcr).map_err(|source| TpmError::Command {
            op: "PCR handle",
            source,
        })?;
        std::thread::Builder::new()
            .name("imacri-tpm".into())
            .spawn(move || serve(ctx, ak, handle, selection, rx))
            .map_err(|e| TpmError::Other(format!("starting the TPM thread: {e}")))?;
        Ok(Tpm {
            tx,
            pcr,
            ak_sec1,
            ak_public,
        })
    }

    pub fn pcr(&self) -> u32 {
        self.pcr
    }

    pub fn ak_sec1(&self) -> &[u8] {
        &self.ak_sec1
    }

    pub fn ak_public_area(&self) -> &[u8] {
        &self.ak_public
    }

    /// The EK certificate and public area a verifier enrolls with.
    pub async fn endorsement(&self) -> TResult<Endorsement> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Cmd::Endorsement(tx))
            .map_err(|_| TpmError::Gone)?;
        rx.await.map_err(|_| TpmError::Gone)?
    }

    /// Recovers a verifier's credential secret, which only this TPM can,
    /// and only for a credential bound to this AK's name.
    pub async fn activate_credential(&self, blob: Vec<u8>, secret: Vec<u8>) -> TResult<Vec<u8>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Cmd::Activate(blob, secret, tx))
            .map_err(|_| TpmError::Gone)?;
        rx.await.map_err(|_| TpmError::Gone)?
    }

    /// Queues an extend; errors are logged by the TPM thread.
    pub fn extend_queued(&self, template_hash: [u8; 32]) {
        let _ = self.tx.send(Cmd::Extend(template_hash));
    }

    /// Queues a quote now (ordered after every extend queued so far).
    pub fn quote_request(&self, nonce: Vec<u8>) -> tokio::sync::oneshot::Receiver<TResult<Quote>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Cmd::Quote(nonce, tx));
        rx
    }

    pub fn quote_blocking(&self, nonce: Vec<u8>) -> TResult<Quote> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Cmd::Quote(nonce, tx))
            .map_err(|_| TpmError::Gone)?;
        rx.blocking_recv().map_err(|_| TpmError::Gone)?
    }
}

fn context(tcti: &str) -> TResult<Context> {
    let open = |source| TpmError::Open {
        tcti: tcti.into(),
        source,
    };
    Context::new(TctiNameConf::from_str(tcti).map_err(open)?).map_err(open)
}

/// Opens the TPM and reads the PCR, creating nothing (for `imacri check`).
pub fn probe(tcti: &str, pcr: u32) -> TResult<[u8; 32]> {
    read_pcr(&mut context(tcti)?, &selection(pcr)?)
}

/// Whether the TPM holds an RSA 2048 EK certificate (for `imacri check`).
pub fn has_ek_certificate(tcti: &str) -> bool {
    context(tcti).is_ok_and(|mut ctx| {
        ek::retrieve_ek_pubcert(
            &mut ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .is_ok()
    })
}

fn read_pcr(ctx: &mut Context, sel: &PcrSelectionList) -> TResult<[u8; 32]> {
    let (_, _, values) = cmd("reading the PCR", ctx.pcr_read(sel.clone()))?;
    values
        .value()
        .first()
        .and_then(|d| <[u8; 32]>::try_from(d.value()).ok())
        .ok_or_else(|| TpmError::Other("the TPM has no sha256 bank for the PCR".into()))
}

/// Flushes transient objects and sessions a killed imacri left in a TPM
/// without a resource manager (swtpm over TCP; /dev/tpmrm0 shows none), so
/// restarts do not exhaust the TPM's few object slots.
fn flush_stale(ctx: &mut Context) {
    use tss_esapi::constants::tss::{TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST};
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    for first in [TPM2_TRANSIENT_FIRST, TPM2_LOADED_SESSION_FIRST] {
        let Ok((CapabilityData::Handles(list), _)) =
            ctx.get_capability(CapabilityType::Handles, first, 64)
        else {
            continue;
        };
        for h in list.into_inner() {
            if let Ok(obj) = ctx.tr_from_tpm_public(h) {
                let _ = ctx.flush_context(obj);
            }
        }
    }
}

fn pad32(v: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32usize.saturating_sub(v.len())];
    out.extend_from_slice(v);
    out
}

fn selection(pcr: u32) -> TResult<PcrSelectionList> {
    let slot = PcrSlot::try_from(1u32 << pcr).map_err(|source| TpmError::Command {
        op: "PCR slot",
        source,
    })?;
    cmd(
        "PCR selection",
        PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[slot])
            .build(),
    )
}

fn ak_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ak.pub"), dir.join("ak.priv"))
}

fn load_or_create_ak(ctx: &mut Context, ek: KeyHandle, dir: &Path) -> TResult<(KeyHandle, Public)> {
    let (pub_path, priv_path) = ak_paths(dir);
    if let (Ok(pb), Ok(pv)) = (std::fs::read(&pub_path), std::fs::read(&priv_path)) {
        let loaded = Public::unmarshall(&pb)
            .and_then(|public| Ok((public, Private::try_from(pv)?)))
            .and_then(|(public, private)| {
                Ok((ak::load_ak(ctx, ek, None, private, public.clone())?, public))
            });
        match loaded {
            Ok(k) => return Ok(k),
            // Another TPM (or a cleared one): its EK cannot load our AK.
            Err(e) => {
                tracing::warn!(error = %e, "saved attestation key does not load; creating a new one")
            }
        }
    }
    let created = cmd(
        "creating the attestation key",
        ak::create_ak_2(
            ctx,
            ek,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        ),
    )?;
    let pb = cmd("marshalling the AK", created.out_public.marshall())?;
    std::fs::create_dir_all(dir).map_err(|e| TpmError::Other(format!("{}: {e}", dir.display())))?;
    for (p, b) in [
        (&pub_path, pb.as_slice()),
        (&priv_path, created.out_private.value()),
    ] {
        crate::store::write_atomic(p, b)
            .map_err(|e| TpmError::Other(format!("saving the AK: {e}")))?;
    }
    let handle = cmd(
        "loading the attestation key",
        ak::load_ak(
            ctx,
            ek,
            None,
            created.out_private.clone(),
            created.out_public.clone(),
        ),
    )?;
    tracing::info!(dir = %dir.display(), "created a new attestation key");
    Ok((handle, created.out_public))
}

fn serve(
    mut ctx: Context,
    ak: KeyHandle,
    pcr: PcrHandle,
    sel: PcrSelectionList,
    rx: mpsc::Receiver<Cmd>,
) {
    // Read once: the certificate and the EK never change while we run.
    let mut endorsement: Option<Endorsement> = None;
    while let Ok(c) = rx.recv() {
        match c {
            Cmd::Extend(th) => {
                let r = Digest::try_from(th.to_vec()).and_then(|d| {
                    let mut v = DigestValues::new();
                    v.set(HashingAlgorithm::Sha256, d);
                    ctx.execute_with_nullauth_session(|c| c.pcr_extend(pcr, v))
                });
                if let Err(e) = cmd("extending the PCR", r) {
                    tracing::error!(error = %e, "TPM extend failed: the log no longer replays to the PCR");
                }
            }
            Cmd::Quote(nonce, tx) => {
                let r = (|| {
                    let data = cmd("nonce", Data::try_from(nonce))?;
                    let (attest, sig) = cmd(
                        "quoting",
                        ctx.execute_with_nullauth_session(|c| {
                            c.quote(
                                ak,
                                data,
                                SignatureScheme::EcDsa {
                                    hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                                },
                                sel.clone(),
                            )
                        }),
                    )?;
                    // Commands run in order on this thread: nothing extends between.
                    let pcr_value = read_pcr(&mut ctx, &sel)?;
                    let Signature::EcDsa(s) = sig else {
                        return Err(TpmError::Other("the quote is not ECDSA-signed".into()));
                    };
                    Ok(Quote {
                        reset_count: attest.clock_info().reset_count(),
                        restart_count: attest.clock_info().restart_count(),
                        attest: cmd("marshalling the quote", attest.marshall())?,
                        signature_r: pad32(s.signature_r().value()),
                        signature_s: pad32(s.signature_s().value()),
                        pcr_value,
                    })
                })();
                let _ = tx.send(r);
            }
            Cmd::Endorsement(tx) => {
                if endorsement.is_none() {
                    match read_endorsement(&mut ctx) {
                        Ok(e) => endorsement = Some(e),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            continue;
                        }
                    }
                }
                let _ = tx.send(endorsement.clone().ok_or(TpmError::Gone));
            }
            Cmd::Activate(blob, secret, tx) => {
                let _ = tx.send(activate(&mut ctx, ak, blob, secret));
            }
        }
    }
}

/// The RSA 2048 EK (template L-1), re-derived from the endorsement seed:
/// the same key every time, the one its certificate names.
fn rsa_ek(ctx: &mut Context) -> TResult<KeyHandle> {
    cmd(
        "creating the RSA endorsement key",
        ek::create_ek_object_2(
            ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        ),
    )
}

fn read_endorsement(ctx: &mut Context) -> TResult<Endorsement> {
    let certificate = match ek::retrieve_ek_pubcert(
        ctx,
        AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::info!(error = %e, "no RSA EK certificate in the TPM's NV: verifiers must pin the EK");
            None
        }
    };
    let h = rsa_ek(ctx)?;
    let read = ctx.read_public(h);
    let _ = ctx.flush_context(h.into());
    let (public, _, _) = cmd("reading the EK", read)?;
    Ok(Endorsement {
        certificate,
        public_area: cmd("marshalling the EK", public.marshall())?,
    })
}

/// TPM2_ActivateCredential: the EK's use is authorised by a policy
/// session satisfying PolicySecret(endorsement hierarchy), the EK
/// template's policy; the AK's by its (empty) password.
fn activate(ctx: &mut Context, ak: KeyHandle, blob: Vec<u8>, secret: Vec<u8>) -> TResult<Vec<u8>> {
    let blob =
        IdObject::try_from(blob).map_err(|e| TpmError::Refused(format!("credential blob: {e}")))?;
    let secret = EncryptedSecret::try_from(secret)
        .map_err(|e| TpmError::Refused(format!("encrypted secret: {e}")))?;
    let ek = rsa_ek(ctx)?;
    let r = (|| {
        let session = cmd(
            "starting a policy session",
            ctx.start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            ),
        )?
        .ok_or_else(|| TpmError::Other("the TPM started no session".into()))?;
        let r = (|| {
            let policy = cmd("policy session", PolicySession::try_from(session))?;
            cmd(
                "PolicySecret(endorsement)",
                ctx.execute_with_nullauth_session(|c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                }),
            )?;
            ctx.set_sessions((Some(AuthSession::Password), Some(session), None));
            let out = ctx.activate_credential(ak, ek, blob, secret);
            ctx.clear_sessions();
            out.map_err(|e| {
                TpmError::Refused(format!(
                    "the TPM refused the credential ({e}): it was not made for this node's EK and attestation key"
                ))
            })
        })();
        let _ = ctx.flush_context(SessionHandle::from(session).into());
        r
    })();
    let _ = ctx.flush_context(ek.into());
    r.map(|d| d.value().to_vec())
}
