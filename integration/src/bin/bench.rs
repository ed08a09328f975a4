//! Side-by-side CRI latency benchmark: imacri and containerd 1.6's own CRI
//! plugin, driven by the same client in the same run, on the same
//! containerd build, CNI config, images and machine. Prints medians (ms) and
//! imacri's idle RSS. Run: `make bench` (as root).

use anyhow::{Context, Result};
use imacri_integration::client::{image, run_pod};
use imacri_integration::{container_config, cri, critest, own_pids, pod_config, Env, Imacri};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tonic::transport::Channel;

const ROUNDS: usize = 15;
/// Alternating `critest -benchmark` runs per runtime.
const CRITEST_RUNS: usize = 3;

fn median_of(samples: BTreeMap<String, Vec<f64>>) -> BTreeMap<String, f64> {
    samples
        .into_iter()
        .filter_map(|(op, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).map(|m| (op, *m))
        })
        .collect()
}

type Rt = cri::runtime_service_client::RuntimeServiceClient<Channel>;
type Im = cri::image_service_client::ImageServiceClient<Channel>;

/// Pulls `img` on both runtimes.
async fn pull_both(ours: &mut (Rt, Im), theirs: &mut (Rt, Im), img: &str) -> Result<()> {
    for (_, im) in [ours, theirs] {
        im.pull_image(cri::PullImageRequest {
            image: image(img),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// Pushes imacri's pause image to the test registry, for containerd's CRI.
fn push_pause(env: &Env) -> Result<String> {
    let (layer, config, manifest) = imacri_runtime::image::builtin::blobs()?;
    let dir = tempfile::tempdir_in(&env.base)?;
    let blobs = dir.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |b: &[u8]| -> Result<(String, usize)> {
        use sha2::Digest;
        let hex = hex::encode(sha2::Sha256::digest(b));
        std::fs::write(blobs.join(&hex), b)?;
        Ok((format!("sha256:{hex}"), b.len()))
    };
    put(&layer)?;
    put(&config)?;
    let (md, ml) = put(&manifest)?;
    std::fs::write(
        dir.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ml,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.path().join("index.json"), serde_json::to_vec(&index)?)?;
    let dest = format!("{}/bench/pause:latest", env.registry);
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", dir.path().display()))
        .arg(format!("docker://{dest}"))
        .status()?;
    anyhow::ensure!(st.success(), "skopeo push of the pause image failed");
    Ok(dest)
}

/// containerd with its CRI plugin on, configured like imacri's test setup.
fn containerd_with_cri(
    env: &Env,
    pause: &str,
) -> Result<(std::path::PathBuf, std::process::Child)> {
    let dir = env.base.join("bench-containerd");
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("containerd.sock");
    let cfg = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = sock.display(),
        cni = env.cni_conf_dir.display(),
        hosts = env.hosts_dir.display(),
    );
    std::fs::write(dir.join("config.toml"), cfg)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let child = std::process::Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting containerd")?;
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok((sock, child));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("containerd with CRI did not start")
}

#[derive(Default)]
struct Samples(std::collections::BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    async fn time<T, F: std::future::Future<Output = T>>(&mut self, name: &'static str, f: F) -> T {
        let t = Instant::now();
        let r = f.await;
        self.0
            .entry(name)
            .or_default()
            .push(t.elapsed().as_secs_f64() * 1000.0);
        r
    }

    fn median(&self, name: &str) -> f64 {
        let mut v = self.0.get(name).cloned().unwrap_or_default();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// CRI latency of imacri and containerd's CRI, a round of each in turn (so
/// both see the same machine load).
/// `kubelet`: pods as kubelet sends them (pid CONTAINER: imacri runs them
/// without pause); else without namespace options (pid POD, with pause), as
/// crictl's example configs and critest send them.
async fn run(
    ours: &mut (Rt, Im),
    theirs: &mut (Rt, Im),
    busybox: &str,
    kubelet: bool,
) -> Result<(Samples, Samples)> {
    let (mut a, mut b) = (Samples::default(), Samples::default());
    pull_both(&mut *ours, &mut *theirs, busybox).await?;
    for i in 0..ROUNDS {
        round(&mut ours.0, &mut ours.1, &mut a, busybox, i, kubelet).await?;
        round(&mut theirs.0, &mut theirs.1, &mut b, busybox, i, kubelet).await?;
    }
    Ok((a, b))
}

async fn round(
    rt: &mut Rt,
    im: &mut Im,
    s: &mut Samples,
    busybox: &str,
    i: usize,
    kubelet: bool,
) -> Result<()> {
    {
        let mut cfg = pod_config(&format!("bench-{i}"));
        if kubelet {
            imacri_integration::own_pids(&mut cfg);
        }
        let pod = s.time("RunPodSandbox", run_pod(rt, &cfg)).await?;
        let mut c = container_config("c", busybox, &["sleep", "1000"]);
        if kubelet {
            // kubelet sends a container the pod's namespace options.
            c.linux
                .get_or_insert_with(Default::default)
                .security_context
                .get_or_insert_with(Default::default)
                .namespace_options = cfg
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.clone());
        }
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(cfg.clone()),
        };
        let id = s
            .time("CreateContainer", rt.create_container(req))
            .await?
            .into_inner()
            .container_id;
        s.time(
            "StartContainer",
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await?;
        s.time(
            "ContainerStatus",
            rt.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            }),
        )
        .await?;
        // As kubelet and critest ask it (with the runtime spec).
        s.time(
            "ContainerStatus-v",
            rt.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true,
            }),
        )
        .await?;
        s.time(
            "ListImages",
            im.list_images(cri::ListImagesRequest::default()),
        )
        .await?;
        s.time(
            "StopContainer",
            rt.stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }),
        )
        .await?;
        s.time(
            "RemoveContainer",
            rt.remove_container(cri::RemoveContainerRequest { container_id: id }),
        )
        .await?;
        s.time(
            "StopPodSandbox",
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await?;
        s.time(
            "RemovePodSandbox",
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            }),
        )
        .await?;
    }
    Ok(())
}

