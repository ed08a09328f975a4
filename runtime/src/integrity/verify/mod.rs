//! Evidence and its verification. Pure: the verifier host needs no TPM, only
//! the node's evidence, the nonce it sent, the AK it registered and a policy.
//!
//! Checks, in order: the AK matches the pinned one; the quote's signature
//! over TPMS_ATTEST; it is a quote of exactly this node's PCR with our nonce;
//! its PCR digest is the hash of the reported PCR value; its reset count is
//! the evidence's epoch (an old log is never replayed against new PCRs);
//! every log line's template hash matches its fields; the whole log replays
//! to the PCR value; the pod's entries are the log's entries for that pod.
//! Evidence may carry only the log after a verifier's [`Checkpoint`]
//! (`checkpoint.rs`): it then replays from there. Any failure makes the evidence invalid. Then each of the pod's entries is
//! appraised against the policy: violations are findings, not invalidity.

use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};

use super::allowlist::{Allowlist, Violation};
use super::journal::Epoch;
use super::log::{self, Entry};

mod appraise;
mod checkpoint;
mod quote;

pub use appraise::{key as appraisal_key, Appraisal, PodPages, LISTED_VIOLATIONS};
pub use checkpoint::{Checkpoint, PodMark};
use quote::check_quote;

mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuoteEvidence {
    /// TPMS_ATTEST as signed.
    #[serde(with = "hexbytes")]
    pub attest: Vec<u8>,
    #[serde(with = "hexbytes")]
    pub signature_r: Vec<u8>,
    #[serde(with = "hexbytes")]
    pub signature_s: Vec<u8>,
    /// The PCR's value (sha256 bank).
    #[serde(with = "hexbytes")]
    pub pcr_value: Vec<u8>,
}

/// What a node returns for `Quote(pod, nonce)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub pod_sandbox_id: String,
    /// e.g. "fanotify".
    pub backend: String,
    pub anchored: bool,
    pub pcr: u32,
    pub epoch: Epoch,
    #[serde(with = "hexbytes")]
    pub nonce: Vec<u8>,
    /// The epoch's log from entry `log_start` on (from the first, the PCR
    /// replays from zero; from a later one, from a verifier's checkpoint).
    pub log: Vec<String>,
    /// The index of `log`'s first entry in the epoch's log.
    #[serde(default)]
    pub log_start: u64,
    /// The pod's own entries of the epoch, from its `pod_log_start`th on
    /// (the ones before it left out when the verifier kept its appraisal
    /// of them).
    pub pod_log: Vec<String>,
    #[serde(default)]
    pub pod_log_start: u64,
    pub quote: Option<QuoteEvidence>,
    /// The AK as PEM SubjectPublicKeyInfo ("" when unanchored).
    pub ak_public_pem: String,
}

/// Why an AK's point has no PEM form.
#[derive(Debug, thiserror::Error)]
pub enum AkKeyError {
    #[error("AK point: {0}")]
    Point(p256::elliptic_curve::Error),
    #[error("AK PEM: {0}")]
    Pem(p256::pkcs8::spki::Error),
}

/// PEM SubjectPublicKeyInfo of a P-256 point (SEC1 bytes).
pub fn ak_pem(sec1: &[u8]) -> Result<String, AkKeyError> {
    let pk = p256::PublicKey::from_sec1_bytes(sec1).map_err(AkKeyError::Point)?;
    pk.to_public_key_pem(LineEnding::LF)
        .map_err(AkKeyError::Pem)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Trusted,
    Violations,
    Invalid,
}

