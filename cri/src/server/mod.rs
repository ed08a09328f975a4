//! The CRI RuntimeService and ImageService. One file per RPC (or per small
//! family); `service.rs` wires them to tonic through [`instrument`], the one
//! place that logs every request and maps errors to gRPC codes.

mod attestation;
mod container_attach;
mod container_checkpoint;
mod container_create;
mod container_exec;
mod container_execsync;
mod container_list;
mod container_log;
mod container_remove;
mod container_start;
mod container_status;
mod container_stop;
mod container_stream;
mod container_volumes;
pub mod deadline;
pub mod held;
mod image_fs_info;
mod image_list;
mod image_pull;
mod image_remove;
mod image_status;
mod image_volume;
mod integrity;
mod laps;
mod lifecycle;
mod metrics;
mod monitor;
mod nri;
mod orphans;
mod recover;
mod rootfs;
mod sandbox_list;
mod sandbox_plan;
mod sandbox_portforward;
mod sandbox_remove;
mod sandbox_run;
mod sandbox_status;
mod sandbox_stop;
mod service;
mod stats;
mod status;
mod validate;
mod violations;

use imacri_api::cri;
use imacri_runtime::config::Config;
use imacri_runtime::containerd::Containerd;
use imacri_runtime::image::ImageService;
use imacri_runtime::io::LogFile;
use imacri_runtime::pod::{ContainerState, SandboxState};
use imacri_runtime::spec::NodeFacts;
use imacri_runtime::store::{Entry, Store};
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

pub use attestation::service as attestation_service;
pub use service::services;

pub type SandboxEntry = Entry<cri::PodSandboxConfig, SandboxState>;
pub type ContainerEntry = Entry<cri::ContainerConfig, ContainerState>;

/// A container's resources now: the last UpdateContainerResources, else
/// what it was created with.
pub(crate) fn current_resources(c: &ContainerEntry) -> Option<cri::LinuxContainerResources> {
    c.state()
        .updated_resources
        .as_deref()
        .and_then(|b| prost::Message::decode(b).ok())
        .or_else(|| c.config.linux.as_ref().and_then(|l| l.resources.clone()))
}

/// Labels on containerd containers so `ctr -n k8s.io c ls` tells ours apart.
pub const LABEL_KIND: &str = "imacri.dev/kind";
pub const LABEL_SANDBOX_ID: &str = "imacri.dev/sandbox-id";

/// What a running container's I/O needs after start.
struct LiveIo {
    log: Option<LogFile>,
    copiers: Vec<tokio::task::JoinHandle<()>>,
    /// Write ends that keep the copiers' FIFOs from ending before the shim
    /// opened them (`io::open_reader`); dropped when the process exits.
    holders: Vec<std::fs::File>,
    /// Keeps an interactive container's stdin open; attach writes to it.
    stdin: Option<std::fs::File>,
    /// stdout (and, with a TTY, everything) for attached clients.
    tap: imacri_runtime::io::Tap,
    tap_err: imacri_runtime::io::Tap,
    /// fanotify measurement of an ima container; dropping it stops it.
    measure: Option<imacri_runtime::integrity::fanotify::Watch>,
}

impl LiveIo {
    /// Copies the container's output into its log (if it has one) and to
    /// attached clients; without either it is drained so the process never
    /// blocks on a full pipe.
    fn copy_output(
        &mut self,
        stdout: Option<std::path::PathBuf>,
        stderr: Option<std::path::PathBuf>,
        log: Option<LogFile>,
    ) -> imacri_runtime::Result<()> {
        for (p, stream, tap) in [
            (stdout, "stdout", self.tap.clone()),
            (stderr, "stderr", self.tap_err.clone()),
        ] {
            if let Some(p) = p {
                let (copier, holder) =
                    imacri_runtime::io::spawn_log_copier(&p, stream, log.clone(), Some(tap))?;
                self.copiers.push(copier);
                self.holders.push(holder);
            }
        }
        self.log = log;
        Ok(())
    }
}

/// Chunks an attached client may fall behind a container's output by.
const TAP_CHUNKS: usize = 32;