/// How a benchmarked pod is isolated.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    /// `hostUsers: false`: kubelet gives every pod its own ID range.
    Userns,
    /// An ima pod (its own user namespace, measured).
    Ima,
}

const START_ROUNDS: usize = 15;

/// Pod-start phases, summed into "total".
const PHASES: [&str; 4] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "total",
];

fn pod_start_config(mode: Mode, name: &str, i: usize) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    match mode {
        Mode::Plain => {}
        Mode::Userns => imacri_integration::pod_userns(&mut cfg, 5_000_000 + (i as u32) * 65536),
        Mode::Ima => {
            cfg.annotations
                .insert("imacri.dev/ima".into(), "true".into());
        }
    }
    // As kubelet sends a pod without shareProcessNamespace (an absent
    // option would mean POD, a shared pid namespace).
    own_pids(&mut cfg);
    cfg
}

/// The container as kubelet sends it into such a pod: its own pid namespace.
fn kubelets_container(img: &str) -> cri::ContainerConfig {
    let mut c = container_config("c", img, &["sleep", "1000"]);
    c.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options = Some(cri::NamespaceOption {
        pid: cri::NamespaceMode::Container as i32,
        ..Default::default()
    });
    c
}

/// One timed RunPodSandbox + CreateContainer + StartContainer of one
/// container of `img` into `s` (per phase and "total"); the pod is removed
/// outside the timing.
async fn pod_start(
    rt: &mut Rt,
    s: &mut Samples,
    img: &str,
    cfg: &cri::PodSandboxConfig,
) -> Result<()> {
    let t = Instant::now();
    let pod = s.time(PHASES[0], run_pod(rt, cfg)).await?;
    let id = s
        .time(
            PHASES[1],
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(kubelets_container(img)),
                sandbox_config: Some(cfg.clone()),
            }),
        )
        .await?
        .into_inner()
        .container_id;
    s.time(
        PHASES[2],
        rt.start_container(cri::StartContainerRequest { container_id: id }),
    )
    .await?;
    s.0.entry(PHASES[3])
        .or_default()
        .push(t.elapsed().as_secs_f64() * 1000.0);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}

