//! Plugins see the pod and container events in order and adjust containers,
//! upstream's samples included.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn plugins_see_events_in_order_and_adjust_containers() {
    let env = Env::get();
    let mut nri = Nri::new(env);
    let logger = nri.events("logger");
    nri.install(
        env,
        "10-logger",
        &json!({"events_file": logger,
                "adjust": {"env": [{"key": "FROM_LOGGER", "value": "yes"}],
                           "annotations": {"nri.test/by": "logger"}}}),
    );
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(""))
        .await
        .unwrap();
    let l = wait_for(&logger, "Synchronize");
    assert_eq!(
        l[0],
        "Configure imacri/".to_string() + env!("CARGO_PKG_VERSION"),
        "{l:?}"
    );
    // An external plugin, later in index order, confining the container:
    // a lower fd limit and a read-only noexec tmpfs.
    nri.connect(
        env,
        "20",
        "ext",
        &json!({"events_file": nri.events("ext"),
                "adjust": {"rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4242, "soft": 4242}],
                           "mounts": [{"destination": "/nri-scratch", "type": "tmpfs", "source": "tmpfs",
                                       "options": ["ro", "noexec", "nosuid", "nodev"]}]}}),
    );
    let (mut rt, pod, cfg) = d.busybox_pod(env, "nri-events").await;
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("app", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(sh_ok(&mut rt, &c, "echo $FROM_LOGGER").await, "yes");
    assert_eq!(sh_ok(&mut rt, &c, "ulimit -n").await, "4242");
    let m = sh_ok(&mut rt, &c, "grep ' /nri-scratch ' /proc/mounts").await;
    assert!(
        m.contains("tmpfs") && m.contains("ro,") && m.contains("noexec"),
        "{m}"
    );
    assert_eq!(
        runtime_spec(&mut rt, &c).await["annotations"]["nri.test/by"],
        "logger"
    );

    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c.clone(),
        linux: Some(cri::LinuxContainerResources {
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: pod.clone(),
        resources: Some(cri::LinuxContainerResources {
            cpu_shares: 1024,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.stop_container(cri::StopContainerRequest {
        container_id: c.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    let l = wait_for(&logger, "RemovePodSandbox");
    let seen: Vec<&str> = l
        .iter()
        .filter(|x| x.contains("nri-events"))
        .map(|x| x.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        seen,
        [
            "RunPodSandbox",
            "CreateContainer",
            "PostCreateContainer",
            "StartContainer",
            "PostStartContainer",
            "UpdateContainer",
            "PostUpdateContainer",
            "UpdatePodSandbox",
            "PostUpdatePodSandbox",
            "StopContainer",
            "RemoveContainer",
            "StopPodSandbox",
            "RemovePodSandbox"
        ],
        "{l:?}"
    );
    assert!(
        l.iter().any(|x| x == "UpdatePodSandbox nri-events/1024"),
        "{l:?}"
    );
    // Plugins get the namespaces a pod's containers join: with pause, its
    // network namespace; without (pid CONTAINER, as kubelet sends most
    // pods), also the UTS and IPC namespaces imacri pinned.
    assert!(
        l.iter().any(|x| x == "RunPodSandbox nri-events/network"),
        "{l:?}"
    );
    let mut nopause = imacri_integration::pod_config("nri-nopause");
    imacri_integration::own_pids(&mut nopause);
    let p2 = imacri_integration::client::run_pod(&mut rt, &nopause)
        .await
        .unwrap();
    let l = wait_for(&logger, "RunPodSandbox nri-nopause");
    assert!(
        l.iter()
            .any(|x| x == "RunPodSandbox nri-nopause/network,uts,ipc"),
        "{l:?}"
    );
    imacri_integration::client::remove_pod(&mut rt, &p2).await;
    // The external plugin saw the same pod.
    assert!(lines(&nri.events("ext"))
        .iter()
        .any(|x| x.starts_with("CreateContainer nri-events/app")));

    // imacri crashes: the plugin it started goes with it (its connection
    // closes); the next imacri starts it again and synchronizes it.
    let mut d = d;
    d.kill();
    let exe = nri.dir.path().join("plugins/10-logger");
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(&exe) {
        assert!(
            Instant::now() < deadline,
            "{} outlived imacri",
            exe.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.spawn().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines(&logger)
        .iter()
        .filter(|x| x.starts_with("Synchronize"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{:?}", lines(&logger));
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
    assert!(
        !nri.socket.exists(),
        "the NRI socket outlived a graceful stop"
    );
}

/// Whether a process runs `exe`.
fn running(exe: &Path) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == exe))
}

/// Upstream's own sample plugin (ulimit-adjuster, from the nri module
/// itself), started by imacri from the plugin directory: the pod annotation
/// it reads becomes the container's rlimit.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_ulimit_adjuster_sample() {
    let env = Env::get();
    let nri = Nri::new(env);
    let bin = peers::nri_sample(env, "ulimit-adjuster").unwrap();
    std::fs::copy(&bin, nri.dir.path().join("plugins/10-ulimit-adjuster")).unwrap();
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(""))
        .await
        .unwrap();
    let mut cfg = pod_config("nri-ulimit");
    cfg.annotations.insert(
        "ulimits.nri.containerd.io/container.app".into(),
        "- type: RLIMIT_NOFILE\n  soft: 1234\n  hard: 2345\n".into(),
    );
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let pod = imacri_integration::client::run_pod(&mut rt, &cfg)
        .await
        .unwrap();
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("app", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    // The container's own process (`sleep`, next to pause) carries the
    // plugin's limits. An exec's soft limit is not asserted: runc 1.1.5 sets
    // an exec's rlimits from outside while the child's Go runtime raises its
    // soft NOFILE limit to the hard one (runc#4195, fixed in 1.1.13; reported
    // by `imacri check`), so now and then an exec sees 2345 for both.
    let limits = sh_ok(
        &mut rt,
        &c,
        "grep 'Max open files' /proc/$(pidof sleep)/limits",
    )
    .await;
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>(),
        ["Max", "open", "files", "1234", "2345", "files"],
        "{}",
        d.log()
    );
    assert_eq!(sh_ok(&mut rt, &c, "ulimit -Hn").await, "2345");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// Many requests at once reach one plugin, each answered: concurrent
/// pods and containers (as critest's synchronization specs send them) are never refused by upstream's ttrpc server for stream IDs
/// arriving out of order.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_reach_a_plugin_in_order() {
    let env = Env::get();
    let nri = Nri::new(env);
    let logger = nri.events("10-busy");
    nri.install(env, "10-busy", &json!({"events_file": logger}));
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(""))
        .await
        .unwrap();
    wait_for(&logger, "Synchronize");
    d.pull(&env.busybox).await;
    let starts = (0..12).map(|i| {
        let d = &d;
        async move {
            let mut rt = d.runtime().await.unwrap();
            let cfg = imacri_integration::pod_config(&format!("nri-busy-{i}"));
            let pod = imacri_integration::client::run_pod(&mut rt, &cfg)
                .await
                .map_err(|e| format!("run {i}: {e}"))?;
            let c = container_config("c", &env.busybox, &["sleep", "600"]);
            let id = imacri_integration::client::create_container(&mut rt, &pod, &cfg, c)
                .await
                .map_err(|e| format!("create {i}: {e}"))?;
            rt.start_container(cri::StartContainerRequest { container_id: id })
                .await
                .map_err(|e| format!("start {i}: {e}"))?;
            Ok::<_, String>(pod)
        }
    });
    let (pods, failed): (Vec<_>, Vec<_>) = futures::future::join_all(starts)
        .await
        .into_iter()
        .partition(|r| r.is_ok());
    let failed: Vec<String> = failed.into_iter().filter_map(|r| r.err()).collect();
    let mut rt = d.runtime().await.unwrap();
    for pod in pods.into_iter().flatten() {
        imacri_integration::client::remove_pod(&mut rt, &pod).await;
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
