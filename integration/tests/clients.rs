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

/// What an operator runs against a node with crictl, each parsed as crictl
/// prints it: inspect/inspectp/inspecti (crictl decodes the verbose `info`
/// map as JSON), logs (read by crictl itself from the CRI log file, tail
/// included), stats/statsp/metricsp, a TTY exec (`exec -it` under a pty),
/// attach, port-forward, update of a running container's memory limit,
/// events, imagefsinfo, runtime-config and rmi; inspectp of an ima pod
/// shows its measurement.
#[tokio::test(flavor = "multi_thread")]
async fn crictl_operator_commands_work() {
    use std::io::{Read, Write};
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let d = Imacri::start(env).await.unwrap();
    let crictl = critest::crictl(&cache);
    let ep = format!("unix://{}", d.socket.display());
    let ctl = crictl_at(&crictl, &ep);
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let json = |s: &str| -> serde_json::Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("crictl printed no JSON ({e}): {s}"))
    };
    let write = |name: &str, v: serde_json::Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p.to_string_lossy().into_owned()
    };
    ctl(&["pull", &env.busybox]);
    let uid = format!("crictl-ops-{}", std::process::id());
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = write(
        "pod.json",
        serde_json::json!({
            "metadata": {"name": "crictl-ops", "namespace": "default", "uid": uid},
            "hostname": "ops",
            "log_directory": logs,
            "port_mappings": [{"container_port": 8080}],
            "linux": {}
        }),
    );
    let pod_id = ctl(&["runp", &pod]);
    // `crictl events` (GetContainerEvents) from before the containers exist.
    let events = Command::new(&crictl)
        .args(["--runtime-endpoint", &ep, "events", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let web = write(
        "web.json",
        serde_json::json!({
            "metadata": {"name": "web"},
            "image": {"image": env.busybox},
            "command": ["sh", "-c",
                "mkdir -p /www && echo served-through-port-forward > /www/index.html && \
                 echo first line && sleep 0.3 && echo second line >&2 && exec httpd -f -p 8080 -h /www"],
            "log_path": "web.log",
            "linux": {}
        }),
    );
    let cid = ctl(&["create", &pod_id, &web, &pod]);
    ctl(&["start", &cid]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut log = String::new();
    while std::time::Instant::now() < deadline && !log.contains("second line") {
        // crictl replays each stream on its own: stderr lines on stderr.
        log = text(&run(Command::new(&crictl).args([
            "--runtime-endpoint",
            &ep,
            "logs",
            &cid,
        ])));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        log.contains("first line") && log.contains("second line"),
        "{log}"
    );
    let last = text(&run(Command::new(&crictl).args([
        "--runtime-endpoint",
        &ep,
        "logs",
        "--tail",
        "1",
        &cid,
    ])));
    assert!(
        last.starts_with("\n") && last.contains("second line") && !last.contains("first line"),
        "{last}"
    );

    let c = json(&ctl(&["inspect", "-o", "json", &cid]));
    assert_eq!(c["status"]["state"], "CONTAINER_RUNNING", "{c}");
    assert!(c["info"]["pid"].as_u64().unwrap_or(0) > 0, "{c}");
    let p = json(&ctl(&["inspectp", "-o", "json", &pod_id]));
    assert_eq!(p["status"]["state"], "SANDBOX_READY", "{p}");
    assert!(
        p["status"]["network"]["ip"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty()),
        "{p}"
    );
    let i = json(&ctl(&["inspecti", "-o", "json", &env.busybox]));
    assert!(
        i["status"]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("sha256:")),
        "{i}"
    );

    let s = json(&ctl(&["stats", "-o", "json", &cid]));
    assert_eq!(s["stats"][0]["attributes"]["id"], cid.as_str(), "{s}");
    let sp = json(&ctl(&["statsp", "-o", "json", "--id", &pod_id]));
    assert_eq!(sp["stats"][0]["attributes"]["id"], pod_id.as_str(), "{sp}");
    let m = ctl(&["metricsp", "-o", "json"]);
    assert!(m.contains(&pod_id), "metricsp names no pod: {m}");
    json(&ctl(&["imagefsinfo", "-o", "json"]));
    let rc = ctl(&["runtime-config"]);
    assert!(rc.to_lowercase().contains("cgroup"), "runtime-config: {rc}");

    // A TTY exec as an operator types it: crictl wants a terminal.
    let o = run(Command::new("script").args([
        "-qec",
        &format!(
            "{} --runtime-endpoint {ep} exec -it {cid} sh -c 'tty; hostname'",
            crictl.display()
        ),
        "/dev/null",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("/dev/pts/") && t.contains("ops"), "{t}");

    // Port-forward through crictl's SPDY client to httpd in the pod.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut pf = Command::new(&crictl)
        .args(["--runtime-endpoint", &ep, "port-forward", &pod_id])
        .arg(format!("{port}:8080"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = s.read_to_string(&mut body);
            if body.contains("served-through-port-forward") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = pf.kill();
    let _ = pf.wait();
    assert!(body.contains("served-through-port-forward"), "{body}");

    // update: the running container's cgroup takes the new limit.
    ctl(&["update", "--memory", "67108864", &cid]);
    let limit = ctl(&[
        "exec",
        &cid,
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
    ]);
    assert_eq!(limit, "67108864");
    let c = json(&ctl(&["inspect", "-o", "json", &cid]));
    assert_eq!(
        c["status"]["resources"]["linux"]["memoryLimitInBytes"], "67108864",
        "{c}"
    );

    // attach: a container reading stdin echoes what crictl sends it.
    let cat = write(
        "cat.json",
        serde_json::json!({
            "metadata": {"name": "cat"},
            "image": {"image": env.busybox},
            "command": ["cat"],
            "stdin": true,
            "log_path": "cat.log",
            "linux": {}
        }),
    );
    let cat_id = ctl(&["create", &pod_id, &cat, &pod]);
    ctl(&["start", &cat_id]);
    let mut att = Command::new(&crictl)
        .args(["--runtime-endpoint", &ep, "attach", "-i", &cat_id])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    att.stdin
        .as_mut()
        .unwrap()
        .write_all(b"through attach\n")
        .unwrap();
    let mut out = att.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(14).any(|w| w == b"through attach") {
                break;
            }
        }
        let _ = tx.send(got);
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_default();
    let _ = att.kill();
    let _ = att.wait();
    assert!(
        String::from_utf8_lossy(&got).contains("through attach"),
        "attach: {:?}",
        String::from_utf8_lossy(&got)
    );

    ctl(&["stop", &cid]);
    ctl(&["stopp", &pod_id]);
    ctl(&["rmp", &pod_id]);
    // The events crictl streamed: the web container's life, in order.
    let mut events = events;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = events.kill();
    let mut ev = String::new();
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut ev)
        .unwrap();
    let kinds: Vec<String> = serde_json::Deserializer::from_str(&ev)
        .into_iter::<serde_json::Value>()
        .filter_map(|v| v.ok())
        .filter(|v| v["containerId"] == cid.as_str())
        .filter_map(|v| v["containerEventType"].as_str().map(String::from))
        .collect();
    let _ = events.wait();
    assert_eq!(
        kinds,
        [
            "CONTAINER_CREATED_EVENT",
            "CONTAINER_STARTED_EVENT",
            "CONTAINER_STOPPED_EVENT",
            "CONTAINER_DELETED_EVENT"
        ],
        "crictl events: {ev}"
    );

    // An ima pod's measurement, as `crictl inspectp` shows it.
    let ima_pod = write(
        "ima.json",
        serde_json::json!({
            "metadata": {"name": "crictl-ima", "namespace": "default",
                          "uid": format!("{uid}-ima")},
            "annotations": {"imacri.dev/ima": "true"},
            "linux": {}
        }),
    );
    let ima_id = ctl(&["runp", &ima_pod]);
    let p = json(&ctl(&["inspectp", "-o", "json", &ima_id]));
    let ima = &p["info"]["ima"];
    assert_eq!(ima["enabled"], true, "{p}");
    assert!(
        ima["backend"].as_str().is_some_and(|b| !b.is_empty()),
        "{p}"
    );
    ctl(&["stopp", &ima_id]);
    ctl(&["rmp", &ima_id]);

    // rmi of an image of this test's own (a file no other image has).
    let mut def = imacri_integration::images::busybox();
    def.files
        .push(("etc/crictl-rmi".into(), uid.clone().into_bytes(), 0o644));
    let image = format!("{}/test/crictl-rmi-{}:1", env.registry, std::process::id());
    imacri_integration::images::build_and_push(&env.base, &def, &image, None).unwrap();
    ctl(&["pull", &image]);
    let id = json(&ctl(&["inspecti", "-o", "json", &image]))["status"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ctl(&["rmi", &image]);
    assert!(!ctl(&["images", "-q"]).contains(&id), "{id} still listed");
}
