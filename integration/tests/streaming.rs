//! Exec, attach and port-forward through the streaming server with a real
//! WebSocket client speaking the Kubernetes channel protocols.

use futures::{SinkExt, StreamExt};
use imacri_integration::client::start_container;
use imacri_integration::{container_config, cri, Env, Imacri};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

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

/// Reads frames until the server closes: (stdout, stderr, status).
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

#[tokio::test(flavor = "multi_thread")]
async fn exec_attach_and_port_forward_over_websocket() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "streaming").await;
    let web = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "web",
            &env.busybox,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo forwarded > /www/index.html && httpd -f -p 8080 -h /www",
            ],
        ),
    )
    .await;

    // Exec without TTY: stdout, stderr and the exit status (v4 JSON status).
    for proto in ["v4.channel.k8s.io", "v5.channel.k8s.io"] {
        let url = rt
            .exec(cri::ExecRequest {
                container_id: web.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo out; echo err >&2; exit 3".into(),
                ],
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&url, proto).await;
        let (out, err, status) = collect(&mut ws).await;
        assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"), "{proto}");
        let st: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(st["reason"], "NonZeroExitCode", "{status}");
        assert_eq!(st["details"]["causes"][0]["message"], "3");
        // Tokens are single-use.
        let mut req = url
            .replace("http://", "ws://")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", proto.parse().unwrap());
        assert!(tokio_tungstenite::connect_async(req).await.is_err());
    }

    // Exec with stdin (v5 closes stdin with the close signal) and success status.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["cat".into()],
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = connect(&url, "v5.channel.k8s.io").await;
    ws.send(Message::Binary(
        [&[0u8][..], b"hello stdin\n"].concat().into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Binary(vec![255u8, 0].into()))
        .await
        .unwrap();
    let (out, _, status) = collect(&mut ws).await;
    assert_eq!(out, "hello stdin\n");
    assert!(status.contains("\"Success\""), "{status}");

    // Exec with a TTY, with a resize message.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 0.3; tty".into()],
            tty: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = connect(&url, "v4.channel.k8s.io").await;
    ws.send(Message::Binary(
        [&[4u8][..], br#"{"Width":100,"Height":40}"#]
            .concat()
            .into(),
    ))
    .await
    .unwrap();
    let (out, _, _) = collect(&mut ws).await;
    assert!(out.contains("/dev/pts/"), "{out:?}");

    // Bad requests are rejected before a URL exists.
    let e = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["true".into()],
            tty: true,
            stderr: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Attach to a container's stdin/stdout.
    let mut echo = container_config("echo", &env.busybox, &["cat"]);
    echo.stdin = true;
    let echo = start_container(&mut rt, &pod, &cfg, echo).await;
    let url = rt
        .attach(cri::AttachRequest {
            container_id: echo.clone(),
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = connect(&url, "v5.channel.k8s.io").await;
    ws.send(Message::Binary([&[0u8][..], b"attached\n"].concat().into()))
        .await
        .unwrap();
    let got = stdout_until(&mut ws, b"attached\n").await;
    assert_eq!(String::from_utf8_lossy(&got), "attached\n");
    drop(ws);

    // A tty and stdin the container was not created with are not refused
    // (as in containerd: `kubectl attach -it` to a plain container): its
    // output comes.
    let ticker = container_config(
        "ticker",
        &env.busybox,
        &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
    );
    let ticker = start_container(&mut rt, &pod, &cfg, ticker).await;
    let url = rt
        .attach(cri::AttachRequest {
            container_id: ticker.clone(),
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = connect(&url, "v5.channel.k8s.io").await;
    let got = stdout_until(&mut ws, b"tick\n").await;
    assert!(
        got.ends_with(b"tick\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(ws);

    // As containerd, a request naming ports no stream can use is not
    // refused (each stream names its port; one that cannot be reached
    // fails on its error stream).
    rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.clone(),
        port: vec![0, 70000],
    })
    .await
    .unwrap();

    // Port-forward into the pod's network namespace (loopback there).
    let mut fetched = String::new();
    for _ in 0..30 {
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&format!("{url}?port=8080"), "v4.channel.k8s.io").await;
        // The server announces the port on the data and the error channel.
        for ch in [0u8, 1] {
            let m = ws.next().await.unwrap().unwrap();
            assert_eq!(m, Message::Binary(vec![ch, 0x90, 0x1f].into()));
        }
        ws.send(Message::Binary(
            [&[0u8][..], b"GET / HTTP/1.0\r\n\r\n"].concat().into(),
        ))
        .await
        .unwrap();
        let mut body = Vec::new();
        while let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        {
            if b.first() == Some(&0) {
                body.extend_from_slice(&b[1..]);
            }
            if b.first() == Some(&1) {
                break; // error channel: httpd not listening yet
            }
        }
        fetched = String::from_utf8_lossy(&body).into_owned();
        if fetched.contains("forwarded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fetched.contains("forwarded"), "{fetched:?}");

    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn exec_and_port_forward_over_spdy() {
    use imacri_cri::streaming::spdy::Frame;
    use spdy_client::{syn, Client};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "spdy").await;
    let web = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "web",
            &env.busybox,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo over-spdy > /www/index.html && httpd -f -p 8080 -h /www",
            ],
        ),
    )
    .await;

    let url = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "read x; echo got-$x; echo oops >&2; exit 4".into(),
            ],
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let (mut c, head) = Client::upgrade(&url, "v4.channel.k8s.io").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    c.send(syn(1, &[("streamtype", "error")])).await;
    c.send(syn(3, &[("streamtype", "stdin")])).await;
    c.send(syn(5, &[("streamtype", "stdout")])).await;
    c.send(syn(7, &[("streamtype", "stderr")])).await;
    c.send(Frame::Data {
        id: 3,
        fin: true,
        data: b"spdy\n".to_vec(),
    })
    .await;
    let data = c.collect(&[1, 5, 7]).await;
    assert_eq!(String::from_utf8_lossy(&data[&5]), "got-spdy\n");
    assert_eq!(String::from_utf8_lossy(&data[&7]), "oops\n");
    let status: serde_json::Value = serde_json::from_slice(&data[&1]).unwrap();
    assert_eq!(status["details"]["causes"][0]["message"], "4", "{status}");

    // TTY over SPDY: one output stream, a resize stream, status on error.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 0.3; tty".into()],
            tty: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let (mut c, _) = Client::upgrade(&url, "v4.channel.k8s.io").await;
    c.send(syn(1, &[("streamtype", "error")])).await;
    c.send(syn(3, &[("streamtype", "stdout")])).await;
    c.send(syn(5, &[("streamtype", "resize")])).await;
    c.send(Frame::Data {
        id: 5,
        fin: false,
        data: br#"{"Width":80,"Height":24}"#.to_vec(),
    })
    .await;
    let data = c.collect(&[1, 3]).await;
    assert!(
        String::from_utf8_lossy(&data[&3]).contains("/dev/pts/"),
        "{data:?}"
    );
    assert!(
        String::from_utf8_lossy(&data[&1]).contains("Success"),
        "{data:?}"
    );

    let mut body = String::new();
    for _ in 0..30 {
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let (mut c, head) = Client::upgrade(&url, "portforward.k8s.io").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c.send(syn(
            1,
            &[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0"),
            ],
        ))
        .await;
        c.send(syn(
            3,
            &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
        ))
        .await;
        c.send(Frame::Data {
            id: 3,
            fin: false,
            data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        })
        .await;
        let data = c.collect(&[3]).await;
        body = String::from_utf8_lossy(data.get(&3).map(|v| v.as_slice()).unwrap_or_default())
            .into_owned();
        if body.contains("over-spdy") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(body.contains("over-spdy"), "{body:?}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_tunneled_spdy_over_websocket() {
    use imacri_cri::streaming::spdy::{Codec, Frame};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "tunnel").await;
    start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "web",
            &env.busybox,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo tunneled > /www/index.html && httpd -f -p 8080 -h /www",
            ],
        ),
    )
    .await;
    let mut body = String::new();
    for _ in 0..30 {
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let mut ws = connect(&url, "SPDY/3.1+portforward.k8s.io").await;
        let (mut tx, mut rx) = (Codec::default(), Codec::default());
        let syn = |id: u32, t: &str| Frame::SynStream {
            id,
            headers: vec![
                ("streamtype".into(), t.into()),
                ("port".into(), "8080".into()),
                ("requestid".into(), "0".into()),
            ],
            fin: false,
        };
        for f in [
            syn(1, "error"),
            syn(3, "data"),
            Frame::Data {
                id: 3,
                fin: false,
                data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            },
        ] {
            ws.send(Message::Binary(tx.encode(&f).unwrap().into()))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        'read: while let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        {
            let mut r = &b[..];
            while let Ok(Some(f)) = rx.read(&mut r).await {
                if let Frame::Data { id: 3, fin, data } = f {
                    got.extend(data);
                    if fin {
                        break 'read;
                    }
                }
            }
        }
        body = String::from_utf8_lossy(&got).into_owned();
        if body.contains("tunneled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(body.contains("tunneled"), "{body:?}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

async fn go_run(go: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(go);
    cmd.args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Runs the Go client and parses its JSON result (panics with its stderr).
async fn go_json(go: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = go_run(go, args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Interop with a real SPDY peer: moby/spdystream (Go), the library kubelet's
/// and client-go's remotecommand run on, with its own framer and zlib
/// dictionary. Exec (stdin, stdout, stderr, exit code), exec with a TTY and
/// a resize, attach and port-forward.
#[tokio::test(flavor = "multi_thread")]
async fn exec_with_go_spdystream_client() {
    let env = Env::get();
    let go = imacri_integration::go_spdyexec(env).unwrap();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "gospdy").await;
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "app",
            &env.busybox,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo via-spdystream > /www/index.html && httpd -f -p 8080 -h /www",
            ],
        ),
    )
    .await;
    let url = rt
        .exec(cri::ExecRequest {
            container_id: c.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat; echo to-stderr >&2; exit 3".into(),
            ],
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let r = go_json(&go, &[&url, "hello from go\n"]).await;
    assert_eq!(r["protocol"], "v4.channel.k8s.io", "{r}");
    assert_eq!(r["stdout"], "hello from go\n", "{r}");
    assert_eq!(r["stderr"], "to-stderr\n", "{r}");
    let status: serde_json::Value = serde_json::from_str(r["status"].as_str().unwrap()).unwrap();
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");

    // A TTY, resized before the command asks for its size.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: c.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 1; stty size".into()],
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let r = go_json(&go, &["-tty", &url, "123", "45"]).await;
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "45 123", "{r}");

    // Attach to a container's stdin and output; half-closing stdin ends it.
    let mut reader = container_config(
        "reader",
        &env.busybox,
        &["sh", "-c", "read x; echo got-$x; echo bye >&2"],
    );
    reader.stdin = true;
    reader.stdin_once = true;
    let reader = start_container(&mut rt, &pod, &cfg, reader).await;
    let url = rt
        .attach(cri::AttachRequest {
            container_id: reader.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let r = go_json(&go, &[&url, "attached\n"]).await;
    assert_eq!(r["stdout"], "got-attached\n", "{r}");
    assert_eq!(r["stderr"], "bye\n", "{r}");

    // Port-forward (portforward.k8s.io: error and data stream per request).
    let mut body = String::new();
    for _ in 0..50 {
        // A new URL each time: tokens are single-use.
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        let out = go_run(
            &go,
            &[
                "-portforward",
                &url,
                "8080",
                "GET /index.html HTTP/1.0\r\n\r\n",
            ],
        )
        .await;
        body = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if body.contains("via-spdystream") {
            break;
        }
        // httpd may not listen yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("200 OK") && body.contains("via-spdystream"),
        "{body}"
    );
}
