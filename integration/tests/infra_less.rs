//! Pods without a pause process (`drop_infra_container`, CRI-O's
//! drop_infra_ctr): a pod that shares no pid namespace and is neither a
//! user-namespace nor an ima pod gets no pause task; its containers share
//! the UTS, IPC and network namespaces imacri pinned, with the pod's
//! hostname and sysctls, across an imacri crash; nothing is left after it.

use imacri_integration::client::{
    exec_sh, pod_info, pod_status, run_pod, sh_ok, start_container, Rt,
};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::collections::HashMap;

fn sysctls() -> HashMap<String, String> {
    HashMap::from([
        ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
        (
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "81".to_string(),
        ),
    ])
}

/// A pod as kubelet sends one without shareProcessNamespace: pid CONTAINER
/// (a config without namespace options means POD, which keeps pause).
fn kubelets_pod(name: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    imacri_integration::own_pids(&mut cfg);
    cfg
}

async fn start(
    rt: &mut Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    name: &str,
    image: &str,
) -> String {
    start_container(
        rt,
        pod,
        cfg,
        container_config(name, image, &["sleep", "600"]),
    )
    .await
}

/// The values of [`sysctls`] a container sees.
async fn applied_sysctls(rt: &mut Rt, id: &str) -> String {
    sh_ok(
        rt,
        id,
        "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_unprivileged_port_start",
    )
    .await
}

