//! Wiring of the measurement backend into the container lifecycle: a
//! container of a fanotify-measured pod gets the map guard in its seccomp
//! profile at create, is marked after its task exists and before it starts
//! (logging its `start` entry, `measure.rs`); restarts re-mark running
//! containers (with a `gap` entry, `restart.rs`); the guards of an ima pod's
//! processes and its pause rootfs seal (`guards.rs`); violations become
//! warnings and CRI events.

use imacri_api::cri;
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::engine::{Engine, Notice};
use imacri_runtime::integrity::fanotify::{volume_mark, VolumeMark};
use imacri_runtime::integrity::journal::{Journal, Keep};
use imacri_runtime::integrity::keeper;
use imacri_runtime::integrity::mapguard::{self, Supervisor};
use imacri_runtime::integrity::setting as ima;
use imacri_runtime::integrity::tpm::Tpm;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::CriServer;

// Each step of the wiring in a file of its own: the guards of a pod's
// processes and the pause rootfs seal, the marking of a container with its
// `start` entry, taking measurement back after a restart.
mod guards;
mod measure;
mod restart;

/// The node's measurement machinery.
pub struct Integrity {
    pub journal: Arc<Journal>,
    /// None when this node cannot run the fanotify backend.
    pub engine: Option<Arc<Engine>>,
    /// Where runc hands over seccomp listener fds (the map guard), with the
    /// supervisor answering them.
    pub listener: std::path::PathBuf,
    /// imacri's container init on the host (fanotify backend only): the
    /// source of each measured container's `/dev/.imacri-init`, or why
    /// there is none (fanotify-measured pods are then refused).
    pub init: std::result::Result<std::path::PathBuf, String>,
    /// Removed ima pods still quotable.
    pub retained: imacri_runtime::integrity::retained::Retained,
    /// What evidence being built may take, all requests together (KiB).
    pub evidence_memory: Arc<tokio::sync::Semaphore>,
    mapguard: Option<Supervisor>,
    /// Pause rootfs seals in progress or done, by pod: None while running,
    /// then the outcome. Containers of the pod start only after success.
    seals: std::sync::Mutex<HashMap<String, Seal>>,
}

type Seal = tokio::sync::watch::Receiver<Option<std::result::Result<(), String>>>;

impl Integrity {
    /// The fd keeper (it runs with the map guard), if any.
    pub fn keeper(&self) -> Option<&keeper::Keeper> {
        self.mapguard.as_ref().and_then(Supervisor::keeper)
    }
}

