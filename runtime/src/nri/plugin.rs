//! One connected plugin: the multiplexed socket, our ttrpc client for its
//! `Plugin` service, our ttrpc server for its `Runtime` calls, registration
//! and configuration with their timeouts, and how a failed call is judged.

use super::mux::{Mux, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use super::NriError;
use imacri_nri_api::api;
pub use imacri_nri_api::api::__ttrpc_services_plugin::PluginClient as PluginClientHandle;
use imacri_nri_api::api::__ttrpc_services_plugin::PluginClient;
use imacri_nri_api::api::__ttrpc_services_runtime::{create_runtime, Runtime};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use ttrpc::r#async::transport::{Listener, Socket};

/// What a plugin sends the runtime unprompted.
#[async_trait::async_trait]
pub trait Unsolicited: Send + Sync {
    async fn update_containers(
        &self,
        plugin: &str,
        req: api::UpdateContainersRequest,
    ) -> Result<Vec<api::ContainerUpdate>, NriError>;
}

/// Our `Runtime` service as one plugin sees it.
struct RuntimeSide {
    registered: Mutex<Option<oneshot::Sender<api::RegisterPluginRequest>>>,
    name: OnceLock<String>,
    host: std::sync::Weak<dyn Unsolicited>,
}

#[async_trait::async_trait]
impl Runtime for RuntimeSide {
    async fn register_plugin(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::RegisterPluginRequest,
    ) -> ttrpc::Result<api::Empty> {
        let tx = self.registered.lock().ok().and_then(|mut g| g.take());
        match tx {
            Some(tx) => {
                let _ = tx.send(req);
                Ok(api::Empty {})
            }
            None => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "plugin already registered",
            ))),
        }
    }

    async fn update_containers(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::UpdateContainersRequest,
    ) -> ttrpc::Result<api::UpdateContainersResponse> {
        let (Some(name), Some(host)) = (self.name.get(), self.host.upgrade()) else {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "plugin not registered",
            )));
        };
        match host.update_containers(name, req).await {
            Ok(failed) => Ok(api::UpdateContainersResponse { failed }),
            Err(e) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::PERMISSION_DENIED,
                e.to_string(),
            ))),
        }
    }
}

/// A plugin imacri started from the plugin directory.
pub struct Launched {
    pub idx: String,
    pub base: String,
    pub config: String,
    pub child: tokio::process::Child,
}

pub struct Timeouts {
    pub registration: Duration,
    pub request: Duration,
}

pub struct Plugin {
    pub idx: String,
    pub base: String,
    /// The socket peer's uid (None: launched by imacri).
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    events: u32,
    fail_request: bool,
    client: PluginClient,
    mux: Mux,
    _server: tokio::sync::Mutex<ttrpc::r#async::Server>,
    child: Mutex<Option<tokio::process::Child>>,
    closed: AtomicBool,
    request_timeout: Duration,
    /// One request at a time: ttrpc's async client numbers a request before
    /// it queues it, so two concurrent calls can reach the plugin with their
    /// stream IDs out of order, which upstream's server refuses ("StreamID
    /// cannot be re-used and must increment"; seen with critest's
    /// concurrent StartContainers). Upstream's runtime side serializes its
    /// events too.
    calls: tokio::sync::Mutex<()>,
}

/// How a call to a plugin went wrong.
#[derive(Debug)]
pub enum CallError {
    /// The connection is gone or the plugin did not answer in time: the
    /// plugin is dropped.
    Fatal(String),
    /// The plugin answered with an error.
    Failed(String),
}

/// NRI's name rules: a two-digit index and a name without '-'-led oddities.
pub fn check_identity(idx: &str, base: &str) -> Result<(), NriError> {
    if idx.len() != 2 || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NriError::Plugin(format!(
            "invalid plugin index {idx:?}: two digits"
        )));
    }
    if base.is_empty()
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(NriError::Plugin(format!("invalid plugin name {base:?}")));
    }
    Ok(())
}

