//! imacri driven by the clients users have, not only by our own: grpc-go
//! (kubelet's and crictl's gRPC stack) with each :authority a local client
//! sends, Python grpcio (gRPC C-core), and crictl itself.

use imacri_integration::{critest, peers, Env, Imacri};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running client")
}

/// crictl against `ep`: runs it, asserts success, returns its stdout.
fn crictl_at<'a>(crictl: &'a std::path::Path, ep: &'a str) -> impl Fn(&[&str]) -> String + 'a {
    move |args: &[&str]| {
        let o = run(Command::new(crictl)
            .arg("--runtime-endpoint")
            .arg(ep)
            .arg("--image-endpoint")
            .arg(ep)
            .arg("--timeout=60s")
            .args(args));
        let t = text(&o);
        assert!(o.status.success(), "crictl {args:?}: {t}");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_with_every_local_authority() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let bin = peers::criclient(env).unwrap();
    let sock = d.socket.to_string_lossy().into_owned();
    let encoded = sock.replace('/', "%2F");
    // grpc C-core's form: %-encoded, without the leading slash.
    let core = sock.trim_start_matches('/').replace('/', "%2F");
    // "" = grpc-go's own default ("localhost" since 1.56).
    for authority in [
        "",
        sock.as_str(),
        encoded.as_str(),
        core.as_str(),
        "localhost",
        "unix:///x.sock",
    ] {
        let o = run(Command::new(&bin)
            .arg("-socket")
            .arg(&sock)
            .arg("-authority")
            .arg(authority)
            .arg("-pod"));
        let t = text(&o);
        assert!(o.status.success(), "authority {authority:?}: {t}");
        assert!(t.contains("version imacri"), "{t}");
        assert!(t.contains("SANDBOX_READY"), "{t}");
    }
    // Still HTTP/2 as it should be: a malformed authority that is no socket
    // address is refused.
    let o = run(Command::new(&bin)
        .arg("-socket")
        .arg(&sock)
        .arg("-authority")
        .arg("bad host"));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("PROTOCOL_ERROR"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_with_its_default_authority() {
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let d = Imacri::start(env).await.unwrap();
    let py = peers::grpcio_python(&cache);
    for extra in [&[][..], &["--authority", "localhost"][..]] {
        let o = run(Command::new(&py)
            .arg(peers::py_client())
            .arg(&d.socket)
            .args(extra));
        let t = text(&o);
        assert!(o.status.success(), "grpcio {extra:?}: {t}");
        assert!(t.contains("version imacri"), "{t}");
        assert!(t.lines().any(|l| l == "ok"), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crictl_runs_a_pod_from_its_own_example_config() {
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let d = Imacri::start(env).await.unwrap();
    let crictl = critest::crictl(&cache);
    let ep = format!("unix://{}", d.socket.display());
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let ctl = crictl_at(&crictl, &ep);
    let v = ctl(&["version"]);
    assert!(v.contains("RuntimeName:  imacri"), "{v}");
    let info = ctl(&["info"]);
    assert!(info.contains("RuntimeReady"), "{info}");
    ctl(&["pull", &env.busybox]);
    assert!(ctl(&["images", "-q"]).contains("sha256:"));
    // crictl's documented pod-config.json: no hostname, no log directory.
    let pod = dir.path().join("pod.json");
    std::fs::write(
        &pod,
        serde_json::json!({
            "metadata": {"name": "crictl-sandbox", "namespace": "default",
                          "attempt": 1, "uid": format!("crictl-{}", std::process::id())},
            "linux": {}
        })
        .to_string(),
    )
    .unwrap();
    let ctr = dir.path().join("ctr.json");
    std::fs::write(
        &ctr,
        serde_json::json!({
            "metadata": {"name": "busybox"},
            "image": {"image": env.busybox},
            "command": ["sleep", "600"],
            "linux": {}
        })
        .to_string(),
    )
    .unwrap();
    let pod_id = ctl(&["runp", pod.to_str().unwrap()]);
    let cid = ctl(&[
        "create",
        &pod_id,
        ctr.to_str().unwrap(),
        pod.to_str().unwrap(),
    ]);
    ctl(&["start", &cid]);
    assert!(ctl(&["ps", "-q"]).contains(&cid));
    let out = ctl(&["exec", &cid, "sh", "-c", "echo hello from $(hostname)"]);
    let node = nix::unistd::gethostname().unwrap();
    assert_eq!(out, format!("hello from {}", node.to_string_lossy()));
    // Streaming exec with stdin through crictl's own SPDY client.
    let o = run(Command::new(&crictl)
        .arg("--runtime-endpoint")
        .arg(&ep)
        .args(["exec", "-i", &cid, "cat"])
        .stdin(std::fs::File::open(&pod).unwrap()));
    assert!(text(&o).contains("crictl-sandbox"), "{}", text(&o));
    ctl(&["stop", &cid]);
    ctl(&["rm", &cid]);
    ctl(&["stopp", &pod_id]);
    ctl(&["rmp", &pod_id]);
    // Idempotent stops of what is gone, as on containerd.
    ctl(&["stopp", &pod_id]);
    assert!(ctl(&["pods", "-q"]).is_empty());
}

/// What a current kubelet sends, through crictl's own Go types and JSON:
/// a CDI device, ambient capabilities, and a debug container joining a
/// target's pid namespace.
#[tokio::test(flavor = "multi_thread")]
async fn crictl_sends_cdi_ambient_caps_and_debug_targets() {
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let cdi = dir.path().join("cdi");
    std::fs::create_dir_all(&cdi).unwrap();
    std::fs::write(
        cdi.join("test.yaml"),
        "cdiVersion: \"0.6.0\"\nkind: imacri.test/crictl\ndevices:\n  - name: null\n    containerEdits:\n      env: [\"FROM_CDI=yes\"]\n      deviceNodes:\n        - path: /dev/cdinull\n          hostPath: /dev/null\n",
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--cdi-spec-dir", cdi.to_str().unwrap()])
        .await
        .unwrap();
    let crictl = critest::crictl(&cache);
    let ep = format!("unix://{}", d.socket.display());
    let ctl = crictl_at(&crictl, &ep);
    ctl(&["pull", &env.busybox]);
    let write = |name: &str, v: serde_json::Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p.to_string_lossy().into_owned()
    };
    let pod = write(
        "pod.json",
        serde_json::json!({
            "metadata": {"name": "crictl-fields", "namespace": "default",
                          "uid": format!("crictl-fields-{}", std::process::id())},
            "linux": {}
        }),
    );
    let pod_id = ctl(&["runp", &pod]);
    let start = |name: &str, v: serde_json::Value| {
        let c = write(name, v);
        let id = ctl(&["create", &pod_id, &c, &pod]);
        ctl(&["start", &id]);
        id
    };
    let device = start(
        "device.json",
        serde_json::json!({
            "metadata": {"name": "device"},
            "image": {"image": env.busybox},
            "command": ["sleep", "600"],
            "CDI_devices": [{"name": "imacri.test/crictl=null"}],
            "linux": {"security_context": {
                "run_as_user": {"value": 1000},
                "capabilities": {"drop_capabilities": ["ALL"],
                                 "add_ambient_capabilities": ["NET_BIND_SERVICE"]}
            }}
        }),
    );
    let out = ctl(&[
        "exec",
        &device,
        "sh",
        "-c",
        "echo x > /dev/cdinull && echo $FROM_CDI; grep CapAmb /proc/self/status",
    ]);
    assert_eq!(out, "yes\nCapAmb:\t0000000000000400", "{out}");
    let target = start(
        "target.json",
        serde_json::json!({
            "metadata": {"name": "target"},
            "image": {"image": env.busybox},
            "command": ["sleep", "4343"],
            "linux": {"security_context": {"namespace_options": {"pid": 1}}}
        }),
    );
    let debug = start(
        "debug.json",
        serde_json::json!({
            "metadata": {"name": "debug"},
            "image": {"image": env.busybox},
            "command": ["sleep", "600"],
            "linux": {"security_context": {"namespace_options": {"pid": 3, "target_id": target}}}
        }),
    );
    let ps = ctl(&[
        "exec",
        &debug,
        "sh",
        "-c",
        "ps -o args | grep -c '^sleep 4343'",
    ]);
    assert_eq!(ps, "1");
    ctl(&["stopp", &pod_id]);
    ctl(&["rmp", &pod_id]);
}