impl Verdict {
    /// Exit status of `imacri attest verify`.
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Trusted => 0,
            Verdict::Violations => 1,
            Verdict::Invalid => 2,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pod_sandbox_id: String,
    /// The quoting TPM's counters (anchored evidence with a valid quote),
    /// for the verifier to remember: a later quote must not go back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<TpmCounters>,
    pub verdict: Verdict,
    pub backend: String,
    pub anchored: bool,
    pub pcr: u32,
    pub reset_count: Option<u32>,
    /// The log's entries (all pods) and the pod's measurements.
    pub log_entries: u64,
    /// The first log entry the evidence carried (the ones before it were
    /// checked in earlier evidence, see [`Checkpoint`]).
    pub log_start: u64,
    /// The pod's first entry the evidence carried (the verifier kept its
    /// appraisal of the ones before it, see [`Appraisal`]).
    pub pod_log_start: u64,
    pub pod_entries: usize,
    /// Intervals in which the node was not measuring the pod (restarts).
    pub gaps: usize,
    /// The first [`appraise::LISTED_VIOLATIONS`] violations (of all the
    /// pod's entries, the ones appraised before included), and how many
    /// more there are.
    pub violations: Vec<Violation>,
    pub violations_unlisted: u64,
    /// Why the evidence is invalid (empty unless verdict is "invalid").
    pub errors: Vec<String>,
    /// What the verifier may keep of the node's log after this evidence
    /// (anchored evidence with no error).
    #[serde(skip)]
    pub checkpoint: Option<Checkpoint>,
}

/// A TPM's reset and restart counts and clock from a quote's clock info:
/// they only move forward, so a quote older than one already seen is a
/// replay (or another TPM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TpmCounters {
    pub reset_count: u32,
    pub restart_count: u32,
    /// Milliseconds; compared only within one reset and restart.
    pub clock: u64,
}

pub struct Expectations<'a> {
    pub pod_sandbox_id: &'a str,
    pub nonce: &'a [u8],
    /// The AK registered for this node (PEM). None: trust the evidence's own
    /// (only sensible for a first registration; reported).
    pub ak_pem: Option<&'a str>,
    pub policy: &'a Allowlist,
    pub allow_unanchored: bool,
    /// Trust a pod whose log has gaps (intervals it was not measured, e.g.
    /// while imacri restarted). Off: each gap is a violation.
    pub allow_gaps: bool,
    /// Every container's start entry must declare that its policy denied
    /// executable memory no file backs (`anonymous_exec = "deny"`).
    pub require_no_anonymous_exec: bool,
    /// The newest counters this verifier saw from this node's TPM.
    pub last_seen: Option<TpmCounters>,
    /// What this verifier checked of the node's log before: evidence that
    /// starts after the first entry must continue it.
    pub checkpoint: Option<&'a Checkpoint>,
}

impl Report {
    /// A report of evidence that could not be checked at all (`errors`
    /// say why).
    pub fn invalid(pod: &str, errors: Vec<String>) -> Report {
        Report {
            pod_sandbox_id: pod.to_string(),
            counters: None,
            verdict: Verdict::Invalid,
            backend: String::new(),
            anchored: false,
            pcr: 0,
            reset_count: None,
            log_entries: 0,
            log_start: 0,
            pod_log_start: 0,
            pod_entries: 0,
            gaps: 0,
            violations: Vec::new(),
            violations_unlisted: 0,
            errors,
            checkpoint: None,
        }
    }
}

