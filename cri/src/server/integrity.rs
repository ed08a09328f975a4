//! Wiring of the measurement backend into the container lifecycle: a
//! container of a fanotify-measured pod gets the map guard in its seccomp
//! profile at create, is marked after its task exists and before it starts
//! (logging its `start` entry); restarts re-mark running containers (with a
//! `gap` entry); violations become warnings and CRI events.

use imacri_api::cri;
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::charge::Charge;
use imacri_runtime::integrity::engine::{Engine, Measured, Notice};
use imacri_runtime::integrity::fanotify::{
    self, own_tmpfs_view, pods_own_tmpfs_volume, Target, Triggers, Watch,
};
use imacri_runtime::integrity::guard;
use imacri_runtime::integrity::journal::Journal;
use imacri_runtime::integrity::keeper;
use imacri_runtime::integrity::log::Event;
use imacri_runtime::integrity::mapguard::{self, Supervisor};
use imacri_runtime::integrity::setting as ima;
use imacri_runtime::integrity::tpm::Tpm;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::CriServer;

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
    mapguard: Option<Supervisor>,
    /// Pause rootfs seals in progress or done, by pod: None while running,
    /// then the outcome. Containers of the pod start only after success.
    seals: std::sync::Mutex<HashMap<String, Seal>>,
}

type Seal = tokio::sync::watch::Receiver<Option<std::result::Result<(), String>>>;

/// The fds the fd keeper held for the last imacri.
#[derive(Default)]
pub(crate) struct Kept {
    /// Fanotify groups by container ID, with the events being measured.
    pub groups: HashMap<String, fanotify::KeptGroup>,
    /// Seccomp listeners with their keys and the mappings being measured.
    pub listeners: Vec<mapguard::KeptListener>,
}

impl Integrity {
    /// The fd keeper (it runs with the map guard), if any.
    pub fn keeper(&self) -> Option<&keeper::Keeper> {
        self.mapguard.as_ref().and_then(Supervisor::keeper)
    }
}

impl Integrity {
    /// Opens the TPM (if configured) and the journal; starts the engine if
    /// fanotify works here. Returns the notice receiver for violations.
    pub async fn open(
        cfg: &imacri_runtime::config::Config,
        fanotify: &std::result::Result<(), String>,
    ) -> Result<(Integrity, tokio::sync::mpsc::UnboundedReceiver<Notice>)> {
        let dir = cfg.root.join("integrity");
        let tcti = cfg.ima.tpm_tcti.clone();
        let pcr = cfg.ima.pcr;
        let quota = cfg.ima.max_entries_per_pod;
        let journal = tokio::task::spawn_blocking(move || -> Result<Journal> {
            let tpm = if tcti.is_empty() {
                None
            } else {
                Some(Tpm::open(&tcti, pcr, &dir)?)
            };
            Ok(Journal::open(&dir, pcr, tpm)?.with_quota(quota))
        })
        .await
        .map_err(|e| Error::Internal(format!("opening the measurement journal: {e}")))??;
        let journal = Arc::new(journal);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = fanotify
            .is_ok()
            .then(|| Engine::new(journal.clone(), tx, cfg.ima.max_file_size));
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
                retained: imacri_runtime::integrity::retained::Retained::open(
                    &cfg.root.join("integrity"),
                    cfg.attestation.retention_secs,
                ),
                mapguard,
                seals: Default::default(),
            },
            rx,
        ))
    }
}

