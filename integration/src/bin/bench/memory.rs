//! Memory: each daemon's RSS idle and per running pod.

use super::*;

/// Pods started per runtime and kind to measure memory per pod
/// (`BENCH_MEM_PODS` to change it: more pods, less noise).
pub(crate) fn mem_pods() -> usize {
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
pub(crate) fn pid_with_arg(arg: &Path) -> Option<u32> {
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
pub(crate) async fn memory_per_pod(
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

pub(crate) async fn remove_pods(rt: &mut Rt, pods: Vec<String>) -> Result<()> {
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
