//! User namespaces and the pod `ima` setting, end to end: mappings a
//! container really sees, shared namespaces across a pod's containers,
//! rejection of containers that would escape, the kernel backend's clear
//! failure on this kernel, and the ID pool (no overlap, kept across restarts).

use imacri_integration::client::{
    create_container, pod_info, remove_pod, run_pod, sh_ok, start_container,
};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Code;

fn ima_pod(name: &str, via_field: bool) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    if via_field {
        cfg.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
            ima: true,
            ..Default::default()
        });
    } else {
        cfg.annotations
            .insert("imacri.dev/ima".into(), "true".into());
    }
    cfg
}

fn sleeper(name: &str, env: &Env) -> cri::ContainerConfig {
    container_config(name, &env.busybox, &["sleep", "1000"])
}

#[tokio::test(flavor = "multi_thread")]
async fn userns_pod_with_kubelet_mappings() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    let mut cfg = pod_config("userns");
    imacri_integration::pod_userns(&mut cfg, 3_000_000);
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = start_container(&mut rt, &pod, &cfg, sleeper("c", env)).await;
    assert_eq!(
        sh_ok(&mut rt, &c, "cat /proc/self/uid_map | tr -s ' '").await,
        "0 3000000 65536"
    );
    // Image files appear owned by in-pod root; the process is in-pod root.
    assert_eq!(
        sh_ok(
            &mut rt,
            &c,
            "stat -c %u:%g /bin/busybox /etc/passwd | sort -u"
        )
        .await,
        "0:0"
    );
    assert_eq!(
        sh_ok(&mut rt, &c, "id -u; touch /tmp/x && echo writable").await,
        "0\nwritable"
    );
    // No copy of the image: the layers are ID-mapped, not chowned. In-pod
    // root may write / and the image's files (copied up, still its own).
    let objects = env.all_objects(&d.namespace).await.unwrap();
    assert!(
        !objects.iter().any(|o| o.starts_with("snapshot remap-")),
        "{objects:?}"
    );
    assert_eq!(
        sh_ok(
            &mut rt,
            &c,
            "touch /new && echo hi >> /etc/passwd && stat -c %u /new /etc/passwd | sort -u"
        )
        .await,
        "0"
    );
    // Nothing staged is left mounted on the host.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(d.state.join("rootfs").to_str().unwrap()),
        "staged rootfs still mounted"
    );
    // Volumes are ID-mapped: host root's files are in-pod root's, and what
    // in-pod root writes is host root's on the host.
    let vol = tempfile::tempdir_in(&env.base).unwrap();
    std::fs::write(vol.path().join("from-host"), "x").unwrap();
    let mut with_vol = container_config("vol", &env.busybox, &["sleep", "1000"]);
    with_vol.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: vol.path().to_string_lossy().into(),
        ..Default::default()
    }];
    let v = start_container(&mut rt, &pod, &cfg, with_vol).await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &v,
            "stat -c %u /data/from-host; touch /data/from-pod && echo ok"
        )
        .await,
        "0\nok"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(vol.path().join("from-pod"))
            .unwrap()
            .uid(),
        0
    );
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: v.clone(),
    })
    .await
    .unwrap();
    assert!(
        !d.state.join("idmap").join(&v).exists(),
        "idmapped copies left"
    );
    // Not an ima pod.
    assert_eq!(pod_info(&mut rt, &pod).await["ima"]["enabled"], false);
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(status
        .runtime_handlers
        .iter()
        .all(|h| h.features.as_ref().unwrap().user_namespaces));
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(
        !d.state.join("userns").join(&pod).exists(),
        "userns pin left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ima_pods_share_one_user_namespace() {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;

    for via_field in [false, true] {
        let cfg = ima_pod(
            if via_field {
                "ima-field"
            } else {
                "ima-annotation"
            },
            via_field,
        );
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let i = pod_info(&mut rt, &pod).await;
        assert_eq!(i["ima"]["enabled"], true, "{i}");
        assert_eq!(i["ima"]["policy"], "default");
        let backend = i["ima"]["backend"].as_str().unwrap().to_string();
        // auto on this kernel (no IMA namespaces): imacri's fanotify backend.
        assert_eq!(backend, "fanotify", "{i}");
        let host_start = i["ima"]["mappings"]["uids"][0]["host_id"].as_u64().unwrap();
        assert!(host_start >= 1 << 20, "allocated from the pool: {i}");

        let a = start_container(&mut rt, &pod, &cfg, sleeper("a", env)).await;
        let b = start_container(&mut rt, &pod, &cfg, sleeper("b", env)).await;
        let ns_a = sh_ok(&mut rt, &a, "readlink /proc/self/ns/user").await;
        let ns_b = sh_ok(&mut rt, &b, "readlink /proc/self/ns/user").await;
        assert_eq!(ns_a, ns_b, "containers of one pod share the user namespace");
        let host_ns = std::fs::read_link("/proc/self/ns/user").unwrap();
        assert_ne!(ns_a, host_ns.to_string_lossy());
        let map = sh_ok(&mut rt, &a, "cat /proc/self/uid_map | tr -s ' '").await;
        assert_eq!(map, format!("0 {host_start} 65536"));
        assert_eq!(sh_ok(&mut rt, &a, "stat -c %u /bin/busybox").await, "0");

        // The setting is in every container's OCI spec.
        let st = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: b.clone(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        let v: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
        let ann = &v["runtimeSpec"]["annotations"];
        assert_eq!(ann["imacri.dev/ima"], "true", "{v}");
        assert_eq!(ann["imacri.dev/ima-backend"], backend.as_str());
        assert_eq!(v["ima"]["enabled"], true);
        let pod_status = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        let uo = pod_status
            .linux
            .unwrap()
            .namespaces
            .unwrap()
            .options
            .unwrap()
            .userns_options
            .unwrap();
        assert_eq!(uo.uids[0].host_id as u64, host_start);
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    }
    let s = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let ima = s
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "ImaPodsReady")
        .unwrap();
    assert!(ima.status && ima.message.contains("fanotify"), "{ima:?}");
    assert!(
        env.all_objects(&d.namespace)
            .await
            .unwrap()
            .iter()
            .all(|o| o.starts_with("snapshot remap-") || !o.starts_with("snapshot")),
        "{:?}",
        env.all_objects(&d.namespace).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn escapes_are_rejected_naming_the_field() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;

    let check = |r: Result<String, tonic::Status>, code: Code, needle: &str| {
        let e = r.expect_err("must be rejected");
        assert_eq!(e.code(), code, "{e}");
        assert!(
            e.message().contains(needle),
            "{:?} should name {needle:?}",
            e.message()
        );
    };
    let mut bad = pod_config("bad-annotation");
    bad.annotations
        .insert("imacri.dev/ima".into(), "yes".into());
    check(
        run_pod(&mut rt, &bad).await,
        Code::InvalidArgument,
        "imacri.dev/ima",
    );
    let mut bad = ima_pod("bad-policy", false);
    bad.annotations
        .insert("imacri.dev/ima-policy".into(), "nope".into());
    check(run_pod(&mut rt, &bad).await, Code::InvalidArgument, "nope");
    for (field, set) in [
        (
            "network=NODE",
            (|n: &mut cri::NamespaceOption| n.network = cri::NamespaceMode::Node as i32)
                as fn(&mut cri::NamespaceOption),
        ),
        ("pid=NODE", |n| n.pid = cri::NamespaceMode::Node as i32),
        ("ipc=NODE", |n| n.ipc = cri::NamespaceMode::Node as i32),
    ] {
        let mut cfg = ima_pod("hostns", true);
        let sc = cfg
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap();
        set(sc.namespace_options.get_or_insert_with(Default::default));
        check(run_pod(&mut rt, &cfg).await, Code::InvalidArgument, field);
    }

    let cfg = ima_pod("escapes", false);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let create = |c: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(c),
        sandbox_config: Some(cfg.clone()),
    };
    let with_sc = |f: fn(&mut cri::LinuxContainerSecurityContext)| {
        let mut c = sleeper("escape", env);
        let mut sc = cri::LinuxContainerSecurityContext::default();
        f(&mut sc);
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            resources: None,
        });
        c
    };
    type Edit = fn(&mut cri::LinuxContainerSecurityContext);
    let cases: Vec<(Edit, &str)> = vec![
        (|s| s.privileged = true, "privileged"),
        (
            |s| {
                s.namespace_options = Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                })
            },
            "pid=NODE",
        ),
        (
            |s| {
                s.namespace_options = Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                })
            },
            "network=NODE",
        ),
        (
            |s| {
                let m = vec![cri::IdMapping {
                    host_id: 5_000_000,
                    container_id: 0,
                    length: 65536,
                }];
                s.namespace_options = Some(cri::NamespaceOption {
                    userns_options: Some(cri::UserNamespace {
                        mode: cri::NamespaceMode::Pod as i32,
                        uids: m.clone(),
                        gids: m,
                    }),
                    ..Default::default()
                })
            },
            "userns_options",
        ),
    ];
    for (f, needle) in cases {
        let r = rt
            .create_container(create(with_sc(f)))
            .await
            .map(|r| r.into_inner().container_id);
        check(r, Code::InvalidArgument, needle);
    }
    // A container repeating the pod's default (POD, no mappings) is fine.
    let ok = with_sc(|s| {
        s.namespace_options = Some(cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    rt.create_container(create(ok)).await.unwrap();
    // So is NODE: kubelet sends it for every container of a pod without
    // hostUsers: false; the container joins the pod's user namespace.
    let kubelet_default = with_sc(|s| {
        s.namespace_options = Some(cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    let mut second = create(kubelet_default);
    if let Some(c) = second.config.as_mut() {
        c.metadata = Some(cri::ContainerMetadata {
            name: "kubelet-default".into(),
            attempt: 0,
        });
    }
    rt.create_container(second).await.unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_backend_fails_cleanly_on_this_kernel() {
    let env = Env::get();
    let d = Imacri::start_full(
        env,
        &format!("kernel-{:08x}", rand::random::<u32>()),
        &["--ima-backend", "kernel"],
    )
    .await
    .unwrap();
    let mut rt = d.runtime().await.unwrap();
    let e = run_pod(&mut rt, &ima_pod("kernel", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("IMA namespace"), "{}", e.message());
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(d.root.join("sandboxes")).unwrap().count(),
        0
    );
    for dir in ["userns", "netns", "sandboxes"] {
        assert_eq!(
            std::fs::read_dir(d.state.join(dir))
                .map(|r| r.count())
                .unwrap_or(0),
            0,
            "{dir} left"
        );
    }
    // Pods without ima are unaffected.
    let pod = run_pod(&mut rt, &pod_config("plain")).await.unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    let s = rt
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let c = s
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "ImaPodsReady")
        .unwrap();
    assert!(!c.status && c.message.contains("kernel"), "{c:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_allocations_never_overlap_and_survive_restarts() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    let rt = d.runtime().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            run_pod(&mut rt, &ima_pod(&format!("pool-{i}"), i % 2 == 0))
                .await
                .unwrap()
        }));
    }
    let mut pods = Vec::new();
    for t in tasks {
        pods.push(t.await.unwrap());
    }
    let mut rt = rt;
    let mut ranges: HashMap<String, u64> = HashMap::new();
    for p in &pods {
        let i = pod_info(&mut rt, p).await;
        ranges.insert(
            p.clone(),
            i["ima"]["mappings"]["uids"][0]["host_id"].as_u64().unwrap(),
        );
    }
    let mut starts: Vec<u64> = ranges.values().copied().collect();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), 20, "every pod has its own range");
    assert!(
        starts.windows(2).all(|w| w[1] - w[0] >= 65536),
        "ranges overlap: {starts:?}"
    );

    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    for p in &pods {
        let i = pod_info(&mut rt, p).await;
        assert_eq!(
            i["ima"]["mappings"]["uids"][0]["host_id"].as_u64().unwrap(),
            ranges[p],
            "allocation kept across restart"
        );
    }
    // Removing a pod frees its range; the next pod reuses the lowest free one.
    let lowest = pods.iter().min_by_key(|p| ranges[*p]).unwrap().clone();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: lowest.clone(),
    })
    .await
    .unwrap();
    let new = run_pod(&mut rt, &ima_pod("pool-new", false)).await.unwrap();
    assert_eq!(
        pod_info(&mut rt, &new).await["ima"]["mappings"]["uids"][0]["host_id"]
            .as_u64()
            .unwrap(),
        ranges[&lowest]
    );
    pods.retain(|p| *p != lowest);
    pods.push(new);
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in pods {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
            .await
            .unwrap();
    }
    assert!(Instant::now() < deadline);
    assert!(env
        .all_objects(&d.namespace)
        .await
        .unwrap()
        .iter()
        .all(|o| o.starts_with("snapshot remap-")));
}

