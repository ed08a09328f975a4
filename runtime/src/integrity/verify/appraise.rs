//! Appraising a pod's entries against the verifier's policy and options,
//! continuing from what the verifier concluded of its earlier entries (kept
//! in its checkpoint), so that evidence need not carry a pod's whole
//! history at every quote: a pod with 20 000 entries sent ~7 MB each time.
//! What is kept is bound to the policy and options it was made under (a
//! changed policy appraises the pod's whole history again) and to the
//! count and running hash of the entries it covers.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

use super::checkpoint::{hex32, Checkpoint};
use super::Expectations;
use crate::integrity::allowlist::Violation;
use crate::integrity::log::{self, Entry, Event};

/// Violations an appraisal lists; past them it only counts. A pod can log
/// distinct violating entries up to its quota (20 000 by default, each path
/// up to 16 KiB escaped), and a verifier keeps its appraisal (in its
/// counters file, which `watch` rewrites every round) and reports it at
/// every check: listing them all would let a pod grow its verifier's
/// state by hundreds of MB. The first ones show where it began; the log
/// (`imacri attest log`) holds every one.
pub const LISTED_VIOLATIONS: usize = 100;

/// What a verifier concluded of a pod's first `entries` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appraisal {
    /// The entries it covers, and their template hashes folded from zero
    /// (as [`super::PodMark`] folds them).
    pub entries: u64,
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// What they were appraised under ([`key`]) and the pod's backend.
    #[serde(with = "hex32")]
    pub under: [u8; 32],
    pub backend: String,
    /// Containers with entries, and the init digest each start declared.
    pub containers: BTreeSet<String>,
    pub declared: BTreeMap<String, String>,
    /// The first [`LISTED_VIOLATIONS`] found, and how many more.
    pub violations: Vec<Violation>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unlisted: u64,
    /// Measurements (neither gaps nor start entries), and gaps.
    pub measurements: u64,
    pub gaps: u64,
}

/// The policy and the options an appraisal depends on, as one hash.
pub fn key(x: &Expectations<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(x.policy).unwrap_or_default());
    h.update([
        u8::from(x.allow_gaps),
        u8::from(x.require_no_anonymous_exec),
    ]);
    h.finalize().into()
}

impl Appraisal {
    /// A fresh appraisal of a pod under `under`.
    pub(super) fn new(under: [u8; 32], backend: &str) -> Appraisal {
        Appraisal {
            under,
            backend: backend.to_string(),
            ..Default::default()
        }
    }

    /// Appraises the pod's next `entries`, in order.
    pub(super) fn take(&mut self, entries: &[&Entry], x: &Expectations<'_>) {
        let pod = x.pod_sandbox_id;
        for e in entries {
            self.entries += 1;
            self.hash = log::extend(&self.hash, &e.template_hash);
        }
        // The init each container's start entry declares (see
        // `init::declared`): its execution with that digest is the node's
        // own, whatever build the verifier is.
        for e in entries.iter().filter(|e| e.event == Event::Start) {
            if let Some(d) = crate::integrity::init::declared(&e.path) {
                self.declared.insert(e.container.clone(), d.to_string());
            }
        }
        let own_init = |e: &Entry| {
            e.path == crate::integrity::init::PATH
                && matches!(e.event, Event::Exec | Event::Mmap)
                && self.declared.get(&e.container) == Some(&e.digest_hex())
        };
        let mut found: Vec<Violation> = entries
            .iter()
            .filter(|e| !own_init(e))
            .filter_map(|e| x.policy.check(e))
            .collect();
        // Every container's measurements begin with its start entry (image
        // and the moment marking began): without it nothing shows the
        // container was measured from its first instruction.
        for e in entries {
            let first = self.containers.insert(e.container.clone());
            if first && e.event != Event::Start {
                found.push(violation(
                    e,
                    "the container's entries do not begin with a start entry: nothing shows \
                     it was measured from its first instruction",
                ));
            }
        }
        let starts = || {
            entries
                .iter()
                .filter(|e| e.event == Event::Start && e.container != pod)
        };
        // Under the fanotify backend, a container's processes must have run
        // through imacri's init (its start entry declares it): without it a
        // file from another filesystem could have run unseen. The pause
        // container (named by the pod's ID) runs only imacri's pause.
        if self.backend.starts_with("fanotify") {
            found.extend(
                starts()
                    .filter(|e| crate::integrity::init::declared(&e.path).is_none())
                    .map(|e| {
                        violation(
                            e,
                            "the container did not run through imacri's init (created by an \
                             imacri without it): files from other filesystems could run \
                             unmeasured; recreate it",
                        )
                    }),
            );
        }
        // Code that no file held (a JIT's, injected) leaves no entry: only
        // the container's policy says whether any could run.
        if x.require_no_anonymous_exec {
            found.extend(
                starts()
                    .filter(|e| !crate::integrity::setting::AnonymousExec::denied_by(&e.path))
                    .map(|e| {
                        violation(
                            e,
                            "the container's policy allowed executable memory no file backs \
                             (anonymous_exec = \"allow\"): code no entry shows could have run",
                        )
                    }),
            );
        }
        // A pod is trusted only if it was measured all along.
        let gaps = entries.iter().filter(|e| e.event == Event::Gap);
        if !x.allow_gaps {
            found.extend(gaps.clone().map(|e| Violation {
                digest: String::new(),
                ..violation(
                    e,
                    "the container was not measured for a while (imacri restart, stopped \
                     reader or hash error); --allow-gaps accepts that",
                )
            }));
        }
        self.gaps += gaps.count() as u64;
        self.measurements += entries
            .iter()
            .filter(|e| !matches!(e.event, Event::Gap | Event::Start))
            .count() as u64;
        let room = LISTED_VIOLATIONS.saturating_sub(self.violations.len());
        self.unlisted += found.len().saturating_sub(room) as u64;
        self.violations.extend(found.into_iter().take(room));
    }

