//! Evidence and its verification. Pure: the verifier host needs no TPM, only
//! the node's evidence, the nonce it sent, the AK it registered and a policy.
//!
//! Checks, in order: the AK matches the pinned one; the quote's signature
//! over TPMS_ATTEST; it is a quote of exactly this node's PCR with our nonce;
//! its PCR digest is the hash of the reported PCR value; its reset count is
//! the evidence's epoch (an old log is never replayed against new PCRs);
//! every log line's template hash matches its fields; the whole log replays
//! to the PCR value; the pod's entries are the log's entries for that pod.
//! Any failure makes the evidence invalid. Then each of the pod's entries is
//! appraised against the policy: violations are findings, not invalidity.

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo, PcrSlot};
use tss_esapi::traits::UnMarshall;

use super::allowlist::{Allowlist, Violation};
use super::journal::Epoch;
use super::log::{self, Entry, Event};

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
    /// The whole log of the epoch (needed to replay the PCR).
    pub log: Vec<String>,
    /// The pod's own entries.
    pub pod_log: Vec<String>,
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
    pub log_entries: usize,
    pub pod_entries: usize,
    /// Intervals in which the node was not measuring the pod (restarts).
    pub gaps: usize,
    pub violations: Vec<Violation>,
    /// Why the evidence is invalid (empty unless verdict is "invalid").
    pub errors: Vec<String>,
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
    // The log itself.
    let mut entries = Vec::with_capacity(ev.log.len());
    for (i, line) in ev.log.iter().enumerate() {
        match Entry::parse(line) {
            Ok(e) if !e.is_consistent() => errors.push(format!(
                "log entry {} ({}) does not match its template hash: the log was modified",
                i + 1,
                e.path
            )),
            Ok(e) if e.pcr != ev.pcr => errors.push(format!(
                "log entry {} names PCR {}, the evidence PCR {}",
                i + 1,
                e.pcr,
                ev.pcr
            )),
            // Other pods' entries come redacted; the pod's own never may.
            Ok(e) if e.is_redacted() && e.pod == x.pod_sandbox_id => {
                errors.push(format!(
                    "log entry {} of this pod is redacted: its own measurements were withheld",
                    i + 1
                ));
                entries.push(e)
            }
            Ok(e) => entries.push(e),
            Err(m) => errors.push(format!("log entry {}: {m}", i + 1)),
        }
    }
    if ev.anchored && entries.len() == ev.log.len() {
        if let Some(q) = &ev.quote {
            if log::replay(&entries).as_slice() != q.pcr_value.as_slice() {
                errors.push(format!(
                    "the log ({} entries) does not replay to PCR {}: entries were removed, reordered or added",
                    entries.len(),
                    ev.pcr
                ));
            }
        }
    }
    let pod_entries: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.pod == x.pod_sandbox_id)
        .collect();
    let pod_lines: Vec<String> = pod_entries.iter().map(|e| e.to_string()).collect();
    if pod_lines != ev.pod_log {
        errors.push("the pod's entries differ from the log's entries for the pod".into());
    }
    if ev.backend.starts_with("none") {
        errors.push(format!(
            "the pod's backend is {:?}: nothing measured it, so its log proves nothing",
            ev.backend
        ));
    }
    // The init each container's start entry declares (see `init::declared`):
    // its execution with that digest is the node's own, whatever build the
    // verifier is.
    let declared: std::collections::HashMap<&str, &str> = pod_entries
        .iter()
        .filter(|e| e.event == Event::Start)
        .filter_map(|e| Some((e.container.as_str(), super::init::declared(&e.path)?)))
        .collect();
    let own_init = |e: &Entry| {
        e.path == super::init::PATH
            && matches!(e.event, Event::Exec | Event::Mmap)
            && declared.get(e.container.as_str()) == Some(&e.digest_hex().as_str())
    };
    let mut violations: Vec<Violation> = pod_entries
        .iter()
        .filter(|e| !own_init(e))
        .filter_map(|e| x.policy.check(e))
        .collect();
    // Every container's measurements begin with its start entry (image and
    // the moment marking began): without it nothing shows the container was
    // measured from its first instruction.
    let mut started = std::collections::HashSet::new();
    for e in &pod_entries {
        if e.event == Event::Start {
            started.insert(e.container.as_str());
        } else if started.insert(e.container.as_str()) {
            violations.push(Violation {
                path: e.path.clone(),
                digest: e.digest_hex(),
                container: e.container.clone(),
                event: e.event,
                reason: "the container's entries do not begin with a start entry: nothing shows \
                         it was measured from its first instruction"
                    .into(),
            });
        }
    }
    // Under the fanotify backend, a container's processes must have run
    // through imacri's init (its start entry declares it): without it a
    // file from another filesystem could have run unseen. The pause
    // container (named by the pod's ID) runs only imacri's pause.
    if ev.backend.starts_with("fanotify") {
        violations.extend(
            pod_entries
                .iter()
                .filter(|e| e.event == Event::Start && e.container != x.pod_sandbox_id)
                .filter(|e| super::init::declared(&e.path).is_none())
                .map(|e| Violation {
                    path: e.path.clone(),
                    digest: e.digest_hex(),
                    container: e.container.clone(),
                    event: Event::Start,
                    reason: "the container did not run through imacri's init (created by an \
                             imacri without it): files from other filesystems could run \
                             unmeasured; recreate it"
                        .into(),
                }),
        );
    }
    // Code that no file held (a JIT's, injected) leaves no entry: only the
    // container's policy says whether any could run.
    if x.require_no_anonymous_exec {
        violations.extend(
            pod_entries
                .iter()
                .filter(|e| e.event == Event::Start && e.container != x.pod_sandbox_id)
                .filter(|e| !super::setting::AnonymousExec::denied_by(&e.path))
                .map(|e| Violation {
                    path: e.path.clone(),
                    digest: e.digest_hex(),
                    container: e.container.clone(),
                    event: Event::Start,
                    reason: "the container's policy allowed executable memory no file backs \
                             (anonymous_exec = \"allow\"): code no entry shows could have run"
                        .into(),
                }),
        );
    }
    // A pod is trusted only if it was measured all along.
    if !x.allow_gaps {
        violations.extend(
            pod_entries
                .iter()
                .filter(|e| e.event == Event::Gap)
                .map(|e| Violation {
                    path: e.path.clone(),
                    digest: String::new(),
                    container: e.container.clone(),
                    event: Event::Gap,
                    reason: "the container was not measured for a while (imacri restart, stopped \
                         reader or hash error); --allow-gaps accepts that"
                        .into(),
                }),
        );
    }
    let verdict = if !errors.is_empty() {
        Verdict::Invalid
    } else if !violations.is_empty() {
        Verdict::Violations
    } else {
        Verdict::Trusted
    };
    Report {
        pod_sandbox_id: x.pod_sandbox_id.to_string(),
        counters,
        verdict,
        backend: ev.backend.clone(),
        anchored: ev.anchored,
        pcr: ev.pcr,
        reset_count: ev.epoch.reset_count,
        log_entries: ev.log.len(),
        pod_entries: pod_entries
            .iter()
            .filter(|e| !matches!(e.event, Event::Gap | Event::Start))
            .count(),
        gaps: pod_entries.iter().filter(|e| e.event == Event::Gap).count(),
        violations,
        errors,
    }
}

