//! Removed ima pods stay quotable for a while (`attestation.retention_secs`):
//! their entries stay in the log anyway (the PCR includes them), and a
//! verifier that polls must still be able to judge what a pod did in its
//! last minutes after kubelet removed it. Persisted next to the journal so
//! a restart keeps them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedPod {
    /// The backend that measured it, as its evidence names it.
    pub backend: String,
    /// Unix seconds.
    pub removed_at: i64,
}

#[derive(Debug)]
pub struct Retained {
    path: PathBuf,
    retention_secs: i64,
    pods: Mutex<BTreeMap<String, RemovedPod>>,
    /// Pods whose retention ended, until taken (the journal then forgets
    /// where their entries lie).
    expired: Mutex<Vec<String>>,
}

impl Retained {
    /// Loads `<dir>/removed.json` (missing or unreadable: none kept).
    pub fn open(dir: &Path, retention_secs: u64) -> Retained {
        let path = dir.join("removed.json");
        let pods = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Retained {
            path,
            retention_secs: i64::try_from(retention_secs).unwrap_or(i64::MAX),
            pods: Mutex::new(pods),
            expired: Mutex::default(),
        }
    }

    fn prune(&self, pods: &mut BTreeMap<String, RemovedPod>, now: i64) {
        let mut gone = Vec::new();
        pods.retain(|id, p| {
            let keep = now.saturating_sub(p.removed_at) < self.retention_secs;
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        if let (false, Ok(mut e)) = (gone.is_empty(), self.expired.lock()) {
            e.extend(gone);
        }
    }

    /// The pods quotable at `now`.
    pub fn ids(&self, now: i64) -> Vec<String> {
        let Ok(mut pods) = self.pods.lock() else {
            return Vec::new();
        };
        self.prune(&mut pods, now);
        pods.keys().cloned().collect()
    }

    /// The pods whose retention ended since last asked.
    pub fn take_expired(&self) -> Vec<String> {
        self.expired
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    /// Keeps `id` quotable from `now` on.
    pub fn remember(&self, id: &str, backend: &str, now: i64) -> std::io::Result<()> {
        let mut pods = self
            .pods
            .lock()
            .map_err(|_| std::io::Error::other("retained pods lock poisoned"))?;
        self.prune(&mut pods, now);
        if self.retention_secs > 0 {
            pods.insert(
                id.to_string(),
                RemovedPod {
                    backend: backend.to_string(),
                    removed_at: now,
                },
            );
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&*pods).unwrap_or_default())?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The removed pod `id`, while its retention lasts.
    pub fn get(&self, id: &str, now: i64) -> Option<RemovedPod> {
        let mut pods = self.pods.lock().ok()?;
        self.prune(&mut pods, now);
        pods.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_for_the_retention_then_gone_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let r = Retained::open(d.path(), 60);
        r.remember("pod1", "fanotify", 1000).unwrap();
        assert_eq!(r.get("pod1", 1059).unwrap().backend, "fanotify");
        let again = Retained::open(d.path(), 60);
        assert!(again.get("pod1", 1030).is_some());
        assert!(again.get("pod1", 1060).is_none());
        assert!(again.get("other", 1000).is_none());
        // Retention 0: removed pods are not quotable at all.
        let none = Retained::open(d.path(), 0);
        none.remember("pod2", "fanotify", 2000).unwrap();
        assert!(none.get("pod2", 2000).is_none());
    }

    #[test]
    fn pods_whose_retention_ended_are_told_once() {
        let d = tempfile::tempdir().unwrap();
        let r = Retained::open(d.path(), 60);
        r.remember("a", "fanotify", 1000).unwrap();
        r.remember("b", "fanotify", 1030).unwrap();
        assert_eq!(r.ids(1059), ["a", "b"]);
        assert!(r.take_expired().is_empty());
        assert_eq!(r.ids(1060), ["b"]);
        assert_eq!(r.take_expired(), ["a"]);
        assert!(r.take_expired().is_empty());
        r.remember("c", "fanotify", 1100).unwrap();
        assert_eq!(r.take_expired(), ["b"]);
    }
}