impl Integrity {
    /// Opens the TPM (if configured) and the journal; starts the engine if
    /// fanotify works here. Returns the notice receiver for violations.
    /// `pods`: the sandboxes that exist (only they get bookkeeping from the
    /// log read back).
    pub async fn open(
        cfg: &imacri_runtime::config::Config,
        fanotify: &std::result::Result<(), String>,
        pods: std::collections::HashSet<String>,
    ) -> Result<(Integrity, tokio::sync::mpsc::UnboundedReceiver<Notice>)> {
        let dir = cfg.root.join("integrity");
        let tcti = cfg.ima.tpm_tcti.clone();
        let pcr = cfg.ima.pcr;
        let quota = cfg.ima.max_entries_per_pod;
        let retained = imacri_runtime::integrity::retained::Retained::open(
            &cfg.root.join("integrity"),
            cfg.attestation.retention_secs,
        );
        let quotable: std::collections::HashSet<String> = retained
            .ids(imacri_runtime::ids::now_nanos() / 1_000_000_000)
            .into_iter()
            .collect();
        let journal = tokio::task::spawn_blocking(move || -> Result<Journal> {
            let tpm = if tcti.is_empty() {
                None
            } else {
                Some(Tpm::open(&tcti, pcr, &dir)?)
            };
            let keep = Keep {
                pods: &|pod: &str| pods.contains(pod),
                located: &|pod: &str| pods.contains(pod) || quotable.contains(pod),
            };
            Ok(Journal::open_with(&dir, pcr, tpm, &keep)?.with_quota(quota))
        })
        .await
        .map_err(|e| Error::Internal(format!("opening the measurement journal: {e}")))??;
        let journal = Arc::new(journal);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = fanotify
            .is_ok()
            .then(|| Engine::new(journal.clone(), tx, cfg.ima.max_file_size));
        if let Some(e) = &engine {
            e.set_max_watched_files(cfg.ima.max_watched_files);
        }
        let init = match &engine {
            Some(_) => imacri_runtime::integrity::init::install(&cfg.root).map_err(|e| {
                tracing::warn!(error = %e, "fanotify-measured ima pods cannot run on this node");
                e.to_string()
            }),
            None => Err("this node cannot run the fanotify backend".into()),
        };
        let listener = cfg.state.join("mapguard.sock");
        let mapguard = match &engine {
            Some(e) => {
                let sock = cfg.state.join("fdkeeper.sock");
                let keeper = tokio::task::spawn_blocking(move || {
                    std::env::current_exe().and_then(|exe| {
                        imacri_runtime::integrity::keeper::Keeper::ensure(&sock, &exe)
                    })
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                let keeper = match keeper {
                    Ok(k) => {
                        if let Err(e) = k.supervise() {
                            tracing::warn!(error = %e, "fd keeper: no thread to start it again if it dies");
                        }
                        Some(k)
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "no fd keeper: map-guarded calls fail (ENOSYS) while imacri is down");
                        None
                    }
                };
                Some(Supervisor::start(&listener, e, keeper)?)
            }
            None => None,
        };
        tracing::info!(
            anchored = journal.anchored(),
            pcr,
            fanotify = engine.is_some(),
            epoch = ?journal.epoch().reset_count,
            "measurement journal ready"
        );
        Ok((
            Integrity {
                journal,
                engine,
                listener,
                init,
                retained,
                evidence_memory: super::attestation::evidence_memory(),
                mapguard,
                seals: Default::default(),
            },
            rx,
        ))
    }
}

/// The pod's UID as kubelet gave it (names its volumes' directory).
pub(crate) fn pod_uid(config: &cri::PodSandboxConfig) -> &str {
    config.metadata.as_ref().map_or("", |m| m.uid.as_str())
}

pub(crate) fn is_fanotify(st: &SandboxState) -> bool {
    st.ima
        .as_ref()
        .is_some_and(|i| i.backend == ima::Backend::Fanotify.to_string())
}

impl CriServer {
    /// The merged allowlists of a policy; errors name the file.
    pub(crate) fn load_allowlist(&self, policy: &str) -> Result<Option<Arc<Allowlist>>> {
        let Some(p) = self.cfg.ima.policies.get(policy) else {
            return Err(Error::FailedPrecondition(format!(
                "ima policy {policy:?} is no longer in the config"
            )));
        };
        if p.allowlist.is_empty() {
            return Ok(None);
        }
        let mut merged = Allowlist::default();
        for f in &p.allowlist {
            merged.merge(
                Allowlist::load(f).map_err(|e| {
                    Error::FailedPrecondition(format!("ima policy {policy:?}: {e}"))
                })?,
            );
        }
        Ok(Some(Arc::new(merged)))
    }