/// Hostname and the UTS, IPC and network namespaces a container is in.
async fn ns_of(rt: &mut Rt, id: &str) -> String {
    sh_ok(
        rt,
        id,
        "hostname; for n in uts ipc net; do readlink /proc/self/ns/$n; done",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_without_pause_shares_its_pinned_namespaces() {
    let env = Env::get();
    let ns = format!("iso-{:08x}", rand::random::<u32>());
    let mut d = Imacri::start_full(env, &ns, &[]).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = kubelets_pod("nopause");
    cfg.linux.get_or_insert_default().sysctls = sysctls();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["infraContainer"], false, "{info}");
    assert_eq!(info["pid"], 0, "{info}");
    // No pause container or task in containerd.
    let objects = env.all_objects(&ns).await.unwrap();
    assert!(
        !objects.iter().any(|o| o.contains(&pod)),
        "pause of {pod} in containerd: {objects:?}"
    );

    let a = start(&mut rt, &pod, &cfg, "a", &env.busybox).await;
    let b = start(&mut rt, &pod, &cfg, "b", &env.busybox).await;
    let (na, nb) = (ns_of(&mut rt, &a).await, ns_of(&mut rt, &b).await);
    assert!(na.starts_with("nopause\n"), "{na}");
    assert_eq!(na, nb, "the pod's containers share UTS, IPC and network");
    let host_uts = std::fs::read_link("/proc/self/ns/uts").unwrap();
    assert!(
        !na.contains(&host_uts.to_string_lossy().to_string()),
        "{na}"
    );
    assert_eq!(applied_sysctls(&mut rt, &a).await, "1\n81");
    // /dev/shm and the network are the pod's.
    sh_ok(&mut rt, &a, "echo shared > /dev/shm/x").await;
    assert_eq!(sh_ok(&mut rt, &b, "cat /dev/shm/x").await, "shared");
    let ip = pod_status(&mut rt, &pod)
        .await
        .network
        .map(|n| n.ip)
        .expect("pod IP");
    assert!(sh_ok(&mut rt, &b, "ip -4 addr show eth0")
        .await
        .contains(&ip));
    let stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let net = stats.linux.unwrap().network.unwrap();
    assert_eq!(net.default_interface.unwrap().name, "eth0");

    // A crash: the pod stays ready, its containers keep running, a new
    // container joins the same namespaces.
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    assert_eq!(
        pod_status(&mut rt, &pod).await.state,
        cri::PodSandboxState::SandboxReady as i32
    );
    let c = start(&mut rt, &pod, &cfg, "c", &env.busybox).await;
    assert_eq!(ns_of(&mut rt, &c).await, na);
    let (code, _, _) = exec_sh(&mut rt, &a, "true").await;
    assert_eq!(code, 0);

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let pins: Vec<_> = std::fs::read_dir(d.state.join("podns"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        pins.is_empty(),
        "pinned namespaces left after stop: {pins:?}"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let left = env.all_objects(&ns).await.unwrap();
    assert!(left.is_empty(), "left in containerd: {left:?}");
}

/// Pods that need pause keep it: a shared pid namespace (pause is its
/// init); a sysctl no namespace of the pod's holds is refused up front,
/// leaving nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn pause_stays_where_it_is_needed_and_bad_sysctls_change_nothing() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut shared = pod_config("sharedpid");
    shared
        .linux
        .get_or_insert_default()
        .security_context
        .get_or_insert_default()
        .namespace_options = Some(cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    });
    let pod = run_pod(&mut rt, &shared).await.unwrap();
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["infraContainer"], true, "{info}");
    assert!(info["pid"].as_u64().unwrap_or(0) > 0, "{info}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;

    let before = imacri_integration::client::pods(&mut rt).await.len();
    let mut bad = kubelets_pod("badsysctl");
    bad.linux.get_or_insert_default().sysctls =
        HashMap::from([("vm.swappiness".to_string(), "10".to_string())]);
    let e = run_pod(&mut rt, &bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("vm.swappiness"), "{e}");
    let after = imacri_integration::client::pods(&mut rt).await.len();
    assert_eq!(before, after);
}

/// A `hostUsers: false` pod without pause: its UTS and IPC namespaces are
/// made inside its user namespace (so its containers, which join that
/// first, may join them), with its hostname and sysctls.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_namespace_pod_without_pause() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = kubelets_pod("nopause-userns");
    let map = vec![cri::IdMapping {
        host_id: 3_000_000 + (rand::random::<u32>() % 64) * 65536,
        container_id: 0,
        length: 65536,
    }];
    let linux = cfg.linux.get_or_insert_default();
    linux.sysctls = sysctls();
    linux
        .security_context
        .get_or_insert_default()
        .namespace_options
        .get_or_insert_default()
        .userns_options = Some(cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: map.clone(),
        gids: map.clone(),
    });
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["infraContainer"], false, "{info}");
    let a = start(&mut rt, &pod, &cfg, "a", &env.busybox).await;
    let b = start(&mut rt, &pod, &cfg, "b", &env.busybox).await;
    let na = ns_of(&mut rt, &a).await;
    assert!(na.starts_with("nopause-userns\n"), "{na}");
    assert_eq!(na, ns_of(&mut rt, &b).await);
    let uid_map = sh_ok(&mut rt, &a, "cat /proc/self/uid_map").await;
    assert!(uid_map.contains(&map[0].host_id.to_string()), "{uid_map}");
    assert_eq!(applied_sysctls(&mut rt, &a).await, "1\n81");
    // Its UTS and IPC namespaces belong to the pod's user namespace, as
    // pause's would.
    let userns = info["userNamespace"]["path"].as_str().unwrap();
    let owner = |kind: &str| {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::fs::MetadataExt;
        let pin = info["pinnedNamespaces"][kind].as_str().unwrap();
        let f = std::fs::File::open(pin).unwrap();
        const NS_GET_USERNS: libc::c_ulong = 0xb701;
        // SAFETY: an ioctl on an fd we own; it returns a new fd.
        let fd = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_USERNS) };
        assert!(fd >= 0, "NS_GET_USERNS on {pin}");
        // SAFETY: the ioctl's fresh fd, owned here.
        let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        owner.metadata().unwrap().ino()
    };
    let pod_userns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(userns).unwrap().ino()
    };
    assert_eq!(owner("uts"), pod_userns);
    assert_eq!(owner("ipc"), pod_userns);
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// A reboot empties `/run`: a pod without pause whose pins are gone when
/// imacri starts is NotReady (kubelet makes a new one), and its stop and
/// removal still succeed.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_pins_are_gone_is_not_ready() {
    let env = Env::get();
    let ns = format!("iso-{:08x}", rand::random::<u32>());
    let mut d = Imacri::start_full(env, &ns, &[]).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &kubelets_pod("lostpins")).await.unwrap();
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["infraContainer"], false, "{info}");
    d.kill();
    let uts = std::path::PathBuf::from(info["pinnedNamespaces"]["uts"].as_str().unwrap());
    nix::mount::umount2(&uts, nix::mount::MntFlags::MNT_DETACH).unwrap();
    std::fs::remove_file(&uts).unwrap();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    assert_eq!(
        pod_status(&mut rt, &pod).await.state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    let left = env.all_objects(&ns).await.unwrap();
    assert!(left.is_empty(), "left in containerd: {left:?}");
}