/// runc's lookup of the command of a process that runs through imacri's
/// init, in the container whose created task's init is `pid`.
fn look_up(p: &oci_spec::runtime::Process, ctr: &str, pid: u32) -> Result<()> {
    let args = p.args().clone().unwrap_or_default();
    let Some(name) = args.get(1) else {
        return Ok(());
    };
    let env = p.env().clone().unwrap_or_default();
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    imacri_runtime::integrity::init::look_path(&root, &p.cwd().to_string_lossy(), &env, name)
        .map_err(|m| {
            Error::FailedPrecondition(format!(
                "container {ctr}: unable to start container process: {m}"
            ))
        })
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
    /// `volumes = "measure"` and a tmpfs of their own, in kubelet's directory
    /// of this pod's volumes): (destination, host path).
    /// `bound`: the mounts the container will bind instead (the same
    /// volumes in the same order: ID-mapped views, made from the host paths
    /// before this check), on which the check is made (see
    /// `pods_own_tmpfs_volume`): a path the pod can swap could name one
    /// thing when bound and another when checked.
    pub(crate) fn measured_volumes(
        &self,
        st: &SandboxState,
        pod_uid: &str,
        config: &cri::ContainerConfig,
        bound: Option<&cri::ContainerConfig>,
    ) -> Vec<(String, std::path::PathBuf)> {
        if !self.measures_volumes(st) {
            return Vec::new();
        }
        config
            .mounts
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                let bound = bound.and_then(|b| b.mounts.get(*i)).unwrap_or(m);
                pods_own_tmpfs_volume(
                    std::path::Path::new(&m.host_path),
                    std::path::Path::new(&bound.host_path),
                    pod_uid,
                )
            })
            .map(|(i, m)| {
                let bound = bound.and_then(|b| b.mounts.get(i)).unwrap_or(m);
                (m.container_path.clone(), bound.host_path.clone().into())
            })
            .collect()
    }

    /// Whether the pod's policy lets its own memory-backed volumes run.
    fn measures_volumes(&self, st: &SandboxState) -> bool {
        st.ima
            .as_ref()
            .and_then(|i| self.cfg.ima.policies.get(&i.policy))
            .is_some_and(|p| p.volumes == ima::VolumeExec::Measure)
    }

    /// Forbids what measurement cannot see (memfd execution, nested user
    /// namespaces, the node's pre-opened binfmt_misc interpreters) in the
    /// pid namespace of `pid` and the pod's user namespace, before `pid`
    /// runs anything of the workload. Nothing to do outside ima pods; a
    /// failure fails the start (closed, never open).
    pub(crate) async fn guard_process(
        &self,
        st: &SandboxState,
        id: &str,
        pid: u32,
        scope: guard::Scope,
    ) -> Result<()> {
        let (Some(_), Some(u)) = (&st.ima, &st.userns) else {
            return Ok(());
        };
        if st.pid != 0 && st.pid != pid && guard::same_pid_namespace(st.pid, pid) {
            // pid POD: pause's namespace, guarded when the pod started (and
            // the user namespace's setting is the pod's).
            return Ok(());
        }
        let userns = u.path.clone();
        tokio::task::spawn_blocking(move || guard::apply(pid, &userns, scope))
            .await
            .map_err(|e| Error::Internal(format!("guard task: {e}")))??;
        tracing::debug!(
            id,
            pid,
            ?scope,
            "ima guards set: vm.memfd_noexec=2, user.max_user_namespaces=0 (and for the pod its own binfmt_misc)"
        );
        Ok(())
    }

    /// In an ima pod, pause's rootfs becomes `noexec` once pause runs:
    /// nothing may execute from it through `/proc/1/root` unmeasured.
    async fn seal_pause(&self, st: &SandboxState, id: &str, pid: u32) -> Result<()> {
        if st.ima.is_none() {
            return Ok(());
        }
        if std::env::var_os("IMACRI_TEST_SEAL_FAIL").is_some() {
            // Test only: the seal's failure path (it needs a broken kernel).
            return Err(Error::Internal("IMACRI_TEST_SEAL_FAIL is set".into()));
        }
        tokio::task::spawn_blocking(move || guard::seal_root_noexec(pid))
            .await
            .map_err(|e| Error::Internal(format!("seal task: {e}")))??;
        tracing::debug!(pod_sandbox_id = %id, "pause rootfs sealed noexec");
        Ok(())
    }

    /// As [`seal_pause`], in the background: it waits for pause to settle
    /// (a millisecond or two) while kubelet creates the pod's containers;
    /// [`sealed`] holds their starts until it is done.
    pub(crate) fn seal_pause_later(self: &Arc<Self>, st: &SandboxState, id: &str, pid: u32) {
        if st.ima.is_none() {
            return;
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        if let Ok(mut m) = self.integrity.seals.lock() {
            m.insert(id.to_string(), rx);
        }
        let (me, st, id) = (self.clone(), st.clone(), id.to_string());
        tokio::spawn(async move {
            let res = me.seal_pause(&st, &id, pid).await;
            if let Err(e) = &res {
                tracing::error!(pod_sandbox_id = %id, error = %e, "sealing the pause rootfs failed: the pod's containers will not start");
            }
            let _ = tx.send(Some(res.map_err(|e| e.to_string())));
        });
    }

    /// Waits for the pod's pause rootfs seal, if one was started by this
    /// imacri (recovery seals synchronously); its failure refuses the start.
    pub(crate) async fn sealed(&self, pod: &str) -> Result<()> {
        let rx = self
            .integrity
            .seals
            .lock()
            .ok()
            .and_then(|m| m.get(pod).cloned());
        let Some(mut rx) = rx else { return Ok(()) };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.clone())
            .map_err(|_| Error::Internal("the pause rootfs seal task ended".into()))?;
        match outcome {
            Some(Err(e)) => Err(Error::FailedPrecondition(format!(
                "the pause rootfs of ima pod {pod} could not be made noexec, so its containers cannot start: {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// Forgets a removed pod's seal.
    pub(crate) fn forget_seal(&self, pod: &str) {
        if let Ok(mut m) = self.integrity.seals.lock() {
            m.remove(pod);
        }
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
        let Some(linux) = spec.linux_mut() else {
            return Err(Error::Internal(
                "container spec without a linux section".into(),
            ));
        };
        let guarded =
            mapguard::guard_profile(linux.seccomp().clone(), &self.integrity.listener, pod)?;
        linux.set_seccomp(Some(guarded));
        Ok(())
    }

    /// Marks a container (or, with `ctr == pod`, the pause container) whose
    /// task (init `pid`) exists but has not started, and logs its `start`
    /// entry. None if its pod is not measured by the fanotify backend.
    ///
    /// A container that runs through imacri's init also gets runc's lookup
    /// of its command first (runc itself looked up only the init), so a
    /// command missing from the image fails StartContainer as in any other
    /// pod instead of the started container exiting 127.
    pub(crate) async fn measure_new_container(
        &self,
        pod: &str,
        ctr: &str,
        pid: u32,
    ) -> Result<Option<Watch>> {
        self.measure_with(pod, ctr, pid, None, true).await
    }

    /// As [`measure_new_container`] for a container already running (after
    /// a restart): no command lookup.
    pub(crate) async fn measure_container(
        &self,
        pod: &str,
        ctr: &str,
        pid: u32,
    ) -> Result<Option<Watch>> {
        self.measure_with(pod, ctr, pid, None, false).await
    }

    /// As [`measure_container`], or with `kept`, taking back the group the
    /// last imacri left with the fd keeper (no new marks, no start entry).
    async fn measure_with(
        &self,
        pod: &str,
        ctr: &str,
        pid: u32,
        kept: Option<fanotify::KeptGroup>,
        look_up_command: bool,
    ) -> Result<Option<Watch>> {
        let sb = self.sandbox(pod)?;
        let st = sb.state();
        if !is_fanotify(&st) {
            return Ok(None);
        }
        let Some(i) = &st.ima else { return Ok(None) };
        let engine = self.integrity.engine.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "the pod is measured by the fanotify backend, which this node cannot run now"
                    .into(),
            )
        })?;
        let policy = self.cfg.ima.policies.get(&i.policy).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "ima policy {:?} is no longer in the config",
                i.policy
            ))
        })?;
        let rules = imacri_runtime::integrity::policy::parse(&policy.rules.join("\n"))?;
        let mappings = st.userns.as_ref().map(|u| u.mappings.clone());
        let triggers = Triggers::from_rules(&rules, |uid| {
            mappings
                .as_ref()
                .and_then(|m| {
                    m.uids
                        .iter()
                        .find(|r| uid >= r.container_id && uid - r.container_id < r.size)
                        .map(|r| r.host_id + (uid - r.container_id))
                })
                .unwrap_or(uid)
        });
        // Exactly the volumes CreateContainer left executable are marked; if
        // one is no longer a tmpfs of its own, refuse rather than run it
        // unmeasured.
        // A container that runs through imacri's init (every one created
        // since) has it on a bind mount of its own, marked so that the
        // init's executions are measured too.
        let init_path = imacri_runtime::integrity::init::PATH;
        // The pod's cgroup (kubelet's, with the pod's limits) is charged
        // for imacri's work for it; without one, the container's own.
        let parent = sb
            .config
            .linux
            .as_ref()
            .map_or("", |l| l.cgroup_parent.as_str());
        let mut cgroup = imacri_runtime::spec::cgroup_path(parent, ctr);
        let (volumes, image, init) = if ctr == pod {
            (Vec::new(), self.sandbox_image.clone(), None)
        } else {
            let c = self.container(ctr)?;
            let spec = self.spec_of(&c).await?;
            // What CreateContainer left executable is marked as it is
            // bound: the mount's source in the spec (imacri's own staged
            // view of the volume, out of the pod's reach), not the host path
            // again, which a pod's symlink could have moved since.
            let measures = self.measures_volumes(&st);
            let mut volumes: Vec<(String, std::path::PathBuf)> = Vec::new();
            let through_init = spec
                .process()
                .as_ref()
                .is_some_and(imacri_runtime::integrity::init::runs_through);
            if let (true, true, Some(p)) = (look_up_command, through_init, spec.process()) {
                look_up(p, ctr, pid)?;
            }
            for m in spec.mounts().iter().flatten() {
                let exec = !m
                    .options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "noexec"));
                let dest = m.destination().to_string_lossy();
                if !exec || (through_init && dest == init_path) {
                    continue;
                }
                let source = m.source().clone().unwrap_or_default();
                let staged = source.starts_with(self.cfg.state.join("idmap").join(ctr));
                if !(measures && staged && own_tmpfs_view(&source)) {
                    return Err(Error::FailedPrecondition(format!(
                        "mount {dest} of container {ctr} allows execution but cannot be measured (not a tmpfs of its own any more)"
                    )));
                }
                volumes.push((dest.into_owned(), source));
            }
            if let Some(p) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
                cgroup = p.to_string_lossy().into_owned();
            }
            let init = through_init.then(|| format!("/proc/{pid}/root{init_path}").into());
            (volumes, c.state().image_id, init)
        };
        let measured = Arc::new(Measured {
            pod: pod.to_string(),
            container: ctr.to_string(),
            mode: i.mode,
            allowlist: self.load_allowlist(&i.policy)?,
            charge: Charge::for_cgroup(if parent.is_empty() { &cgroup } else { parent }),
            quiet: Default::default(),
        });
        let target = Target {
            measured,
            root: format!("/proc/{pid}/root").into(),
            triggers,
            volumes: volumes.into_iter().map(|(_, h)| h).collect(),
            init,
        };
        let keeper = self.integrity.keeper();
        if let (Some(fd), Some(k)) = (kept, keeper) {
            // The sweep and the hashing of what the last imacri was
            // measuring block: off the async workers.
            let (engine, k) = (engine.clone(), k.clone());
            let (w, denied) =
                tokio::task::spawn_blocking(move || fanotify::adopt(&engine, target, fd, &k))
                    .await
                    .map_err(|e| Error::Internal(format!("adopting a fanotify group: {e}")))??;
            tracing::info!(pod_sandbox_id = %pod, container_id = %ctr, denied, "fanotify group taken back from the fd keeper: executions waited for imacri");
            return Ok(Some(w));
        }
        let through_init = target.init.is_some();
        let w = fanotify::watch(engine, target, keeper)?;
        self.record_start(pod, ctr, &image, through_init)?;
        tracing::info!(pod_sandbox_id = %pod, container_id = %ctr, mode = ?i.mode, "container measured by fanotify");
        Ok(Some(w))
    }

    /// The entry every container's measurements begin with: its image and
    /// the moment marking began. Without it the verifier trusts nothing of
    /// the container; if it cannot be logged the container does not start.
    fn record_start(&self, pod: &str, ctr: &str, image: &str, through_init: bool) -> Result<()> {
        let digest = image
            .strip_prefix("sha256:")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .unwrap_or([0; 32]);
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        // Its processes run through imacri's init: the start entry says
        // which one, for verifiers of other imacri builds.
        let at = if through_init {
            format!("{at} {}", imacri_runtime::integrity::init::start_word())
        } else {
            at
        };
        self.integrity
            .journal
            .record(
                pod,
                ctr,
                &format!("{image} {at}"),
                digest,
                Event::Start,
                false,
            )
            .map(|_| ())
            .map_err(Error::from)
    }

    /// After recovery: answer the map-guard listeners the last imacri left
    /// with the fd keeper.
    pub(crate) fn adopt_kept_listeners(&self, kept: Vec<mapguard::KeptListener>) {
        if let (Some(m), Some(e)) = (&self.integrity.mapguard, &self.integrity.engine) {
            let n = m.adopt(e, kept);
            if n > 0 {
                tracing::info!(listeners = n, "map guard: kept listeners adopted");
            }
        }
    }

    /// What the last imacri left with the fd keeper: its fanotify groups by
    /// container, and its seccomp listeners by key.
    pub(crate) fn kept_fds(&self) -> Kept {
        let mut kept = Kept::default();
        let Some(k) = self.integrity.keeper() else {
            return kept;
        };
        match k.all() {
            Ok(all) => {
                let mut events: HashMap<String, Vec<keeper::KeptEvent>> = HashMap::new();
                let mut mappings: HashMap<String, Vec<(u64, std::os::fd::OwnedFd)>> =
                    HashMap::new();
                let mut leases: HashMap<String, Vec<(String, std::os::fd::OwnedFd)>> =
                    HashMap::new();
                let mut held: HashMap<String, Vec<(String, std::os::fd::OwnedFd)>> = HashMap::new();
                for (key, fd) in all {
                    if let Some(ctr) = keeper::parse_lease_key(&key) {
                        leases.entry(ctr.to_string()).or_default().push((key, fd));
                        continue;
                    }
                    if let Some(ctr) = keeper::parse_held_key(&key) {
                        held.entry(ctr.to_string()).or_default().push((key, fd));
                        continue;
                    }
                    if let Some((listener, id)) = keeper::parse_mapping_key(&key) {
                        mappings
                            .entry(listener.to_string())
                            .or_default()
                            .push((id, fd));
                        continue;
                    }
                    if let Some((ctr, number, access, tid)) = keeper::parse_event_key(&key) {
                        events
                            .entry(ctr.to_string())
                            .or_default()
                            .push(keeper::KeptEvent {
                                number,
                                access,
                                tid,
                                file: fd,
                            });
                        continue;
                    }
                    match key.strip_prefix(keeper::FANOTIFY) {
                        Some(ctr) => {
                            k.remember(&key, std::os::fd::AsFd::as_fd(&fd));
                            kept.groups.insert(
                                ctr.to_string(),
                                fanotify::KeptGroup {
                                    group: fd,
                                    events: Vec::new(),
                                    leases: Vec::new(),
                                    held: Vec::new(),
                                },
                            );
                        }
                        None => kept.listeners.push(mapguard::KeptListener {
                            key,
                            fd,
                            mappings: Vec::new(),
                        }),
                    }
                }
                for l in kept.listeners.iter_mut() {
                    l.mappings = mappings.remove(&l.key).unwrap_or_default();
                }
                for (ctr, evs) in events {
                    // The keeper holds events only with their group.
                    if let Some(g) = kept.groups.get_mut(&ctr) {
                        g.events = evs;
                    }
                }
                for (ctr, ls) in leases {
                    if let Some(g) = kept.groups.get_mut(&ctr) {
                        g.leases = ls;
                    }
                }
                for (ctr, hs) in held {
                    if let Some(g) = kept.groups.get_mut(&ctr) {
                        g.held = hs;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the fd keeper did not answer: running ima containers get a gap");
            }
        }
        kept
    }

    /// After recovery: groups of containers that are gone are let go.
    pub(crate) fn release_groups(&self, left: HashMap<String, fanotify::KeptGroup>) {
        if let Some(k) = self.integrity.keeper() {
            for ctr in left.keys() {
                let _ = k.drop_key(&format!("{}{ctr}", keeper::FANOTIFY));
            }
        }
    }

    /// After a restart: measure running containers again. With the group
    /// the keeper kept, nothing ran unmeasured (its executions waited):
    /// `(watch, true)`. Otherwise the container is marked anew and the gap
    /// is logged: `(watch, false)`.
    pub(crate) async fn remeasure_after_restart(
        &self,
        pod: &str,
        ctr: &str,
        pid: u32,
        kept: &mut HashMap<String, fanotify::KeptGroup>,
    ) -> (Option<Watch>, bool) {
        if let Some(fd) = kept.remove(ctr) {
            match self.measure_with(pod, ctr, pid, Some(fd), false).await {
                Ok(w) => return (w, true),
                Err(e) => {
                    tracing::error!(pod_sandbox_id = %pod, container_id = %ctr, error = %e, "cannot take back the kept fanotify group; marking anew");
                    if let Some(k) = self.integrity.keeper() {
                        let _ = k.drop_key(&format!("{}{ctr}", keeper::FANOTIFY));
                    }
                }
            }
        }
        match self.measure_container(pod, ctr, pid).await {
            Ok(Some(w)) => {
                if let Err(e) =
                    self.integrity
                        .journal
                        .record(pod, ctr, "-", [0; 32], Event::Gap, false)
                {
                    tracing::error!(container_id = %ctr, error = %e, "recording the measurement gap");
                }
                (Some(w), false)
            }
            Ok(None) => (None, false),
            Err(e) => {
                tracing::error!(pod_sandbox_id = %pod, container_id = %ctr, error = %e, "cannot measure a running ima container after restart");
                (None, false)
            }
        }
    }

    /// With `ima.fail_mode = "closed"`, containers of fanotify-measured pods
    /// found running at start are killed.
    pub(crate) fn must_kill_unmeasured(&self, pod: &str) -> bool {
        self.cfg.ima.fail_mode == imacri_runtime::config::FailMode::Closed
            && self
                .sandboxes
                .get(pod)
                .is_some_and(|sb| is_fanotify(&sb.state()))
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
                "heldWriters": s.held_writers.load(Relaxed),
                "meanCacheHitNs": s.hit_ns_total.load(Relaxed).checked_div(hits).unwrap_or(0),
            })
        });
        serde_json::json!({
            "anchored": j.anchored(),
            "pcr": j.pcr(),
            "epoch": j.epoch(),
            "fanotify": engine,
        })
    }
}
