//! containerd records no imacri record holds. RemoveContainer deletes its
//! container's containerd record and snapshot after its response
//! (containerd's deletion is most of the call); RemovePodSandbox and a
//! graceful stop wait for those deletions (one that fails is tried again
//! in the background while containerd is away, up to ten minutes), and
//! what a crash leaves, like a container
//! a crash caught between its containerd record and imacri's at
//! CreateContainer, is removed at the next start, with the leases of
//! creations a crash cut short. Only this imacri's objects (`containerd::instance`) are swept,
//! whoever else uses the namespace, and never one whose record exists
//! unread or whose task runs.

use imacri_runtime::containerd::TaskStatus;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::Result;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::CriServer;

/// How long RemovePodSandbox waits for its containers' deletions.
pub(crate) const REMOVALS_WAIT: Duration = Duration::from_secs(10);

/// The first wait before a failed deletion after the response is tried
/// again, doubled each time up to `RETRY_MAX`, for `RETRY_FOR` at most.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
const RETRY_FOR: Duration = Duration::from_secs(600);

/// Deletions after the response, by pod, for RemovePodSandbox and a
/// graceful stop to wait for.
pub(crate) struct Removals {
    /// Pod and the deletion's first attempt.
    pending: std::sync::Mutex<Vec<(String, tokio::task::JoinHandle<()>)>>,
    /// Pod and container of each deletion whose first attempt failed, until
    /// one succeeds (or the retries give up).
    failed: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
    /// Test only (`IMACRI_TEST_REMOVAL_DELAY`, ms): each attempt of a
    /// deletion waits so long first.
    delay: Option<Duration>,
}

impl Default for Removals {
    fn default() -> Self {
        Removals {
            pending: Default::default(),
            failed: Default::default(),
            delay: imacri_runtime::crash::hook_ms("IMACRI_TEST_REMOVAL_DELAY"),
        }
    }
}

/// When a teardown deletes a container's containerd records.
#[derive(Clone, Copy)]
pub(crate) enum Records<'a> {
    /// Before it returns (rollbacks, RemovePodSandbox, orphans).
    Now,
    /// After the response (RemoveContainer), held for its pod.
    Later { pod: &'a str },
}

/// Runs `f` until it succeeds: now, then after `RETRY_FIRST` doubling to
/// `RETRY_MAX`, for `RETRY_FOR` at most (containerd restarting). Its last
/// error if it never did.
pub(crate) async fn retrying<F, Fut>(mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (started, mut wait) = (std::time::Instant::now(), RETRY_FIRST);
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() >= RETRY_FOR => return Err(e),
            Err(_) => {}
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// What a failed call's clean-up (`what`, of container `id`) could not do
/// (`first`: containerd down) is done in the background, `retrying`,
/// rather than left until imacri's next start.
pub(crate) fn clean_up_later<F, Fut>(
    id: &str,
    what: &'static str,
    first: imacri_runtime::Error,
    f: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    tracing::warn!(container_id = %id, error = %first, "{what} failed; retrying");
    let span = tracing::info_span!("clean-up", container_id = %id);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            match retrying(f).await {
                Ok(()) => tracing::info!("{what} done on a retry"),
                Err(e) => {
                    tracing::error!(error = %e, "{what} not done; the next start's sweep does it")
                }
            }
        },
        span,
    ));
}

