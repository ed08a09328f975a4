//! Each pod's bookkeeping of what it has in the journal ("measured once
//! already?", how many entries against its quota), kept while the pod
//! exists. The log itself keeps every entry for the epoch (one PCR holds
//! them all); the bookkeeping only serves the pod's next accesses, and a
//! removed pod makes none. Kept for every pod the node ever ran, it grew
//! by ~200 bytes an entry (20-50 KiB a pod) for as long as the node ran
//! pods, until 2026-12-05.

use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::log::{Entry, Event};

/// What an entry is, for "logged already?": its container, path, digest and
/// event under a keyed hash ([`PodLogs::key`]). 16 bytes where the four
/// themselves took ~200 (two strings and their table slot): a pod at its
/// quota of 20 000 entries held ~5 MB of imacri's memory, now ~0.6.
pub(super) type Key = [u8; 16];

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
    /// Counts `e`, whose key is `key`.
    pub(super) fn note(&mut self, e: &Entry, key: Key) {
        self.entries += 1;
        self.quota_hit |= e.event == Event::Quota;
        self.seen.insert(key);
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
pub(super) struct PodLogs {
    live: papaya::HashMap<String, Arc<Mutex<PodLog>>>,
    forgotten: papaya::HashSet<String>,
    /// `forgotten` oldest first (taken only to forget).
    order: Mutex<VecDeque<String>>,
    /// The keys' secret, new at each start: two accesses whose keys
    /// collided would log only the first, so a pod must not be able to
    /// find a pair (it never sees a key, and each is 128 bits of a keyed
    /// SHA-256).
    secret: [u8; 32],
}

impl Default for PodLogs {
    fn default() -> PodLogs {
        PodLogs {
            live: Default::default(),
            forgotten: Default::default(),
            order: Default::default(),
            secret: rand::random(),
        }
    }
}

impl PodLogs {
    /// The key of an entry of container `ctr` for `path` with `digest`.
    pub(super) fn key(&self, ctr: &str, path: &str, digest: &[u8; 32], ev: Event) -> Key {
        let mut h = Sha256::new();
        h.update(self.secret);
        // Lengths first: no two (container, path) pairs read the same.
        for part in [ctr, path, ev.as_str()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(digest);
        let full: [u8; 32] = h.finalize().into();
        let mut k = [0; 16];
        k.copy_from_slice(&full[..16]);
        k
    }

    /// The key of `e`.
    pub(super) fn key_of(&self, e: &Entry) -> Key {
        self.key(&e.container, &e.path, &e.digest, e.event)
    }

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
    fn keys_tell_every_field_apart() {
        let logs = PodLogs::default();
        let k = |c: &str, p: &str, d: u8, e: Event| logs.key(c, p, &[d; 32], e);
        let base = k("c", "/bin/sh", 1, Event::Exec);
        assert_eq!(base, k("c", "/bin/sh", 1, Event::Exec));
        for other in [
            k("d", "/bin/sh", 1, Event::Exec),
            k("c", "/bin/ls", 1, Event::Exec),
            k("c", "/bin/sh", 2, Event::Exec),
            k("c", "/bin/sh", 1, Event::Mmap),
            // The boundary between container and path moved.
            k("c/", "bin/sh", 1, Event::Exec),
        ] {
            assert_ne!(base, other);
        }
        // Another start, another secret.
        assert_ne!(
            base,
            PodLogs::default().key("c", "/bin/sh", &[1; 32], Event::Exec)
        );
    }

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
