//! A real kubelet (v1.37, built from k8s.io/kubernetes) with imacri as its
//! --container-runtime-endpoint, running static pods without an API server.
//! Everything is asserted through kubelet's own API (/pods, /containerLogs,
//! /exec, /portForward) and crictl.

use imacri_integration::kubelet::{eventually, Kubelet};
use imacri_integration::{attest, critest, peers, Env, Imacri, Swtpm};
use std::process::Command;
use std::time::Duration;

/// One kubelet at a time: they share the host's iptables canaries and sysctls.
static ONE_KUBELET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const T: Duration = Duration::from_secs(90);
/// kubelet removes a deleted pod's sandbox in its garbage collection, which
/// runs once a minute: allow two rounds and a loaded machine.
const GC_T: Duration = Duration::from_secs(180);

fn container_status<'a>(pod: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

fn ready(k: &Kubelet, pod: &str) -> Option<serde_json::Value> {
    let p = k.pod(pod)?;
    let conds = p["status"]["conditions"].as_array()?;
    conds
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
        .then_some(p)
}

fn crictl(cache: &std::path::Path, d: &Imacri, args: &[&str]) -> String {
    let ep = format!("unix://{}", d.socket.display());
    let o = Command::new(critest::crictl(cache))
        .args(["--runtime-endpoint", &ep, "--image-endpoint", &ep])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "crictl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Removes the manifests and waits until imacri has no pod left.
fn remove_and_wait(k: &Kubelet, cache: &std::path::Path, d: &Imacri, names: &[&str]) {
    for n in names {
        k.remove_manifest(n).unwrap();
    }
    eventually("pods gone from imacri", GC_T, || {
        crictl(cache, d, &["pods", "-q"])
            .trim()
            .is_empty()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.log_tail(4000)));
}

fn web_pod(env: &Env) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
spec:
  containers:
  - name: web
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-kubelet > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports:
    - containerPort: 8080
    readinessProbe:
      httpGet:
        path: /index.html
        port: 8080
      periodSeconds: 1
    livenessProbe:
      exec:
        command: ["sh", "-c", "test -f /www/index.html"]
      periodSeconds: 2
"#,
        img = env.busybox
    )
}

fn crash_pod(env: &Env) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: crash
  namespace: default
spec:
  restartPolicy: Always
  containers:
  - name: crash
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo run-$(cat /proc/sys/kernel/random/uuid); sleep 4; exit 3"]
"#,
        img = env.busybox
    )
}

/// A job-like pod whose init and main containers exit the moment they
/// start.
fn job_pod(env: &Env) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: job
  namespace: default