/// Pod starts of `img` on imacri (plain, userns, ima) and containerd's CRI
/// (plain), interleaved round by round so that both see the same machine
/// load: a VM's speed drifts by more than the differences measured.
async fn pod_starts(
    ours: &mut (Rt, Im),
    theirs: &mut (Rt, Im),
    img: &str,
    label: &str,
) -> Result<Vec<(&'static str, Samples)>> {
    pull_both(&mut *ours, &mut *theirs, img).await?;
    let modes = [
        (Mode::Plain, "plain"),
        (Mode::Userns, "userns"),
        (Mode::Ima, "ima"),
    ];
    let mut out: Vec<(&'static str, Samples)> = modes
        .iter()
        .map(|(_, n)| (*n, Samples::default()))
        .chain([("ctr", Samples::default())])
        .collect();
    for i in 0..START_ROUNDS {
        for (k, (mode, name)) in modes.iter().enumerate() {
            let cfg = pod_start_config(*mode, &format!("start-{label}-{name}-{i}"), i);
            pod_start(&mut ours.0, &mut out[k].1, img, &cfg).await?;
        }
        let cfg = pod_start_config(Mode::Plain, &format!("start-{label}-ctr-{i}"), i);
        pod_start(&mut theirs.0, &mut out[3].1, img, &cfg).await?;
    }
    Ok(out)
}

/// Pods started per runtime and kind to measure memory per pod
/// (`BENCH_MEM_PODS` to change it: more pods, less noise).
fn mem_pods() -> usize {
    std::env::var("BENCH_MEM_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(20)
}

/// A number field of `pid`'s /proc status ("VmRSS" in KiB, "Threads").
fn status_field(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Anonymous resident memory (heap, stacks) in KiB: what a pod costs. The
/// file-backed part is mostly the binary's own code, paged in the first
/// time a path runs, and shared.
fn rss_kib(pid: u32) -> Option<f64> {
    status_field(pid, "RssAnon")
}

/// The process whose command line has `arg` (the shared test containerd,
/// found by its config file).
fn pid_with_arg(arg: &Path) -> Option<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        cmd.split(|b| *b == 0).any(|a| a == want).then_some(pid)
    })
}

/// Starts [`mem_pods`] pods of `mode` (one `sleep` container each) and returns
/// the growth of each of `pids`' RSS (KiB) and threads per pod, with the pods left
/// running (their ids in `made`) so a later measurement does not reuse the
/// memory they freed.
async fn memory_per_pod(
    rt: &mut Rt,
    mode: Mode,
    label: &str,
    img: &str,
    pids: &[u32],
    made: &mut Vec<String>,
) -> Result<Vec<(f64, f64)>> {
    // Warm-up: a pod of this kind started and removed first, so the first
    // use of each code path and allocator pool is not counted per pod.
    let mut warm = Vec::new();
    for i in 0..2 {
        let name = format!("mem-warm-{label}-{i}");
        warm.push(running_pod(rt, mode, &name, 90 + i, img).await?);
    }
    remove_pods(rt, warm).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let sample = |p: &u32| {
        (
            rss_kib(*p).unwrap_or(f64::NAN),
            status_field(*p, "Threads").unwrap_or(f64::NAN),
        )
    };
    let before: Vec<(f64, f64)> = pids.iter().map(sample).collect();
    for i in 0..mem_pods() {
        let name = format!("mem-{label}-{i}");
        made.push(running_pod(rt, mode, &name, 100 + i, img).await?);
    }
    // Idle pods: imacri's threads for a pod end a second after its last
    // event (`integrity/park.rs`); waited for, up to 10 s.
    let settled = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sample(&pids[0]).1 > before[0].1 && std::time::Instant::now() < settled {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let n = mem_pods() as f64;
    Ok(pids
        .iter()
        .map(sample)
        .zip(before)
        .map(|((r, t), (r0, t0))| ((r - r0) / n, (t - t0) / n))
        .collect())
}

/// A pod of `mode` running one `sleep` container of `img`; its id.
async fn running_pod(rt: &mut Rt, mode: Mode, name: &str, i: usize, img: &str) -> Result<String> {
    let cfg = pod_start_config(mode, name, i);
    let pod = run_pod(rt, &cfg).await?;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", img, &["sleep", "1000"])),
            sandbox_config: Some(cfg),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest { container_id: id })
        .await?;
    Ok(pod)
}

