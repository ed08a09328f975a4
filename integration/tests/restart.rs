//! Restart recovery: kill -9 imacri while pods run and start it again;
//! everything is back with the same IDs and states, exits that happened
//! meanwhile are recorded, logs continue. Also log rotation and the
//! daemon's socket handling.

use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::time::Duration;

async fn lines(path: &std::path::Path) -> usize {
    tokio::fs::read_to_string(path)
        .await
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

async fn grows(path: &std::path::Path) -> bool {
    let start = lines(path).await;
    imacri_integration::poll::eventually("the log grows", Duration::from_secs(10), || async {
        (lines(path).await > start + 2).then_some(())
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_and_restart_recovers_everything() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    let cfg = pod_config("restart");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let create = |c: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(c),
        sandbox_config: Some(cfg.clone()),
    };
    let ticker = rt
        .create_container(create(container_config(
            "ticker",
            &env.busybox,
            &["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let quitter = rt
        .create_container(create(container_config(
            "quitter",
            &env.busybox,
            &["sh", "-c", "sleep 2; exit 7"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let waiting = rt
        .create_container(create(container_config(
            "waiting",
            &env.busybox,
            &["sh", "-c", "echo started-late"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    for c in [&ticker, &quitter] {
        rt.start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    }
    let log = std::path::Path::new(&cfg.log_directory).join("ticker/0.log");
    assert!(grows(&log).await, "ticker logs");

    d.kill();
    tokio::time::sleep(Duration::from_secs(3)).await; // quitter exits meanwhile
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();

    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].id, pod);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    let status =
        |rt: &mut imacri_integration::cri::runtime_service_client::RuntimeServiceClient<_>,
         id: String| {
            let mut rt = rt.clone();
            async move {
                rt.container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
            }
        };
    let t = status(&mut rt, ticker.clone()).await;
    assert_eq!(t.state, cri::ContainerState::ContainerRunning as i32);
    assert!(grows(&log).await, "the log continues after the restart");
    let q = status(&mut rt, quitter.clone()).await;
    assert_eq!(q.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(q.exit_code, 7);
    assert!(q.finished_at > q.started_at);
    let w = status(&mut rt, waiting.clone()).await;
    assert_eq!(w.state, cri::ContainerState::ContainerCreated as i32);
    rt.start_container(cri::StartContainerRequest {
        container_id: waiting.clone(),
    })
    .await
    .unwrap();

    // Log rotation: kubelet renames the file and asks us to reopen.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: ticker.clone(),
    })
    .await
    .unwrap();
    assert!(grows(&log).await, "new log file after reopen");
    let e = rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: quitter.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // Exec still works on the recovered container.
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: ticker.clone(),
            cmd: vec!["echo".into(), "still-here".into()],
            timeout: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"still-here\n");

    // A second daemon on the same socket is refused; SIGTERM is graceful.
    let other =
        Imacri::start_full(env, &d.namespace, &["--socket", d.socket.to_str().unwrap()]).await;
    let err = format!(
        "{:#}",
        other
            .err()
            .expect("second server on a live socket must fail")
    );
    assert!(err.contains("in use by a running server"), "{err}");
    let status = d.stop().unwrap();
    assert!(status.success(), "graceful shutdown: {status:?}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());
}
