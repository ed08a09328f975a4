//! CNI networking with Debian's real plugins (bridge, host-local, portmap,
//! loopback): pod IPs, pod-to-pod traffic, host ports, NetworkReady, and no
//! IPAM lease or netns left after stop.

use imacri_integration::client::{exec_sh, Rt};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::io::{Read, Write};
use tonic::Code;

async fn pod_with(
    rt: &mut Rt,
    cfg: &cri::PodSandboxConfig,
    cmd: &[&str],
    env: &Env,
) -> (String, String, String) {
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let ip = pod_network(rt, &pod).await.ip;
    let c = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("main", &env.busybox, cmd)),
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
    (pod, ip, c)
}

async fn pod_network(rt: &mut Rt, pod: &str) -> cri::PodSandboxNetworkStatus {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
    .network
    .unwrap()
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    let prefix: Vec<&str> = subnet.split('.').take(2).collect();
    ip.starts_with(&format!("{}.{}.", prefix[0], prefix[1]))
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_get_ips_talk_and_release_them() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;

    let st = rt
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let net = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(net.status, "{net:?}");

    let cfg_a = pod_config("net-a");
    let (pod_a, ip_a, c_a) = pod_with(&mut rt, &cfg_a, &["sleep", "1000"], env).await;
    // B runs a web server on :80 and publishes it on a host port.
    let host_port = 20000 + (rand::random::<u16>() % 20000) as i32;
    let mut cfg_b = pod_config("net-b");
    cfg_b.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port,
        host_ip: String::new(),
    }];
    let (pod_b, ip_b, _) = pod_with(
        &mut rt,
        &cfg_b,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-b > /www/index.html && httpd -f -p 80 -h /www",
        ],
        env,
    )
    .await;
    assert!(
        in_subnet(&ip_a, &env.pod_subnet) && in_subnet(&ip_b, &env.pod_subnet),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);

    let (code, out, _) = exec_sh(&mut rt, &c_a, &format!("ping -c 1 -W 5 {ip_b}")).await;
    assert_eq!(code, 0, "ping: {out}");
    let (code, out, _) = exec_sh(&mut rt, &c_a, "ip -4 addr show eth0; ip link show lo").await;
    assert_eq!(code, 0);
    assert!(out.contains(&ip_a) && out.contains("UP"), "{out}");
    let mut fetched = String::new();
    for _ in 0..50 {
        let (code, out, _) = exec_sh(&mut rt, &c_a, &format!("wget -q -O - http://{ip_b}/")).await;
        if code == 0 {
            fetched = out;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(fetched.trim(), "hello-from-b");

    // Host port (portmap): from the host, through the bridge's gateway address.
    let gateway = env.pod_subnet.replace(".0.0/16", ".0.1");
    let mut s = std::net::TcpStream::connect((gateway.as_str(), host_port as u16))
        .unwrap_or_else(|e| panic!("connect {gateway}:{host_port}: {e}"));
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("hello-from-b"), "{resp}");

    // Stop releases the IP (host-local lease file) and the netns.
    let lease = env.base.join("cni-ipam").join("imacri-test").join(&ip_a);
    assert!(lease.exists(), "{} missing", lease.display());
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod_a.clone(),
    })
    .await
    .unwrap();
    assert!(!lease.exists(), "IPAM lease leaked");
    assert!(!d.state.join("netns").join(&pod_a).exists());
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod_a.clone(),
    })
    .await
    .unwrap();
    for p in [pod_a, pod_b] {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_cni_config_means_network_not_ready() {
    let env = Env::get();
    let empty = tempfile::tempdir_in(&env.base).unwrap();
    let d = Imacri::start_full(
        env,
        &env.namespace,
        &["--cni-conf-dir", empty.path().to_str().unwrap()],
    )
    .await
    .unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = rt
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let net = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(
        !net.status
            && net.reason == "NetworkPluginNotReady"
            && net.message.contains("no network config"),
        "{net:?}"
    );
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("nonet")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("networking is not ready"), "{e}");
    assert_eq!(
        std::fs::read_dir(d.state.join("netns"))
            .map(|r| r.count())
            .unwrap_or(0),
        0,
        "netns leaked"
    );
    // Host-network pods need no CNI.
    let mut cfg = pod_config("hostnet-nocni");
    cfg.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    // A config dropped in later is picked up without a restart.
    std::fs::copy(
        env.cni_conf_dir.join("10-imacri-test.conflist"),
        empty.path().join("10-imacri-test.conflist"),
    )
    .unwrap();
    let st = rt
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(st
        .status
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.r#type == "NetworkReady" && c.status));
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// Dual-stack: a host-local config with an IPv4 and an IPv6 range gives the
/// pod both, IPv4 first in PodSandboxStatus, both inside the pod, and stop
/// releases both leases.
#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_pod_gets_both_ips() {
    let env = Env::get();
    let conf = tempfile::tempdir_in(&env.base).unwrap();
    let n = std::process::id() % 250 + 1;
    let bridge = format!("imv6{}", std::process::id() % 100000);
    let ipam_dir = conf.path().join("ipam");
    let net = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "imacri-dual",
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [
                    [{"subnet": format!("100.64.{n}.0/24")}],
                    [{"subnet": format!("fd42:{n:x}::/64")}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dataDir": ipam_dir.to_string_lossy(),
            }
        }]
    });
    std::fs::write(
        conf.path().join("10-dual.conflist"),
        serde_json::to_vec_pretty(&net).unwrap(),
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--cni-conf-dir", conf.path().to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("dual");
    let (pod, ip, c) = pod_with(&mut rt, &cfg, &["sleep", "1000"], env).await;
    let st = pod_network(&mut rt, &pod).await;
    assert!(
        ip.starts_with(&format!("100.64.{n}.")),
        "IPv4 first: {st:?}"
    );
    assert_eq!(st.additional_ips.len(), 1, "{st:?}");
    let v6 = st.additional_ips[0].ip.clone();
    assert!(v6.starts_with(&format!("fd42:{n:x}:")), "{st:?}");
    let (code, out, err) = exec_sh(
        &mut rt,
        &c,
        "ip -6 addr show dev eth0; ip -4 addr show dev eth0",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&v6) && out.contains(&ip), "{out}");

    let leases: Vec<_> = [&ip, &v6]
        .iter()
        .map(|a| ipam_dir.join("imacri-dual").join(a))
        .collect();
    for l in &leases {
        assert!(l.exists(), "{} missing", l.display());
    }
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    for l in &leases {
        assert!(!l.exists(), "lease {} leaked", l.display());
    }
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .status();
}
