//! The SPDY/3.1 transport (kubelet's and client-go's older one): exec and
//! attach with one SPDY stream per stdio channel (named by the `streamtype`
//! header), port-forward with a data and an error stream per connection,
//! and the same port-forward tunneled inside WebSocket messages. The frame
//! codec is `spdy.rs`.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::session::{self, ChanRx, ChanTx, Channels, In};
use super::spdy::{header, Codec, Frame};
use super::websocket::Ws;
use super::{reply, Pending, StreamRuntime, ERROR, RESIZE, STDERR, STDIN, STDOUT};

/// Exec/attach sub-protocols over SPDY, most preferred first.
const SPDY_EXEC: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
const SPDY_PORTFORWARD: [&str; 1] = ["portforward.k8s.io"];

fn channel_of(streamtype: &str) -> Option<u8> {
    Some(match streamtype {
        "stdin" => STDIN,
        "stdout" => STDOUT,
        "stderr" => STDERR,
        "error" => ERROR,
        "resize" => RESIZE,
        _ => return None,
    })
}

/// A SPDY connection: frames in from a reader task, frames out through a
/// writer task (each owning its half and its compression state).
struct SpdyConn {
    frames: mpsc::Receiver<Frame>,
    out: mpsc::Sender<Frame>,
}

fn spdy_conn<IO>(io: IO) -> SpdyConn
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let (in_tx, frames) = mpsc::channel(64);
    let (out, mut out_rx) = mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        let mut codec = Codec::default();
        let mut rd: ReadHalf<_> = rd;
        while let Ok(Some(f)) = codec.read(&mut rd).await {
            if in_tx.send(f).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut codec = Codec::default();
        while let Some(f) = out_rx.recv().await {
            let Ok(bytes) = codec.encode(&f) else { break };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    SpdyConn { frames, out }
}

pub(crate) struct SpdyRx {
    frames: mpsc::Receiver<Frame>,
    out: mpsc::Sender<Frame>,
    ids: HashMap<u32, u8>,
    close_next: bool,
}

pub(crate) struct SpdyTx {
    out: mpsc::Sender<Frame>,
    streams: HashMap<u8, u32>,
}

#[tonic::async_trait]
impl ChanRx for SpdyRx {
    async fn recv(&mut self) -> Option<In> {
        if std::mem::take(&mut self.close_next) {
            return Some(In::CloseStdin);
        }
        loop {
            match self.frames.recv().await? {
                Frame::Data { id, fin, data } => match self.ids.get(&id) {
                    Some(&STDIN) if !data.is_empty() => {
                        self.close_next = fin;
                        return Some(In::Data(STDIN, data));
                    }
                    Some(&STDIN) if fin => return Some(In::CloseStdin),
                    Some(&c) if !data.is_empty() => return Some(In::Data(c, data)),
                    _ => continue,
                },
                Frame::Ping { id } => {
                    let _ = self.out.send(Frame::Ping { id }).await;
                }
                Frame::RstStream { .. } | Frame::GoAway => return None,
                _ => continue,
            }
        }
    }
}

#[tonic::async_trait]
impl ChanTx for SpdyTx {
    async fn send(&mut self, ch: u8, data: &[u8]) -> Result<()> {
        let (Some(&id), false) = (self.streams.get(&ch), data.is_empty()) else {
            return Ok(());
        };
        self.out
            .send(Frame::Data {
                id,
                fin: false,
                data: data.to_vec(),
            })
            .await
            .map_err(|_| Error::Internal("spdy connection closed".into()))
    }

    async fn finish(&mut self, status: Option<Vec<u8>>) {
        if let (Some(s), Some(&id)) = (status, self.streams.get(&ERROR)) {
            let _ = self
                .out
                .send(Frame::Data {
                    id,
                    fin: false,
                    data: s,
                })
                .await;
        }
        for ch in [STDOUT, STDERR, ERROR] {
            if let Some(&id) = self.streams.get(&ch) {
                let _ = self
                    .out
                    .send(Frame::Data {
                        id,
                        fin: true,
                        data: Vec::new(),
                    })
                    .await;
            }
        }
        let _ = self.out.send(Frame::GoAway).await;
    }
}

/// Waits for the client to open the streams the request needs, answering
/// each with SYN_REPLY.
async fn accept_streams(mut conn: SpdyConn, expected: Vec<u8>) -> Result<(SpdyRx, SpdyTx)> {
    let mut streams = HashMap::new();
    let mut ids = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !expected.iter().all(|c| streams.contains_key(c)) {
        let f = tokio::time::timeout_at(deadline, conn.frames.recv())
            .await
            .map_err(|_| {
                Error::DeadlineExceeded("the client did not open its streams in time".into())
            })?
            .ok_or_else(|| Error::Internal("the client closed the connection".into()))?;
        match f {
            Frame::SynStream { id, headers, .. } => {
                if let Some(ch) = header(&headers, "streamtype").and_then(channel_of) {
                    streams.insert(ch, id);
                    ids.insert(id, ch);
                }
                let _ = conn
                    .out
                    .send(Frame::SynReply {
                        id,
                        headers: vec![],
                        fin: false,
                    })
                    .await;
            }
            Frame::Ping { id } => {
                let _ = conn.out.send(Frame::Ping { id }).await;
            }
            _ => {}
        }
    }
    Ok((
        SpdyRx {
            frames: conn.frames,
            out: conn.out.clone(),
            ids,
            close_next: false,
        },
        SpdyTx {
            out: conn.out,
            streams,
        },
    ))
}

/// Answers a SPDY/3.1 upgrade: protocol from X-Stream-Protocol-Version.
pub(crate) fn upgrade(
    req: Request<Incoming>,
    pending: Pending,
    rt: Weak<dyn StreamRuntime>,
) -> Response<Full<Bytes>> {
    let offered: Vec<String> = req
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
        .collect();
    let supported: &[&str] = match pending {
        Pending::PortForward(_) => &SPDY_PORTFORWARD,
        _ => &SPDY_EXEC,
    };
    let Some(protocol) = supported
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .copied()
    else {
        return reply(
            StatusCode::FORBIDDEN,
            &format!("none of the offered stream protocols {offered:?} is supported (have {supported:?})"),
        );
    };
    tokio::spawn(async move {
        let Ok(up) = hyper::upgrade::on(req).await else {
            return;
        };
        let Some(rt) = rt.upgrade() else {
            return;
        };
        let conn = spdy_conn(TokioIo::new(up));
        let res = match pending {
            Pending::PortForward(r) => port_forward_spdy(&*rt, r, conn).await,
            p => {
                let ch = Channels::new(protocol);
                let (stdin, stdout, stderr, tty) = match &p {
                    Pending::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
                    Pending::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
                    Pending::PortForward(_) => (false, false, false, false),
                };
                let mut expected = vec![];
                if protocol != "channel.k8s.io" {
                    expected.push(ERROR);
                }
                for (want, c) in [(stdin, STDIN), (stdout, STDOUT), (stderr && !tty, STDERR)] {
                    if want {
                        expected.push(c);
                    }
                }
                if tty && (protocol == "v3.channel.k8s.io" || protocol == "v4.channel.k8s.io") {
                    expected.push(RESIZE);
                }
                match accept_streams(conn, expected).await {
                    Ok((mut rx, mut tx)) => session::run(&*rt, p, &mut rx, &mut tx, ch).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "spdy streaming session");
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "SPDY/3.1".parse().expect("static header"));
    h.insert("connection", "Upgrade".parse().expect("static header"));
    h.insert(
        "x-stream-protocol-version",
        protocol.parse().expect("static header"),
    );
    r
}

/// Port-forward tunneled as SPDY frames inside WebSocket binary messages
/// (subprotocol `SPDY/3.1+portforward.k8s.io`, newer clients).
pub(crate) async fn port_forward_tunneled(
    rt: &dyn StreamRuntime,
    r: imacri_api::cri::PortForwardRequest,
    ws: Ws,
) -> Result<()> {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    });
    let outbound = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0
                || sink
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
            {
                break;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    let res = port_forward_spdy(rt, r, spdy_conn(ours)).await;
    inbound.abort();
    let _ = outbound.await;
    res
}

/// Port-forward over SPDY: the client opens an error and a data stream per
/// connection (headers `streamtype`, `port`, `requestID`).
async fn port_forward_spdy(
    rt: &dyn StreamRuntime,
    r: imacri_api::cri::PortForwardRequest,
    mut conn: SpdyConn,
) -> Result<()> {
    let pod = r.pod_sandbox_id.clone();
    let mut data_streams: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut error_streams: HashMap<String, u32> = HashMap::new();
    while let Some(f) = conn.frames.recv().await {
        match f {
            Frame::SynStream { id, headers, .. } => {
                let _ = conn
                    .out
                    .send(Frame::SynReply {
                        id,
                        headers: vec![],
                        fin: false,
                    })
                    .await;
                let request = header(&headers, "requestid").unwrap_or("").to_string();
                match header(&headers, "streamtype") {
                    Some("error") => {
                        error_streams.insert(request, id);
                    }
                    Some("data") => {
                        let port: u16 = header(&headers, "port")
                            .and_then(|p| p.parse().ok())
                            .unwrap_or(0);
                        let out = conn.out.clone();
                        let err_id = error_streams.get(&request).copied();
                        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
                        data_streams.insert(id, tx);
                        let pod = pod.clone();
                        // Dialed here, so the connection is made before the
                        // next frame is read; pumped by a task of its own.
                        let dialed = rt.dial(&pod, port).await;
                        tokio::spawn(async move {
                            match dialed {
                                Ok(s) => {
                                    let (mut rd, mut wr) = s.into_split();
                                    let up = tokio::spawn(async move {
                                        while let Some(d) = rx.recv().await {
                                            if wr.write_all(&d).await.is_err() {
                                                break;
                                            }
                                        }
                                    });
                                    let mut buf = vec![0u8; 32 * 1024];
                                    use tokio::io::AsyncReadExt;
                                    while let Ok(n) = rd.read(&mut buf).await {
                                        if n == 0 {
                                            break;
                                        }
                                        if out
                                            .send(Frame::Data {
                                                id,
                                                fin: false,
                                                data: buf[..n].to_vec(),
                                            })
                                            .await
                                            .is_err()
                                        {
                                            break;
                                        }
                                    }
                                    let _ = out
                                        .send(Frame::Data {
                                            id,
                                            fin: true,
                                            data: vec![],
                                        })
                                        .await;
                                    // As kubelet does: the error stream ends
                                    // empty when the forward ended cleanly
                                    // (clients read it to EOF).
                                    if let Some(eid) = err_id {
                                        let _ = out
                                            .send(Frame::Data {
                                                id: eid,
                                                fin: true,
                                                data: vec![],
                                            })
                                            .await;
                                    }
                                    up.abort();
                                }
                                Err(e) => {
                                    if let Some(eid) = err_id {
                                        let msg = format!(
                                            "error forwarding port {port} to pod {pod}: {e}"
                                        );
                                        let _ = out
                                            .send(Frame::Data {
                                                id: eid,
                                                fin: true,
                                                data: msg.into_bytes(),
                                            })
                                            .await;
                                    }
                                    let _ = out
                                        .send(Frame::Data {
                                            id,
                                            fin: true,
                                            data: vec![],
                                        })
                                        .await;
                                }
                            }
                        });
                    }
                    _ => {}
                }
            }
            Frame::Data { id, data, .. } => {
                if let Some(tx) = data_streams.get(&id) {
                    if !data.is_empty() {
                        let _ = tx.send(data).await;
                    }
                }
            }
            Frame::Ping { id } => {
                let _ = conn.out.send(Frame::Ping { id }).await;
            }
            Frame::GoAway => break,
            _ => {}
        }
    }
    Ok(())
}
