//! Pod starts, step by step, kubelet-style (no pause) and with pause.

use super::*;

/// How a benchmarked pod is isolated.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Mode {
    Plain,
    /// `hostUsers: false`: kubelet gives every pod its own ID range.
    Userns,
    /// An ima pod (its own user namespace, measured).
    Ima,
}

pub(crate) const START_ROUNDS: usize = 15;

/// Pod-start phases, summed into "total".
pub(crate) const PHASES: [&str; 4] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "total",
];

pub(crate) fn pod_start_config(mode: Mode, name: &str, i: usize) -> cri::PodSandboxConfig {
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
pub(crate) async fn pod_starts(
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
