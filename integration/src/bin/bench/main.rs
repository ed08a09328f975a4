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

mod memory;
mod pod_start;

use memory::{mem_pods, memory_per_pod, pid_with_arg, remove_pods};
use pod_start::{pod_start_config, pod_starts, Mode, PHASES, START_ROUNDS};

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
