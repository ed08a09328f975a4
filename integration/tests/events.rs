//! Container state follows containerd's events: GetContainerEvents streams
//! created/started/stopped/deleted in order, OOM kills are reported, and
//! imacri keeps working across a containerd restart.

use imacri_integration::client::{container_status, wait_exited};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn events_stream_in_order_and_oom_is_reported() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    let cfg = pod_config("events");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let c = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "quick",
                &env.busybox,
                &["sh", "-c", "exit 3"],
            )),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let s = wait_exited(&mut rt, &c).await;
    assert_eq!(s.exit_code, 3);
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event")
            .unwrap()
            .unwrap();
        if e.container_id != c {
            continue; // other tests share nothing with this daemon, but be exact
        }
        assert_eq!(e.pod_sandbox_status.as_ref().unwrap().id, pod);
        assert_eq!(e.containers_statuses[0].id, c);
        assert!(e.created_at > 0);
        seen.push(cri::ContainerEventType::try_from(e.container_event_type).unwrap());
    }
    use cri::ContainerEventType::*;
    assert_eq!(
        seen,
        vec![
            ContainerCreatedEvent,
            ContainerStartedEvent,
            ContainerStoppedEvent,
            ContainerDeletedEvent
        ]
    );

    // OOM kill: tmpfs pages count against the container's 16 MiB limit.
    let mut hog = container_config(
        "hog",
        &env.busybox,
        &[
            "sh",
            "-c",
            "exec dd if=/dev/zero of=/dev/shm/fill bs=1M count=48",
        ],
    );
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        security_context: None,
    });
    let h = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(hog),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: h.clone(),
    })
    .await
    .unwrap();
    let s = wait_exited(&mut rt, &h).await;
    assert_eq!(s.exit_code, 137, "{s:?}");
    assert_eq!(s.reason, "OOMKilled");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_containerd_restart() {
    let env = Env::get();
    let name = format!(
        "containerd-restart-{:06x}",
        rand::random::<u32>() % 0xffffff
    );
    let (sock, pid) = imacri_integration::start_containerd_pid(&env.base, &name, false).unwrap();
    let d = Imacri::start_full(
        env,
        "restart",
        &["--containerd-address", sock.to_str().unwrap()],
    )
    .await
    .unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "ctd-restart").await;
    let mk = |name: &str, cmd: &[&str]| cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container_config(name, &env.busybox, cmd)),
        sandbox_config: Some(cfg.clone()),
    };
    let long = rt
        .create_container(mk("long", &["sleep", "1000"]))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let short = rt
        .create_container(mk("short", &["sh", "-c", "sleep 3; exit 5"]))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    for c in [&long, &short] {
        rt.start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    }

    // containerd goes away (its shims and our containers keep running).
    imacri_integration::restart_containerd(&env.base, &name, pid).unwrap();

    // The exit that happened meanwhile or after is recorded, exec works.
    let s = wait_exited(&mut rt, &short).await;
    assert_eq!(s.exit_code, 5);
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        match rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: long.clone(),
                cmd: vec!["echo".into(), "alive".into()],
                timeout: 5,
            })
            .await
        {
            Ok(r) => break r.into_inner().stdout,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("exec after containerd restart: {e}"),
        }
    };
    assert_eq!(out, b"alive\n");
    rt.stop_container(cri::StopContainerRequest {
        container_id: long.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    assert_eq!(
        container_status(&mut rt, &long).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(env
        .all_objects_at(&sock, "restart")
        .await
        .unwrap()
        .is_empty());
}

/// A pod sandbox reports its own lifecycle like a container (containerd's
/// events, kubelet's evented PLEG), and every event carries the pod's
/// status with all of its containers.
#[tokio::test(flavor = "multi_thread")]
async fn sandbox_events_carry_the_whole_pod() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let cfg = pod_config("sbevents");
    let pod = imacri_integration::client::run_pod(&mut rt, &cfg)
        .await
        .unwrap();
    let a = imacri_integration::client::start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("a", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    let b = imacri_integration::client::create_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("b", &env.busybox, &["sleep", "1000"]),
    )
    .await
    .unwrap();
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
    use cri::ContainerEventType::*;
    let mut pod_events = Vec::new();
    let mut b_created = None;
    while pod_events.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event")
            .unwrap()
            .unwrap();
        let kind = cri::ContainerEventType::try_from(e.container_event_type).unwrap();
        assert_eq!(e.pod_sandbox_status.as_ref().unwrap().id, pod);
        if e.container_id == pod {
            pod_events.push((kind, e.pod_sandbox_status.unwrap().state));
        } else if e.container_id == b && kind == ContainerCreatedEvent {
            b_created = Some(e.containers_statuses);
        }
    }
    let ready = cri::PodSandboxState::SandboxReady as i32;
    let not_ready = cri::PodSandboxState::SandboxNotready as i32;
    assert_eq!(
        pod_events,
        [
            (ContainerCreatedEvent, ready),
            (ContainerStartedEvent, ready),
            (ContainerStoppedEvent, not_ready),
            (ContainerDeletedEvent, not_ready),
        ]
    );
    let mut ids: Vec<String> = b_created.unwrap().into_iter().map(|s| s.id).collect();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);
}