impl Default for LiveIo {
    fn default() -> Self {
        LiveIo {
            log: None,
            copiers: Vec::new(),
            holders: Vec::new(),
            stdin: None,
            // A broadcast channel allocates its slots up front (~56 bytes
            // each, for every container whether attached or not): 32 chunks
            // (up to 512 KiB) for an attached client to fall behind by. A
            // client further behind skips (Lagged).
            tap: tokio::sync::broadcast::channel(TAP_CHUNKS).0,
            tap_err: tokio::sync::broadcast::channel(TAP_CHUNKS).0,
            measure: None,
        }
    }
}

pub struct CriServer {
    pub(crate) cfg: Config,
    pub(crate) c: Containerd,
    pub(crate) images: ImageService,
    pub(crate) sandboxes: Store<cri::PodSandboxConfig, SandboxState>,
    pub(crate) containers: Store<cri::ContainerConfig, ContainerState>,
    /// Probed once at start; every spec is built from it.
    pub(crate) node: NodeFacts,
    /// Name of the sandbox image in use.
    pub(crate) sandbox_image: String,
    /// Whether this node can run each ima backend (probed at start).
    pub(crate) ima_node: imacri_runtime::integrity::setting::NodeSupport,
    /// Whether user-namespace pods get ID-mapped image layers (else a
    /// chowned copy); Err says why not.
    pub(crate) rootfs_idmap: std::result::Result<(), String>,
    /// Per runtime handler ("" = the default), from real checks at start.
    pub(crate) handler_features: HashMap<String, cri::RuntimeHandlerFeatures>,
    /// Per runtime handler ("" = the default): whether it can run ima pods
    /// (`sysinfo::ima_runtime`), or why not.
    pub(crate) ima_handlers: HashMap<String, std::result::Result<String, String>>,
    pub(crate) cni: imacri_runtime::cni::Cni,
    /// Measurement journal, TPM and fanotify engine.
    pub(crate) integrity: integrity::Integrity,
    pub(crate) streaming: Arc<crate::streaming::Streaming>,
    /// Held while a pod's user-namespace range is chosen and recorded.
    pub(crate) userns_lock: Mutex<()>,
    io: Mutex<HashMap<String, LiveIo>>,
    /// Per task: flips to true when the task has exited.
    exits: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Tasks this imacri deleted when they exited: their teardown needs no
    /// round trip to learn that.
    deleted_tasks: Mutex<std::collections::HashSet<String>>,
    /// Containers whose task containerd is starting: an exit seen meanwhile
    /// leaves the task to StartContainer, since containerd's Start asks the
    /// task for its state after starting it (a deleted one fails the start
    /// of a container that ran). Changed under `event_order`.
    starting: Mutex<std::collections::HashSet<String>>,
    /// Snapshot mounts of created containers, from CreateContainer to
    /// StartContainer (which otherwise asks containerd again).
    created_mounts: Mutex<HashMap<String, Vec<containerd_client::types::Mount>>>,
    /// Images' /etc/passwd and /etc/group, for CreateContainer's user.
    accounts: imacri_runtime::user::AccountsCache,
    /// Last CPU sample per container/pod: (time ns, usage ns).
    pub(crate) cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
    /// Held across a state change and its event, so events keep the order
    /// of the changes.
    pub(crate) event_order: Mutex<()>,
    /// CRI container events for GetContainerEvents.
    pub(crate) events: tokio::sync::broadcast::Sender<cri::ContainerEventResponse>,
    /// NRI, when the config enables it (set once at start).
    pub(crate) nri: std::sync::OnceLock<imacri_runtime::nri::Nri>,
    /// Each container as NRI plugins saw it after CreateContainer.
    pub(crate) nri_views: nri::NriViews,
    /// containerd deletions still running after their RPC's response.
    removals: orphans::Removals,
}

/// What each runtime handler supports on this node: recursive read-only
/// mounts when its OCI runtime lists `rro` and the kernel can do it; user
/// namespaces when the node can make one (imacri maps IDs itself, so the
/// runtime needs no support of its own).
fn handler_features(cfg: &Config) -> HashMap<String, cri::RuntimeHandlerFeatures> {
    use imacri_runtime::sysinfo;
    let kernel_rro = sysinfo::kernel_recursive_readonly(&cfg.state);
    let userns = sysinfo::user_namespaces(&cfg.state);
    let of = |h: &imacri_runtime::config::RuntimeHandler| cri::RuntimeHandlerFeatures {
        recursive_read_only_mounts: kernel_rro
            && sysinfo::runtime_mount_options(&h.binary_name)
                .iter()
                .any(|o| o == "rro"),
        user_namespaces: userns,
    };
    let mut out: HashMap<String, cri::RuntimeHandlerFeatures> = cfg
        .runtimes
        .iter()
        .map(|(name, h)| (name.clone(), of(h)))
        .collect();
    let default = cfg
        .runtimes
        .get(&cfg.default_runtime)
        .map(of)
        .unwrap_or_default();
    out.insert(String::new(), default);
    out
}