/// Checks the quote; returns the TPM's counters when its signature holds.
fn check_quote(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unanchored(entries: &[Entry], pod: &str) -> Evidence {
        let log: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        Evidence {
            pod_sandbox_id: pod.into(),
            backend: "fanotify".into(),
            pcr: 15,
            nonce: vec![1, 2, 3],
            pod_log: entries
                .iter()
                .filter(|e| e.pod == pod)
                .map(|e| e.to_string())
                .collect(),
            log,
            ..Default::default()
        }
    }

    fn policy() -> Allowlist {
        Allowlist::parse(&format!(
            r#"{{"files": {{"/bin/sh": ["sha256:{}"]}}}}"#,
            hex::encode([1u8; 32])
        ))
        .unwrap()
    }

    fn x<'a>(p: &'a Allowlist, nonce: &'a [u8]) -> Expectations<'a> {
        Expectations {
            pod_sandbox_id: "p",
            nonce,
            ak_pem: None,
            policy: p,
            allow_unanchored: true,
            allow_gaps: true,
            require_no_anonymous_exec: false,
            last_seen: None,
        }
    }

    fn start(ctr: &str) -> Entry {
        start_saying(ctr, "")
    }

    /// A start entry through the init, with `more` words after it.
    fn start_saying(ctr: &str, more: &str) -> Entry {
        let words = format!(
            "img 2026-12-02T00:00:00Z {}{more}",
            crate::integrity::init::start_word()
        );
        Entry::new(15, [7; 32], &words, "p", ctr, Event::Start)
    }

    #[test]
    fn a_policy_allowing_anonymous_exec_is_a_violation_when_required() {
        let p = policy();
        let es = [start("c"), start_saying("d", " anonymous_exec=deny")];
        let lax = x(&p, &[1, 2, 3]);
        assert_eq!(
            verify(&unanchored(&es, "p"), &lax).verdict,
            Verdict::Trusted
        );
        let strict = Expectations {
            require_no_anonymous_exec: true,
            ..x(&p, &[1, 2, 3])
        };
        let r = verify(&unanchored(&es, "p"), &strict);
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert_eq!(r.violations[0].container, "c");
        assert!(r.violations[0].reason.contains("anonymous_exec"));
        // The pause container (the pod's own ID) runs only imacri's pause.
        let pause = [Entry::new(
            15,
            [7; 32],
            "pause 2026-12-02T00:00:00Z",
            "p",
            "p",
            Event::Start,
        )];
        assert_eq!(
            verify(&unanchored(&pause, "p"), &strict).verdict,
            Verdict::Trusted
        );
    }

    #[test]
    fn a_container_without_a_start_entry_is_untrusted() {
        let p = policy();
        let ok = [
            start("c"),
            Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
        ];
        let r = verify(&unanchored(&ok, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
        assert_eq!(r.pod_entries, 1);
        // A second container whose entries come without (or before) its start.
        let bad = [
            start("c"),
            Entry::new(15, [1; 32], "/bin/sh", "p", "d", Event::Exec),
            start("d"),
        ];
        let r = verify(&unanchored(&bad, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        assert_eq!(r.violations.len(), 1);
        assert_eq!(r.violations[0].container, "d");
        assert!(r.violations[0].reason.contains("start entry"));
    }

    #[test]
    fn the_init_a_start_entry_declares_is_trusted_whatever_the_build() {
        let p = policy();
        // An init digest of another imacri build, declared by the start.
        let other = [9u8; 32];
        let declaring = |ctr: &str, d: [u8; 32]| {
            Entry::new(
                15,
                [7; 32],
                &format!("img 2026-12-02T00:00:00Z init=sha256:{}", hex::encode(d)),
                "p",
                ctr,
                Event::Start,
            )
        };
        let init = |ctr: &str, d: [u8; 32]| {
            Entry::new(15, d, crate::integrity::init::PATH, "p", ctr, Event::Exec)
        };
        let ok = [declaring("c", other), init("c", other)];
        let r = verify(&unanchored(&ok, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
        // The file on the node is not what imacri declared: a violation.
        let swapped = [declaring("c", other), init("c", [8; 32])];
        let r = verify(&unanchored(&swapped, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        // Another container's declaration does not cover this one (whose
        // start declares this build's init).
        let undeclared = [declaring("c", other), start("d"), init("d", other)];
        let r = verify(&unanchored(&undeclared, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        assert_eq!(r.violations[0].container, "d");
        // The declaration covers the init's path only.
        let elsewhere = [
            declaring("c", other),
            Entry::new(15, other, "/bin/init", "p", "c", Event::Exec),
        ];
        let r = verify(&unanchored(&elsewhere, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    }

    #[test]
    fn a_container_that_did_not_run_through_the_init_is_untrusted() {
        let p = policy();
        let old = Entry::new(
            15,
            [7; 32],
            "img 2026-12-02T00:00:00Z",
            "p",
            "c",
            Event::Start,
        );
        let pause = Entry::new(
            15,
            [7; 32],
            "pause 2026-12-02T00:00:00Z",
            "p",
            "p",
            Event::Start,
        );
        let es = [pause.clone(), old];
        let r = verify(&unanchored(&es, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert_eq!(r.violations[0].container, "c");
        assert!(r.violations[0].reason.contains("init"), "{r:?}");
        // Pause never does; nor do containers of the kernel backend.
        let r = verify(&unanchored(&[pause], "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
        let mut kernel = unanchored(&es, "p");
        kernel.backend = "kernel".into();
        let r = verify(&kernel, &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    }

    #[test]
    fn unanchored_log_is_appraised() {
        let es = [
            start("c"),
            Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
            Entry::new(15, [2; 32], "/bin/other", "q", "c", Event::Exec),
            Entry::new(15, [0; 32], "-", "p", "c", Event::Gap),
        ];
        let p = policy();
        let r = verify(&unanchored(&es, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
        assert_eq!((r.pod_entries, r.gaps), (1, 1));
        // Without --allow-gaps the gap alone makes it untrusted.
        let strict = Expectations {
            allow_gaps: false,
            ..x(&p, &[1, 2, 3])
        };
        let r = verify(&unanchored(&es, "p"), &strict);
        assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
        assert_eq!(r.violations[0].event, Event::Gap);
        // A backend that measured nothing proves nothing.
        let mut none = unanchored(&es, "p");
        none.backend = "none (measurement unavailable)".into();
        assert_eq!(verify(&none, &x(&p, &[1, 2, 3])).verdict, Verdict::Invalid);
        let es2 = [
            start("c"),
            Entry::new(15, [9; 32], "/tmp/evil", "p", "c", Event::Exec),
        ];
        let r = verify(&unanchored(&es2, "p"), &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Violations);
        assert_eq!(r.violations[0].path, "/tmp/evil");
    }

    #[test]
    fn other_pods_come_redacted_and_own_entries_never_may() {
        let p = policy();
        let es = [
            start("c"),
            Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
            Entry::new(15, [2; 32], "/their/secret", "q", "c", Event::Exec),
        ];
        let mut ev = unanchored(&es, "p");
        ev.log[2] = es[2].redacted().unwrap().to_string();
        assert!(!ev.log.join("\n").contains("secret"));
        let r = verify(&ev, &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
        // Withholding the pod's own (violating) entry is caught, and so is
        // passing it off as another pod's.
        let es = [
            start("c"),
            Entry::new(15, [9; 32], "/tmp/evil", "p", "c", Event::Exec),
        ];
        let mut ev = unanchored(&es, "p");
        ev.log[1] = es[1].redacted().unwrap().to_string();
        ev.pod_log.truncate(1);
        let r = verify(&ev, &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains("withheld")), "{r:?}");
        ev.log[1] = ev.log[1].replace(" p c ", " q c ");
        let r = verify(&ev, &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains("modified")), "{r:?}");
    }

    #[test]
    fn tampering_and_wrong_nonce_are_invalid() {
        let es = [
            start("c"),
            Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
        ];
        let p = policy();
        let mut ev = unanchored(&es, "p");
        ev.log[1] = ev.log[1].replace(&hex::encode([1u8; 32]), &hex::encode([3u8; 32]));
        let r = verify(&ev, &x(&p, &[1, 2, 3]));
        assert_eq!(r.verdict, Verdict::Invalid);
        assert!(r.errors.iter().any(|e| e.contains("modified")), "{r:?}");
        let r = verify(&unanchored(&es, "p"), &x(&p, &[9]));
        assert_eq!(r.verdict, Verdict::Invalid);
        let mut strict = x(&p, &[1, 2, 3]);
        strict.allow_unanchored = false;
        assert_eq!(
            verify(&unanchored(&es, "p"), &strict).verdict,
            Verdict::Invalid
        );
    }
}
