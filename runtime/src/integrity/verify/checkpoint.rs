//! What a verifier keeps of a node's log between quotes, so that later
//! evidence carries only what follows (incremental attestation, as
//! Keylime's verifier does for IMA logs). A node's log holds every entry of
//! the TPM epoch, and evidence for one pod must carry all of them for the
//! PCR to replay: weeks of pods make it tens of MiB per quote.
//!
//! After evidence that verified, the checkpoint holds the number of entries
//! checked, the quoted PCR value they replayed to, and per pod the count and
//! a running hash of its entries' template hashes (which redaction keeps).
//! Evidence from entry N on is then accepted only when N is the
//! checkpoint's count in the same TPM epoch: the entries it carries must
//! extend the kept PCR value to the newly quoted one (a PCR only ever
//! extends, so the quoted value proves the whole log in order), and the
//! pod's own entries from before N, which it still carries to be
//! appraised, must fold to the kept hash (none withheld, none changed).
//! Other pods' earlier entries are not seen again: they were verified when
//! the checkpoint was made.
//!
//! A verifier without one builds it from the log's pages
//! ([`Checkpoint::unverified`], every entry redacted): nothing vouches for
//! it until evidence from its end verifies, whose replay from its PCR value
//! to the quoted one proves every page (and the pod's entries in them must
//! fold to its hash, as above). So no message has to carry a long epoch's
//! whole log.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::appraise::Appraisal;
use super::Evidence;
use crate::integrity::journal::Epoch;
use crate::integrity::log::{self, Entry};

pub(super) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(v.as_slice()).map_err(serde::de::Error::custom)
    }
}

/// A node's log as far as a verifier has checked it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The TPM epoch (reset count) and the log's (`Epoch.started_at`).
    pub reset_count: u32,
    pub epoch_started_at: i64,
    /// Entries checked: later evidence starts at this one.
    pub entries: u64,
    /// The PCR value those entries replay to (quoted by the TPM).
    #[serde(with = "hex32")]
    pub pcr: [u8; 32],
    /// Each pod's entries among them.
    pub pods: BTreeMap<String, PodMark>,
}

/// One pod's entries before a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMark {
    pub entries: u64,
    /// Template hashes folded as a PCR folds them, from zero.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// What this verifier concluded of the pod's first entries when it
    /// last verified the pod (it may have seen more of them redacted
    /// since, in other pods' evidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appraisal: Option<Appraisal>,
}

impl PodMark {
    fn add(&mut self, e: &Entry) {
        self.entries += 1;
        self.hash = log::extend(&self.hash, &e.template_hash);
    }
}

impl Checkpoint {
    /// What a request for evidence names: the entry to start from and the
    /// log's epoch.
    pub fn since(&self) -> (u64, i64) {
        (self.entries, self.epoch_started_at)
    }

    /// The start of a checkpoint built from the log's pages, in `epoch`;
    /// None for a node without a TPM (only a quote could vouch for it).
    pub fn unverified(epoch: &Epoch) -> Option<Checkpoint> {
        Some(Checkpoint {
            reset_count: epoch.reset_count?,
            epoch_started_at: epoch.started_at,
            ..Default::default()
        })
    }

    /// Takes the log's next entry (as a page shows it) into a checkpoint
    /// being built. Each entry must be consistent: its template hash binds
    /// its pod, so no entry can be passed off as another pod's while the
    /// PCR still replays.
    pub fn take(&mut self, line: &str) -> Result<(), String> {
        let n = self.entries + 1;
        let e = Entry::parse(line).map_err(|m| format!("log entry {n}: {m}"))?;
        if !e.is_consistent() {
            return Err(format!(
                "log entry {n} ({}) does not match its template hash: the log was modified",
                e.path
            ));
        }
        self.pods.entry(e.pod.clone()).or_default().add(&e);
        self.pcr = log::extend(&self.pcr, &e.template_hash);
        self.entries = n;
        Ok(())
    }

