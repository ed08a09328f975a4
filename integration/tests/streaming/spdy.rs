//! Exec and port-forward over SPDY, ours and Go's spdystream client.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn exec_and_port_forward_over_spdy() {
    use imacri_cri::streaming::spdy::Frame;
    use spdy_client::{syn, Client};
    let env = Env::get();
    let (_d, mut rt, pod, _, web) = web_pod(env, "spdy", "over-spdy").await;

    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
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
        },
    )
    .await;
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
        let url = forward_url(
            &mut rt,
            cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            },
        )
        .await;
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
    let (_d, mut rt, pod, cfg, c) = web_pod(env, "gospdy", "via-spdystream").await;
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
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
        },
    )
    .await;
    let r = go_json(&go, &[&url, "hello from go\n"]).await;
    assert_eq!(r["protocol"], "v4.channel.k8s.io", "{r}");
    assert_eq!(r["stdout"], "hello from go\n", "{r}");
    assert_eq!(r["stderr"], "to-stderr\n", "{r}");
    let status: serde_json::Value = serde_json::from_str(r["status"].as_str().unwrap()).unwrap();
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");

    // A TTY, resized before the command asks for its size.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: c.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 1; stty size".into()],
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        },
    )
    .await;
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
    let url = attach_url(
        &mut rt,
        cri::AttachRequest {
            container_id: reader.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await;
    let r = go_json(&go, &[&url, "attached\n"]).await;
    assert_eq!(r["stdout"], "got-attached\n", "{r}");
    assert_eq!(r["stderr"], "bye\n", "{r}");

    // Port-forward (portforward.k8s.io: error and data stream per request).
    let mut body = String::new();
    for _ in 0..50 {
        // A new URL each time: tokens are single-use.
        let url = forward_url(
            &mut rt,
            cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            },
        )
        .await;
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