/// Which runtime handlers can run ima pods (`sysinfo::ima_runtime`), asked
/// once at start; "" is the default handler.
fn ima_handlers(cfg: &Config) -> HashMap<String, std::result::Result<String, String>> {
    let of = |h: &imacri_runtime::config::RuntimeHandler| {
        imacri_runtime::sysinfo::ima_runtime(&h.runtime_type, &h.binary_name)
    };
    let mut out: HashMap<_, _> = cfg
        .runtimes
        .iter()
        .map(|(name, h)| (name.clone(), of(h)))
        .collect();
    if let Some(d) = out.get(&cfg.default_runtime).cloned() {
        out.insert(String::new(), d);
    }
    out
}

impl CriServer {
    /// Connects the pieces, imports the pause image and recovers state.
    pub async fn new(
        cfg: Config,
        c: Containerd,
        streaming: Arc<crate::streaming::Streaming>,
    ) -> Result<Arc<CriServer>> {
        for d in [cfg.sandboxes_dir(), cfg.containers_dir(), cfg.state.clone()] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
        }
        let c = c.with_instance(imacri_runtime::containerd::instance_id(&cfg.state)?);
        let images = ImageService::new(
            c.clone(),
            &cfg.containerd.snapshotter,
            cfg.registry.config_path.clone(),
        );
        images.load().await?;
        let sandbox_image = if cfg.sandbox_image.is_empty() {
            let rec = images.ensure_builtin_pause().await?;
            images.set_sandbox_image(&rec.id);
            images.load().await?;
            imacri_runtime::image::builtin::image_name()
        } else {
            images.set_sandbox_image(&cfg.sandbox_image);
            cfg.sandbox_image.clone()
        };
        let sandboxes = Store::open(cfg.sandboxes_dir(), validate::sandbox_name)?;
        let containers = Store::open(cfg.containers_dir(), |c: &cri::ContainerConfig| {
            c.metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default()
        })?;
        let node = NodeFacts::probe(if cfg.restrict_oom_score_adj {
            imacri_runtime::sysinfo::own_oom_score_adj()
        } else {
            -1000
        });
        let cni = imacri_runtime::cni::Cni::new(
            cfg.cni.conf_dir.clone(),
            cfg.cni.bin_dirs.clone(),
            cfg.root.join("cni"),
        );
        if cfg.ima.backend != imacri_runtime::integrity::setting::BackendChoice::Kernel {
            integrity::raise_group_limit(cfg.ima.fanotify_groups);
        }
        let ima_node = imacri_runtime::integrity::setting::NodeSupport {
            kernel: imacri_runtime::integrity::kernel::probe(),
            fanotify: imacri_runtime::integrity::fanotify::probe()
                .and_then(|()| imacri_runtime::integrity::init::probe().map(|_| ())),
        };
        if ima_node.fanotify.is_ok() {
            // Started now, not at the first mapping: it also sets SIGIO's
            // handler (a lease break can signal the process).
            if let Err(why) = imacri_runtime::integrity::fanotify::lease_probe() {
                tracing::warn!(reason = %why, "no read leases: a truncate(2) of a file an ima container mapped executable is not seen");
            }
        }
        let pods = sandboxes.all().iter().map(|sb| sb.id.clone()).collect();
        let (integrity, notices) =
            integrity::Integrity::open(&cfg, &ima_node.fanotify, pods).await?;
        let rootfs_idmap =
            imacri_runtime::idmap::probe_snapshotter(&c, &cfg.containerd.snapshotter).await;
        if let Err(why) = &rootfs_idmap {
            tracing::warn!(reason = %why, "no ID-mapped image layers: user-namespace pods get chowned copies");
        }
        let handler_features = handler_features(&cfg);
        let ima_handlers = ima_handlers(&cfg);
        let server = Arc::new(CriServer {
            cfg,
            c,
            images,
            sandboxes,
            containers,
            node,
            sandbox_image,
            ima_node,
            rootfs_idmap,
            handler_features,
            ima_handlers,
            integrity,
            userns_lock: Mutex::new(()),
            cni,
            streaming,
            io: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
            events: tokio::sync::broadcast::channel(1024).0,
            event_order: Mutex::new(()),
            cpu_samples: Mutex::new(HashMap::new()),
            deleted_tasks: Default::default(),
            starting: Default::default(),
            created_mounts: Default::default(),
            accounts: Default::default(),
            nri: std::sync::OnceLock::new(),
            nri_views: Mutex::new(HashMap::new()),
            removals: Default::default(),
        });
        server.start_notice_consumer(notices);
        server.clean_staged_rootfs();
        let since = server.integrity.keeper().map(|k| k.revivals());
        let kept = server.kept_fds();
        let listeners = server.recover(kept).await;
        server.sweep_orphans().await;
        server.adopt_kept_listeners(listeners);
        if let (Some(k), Some(since)) = (server.integrity.keeper(), since) {
            if let Err(e) = k.catch_up(since) {
                tracing::error!(error = %e, "the fd keeper was started again while imacri took back what it held, and cannot be given it yet: retried every second; until then an imacri crash leaves ima containers unmeasured");
            }
        }
        server.start_monitor().await;
        Ok(server)
    }

    pub(crate) fn sandbox(&self, id: &str) -> Result<Arc<SandboxEntry>> {
        self.sandboxes.find(id).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!("pod sandbox {id:?} not found")),
            e => e,
        })
    }

    pub(crate) fn container(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        self.containers.find(id).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!("container {id:?} not found")),
            e => e,
        })
    }

    /// The OCI runtime of a RuntimeClass handler ("" = the default).
    pub(crate) fn runtime_of(
        &self,
        handler: &str,
    ) -> Result<&imacri_runtime::config::RuntimeHandler> {
        let name = if handler.is_empty() {
            &self.cfg.default_runtime
        } else {
            handler
        };
        self.cfg.runtimes.get(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "runtime handler {handler:?} is not configured (available: {})",
                self.cfg
                    .runtimes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Refuses an ima pod on a runtime handler that cannot run one
    /// (`sysinfo::ima_runtime`).
    pub(crate) fn ima_runtime(&self, handler: &str) -> Result<()> {
        match self.ima_handlers.get(handler) {
            Some(Ok(_)) => Ok(()),
            Some(Err(why)) => Err(Error::InvalidArgument(format!(
                "runtime_handler {handler:?} cannot run an ima pod: {why}; ima pods run on {} with runc, \
                 which their guards are built on",
                imacri_runtime::sysinfo::IMA_SHIM
            ))),
            None => Err(Error::InvalidArgument(format!(
                "runtime handler {handler:?} is not configured"
            ))),
        }
    }

    /// `sb` is still the pod of its ID (not removed meanwhile) and ready:
    /// checked by container calls once they hold the pod (`op`).
    pub(crate) fn still_ready(&self, sb: &Arc<SandboxEntry>) -> Result<()> {
        match self.sandbox(&sb.id) {
            Ok(now) if Arc::ptr_eq(&now, sb) => {}
            _ => {
                return Err(Error::NotFound(format!(
                    "pod sandbox {} was removed",
                    sb.id
                )))
            }
        }
        if sb.state().phase != imacri_runtime::pod::SandboxPhase::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sb.id
            )));
        }
        Ok(())
    }

    pub(crate) fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<ContainerEntry>> {
        self.containers
            .all()
            .into_iter()
            .filter(|c| c.state().sandbox_id == sandbox_id)
            .collect()
    }

    fn set_io(&self, id: &str, io: LiveIo) {
        if let Ok(mut m) = self.io.lock() {
            m.insert(id.to_string(), io);
        }
    }

    fn set_measure(&self, id: &str, w: imacri_runtime::integrity::fanotify::Watch) {
        if let Ok(mut m) = self.io.lock() {
            if let Some(io) = m.get_mut(id) {
                io.measure = Some(w);
            }
        }
    }

    fn take_io(&self, id: &str) -> Option<LiveIo> {
        self.io.lock().ok()?.remove(id)
    }

    /// Output taps and a stdin handle of a running container, for attach.
    pub(crate) fn attach_io(
        &self,
        id: &str,
    ) -> Result<([imacri_runtime::io::Tap; 2], Option<std::fs::File>)> {
        let m = self
            .io
            .lock()
            .map_err(|_| Error::Internal("io lock poisoned".into()))?;
        let io = m.get(id).ok_or_else(|| {
            Error::FailedPrecondition(format!("container {id} has no attachable I/O"))
        })?;
        let stdin = io.stdin.as_ref().and_then(|f| f.try_clone().ok());
        Ok(([io.tap.clone(), io.tap_err.clone()], stdin))
    }

    /// An attached client closed stdin. For a `stdin_once` container that
    /// is the end of its input (containerd's rule): the held fifo writer and
    /// the shim's are closed, so the process reads EOF. Otherwise stdin
    /// stays open for the next attach.
    pub(crate) async fn end_attached_stdin(&self, id: &str) -> Result<()> {
        let once = self.container(id).map(|c| c.config.stdin_once)?;
        if !once {
            return Ok(());
        }
        if let Ok(mut m) = self.io.lock() {
            if let Some(io) = m.get_mut(id) {
                io.stdin = None;
            }
        }
        self.c.close_stdin(id, "").await
    }

    pub(crate) fn log_of(&self, id: &str) -> Option<LogFile> {
        self.io.lock().ok()?.get(id).and_then(|io| io.log.clone())
    }

    /// Publishes a CRI container event (GetContainerEvents) with the
    /// container's and its pod's current status.
    /// Sends a CRI event for a container or a pod sandbox (`id` either):
    /// the pod's status with every one of its containers' statuses, as
    /// kubelet's evented PLEG rebuilds the pod from one event.
    pub(crate) fn emit(&self, kind: cri::ContainerEventType, id: &str) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let pod_id = match self.containers.get(id) {
            Some(c) => c.state().sandbox_id.clone(),
            None if self.sandboxes.get(id).is_some() => id.to_string(),
            None => return,
        };
        let pod = self
            .sandboxes
            .get(&pod_id)
            .map(|sb| self.sandbox_status_of(&sb));
        let containers_statuses = self
            .containers_of(&pod_id)
            .iter()
            .map(|c| self.container_status_of(c))
            .collect();
        let _ = self.events.send(cri::ContainerEventResponse {
            container_id: id.to_string(),
            container_event_type: kind as i32,
            created_at: imacri_runtime::ids::now_nanos(),
            pod_sandbox_status: pod,
            containers_statuses,
        });
    }
}

