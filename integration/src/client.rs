//! CRI calls the end-to-end tests share: run a pod, start a container, exec,
//! wait for an exit, read verbose info.

use crate::cri;
use std::time::{Duration, Instant};

pub type Rt = cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

pub fn image(s: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: s.into(),
        ..Default::default()
    })
}

/// Every pod sandbox the runtime lists.
pub async fn pods(rt: &mut Rt) -> Vec<cri::PodSandbox> {
    rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items
}

pub async fn run_pod(rt: &mut Rt, cfg: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(cfg.clone()),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

pub async fn create_container(
    rt: &mut Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(c),
        sandbox_config: Some(cfg.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// Creates and starts a container; panics with the error otherwise.
pub async fn start_container(
    rt: &mut Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> String {
    let name = c
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = create_container(rt, pod, cfg, c)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("start {name}: {e}"));
    id
}

pub async fn container_status(rt: &mut Rt, id: &str) -> cri::ContainerStatus {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

pub async fn wait_exited(rt: &mut Rt, id: &str) -> cri::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = container_status(rt, id).await;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `sh -c cmd` through ExecSync: (exit code, stdout, stderr).
pub async fn exec_sh(rt: &mut Rt, id: &str, cmd: &str) -> (i32, String, String) {
    exec_sh_within(rt, id, cmd, 15).await
}

/// As [`exec_sh`], with its own timeout (seconds): for races run many
/// times on a starved CPU, which the full suite's load slows.
pub async fn exec_sh_within(
    rt: &mut Rt,
    id: &str,
    cmd: &str,
    timeout: i64,
) -> (i32, String, String) {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout,
        })
        .await
        .unwrap()
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

/// PodSandboxStatus's status (not verbose).
pub async fn pod_status(rt: &mut Rt, pod: &str) -> cri::PodSandboxStatus {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

/// The `info` JSON of verbose PodSandboxStatus.
pub async fn pod_info(rt: &mut Rt, pod: &str) -> serde_json::Value {
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&st.info["info"]).unwrap()
}

/// The `info` JSON of verbose ContainerStatus (pid, runtimeSpec, ...).
pub async fn container_info(rt: &mut Rt, id: &str) -> serde_json::Value {
    let st = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&st.info["info"]).unwrap()
}

pub async fn remove_pod(rt: &mut Rt, pod: &str) {
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
}

/// `sh -c cmd` that must succeed: its trimmed stdout.
pub async fn sh_ok(rt: &mut Rt, id: &str, cmd: &str) -> String {
    let (code, out, err) = exec_sh(rt, id, cmd).await;
    assert_eq!(code, 0, "{cmd}: {err}");
    out.trim().to_string()
}

/// Verbose Status's `config` info (imacri's settings and counters).
pub async fn status_info(rt: &mut Rt) -> serde_json::Value {
    let st = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&st.info["config"]).unwrap()
}

/// The `integrity` part of verbose Status (the engine's counters).
pub async fn integrity_stats(rt: &mut Rt) -> serde_json::Value {
    status_info(rt).await["integrity"].clone()
}
