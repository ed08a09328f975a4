//! `imacri.attestation.v1.Attestation`: evidence about ima pods, served on
//! the CRI socket through the same [`instrument`] wrapper as CRI.

use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_server::{Attestation, AttestationServer};
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::journal::view;
use imacri_runtime::integrity::verify::{self, Evidence, QuoteEvidence};
use imacri_runtime::{Error, Result};
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use super::{instrument, CriServer};

#[derive(Clone)]
pub struct Attest(pub Arc<CriServer>);

pub fn service(server: Arc<CriServer>) -> AttestationServer<Attest> {
    AttestationServer::new(Attest(server)).max_encoding_message_size(crate::evidence::MAX_EVIDENCE)
}

/// What evidence being built may take on the node, all requests together:
/// a view of a long epoch's whole log is ~70 MiB, and its message and
/// encoding as much again; six asked for at once grew imacri by 880 MiB.
/// Past it, requests wait their turn.
const EVIDENCE_MEMORY: usize = 160 << 20;

/// Peak bytes per byte of a view's lines while it is built and sent (its
/// strings, the message, its encoding): measured 2.3 for a whole log.
const PEAK_PER_BYTE: (usize, usize) = (23, 10);

pub(super) fn evidence_memory() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(EVIDENCE_MEMORY >> 10))
}

/// A view that could not be made: past what a message carries says why
/// and what to do.
fn view_error(e: view::ViewError, pod: &str, path: &std::path::Path) -> Error {
    match e {
        view::ViewError::Io(e) => Error::io("reading", path, e),
        view::ViewError::TooLarge { budget, own } if own * 2 > budget => Error::ResourceExhausted(format!(
            "pod {pod}'s own log entries take {} MiB or more, past the {} MiB a message carries: it logged many files or long paths (each entry up to 16 KiB; ima.max_entries_per_pod bounds their number); its evidence cannot be sent this epoch, which ends with the node's next reboot",
            own >> 20,
            budget >> 20
        )),
        view::ViewError::TooLarge { budget, .. } => Error::ResourceExhausted(format!(
            "the evidence for pod {pod} would pass the {} MiB a message carries: it holds the node's log for this TPM epoch from the entry asked for; ask from the entry a verifier last checked (QuoteRequest.from_entry; `imacri attest verify` builds and keeps that checkpoint from GetLogPage)",
            budget >> 20
        )),
    }
}