    /// The checkpoint `ev` continues, None for evidence from the first
    /// entry; an error when `ev` starts anywhere else than `kept` ends.
    pub(super) fn base<'c>(
        ev: &Evidence,
        kept: Option<&'c Checkpoint>,
    ) -> Result<Option<&'c Checkpoint>, String> {
        if ev.log_start == 0 {
            return Ok(None);
        }
        let n = ev.log_start;
        if !ev.anchored {
            return Err(format!(
                "the evidence starts at log entry {n}, but it is unanchored: only a TPM quote proves the entries before it"
            ));
        }
        let Some(cp) = kept else {
            return Err(format!(
                "the evidence starts at log entry {n}, but this verifier has checked none of the node's log (no checkpoint in its counters file): ask for the whole log"
            ));
        };
        if ev.epoch.reset_count != Some(cp.reset_count)
            || ev.epoch.started_at != cp.epoch_started_at
        {
            return Err(format!(
                "the evidence starts at log entry {n} of the epoch begun at {} (TPM reset {:?}), but this verifier's checkpoint is in the epoch begun at {} (reset {}): ask for the whole log",
                ev.epoch.started_at, ev.epoch.reset_count, cp.epoch_started_at, cp.reset_count
            ));
        }
        if cp.entries != n {
            return Err(format!(
                "the evidence starts at log entry {n}, but this verifier checked the first {} entries: entries in between would go unseen",
                cp.entries
            ));
        }
        Ok(Some(cp))
    }

    /// The PCR value the evidence's first entry extends.
    pub(super) fn start_pcr(base: Option<&Checkpoint>) -> [u8; 32] {
        base.map_or([0; 32], |c| c.pcr)
    }

    /// The pod's entries before the checkpoint.
    pub(super) fn pod(base: Option<&Checkpoint>, pod: &str) -> PodMark {
        base.and_then(|c| c.pods.get(pod).cloned())
            .unwrap_or_default()
    }

    /// The checkpoint after evidence that verified: `base` (or nothing)
    /// moved past `tail` (the evidence's entries, parsed), at the quoted
    /// `pcr`. None for evidence of a node without a TPM epoch.
    pub(super) fn after(
        base: Option<&Checkpoint>,
        ev: &Evidence,
        tail: &[Entry],
        pcr: [u8; 32],
    ) -> Option<Checkpoint> {
        let reset_count = ev.epoch.reset_count?;
        let mut cp = base.cloned().unwrap_or_else(|| Checkpoint {
            reset_count,
            epoch_started_at: ev.epoch.started_at,
            ..Default::default()
        });
        for e in tail {
            cp.pods.entry(e.pod.clone()).or_default().add(e);
        }
        cp.entries = ev.log_start + tail.len() as u64;
        cp.pcr = pcr;
        Some(cp)
    }

    /// Keeps what the verifier concluded of `pod`'s entries (all those
    /// before this checkpoint).
    pub(super) fn appraised(mut self, pod: &str, a: Appraisal) -> Checkpoint {
        let mark = self.pods.entry(pod.to_string()).or_default();
        if mark.entries == a.entries && mark.hash == a.hash {
            mark.appraisal = Some(a);
        }
        self
    }

    /// How many of `pod`'s first entries evidence may leave out for a
    /// verifier appraising under `under` (it kept their appraisal).
    pub fn appraised_entries(&self, pod: &str, under: &[u8; 32]) -> u64 {
        self.pods
            .get(pod)
            .and_then(|m| m.appraisal.as_ref())
            .filter(|a| a.under == *under)
            .map_or(0, |a| a.entries)
    }
}

/// Where the pod's entries the evidence carries begin, as kept.
pub(super) struct Earlier {
    /// What was concluded of the pod's entries the evidence leaves out.
    pub(super) prior: Option<Appraisal>,
    /// The pod's entries after those and before the checkpoint, parsed and
    /// checked against the kept count and hash.
    pub(super) entries: Vec<Entry>,
    /// Lines of `pod_log` they took.
    pub(super) taken: usize,
}

/// The pod's entries from before the checkpoint, as the evidence's
/// `pod_log` begins (from `pod_log_start`: the pod's first entries may be
/// left out when this verifier kept its appraisal of them under `under`).
pub(super) fn earlier(
    ev: &Evidence,
    pod: &str,
    base: Option<&Checkpoint>,
    under: &[u8; 32],
    errors: &mut Vec<String>,
) -> Earlier {
    let mark = Checkpoint::pod(base, pod);
    let none = |taken| Earlier {
        prior: None,
        entries: Vec::new(),
        taken,
    };
    let s = ev.pod_log_start;
    let prior = match s {
        0 => None,
        _ => {
            let kept = mark.appraisal.as_ref().filter(|a| a.entries == s);
            match kept {
                Some(a) if a.under == *under && a.backend == ev.backend => Some(a.clone()),
                _ => {
                    errors.push(format!(
                        "the evidence leaves out the pod's first {s} entries, but this verifier kept no appraisal of exactly those under this policy and these options: ask for all of them"
                    ));
                    return none(0);
                }
            }
        }
    };
    let from = prior.as_ref().map_or_else(PodMark::default, |a| PodMark {
        entries: a.entries,
        hash: a.hash,
        appraisal: None,
    });
    let n = ev.log_start;
    let Some(k) = mark
        .entries
        .checked_sub(from.entries)
        .and_then(|k| usize::try_from(k).ok())
    else {
        errors.push(format!(
            "the evidence leaves out the pod's first {s} entries, but it had {} before log entry {n}",
            mark.entries
        ));
        return none(0);
    };
    if k == 0 {
        return Earlier {
            prior,
            entries: Vec::new(),
            taken: 0,
        };
    }
    if ev.pod_log.len() < k {
        errors.push(format!(
            "the evidence carries {} of the pod's entries, but the pod had {k} before log entry {n} when this verifier checked them: entries were withheld",
            ev.pod_log.len()
        ));
        return none(ev.pod_log.len());
    }
    let mut seen = from;
    let mut out = Vec::with_capacity(k);
    for (i, line) in ev.pod_log[..k].iter().enumerate() {
        let at = s + i as u64 + 1;
        match Entry::parse(line) {
            Ok(e) if !e.is_consistent() || e.is_redacted() || e.pod != pod || e.pcr != ev.pcr => {
                errors.push(format!(
                    "the pod's entry {at} (before log entry {n}) is not an entry of this pod as logged: the log was modified"
                ));
                return none(k);
            }
            Ok(e) => {
                seen.add(&e);
                out.push(e);
            }
            Err(m) => {
                errors.push(format!("the pod's entry {at}: {m}"));
                return none(k);
            }
        }
    }
    if seen.hash != mark.hash {
        errors.push(format!(
            "the pod's {} entries before log entry {n} are not those this verifier checked: the log was modified",
            mark.entries
        ));
    }
    Earlier {
        prior,
        entries: out,
        taken: k,
    }
}
