//! Stats and metrics from real cgroups: CPU that changes under load, memory,
//! writable layer, processes, pod network; and live resource updates.

use imacri_integration::{container_config, cri, Env, Imacri};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn stats_follow_the_workload() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "stats").await;
    let busy = container_config(
        "busy",
        &env.busybox,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/tmp/blob bs=1M count=8; yes > /dev/null",
        ],
    );
    let c = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(busy),
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

    let sample = |mut rt: cri::runtime_service_client::RuntimeServiceClient<_>, c: String| async move {
        rt.container_stats(cri::ContainerStatsRequest { container_id: c })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap()
    };
    let s1 = sample(rt.clone(), c.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s2 = sample(rt.clone(), c.clone()).await;
    let cpu1 = s1.cpu.unwrap().usage_core_nano_seconds.unwrap().value;
    let cpu2 = s2
        .cpu
        .as_ref()
        .unwrap()
        .usage_core_nano_seconds
        .as_ref()
        .unwrap()
        .value;
    assert!(cpu2 > cpu1, "cpu usage grows under load: {cpu1} -> {cpu2}");
    let cores = s2.cpu.unwrap().usage_nano_cores.unwrap().value;
    assert!(
        cores > 300_000_000,
        "a busy loop uses a good part of a core: {cores}"
    );
    let mem = s2.memory.unwrap();
    assert!(mem.working_set_bytes.unwrap().value > 0);
    assert!(
        s2.writable_layer.unwrap().used_bytes.unwrap().value >= 8 << 20,
        "the 8 MiB file is in the writable layer"
    );
    assert_eq!(s2.attributes.unwrap().id, c);

    let list = rt
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(cri::ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(list.len(), 1);

    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let l = ps.linux.unwrap();
    assert!(
        l.process.unwrap().process_count.unwrap().value >= 2,
        "pause, sh, yes"
    );
    assert!(l.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    let net = l.network.unwrap();
    assert_eq!(net.default_interface.as_ref().unwrap().name, "eth0");
    assert_eq!(l.containers.len(), 1);
    let all = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(all.len(), 1);

    let desc = rt
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .descriptors;
    assert!(desc
        .iter()
        .any(|d| d.name == "container_cpu_usage_seconds_total"));
    let metrics = rt
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics;
    let mine = metrics
        .iter()
        .find(|m| m.pod_sandbox_id == pod)
        .expect("pod metrics");
    assert!(mine.container_metrics.iter().any(|cm| cm.container_id == c
        && cm
            .metrics
            .iter()
            .any(|m| m.name == "container_memory_working_set_bytes")));

    // UpdateContainerResources reaches the cgroup and the status.
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 200 << 20,
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec![
                "cat".into(),
                "/sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
            ],
            timeout: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        (200u64 << 20).to_string()
    );
    let st = imacri_integration::client::container_status(&mut rt, &c).await;
    assert_eq!(
        st.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        200 << 20
    );
    // As in containerd: no Linux resources is no change, and an exited
    // container takes new ones into its status (nothing runs to update).
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c.clone(),
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
    update_memory(&mut rt, &c, 300 << 20).await;
    let st = imacri_integration::client::container_status(&mut rt, &c).await;
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(
        st.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        300 << 20
    );
    rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: pod.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// UpdateContainerResources of `c`'s memory limit alone.
async fn update_memory(rt: &mut imacri_integration::client::Rt, c: &str, bytes: i64) {
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c.into(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}
