//! The node's measurement journal: every ima pod's entries in one
//! append-only log (one PCR holds them all, so replay needs all of them),
//! the TPM extends that anchor it, and the epoch they belong to.
//!
//! Files under `<root>/integrity/`: `measurements.log` (the current epoch's
//! log), `epoch.json`, `archive/` (logs of earlier epochs, never replayed),
//! `ak.pub`/`ak.priv` (the attestation key blobs).
//!
//! Order: an entry is appended to the log first, then its extend is queued
//! on the TPM thread. If imacri dies in between, the next start finds the
//! PCR equal to the replay of a prefix of the log and extends the rest. A TPM
//! reset (reboot) starts a new epoch: the old log is archived and its entries
//! are never replayed against the new PCR.
//!
//! Durability: `record` returns (and so the access it measured is answered)
//! only once its entry is on disk. One thread writes the log
//! ([`super::appender`]: callers, many of them working for a pod and
//! throttled with it, take no lock the others need) and shares each
//! `fdatasync` among every entry written meanwhile (group commit). Entries a restart
//! finds written but not extended are extended then and followed by a `gap`
//! entry for each container they belong to: the TPM did not vouch for them
//! when they happened, and the verifier says so.

use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::appender::{AppendError, Appender};
use super::log::{Entry, Event};
use super::podlogs::PodLogs;
use index::LogIndex;

mod epoch;
mod index;
mod reopen;
pub mod view;
use super::tpm::{Quote, Tpm, TpmError};
pub use epoch::Epoch;
use epoch::{archive, Resumed};
pub use index::Located;
pub use reopen::Keep;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("measurement journal: {0}")]
    Poisoned(&'static str),
    /// The log's writer could not write or sync an entry.
    #[error("measurement log: {0}")]
    Write(#[from] AppendError<JournalError>),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// The pod has as many entries as `ima.max_entries_per_pod` allows: the
    /// access cannot be measured and must be refused.
    #[error("pod {pod} reached its measurement quota of {quota} entries")]
    Quota { pod: String, quota: u64 },
}

type JResult<T> = std::result::Result<T, JournalError>;

fn io<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

/// Per pod: what status reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PodSummary {
    pub measurements: u64,
    pub violations: u64,
    #[serde(rename = "lastViolation")]
    pub last_violation: Option<String>,
}

/// A snapshot for evidence: the log as stored (its first `log_len` bytes,
/// read with [`view`]) and the quote over it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub log_path: PathBuf,
    pub log_len: u64,
    /// Where the pod's view lies in it (None: read all of it).
    pub located: Option<Located>,
    pub epoch: Epoch,
    pub pcr: u32,
    /// None: no TPM ("unanchored").
    pub quote: Option<Quote>,
    pub ak_sec1: Option<Vec<u8>>,
}

struct Inner {
    file: std::fs::File,
    pods: HashMap<String, PodSummary>,
    count: u64,
    index: LogIndex,
}

/// Entries one pod may add to the node log before new accesses are refused
/// (hard links and renames of one file would otherwise grow it unbounded).
pub const DEFAULT_POD_QUOTA: u64 = 20_000;

pub struct Journal {
    dir: PathBuf,
    pcr: u32,
    quota: u64,
    tpm: Option<Tpm>,
    epoch: Mutex<Epoch>,
    /// Taken by the log's writer and by imacri's own readers (status,
    /// evidence), never by a thread working for a pod.
    inner: Arc<Mutex<Inner>>,
    /// Each pod's bookkeeping while it exists (`podlogs.rs`).
    pod_logs: Arc<PodLogs>,
    /// The log's one writer: appends wait on it without taking a lock.
    writer: Appender<Appending, JournalError>,
}

/// What an entry is to record, before it is one.
struct Access<'a> {
    pod: &'a str,
    ctr: &'a str,
    path: &'a str,
    digest: [u8; 32],
    ev: Event,
}

/// An entry on its way to the log.
struct Appending {
    line: String,
    entry: Entry,
    violation: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

impl Journal {
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join("measurements.log")
    }

    /// Opens (or starts) the journal and reconciles it with the TPM.
    /// Blocking: TPM commands and file reads.
    pub fn open(dir: &Path, pcr: u32, tpm: Option<Tpm>) -> JResult<Journal> {
        Self::open_keeping(dir, pcr, tpm, &|_| true)
    }

    /// As [`open`](Self::open), with bookkeeping and summaries made only
    /// for the pods `keep` names: the log read back names every pod of the
    /// epoch, and only those that still exist log again.
    pub fn open_keeping(
        dir: &Path,
        pcr: u32,
        tpm: Option<Tpm>,
        keep: &dyn Fn(&str) -> bool,
    ) -> JResult<Journal> {
        let keep = Keep {
            pods: keep,
            located: keep,
        };
        Self::open_with(dir, pcr, tpm, &keep)
    }

