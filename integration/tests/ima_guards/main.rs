//! What an attacker inside an ima pod would try against the fanotify
//! backend, which sees only the filesystems it marks: executing from a
//! memfd (the kernel's internal shm mount), a nested user namespace with
//! a fresh tmpfs, and a node interpreter binfmt_misc opened in advance.
//! Each works in a plain pod (the control) and fails closed in an ima pod;
//! capabilities that would undo the guards are refused.

use imacri_integration::client::{create_container, exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::images::busybox_with_c;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use tonic::Code;

mod binfmt;
mod mounts;
mod namespaces;

fn ima(mut cfg: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg
}

/// Both shapes of an ima pod: sharing a pid namespace (pause is its init,
/// guarded through it) and as kubelet sends most pods, pid CONTAINER (no
/// pause: the user namespace is guarded by itself, each container's pid
/// namespace on its own).
fn ima_shapes(name: &str) -> [(cri::PodSandboxConfig, bool); 2] {
    let mut own = ima(pod_config(&format!("{name}-nopause")));
    imacri_integration::own_pids(&mut own);
    [(ima(pod_config(name)), true), (own, false)]
}

/// The pod's verbose info says whether it runs a pause process.
async fn assert_pause(rt: &mut imacri_integration::client::Rt, pod: &str, pause: bool) {
    let info = imacri_integration::client::pod_info(rt, pod).await;
    assert_eq!(info["infraContainer"], pause, "{info}");
}

/// Enough to keep two runs of this test on one node apart.
fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
