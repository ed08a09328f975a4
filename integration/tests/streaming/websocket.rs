//! Exec, attach and port-forward over WebSocket, and SPDY tunneled in it.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn exec_attach_and_port_forward_over_websocket() {
    let env = Env::get();
    let (_d, mut rt, pod, cfg, web) = web_pod(env, "streaming", "forwarded").await;

    // Exec without TTY: stdout, stderr and the exit status (v4 JSON status).
    for proto in ["v4.channel.k8s.io", "v5.channel.k8s.io"] {
        let url = exec_url(
            &mut rt,
            cri::ExecRequest {
                container_id: web.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo out; echo err >&2; exit 3".into(),
                ],
                stdout: true,
                stderr: true,
                ..Default::default()
            },
        )
        .await;
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
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["cat".into()],
            stdin: true,
            stdout: true,
            ..Default::default()
        },
    )
    .await;
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
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 0.3; tty".into()],
            tty: true,
            stdout: true,
            ..Default::default()
        },
    )
    .await;
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
    let url = attach_url(
        &mut rt,
        cri::AttachRequest {
            container_id: echo.clone(),
            stdin: true,
            stdout: true,
            ..Default::default()
        },
    )
    .await;
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
    let url = attach_url(
        &mut rt,
        cri::AttachRequest {
            container_id: ticker.clone(),
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        },
    )
    .await;
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
        let url = forward_url(
            &mut rt,
            cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            },
        )
        .await;
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

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_tunneled_spdy_over_websocket() {
    use imacri_cri::streaming::spdy::{Codec, Frame};
    let env = Env::get();
    let (_d, mut rt, pod, _, _) = web_pod(env, "tunnel", "tunneled").await;
    let mut body = String::new();
    for _ in 0..30 {
        let url = forward_url(
            &mut rt,
            cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            },
        )
        .await;
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
