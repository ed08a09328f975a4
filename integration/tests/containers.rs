//! Container specs as a process inside sees them: image config, users and
//! groups, read-only rootfs, mounts, devices, resources, capabilities,
//! oom_score_adj clamping, sysctls, host network; and what it prints, as
//! the CRI log gets it.

use imacri_integration::client::image;
use imacri_integration::{container_config, cri, pod_config, security_context, Env, Imacri};
use std::time::{Duration, Instant};

struct Pod {
    rt: cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    id: String,
    cfg: cri::PodSandboxConfig,
}

impl Pod {
    async fn new(d: &Imacri, cfg: cri::PodSandboxConfig) -> Pod {
        let mut rt = d.runtime().await.unwrap();
        let id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
            .into_inner()
            .pod_sandbox_id;
        Pod { rt, id, cfg }
    }

    /// Runs a container to completion; returns (exit code, stdout lines).
    async fn run(&mut self, c: cri::ContainerConfig) -> (i32, Vec<String>) {
        let (code, log) = self.run_log(c).await;
        let out = log
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
            .collect();
        (code, out)
    }

    /// Runs a container to completion; returns (exit code, its CRI log).
    async fn run_log(&mut self, c: cri::ContainerConfig) -> (i32, String) {
        let name = c.metadata.as_ref().unwrap().name.clone();
        let id = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(c),
                sandbox_config: Some(self.cfg.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
            .into_inner()
            .container_id;
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = self
                .rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if st.state == cri::ContainerState::ContainerExited as i32 {
                let log = std::fs::read_to_string(&st.log_path).unwrap_or_default();
                return (st.exit_code, log);
            }
            assert!(Instant::now() < deadline, "{name} did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn remove(mut self) {
        self.rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            })
            .await
            .unwrap();
        self.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn container_settings_take_effect() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut im = d.images().await.unwrap();
    for i in [&env.busybox, &env.configured] {
        im.pull_image(cri::PullImageRequest {
            image: image(i),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut cfg = pod_config("settings");
    cfg.linux.as_mut().unwrap().sysctls = [(
        "net.ipv4.ip_unprivileged_port_start".to_string(),
        "80".to_string(),
    )]
    .into();
    let mut pod = Pod::new(&d, cfg).await;

    // Image config: entrypoint + cmd, user by name, working dir, env.
    let mut c = container_config("configured", &env.configured, &[]);
    c.command.clear();
    let (code, out) = pod.run(c).await;
    assert_eq!(code, 0, "{out:?}");
    assert_eq!(out[0], "from-image");
    assert!(
        out[1].starts_with("uid=1000(alice) gid=1000(alice) groups=10(wheel),1000(alice)"),
        "{out:?}"
    );
    assert_eq!(out[2], "/home/alice");
    assert_eq!(out[3], "hello-image");

    // CRI overrides: args replace the image cmd; run_as_user/group; groups.
    let mut c = container_config("override", &env.configured, &[]);
    c.command.clear();
    c.args = vec!["id".into()];
    c.linux = security_context(|s| {
        s.run_as_user = Some(cri::Int64Value { value: 0 });
        s.run_as_group = Some(cri::Int64Value { value: 5 });
        s.supplemental_groups = vec![1234];
    });
    let (_, out) = pod.run(c).await;
    assert_eq!(out, vec!["uid=0(root) gid=5 groups=5,1234"]);
    let mut c = container_config("byname", &env.busybox, &["id", "-u"]);
    c.linux = security_context(|s| s.run_as_username = "alice".into());
    assert_eq!(pod.run(c).await.1, vec!["1000"]);

    // Read-only rootfs; /tmp from a writable mount still works.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host-file"), "from-host").unwrap();
    let mut c = container_config("readonly", &env.busybox, &["sh", "-c", "touch /x 2>/dev/null && echo wrote || echo denied; cat /data/host-file; echo; touch /data/new 2>/dev/null && echo rw || echo ro"]);
    c.linux = security_context(|s| s.readonly_rootfs = true);
    c.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: dir.path().to_string_lossy().into(),
        readonly: true,
        ..Default::default()
    }];
    assert_eq!(pod.run(c).await.1, vec!["denied", "from-host", "ro"]);

    // A hostPath that does not exist is created as a directory (containerd).
    let missing = dir.path().join("made/by/imacri");
    let mut c = container_config(
        "missing",
        &env.busybox,
        &["sh", "-c", "touch /m/f && echo ok"],
    );
    c.mounts = vec![cri::Mount {
        container_path: "/m".into(),
        host_path: missing.to_string_lossy().into(),
        ..Default::default()
    }];
    assert_eq!(pod.run(c).await.1, vec!["ok"]);
    assert!(missing.join("f").is_file());

    // Capabilities: drop ALL, add one.
    let mut c = container_config(
        "caps",
        &env.busybox,
        &["sh", "-c", "grep CapEff /proc/self/status"],
    );
    c.linux = security_context(|s| {
        s.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["ALL".into()],
            add_capabilities: vec!["CAP_NET_RAW".into()],
            ..Default::default()
        })
    });
    assert_eq!(pod.run(c).await.1, vec!["CapEff:\t0000000000002000"]);

