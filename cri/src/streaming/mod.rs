//! The streaming server behind Exec, Attach and PortForward: the RPCs return
//! a URL with a single-use token; a client (kubelet, crictl) upgrades that
//! URL to a WebSocket speaking Kubernetes' channel protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and the
//! base64 variants; port-forward's data/error channel pairs).
//!
//! WebSocket framing comes from tokio-tungstenite (maintained); the channel
//! protocol on top is small and Kubernetes-specific, so it is ours. SPDY/3.1
//! (the older transport) is not implemented yet: such upgrades get a clear
//! error naming the WebSocket protocols to use.

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use imacri_api::cri;
use imacri_runtime::ids::new_id;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{io, spec, Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::server::CriServer;

mod session;
pub mod spdy;

/// How long a returned URL stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(60);

pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
/// v5: `[255, channel]` closes that channel (stdin).
pub(crate) const CLOSE: u8 = 255;

/// Sub-protocols we speak, most preferred first.
const EXEC_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
const PORTFORWARD_PROTOCOLS: [&str; 5] = [
    "SPDY/3.1+portforward.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

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
pub async fn serve(listener: TcpListener, st: Arc<Streaming>, server: Weak<CriServer>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let st = st.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, st, server)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn reply(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn handle(
    req: Request<Incoming>,
    st: Arc<Streaming>,
    server: Weak<CriServer>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let token = path.rsplit('/').next().unwrap_or("");
    let upgrade = header(&req, "upgrade").to_ascii_lowercase();
    if upgrade.starts_with("spdy/3.1") {
        return session::spdy_upgrade(req, st, server, token);
    }
    if upgrade != "websocket" {
        return reply(StatusCode::BAD_REQUEST, "a WebSocket upgrade is required");
    }
    let Some(pending) = st.take(token) else {
        return reply(StatusCode::NOT_FOUND, "unknown or expired streaming token");
    };
    let offered: Vec<String> = header(&req, "sec-websocket-protocol")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let supported: &[&str] = match pending {
        Pending::PortForward(_) => &PORTFORWARD_PROTOCOLS,
        _ => &EXEC_PROTOCOLS,
    };
    let protocol = supported
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .copied();
    if protocol.is_none() && !offered.is_empty() {
        return reply(
            StatusCode::BAD_REQUEST,
            &format!(
                "none of the offered sub-protocols {offered:?} is supported (have {supported:?})"
            ),
        );
    }
    let protocol = protocol.unwrap_or("channel.k8s.io").to_string();
    let accept = derive_accept_key(header(&req, "sec-websocket-key").as_bytes());
    let query = req.uri().query().unwrap_or("").to_string();
    let negotiated = protocol.clone();
    tokio::spawn(async move {
        let Ok(up) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
        let Some(server) = server.upgrade() else {
            return;
        };
        let ch = Channels::new(&negotiated);
        let res = match pending {
            Pending::PortForward(r) if negotiated.starts_with("SPDY/3.1+") => {
                session::port_forward_tunneled(&server, r, ws).await
            }
            Pending::PortForward(r) => port_forward(&server, r, &query, ws, ch).await,
            other => {
                let (tx, rx) = ws.split();
                let mut rx = session::WsRx { s: rx, ch };
                let mut tx = session::WsTx { s: tx, ch };
                run_session(&server, other, &mut rx, &mut tx, ch).await
            }
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "streaming session");
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().expect("static header"));
    h.insert("connection", "Upgrade".parse().expect("static header"));
    if let Ok(v) = accept.parse() {
        h.insert("sec-websocket-accept", v);
    }
    if let Ok(v) = protocol.parse() {
        h.insert("sec-websocket-protocol", v);
    }
    r
}

/// The channel framing of a negotiated sub-protocol.
#[derive(Clone, Copy)]
pub(crate) struct Channels {
    pub(crate) base64: bool,
    pub(crate) v4: bool,
    pub(crate) v5: bool,
}

impl Channels {
    pub(crate) fn new(protocol: &str) -> Channels {
        Channels {
            base64: protocol.contains("base64"),
            v4: protocol.starts_with("v4.") || protocol.starts_with("v5."),
            v5: protocol.starts_with("v5."),
        }
    }

    pub(crate) fn encode(&self, ch: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut s = String::from((b'0' + ch) as char);
            s.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
            Message::Text(s.into())
        } else {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(ch);
            v.extend_from_slice(data);
            Message::Binary(v.into())
        }
    }

    pub(crate) fn decode(&self, m: &Message) -> Option<(u8, Vec<u8>)> {
        match m {
            Message::Binary(b) if !b.is_empty() => Some((b[0], b[1..].to_vec())),
            Message::Text(t) if !t.is_empty() => {
                let ch = t.as_bytes()[0].wrapping_sub(b'0');
                base64::engine::general_purpose::STANDARD
                    .decode(&t.as_bytes()[1..])
                    .ok()
                    .map(|d| (ch, d))
            }
            _ => None,
        }
    }

    /// The final status on the error channel.
    fn status(&self, exit: std::result::Result<i32, String>) -> Option<Vec<u8>> {
        if !self.v4 {
            return match exit {
                Ok(0) => None,
                Ok(c) => {
                    Some(format!("command terminated with non-zero exit code: {c}").into_bytes())
                }
                Err(e) => Some(e.into_bytes()),
            };
        }
        let v = match exit {
            Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
            Ok(c) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {c}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}
            }),
            Err(e) => serde_json::json!({"metadata": {}, "status": "Failure", "message": e}),
        };
        Some(v.to_string().into_bytes())
    }
}

