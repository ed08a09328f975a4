//! Marking a container whose task exists and has not started (or runs
//! already, after a restart), and its `start` entry.

use imacri_runtime::integrity::charge::Charge;
use imacri_runtime::integrity::engine::Measured;
use imacri_runtime::integrity::fanotify::{
    self, mount_markable_view, own_tmpfs_view, MountedVolume, Target, Triggers, Watch,
};
use imacri_runtime::integrity::log::Event;
use imacri_runtime::{Error, Result};
use std::sync::Arc;

use super::super::CriServer;
use super::is_fanotify;

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

impl CriServer {
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
    pub(super) async fn measure_with(
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
        // Exactly the volumes CreateContainer left executable are marked, as
        // it decided; one that cannot be marked so any more is refused rather
        // than run unmeasured.
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
        let (volumes, mounted, image, init) = if ctr == pod {
            (Vec::new(), Vec::new(), self.sandbox_image.clone(), None)
        } else {
            let c = self.container(ctr)?;
            let spec = self.spec_of(&c).await?;
            // What CreateContainer left executable is marked as it is
            // bound: the mount's source in the spec (imacri's own staged
            // view of the volume, out of the pod's reach), not the host path
            // again, which a pod's symlink could have moved since.
            let measures = self.measures_volumes(&st);
            let mut volumes: Vec<(String, std::path::PathBuf)> = Vec::new();
            let mut mounted = Vec::new();
            let through_init = spec
                .process()
                .as_ref()
                .is_some_and(imacri_runtime::integrity::init::runs_through);
            if let (true, true, Some(p)) = (look_up_command, through_init, spec.process()) {
                look_up(p, ctr, pid)?;
            }
            let tmpfs_volumes = c.state().tmpfs_volumes;
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
                let ok = measures && staged;
                let whole = tmpfs_volumes.iter().any(|d| *d == dest);
                if ok && whole && own_tmpfs_view(&source) {
                    volumes.push((dest.into_owned(), source));
                } else if ok && mount_markable_view(&source) {
                    // Every other volume: the container's mount of it.
                    mounted.push(MountedVolume {
                        dest: dest.into_owned(),
                        view: source,
                    });
                } else {
                    return Err(Error::FailedPrecondition(format!(
                        "mount {dest} of container {ctr} allows execution but cannot be measured (not a volume imacri staged, or something is mounted beneath it now)"
                    )));
                }
            }
            if let Some(p) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
                cgroup = p.to_string_lossy().into_owned();
            }
            let init = through_init.then(|| format!("/proc/{pid}/root{init_path}").into());
            (volumes, mounted, c.state().image_id, init)
        };
        let measured = Arc::new(Measured {
            pod: pod.to_string(),
            container: ctr.to_string(),
            mode: i.mode,
            allowlist: self.load_allowlist(&i.policy)?,
            charge: Charge::for_cgroup(if parent.is_empty() { &cgroup } else { parent }),
            quiet: Default::default(),
            no_anonymous_exec: self.denies_anonymous_exec(&i.policy),
        });
        let target = Target {
            measured,
            root: format!("/proc/{pid}/root").into(),
            triggers,
            volumes: volumes.into_iter().map(|(_, h)| h).collect(),
            mounted,
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
        let no_anonymous = self.denies_anonymous_exec(&i.policy);
        self.record_start(pod, ctr, &image, through_init, no_anonymous)?;
        tracing::info!(pod_sandbox_id = %pod, container_id = %ctr, mode = ?i.mode, "container measured by fanotify");
        Ok(Some(w))
    }

    /// The entry every container's measurements begin with: its image and
    /// the moment marking began. Without it the verifier trusts nothing of
    /// the container; if it cannot be logged the container does not start.
    fn record_start(
        &self,
        pod: &str,
        ctr: &str,
        image: &str,
        through_init: bool,
        no_anonymous_exec: bool,
    ) -> Result<()> {
        let digest = image
            .strip_prefix("sha256:")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .unwrap_or([0; 32]);
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        // Its processes run through imacri's init: the start entry says
        // which one, for verifiers of other imacri builds.
        let mut at = if through_init {
            format!("{at} {}", imacri_runtime::integrity::init::start_word())
        } else {
            at
        };
        // And whether its policy denies executable memory no file backs,
        // which no entry could show otherwise.
        if no_anonymous_exec {
            at = format!(
                "{at} {}",
                imacri_runtime::integrity::setting::AnonymousExec::START_WORD
            );
        }
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
}