    /// Whether any violation was found.
    pub fn violated(&self) -> bool {
        !self.violations.is_empty() || self.unlisted > 0
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn violation(e: &Entry, reason: &str) -> Violation {
    Violation {
        path: e.path.clone(),
        digest: e.digest_hex(),
        container: e.container.clone(),
        event: e.event,
        reason: reason.into(),
    }
}

/// A pod's entries before a checkpoint, appraised from the node's pages of
/// them (GetLogPage for the pod) before asking for evidence that leaves
/// them out: a pod's history can be longer than one Quote carries (a new
/// verifier, or a changed policy, needs all of it). Nothing vouches for the
/// pages by themselves: they must fold to the checkpoint's hash of the
/// pod's entries, whose log the evidence's quote then proves.
pub struct PodPages {
    under: [u8; 32],
    /// The pod's entries before the checkpoint: count and hash.
    mark: (u64, [u8; 32]),
    /// This verifier's kept appraisal of the first of them, continued.
    appraisal: Option<Appraisal>,
}

impl PodPages {
    /// Pages of what `cp` holds of the pod's entries beyond what this
    /// verifier appraised under `x`'s policy and options, when more than
    /// `after` (fewer come in the Quote).
    pub fn new(cp: &Checkpoint, x: &Expectations<'_>, after: u64) -> Option<PodPages> {
        let mark = cp.pods.get(x.pod_sandbox_id)?;
        let under = key(x);
        let prior = mark.appraisal.clone().filter(|a| a.under == under);
        let appraised = prior.as_ref().map_or(0, |a| a.entries);
        (mark.entries.saturating_sub(appraised) > after).then_some(PodPages {
            under,
            mark: (mark.entries, mark.hash),
            appraisal: prior,
        })
    }

    /// The pod's entry the next page starts at (counted from its first).
    pub fn next(&self) -> u64 {
        self.appraisal.as_ref().map_or(0, |a| a.entries)
    }

    /// Whether every one of the pod's entries before the checkpoint came.
    pub fn done(&self) -> bool {
        self.next() >= self.mark.0
    }

    /// Appraises a page of the pod's entries from [`PodPages::next`] on
    /// (those past the checkpoint are left to the Quote); `backend` is the
    /// node's word for the pod's.
    pub fn take(
        &mut self,
        lines: &[String],
        backend: &str,
        x: &Expectations<'_>,
    ) -> Result<(), String> {
        let a = self
            .appraisal
            .get_or_insert_with(|| Appraisal::new(self.under, backend));
        if a.backend != backend {
            return Err(format!(
                "the node pages the pod's entries as measured by {backend:?}, but this verifier appraised them as {:?}",
                a.backend
            ));
        }
        let want = usize::try_from(self.mark.0 - a.entries).unwrap_or(usize::MAX);
        let mut es = Vec::with_capacity(lines.len().min(want));
        for (i, line) in lines.iter().take(want).enumerate() {
            let at = a.entries + i as u64 + 1;
            match Entry::parse(line) {
                Ok(e) if e.is_consistent() && !e.is_redacted() && e.pod == x.pod_sandbox_id => {
                    es.push(e)
                }
                Ok(_) => {
                    return Err(format!(
                        "the pod's entry {at} as the node paged it is not an entry of this pod as logged: the log was modified"
                    ))
                }
                Err(m) => return Err(format!("the pod's entry {at} as the node paged it: {m}")),
            }
        }
        let refs: Vec<&Entry> = es.iter().collect();
        a.take(&refs, x);
        Ok(())
    }

    /// `cp` keeping the appraisal of all the pod's entries before it, once
    /// every page came and they fold to its hash of them.
    pub fn finish(self, cp: Checkpoint, pod: &str) -> Result<Checkpoint, String> {
        let (n, hash) = self.mark;
        match self.appraisal {
            Some(a) if a.entries == n && a.hash == hash => Ok(cp.appraised(pod, a)),
            Some(a) if a.entries < n => Err(format!(
                "the node paged {} of the pod's {n} entries before log entry {}: entries were withheld",
                a.entries, cp.entries
            )),
            _ => Err(format!(
                "the pod's entries the node paged are not its {n} entries before log entry {} (they do not fold to their hash in the log): the log was modified",
                cp.entries
            )),
        }
    }
}