/// A command that is not in the image fails StartContainer with runc's
/// message, in a plain pod and in an ima pod alike (whose containers run it
/// through imacri's init, which would only find out after the start), and
/// the container is left StartError; an exec of one fails the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_command_fails_the_start_in_ima_pods_too() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    for (pod_cfg, kind) in [
        (pod_config("nocmd-plain"), "plain"),
        (ima_pod("nocmd-ima", false), "ima"),
    ] {
        let pod = run_pod(&mut rt, &pod_cfg).await.unwrap();
        for (name, cmd, want) in [
            (
                "by-name",
                "no-such-program",
                "exec: \"no-such-program\": executable file not found in $PATH",
            ),
            (
                "by-path",
                "/bin/no-such-program",
                "exec: \"/bin/no-such-program\": stat /bin/no-such-program: no such file or directory",
            ),
            ("a-dir", "/bin", "exec: \"/bin\": permission denied"),
        ] {
            let c = container_config(name, &env.busybox, &[cmd]);
            let id = create_container(&mut rt, &pod, &pod_cfg, c).await.unwrap();
            let e = rt
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .unwrap_err();
            // containerd's message quotes runc's with escapes.
            let said = e.message().replace('\\', "");
            assert!(said.contains(want), "{kind} {name}: {e:?}");
            let st = imacri_integration::client::container_status(&mut rt, &id).await;
            assert_eq!(st.reason, "StartError", "{kind} {name}: {st:?}");
        }
        // The same pod still runs what exists, with a read-only rootfs too
        // (the init's mount point is made on /dev's tmpfs).
        let mut ok = sleeper("ok", env);
        ok.linux = imacri_integration::security_context(|s| s.readonly_rootfs = true);
        let c = start_container(&mut rt, &pod, &pod_cfg, ok).await;
        assert_eq!(sh_ok(&mut rt, &c, "echo fine").await, "fine");
        let r = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: c.clone(),
                cmd: vec!["no-such-program".into()],
                timeout: 10,
            })
            .await;
        let e = r.expect_err(kind);
        let said = e.message().replace('\\', "");
        assert!(
            said.contains(r#"exec: "no-such-program": executable file not found in $PATH"#),
            "{kind}: {e:?}"
        );
        remove_pod(&mut rt, &pod).await;
    }
}