impl CriServer {
    /// An ima pod's full ID and backend; a removed one stays quotable for
    /// `attestation.retention_secs` (by its full ID).
    fn quotable(&self, id: &str) -> Result<(String, String)> {
        match self.sandbox(id) {
            Ok(sb) => {
                let ima = sb.state().ima.ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "pod {} does not have ima enabled: nothing is measured",
                        sb.id
                    ))
                })?;
                Ok((sb.id.clone(), ima.backend))
            }
            Err(Error::NotFound(m)) => {
                let now = imacri_runtime::ids::now_nanos() / 1_000_000_000;
                match self.integrity.retained.get(id, now) {
                    Some(r) => Ok((id.to_string(), r.backend)),
                    None => Err(Error::NotFound(format!(
                        "{m} (a removed ima pod stays quotable by its full ID for attestation.retention_secs)"
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until evidence of at most `bytes` of lines fits the node's
    /// evidence memory; held while it is built and sent (see [`held`]).
    async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit> {
        let peak = bytes.saturating_mul(PEAK_PER_BYTE.0) / PEAK_PER_BYTE.1;
        let kib = (peak >> 10).clamp(1, EVIDENCE_MEMORY >> 10);
        self.integrity
            .evidence_memory
            .clone()
            .acquire_many_owned(kib as u32)
            .await
            .map_err(|_| Error::Unavailable("imacri is shutting down".into()))
    }

    async fn quote(
        &self,
        req: pb::QuoteRequest,
    ) -> Result<(pb::QuoteResponse, OwnedSemaphorePermit)> {
        if req.pod_sandbox_id.is_empty() {
            return Err(Error::InvalidArgument("pod_sandbox_id is required".into()));
        }
        if !(8..=64).contains(&req.nonce.len()) {
            return Err(Error::InvalidArgument(format!(
                "nonce must be 8 to 64 bytes, got {}",
                req.nonce.len()
            )));
        }
        let (id, backend) = self.quotable(&req.pod_sandbox_id)?;
        let journal = &self.integrity.journal;
        // A checkpoint of another epoch (the node rebooted) is no start
        // (an epoch's start time never changes while imacri runs).
        let (from, pod_from) = match req.from_epoch == journal.epoch().started_at {
            true if req.from_entry > 0 => (req.from_entry, req.pod_from_entry),
            _ => (0, 0),
        };
        let snap = journal
            .snapshot(req.nonce.clone(), &id, from)
            .await
            .map_err(|e| Error::Unavailable(format!("collecting evidence: {e}")))?;
        let ak_public_pem = match &snap.ak_sec1 {
            Some(k) => verify::ak_pem(k)?,
            None => String::new(),
        };
        let (path, len, pod) = (snap.log_path.clone(), snap.log_len, id.clone());
        let located = snap.located.clone();
        let bound = view::view_bound(len, (from, pod_from), located.as_ref());
        let held = self.reserve(bound).await?;
        let budget = view::EVIDENCE_BUDGET;
        let view = tokio::task::spawn_blocking(move || {
            view::pod_view(&path, len, &pod, (from, pod_from), budget, located.as_ref())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| view_error(e, &id, &snap.log_path))?;
        let ev = Evidence {
            pod_sandbox_id: id.clone(),
            backend,
            anchored: snap.quote.is_some(),
            pcr: snap.pcr,
            epoch: snap.epoch,
            nonce: req.nonce,
            log: view.log,
            log_start: view.log_start,
            pod_log: view.pod_log,
            pod_log_start: view.pod_log_start,
            quote: snap.quote.map(|q| QuoteEvidence {
                attest: q.attest,
                signature_r: q.signature_r,
                signature_s: q.signature_s,
                pcr_value: q.pcr_value.to_vec(),
            }),
            ak_public_pem,
        };
        let evidence = crate::evidence::to_proto(ev);
        crate::evidence::fits(&evidence, crate::evidence::MAX_EVIDENCE)?;
        let evidence = Some(evidence);
        Ok((pb::QuoteResponse { evidence }, held))
    }

    fn list_ima_pods(&self) -> pb::ListPodsResponse {
        let pods = self
            .sandboxes
            .all()
            .into_iter()
            .filter_map(|sb| {
                let st = sb.state();
                let ima = st.ima.clone()?;
                let s = self.integrity.journal.summary(&sb.id);
                let meta = sb.config.metadata.clone().unwrap_or_default();
                Some(pb::ImaPod {
                    pod_sandbox_id: sb.id.clone(),
                    name: meta.name,
                    namespace: meta.namespace,
                    backend: ima.backend,
                    policy: ima.policy,
                    mode: format!("{:?}", ima.mode).to_lowercase(),
                    measurements: s.measurements,
                    violations: s.violations,
                    last_violation: s.last_violation.unwrap_or_default(),
                    ready: st.phase == imacri_runtime::pod::SandboxPhase::Ready,
                })
            })
            .collect();
        pb::ListPodsResponse { pods }
    }

    async fn pod_log(
        &self,
        req: pb::GetLogRequest,
    ) -> Result<(pb::GetLogResponse, OwnedSemaphorePermit)> {
        if req.pod_sandbox_id.is_empty() {
            return Err(Error::InvalidArgument("pod_sandbox_id is required".into()));
        }
        // Removed pods keep their entries in the log: find by full ID too.
        let id = match self.sandbox(&req.pod_sandbox_id) {
            Ok(sb) => sb.id.clone(),
            Err(_) => req.pod_sandbox_id.clone(),
        };
        let path =
            imacri_runtime::integrity::journal::Journal::log_path(&self.cfg.root.join("integrity"));
        let (len, offsets) = self
            .integrity
            .journal
            .pod_page_start(&id, 0, usize::MAX)
            .map_err(|e| Error::Unavailable(format!("reading the log: {e}")))?;
        let budget = view::EVIDENCE_BUDGET;
        let bound = match offsets.as_ref() {
            Some(o) => o.len().saturating_mul(view::MAX_LINE),
            None => self.unlocated_bytes(&path, len, &id).await?,
        };
        let held = self.reserve(bound.min(budget)).await?;
        let (p, pod) = (path.clone(), id.clone());
        let entries = tokio::task::spawn_blocking(move || {
            view::pod_entries(&p, len, &pod, budget, offsets.as_deref())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| view_error(e, &id, &path))?;
        if entries.is_empty() && self.sandbox(&id).is_err() {
            return Err(Error::NotFound(format!(
                "pod sandbox {id:?} not found and has no measurements"
            )));
        }
        Ok((pb::GetLogResponse { entries }, held))
    }

    /// What the entries of a pod the journal's index does not locate (a
    /// pod no longer quotable, or a log changed outside imacri) take, counted
    /// in a read of the whole log a chunk at a time: GetLog reserves that,
    /// where it reserved the whole budget and so held back every other
    /// evidence request while it read.
    async fn unlocated_bytes(&self, path: &std::path::Path, len: u64, pod: &str) -> Result<usize> {
        let _scan = self.reserve(view::SCAN_BYTES).await?;
        let (p, id) = (path.to_path_buf(), pod.to_string());
        let bytes = tokio::task::spawn_blocking(move || view::pod_bytes(&p, len, &id))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::io("reading", path, e))?;
        tracing::debug!(pod_sandbox_id = %pod, bytes, "GetLog: the index does not locate the pod; its entries were counted in the whole log first");
        Ok(bytes)
    }

    async fn log_page(
        &self,
        req: pb::GetLogPageRequest,
    ) -> Result<(pb::GetLogPageResponse, OwnedSemaphorePermit)> {
        let max = match req.max_entries {
            0 => 10_000,
            n @ 1..=100_000 => n as usize,
            n => {
                return Err(Error::InvalidArgument(format!(
                    "max_entries must be 1 to 100000 (0: 10000), got {n}"
                )))
            }
        };
        let journal = &self.integrity.journal;
        if !req.pod_sandbox_id.is_empty() {
            return self.pod_page(req, max).await;
        }
        let (len, start) = journal
            .page_start(req.from_entry)
            .map_err(|e| Error::Unavailable(format!("reading the log: {e}")))?;
        let from = req.from_entry;
        let bound = usize::try_from(len.saturating_sub(start.1))
            .map_or(view::PAGE_BYTES, |b| (b / 4 * 5).min(view::PAGE_BYTES));
        self.read_page((from, bound), move |p| view::page(p, len, from, max, start))
            .await
    }

    /// A page of one pod's own entries, whole (see [`view::pod_page`]).
    async fn pod_page(
        &self,
        req: pb::GetLogPageRequest,
        max: usize,
    ) -> Result<(pb::GetLogPageResponse, OwnedSemaphorePermit)> {
        let (id, backend) = self.quotable(&req.pod_sandbox_id)?;
        let journal = &self.integrity.journal;
        // One offset past the page says whether more follow.
        let (len, offsets) = journal
            .pod_page_start(&id, req.from_entry, max + 1)
            .map_err(|e| Error::Unavailable(format!("reading the log: {e}")))?;
        let (pod, from) = (id.clone(), req.from_entry);
        let bound = offsets.as_ref().map_or(view::PAGE_BYTES, |o| {
            o.len().saturating_mul(view::MAX_LINE).min(view::PAGE_BYTES)
        });
        let (page, held) = self
            .read_page((from, bound), move |p| {
                view::pod_page(p, len, &pod, from, max, offsets.as_deref())
            })
            .await?;
        let page = pb::GetLogPageResponse {
            pod_sandbox_id: id,
            backend,
            ..page
        };
        Ok((page, held))
    }

    /// A page from entry `from_entry` that `read` reads from the log file
    /// (on a blocking thread), in the log's epoch, of at most `bound` bytes
    /// of lines (reserved; see [`CriServer::reserve`]).
    async fn read_page(
        &self,
        (from_entry, bound): (u64, usize),
        read: impl FnOnce(&std::path::Path) -> std::io::Result<(Vec<String>, bool)> + Send + 'static,
    ) -> Result<(pb::GetLogPageResponse, OwnedSemaphorePermit)> {
        let held = self.reserve(bound).await?;
        let epoch = self.integrity.journal.epoch();
        let path =
            imacri_runtime::integrity::journal::Journal::log_path(&self.cfg.root.join("integrity"));
        let p = path.clone();
        let (entries, more) = tokio::task::spawn_blocking(move || read(&p))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::io("reading", &path, e))?;
        let page = pb::GetLogPageResponse {
            entries,
            from_entry,
            epoch: Some(crate::evidence::epoch_to_proto(epoch)),
            more,
            ..Default::default()
        };
        Ok((page, held))
    }

    fn tpm(&self) -> Result<&imacri_runtime::integrity::tpm::Tpm> {
        self.integrity.journal.tpm().ok_or_else(|| {
            Error::FailedPrecondition(
                "no TPM is configured on this node (ima.tpm_tcti / --tpm-tcti): evidence is unanchored and there is nothing to enroll".into(),
            )
        })
    }

    async fn enrollment(&self) -> Result<pb::GetEnrollmentResponse> {
        let tpm = self.tpm()?;
        let e = tpm.endorsement().await?;
        Ok(pb::GetEnrollmentResponse {
            ek_certificate: e.certificate.unwrap_or_default(),
            ek_public: e.public_area,
            ak_public: tpm.ak_public_area().to_vec(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pcr: tpm.pcr(),
        })
    }

    async fn activate(
        &self,
        req: pb::ActivateCredentialRequest,
    ) -> Result<pb::ActivateCredentialResponse> {
        // TPM2B buffers: anything larger is not a credential.
        if req.credential_blob.is_empty() || req.credential_blob.len() > 1024 {
            return Err(Error::InvalidArgument(format!(
                "credential_blob must be 1 to 1024 bytes, got {}",
                req.credential_blob.len()
            )));
        }
        if req.encrypted_secret.is_empty() || req.encrypted_secret.len() > 1024 {
            return Err(Error::InvalidArgument(format!(
                "encrypted_secret must be 1 to 1024 bytes, got {}",
                req.encrypted_secret.len()
            )));
        }
        let secret = self
            .tpm()?
            .activate_credential(req.credential_blob, req.encrypted_secret)
            .await?;
        Ok(pb::ActivateCredentialResponse { secret })
    }

    fn attestation_key(&self) -> Result<pb::GetAttestationKeyResponse> {
        let tpm = self.tpm()?;
        Ok(pb::GetAttestationKeyResponse {
            pem: verify::ak_pem(tpm.ak_sec1())?,
            pcr: tpm.pcr(),
        })
    }

    /// Mounts the image's rootfs read-only (a temporary snapshot) and hashes
    /// every regular file.
    async fn golden(&self, req: pb::GoldenPolicyRequest) -> Result<pb::GoldenPolicyResponse> {
        if req.image.is_empty() {
            return Err(Error::InvalidArgument("image is required".into()));
        }
        let image = self.images.get(&req.image).ok_or_else(|| {
            Error::NotFound(format!("image {:?} not found; pull it first", req.image))
        })?;
        let snapshotter = self.cfg.containerd.snapshotter.clone();
        let key = format!("golden-{}", imacri_runtime::ids::new_id());
        let lease = self.c.lease("golden").await?;
        let dir = self.cfg.state.join("golden").join(&key);
        let res = async {
            let mounts = self
                .c
                .prepare_snapshot(&snapshotter, &key, &image.chain_id, &lease)
                .await?;
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            imacri_runtime::mount::mount_snapshot(&mounts, &dir, true)?;
            let source = imacri_runtime::integrity::golden::source_line(&req.image, &image.id);
            let d = dir.clone();
            let walked =
                tokio::task::spawn_blocking(move || Allowlist::from_tree(&d, &source)).await;
            let _ = imacri_runtime::mount::unmount_all(&dir);
            walked
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|e| Error::io("reading the image tree", &dir, e))
        }
        .await;
        let _ = std::fs::remove_dir(&dir);
        let _ = self.c.remove_snapshot(&snapshotter, &key).await;
        let _ = lease.delete(&self.c, false).await;
        let a = res?;
        Ok(pb::GoldenPolicyResponse {
            files: a.files.len() as u64,
            policy_json: a.to_json(),
        })
    }
}

type Res<T> = std::result::Result<Response<T>, Status>;

/// A response that holds its evidence memory until it is sent.
fn held<T>(r: Res<(T, OwnedSemaphorePermit)>) -> Res<T> {
    r.map(|resp| {
        let (msg, permit) = resp.into_inner();
        super::held::respond(msg, permit)
    })
}

#[tonic::async_trait]
impl Attestation for Attest {
    async fn quote(&self, r: Request<pb::QuoteRequest>) -> Res<pb::QuoteResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        held(instrument("Attestation.Quote", &id, self.0.quote(r)).await)
    }

    async fn list_pods(&self, _r: Request<pb::ListPodsRequest>) -> Res<pb::ListPodsResponse> {
        instrument("Attestation.ListPods", "", async {
            Ok(self.0.list_ima_pods())
        })
        .await
    }

    async fn get_log(&self, r: Request<pb::GetLogRequest>) -> Res<pb::GetLogResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        held(instrument("Attestation.GetLog", &id, self.0.pod_log(r)).await)
    }

    async fn get_log_page(&self, r: Request<pb::GetLogPageRequest>) -> Res<pb::GetLogPageResponse> {
        held(
            instrument(
                "Attestation.GetLogPage",
                "",
                self.0.log_page(r.into_inner()),
            )
            .await,
        )
    }

    async fn get_attestation_key(
        &self,
        _r: Request<pb::GetAttestationKeyRequest>,
    ) -> Res<pb::GetAttestationKeyResponse> {
        instrument("Attestation.GetAttestationKey", "", async {
            self.0.attestation_key()
        })
        .await
    }

    async fn get_enrollment(
        &self,
        _r: Request<pb::GetEnrollmentRequest>,
    ) -> Res<pb::GetEnrollmentResponse> {
        instrument("Attestation.GetEnrollment", "", self.0.enrollment()).await
    }

    async fn activate_credential(
        &self,
        r: Request<pb::ActivateCredentialRequest>,
    ) -> Res<pb::ActivateCredentialResponse> {
        instrument(
            "Attestation.ActivateCredential",
            "",
            self.0.activate(r.into_inner()),
        )
        .await
    }

    async fn golden_policy(
        &self,
        r: Request<pb::GoldenPolicyRequest>,
    ) -> Res<pb::GoldenPolicyResponse> {
        let r = r.into_inner();
        let image = r.image.clone();
        instrument("Attestation.GoldenPolicy", &image, self.0.golden(r)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_past_the_budget_is_resource_exhausted_saying_whose_entries() {
        let path = std::path::Path::new("/x");
        let own = view_error(
            view::ViewError::TooLarge {
                budget: 64 << 20,
                own: 40 << 20,
            },
            "p",
            path,
        );
        assert!(
            matches!(&own, Error::ResourceExhausted(m) if m.contains("pod p's own log entries")),
            "{own}"
        );
        let log = view_error(
            view::ViewError::TooLarge {
                budget: 64 << 20,
                own: 1 << 20,
            },
            "p",
            path,
        );
        assert!(
            matches!(&log, Error::ResourceExhausted(m) if m.contains("from_entry")),
            "{log}"
        );
    }
}
