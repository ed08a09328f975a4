//! CRI fields a current kubelet sends, as a process in a real container
//! sees them: the resolved stop signal, `kubectl debug --target`, ambient
//! capabilities, resources updated before start, recursive read-only mounts.

use imacri_integration::client::{container_status, create_container, sh_ok, start_container};
use imacri_integration::{container_config, cri, Env, Imacri};
use tonic::Code;

fn sc(
    f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
) -> Option<cri::LinuxContainerConfig> {
    let mut s = cri::LinuxContainerSecurityContext::default();
    f(&mut s);
    Some(cri::LinuxContainerConfig {
        security_context: Some(s),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_signal_target_ambient_and_early_updates() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "fields").await;

    // The stop signal in ContainerStatus is the one StopContainer sends.
    let plain = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("plain", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(
        container_status(&mut rt, &plain).await.stop_signal,
        cri::Signal::Sigterm as i32
    );
    let mut usr1 = container_config("usr1", &env.busybox, &["sleep", "1000"]);
    usr1.stop_signal = cri::Signal::Sigusr1 as i32;
    let usr1 = create_container(&mut rt, &pod, &cfg, usr1).await.unwrap();
    assert_eq!(
        container_status(&mut rt, &usr1).await.stop_signal,
        cri::Signal::Sigusr1 as i32
    );

    // kubectl debug --target: a container with its own pid namespace, and
    // a debug container that joins it and sees its processes.
    let mut target = container_config("target", &env.busybox, &["sleep", "4242"]);
    target.linux = sc(|s| {
        s.namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Container as i32,
            ..Default::default()
        })
    });
    let target = start_container(&mut rt, &pod, &cfg, target).await;
    let debug_of = |name: &str, target_id: &str| {
        let mut c = container_config(name, &env.busybox, &["sleep", "1000"]);
        let t = target_id.to_string();
        c.linux = sc(|s| {
            s.namespace_options = Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: t,
                ..Default::default()
            })
        });
        c
    };
    let dbg = start_container(&mut rt, &pod, &cfg, debug_of("debug", &target)).await;
    let ps = sh_ok(&mut rt, &dbg, "ps -o args | grep -c '^sleep 4242'").await;
    assert_eq!(ps, "1", "the debug container sees the target's processes");
    // The plain container (pod pid namespace) does not.
    let (_, out, _) =
        imacri_integration::client::exec_sh(&mut rt, &plain, "ps -o args | grep -c '^sleep 4242'")
            .await;
    assert_eq!(out.trim(), "0");
    for (target_id, code) in [("", Code::InvalidArgument), ("no-such", Code::NotFound)] {
        let e = create_container(&mut rt, &pod, &cfg, debug_of("bad", target_id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{target_id:?}: {e:?}");
        assert!(e.message().contains("target_id"), "{e:?}");
    }
    // A created (not running) target has no namespace to join.
    let e = create_container(&mut rt, &pod, &cfg, debug_of("bad2", &usr1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Ambient capabilities (KEP-2763): a non-root process keeps them.
    let mut amb = container_config("ambient", &env.busybox, &["sleep", "1000"]);
    amb.linux = sc(|s| {
        s.run_as_user = Some(cri::Int64Value { value: 1000 });
        s.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["ALL".into()],
            add_ambient_capabilities: vec!["NET_BIND_SERVICE".into()],
            ..Default::default()
        })
    });
    let amb = start_container(&mut rt, &pod, &cfg, amb).await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &amb,
            "id -u; grep -E '^Cap(Amb|Eff)' /proc/self/status | tr -d '\\t'"
        )
        .await,
        "1000\nCapEff:0000000000000400\nCapAmb:0000000000000400"
    );
    // Without any, a non-root process has none (containerd's sets).
    let mut none = container_config("noambient", &env.busybox, &["sleep", "1000"]);
    none.linux = sc(|s| s.run_as_user = Some(cri::Int64Value { value: 1000 }));
    let none = start_container(&mut rt, &pod, &cfg, none).await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &none,
            "grep -E '^CapEff' /proc/self/status | tr -d '\\t'"
        )
        .await,
        "CapEff:0000000000000000"
    );

    // UpdateContainerResources on a created container holds at start.
    let early = create_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("early", &env.busybox, &["sleep", "1000"]),
    )
    .await
    .unwrap();
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: early.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 48 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: early.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        sh_ok(
            &mut rt,
            &early,
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"
        )
        .await,
        (48u64 << 20).to_string()
    );

    // Recursive read-only: a mount below the volume is read-only too.
    let vol = tempfile::tempdir_in(&env.base).unwrap();
    let sub = vol.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let mut rro = container_config("rro", &env.busybox, &["sleep", "1000"]);
    rro.mounts = vec![cri::Mount {
        container_path: "/v".into(),
        host_path: vol.path().to_string_lossy().into(),
        readonly: true,
        recursive_read_only: true,
        propagation: cri::MountPropagation::PropagationPrivate as i32,
        ..Default::default()
    }];
    let features = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .runtime_handlers;
    assert!(features
        .iter()
        .all(|h| h.features.unwrap().recursive_read_only_mounts));
    let rro = start_container(&mut rt, &pod, &cfg, rro).await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &rro,
            "touch /v/sub/x 2>/dev/null && echo rw || echo ro"
        )
        .await,
        "ro"
    );
    nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();

    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