impl Plugin {
    /// Sets up the protocol on `stream`, waits for registration, configures
    /// the plugin. Synchronization is the caller's (it needs the node's state).
    pub async fn connect(
        stream: UnixStream,
        launched: Option<Launched>,
        host: std::sync::Weak<dyn Unsolicited>,
        t: &Timeouts,
        runtime_version: &str,
    ) -> Result<Plugin, NriError> {
        let cred = stream.peer_cred().ok();
        let (mux, mut ends) = Mux::new(stream, &[PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN]);
        let (runtime_end, plugin_end) = match (ends.pop(), ends.pop()) {
            (Some(r), Some(p)) => (r, p),
            _ => return Err(NriError::Plugin("multiplexer gave no connections".into())),
        };
        let client = PluginClient::new(ttrpc::r#async::Client::new(Socket::new(plugin_end)));
        let (reg_tx, reg_rx) = oneshot::channel();
        let side = Arc::new(RuntimeSide {
            registered: Mutex::new(Some(reg_tx)),
            name: OnceLock::new(),
            host,
        });
        let listener = Listener::new(futures::stream::once(async move {
            Ok::<_, std::io::Error>(runtime_end)
        }));
        let mut server = ttrpc::r#async::Server::new()
            .register_service(create_runtime(side.clone()))
            .add_listener(listener);
        server
            .start()
            .await
            .map_err(|e| NriError::Plugin(format!("ttrpc server: {e}")))?;

        let (idx, base, config, child) = match launched {
            Some(l) => (Some(l.idx), Some(l.base), l.config, Some(l.child)),
            None => (None, None, String::new(), None),
        };
        let reg = match tokio::time::timeout(t.registration, reg_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                return Err(NriError::Plugin(
                    "connection closed before registration".into(),
                ))
            }
            Err(_) => {
                return Err(NriError::Plugin(format!(
                    "plugin did not register within {:?}",
                    t.registration
                )))
            }
        };
        // A launched plugin's identity is its file name; an external one
        // names itself.
        let idx = idx.unwrap_or(reg.plugin_idx);
        let base = base.unwrap_or(reg.plugin_name);
        check_identity(&idx, &base)?;
        let _ = side.name.set(format!("{idx}-{base}"));

        let mut p = Plugin {
            idx,
            base,
            uid: if child.is_some() {
                None
            } else {
                cred.map(|c| c.uid())
            },
            pid: if child.is_some() {
                None
            } else {
                cred.and_then(|c| c.pid())
            },
            events: 0,
            fail_request: false,
            client,
            mux,
            _server: tokio::sync::Mutex::new(server),
            child: Mutex::new(child),
            closed: AtomicBool::new(false),
            calls: tokio::sync::Mutex::new(()),
            request_timeout: t.request,
        };
        if let Some(pid) = p
            .child
            .lock()
            .ok()
            .and_then(|c| c.as_ref().and_then(|c| c.id()))
        {
            p.pid = Some(pid as i32);
        }
        let req = api::ConfigureRequest {
            config,
            runtime_name: "imacri".into(),
            runtime_version: runtime_version.into(),
            registration_timeout: t.registration.as_millis() as i64,
            request_timeout: t.request.as_millis() as i64,
            nri_version: "v0.12.5".into(),
        };
        let rsp = p
            .call(|c, ctx| async move { c.configure(ctx, &req).await })
            .await
            .map_err(|e| NriError::Plugin(format!("configure: {e:?}")))?;
        let valid = (1u32 << (api::Event::Last as u32 - 1)) - 1;
        let events = rsp.events as u32;
        if events & !valid != 0 {
            return Err(NriError::Plugin(format!("invalid event mask {events:#x}")));
        }
        p.events = if events == 0 { valid } else { events };
        p.fail_request = rsp.failure_policy.is_some_and(|f| f.fail_request);
        Ok(p)
    }

    pub fn name(&self) -> String {
        format!("{}-{}", self.idx, self.base)
    }

    pub fn subscribed(&self, e: api::Event) -> bool {
        let n = e as u32;
        n > 0 && self.events & (1 << (n - 1)) != 0
    }

    /// Whether a failed call fails the request (the plugin asked for it).
    pub fn fail_request(&self) -> bool {
        self.fail_request
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || *self.mux.closed().borrow()
    }

    /// Waits up to `limit` for the connection to be gone; whether it is.
    pub async fn closed_within(&self, limit: std::time::Duration) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return true;
        }
        let mut rx = self.mux.closed();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.mux.close();
        if let Ok(mut c) = self.child.lock() {
            if let Some(c) = c.as_mut() {
                let _ = c.start_kill();
            }
        }
    }

    /// One request with the request timeout; a transport failure or a
    /// timeout closes the plugin.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(PluginClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        self.call_within(self.request_timeout, f).await
    }

    /// [`Self::call`] with its own timeout.
    pub async fn call_within<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T, CallError>
    where
        F: FnOnce(PluginClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        if self.is_closed() {
            return Err(CallError::Fatal("connection closed".into()));
        }
        let ctx = ttrpc::context::with_timeout(limit.as_nanos() as i64);
        // The wait for the turn counts against the timeout as well.
        let call = async {
            let _turn = self.calls.lock().await;
            f(self.client.clone(), ctx).await
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ttrpc::Error::RpcStatus(s)))
                if s.code != ttrpc::Code::DEADLINE_EXCEEDED as i32 =>
            {
                Err(CallError::Failed(s.message))
            }
            Ok(Err(e)) => {
                self.close();
                Err(CallError::Fatal(e.to_string()))
            }
            Err(_) => {
                self.close();
                Err(CallError::Fatal(format!("no answer within {limit:?}")))
            }
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.close();
    }
}