    // Resources and oom_score_adj (clamped to imacri's own).
    let own: i64 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut c = container_config("resources", &env.busybox, &["sh", "-c", "cat /proc/self/oom_score_adj; cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"]);
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: -999,
            cpu_shares: 256,
            ..Default::default()
        }),
        security_context: None,
    });
    let out = pod.run(c).await.1;
    assert_eq!(out[0], own.max(-999).to_string());
    assert_eq!(out[1], (64u64 << 20).to_string());

    // Devices, sysctls, masked paths, shared /dev/shm, /etc files.
    let mut c = container_config("devices", &env.busybox, &["sh", "-c", "echo x > /dev/mynull && echo devok; cat /proc/sys/net/ipv4/ip_unprivileged_port_start; head -c 100 /proc/timer_list 2>&1 | wc -c; mount | grep -c timer_list; grep -c settings /etc/hostname; mount | grep -c ' /dev/shm '"]);
    c.devices = vec![cri::Device {
        container_path: "/dev/mynull".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    // kubelet's lists for procMount Default.
    c.linux = security_context(|s| {
        s.masked_paths = vec!["/proc/timer_list".into(), "/proc/kcore".into()];
        s.readonly_paths = vec!["/proc/sys".into()];
    });
    let unmasked = c.clone();
    assert_eq!(pod.run(c).await.1, vec!["devok", "80", "0", "1", "1", "1"]);
    // procMount Unmasked: kubelet sends empty lists, and nothing is masked.
    let mut c = unmasked;
    c.metadata.as_mut().unwrap().name = "unmasked".into();
    c.log_path = "unmasked/0.log".into();
    c.linux = None;
    let out = pod.run(c).await.1;
    assert_eq!(out, ["devok", "80", "100", "0", "1", "1"]);

    // Seccomp: creating a user namespace needs no capability, but the
    // runtime default profile forbids it; unconfined allows it.
    for (kind, expect) in [
        (
            cri::security_profile::ProfileType::RuntimeDefault,
            "blocked",
        ),
        (cri::security_profile::ProfileType::Unconfined, "allowed"),
    ] {
        let mut c = container_config(
            &format!("seccomp-{expect}"),
            &env.busybox,
            &[
                "sh",
                "-c",
                "unshare -U true 2>/dev/null && echo allowed || echo blocked",
            ],
        );
        c.linux = security_context(|s| {
            s.seccomp = Some(cri::SecurityProfile {
                profile_type: kind as i32,
                localhost_ref: String::new(),
            })
        });
        assert_eq!(pod.run(c).await.1, vec![expect.to_string()], "{kind:?}");
    }
    let mut c = container_config("apparmor", &env.busybox, &["true"]);
    c.linux = security_context(|s| {
        s.apparmor = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "my-profile".into(),
        })
    });
    let e = pod
        .rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(c),
            sandbox_config: Some(pod.cfg.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("AppArmor"), "{e}");

    // Exit codes are reported.
    let c = container_config("exit", &env.busybox, &["sh", "-c", "exit 42"]);
    let (code, _) = pod.run(c).await;
    assert_eq!(code, 42);
    pod.remove().await;

    // Host network: the node's hostname, no netns made.
    let mut cfg = pod_config("hostnet");
    cfg.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut pod = Pod::new(&d, cfg).await;
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let c = container_config("hostname", &env.busybox, &["hostname"]);
    assert_eq!(pod.run(c).await.1, vec![host]);
    assert!(!d.state.join("netns").join(&pod.id).exists());
    pod.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_handlers_map_to_configured_runtimes() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::get();
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let calls = dir.path().join("calls");
    let wrapper = dir.path().join("runc-wrapper");
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec {runc} \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg_file = dir.path().join("config.toml");
    std::fs::write(
        &cfg_file,
        format!("[runtimes.runc]\n[runtimes.wrapped]\nruntime_type = \"io.containerd.runc.v2\"\nbinary_name = \"{}\"\n", wrapper.display()),
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--config", cfg_file.to_str().unwrap()])
        .await
        .unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = rt
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, vec!["", "runc", "wrapped"]);
    d.pull(&env.busybox).await;
    let pcfg = pod_config("handler");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pcfg.clone()),
            runtime_handler: "wrapped".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner()
        .pod_sandbox_id;
    let c = imacri_integration::client::start_container(
        &mut rt,
        &pod,
        &pcfg,
        container_config("c", &env.busybox, &["true"]),
    )
    .await;
    imacri_integration::client::wait_exited(&mut rt, &c).await;
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(
        log.contains(&pod) && log.contains(&c),
        "the wrapper ran both: {log}"
    );
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status.unwrap().runtime_handler, "wrapped");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// The log copiers (tasks on imacri's runtime) keep up with a flood: every
/// line in order, a long line split into 16 KiB partial entries, the other
/// stream alongside, nothing lost at exit.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_output_is_logged_whole_and_in_order() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut pod = Pod::new(&d, pod_config("flood")).await;
    let script = "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done; \
                  head -c 40000 /dev/zero | tr '\\0' x; echo; echo done >&2";
    let (code, log) = pod
        .run_log(container_config(
            "flood",
            &env.busybox,
            &["sh", "-c", script],
        ))
        .await;
    assert_eq!(code, 0, "{}", d.log());
    let entries: Vec<(String, String, String)> = log
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ').skip(1);
            let mut next = || p.next().unwrap_or_default().to_string();
            (next(), next(), next())
        })
        .collect();
    let out: Vec<_> = entries.iter().filter(|e| e.0 == "stdout").collect();
    assert_eq!(out.len(), 20000 + 3, "stdout entries");
    for (i, e) in out.iter().take(20000).enumerate() {
        assert_eq!(
            (e.1.as_str(), e.2.as_str()),
            ("F", format!("line {i}").as_str())
        );
    }
    let long: Vec<_> = out[20000..]
        .iter()
        .map(|e| (e.1.as_str(), e.2.len()))
        .collect();
    assert_eq!(long, [("P", 16384), ("P", 16384), ("F", 40000 - 2 * 16384)]);
    assert!(out[20000..].iter().all(|e| e.2.bytes().all(|b| b == b'x')));
    let err: Vec<_> = entries.iter().filter(|e| e.0 == "stderr").collect();
    assert_eq!(err.len(), 1);
    assert_eq!((err[0].1.as_str(), err[0].2.as_str()), ("F", "done"));
    pod.remove().await;
}