pub fn verify(ev: &Evidence, x: &Expectations<'_>) -> Report {
    let mut errors = Vec::new();
    if ev.pod_sandbox_id != x.pod_sandbox_id {
        errors.push(format!(
            "evidence is for pod {:?}, not {:?}",
            ev.pod_sandbox_id, x.pod_sandbox_id
        ));
    }
    if ev.nonce != x.nonce {
        errors.push("the evidence's nonce is not the one sent (replayed evidence?)".into());
    }
    if let Some(b) = &ev.epoch.broken {
        errors.push(format!("the node reports its PCR cannot be verified: {b}"));
    }
    let mut counters = None;
    if ev.anchored {
        counters = check_quote(ev, x, &mut errors);
    } else if x.ak_pem.is_some() {
        // A node whose key the verifier registered has a TPM: unanchored
        // evidence from it is a downgrade, whatever --allow-unanchored says.
        errors.push(
            "evidence is unanchored, but this node's attestation key is registered: its evidence must come from its TPM (--allow-unanchored applies only to nodes without one)"
                .into(),
        );
    } else if !x.allow_unanchored {
        errors.push(
            "evidence is unanchored: the node has no TPM configured (ima.tpm_tcti), so nothing proves the log"
                .into(),
        );
    }
    // Where the log the evidence carries begins.
    let base = Checkpoint::base(ev, x.checkpoint).unwrap_or_else(|m| {
        errors.push(m);
        None
    });
    let continues = ev.log_start == 0 || base.is_some();
    // The log itself (entry numbers count from the epoch's first).
    let mut entries = Vec::with_capacity(ev.log.len());
    let first = ev.log_start.saturating_add(1);
    for (i, line) in (first..).zip(ev.log.iter()) {
        match Entry::parse(line) {
            Ok(e) if !e.is_consistent() => errors.push(format!(
                "log entry {i} ({}) does not match its template hash: the log was modified",
                e.path
            )),
            Ok(e) if e.pcr != ev.pcr => errors.push(format!(
                "log entry {i} names PCR {}, the evidence PCR {}",
                e.pcr, ev.pcr
            )),
            // Other pods' entries come redacted; the pod's own never may.
            Ok(e) if e.is_redacted() && e.pod == x.pod_sandbox_id => {
                errors.push(format!(
                    "log entry {i} of this pod is redacted: its own measurements were withheld"
                ));
                entries.push(e)
            }
            Ok(e) => entries.push(e),
            Err(m) => errors.push(format!("log entry {i}: {m}")),
        }
    }
    let mut replayed = None;
    if ev.anchored && continues && entries.len() == ev.log.len() {
        if let Some(q) = &ev.quote {
            let pcr = log::replay_from(Checkpoint::start_pcr(base), &entries);
            if pcr.as_slice() == q.pcr_value.as_slice() {
                replayed = Some(pcr);
            } else {
                errors.push(format!(
                    "the log (entries {first} to {}) does not replay to PCR {}: entries were removed, reordered or added",
                    ev.log_start + entries.len() as u64,
                    ev.pcr
                ));
            }
        }
    }
    // The pod's entries: those before the checkpoint (carried whole from
    // the first the verifier kept no appraisal of, held to the hash kept of
    // them), then the log's for the pod.
    let under = appraise::key(x);
    let earlier = checkpoint::earlier(ev, x.pod_sandbox_id, base, &under, &mut errors);
    let later: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.pod == x.pod_sandbox_id)
        .collect();
    let later_lines: Vec<String> = later.iter().map(|e| e.to_string()).collect();
    if later_lines.as_slice() != ev.pod_log.get(earlier.taken..).unwrap_or_default() {
        errors.push("the pod's entries differ from the log's entries for the pod".into());
    }
    if ev.backend.starts_with("none") {
        errors.push(format!(
            "the pod's backend is {:?}: nothing measured it, so its log proves nothing",
            ev.backend
        ));
    }
    let pod_entries: Vec<&Entry> = earlier.entries.iter().chain(later).collect();
    let mut appraisal = earlier
        .prior
        .unwrap_or_else(|| Appraisal::new(under, &ev.backend));
    appraisal.take(&pod_entries, x);
    let (violations, violations_unlisted) = (appraisal.violations.clone(), appraisal.unlisted);
    let verdict = if !errors.is_empty() {
        Verdict::Invalid
    } else if appraisal.violated() {
        Verdict::Violations
    } else {
        Verdict::Trusted
    };
    let (measured, gaps) = (appraisal.measurements, appraisal.gaps);
    let checkpoint = match replayed {
        Some(pcr) if errors.is_empty() => Checkpoint::after(base, ev, &entries, pcr)
            .map(|cp| cp.appraised(x.pod_sandbox_id, appraisal)),
        _ => None,
    };
    Report {
        pod_sandbox_id: x.pod_sandbox_id.to_string(),
        counters,
        verdict,
        backend: ev.backend.clone(),
        anchored: ev.anchored,
        pcr: ev.pcr,
        reset_count: ev.epoch.reset_count,
        log_entries: ev.log_start + ev.log.len() as u64,
        log_start: ev.log_start,
        pod_log_start: ev.pod_log_start,
        pod_entries: measured as usize,
        gaps: gaps as usize,
        violations,
        violations_unlisted,
        errors,
        checkpoint,
    }
}

#[cfg(test)]
mod anchored_tests;
#[cfg(test)]
mod tests;