fn to_status(e: &Error) -> tonic::Status {
    use tonic::{Code, Status};
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound(_) => Status::not_found(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::PermissionDenied(_) => Status::permission_denied(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::Containerd { source, .. } => match source.code() {
            c @ (Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::Unavailable
            | Code::DeadlineExceeded) => Status::new(c, msg),
            _ => Status::unknown(msg),
        },
        Error::Registry(_) | Error::Held(_) => Status::unknown(msg),
        Error::Unimplemented(_) => Status::unimplemented(msg),
        Error::Io { .. } | Error::Internal(_) => Status::internal(msg),
    }
}

/// Runs one RPC: a span with its name and object ID, a log line with the
/// outcome and duration, and the error mapped to a gRPC status.
pub(crate) async fn instrument<T, F>(
    rpc: &'static str,
    id: &str,
    fut: F,
) -> std::result::Result<tonic::Response<T>, tonic::Status>
where
    F: Future<Output = Result<T>>,
{
    use tracing::Instrument;
    let span = tracing::info_span!("cri", rpc, id = %id);
    async move {
        let start = Instant::now();
        let res = fut.await;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        match res {
            Ok(v) => {
                tracing::debug!(ms, "ok");
                Ok(tonic::Response::new(v))
            }
            Err(e) => {
                let status = to_status(&e);
                match status.code() {
                    tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition => {
                        tracing::info!(ms, code = ?status.code(), error = %e, "rejected")
                    }
                    _ => tracing::error!(ms, code = ?status.code(), error = %e, "failed"),
                }
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}
