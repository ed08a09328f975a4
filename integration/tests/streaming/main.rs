//! Exec, attach and port-forward through the streaming server with a real
//! WebSocket client speaking the Kubernetes channel protocols.

use futures::{SinkExt, StreamExt};
use imacri_integration::client::start_container;
use imacri_integration::{container_config, cri, Env, Imacri};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod spdy;
mod websocket;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, protocol: &str) -> Ws {
    let mut req = url
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], protocol);
    ws
}

/// What a v5 channel stream's stdout (channel 1) carries until it ends with
/// `end` (or 10 s pass with nothing new).
async fn stdout_until(ws: &mut Ws, end: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while let Ok(Some(Ok(Message::Binary(b)))) =
        tokio::time::timeout(Duration::from_secs(10), ws.next()).await
    {
        if b.first() == Some(&1) {
            got.extend_from_slice(&b[1..]);
            if got.ends_with(end) {
                break;
            }
        }
    }
    got
}

/// imacri with a busybox pod `name` whose container serves `page` as
/// `/index.html` on port 8080 (busybox httpd): the daemon, its runtime
/// client, the pod, its config and the container.
async fn web_pod(
    env: &Env,
    name: &str,
    page: &str,
) -> (Imacri, Rt, String, cri::PodSandboxConfig, String) {
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, name).await;
    let serve =
        format!("mkdir -p /www && echo {page} > /www/index.html && httpd -f -p 8080 -h /www");
    let web = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("web", &env.busybox, &["sh", "-c", &serve]),
    )
    .await;
    (d, rt, pod, cfg, web)
}

type Rt = imacri_integration::client::Rt;

/// The streaming URL imacri answers an Exec with.
async fn exec_url(rt: &mut Rt, req: cri::ExecRequest) -> String {
    rt.exec(req).await.unwrap().into_inner().url
}

/// The streaming URL imacri answers an Attach with.
async fn attach_url(rt: &mut Rt, req: cri::AttachRequest) -> String {
    rt.attach(req).await.unwrap().into_inner().url
}

/// The streaming URL imacri answers a PortForward with.
async fn forward_url(rt: &mut Rt, req: cri::PortForwardRequest) -> String {
    rt.port_forward(req).await.unwrap().into_inner().url
}

/// Reads frames until the server closes: (stdout, stderr, status).
async fn collect(ws: &mut Ws) -> (String, String, String) {
    let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), Vec::new());
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        match m {
            Message::Binary(b) if !b.is_empty() => match b[0] {
                1 => out.extend_from_slice(&b[1..]),
                2 => err.extend_from_slice(&b[1..]),
                3 => status.extend_from_slice(&b[1..]),
                _ => {}
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    let s = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    (s(out), s(err), s(status))
}

/// A minimal SPDY/3.1 client over imacri's own framing (the server side is
/// what is under test): upgrade, open streams, collect data per stream.
mod spdy_client {
    use imacri_cri::streaming::spdy::{Codec, Frame};
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Client {
        s: TcpStream,
        tx: Codec,
        rx: Codec,
    }

    impl Client {
        pub async fn upgrade(url: &str, protocol: &str) -> (Client, String) {
            let rest = url.trim_start_matches("http://");
            let (hostport, path) = rest.split_once('/').unwrap();
            let mut s = TcpStream::connect(hostport).await.unwrap();
            let req = format!(
                "POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            (
                Client {
                    s,
                    tx: Codec::default(),
                    rx: Codec::default(),
                },
                head,
            )
        }

        pub async fn send(&mut self, f: Frame) {
            let b = self.tx.encode(&f).unwrap();
            self.s.write_all(&b).await.unwrap();
        }

        /// Data per stream until every stream in `until` has FIN (or GOAWAY).
        pub async fn collect(&mut self, until: &[u32]) -> HashMap<u32, Vec<u8>> {
            let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
            let mut done = Vec::new();
            while !until.iter().all(|id| done.contains(id)) {
                let f = tokio::time::timeout(
                    std::time::Duration::from_secs(20),
                    self.rx.read(&mut self.s),
                )
                .await
                .expect("frame")
                .unwrap();
                match f {
                    Some(Frame::Data { id, fin, data: d }) => {
                        data.entry(id).or_default().extend(d);
                        if fin {
                            done.push(id);
                        }
                    }
                    Some(Frame::GoAway) | None => break,
                    _ => {}
                }
            }
            data
        }
    }

    pub fn syn(id: u32, headers: &[(&str, &str)]) -> Frame {
        Frame::SynStream {
            id,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fin: false,
        }
    }
}
