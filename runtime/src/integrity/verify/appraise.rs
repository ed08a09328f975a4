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

use super::checkpoint::hex32;
use super::Expectations;
use crate::integrity::allowlist::Violation;
use crate::integrity::log::{self, Entry, Event};

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
    pub violations: Vec<Violation>,
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
        self.violations.extend(found);
    }
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