impl CriServer {
    /// Deletes a container's containerd record and snapshot (independent:
    /// at once). `Records::Later` spawns it; an attempt that fails
    /// (containerd restarting) is tried again in the background, after 0.2
    /// s doubling to 5 s, for `RETRY_FOR` (a restart of containerd's must
    /// not leave a removed container's writable layer on disk until
    /// imacri's own next start); one that still fails is left to the next
    /// start's sweep.
    pub(crate) async fn delete_records(&self, id: &str, when: Records<'_>) -> Result<()> {
        let (c, snapshotter, owned) = (
            self.c.clone(),
            self.cfg.containerd.snapshotter.clone(),
            id.to_string(),
        );
        let delete = move || {
            let (c, snapshotter, id) = (c.clone(), snapshotter.clone(), owned.clone());
            async move {
                let (container, snapshot) = tokio::join!(
                    c.delete_container(&id),
                    c.remove_snapshot(&snapshotter, &id)
                );
                container.ignore_not_found()?;
                snapshot.ignore_not_found()
            }
        };
        let Records::Later { pod } = when else {
            return delete().await;
        };
        let (delay, failed) = (self.removals.delay, self.removals.failed.clone());
        let Ok(mut pending) = self.removals.pending.lock() else {
            return delete().await;
        };
        // Finished first attempts are let go here, so only those in flight
        // stay (a failed one is in `failed`).
        pending.retain(|(_, h)| !h.is_finished());
        let span = tracing::info_span!("removal", pod_sandbox_id = %pod, container_id = %id);
        let this = (pod.to_string(), id.to_string());
        let handle = tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                let Err(e) = delete().await else { return };
                tracing::warn!(error = %e, "containerd records of a removed container not deleted yet; retrying");
                // Marked before this first attempt ends (what RemovePodSandbox
                // waits for); the retries go on in a task of their own.
                let _ = failed.lock().map(|mut f| f.insert(this.clone()));
                let retries = async move {
                    let (started, mut wait) = (std::time::Instant::now(), RETRY_FIRST);
                    loop {
                        tokio::time::sleep(wait + delay.unwrap_or_default()).await;
                        let Err(e) = delete().await else {
                            tracing::info!(
                                "containerd records of a removed container deleted on a retry"
                            );
                            break;
                        };
                        if started.elapsed() >= RETRY_FOR {
                            tracing::warn!(error = %e, "containerd records of a removed container not deleted; the next start removes them");
                            break;
                        }
                        wait = (wait * 2).min(RETRY_MAX);
                    }
                    let _ = failed.lock().map(|mut f| f.remove(&this));
                };
                tokio::spawn(tracing::Instrument::instrument(
                    retries,
                    tracing::Span::current(),
                ));
            },
            span,
        ));
        pending.push((pod.to_string(), handle));
        Ok(())
    }

    /// Waits for the first attempts of the deletions of `pod`'s removed
    /// containers (all pods' with `None`), at most `limit` (the retries of
    /// one that failed go on in the background). The containers whose
    /// records are not deleted yet.
    pub(crate) async fn finish_removals(&self, pod: Option<&str>, limit: Duration) -> Vec<String> {
        let mine: Vec<_> = match self.removals.pending.lock() {
            Ok(mut pending) => {
                let (mine, rest) = std::mem::take(&mut *pending)
                    .into_iter()
                    .partition(|(p, _)| pod.is_none_or(|pod| p == pod));
                *pending = rest;
                mine
            }
            Err(_) => return Vec::new(),
        };
        let first = futures::future::join_all(mine.into_iter().map(|(_, h)| h));
        let ended = tokio::time::timeout(limit, first).await.is_ok();
        let left: Vec<String> = match self.removals.failed.lock() {
            Ok(f) => f
                .iter()
                .filter(|(p, _)| pod.is_none_or(|pod| p == pod))
                .map(|(_, c)| c.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        if !ended || !left.is_empty() {
            tracing::warn!(containers = ?left, "containerd records of removed containers not deleted yet");
        }
        left
    }

    /// A removed container's records deleted by someone else than its
    /// retries (RemovePodSandbox): no longer counted as left.
    pub(crate) fn removal_done(&self, pod: &str, id: &str) {
        let _ = self
            .removals
            .failed
            .lock()
            .map(|mut f| f.remove(&(pod.to_string(), id.to_string())));
    }

    /// Removes this imacri's containerd containers that have no record
    /// (with their stopped tasks, snapshots and what CreateContainer made
    /// beside them). Runs at start, before serving.
    pub(crate) async fn sweep_orphans(&self) {
        self.delete_leases("of creations a crash cut short").await;
        self.sweep_unrecorded_dirs();
        let ids = match self.c.own_containers().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "containerd's containers not listed: orphans are left until the next start");
                return;
            }
        };
        for id in ids {
            if self.has_record(&id) {
                continue;
            }
            // What crashes leave has no task (a task needs a record first):
            // one that runs lost its record some other way, and is the
            // user's work, which a sweep must not end.
            match self.c.task_info(&id).await {
                Ok(Some(t)) if t.status != TaskStatus::Stopped => {
                    tracing::warn!(container_id = %id, status = ?t.status, "a containerd container of this imacri runs without a record; left alone (remove it with ctr if it is not wanted)");
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "orphan not examined; left");
                    continue;
                }
            }
            tracing::warn!(container_id = %id, "removing a containerd container no record holds (left by a crash or an unfinished removal)");
            if let Err(e) = self.teardown_container(&id, Records::Now).await {
                tracing::warn!(container_id = %id, error = %e, "orphaned containerd container not removed");
            }
        }
    }

    /// A record that exists but could not be read (`Store::open` skipped
    /// it) counts: nothing is removed for it.
    fn has_record(&self, id: &str) -> bool {
        [self.cfg.containers_dir(), self.cfg.sandboxes_dir()]
            .iter()
            .any(|d| d.join(id).exists())
    }

    /// What CreateContainer makes before any record of the container (its
    /// ID-mapped volume binds, image volume mounts, the probe of its
    /// snapshot for its user) and a crash then left: unmounted and removed
    /// at start, before serving, when no record holds the ID.
    fn sweep_unrecorded_dirs(&self) {
        for kind in ["idmap", "image-volumes", "probe"] {
            let dir = self.cfg.state.join(kind);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if self.has_record(&id) {
                    continue;
                }
                match imacri_runtime::mount::remove_mount_dir(&e.path()) {
                    Ok(()) => {
                        tracing::warn!(container_id = %id, what = kind, "removed what a crash left of a container's creation")
                    }
                    Err(e) => {
                        tracing::warn!(container_id = %id, what = kind, error = %e, "left by a crash and not removed")
                    }
                }
            }
        }
    }

    /// Deletes this imacri's leases: at start, those of creations a crash
    /// cut short; at a graceful stop (no creation in flight any more), a
    /// creation's lease whose deletion after its response failed because
    /// containerd was away, so that a stop leaves none.
    pub(crate) async fn delete_leases(&self, which: &str) {
        match self.c.delete_own_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(leases = n, "deleted the leases {which}"),
            Err(e) => {
                tracing::warn!(error = %e, "leases {which} not deleted; they expire")
            }
        }
    }
}
