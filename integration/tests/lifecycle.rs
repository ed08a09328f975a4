//! The full pod and container lifecycle through the CRI socket, against real
//! containerd, runc and a real registry.

use imacri_integration::client::image;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::time::{Duration, Instant};

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    imacri_integration::poll::eventually(what, timeout, || {
        let ready = f();
        async move { ready.await.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn assert_no_leftovers(env: &Env, ids: &[&str]) {
    let left = env.leftovers(ids).await.unwrap();
    assert!(left.is_empty(), "left in containerd: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_and_container_lifecycle() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let mut im = d.images().await.unwrap();

    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "imacri");
    assert_eq!(v.runtime_api_version, "v1");

    let pulled = im
        .pull_image(cri::PullImageRequest {
            image: image(&env.busybox),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");

    let cfg = pod_config("lifecycle");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", d.log()))
        .into_inner()
        .pod_sandbox_id;
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let status = st.status.unwrap();
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(status.labels, cfg.labels);
    assert_eq!(status.annotations, cfg.annotations);
    assert!(status.created_at > 0);
    assert!(st.info["info"].contains("\"pid\""));

    // Same metadata again: AlreadyExists naming the existing pod.
    let dup = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    assert!(dup.message().contains(&pod), "{}", dup.message());

    let c = container_config(
        "printer",
        &env.busybox,
        &["sh", "-c", "trap '' TERM; echo hello; echo oops >&2; echo $MY_ENV; hostname; while true; do sleep 1; done"],
    );
    let c = cri::ContainerConfig {
        envs: vec![cri::KeyValue {
            key: "MY_ENV".into(),
            value: "from-cri".into(),
        }],
        ..c
    };
    let cid = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c.clone()),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", d.log()))
        .into_inner()
        .container_id;
    let s = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);

    rt.start_container(cri::StartContainerRequest {
        container_id: cid.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", d.log()));
    let log_path = std::path::Path::new(&cfg.log_directory).join("printer/0.log");
    wait_until("container log", Duration::from_secs(10), || {
        let p = log_path.clone();
        async move {
            std::fs::read_to_string(&p)
                .map(|t| t.lines().count() >= 4)
                .unwrap_or(false)
        }
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let entries: Vec<Vec<&str>> = log.lines().map(|l| l.splitn(4, ' ').collect()).collect();
    assert!(entries.iter().all(|e| e.len() == 4 && e[2] == "F"), "{log}");
    assert!(
        entries.iter().any(|e| e[1] == "stdout" && e[3] == "hello"),
        "{log}"
    );
    assert!(
        entries.iter().any(|e| e[1] == "stderr" && e[3] == "oops"),
        "{log}"
    );
    assert!(entries.iter().any(|e| e[3] == "from-cri"), "{log}");
    assert!(
        entries.iter().any(|e| e[3] == "lifecycle"),
        "hostname: {log}"
    );

    let s = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let status = s.status.unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    assert!(status.started_at > 0);
    assert_eq!(status.log_path, log_path.to_string_lossy());
    assert_eq!(status.image_id, pulled.image_ref);
    assert!(
        status.image_ref.contains("@sha256:"),
        "{}",
        status.image_ref
    );
    // The spec the container runs with (kept at create, not asked of
    // containerd): what runc got.
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
    let spec = &info["runtimeSpec"];
    assert_eq!(
        spec["ociVersion"].as_str().map(|v| v.starts_with("1.")),
        Some(true),
        "{info}"
    );
    assert!(
        spec["process"]["args"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{info}"
    );

    // ExecSync: output, exit code, timeout.
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", d.log()))
        .into_inner();
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.exit_code, 3);
    let t = Instant::now();
    let e = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // Lists and filters.
    let list = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                label_selector: [("container".to_string(), "printer".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, cid);
    let none = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: [("container".to_string(), "other".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(none.iter().all(|c| c.id != cid));
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                id: pod[..12].to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);

    // Stop: the shell ignores SIGTERM, so the timeout ends in SIGKILL.
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: cid.clone(),
        timeout: 1,
    })
    .await
    .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", d.log()));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "stopped before the timeout"
    );
    let status = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 137);
    assert!(status.finished_at >= status.started_at);
    assert_eq!(status.reason, "Error");
    // Idempotent stop.
    rt.stop_container(cri::StopContainerRequest {
        container_id: cid.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    // The log survives the exit.
    assert!(std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("hello"));
    let e = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    rt.remove_container(cri::RemoveContainerRequest {
        container_id: cid.clone(),
    })
    .await
    .unwrap();
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: cid.clone(),
    })
    .await
    .unwrap();
    let e = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(
        !d.state.join("netns").join(&pod).exists(),
        "netns left behind"
    );
    assert_no_leftovers(env, &[&pod, &cid]).await;
}

/// A pod with a sleeping container on `d`: the client, pod and container.
async fn sleeper(
    env: &Env,
    d: &Imacri,
    name: &str,
) -> (imacri_integration::client::Rt, String, String) {
    use imacri_integration::client::{run_pod, start_container};
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config(name);
    let app = container_config("app", &env.busybox, &["sleep", "1000"]);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let cid = start_container(&mut rt, &pod, &cfg, app).await;
    (rt, pod, cid)
}

/// A command that leaves a process running with its output open (a probe's
/// `cmd &`): ExecSync waits for that output as containerd 1.6 does, or, with
/// `drain_exec_sync_io_timeout_ms`, stops waiting and fails with Unknown as
/// containerd 1.7 does; either way the next ExecSync works.
#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_output_held_by_a_process_it_left_running() {
    use imacri_integration::client::remove_pod;
    let env = Env::get();
    let exec = |cid: &str, cmd: &str| cri::ExecSyncRequest {
        container_id: cid.into(),
        cmd: vec!["sh".into(), "-c".into(), cmd.into()],
        timeout: 20,
    };
    // Waiting, by default, for as long as the process left behind runs.
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cid) = sleeper(env, &d, "drain-wait").await;
    let t = Instant::now();
    let r = rt
        .exec_sync(exec(&cid, "sleep 3 & echo left"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, b"left\n".as_slice())
    );
    assert!(
        t.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    remove_pod(&mut rt, &pod).await;
    drop(d);

    // With a drain timeout: a short one is still drained, a long one fails.
    let d = Imacri::start_configured(
        env,
        &env.namespace,
        &[],
        "drain_exec_sync_io_timeout_ms = 700\n",
    )
    .await
    .unwrap();
    let (mut rt, pod, cid) = sleeper(env, &d, "drain-timeout").await;
    let r = rt
        .exec_sync(exec(&cid, "sleep 0.2 & echo short"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner();
    assert_eq!(r.stdout, b"short\n");
    let t = Instant::now();
    let e = rt
        .exec_sync(exec(&cid, "sleep 30 & echo left"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unknown, "{e}");
    assert!(e.message().contains("still held open"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Its own timeout still wins over the drain.
    let e = rt
        .exec_sync(cri::ExecSyncRequest {
            timeout: 1,
            ..exec(&cid, "sleep 30 & sleep 30")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    let r = rt
        .exec_sync(exec(&cid, "echo next"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner();
    assert_eq!(r.stdout, b"next\n");
    remove_pod(&mut rt, &pod).await;
}

/// kubelet stops a container again with a shorter grace period (its pod
/// deleted with `--grace-period=0 --force` while a graceful stop runs), or
/// removes it: the later call kills at once, as containerd's, instead of
/// waiting out the first stop's grace period. A second stop with a grace
/// period of its own sends no second stop signal (containerd's neither).
/// Until 2026-12-06 a stop held the container for its whole grace period.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_in_its_grace_period_is_overtaken_by_a_shorter_one() {
    use imacri_integration::client::{container_status, remove_pod, run_pod, start_container};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("stop-overtaken");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let script = "trap 'echo got TERM' TERM; echo up; while true; do sleep 0.1; done";
    let stop = |rt: &imacri_integration::client::Rt, c: &str, timeout: i64| {
        let (mut rt, c) = (rt.clone(), c.to_string());
        tokio::spawn(async move {
            rt.stop_container(cri::StopContainerRequest {
                container_id: c,
                timeout,
            })
            .await
        })
    };
    for later in ["stop", "remove"] {
        let app = container_config(&format!("app-{later}"), &env.busybox, &["sh", "-c", script]);
        let c = start_container(&mut rt, &pod, &cfg, app).await;
        let log = container_status(&mut rt, &c).await.log_path;
        let said = |what: &'static str| {
            let log = log.clone();
            move || {
                let n = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches(what)
                    .count();
                async move { n > 0 }
            }
        };
        wait_until("the container's start", Duration::from_secs(20), said("up")).await;
        let first = stop(&rt, &c, 60);
        wait_until("the stop signal", Duration::from_secs(20), said("got TERM")).await;
        let second = stop(&rt, &c, 30);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let done = match later {
            "stop" => stop(&rt, &c, 0).await.unwrap().map(drop),
            _ => rt
                .remove_container(cri::RemoveContainerRequest {
                    container_id: c.clone(),
                })
                .await
                .map(drop),
        };
        done.unwrap_or_else(|e| panic!("{later}: {e}\n{}", d.log()));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the {later} waited out the first stop's grace period: {:?}",
            t.elapsed()
        );
        for s in [first, second] {
            let r = tokio::time::timeout(Duration::from_secs(10), s).await;
            assert!(matches!(r, Ok(Ok(Ok(_)))), "{later}: a stop: {r:?}");
        }
        if later == "stop" {
            let st = container_status(&mut rt, &c).await;
            assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        }
        let terms = std::fs::read_to_string(&log)
            .unwrap()
            .matches("got TERM")
            .count();
        assert_eq!(terms, 1, "{later}: stop signals seen");
    }
    remove_pod(&mut rt, &pod).await;
}

/// Negative timeouts are taken as containerd takes them, not refused: an
/// ExecSync with one runs without a time limit, a StopContainer with one
/// kills at once (no grace period).
#[tokio::test(flavor = "multi_thread")]
async fn negative_timeouts_are_taken_as_containerd_takes_them() {
    use imacri_integration::client::{container_status, remove_pod};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cid) = sleeper(env, &d, "negative-timeouts").await;
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 1.5; echo done".into()],
            timeout: -1,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"done\n"[..]));
    // `sleep` as PID 1 ignores SIGTERM: only a kill ends it at once.
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: cid.clone(),
        timeout: -5,
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let st = container_status(&mut rt, &cid).await;
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137, "{st:?}");
    remove_pod(&mut rt, &pod).await;
}

/// A container exits while imacri cannot write its record (imacri at its
/// open-file limit here; a full disk the same): the exit is what happened,
/// so ContainerStatus says so and the stopped event goes out at once, and
/// the record is written once imacri can (retried), so an imacri started
/// again still knows the exit code. Until 2026-12-06 the failed write
/// also dropped the event (and plugins' notice), and the record said
/// Running until the next start found the task gone.
#[tokio::test(flavor = "multi_thread")]
async fn an_exit_imacri_cannot_write_down_is_told_and_written_later() {
    use imacri_integration::client::container_status;
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cid) = sleeper(env, &d, "exit-unwritten").await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let pid = imacri_integration::client::container_info(&mut rt, &cid).await["pid"]
        .as_u64()
        .unwrap() as i32;
    let record = d.root.join("containers").join(&cid).join("state.json");
    let limit = d.at_open_file_limit();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let stopped = async {
        while let Ok(Some(e)) = events.message().await {
            if e.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32
                && e.container_id == cid
            {
                return true;
            }
        }
        false
    };
    let told = tokio::time::timeout(Duration::from_secs(10), stopped).await;
    let st = container_status(&mut rt, &cid).await;
    let written = std::fs::read_to_string(&record).unwrap();
    drop(limit);
    assert_eq!(told, Ok(true), "no stopped event\n{}", d.log());
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137);
    assert!(
        written.contains("Running"),
        "written at the limit? {written}"
    );
    wait_until("the record written", Duration::from_secs(20), || {
        let r = std::fs::read_to_string(&record).unwrap_or_default();
        async move { r.contains("Exited") }
    })
    .await;
    // The pod's pause the same: not ready at once, written later.
    let pause = imacri_integration::client::pod_info(&mut rt, &pod).await["pid"]
        .as_u64()
        .unwrap() as i32;
    let pod_record = d.root.join("sandboxes").join(&pod).join("state.json");
    let limit = d.at_open_file_limit();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pause),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the pod not ready", Duration::from_secs(10), || {
        let mut rt = rt.clone();
        let pod = pod.clone();
        async move {
            imacri_integration::client::pod_status(&mut rt, &pod)
                .await
                .state
                == cri::PodSandboxState::SandboxNotready as i32
        }
    })
    .await;
    drop(limit);
    wait_until("the pod's record written", Duration::from_secs(20), || {
        let r = std::fs::read_to_string(&pod_record).unwrap_or_default();
        async move { r.contains("NotReady") }
    })
    .await;
    d.respawn(&[]).await;
    let mut rt = d.runtime().await.unwrap();
    let st = container_status(&mut rt, &cid).await;
    assert_eq!(
        (st.state, st.exit_code),
        (cri::ContainerState::ContainerExited as i32, 137),
        "{st:?}"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// A running container without a log path (kubelet always gives one;
/// crictl and other clients need not) has nothing to reopen:
/// ReopenContainerLog succeeds, as containerd's does (it reopens a logger
/// that discards). Until 2026-12-06 it was FailedPrecondition.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_without_a_log_reopens_nothing_and_succeeds() {
    use imacri_integration::client::{remove_pod, run_pod, start_container};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("reopen-without-log");
    let mut app = container_config("app", &env.busybox, &["sleep", "1000"]);
    app.log_path.clear();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let cid = start_container(&mut rt, &pod, &cfg, app).await;
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: cid.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    remove_pod(&mut rt, &pod).await;
}