async fn remove_pods(rt: &mut Rt, pods: Vec<String>) -> Result<()> {
    for pod_sandbox_id in pods {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.clone(),
        })
        .await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
            .await?;
    }
    Ok(())
}

/// critest's own benchmarks (`critest -benchmark`) against `endpoint`:
/// milliseconds of each sample per operation, from its JSON results.
fn critest_bench(
    env: &Env,
    cache: &Path,
    endpoint: &str,
    tag: &str,
) -> Result<BTreeMap<String, Vec<f64>>> {
    let out = env.base.join(format!("critest-bench-{tag}"));
    std::fs::create_dir_all(&out)?;
    let params = out.join("params.yaml");
    std::fs::write(
        &params,
        "containersNumber: 10\ncontainersNumberParallel: 1\npodsNumber: 10\npodsNumberParallel: 1\n\
         imagesNumber: 5\nimagesNumberParallel: 1\n\
         imagePullingBenchmarkImage: registry.k8s.io/e2e-test-images/busybox:1.29-2\n\
         imageListingBenchmarkImages:\n- registry.k8s.io/e2e-test-images/busybox:1.29-2\n",
    )?;
    let o = std::process::Command::new(critest::critest(cache))
        .arg("-benchmark")
        .arg(format!("--runtime-endpoint={endpoint}"))
        .arg(format!("--image-endpoint={endpoint}"))
        .arg(format!("--benchmarking-params-file={}", params.display()))
        .arg(format!("--benchmarking-output-dir={}", out.display()))
        .arg("--ginkgo.no-color")
        .current_dir(&env.base)
        .output()
        .context("running critest -benchmark")?;
    anyhow::ensure!(
        o.status.success(),
        "critest -benchmark against {tag} failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for e in std::fs::read_dir(&out)?.flatten() {
        if e.path().extension().is_none_or(|x| x != "json") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path())?)?;
        let names = v["operationsNames"].as_array().cloned().unwrap_or_default();
        for (i, n) in names.iter().enumerate() {
            samples
                .entry(n.as_str().unwrap_or("?").to_string())
                .or_default()
                .extend(
                    v["datapoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["operationsDurationsNs"][i].as_f64())
                        .map(|ns| ns / 1e6),
                );
        }
    }
    Ok(samples)
}