    /// Volumes of a container the fanotify backend measures (policy
    /// `volumes = "measure"`): the pod's own memory-backed volumes, marked
    /// whole, and every other volume on a local filesystem with nothing
    /// mounted beneath, marked through the container's mount
    /// (`fanotify::volume_mark`): (destination, how it is marked).
    /// `bound`: the mounts the container will bind instead (the same
    /// volumes in the same order: ID-mapped views, made from the host paths
    /// before this check), on which the check is made: a path the pod can
    /// swap could name one thing when bound and another when checked.
    pub(crate) fn measured_volumes(
        &self,
        st: &SandboxState,
        pod_uid: &str,
        config: &cri::ContainerConfig,
        bound: Option<&cri::ContainerConfig>,
    ) -> Vec<(String, VolumeMark)> {
        if !self.measures_volumes(st) {
            return Vec::new();
        }
        config
            .mounts
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let bound = bound.and_then(|b| b.mounts.get(i)).unwrap_or(m);
                let mark = volume_mark(
                    std::path::Path::new(&m.host_path),
                    std::path::Path::new(&bound.host_path),
                    pod_uid,
                )?;
                Some((m.container_path.clone(), mark))
            })
            .collect()
    }

    /// Whether the pod's policy lets volumes run, measured.
    fn measures_volumes(&self, st: &SandboxState) -> bool {
        st.ima
            .as_ref()
            .and_then(|i| self.cfg.ima.policies.get(&i.policy))
            .is_some_and(|p| p.volumes == ima::VolumeExec::Measure)
    }

    /// Whether `policy` denies executable memory no file backs.
    pub(crate) fn denies_anonymous_exec(&self, policy: &str) -> bool {
        self.cfg
            .ima
            .policies
            .get(policy)
            .is_some_and(|p| p.anonymous_exec == ima::AnonymousExec::Deny)
    }

    /// Whether the pod's policy denies executable memory no file backs.
    pub(crate) fn pod_denies_anonymous_exec(&self, st: &SandboxState) -> bool {
        st.ima
            .as_ref()
            .is_some_and(|i| self.denies_anonymous_exec(&i.policy))
    }

    /// A container of a pod whose policy denies anonymous executable memory
    /// may not have the userfaultfd device (the requested devices and what
    /// CDI added): it hands out what the refused system call would. Nor a
    /// mount that brings a procfs other than its own `/proc` (a hostPath of
    /// `/proc`, or of a directory with one beneath it): the init refuses
    /// writes beneath procfs mounts at the container's top level only, and
    /// `/proc/<pid>/mem` writes code pages.
    pub(crate) fn anonymous_exec_rules(
        &self,
        st: &SandboxState,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<()> {
        if !self.pod_denies_anonymous_exec(st) {
            return Ok(());
        }
        const WHY: &str =
            "which a pod whose ima policy denies anonymous executable memory may not have";
        let devices = spec.linux().as_ref().and_then(|l| l.devices().as_ref());
        if let Some(uffd) = mapguard::userfaultfd_device() {
            if let Some(d) = devices
                .into_iter()
                .flatten()
                .find(|d| (d.major(), d.minor()) == uffd)
            {
                return Err(Error::InvalidArgument(format!(
                    "devices: {} is the userfaultfd device, {WHY}",
                    d.path().display()
                )));
            }
        }
        let mounts = spec.mounts().iter().flatten();
        let mut binds = Vec::new();
        for m in mounts {
            let bind = m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            match (m.typ().as_deref(), m.source()) {
                (Some("proc"), _) if m.destination() == std::path::Path::new("/proc") => {}
                (Some("proc"), _) => {
                    return Err(Error::InvalidArgument(format!(
                        "mounts: {} is a procfs, {WHY}: its /proc/<pid>/mem files write code pages",
                        m.destination().display()
                    )))
                }
                (_, Some(src)) if bind => binds.push((m.destination(), src.as_path())),
                _ => {}
            }
        }
        let sources: Vec<&std::path::Path> = binds.iter().map(|(_, s)| *s).collect();
        if let Some((dest, src)) =
            imacri_runtime::mount::procfs_at_or_beneath(&sources).and_then(|i| binds.get(i))
        {
            return Err(Error::InvalidArgument(format!(
                "mounts: {} binds {}, which is or holds a procfs, {WHY}: its /proc/<pid>/mem \
                 files write code pages",
                dest.display(),
                src.display()
            )));
        }
        Ok(())
    }

    /// Adds the map guard to the seccomp profile of a container of a
    /// fanotify-measured pod: executable mappings go through imacri.
    pub(crate) fn guard_mappings(
        &self,
        st: &SandboxState,
        pod: &str,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<()> {
        if !is_fanotify(st) {
            return Ok(());
        }
        let deny_anonymous = self.pod_denies_anonymous_exec(st);
        let Some(linux) = spec.linux_mut() else {
            return Err(Error::Internal(
                "container spec without a linux section".into(),
            ));
        };
        let guarded = mapguard::guard_profile(
            linux.seccomp().clone(),
            &self.integrity.listener,
            pod,
            deny_anonymous,
        )?;
        linux.set_seccomp(Some(guarded));
        Ok(())
    }

    /// The measurement engine's counters and the journal's anchoring.
    pub(crate) fn integrity_info(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let j = &self.integrity.journal;
        let engine = self.integrity.engine.as_ref().map(|e| {
            let s = &e.stats;
            let hits = s.cache_hits.load(Relaxed);
            serde_json::json!({
                "events": s.events.load(Relaxed),
                "cacheHits": hits,
                "hashedFiles": s.hashed_files.load(Relaxed),
                "hashedBytes": s.hashed_bytes.load(Relaxed),
                "denied": s.denied.load(Relaxed),
                "mappings": s.mappings.load(Relaxed),
                "heldCalls": s.held_calls.load(Relaxed),
                "unheldCalls": s.unheld_calls.load(Relaxed),
                "unleasedFiles": s.unleased.load(Relaxed),
                "leasesGivenUp": s.leases_given_up.load(Relaxed),
                "heldWriters": s.held_writers.load(Relaxed),
                "sweptWatches": s.swept_watches.load(Relaxed),
                "unopenedEvents": s.unopened.load(Relaxed),
                "parkedThreads": imacri_runtime::integrity::park::parked(),
                "threadMoves": imacri_runtime::integrity::charge::moves(),
                "cachedDigests": e.cached_digests(),
                "meanCacheHitNs": s.hit_ns_total.load(Relaxed).checked_div(hits).unwrap_or(0),
            })
        });
        // An admin alerts on `owes`: while it holds, an imacri crash leaves
        // ima containers unmeasured until the next imacri (a gap).
        let keeper = self.integrity.keeper().map(|k| {
            let st = k.state();
            serde_json::json!({
                "owes": st.owes,
                "heldNumbers": st.held_numbers,
                "rounds": st.rounds,
            })
        });
        let (journal_pods, journal_summaries) = j.pods_tracked();
        serde_json::json!({
            "anchored": j.anchored(),
            "journalPods": journal_pods,
            "journalSummaries": journal_summaries,
            "journalLocated": j.pods_located(),
            "pcr": j.pcr(),
            "epoch": j.epoch(),
            "fanotify": engine,
            "keeper": keeper,
        })
    }
}

/// One fanotify group per measured container: the node's limit on them is
/// raised to `want` (`ima.fanotify_groups`) before any is opened, the
/// backend's probe's included (after a restart the running containers'
/// groups, held by the fd keeper, can fill the old limit).
pub(crate) fn raise_group_limit(want: u64) {
    use imacri_runtime::integrity::fanotify::groups;
    match groups::raise(std::path::Path::new(groups::SYSCTL), want) {
        Ok(r) if r.now > r.before => tracing::info!(
            before = r.before,
            now = r.now,
            "raised fs.fanotify.max_user_groups: one fanotify group per measured container"
        ),
        Ok(r) if r.now < want => tracing::warn!(
            limit = r.now,
            want,
            "fs.fanotify.max_user_groups stayed below ima.fanotify_groups"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            want,
            "cannot raise fs.fanotify.max_user_groups: measured containers past its limit fail to start"
        ),
    }
}
