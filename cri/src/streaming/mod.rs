//! The streaming server behind Exec, Attach and PortForward: the RPCs return
//! a URL with a single-use token; a client (kubelet, crictl) upgrades that
//! URL to WebSocket (`websocket.rs`) or SPDY/3.1 (`spdy_session.rs`, frames
//! in `spdy.rs`), and `session.rs` pumps an exec or attach session over
//! either. As in containerd, the server knows the runtime only through a
//! small trait (`StreamRuntime`: exec, attach, dial), which the CRI server
//! implements (`server/container_exec.rs`, `container_attach.rs`,
//! `sandbox_portforward.rs`).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use imacri_api::cri;
use imacri_runtime::ids::new_id;
use imacri_runtime::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub(crate) mod session;
pub mod spdy;
mod spdy_session;
mod websocket;

pub(crate) use session::ProcessIo;

/// How long a returned URL stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(60);

pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
/// v5: `[255, channel]` closes that channel (stdin).
pub(crate) const CLOSE: u8 = 255;

/// What the streaming server needs of the runtime.
#[tonic::async_trait]
pub(crate) trait StreamRuntime: Send + Sync {
    /// Runs `req.cmd` in its container with `io`; returns the exit code
    /// once it has exited and its output is handed over.
    async fn exec(&self, req: cri::ExecRequest, io: ProcessIo) -> Result<i32>;
    /// Connects `io` to a running container until it exits or the client
    /// goes.
    async fn attach(&self, req: cri::AttachRequest, io: ProcessIo) -> Result<()>;
    /// A connection to `port` on the pod's loopback, in its network
    /// namespace.
    async fn dial(&self, pod: &str, port: u16) -> std::io::Result<tokio::net::TcpStream>;
}

pub enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

pub struct Streaming {
    base_url: String,
    tokens: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl Streaming {
    /// Binds the server (port 0: any free port).
    pub async fn bind(address: &str, port: u16) -> anyhow::Result<(Arc<Streaming>, TcpListener)> {
        let listener = TcpListener::bind((address, port)).await?;
        let addr = listener.local_addr()?;
        let host = if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        Ok((
            Arc::new(Streaming {
                base_url: format!("http://{host}:{}", addr.port()),
                tokens: Mutex::new(HashMap::new()),
            }),
            listener,
        ))
    }

    /// A single-use URL for `p`.
    pub fn url(&self, p: Pending) -> String {
        let kind = match p {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        };
        let token = new_id()[..32].to_string();
        if let Ok(mut t) = self.tokens.lock() {
            t.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
            t.insert(token.clone(), (p, Instant::now()));
        }
        format!("{}/{kind}/{token}", self.base_url)
    }

    fn take(&self, token: &str) -> Option<Pending> {
        let (p, at) = self.tokens.lock().ok()?.remove(token)?;
        (at.elapsed() < TOKEN_TTL).then_some(p)
    }
}

/// Serves streaming connections until the process ends.
pub(crate) async fn serve(listener: TcpListener, st: Arc<Streaming>, rt: Weak<dyn StreamRuntime>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let st = st.clone();
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                let rt = rt.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, st, rt)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), svc)
                .with_upgrades()
                .await;
        });
    }
}

pub(crate) fn reply(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r
}

pub(crate) fn header<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Dispatches an upgrade by transport, once its token is redeemed.
fn handle(
    req: Request<Incoming>,
    st: Arc<Streaming>,
    rt: Weak<dyn StreamRuntime>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let token = path.rsplit('/').next().unwrap_or("");
    let upgrade = header(&req, "upgrade").to_ascii_lowercase();
    let spdy = upgrade.starts_with("spdy/3.1");
    if !spdy && upgrade != "websocket" {
        return reply(
            StatusCode::BAD_REQUEST,
            "a WebSocket or SPDY/3.1 upgrade is required",
        );
    }
    let Some(pending) = st.take(token) else {
        return reply(StatusCode::NOT_FOUND, "unknown or expired streaming token");
    };
    if spdy {
        spdy_session::upgrade(req, pending, rt)
    } else {
        websocket::upgrade(req, pending, rt)
    }
}