    /// As [`open_keeping`](Self::open_keeping), keeping where the entries
    /// of more pods lie than those it keeps bookkeeping for (removed pods
    /// still quotable).
    pub fn open_with(dir: &Path, pcr: u32, tpm: Option<Tpm>, keep: &Keep<'_>) -> JResult<Journal> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let log_path = Self::log_path(dir);
        let Resumed {
            mut epoch,
            saved,
            pcr_now,
        } = Epoch::resume(dir, &log_path, tpm.as_ref())?;
        let mut pod_logs = PodLogs::default();
        let read = match reopen::read_back(&log_path, pcr_now, keep, &pod_logs) {
            Ok(r) => r,
            Err(reopen::ReadBackError::Corrupt { line, error }) => {
                // Keep the evidence of tampering aside; the PCR (unless it
                // is still all zero) then marks the epoch unverifiable.
                tracing::error!(path = %log_path.display(), line, %error, "measurement log is corrupt; archived it");
                archive(
                    dir,
                    &log_path,
                    &saved.clone().unwrap_or_default(),
                    "corrupt",
                )?;
                pod_logs = PodLogs::default();
                reopen::ReadBack {
                    unextended: pcr_now.filter(|p| *p == [0; 32]).map(|_| Vec::new()),
                    ..Default::default()
                }
            }
            Err(reopen::ReadBackError::Io(e)) => return Err(io("reading", &log_path)(e)),
        };
        // Containers with entries the TPM had not seen at this start.
        let mut unextended: Vec<(String, String)> = Vec::new();
        if let (Some(tpm), Some(now)) = (&tpm, pcr_now) {
            match read.unextended {
                Some(tail) => {
                    if !tail.is_empty() {
                        tracing::warn!(
                            missing = tail.len(),
                            "extended log entries the TPM had not seen (imacri stopped between log and extend)"
                        );
                    }
                    for (hash, pod, ctr) in tail {
                        tpm.extend_queued(hash);
                        if !unextended.contains(&(pod.clone(), ctr.clone())) {
                            unextended.push((pod, ctr));
                        }
                    }
                }
                None => {
                    let msg = format!(
                        "PCR {pcr} holds {} which the measurement log does not replay to: something else extends this PCR; choose a PCR only imacri uses (ima.pcr)",
                        hex::encode(now)
                    );
                    tracing::error!("{msg}");
                    epoch.broken = Some(msg);
                }
            }
        }
        epoch.save(dir)?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io("opening", &log_path))?;
        if read.unterminated {
            // The next entry would join the last line.
            file.write_all(b"\n")
                .map_err(io("appending to", &log_path))?;
        }
        let sync_file = file.try_clone().map_err(io("opening", &log_path))?;
        let inner = Arc::new(Mutex::new(Inner {
            file,
            pods: read.pods,
            count: read.count,
            index: read.index,
        }));
        let pod_logs = Arc::new(pod_logs);
        let writer = Self::writer(
            inner.clone(),
            pod_logs.clone(),
            tpm.clone(),
            sync_file,
            log_path,
        )?;
        let j = Journal {
            dir: dir.to_path_buf(),
            pcr,
            quota: DEFAULT_POD_QUOTA,
            tpm,
            epoch: Mutex::new(epoch),
            inner,
            pod_logs,
            writer,
        };
        for (pod, ctr) in unextended {
            j.record(&pod, &ctr, "-", [0; 32], Event::Gap, false)?;
        }
        Ok(j)
    }

    /// The log's writer thread: writes each batch of entries in order,
    /// queues their extends in the same order (under the lock a snapshot
    /// takes, so a quote covers exactly the log it is sent with), then one
    /// `fdatasync` for the batch (group commit).
    fn writer(
        inner: Arc<Mutex<Inner>>,
        pod_logs: Arc<PodLogs>,
        tpm: Option<Tpm>,
        sync_file: std::fs::File,
        log_path: PathBuf,
    ) -> JResult<Appender<Appending, JournalError>> {
        let commit = move |batch: &[Appending]| -> JResult<()> {
            let failed = |context: &'static str, source: std::io::Error| JournalError::Io {
                context,
                path: log_path.clone(),
                source,
            };
            {
                let mut inner = inner
                    .lock()
                    .map_err(|_| JournalError::Poisoned("lock poisoned"))?;
                for a in batch {
                    inner
                        .file
                        .write_all(a.line.as_bytes())
                        .map_err(|e| failed("appending to", e))?;
                    // A removed pod's late entry makes no summary (or
                    // offsets) again.
                    let kept = !pod_logs.is_forgotten(&a.entry.pod);
                    let pod = kept.then_some(a.entry.pod.as_str());
                    inner.index.add(a.line.len() as u64, pod);
                    if kept {
                        inner.note(&a.entry, a.violation);
                    }
                    if let Some(t) = &tpm {
                        t.extend_queued(a.entry.template_hash);
                    }
                }
            }
            sync_file.sync_data().map_err(|e| failed("syncing", e))
        };
        Appender::spawn("imacri-journal", commit).map_err(|source| JournalError::Io {
            context: "starting the writer of",
            path: PathBuf::from("measurements.log"),
            source,
        })
    }

    /// Sets the per-pod entry quota (`ima.max_entries_per_pod`).
    pub fn with_quota(mut self, quota: u64) -> Journal {
        self.quota = quota.max(1);
        self
    }

    pub fn pcr(&self) -> u32 {
        self.pcr
    }

    pub fn anchored(&self) -> bool {
        self.tpm.is_some()
    }

    pub fn tpm(&self) -> Option<&Tpm> {
        self.tpm.as_ref()
    }

    /// Whether this measurement is already in the log (IMA's "measure once").
    pub fn seen(&self, pod: &str, ctr: &str, path: &str, digest: &[u8; 32], ev: Event) -> bool {
        let key = self.pod_logs.key(ctr, path, digest, ev);
        // A query: a pod with nothing logged gets no bookkeeping made.
        let found = self.pod_logs.get(pod);
        found.is_some_and(|p| p.lock().is_ok_and(|p| p.seen.contains(&key)))
    }

    /// Drops a removed pod's bookkeeping and summary, and where its
    /// entries lie; its entries stay in the log.
    pub fn forget(&self, pod: &str) {
        self.retire(pod);
        if let Ok(mut inner) = self.inner.lock() {
            inner.index.forget(pod);
        }
    }

    /// Drops a removed pod's bookkeeping and summary, but keeps where its
    /// entries lie while it is still quotable ([`Journal::forget`] then):
    /// its quotes read only its lines (0.1 ms, where a read of a long
    /// epoch's whole log took 20 ms and much of the node's evidence memory).
    pub fn retire(&self, pod: &str) {
        self.pod_logs.forget(pod);
        if let Ok(mut inner) = self.inner.lock() {
            inner.pods.remove(pod);
        }
    }

    /// Pods whose entries the index locates (pods that exist, and removed
    /// ones still quotable).
    pub fn pods_located(&self) -> usize {
        self.inner.lock().map(|i| i.index.pods()).unwrap_or(0)
    }

    /// Pods with bookkeeping and pods with a summary (both: pods that
    /// exist, or whose removal is under way).
    pub fn pods_tracked(&self) -> (usize, usize) {
        let summaries = self.inner.lock().map(|i| i.pods.len()).unwrap_or(0);
        (self.pod_logs.len(), summaries)
    }

    /// Appends a measurement unless the same one is already logged; returns
    /// the new entry. `violation` marks it in the pod's summary.
    pub fn record(
        &self,
        pod: &str,
        ctr: &str,
        path: &str,
        digest: [u8; 32],
        ev: Event,
        violation: bool,
    ) -> JResult<Option<Entry>> {
        let own = matches!(ev, Event::Gap | Event::Start);
        let access = Access {
            pod,
            ctr,
            path,
            digest,
            ev,
        };
        self.record_as(access, violation, own)
    }

    /// A `gap` for an access of the pod that went unmeasured (refused, or
    /// let through unhashed): unlike the daemon's own gaps (a restart, a
    /// reader that failed), the pod causes these at will, so each is
    /// logged once per container and path and counts against the pod's
    /// quota (a loop of refused executions, or one under ever new names,
    /// grew the node log and the TPM's extends without bound).
    pub fn record_unmeasured(&self, pod: &str, ctr: &str, path: &str) -> JResult<Option<Entry>> {
        let access = Access {
            pod,
            ctr,
            path,
            digest: [0; 32],
            ev: Event::Gap,
        };
        self.record_as(access, false, false)
    }

    /// `own`: the daemon's entry, never deduplicated or held to the quota.
    fn record_as(&self, a: Access<'_>, violation: bool, own: bool) -> JResult<Option<Entry>> {
        let Access {
            pod,
            ctr,
            path,
            digest,
            ev,
        } = a;
        // Hashed before the pod's lock is taken.
        let key = self.pod_logs.key(ctr, path, &digest, ev);
        let shard = self.pod_logs.of(pod);
        let mut p = shard
            .lock()
            .map_err(|_| JournalError::Poisoned("lock poisoned"))?;
        if !own && p.seen.contains(&key) {
            return Ok(None);
        }
        // Gaps and start entries are the daemon's own and always fit; the
        // quota entry is written once, as the last the pod gets.
        if !own && p.entries >= self.quota {
            if !p.quota_hit {
                // Written under the pod's own lock (its threads alone
                // wait): noted only once it is in the log.
                let q = Entry::new(self.pcr, [0; 32], "-", pod, ctr, Event::Quota);
                self.append(q.clone(), true)?;
                p.note(&q, self.pod_logs.key_of(&q));
            }
            return Err(JournalError::Quota {
                pod: pod.to_string(),
                quota: self.quota,
            });
        }
        let e = Entry::new(self.pcr, digest, path, pod, ctr, ev);
        // Noted first (the pod's own lock, not the log's): a second access
        // while this one is written waits for nothing and is not logged
        // twice; a write that fails takes the note back.
        // Its key is the access's (an entry keeps the fields as given).
        p.note(&e, key);
        drop(p);
        match self.append(e.clone(), violation) {
            Ok(()) => Ok(Some(e)),
            Err(err) => {
                if let Ok(mut p) = shard.lock() {
                    p.unnote(&key);
                }
                Err(err)
            }
        }
    }

    /// Hands `e` to the log's writer and returns once it is on disk.
    fn append(&self, entry: Entry, violation: bool) -> JResult<()> {
        let line = format!("{entry}\n");
        self.writer
            .submit(Appending {
                line,
                entry,
                violation,
            })
            .map_err(JournalError::Write)
    }

    pub fn summary(&self, pod: &str) -> PodSummary {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.pods.get(pod).cloned())
            .unwrap_or_default()
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The stored log's length (whole entries: the writer writes whole
    /// lines under the lock taken here) and a line at or before `from`
    /// with its offset, for a page from `from`.
    pub fn page_start(&self, from: u64) -> JResult<(u64, (u64, u64))> {
        let mut inner = self.lock()?;
        let len = self.stored_len(&inner)?;
        let start = inner.index.mark(len, from).unwrap_or((0, 0));
        Ok((len, start))
    }

    /// The stored log's length and the offsets of `pod`'s entries from its
    /// `from`-th on (at most `n`; None: not indexed), for a page of them.
    pub fn pod_page_start(
        &self,
        pod: &str,
        from: u64,
        n: usize,
    ) -> JResult<(u64, Option<Vec<u64>>)> {
        let mut inner = self.lock()?;
        let len = self.stored_len(&inner)?;
        Ok((len, inner.index.own(len, pod, from, n)))
    }

    fn lock(&self) -> JResult<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| JournalError::Poisoned("lock poisoned"))
    }

    fn stored_len(&self, inner: &Inner) -> JResult<u64> {
        let path = Self::log_path(&self.dir);
        Ok(inner.file.metadata().map_err(io("reading", &path))?.len())
    }

    /// The stored log's length and, with a TPM, a quote over exactly that
    /// much of it; where `pod`'s view from line `from` lies in it. The log
    /// is read from disk afterwards (what a node admin or attacker could
    /// edit is what the verifier replays): only its length and offsets are
    /// taken under the writer's lock (it was read whole there, stalling
    /// every new entry on the node ~35 ms per quote of a 64 MB log).
    pub async fn snapshot(&self, nonce: Vec<u8>, pod: &str, from: u64) -> JResult<Snapshot> {
        let log_path = Self::log_path(&self.dir);
        let (log_len, located, pending) = {
            let mut inner = self.lock()?;
            let len = self.stored_len(&inner)?;
            let located = inner.index.locate(len, pod, from);
            // Queued under the lock: after this log's extends, before later ones.
            let pending = self.tpm.as_ref().map(|t| t.quote_request(nonce));
            (len, located, pending)
        };
        let quote = match pending {
            Some(rx) => Some(rx.await.map_err(|_| TpmError::Gone)??),
            None => None,
        };
        Ok(Snapshot {
            log_path,
            log_len,
            located,
            epoch: self.epoch(),
            pcr: self.pcr,
            quote,
            ak_sec1: self.tpm.as_ref().map(|t| t.ak_sec1().to_vec()),
        })
    }
}

impl Inner {
    fn note(&mut self, e: &Entry, violation: bool) {
        self.count += 1;
        note_summary(&mut self.pods, e, violation);
    }
}

/// Counts `e` in its pod's summary.
fn note_summary(pods: &mut HashMap<String, PodSummary>, e: &Entry, violation: bool) {
    let p = pods.entry(e.pod.clone()).or_default();
    if !matches!(
        e.event,
        Event::Gap | Event::Start | Event::Quota | Event::Tomtou
    ) {
        p.measurements += 1;
    }
    let flagged = matches!(
        e.event,
        Event::Deny | Event::Writers | Event::Quota | Event::Tomtou
    );
    if violation || flagged {
        p.violations += 1;
        p.last_violation = Some(format!(
            "{} {} {} in container {}",
            e.event.as_str(),
            e.path,
            e.digest_hex(),
            e.container
        ));
    }
}

#[cfg(test)]
mod tests;