/// Containers that exit the moment they start, started all at once: each
/// start succeeds (containerd's Start asks the task for its state after
/// starting it, so the exit seen meanwhile must not delete the task under
/// it), each ends Completed with its exit code, and each is removable.
#[tokio::test(flavor = "multi_thread")]
async fn containers_that_exit_at_once_start_and_complete() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let pod = Pod::new(&d, pod_config("instant")).await;
    for round in 0..3 {
        let mut ids = Vec::new();
        for i in 0..12 {
            let mut rt = pod.rt.clone();
            let c = container_config(&format!("i{round}-{i}"), &env.busybox, &["true"]);
            let id = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.id.clone(),
                    config: Some(c),
                    sandbox_config: Some(pod.cfg.clone()),
                })
                .await
                .unwrap_or_else(|e| panic!("create: {e}\n{}", d.log()))
                .into_inner()
                .container_id;
            ids.push(id);
        }
        let starts = ids.iter().map(|id| {
            let mut rt = pod.rt.clone();
            let id = id.clone();
            async move {
                rt.start_container(cri::StartContainerRequest { container_id: id })
                    .await
            }
        });
        for r in futures::future::join_all(starts).await {
            r.unwrap_or_else(|e| panic!("start: {e}\n{}", d.log()));
        }
        let mut rt = pod.rt.clone();
        for id in &ids {
            let st = imacri_integration::client::wait_exited(&mut rt, id).await;
            assert_eq!(
                (st.exit_code, st.reason.as_str()),
                (0, "Completed"),
                "{st:?}"
            );
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("remove: {e}\n{}", d.log()));
        }
    }
    pod.remove().await;
}