#[tokio::main]
async fn main() -> Result<()> {
    let env = Env::get();
    let pause = push_pause(env)?;
    // Both runtimes at their own default log level (the test harness's
    // debug level writes a line per call, which containerd's info does not),
    // plus the step timings of the slow calls printed below.
    let d =
        Imacri::start_with(env, &["--log-level", "info,imacri_cri::server::laps=debug"]).await?;
    let mut ours = (d.runtime().await?, d.images().await?);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rss = d
        .pid()
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    // BENCH_ONLY=start, rpc or memory: only the pod-start, the CRI latency
    // or the memory comparison, with imacri's step timings kept (for
    // profiling).
    let only = std::env::var("BENCH_ONLY").ok();
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    // A 200 MB image of 2000 files, pushed once per run.
    let big = format!("{}/test/big:latest", env.registry);
    if wants("start") {
        imacri_integration::images::build_and_push(
            &env.base,
            &imacri_integration::images::big(200 << 20, 2000),
            &big,
            None,
        )?;
    }
    let images = [("busybox", env.busybox.as_str()), ("200MB", big.as_str())];

    let (sock, mut containerd) = containerd_with_cri(env, &pause)?;
    let result = async {
        let ch = containerd_client::connect(&sock).await?;
        let mut theirs = (Rt::new(ch.clone()), Im::new(ch));
        // containerd's CRI needs a moment to load its CNI config.
        for _ in 0..100 {
            let st = theirs
                .0
                .status(cri::StatusRequest::default())
                .await?
                .into_inner();
            if st
                .status
                .is_some_and(|s| s.conditions.iter().all(|c| c.status))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut rpc = Vec::new();
        if wants("rpc") {
            for (label, kubelet) in [
                (
                    "pods as kubelet sends them (pid CONTAINER; imacri: no pause)",
                    true,
                ),
                (
                    "pods without namespace options (pid POD; pause in both)",
                    false,
                ),
            ] {
                rpc.push((
                    label,
                    run(&mut ours, &mut theirs, &env.busybox, kubelet).await?,
                ));
            }
        }
        let mut starts = Vec::new();
        for (label, img) in images.iter().filter(|_| wants("start")) {
            starts.push((
                *label,
                pod_starts(&mut ours, &mut theirs, img, label).await?,
            ));
        }
        // Memory per pod: imacri (and the containerd under it) with plain
        // then ima pods, containerd's CRI with plain pods.
        let memory = match wants("memory") {
            false => None,
            true => {
                pull_both(&mut ours, &mut theirs, &env.busybox).await?;
                let our_ctr = pid_with_arg(&env.base.join("containerd/config.toml"));
                let ours_pids: Vec<u32> = d.pid().into_iter().chain(our_ctr).collect();
                let mut made = Vec::new();
                let plain = memory_per_pod(
                    &mut ours.0,
                    Mode::Plain,
                    "plain",
                    &env.busybox,
                    &ours_pids,
                    &mut made,
                )
                .await?;
                let ima = memory_per_pod(
                    &mut ours.0,
                    Mode::Ima,
                    "ima",
                    &env.busybox,
                    &ours_pids,
                    &mut made,
                )
                .await?;
                remove_pods(&mut ours.0, made).await?;
                let mut made = Vec::new();
                let theirs_mem = memory_per_pod(
                    &mut theirs.0,
                    Mode::Plain,
                    "ctr",
                    &env.busybox,
                    &[containerd.id()],
                    &mut made,
                )
                .await?;
                remove_pods(&mut theirs.0, made).await?;
                Some((plain, ima, theirs_mem))
            }
        };
        let critest = match only.is_some() {
            true => None,
            false => {
                let cache = critest::tools()?;
                critest::prepare(env, &cache)?;
                // Alternating runs, samples pooled: one run of 10 is at the
                // mercy of the VM's drift.
                let (mut ours_ct, mut theirs_ct) = (BTreeMap::new(), BTreeMap::new());
                for run in 0..CRITEST_RUNS {
                    for (sock, tag, into) in [
                        (&d.socket, "imacri", &mut ours_ct),
                        (&sock, "containerd", &mut theirs_ct),
                    ] {
                        let endpoint = format!("unix://{}", sock.display());
                        for (op, v) in
                            critest_bench(env, &cache, &endpoint, &format!("{tag}-{run}"))?
                        {
                            into.entry(op).or_insert_with(Vec::new).extend(v);
                        }
                    }
                }
                Some((median_of(ours_ct), median_of(theirs_ct)))
            }
        };
        anyhow::Ok((rpc, starts, memory, critest))
    }
    .await;
    let _ = containerd.kill();
    let _ = containerd.wait();
    let (rpc, starts, memory, critest) = result?;

    for (label, (ours, theirs)) in rpc {
        println!("CRI latency, {label}, median of {ROUNDS} rounds (ms), same machine and run");
        println!(
            "{:<18} {:>10} {:>14} {:>8}",
            "rpc", "imacri", "containerd-cri", "ratio"
        );
        for name in ours.0.keys() {
            let (a, b) = (ours.median(name), theirs.median(name));
            println!("{name:<18} {a:>10.2} {b:>14.2} {:>8.2}", a / b);
        }
        println!();
    }
    if let Some((ours_ct, theirs_ct)) = critest {
        println!(
            "critest -benchmark (cri-tools {}), median ms of {CRITEST_RUNS} alternating runs each, same run",
            critest::CRI_TOOLS_VERSION
        );
        println!(
            "{:<18} {:>10} {:>14} {:>8}",
            "operation", "imacri", "containerd-cri", "ratio"
        );
        for (name, a) in &ours_ct {
            let b = theirs_ct.get(name).copied().unwrap_or(f64::NAN);
            println!("{name:<18} {a:>10.2} {b:>14.2} {:>8.2}", a / b);
        }
        println!();
    }
    if !starts.is_empty() {
        println!(
            "pod start (RunPodSandbox+CreateContainer+StartContainer), median of {START_ROUNDS} \
             rounds interleaved with containerd-cri's plain pod (ms; run/create/start medians)"
        );
        println!(
            "{:<8} {:<7} {:>10} {:>22} {:>8}   {:>20}",
            "image", "pod", "imacri", "containerd-cri plain", "ratio", "run/create/start"
        );
        for (label, per_mode) in &starts {
            let theirs = per_mode
                .iter()
                .find(|(n, _)| *n == "ctr")
                .map(|(_, s)| s.median("total"))
                .unwrap_or(f64::NAN);
            for (name, s) in per_mode {
                let ms = s.median("total");
                let phases = PHASES[..3]
                    .iter()
                    .map(|p| format!("{:.1}", s.median(p)))
                    .collect::<Vec<_>>()
                    .join("/");
                let name = if *name == "ctr" { "ctr-cri" } else { name };
                println!(
                    "{label:<8} {name:<7} {ms:>10.1} {theirs:>22.1} {:>8.2}   {phases:>20}",
                    ms / theirs
                );
            }
        }
    }
    println!("imacri idle {}", rss.trim());
    if let Some((plain, ima, theirs)) = memory {
        let col = |v: &[(f64, f64)], i: usize| {
            v.get(i)
                .map_or("-".to_string(), |(k, t)| format!("{k:.0} KiB, {t:.1} thr"))
        };
        println!(
            "memory per pod ({} running pods of one busybox container each, after 2 started and removed; growth of anonymous RSS and threads per pod; target < 100 KiB for imacri)",
            mem_pods()
        );
        println!(
            "{:<22} {:>20} {:>22}",
            "pods", "imacri", "containerd under it"
        );
        for (name, v) in [("imacri plain", &plain), ("imacri ima", &ima)] {
            println!("{name:<22} {:>20} {:>22}", col(v, 0), col(v, 1));
        }
        println!("{:<22} {:>20}", "containerd-cri plain", col(&theirs, 0));
    }
    if only.is_some() {
        // Step timings (cri/src/server/laps.rs), for profiling.
        let log = d.log();
        let lines: Vec<_> = log.lines().filter(|l| l.contains("laps ")).collect();
        let keep = std::env::temp_dir().join("imacri-bench-laps.log");
        std::fs::write(&keep, lines.join("\n"))?;
        println!("step timings: {}", keep.display());
    }
    Ok(())
}
