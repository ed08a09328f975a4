//! The runtime side of NRI (github.com/containerd/nri v0.12.5): plugins
//! connect to a socket or are started from a directory, register, are
//! configured and synchronized with the node's pods and containers, then
//! hear about pod and container events in index order. CreateContainer
//! adjustments pass the administrator's lockdown ([`policy`]) and ima guards
//! before they are merged ([`merge`]) and written into the spec ([`apply`]).

pub mod apply;
pub mod config;
mod convert;
mod events;
pub mod merge;
pub mod mux;
pub mod plugin;
pub mod policy;
pub mod seccomp;

pub use config::{NriConfig, OnRefused, PluginRule, Security};
pub use imacri_nri_api::api;

use plugin::{CallError, Launched, Plugin, Timeouts, Unsolicited};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::RwLock;

#[derive(Debug, thiserror::Error)]
pub enum NriError {
    /// A plugin or the lockdown refused; the request fails.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(String),
    /// A plugin failed the request.
    #[error("{0}")]
    Plugin(String),
    #[error("spec: {0}")]
    Spec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl From<NriError> for crate::Error {
    fn from(e: NriError) -> Self {
        match e {
            NriError::Refused(m) | NriError::Conflict(m) => crate::Error::FailedPrecondition(m),
            NriError::Unsupported(m) => crate::Error::Unimplemented(m),
            NriError::Plugin(m) => crate::Error::Internal(m),
            NriError::Spec(m) => crate::Error::Internal(format!("NRI adjustment: {m}")),
            NriError::Io { context, source } => {
                crate::Error::Internal(format!("{context}: {source}"))
            }
        }
    }
}

/// What NRI needs from the CRI server.
#[async_trait::async_trait]
pub trait Host: Send + Sync {
    /// Every pod and container, for a new plugin's Synchronize.
    async fn snapshot(&self) -> (Vec<api::PodSandbox>, Vec<api::Container>);
    /// Applies resource updates; returns the ones that failed.
    async fn update(&self, updates: Vec<api::ContainerUpdate>) -> Vec<api::ContainerUpdate>;
    /// Stops the containers plugins asked to evict.
    async fn evict(&self, evictions: Vec<api::ContainerEviction>);
    /// Whether the container belongs to an ima pod.
    fn is_ima_container(&self, id: &str) -> bool;
}

/// The outcome of CreateContainer across plugins.
#[derive(Default)]
pub struct Created {
    pub adjust: api::ContainerAdjustment,
    /// Refused parts dropped under `on_refused = "drop"` (already logged).
    pub dropped: Vec<policy::Refusal>,
    pub updates: Vec<api::ContainerUpdate>,
    pub evictions: Vec<api::ContainerEviction>,
}

struct Inner {
    cfg: NriConfig,
    plugins: RwLock<Vec<Arc<Plugin>>>,
    /// Held for writing while a plugin synchronizes, and for reading by
    /// every request that sends events (`holding_sync`), so no event slips
    /// between a plugin's snapshot and its first event.
    sync: RwLock<()>,
    host: Weak<dyn Host>,
    version: String,
}

#[derive(Clone)]
pub struct Nri {
    inner: Arc<Inner>,
}

tokio::task_local! {
    /// Set in a task that holds plugin synchronization off (see
    /// [`Nri::holding_sync`]): its events must not take the lock again (a
    /// second read behind a waiting writer would deadlock).
    static HOLDING_SYNC: ();
}

fn holding_sync() -> bool {
    HOLDING_SYNC.try_with(|_| ()).is_ok()
}

impl Nri {
    /// Starts NRI when the config enables it: binds the socket, starts the
    /// plugins in `plugin_path`. A plugin that fails is logged and left out;
    /// it never stops the node.
    pub async fn start(
        cfg: &NriConfig,
        host: Weak<dyn Host>,
        version: &str,
    ) -> crate::Result<Option<Nri>> {
        if !cfg.enable {
            return Ok(None);
        }
        let nri = Nri {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                plugins: RwLock::new(Vec::new()),
                sync: RwLock::new(()),
                host,
                version: version.into(),
            }),
        };
        if !cfg.disable_connections {
            let l = bind(&cfg.socket_path)?;
            let me = nri.clone();
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let me = me.clone();
                            tokio::spawn(async move { me.add(s, None).await });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "NRI socket accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        for (idx, base, path) in discover(&cfg.plugin_path) {
            match nri.launch(&idx, &base, &path) {
                Ok((s, l)) => nri.add(s, Some(l)).await,
                Err(e) => {
                    tracing::warn!(plugin = %format!("{idx}-{base}"), error = %e, "NRI plugin not started")
                }
            }
        }
        Ok(Some(nri))
    }

    fn launch(
        &self,
        idx: &str,
        base: &str,
        path: &Path,
    ) -> Result<(tokio::net::UnixStream, Launched), NriError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| NriError::Io { context, source }
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair"))?;
        ours.set_nonblocking(true).map_err(io("socketpair"))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = tokio::process::Command::new(path);
        cmd.env_clear()
            .env("NRI_PLUGIN_NAME", base)
            .env("NRI_PLUGIN_IDX", idx)
            .env("NRI_PLUGIN_SOCKET", "3")
            .kill_on_drop(true);
        // SAFETY: between fork and exec only async-signal-safe dup2.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(io(&format!("starting {}", path.display())))?;
        drop(theirs);
        let config = plugin_config(&self.inner.cfg.plugin_config_path, idx, base);
        let stream = tokio::net::UnixStream::from_std(ours).map_err(io("socketpair"))?;
        Ok((
            stream,
            Launched {
                idx: idx.into(),
                base: base.into(),
                config,
                child,
            },
        ))
    }

    /// Registers, configures and synchronizes one plugin, then lists it.
    async fn add(&self, s: tokio::net::UnixStream, launched: Option<Launched>) {
        let t = Timeouts {
            registration: Duration::from_millis(self.inner.cfg.plugin_registration_timeout_ms),
            request: Duration::from_millis(self.inner.cfg.plugin_request_timeout_ms),
        };
        let label = launched.as_ref().map(|l| format!("{}-{}", l.idx, l.base));
        let weak: Weak<dyn Unsolicited> =
            Arc::downgrade(&(self.inner.clone() as Arc<dyn Unsolicited>));
        let p = match Plugin::connect(s, launched, weak, &t, &self.inner.version).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(plugin = ?label, error = %e, "NRI plugin failed to connect");
                return;
            }
        };
        let name = p.name();
        // A plugin that restarts reconnects under its name at once: its old
        // connection is closed, though the mux may not have read the EOF
        // yet. Only a name still connected after that grace is refused.
        let same: Vec<Arc<Plugin>> = self
            .inner
            .plugins
            .read()
            .await
            .iter()
            .filter(|x| x.name() == name)
            .cloned()
            .collect();
        for old in same {
            old.closed_within(t.registration).await;
        }
        let _sync = self.inner.sync.write().await;
        if self.live().await.iter().any(|x| x.name() == name) {
            tracing::warn!(plugin = %name, "NRI plugin with this name already registered; refused");
            p.close();
            return;
        }
        let (pods, containers) = match self.inner.host.upgrade() {
            Some(h) => h.snapshot().await,
            None => return,
        };
        let chunks = sync_chunks(pods, containers, self.inner.cfg.sync_message_bytes);
        let last = chunks.len() - 1;
        for (i, (pods, containers)) in chunks.into_iter().enumerate() {
            let req = api::SynchronizeRequest {
                pods,
                containers,
                more: i < last,
            };
            let more = req.more;
            // Synchronize carries the node's whole state and is part of the
            // plugin's start: it gets the registration timeout (upstream
            // gives it the request timeout, and drops a plugin whose
            // Synchronize takes just over 2 s, losing what it was told).
            let rsp = match p
                .call_within(t.registration.max(t.request), |c, ctx| async move {
                    c.synchronize(ctx, &req).await
                })
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(plugin = %name, error = ?e, "NRI plugin failed to synchronize");
                    p.close();
                    return;
                }
            };
            // Upstream's rule for split state: only the last answer updates.
            if more && (!rsp.update.is_empty() || !rsp.more) {
                tracing::warn!(plugin = %name, "NRI plugin does not handle a split Synchronize; dropped");
                p.close();
                return;
            }
            if !rsp.update.is_empty() {
                if let Err(e) = self.inner.check_updates(&name, p.uid, &rsp.update) {
                    tracing::warn!(plugin = %name, error = %e, "NRI synchronize updates refused");
                } else if let Some(h) = self.inner.host.upgrade() {
                    h.update(rsp.update).await;
                }
            }
        }
        tracing::info!(plugin = %name, uid = ?p.uid, pid = ?p.pid, "NRI plugin registered");
        let mut list = self.inner.plugins.write().await;
        list.push(p);
        list.sort_by_key(|a| a.name());
    }

    /// Runs `f` (a CRI request) with plugin synchronization held off, as
    /// containerd's BlockPluginSync: a plugin that connects meanwhile is
    /// synchronized before or after the whole request, never between its
    /// NRI event and the state change that event announces (a container
    /// created during a Synchronize is in its snapshot or reaches it as a
    /// CreateContainer event, never neither). Nested calls run as they are.
    pub async fn holding_sync<F: std::future::Future>(&self, f: F) -> F::Output {
        if holding_sync() {
            return f.await;
        }
        let _sync = self.inner.sync.read().await;
        HOLDING_SYNC.scope((), f).await
    }

    /// Names of the plugins connected now, in call order.
    pub async fn plugins(&self) -> Vec<String> {
        self.live().await.iter().map(|p| p.name()).collect()
    }

    async fn live(&self) -> Vec<Arc<Plugin>> {
        let mut list = self.inner.plugins.write().await;
        list.retain(|p| {
            let open = !p.is_closed();
            if !open {
                tracing::warn!(plugin = %p.name(), "NRI plugin disconnected; dropped");
            }
            open
        });
        list.clone()
    }

    /// Sends one event to every subscribed plugin; the responses in order.
    async fn each<T, F, Fut>(&self, ev: api::Event, f: F) -> Result<Vec<(Arc<Plugin>, T)>, NriError>
    where
        F: Fn(plugin::PluginClientHandle, ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        // No lock here: the caller holds synchronization off for the whole
        // request (`holding_sync`), taken before any of its own locks, so
        // an event sent while holding a container's lock cannot wait behind
        // a plugin's Synchronize that waits for that request.
        debug_assert!(holding_sync(), "NRI event outside holding_sync");
        let mut out = Vec::new();
        for p in self.live().await {
            if !p.subscribed(ev) {
                continue;
            }
            match p.call(&f).await {
                Ok(v) => out.push((p, v)),
                Err(CallError::Failed(m)) => {
                    return Err(NriError::Plugin(format!(
                        "NRI plugin {} failed {}: {m}",
                        p.name(),
                        ev.as_str_name()
                    )))
                }
                Err(CallError::Fatal(m)) => {
                    tracing::warn!(plugin = %p.name(), event = ev.as_str_name(), error = %m, "NRI plugin dropped");
                    if p.fail_request() {
                        return Err(NriError::Plugin(format!(
                            "NRI plugin {} failed {}: {m}",
                            p.name(),
                            ev.as_str_name()
                        )));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Tells every plugin the runtime is going away.
    pub async fn shutdown(&self) {
        for p in self.live().await {
            let _ = p
                .call(|c, ctx| async move { c.shutdown(ctx, &api::Empty {}).await })
                .await;
            p.close();
        }
        self.inner.plugins.write().await.clear();
        if !self.inner.cfg.disable_connections {
            let _ = std::fs::remove_file(&self.inner.cfg.socket_path);
        }
    }
}

impl Inner {
    /// Updates of existing containers (resources only) need the `updates`
    /// kind; in ima pods they are as safe as UpdateContainerResources.
    fn check_updates(
        &self,
        plugin: &str,
        uid: Option<u32>,
        _u: &[api::ContainerUpdate],
    ) -> Result<(), NriError> {
        let rule = self.cfg.rule_for(plugin, uid);
        if rule.allow.iter().any(|a| a == "all" || a == "updates") {
            Ok(())
        } else {
            Err(NriError::Refused(format!(
                "NRI plugin {plugin} may not update other containers: kind \"updates\" is not in its allow list {:?}",
                rule.allow
            )))
        }
    }
}

#[async_trait::async_trait]
impl Unsolicited for Inner {
    async fn update_containers(
        &self,
        plugin: &str,
        req: api::UpdateContainersRequest,
    ) -> Result<Vec<api::ContainerUpdate>, NriError> {
        let uid = self
            .plugins
            .read()
            .await
            .iter()
            .find(|p| p.name() == plugin)
            .and_then(|p| p.uid);
        self.check_updates(plugin, uid, &req.update)?;
        let Some(h) = self.host.upgrade() else {
            return Ok(req.update);
        };
        tracing::info!(
            plugin,
            updates = req.update.len(),
            evictions = req.evict.len(),
            "NRI unsolicited container updates"
        );
        if !req.evict.is_empty() {
            h.evict(req.evict).await;
        }
        Ok(h.update(req.update).await)
    }
}

/// Splits the node's state into Synchronize messages of at most `limit`
/// encoded bytes each (an object larger than that goes alone); always at
/// least one message, empty on an empty node.
fn sync_chunks(
    pods: Vec<api::PodSandbox>,
    containers: Vec<api::Container>,
    limit: usize,
) -> Vec<(Vec<api::PodSandbox>, Vec<api::Container>)> {
    use imacri_nri_api::prost::Message;
    let mut out = vec![(Vec::new(), Vec::new())];
    let mut size = 0;
    for p in pods {
        let n = p.encoded_len() + 8;
        if size + n > limit && size > 0 {
            out.push((Vec::new(), Vec::new()));
            size = 0;
        }
        size += n;
        if let Some(last) = out.last_mut() {
            last.0.push(p);
        }
    }
    for c in containers {
        let n = c.encoded_len() + 8;
        if size + n > limit && size > 0 {
            out.push((Vec::new(), Vec::new()));
            size = 0;
        }
        size += n;
        if let Some(last) = out.last_mut() {
            last.1.push(c);
        }
    }
    out
}

fn bind(path: &Path) -> crate::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io("creating", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(crate::Error::io("removing stale", path, e)),
    }
    let l =
        tokio::net::UnixListener::bind(path).map_err(|e| crate::Error::io("binding", path, e))?;
    // Plugins change pods: only root may connect.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| crate::Error::io("chmod", path, e))?;
    Ok(l)
}

/// Executables `<idx>-<name>` in `dir`, in name order.
fn discover(dir: &Path) -> Vec<(String, String, std::path::PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = rd
        .flatten()
        .filter_map(|e| {
            use std::os::unix::fs::PermissionsExt;
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().ok()?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return None;
            }
            let (idx, base) = name.split_once('-')?;
            match plugin::check_identity(idx, base) {
                Ok(()) => Some((idx.to_string(), base.to_string(), e.path())),
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "not an NRI plugin name; skipped");
                    None
                }
            }
        })
        .collect();
    out.sort();
    out
}