pub(crate) type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A process's stdin: data goes to the sender, the thread writes it.
type StdinPipe = (mpsc::Sender<Vec<u8>>, std::thread::JoinHandle<()>);

#[derive(serde::Deserialize)]
struct Size {
    #[serde(rename = "Width")]
    width: u32,
    #[serde(rename = "Height")]
    height: u32,
}

/// Pumps a process's stdio over a session (WebSocket or SPDY) until it
/// exits (exec) or `done` fires (attach); returns when output is drained.
#[allow(clippy::too_many_arguments)]
async fn pump(
    server: &CriServer,
    rx: &mut dyn session::ChanRx,
    tx: &mut dyn session::ChanTx,
    ch: Channels,
    cid: &str,
    exec_id: &str,
    mut stdin: Option<StdinPipe>,
    mut out: mpsc::Receiver<(u8, Vec<u8>)>,
    done: impl std::future::Future<Output = std::result::Result<i32, String>>,
) -> Result<()> {
    // An empty frame on the first writable channel tells the client we're up.
    tx.send(STDOUT, &[]).await?;
    tokio::pin!(done);
    let mut exit = None;
    loop {
        tokio::select! {
            m = rx.recv(), if exit.is_none() => match m {
                Some(session::In::Data(STDIN, d)) => {
                    if let Some((s, _)) = &stdin {
                        let _ = s.send(d).await;
                    }
                }
                Some(session::In::Data(RESIZE, d)) => {
                    if let Ok(sz) = serde_json::from_slice::<Size>(&d) {
                        let _ = server.c.resize_pty(cid, exec_id, sz.width, sz.height).await;
                    }
                }
                Some(session::In::CloseStdin) => {
                    // Let the writer flush, then close the process's stdin.
                    if let Some((s, writer)) = stdin.take() {
                        drop(s);
                        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                        let closed = if exec_id.is_empty() {
                            server.end_attached_stdin(cid).await
                        } else {
                            server.c.close_stdin(cid, exec_id).await
                        };
                        if let Err(e) = closed {
                            tracing::warn!(container_id = %cid, error = %e, "closing stdin");
                        }
                    }
                }
                Some(_) => {}
                None => break,
            },
            o = out.recv() => match o {
                Some((c, d)) => tx.send(c, &d).await?,
                None => {
                    // All output is drained: wait for the exit status.
                    if exit.is_none() {
                        exit = Some((&mut done).await);
                    }
                    break;
                }
            },
            e = &mut done, if exit.is_none() => {
                exit = Some(e);
                // Drain what the process wrote last.
                while let Ok(Some((c, d))) = tokio::time::timeout(Duration::from_secs(2), out.recv()).await {
                    tx.send(c, &d).await?;
                }
                break;
            }
        }
    }
    drop(stdin);
    tx.finish(exit.and_then(|e| ch.status(e))).await;
    Ok(())
}

