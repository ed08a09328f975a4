//! Bad input gets the right gRPC code and a message naming the problem, and
//! failures in the middle of RunPodSandbox / CreateContainer / StartContainer
//! leave nothing behind.

use imacri_integration::client::image;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use tonic::Code;

fn check(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("expected an error");
    assert_eq!(e.code(), code, "{e}");
    assert!(
        e.message().contains(needle),
        "message {:?} should mention {needle:?}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_are_rejected_with_clear_codes() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let mut im = d.images().await.unwrap();
    // A pod's flood of events cannot run imacri out of descriptors below
    // the hard limit: the soft limit was raised to it.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid().unwrap())).unwrap();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(nofile[0], nofile[1], "soft = hard: {limits}");

    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest::default())
            .await,
        Code::InvalidArgument,
        "config",
    );
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("bad")),
            runtime_handler: "kata".into(),
        })
        .await,
        Code::InvalidArgument,
        "kata",
    );
    let mut cfg = pod_config("bad");
    cfg.log_directory = "relative/dir".into();
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "log_directory",
    );
    // As lenient as containerd: no hostname means the node's, and empty
    // metadata fields are taken (only the metadata itself is required).
    let mut cfg = pod_config("no-hostname");
    cfg.hostname.clear();
    let mut bare = pod_config("");
    let md = bare.metadata.as_mut().unwrap();
    (md.namespace, md.uid) = (String::new(), String::new());
    for cfg in [cfg, bare] {
        let id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{cfg:?} runs, as on containerd: {e}"))
            .into_inner()
            .pod_sandbox_id;
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap();
    }

    check(
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await,
        Code::NotFound,
        "nope",
    );
    // Stop is idempotent: kubelet and critest expect success for an ID that
    // is already gone.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .unwrap();
    rt.stop_container(cri::StopContainerRequest {
        container_id: "nope".into(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .unwrap();
    check(
        rt.container_status(cri::ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await,
        Code::NotFound,
        "nope",
    );
    check(
        rt.start_container(cri::StartContainerRequest {
            container_id: "nope".into(),
        })
        .await,
        Code::NotFound,
        "nope",
    );
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await
    .unwrap();
    check(
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: "x".into(),
            cmd: vec![],
            timeout: 0,
        })
        .await,
        Code::InvalidArgument,
        "cmd",
    );

    // Images.
    check(
        im.pull_image(cri::PullImageRequest::default()).await,
        Code::InvalidArgument,
        "image",
    );
    check(
        im.pull_image(cri::PullImageRequest {
            image: image("Not A Reference"),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "Not A Reference",
    );
    check(
        im.pull_image(cri::PullImageRequest {
            image: image(&format!("{}/test/missing:1", env.registry)),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "missing",
    );
    let st = im
        .image_status(cri::ImageStatusRequest {
            image: image("never-pulled:1"),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.image.is_none());
    im.remove_image(cri::RemoveImageRequest {
        image: image("never-pulled:1"),
    })
    .await
    .unwrap();
    // None named is one not found, as in containerd.
    for spec in [None, image("")] {
        let st = im
            .image_status(cri::ImageStatusRequest {
                image: spec.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(st.image.is_none());
        im.remove_image(cri::RemoveImageRequest { image: spec })
            .await
            .unwrap();
    }

    // Containers in a real pod.
    im.pull_image(cri::PullImageRequest {
        image: image(&env.busybox),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = pod_config("errors");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let create = |c: cri::ContainerConfig, pod: &str| cri::CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(c),
        sandbox_config: Some(cfg.clone()),
    };
    // CreateContainer's bad requests, one row each: (config, pod, code, the
    // text the message must name).
    let with = |f: fn(&mut cri::ContainerConfig)| {
        let mut c = container_config("c", &env.busybox, &["true"]);
        f(&mut c);
        c
    };
    let cases: Vec<(cri::ContainerConfig, &str, Code, &str)> = vec![
        (with(|_| {}), "nope", Code::NotFound, "nope"),
        (
            container_config("c", "not-pulled/image:1", &["true"]),
            &pod,
            Code::NotFound,
            "not-pulled/image:1",
        ),
        (
            with(|c| c.log_path = "../../../etc/evil".into()),
            &pod,
            Code::InvalidArgument,
            "log_path",
        ),
        (
            with(|c| {
                c.mounts = vec![cri::Mount {
                    container_path: "/data".into(),
                    host_path: "does/not/exist".into(),
                    ..Default::default()
                }]
            }),
            &pod,
            Code::InvalidArgument,
            "does/not/exist",
        ),
        (
            with(|c| {
                c.mounts = vec![cri::Mount {
                    container_path: "../x".into(),
                    host_path: "/tmp".into(),
                    ..Default::default()
                }]
            }),
            &pod,
            Code::InvalidArgument,
            "container_path",
        ),
        (
            with(|c| {
                c.mounts = vec![cri::Mount {
                    container_path: "/img".into(),
                    readonly: false,
                    image: Some(cri::ImageSpec {
                        image: "busybox".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]
            }),
            &pod,
            Code::InvalidArgument,
            "read-only",
        ),
    ];
    for (c, p, code, needle) in cases {
        check(rt.create_container(create(c, p)).await, code, needle);
    }
    // As containerd: a container without a name is made.
    let mut unnamed = container_config("", &env.busybox, &["true"]);
    unnamed.log_path = "unnamed.log".into();
    let unnamed = rt
        .create_container(create(unnamed, &pod))
        .await
        .unwrap_or_else(|e| panic!("a container without a name: {e}"))
        .into_inner()
        .container_id;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: unnamed,
    })
    .await
    .unwrap();

    let first = rt
        .create_container(create(
            container_config("dup", &env.busybox, &["true"]),
            &pod,
        ))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    check(
        rt.create_container(create(
            container_config("dup", &env.busybox, &["true"]),
            &pod,
        ))
        .await,
        Code::AlreadyExists,
        &first,
    );
    check(
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: first.clone(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await,
        Code::FailedPrecondition,
        "not running",
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let left = env.leftovers(&[&pod, &first]).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_roll_back_everything() {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;

    // runc rejects the sysctl at task creation: after netns, shm, snapshot
    // and container were made.
    let mut cfg = pod_config("rollback");
    cfg.linux.as_mut().unwrap().sysctls =
        [("kernel.no_such_sysctl".to_string(), "1".to_string())].into();
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert!(
        env.all_objects(&d.namespace).await.unwrap().is_empty(),
        "{:?}",
        env.all_objects(&d.namespace).await
    );
    assert_eq!(
        std::fs::read_dir(d.state.join("netns"))
            .map(|r| r.count())
            .unwrap_or(0),
        0,
        "netns left"
    );
    assert_eq!(
        std::fs::read_dir(d.root.join("sandboxes")).unwrap().count(),
        0,
        "record left"
    );
    let sandboxes_state = d.state.join("sandboxes");
    assert_eq!(
        std::fs::read_dir(&sandboxes_state)
            .map(|r| r.count())
            .unwrap_or(0),
        0,
        "files left"
    );
    let listed = imacri_integration::client::pods(&mut rt).await;
    assert!(listed.is_empty());
    // The name is free again.
    cfg.linux.as_mut().unwrap().sysctls.clear();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let before = env.all_objects(&d.namespace).await.unwrap();

    // CreateContainer fails after its snapshot was prepared.
    let mut c = container_config("c", &env.busybox, &["true"]);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "no-such-user".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no-such-user"), "{e}");
    assert_eq!(env.all_objects(&d.namespace).await.unwrap(), before);
    assert_eq!(
        std::fs::read_dir(d.root.join("containers"))
            .unwrap()
            .count(),
        0
    );

    // StartContainer fails (no such executable): the container is Exited
    // with StartError and no task is left.
    let c = container_config("bad-cmd", &env.busybox, &["/no/such/binary"]);
    let cid = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let e = rt
        .start_container(cri::StartContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("/no/such/binary"), "{e}");
    let st = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.reason, "StartError");
    assert!(st.message.contains("/no/such/binary"));
    let objs = env.all_objects(&d.namespace).await.unwrap();
    assert!(!objs.contains(&format!("task {cid}")), "{objs:?}");

    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_containerd_with_its_own_cri_plugin() {
    let env = Env::get();
    let sock =
        imacri_integration::start_containerd(&env.base, "containerd-with-cri", true).unwrap();
    let r = Imacri::start_full(
        env,
        "k8s.io",
        &["--containerd-address", sock.to_str().unwrap()],
    )
    .await;
    let err = format!("{:#}", r.err().expect("imacri must refuse to start"));
    assert!(
        err.contains("CRI plugin") && err.contains("disabled_plugins"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_and_unreachable_containerd() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let r = Imacri::start_full(
        env,
        &env.namespace,
        &["--config", "/nonexistent/config.toml"],
    )
    .await;
    let err = format!("{:#}", r.err().expect("must fail"));
    assert!(err.contains("/nonexistent/config.toml"), "{err}");

    // containerd not there: retried for connect_timeout_secs, then a clear error.
    let missing = env.base.join("no-containerd.sock");
    let cfg = env.base.join("short-timeout.toml");
    std::fs::write(&cfg, "[containerd]\nconnect_timeout_secs = 1\n").unwrap();
    let r = Imacri::start_full(
        env,
        &env.namespace,
        &[
            "--containerd-address",
            missing.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    )
    .await;
    let err = format!("{:#}", r.err().expect("must fail"));
    assert!(
        err.contains("not reachable") && err.contains("no-containerd.sock"),
        "{err}"
    );
}

#[test]
fn check_reports_each_capability() {
    let env = Env::get();
    let out = std::process::Command::new(imacri_integration::imacri_bin())
        .args([
            "check",
            "--containerd-address",
            env.containerd_sock.to_str().unwrap(),
        ])
        .args([
            "--cni-conf-dir",
            env.cni_conf_dir.to_str().unwrap(),
            "--cni-bin-dir",
            "/usr/lib/cni",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for name in [
        "containerd ",
        "runc ",
        "cgroups ",
        "user-namespaces ",
        "ima-namespaces ",
        "ima-guards ",
        "ima-map-guard ",
        "ima-exec-window ",
        "ima-open-files ",
        "ima-restarts ",
        "idmapped-rootfs ",
        "criu ",
        "cni ",
        "seccomp ",
        "apparmor ",
        "selinux ",
        "tpm ",
        "nri ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "no {name:?} line in\n{text}"
        );
    }
    for ok in [
        "cni ",
        "ima-guards ",
        "ima-map-guard ",
        "ima-exec-window ",
        "idmapped-rootfs ",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(ok) && l.contains(" ok ")),
            "{ok}: {text}"
        );
    }
    let bad = std::process::Command::new(imacri_integration::imacri_bin())
        .args(["check", "--containerd-address", "/nonexistent.sock"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// An imacri whose hard open-file limit leaves too small a share for a
/// full node of ima pods' leases is told so, with what to raise.
#[test]
fn check_names_a_low_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(imacri_integration::imacri_bin());
    cmd.args(["check", "--containerd-address", "/nonexistent.sock"]);
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2000,
                rlim_max: 2000,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("ima-open-files "))
        .unwrap_or_else(|| panic!("no ima-open-files line in\n{text}"));
    assert!(
        line.contains(" missing ")
            && line.contains("imacri runs with 2000 open files")
            && line.contains("500 for ima pods' leases")
            && line.contains("LimitNOFILE=infinity"),
        "{line}"
    );
}
