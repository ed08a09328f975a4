//! The WebSocket transport: Kubernetes' channel protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and the
//! base64 variants) for exec and attach, port-forward's data/error channel
//! pairs, and SPDY tunneled in WebSocket messages for newer port-forward
//! clients. Framing comes from tokio-tungstenite; the channels are ours.

use base64::Engine;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use imacri_api::cri;
use imacri_runtime::{Error, Result};
use std::sync::Weak;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::session::{self, ChanRx, ChanTx, Channels, In};
use super::{header, reply, Pending, StreamRuntime, CLOSE, ERROR, STDIN};

pub(crate) type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

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

impl Channels {
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
}

struct WsRx {
    s: SplitStream<Ws>,
    ch: Channels,
}

struct WsTx {
    s: SplitSink<Ws, Message>,
    ch: Channels,
}

#[tonic::async_trait]
impl ChanRx for WsRx {
    async fn recv(&mut self) -> Option<In> {
        loop {
            match self.s.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(m)) => match self.ch.decode(&m) {
                    Some((CLOSE, d)) if self.ch.v5 && d.first() == Some(&STDIN) => {
                        return Some(In::CloseStdin)
                    }
                    Some((c, d)) => return Some(In::Data(c, d)),
                    None => continue,
                },
            }
        }
    }
}

#[tonic::async_trait]
impl ChanTx for WsTx {
    async fn send(&mut self, ch: u8, data: &[u8]) -> Result<()> {
        self.s
            .send(self.ch.encode(ch, data))
            .await
            .map_err(|e| Error::Internal(format!("websocket: {e}")))
    }

    async fn finish(&mut self, status: Option<Vec<u8>>) {
        if let Some(s) = status {
            let _ = self.s.send(self.ch.encode(ERROR, &s)).await;
        }
        let _ = self.s.send(Message::Close(None)).await;
    }
}

/// Answers a WebSocket upgrade for `pending` and runs the session.
pub(crate) fn upgrade(
    req: Request<Incoming>,
    pending: Pending,
    rt: Weak<dyn StreamRuntime>,
) -> Response<Full<Bytes>> {
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
        let Some(rt) = rt.upgrade() else {
            return;
        };
        let ch = Channels::new(&negotiated);
        let res = match pending {
            Pending::PortForward(r) if negotiated.starts_with("SPDY/3.1+") => {
                super::spdy_session::port_forward_tunneled(&*rt, r, ws).await
            }
            Pending::PortForward(r) => port_forward(&*rt, r, &query, ws, ch).await,
            other => {
                let (tx, rx) = ws.split();
                let mut rx = WsRx { s: rx, ch };
                let mut tx = WsTx { s: tx, ch };
                session::run(&*rt, other, &mut rx, &mut tx, ch).await
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

/// Port-forward over WebSocket channels: per `?port=`, a data channel (2i)
/// and an error channel (2i+1), each opened with the port number.
async fn port_forward(
    rt: &dyn StreamRuntime,
    r: cri::PortForwardRequest,
    query: &str,
    ws: Ws,
    ch: Channels,
) -> Result<()> {
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
        match rt.dial(&r.pod_sandbox_id, *port).await {
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
                let msg = format!(
                    "error forwarding port {port} to pod {}: {e}",
                    r.pod_sandbox_id
                );
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
    use super::super::{STDERR, STDOUT};
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
}