/// Exec or attach over an established session.
async fn run_session(
    server: &CriServer,
    p: Pending,
    rx: &mut dyn session::ChanRx,
    tx: &mut dyn session::ChanTx,
    ch: Channels,
) -> Result<()> {
    match p {
        Pending::Exec(r) => exec(server, r, rx, tx, ch).await,
        Pending::Attach(r) => attach(server, r, rx, tx, ch).await,
        Pending::PortForward(_) => Err(Error::Internal(
            "port-forward is not an exec session".into(),
        )),
    }
}

fn running(server: &CriServer, id: &str) -> Result<Arc<crate::server::ContainerEntry>> {
    let c = server.container(id)?;
    if c.state().phase != ContainerPhase::Running {
        return Err(Error::FailedPrecondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    Ok(c)
}

async fn exec(
    server: &CriServer,
    r: cri::ExecRequest,
    rx: &mut dyn session::ChanRx,
    tx: &mut dyn session::ChanTx,
    ch: Channels,
) -> Result<()> {
    let c = running(server, &r.container_id)?;
    let base = server.c.container_spec(&c.id).await?;
    let base = base
        .process()
        .clone()
        .ok_or_else(|| Error::Internal("container has no process".into()))?;
    let process = spec::exec_process(&base, &r.cmd, r.tty)?;
    let exec_id = format!("exec-{}", &new_id()[..16]);
    let stdio = io::create_fifos(
        &server.cfg.fifo_dir(),
        &format!("{}-{exec_id}", c.id),
        r.stdin,
        r.tty,
    )?;
    let (out_tx, out_rx) = mpsc::channel(64);
    for (p, chan) in [(&stdio.stdout, STDOUT), (&stdio.stderr, STDERR)] {
        if let Some(p) = p {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
            io::spawn_forwarder(p.clone(), tx);
            let out = out_tx.clone();
            tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    if out.send((chan, d)).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    drop(out_tx);
    let stdin = stdio.stdin.clone().map(|p| {
        let (tx, rx) = mpsc::channel(16);
        (tx, io::spawn_stdin_writer(p, rx))
    });
    let started = async {
        server.c.exec(&c.id, &exec_id, &process, &stdio).await?;
        server.c.start_task(&c.id, &exec_id).await
    }
    .await;
    if let Err(e) = started {
        for p in [&stdio.stdin, &stdio.stdout, &stdio.stderr]
            .into_iter()
            .flatten()
        {
            io::unblock_reader(p);
        }
        io::remove_fifos(&stdio);
        let _ = server.c.delete_process(&c.id, &exec_id).await;
        return Err(e);
    }
    let cid = c.id.clone();
    let done = async {
        server
            .c
            .wait_task(&cid, &exec_id)
            .await
            .map(|(code, _)| code as i32)
            .map_err(|e| e.to_string())
    };
    let res = pump(server, rx, tx, ch, &c.id, &exec_id, stdin, out_rx, done).await;
    // The client may have gone: make sure the process does not linger.
    let _ = server.c.kill_task(&c.id, &exec_id, 9).await;
    let _ = server.c.wait_task(&c.id, &exec_id).await;
    let _ = server.c.delete_process(&c.id, &exec_id).await;
    io::remove_fifos(&stdio);
    res
}

async fn attach(
    server: &CriServer,
    r: cri::AttachRequest,
    rx: &mut dyn session::ChanRx,
    tx: &mut dyn session::ChanTx,
    ch: Channels,
) -> Result<()> {
    let c = running(server, &r.container_id)?;
    let (taps, stdin_file) = server.attach_io(&c.id)?;
    let (out_tx, out_rx) = mpsc::channel(64);
    let wanted = [(r.stdout, STDOUT), (r.stderr && !c.config.tty, STDERR)];
    for ((want, chan), tap) in wanted.into_iter().zip(taps) {
        if !want {
            continue;
        }
        let mut rx = tap.subscribe();
        let out = out_tx.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(d) => {
                        if out.send((chan, d)).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
    }
    drop(out_tx);
    let stdin = match (r.stdin, stdin_file) {
        (true, Some(f)) => {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let mut f = f;
                while let Some(d) = rx.blocking_recv() {
                    if f.write_all(&d).is_err() {
                        break;
                    }
                }
            });
            Some((tx, writer))
        }
        _ => None,
    };
    let id = c.id.clone();
    let done = async {
        while !server.wait_exit(&id, Duration::from_secs(3600)).await {}
        Ok(0)
    };
    pump(server, rx, tx, ch, &c.id, "", stdin, out_rx, done).await
}

/// Connects to 127.0.0.1:port inside the network namespace at `netns`.
pub(crate) async fn connect_in(
    netns: Option<std::path::PathBuf>,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<std::net::TcpStream> {
            if let Some(ns) = netns {
                // This thread alone moves into the pod's network namespace.
                let f = std::fs::File::open(ns)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread died"))??;
    tokio::net::TcpStream::from_std(s)
}

async fn port_forward(
    server: &CriServer,
    r: cri::PortForwardRequest,
    query: &str,
    ws: Ws,
    ch: Channels,
) -> Result<()> {
    let sb = server.sandbox(&r.pod_sandbox_id)?;
    let netns = sb.state().netns;
    let mut ports: Vec<u16> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "port")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    if ports.is_empty() {
        ports = r
            .port
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
    }
    let (mut tx, mut rx) = ws.split();
    let werr =
        |e: tokio_tungstenite::tungstenite::Error| Error::Internal(format!("websocket: {e}"));
    let mut conns = Vec::new();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
    for (i, port) in ports.iter().enumerate() {
        let (data, err) = ((2 * i) as u8, (2 * i + 1) as u8);
        tx.send(ch.encode(data, &port.to_le_bytes()))
            .await
            .map_err(werr)?;
        tx.send(ch.encode(err, &port.to_le_bytes()))
            .await
            .map_err(werr)?;
        match connect_in(netns.clone(), *port).await {
            Ok(s) => {
                let (mut rd, wr) = s.into_split();
                let out = out_tx.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = rd.read(&mut buf).await {
                        if n == 0 || out.send((data, buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                });
                conns.push(Some(wr));
            }
            Err(e) => {
                let msg = format!("error forwarding port {port} to pod {}: {e}", sb.id);
                tx.send(ch.encode(err, msg.as_bytes()))
                    .await
                    .map_err(werr)?;
                conns.push(None);
            }
        }
    }
    drop(out_tx);
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(m)) => {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                    if let Some((c, d)) = ch.decode(&m) {
                        if let Some(Some(w)) = conns.get_mut(c as usize / 2).filter(|_| c % 2 == 0) {
                            use tokio::io::AsyncWriteExt;
                            if w.write_all(&d).await.is_err() {
                                conns[c as usize / 2] = None;
                            }
                        }
                    }
                }
                _ => break,
            },
            o = out_rx.recv() => match o {
                Some((c, d)) => tx.send(ch.encode(c, &d)).await.map_err(werr)?,
                None => break,
            },
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_framing() {
        let b = Channels::new("v5.channel.k8s.io");
        let m = b.encode(STDOUT, b"hi");
        assert_eq!(m, Message::Binary(vec![1, b'h', b'i'].into()));
        assert_eq!(b.decode(&m), Some((1, b"hi".to_vec())));
        let t = Channels::new("base64.channel.k8s.io");
        let m = t.encode(STDERR, b"hi");
        assert_eq!(m, Message::Text("2aGk=".into()));
        assert_eq!(t.decode(&m), Some((2, b"hi".to_vec())));
    }

    #[test]
    fn statuses() {
        let v4 = Channels::new("v4.channel.k8s.io");
        let ok: serde_json::Value = serde_json::from_slice(&v4.status(Ok(0)).unwrap()).unwrap();
        assert_eq!(ok["status"], "Success");
        let bad: serde_json::Value = serde_json::from_slice(&v4.status(Ok(3)).unwrap()).unwrap();
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
        let v1 = Channels::new("channel.k8s.io");
        assert_eq!(v1.status(Ok(0)), None);
        assert!(String::from_utf8(v1.status(Ok(2)).unwrap())
            .unwrap()
            .contains("exit code: 2"));
    }
}