spec:
  restartPolicy: Never
  initContainers:
  - name: init
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["true"]
  containers:
  - name: main
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo job-done"]
"#,
        img = env.busybox
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_runs_static_pods_on_imacri() {
    let _one = ONE_KUBELET.lock().await;
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let d = Imacri::start_isolated(env).await.unwrap();
    let k = Kubelet::start(env, &d, &cache).unwrap();
    let client = peers::kubeletclient(env).unwrap();

    // Running and Ready through an HTTP readiness and an exec liveness probe.
    k.add_manifest("web", &web_pod(env)).unwrap();
    k.add_manifest("crash", &crash_pod(env)).unwrap();
    k.add_manifest("job", &job_pod(env)).unwrap();
    let web = eventually("web Ready", T, || ready(&k, "web"))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", k.log_tail(6000), d.log()));
    assert_eq!(web["status"]["phase"], "Running", "{web}");
    let ip = web["status"]["podIP"].as_str().unwrap().to_string();
    assert!(!ip.is_empty(), "{web}");

    // Containers that exit at once run to completion: the pod Succeeded,
    // each container Completed with exit code 0, the output logged.
    let job = eventually("job Succeeded", T, || {
        let p = k.pod("job")?;
        (p["status"]["phase"] == "Succeeded").then_some(p)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", k.log_tail(6000), d.log()));
    for (list, name) in [
        ("initContainerStatuses", "init"),
        ("containerStatuses", "main"),
    ] {
        let c = job["status"][list]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("{name}: {job}"));
        let t = &c["state"]["terminated"];
        assert_eq!(
            (t["exitCode"].as_i64(), t["reason"].as_str()),
            (Some(0), Some("Completed")),
            "{name}: {job}"
        );
    }
    let out = k
        .get("/containerLogs/default/job-imacri-test-node/main")
        .unwrap();
    assert_eq!(out.trim(), "job-done");

    // A crashing container is restarted by kubelet; the previous log is kept.
    let crash = eventually("crash restarted twice", Duration::from_secs(150), || {
        let p = k.pod("crash")?;
        let c = container_status(&p, "crash")?;
        // Running again after two crashes: the last crashed one is the
        // "previous" container kubelet keeps.
        let n = c["restartCount"].as_u64()?;
        (n >= 2 && c["state"]["running"].is_object()).then_some(p)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.log_tail(6000)));
    let last = &container_status(&crash, "crash").unwrap()["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 3, "{crash}");
    let now = k
        .get("/containerLogs/default/crash-imacri-test-node/crash")
        .unwrap();
    let prev = k
        .get("/containerLogs/default/crash-imacri-test-node/crash?previous=true")
        .unwrap();
    assert!(
        now.starts_with("run-") && prev.starts_with("run-"),
        "{now:?} {prev:?}"
    );
    assert_ne!(now, prev, "previous is another run's log");

    // exec through kubelet (client-go, WebSocket v5) and port-forward (SPDY).
    let exec_url = k.url(
        "/exec/default/web-imacri-test-node/web?command=sh&command=-c&command=echo%20in-%24(hostname)&output=1&error=1",
    );
    let o = Command::new(&client)
        .args(["exec", &exec_url])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A static pod is named after its node; kubelet gives that name as hostname.
    assert_eq!(out.trim(), "in-web-imacri-test-node");
    let pf_url = k.url("/portForward/default/web-imacri-test-node");
    let o = Command::new(&client)
        .args(["portforward", &pf_url, "8080"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("hello-from-kubelet"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // crictl sees the same pods kubelet made.
    let pods = crictl(&cache, &d, &["pods", "--state", "ready", "-o", "json"]);
    assert!(pods.contains("web-imacri-test-node"), "{pods}");
    // kubelet sends pid CONTAINER (no shareProcessNamespace): the pod runs
    // without pause, its hostname (checked by the exec above) set in the UTS
    // namespace imacri pinned.
    let web_id = crictl(
        &cache,
        &d,
        &["pods", "--name", "web-imacri-test-node", "-q"],
    );
    let p: serde_json::Value = serde_json::from_str(&crictl(
        &cache,
        &d,
        &["inspectp", "-o", "json", web_id.trim()],
    ))
    .unwrap();
    assert_eq!(p["info"]["infraContainer"], false, "{p}");

    // Removing the manifests stops and removes the pods: nothing is left in
    // containerd, no netns, no veth on the test bridge.
    k.remove_manifest("web").unwrap();
    k.remove_manifest("crash").unwrap();
    k.remove_manifest("job").unwrap();
    eventually("pods gone from kubelet", T, || {
        (k.pod("web").is_none() && k.pod("crash").is_none() && k.pod("job").is_none()).then_some(())
    })
    .unwrap();
    eventually("pods gone from imacri", GC_T, || {
        crictl(&cache, &d, &["pods", "-q"])
            .trim()
            .is_empty()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", k.log_tail(4000)));
    let mut left = env.all_objects(&d.namespace).await.unwrap();
    for _ in 0..60 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        left = env.all_objects(&d.namespace).await.unwrap();
    }
    assert!(left.is_empty(), "left in containerd: {left:?}");
    let netns = std::fs::read_dir(d.state.join("netns"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(netns, 0, "network namespaces left");
}

fn sleeper_pod(env: &Env, name: &str, extra_meta: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
{extra_meta}spec:
{extra_spec}  containers:
  - name: app
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
"#,
        img = env.busybox
    )
}

fn running(k: &Kubelet, pod: &str) -> Option<serde_json::Value> {
    let p = k.pod(pod)?;
    container_status(&p, "app")?["state"]["running"]
        .is_object()
        .then_some(p)
}

/// exec through kubelet's API, as the API server would.
fn kubelet_exec(client: &std::path::Path, k: &Kubelet, pod: &str, script: &str) -> (bool, String) {
    let q: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("command", "sh")
        .append_pair("command", "-c")
        .append_pair("command", script)
        .append_pair("output", "1")
        .append_pair("error", "1")
        .finish();
    let u = k.url(&format!("/exec/default/{pod}-imacri-test-node/app?{q}"));
    let o = Command::new(client).args(["exec", &u]).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_user_namespace_and_measured_pods() {
    let _one = ONE_KUBELET.lock().await;
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let tpm = Swtpm::start(env).unwrap();
    let tcti = tpm.tcti();
    let ns = format!("iso-{:08x}", rand::random::<u32>());
    let vols = "[ima.policies.default]\n[ima.policies.vols]\nvolumes = \"measure\"\n";
    let d = Imacri::start_configured(env, &ns, &["--tpm-tcti", &tcti], vols)
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    assert_eq!(attest(&d, &["ak", "--out", ak.to_str().unwrap()]).0, 0);
    let (code, _, err) = attest(
        &d,
        &["golden", &env.busybox, "--out", golden.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let k = Kubelet::start(env, &d, &cache).unwrap();
    let client = peers::kubeletclient(env).unwrap();

    // hostUsers: false -> the pod runs in its own user namespace with the
    // mappings kubelet chose.
    k.add_manifest(
        "userns",
        &sleeper_pod(env, "userns", "", "  hostUsers: false\n"),
    )
    .unwrap();
    // The imacri.dev/ima annotation, as an unmodified kubelet passes it.
    k.add_manifest(
        "measured",
        &sleeper_pod(
            env,
            "measured",
            "  annotations:\n    imacri.dev/ima: \"true\"\n",
            "",
        ),
    )
    .unwrap();
    // The init-container pattern with a disk-backed emptyDir, under a
    // policy that measures the pod's own volumes: kubelet makes the
    // volume's directory, the init container copies a tool there and the
    // app runs it.
    k.add_manifest("tooled", &tooled_pod(env)).unwrap();
    for p in ["userns", "measured", "tooled"] {
        eventually(&format!("{p} running"), T, || running(&k, p))
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", k.log_tail(6000), d.log()));
    }
    let (ok, map) = kubelet_exec(&client, &k, "userns", "cat /proc/self/uid_map");
    assert!(ok, "{map}");
    let f: Vec<u64> = map
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "{map}");
    assert_eq!(f[0], 0, "in-pod root");
    assert!(f[1] >= 65536, "mapped to unprivileged host IDs: {map}");
    assert_eq!(f[2], 65536, "{map}");

    // The measured pod verifies against the image's golden policy ...
    let pods = crictl(
        &cache,
        &d,
        &["pods", "--name", "measured-imacri-test-node", "-q"],
    );
    let pod = pods.trim().to_string();
    assert_eq!(pod.lines().count(), 1, "{pods}");
    let verify = || {
        attest(
            &d,
            &[
                "verify",
                "--pod",
                &pod,
                "--policy",
                golden.to_str().unwrap(),
                "--ak",
                ak.to_str().unwrap(),
            ],
        )
    };
    let (code, out, err) = verify();
    assert_eq!(code, 0, "trusted: {out}{err}");
    // ... until a changed binary runs in it.
    let (ok, out) = kubelet_exec(
        &client,
        &k,
        "measured",
        // busybox picks its applet by name: /tmp/true runs `true`.
        "cp /bin/busybox /tmp/true && echo x >> /tmp/true && /tmp/true && echo ran",
    );
    assert!(ok && out.contains("ran"), "{out}");
    let (code, out, _) = verify();
    assert_eq!(code, 1, "a violation: {out}");
    assert!(out.contains("/tmp/true"), "{out}");

    let (ok, out) = kubelet_exec(&client, &k, "tooled", "/tools/echo again");
    assert!(ok && out.contains("again"), "{out}");
    let pods = crictl(
        &cache,
        &d,
        &["pods", "--name", "tooled-imacri-test-node", "-q"],
    );
    let (code, log, err) = attest(&d, &["log", pods.trim()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        log.lines()
            .any(|l| l.contains(" /tools/tool ") && l.ends_with(" exec")),
        "{log}"
    );

    remove_and_wait(&k, &cache, &d, &["userns", "measured", "tooled"]);
}

/// An ima pod under the `vols` policy whose init container copies a
/// changed busybox into an emptyDir on disk, which its app then runs.
fn tooled_pod(env: &Env) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: tooled
  namespace: default
  annotations:
    imacri.dev/ima: "true"
    imacri.dev/ima-policy: vols
spec:
  initContainers:
  - name: copy
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "cp /bin/busybox /tools/tool && echo x >> /tools/tool && ln -s tool /tools/echo"]
    volumeMounts:
    - name: tools
      mountPath: /tools
  containers:
  - name: app
    image: {img}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "/tools/echo tool-ran && exec sleep 3600"]
    volumeMounts:
    - name: tools
      mountPath: /tools
  volumes:
  - name: tools
    emptyDir: {{}}
"#,
        img = env.busybox
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_keeps_its_pods_across_an_imacri_crash() {
    let _one = ONE_KUBELET.lock().await;
    let env = Env::get();
    let cache = critest::tools().unwrap();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    let k = Kubelet::start(env, &d, &cache).unwrap();
    k.add_manifest("before", &sleeper_pod(env, "before", "", ""))
        .unwrap();
    eventually("before running", T, || running(&k, "before"))
        .unwrap_or_else(|e| panic!("{e}\n{}", k.log_tail(6000)));
    let pods = crictl(&cache, &d, &["pods", "-q"]);
    let ctrs = crictl(&cache, &d, &["ps", "-q"]);

    d.kill(); // SIGKILL, while kubelet keeps calling
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.spawn().await.unwrap();
    k.add_manifest("after", &sleeper_pod(env, "after", "", ""))
        .unwrap();
    eventually("after running", T, || running(&k, "after"))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", k.log_tail(6000), d.log()));
    // Let kubelet resync a few times: the old pod is the same one, not
    // recreated or duplicated, and its container never restarted.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let p = running(&k, "before").expect("before still running");
    assert_eq!(
        container_status(&p, "app").unwrap()["restartCount"],
        0,
        "{p}"
    );
    let now_pods = crictl(&cache, &d, &["pods", "-q"]);
    let now_ctrs = crictl(&cache, &d, &["ps", "-q"]);
    for id in pods.lines().chain(ctrs.lines()) {
        assert!(
            now_pods.contains(id) || now_ctrs.contains(id),
            "{id} lost after the crash"
        );
    }
    assert_eq!(
        now_pods.lines().count(),
        2,
        "one pod each, no duplicates: {now_pods}"
    );
    assert_eq!(now_ctrs.lines().count(), 2, "{now_ctrs}");

    remove_and_wait(&k, &cache, &d, &["before", "after"]);
}
