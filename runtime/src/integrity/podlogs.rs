//! Each pod's bookkeeping of what it has in the journal ("measured once
//! already?", how many entries against its quota), kept while the pod
//! exists. The log itself keeps every entry for the epoch (one PCR holds
//! them all); the bookkeeping only serves the pod's next accesses, and a
//! removed pod makes none. Kept for every pod the node ever ran, it grew
//! by ~200 bytes an entry (20-50 KiB a pod) for as long as the node ran
//! pods, until 2026-12-05.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::log::{Entry, Event};

/// What an entry is, for "logged already?": container, path, digest, event.
pub(super) type Key = (String, String, [u8; 32], Event);

/// One pod's bookkeeping, behind a lock of its own: the check every access
/// makes never waits on another pod (a thread working for a pod runs in the
/// pod's CPU cgroup, and one throttled while it held a lock every pod's
/// accesses take made them all wait out its period).
#[derive(Default)]
pub(super) struct PodLog {
    pub(super) seen: HashSet<Key>,
    pub(super) entries: u64,
    /// Its quota entry is written.
    pub(super) quota_hit: bool,
}

impl PodLog {
    pub(super) fn note(&mut self, e: &Entry) {
        self.entries += 1;
        self.quota_hit |= e.event == Event::Quota;
        self.seen
            .insert((e.container.clone(), e.path.clone(), e.digest, e.event));
    }

    /// An entry that never reached the log.
    pub(super) fn unnote(&mut self, key: &Key) {
        if self.seen.remove(key) {
            self.entries = self.entries.saturating_sub(1);
        }
    }
}

/// How many forgotten pods are known as such. An entry can still come for
/// a pod after it is forgotten (a hashing job that outlived its container
/// ends with one): it is logged, and the bookkeeping is not made again.
const FORGOTTEN_KEPT: usize = 4096;

/// Every pod's [`PodLog`], found without a lock.
#[derive(Default)]
pub(super) struct PodLogs {
    live: papaya::HashMap<String, Arc<Mutex<PodLog>>>,
    forgotten: papaya::HashSet<String>,
    /// `forgotten` oldest first (taken only to forget).
    order: Mutex<VecDeque<String>>,
}

impl PodLogs {
    /// `pod`'s bookkeeping if it has any (a query makes none).
    pub(super) fn get(&self, pod: &str) -> Option<Arc<Mutex<PodLog>>> {
        self.live.pin().get(pod).cloned()
    }

    /// `pod`'s bookkeeping, made at its first entry; a forgotten pod gets a
    /// new one each time that nobody keeps.
    pub(super) fn of(&self, pod: &str) -> Arc<Mutex<PodLog>> {
        let logs = self.live.pin();
        if let Some(p) = logs.get(pod) {
            return p.clone();
        }
        if self.is_forgotten(pod) {
            return Arc::default();
        }
        let p = logs
            .get_or_insert_with(pod.to_string(), Default::default)
            .clone();
        // Forgotten meanwhile: not kept after all.
        if self.is_forgotten(pod) {
            logs.remove(pod);
        }
        p
    }

    pub(super) fn is_forgotten(&self, pod: &str) -> bool {
        self.forgotten.pin().contains(pod)
    }

    /// Drops `pod`'s bookkeeping for good (the pod is removed).
    pub(super) fn forget(&self, pod: &str) {
        // Known as forgotten first: `of` then makes nothing for it again.
        self.forgotten.pin().insert(pod.to_string());
        self.live.pin().remove(pod);
        let Ok(mut order) = self.order.lock() else {
            return;
        };
        order.push_back(pod.to_string());
        while order.len() > FORGOTTEN_KEPT {
            if let Some(old) = order.pop_front() {
                self.forgotten.pin().remove(&old);
            }
        }
    }

    /// Pods with bookkeeping.
    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_pod_keeps_no_bookkeeping_even_when_an_entry_comes_late() {
        let logs = PodLogs::default();
        let a = logs.of("a");
        a.lock().unwrap().entries = 3;
        assert_eq!(logs.of("a").lock().unwrap().entries, 3, "the same one");
        logs.of("b");
        assert_eq!(logs.len(), 2);
        logs.forget("a");
        assert!(logs.get("a").is_none());
        // A late entry's bookkeeping is a fresh one, kept by nobody.
        assert_eq!(logs.of("a").lock().unwrap().entries, 0);
        assert_eq!(logs.len(), 1);
        // Only so many forgotten pods are known as such.
        for i in 0..FORGOTTEN_KEPT {
            logs.forget(&format!("old-{i}"));
        }
        assert!(!logs.is_forgotten("a"));
        assert!(logs.is_forgotten(&format!("old-{}", FORGOTTEN_KEPT - 1)));
        assert_eq!(logs.forgotten.len(), FORGOTTEN_KEPT);
    }
}