fn plugin_config(dir: &Path, idx: &str, base: &str) -> String {
    [format!("{idx}-{base}.conf"), format!("{base}.conf")]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_states_are_synchronized_in_parts() {
        let pods: Vec<api::PodSandbox> = (0..10)
            .map(|i| api::PodSandbox {
                id: format!("{i:064}"),
                ..Default::default()
            })
            .collect();
        let ctrs: Vec<api::Container> = (0..30)
            .map(|i| api::Container {
                id: format!("{i:064}"),
                args: vec!["x".repeat(1000)],
                ..Default::default()
            })
            .collect();
        let chunks = sync_chunks(pods, ctrs, 8 << 10);
        assert!(chunks.len() > 3, "{}", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.0.len()).sum::<usize>(), 10);
        assert_eq!(chunks.iter().map(|c| c.1.len()).sum::<usize>(), 30);
        for (p, c) in &chunks {
            let size: usize = p
                .iter()
                .map(imacri_nri_api::prost::Message::encoded_len)
                .sum::<usize>()
                + c.iter()
                    .map(imacri_nri_api::prost::Message::encoded_len)
                    .sum::<usize>();
            assert!(size <= 8 << 10, "{size}");
        }
        assert_eq!(sync_chunks(Vec::new(), Vec::new(), 100).len(), 1);
    }
}
