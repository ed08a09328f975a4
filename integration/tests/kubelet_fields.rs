//! CRI fields a current kubelet sends, as a process in a real container
//! sees them: the resolved stop signal, `kubectl debug --target`, ambient
//! capabilities, resources updated before start, recursive read-only mounts,
//! CDI devices.

use imacri_integration::client::{container_status, create_container, sh_ok, start_container};
use imacri_integration::{container_config, cri, security_context, Env, Imacri};
use tonic::Code;

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
    target.linux = security_context(|s| {
        s.namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Container as i32,
            ..Default::default()
        })
    });
    let target = start_container(&mut rt, &pod, &cfg, target).await;
    let debug_of = |name: &str, target_id: &str| {
        let mut c = container_config(name, &env.busybox, &["sleep", "1000"]);
        let t = target_id.to_string();
        c.linux = security_context(|s| {
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
    amb.linux = security_context(|s| {
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
    none.linux = security_context(|s| s.run_as_user = Some(cri::Int64Value { value: 1000 }));
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

#[tokio::test(flavor = "multi_thread")]
async fn cdi_devices_from_spec_files() {
    let env = Env::get();
    let specs = tempfile::tempdir_in(&env.base).unwrap();
    let (low, high) = (specs.path().join("etc"), specs.path().join("run"));
    std::fs::create_dir_all(&low).unwrap();
    std::fs::create_dir_all(&high).unwrap();
    let shared = tempfile::tempdir_in(&env.base).unwrap();
    std::fs::write(shared.path().join("lib.so"), "vendor").unwrap();
    let marker = specs.path().join("hook-ran");
    // YAML in the low-priority dir, JSON in the high one (which wins for
    // the device both define).
    std::fs::write(
        low.join("vendor.yaml"),
        format!(
            r#"cdiVersion: "0.6.0"
kind: "imacri.test/dev"
containerEdits:
  env: ["VENDOR=imacri"]
devices:
  - name: "null"
    containerEdits:
      env: ["WHICH=low"]
      deviceNodes:
        - path: "/dev/cdinull"
          hostPath: "/dev/null"
          permissions: "rw"
      mounts:
        - hostPath: "{}"
          containerPath: "/opt/vendor"
          options: ["ro", "nosuid", "nodev"]
      hooks:
        - hookName: "createContainer"
          path: "/bin/sh"
          args: ["sh", "-c", "echo ran > {}"]
  - name: "gone"
    containerEdits:
      env: ["X=1"]
"#,
            shared.path().display(),
            marker.display()
        ),
    )
    .unwrap();
    std::fs::write(
        high.join("override.json"),
        r#"{"cdiVersion":"0.6.0","kind":"imacri.test/dev","devices":[{"name":"zero","containerEdits":{"env":["WHICH=high"],"deviceNodes":[{"path":"/dev/cdizero","hostPath":"/dev/zero"}]}}]}"#,
    )
    .unwrap();
    let d = Imacri::start_with(
        env,
        &[
            "--cdi-spec-dir",
            low.to_str().unwrap(),
            "--cdi-spec-dir",
            high.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "cdi").await;
    let mut c = container_config("gpu", &env.busybox, &["sleep", "1000"]);
    c.cdi_devices = vec![cri::CdiDevice {
        name: "imacri.test/dev=null".into(),
    }];
    // The older annotation form adds one more.
    c.annotations
        .insert("cdi.k8s.io/test".into(), "imacri.test/dev=zero".into());
    let id = start_container(&mut rt, &pod, &cfg, c).await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &id,
            "echo x > /dev/cdinull && head -c 3 /dev/cdizero | wc -c; cat /opt/vendor/lib.so; echo; \
             echo $VENDOR $WHICH; touch /opt/vendor/x 2>/dev/null && echo rw || echo ro"
        )
        .await,
        "3\nvendor\nimacri high\nro"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "ran");
    // An unknown device is refused, naming it and where it was looked for.
    for bad in ["imacri.test/dev=nope", "not-qualified"] {
        let mut c = container_config("bad", &env.busybox, &["true"]);
        c.cdi_devices = vec![cri::CdiDevice { name: bad.into() }];
        let e = create_container(&mut rt, &pod, &cfg, c).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(bad) && e.message().contains("CDI"),
            "{e:?}"
        );
    }
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn privileged_containers_get_the_host_devices() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = imacri_integration::pod_config("privileged");
    cfg.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxSandboxSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let pod = imacri_integration::client::run_pod(&mut rt, &cfg)
        .await
        .unwrap();
    let mut c = container_config("priv", &env.busybox, &["sleep", "1000"]);
    c.linux = security_context(|s| s.privileged = true);
    let id = start_container(&mut rt, &pod, &cfg, c).await;
    // Nodes a plain container never has, with the host's numbers.
    let host = std::fs::read_dir("/dev")
        .unwrap()
        .flatten()
        .filter(|e| {
            use std::os::unix::fs::FileTypeExt;
            e.file_type()
                .is_ok_and(|t| t.is_char_device() || t.is_block_device())
        })
        .count();
    let inside: usize = sh_ok(&mut rt, &id, "ls -l /dev | grep -c '^[cb]'")
        .await
        .parse()
        .unwrap();
    assert!(
        inside + 2 >= host,
        "{inside} device nodes inside, {host} on the host"
    );
    assert_eq!(
        sh_ok(
            &mut rt,
            &id,
            "ls /dev/loop-control /dev/kmsg /dev/loop0 >/dev/null && echo there"
        )
        .await,
        "there"
    );
    let plain = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("plain", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    let (_, out, _) =
        imacri_integration::client::exec_sh(&mut rt, &plain, "ls /dev/loop-control 2>&1 || true")
            .await;
    assert!(out.contains("No such file"), "{out}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// CheckpointContainer: validated like containerd, then CRIU is asked
/// whether it can run here; on these machines it cannot (criu 3.17 does
/// not understand kernel 6.18's vDSO), and the answer says so.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_says_why_it_cannot() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "ckpt").await;
    let run = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("run", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    let created = create_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("created", &env.busybox, &["sleep", "1000"]),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let location = dir.path().join("c.tar").to_string_lossy().into_owned();
    let ckpt = |id: &str, location: &str| cri::CheckpointContainerRequest {
        container_id: id.into(),
        location: location.into(),
        timeout: 10,
    };
    for (id, loc, code) in [
        ("nope", location.as_str(), Code::NotFound),
        (run.as_str(), "", Code::InvalidArgument),
        (
            created.as_str(),
            location.as_str(),
            Code::FailedPrecondition,
        ),
    ] {
        let e = rt.checkpoint_container(ckpt(id, loc)).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    let criu_works = std::process::Command::new("criu")
        .arg("check")
        .status()
        .is_ok_and(|s| s.success());
    let e = rt
        .checkpoint_container(ckpt(&run, &location))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("criu check"), "{e:?}");
    if !criu_works {
        assert!(
            e.message().contains("rror"),
            "CRIU's own error is passed on: {e:?}"
        );
    }
    assert!(!dir.path().join("c.tar").exists());
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
