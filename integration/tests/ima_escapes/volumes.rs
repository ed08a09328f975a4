//! Volumes: a disk emptyDir of the pod's own, host paths.

use super::*;

/// A disk-backed emptyDir of the pod's own under `volumes = "measure"` (the
/// init-container pattern: one container copies a tool there, another runs
/// it). Its filesystem is the host's, so only the container's own mount of
/// it is marked: its executions are measured (a file the host rewrote,
/// which no event of that mark shows, is measured anew), or refused outside
/// the policy under `enforce`; and the same file handed in by a helper
/// outside the pod, which reached it through its own mount of the volume's
/// host directory, runs in no way. Until 2026-12-05 such a volume was
/// `noexec` in every ima pod.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_emptydir_of_the_pods_own_runs_only_measured() {
    let env = Env::get();
    let policies = "[ima.policies.vols]\nvolumes = \"measure\"\n[ima.policies.vols-strict]\nmode = \"enforce\"\nvolumes = \"measure\"\nallowlist = [\"{golden}\"]";
    let (d, image, work) = node(env, policies).await;
    let mut rt = d.runtime().await.unwrap();
    for policy in ["vols", "vols-strict"] {
        let cfg = ima(&format!("disk-{policy}"), policy);
        let vol = imacri_integration::kubelet_volume(work.path(), &cfg, "cache");
        let with_vol = |mut c: cri::ContainerConfig| {
            c.mounts.push(cri::Mount {
                container_path: "/cache".into(),
                host_path: vol.to_string_lossy().into(),
                ..Default::default()
            });
            c
        };
        let sleeper = |n: &str| with_vol(container_config(n, &image, &["sleep", "1000"]));
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
        let copy = "cp /bin/busybox /cache/evil && printf X | dd of=/cache/evil bs=1 seek=300 conv=notrunc 2>/dev/null && ln -s evil /cache/echo && echo copied";
        assert_eq!(sh_ok(&mut rt, &a, copy).await, "copied");
        let digest = sha256_hex(&std::fs::read(vol.join("evil")).unwrap());
        let b = start_container(&mut rt, &pod, &cfg, sleeper("b")).await;
        // busybox runs as the applet its name says.
        let run = "/cache/echo ran; echo rc=$?";
        let (_, out, err) = exec_sh(&mut rt, &b, run).await;
        let lines = entries_of(&log_lines(&d, &pod), &b);
        if policy == "vols-strict" {
            assert!(!out.contains("ran"), "{out}{err}");
            assert!(logged(&lines, "/cache/evil", None, "deny"), "{lines:?}");
            stop_pod(&mut rt, &pod).await;
            continue;
        }
        assert!(out.contains("ran"), "{out}{err}\n{}", d.log());
        assert!(
            logged(&lines, "/cache/evil", Some(&digest), "exec"),
            "{lines:?}"
        );
        // Rewritten by the host, through its own path.
        let mut bytes = std::fs::read(vol.join("evil")).unwrap();
        bytes[300] = b'Y';
        std::fs::write(vol.join("evil"), &bytes).unwrap();
        let (_, out, err) = exec_sh(&mut rt, &b, run).await;
        assert!(out.contains("ran"), "{out}{err}");
        let lines = entries_of(&log_lines(&d, &pod), &b);
        assert!(
            logged(&lines, "/cache/evil", Some(&sha256_hex(&bytes)), "exec"),
            "{lines:?}"
        );
        // Bound twice in one container: each mount is marked.
        let mut twice = sleeper("c");
        twice.mounts.push(cri::Mount {
            container_path: "/again".into(),
            host_path: vol.to_string_lossy().into(),
            ..Default::default()
        });
        let c = start_container(&mut rt, &pod, &cfg, twice).await;
        let (_, out, err) = exec_sh(&mut rt, &c, "/again/echo ran; /cache/echo ran").await;
        assert_eq!(out.matches("ran").count(), 2, "{out}{err}");
        let lines = entries_of(&log_lines(&d, &pod), &c);
        for at in ["/again/evil", "/cache/evil"] {
            assert!(
                logged(&lines, at, Some(&sha256_hex(&bytes)), "exec"),
                "{at}: {lines:?}"
            );
        }
        // Handed in from outside the pod: a plain pod with the volume's host
        // directory as a hostPath serves the file and its directory.
        let helper = pod_config("disk-helper");
        let hp = run_pod(&mut rt, &helper).await.unwrap();
        let mut srv = container_config("srv", &image, &["escape", "serve-fds", "/x/s", "/x/evil"]);
        srv.mounts.push(cri::Mount {
            container_path: "/x".into(),
            host_path: vol.to_string_lossy().into(),
            ..Default::default()
        });
        start_container(&mut rt, &hp, &helper, srv).await;
        for _ in 0..100 {
            if vol.join("s").exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for m in RECEIVED {
            let (_, out, err) = exec_sh(&mut rt, &b, &format!("escape {m} /cache/s")).await;
            assert!(!out.contains("RAN"), "{m}: {out}{err}");
            assert!(
                out.contains(&format!("{m}: Permission denied")),
                "{m}: {out}{err}"
            );
        }
        stop_pod(&mut rt, &hp).await;
        stop_pod(&mut rt, &pod).await;
    }
}

/// Every other volume on a local filesystem under `volumes = "measure"`: a
/// hostPath directory, a single file bound as a volume, and a subPath (a
/// bind kubelet makes in its directory of the pod) keep exec, marked
/// through the container's own mount: what runs there is measured with its
/// digest, measured anew once the host rewrote it, and refused outside the
/// policy under `enforce`; code the pod writes there and maps executable
/// is measured (or refused) by the map guard. The host's own executions of
/// the same file are none of the pod's. Until 2026-12-05 each of these was
/// `noexec` in every ima pod.
#[tokio::test(flavor = "multi_thread")]
async fn host_volumes_run_only_measured() {
    let env = Env::get();
    let policies = "[ima.policies.vols]\nvolumes = \"measure\"\n[ima.policies.vols-strict]\nmode = \"enforce\"\nvolumes = \"measure\"\nallowlist = [\"{golden}\"]";
    let (d, image, work) = node(env, policies).await;
    let mut rt = d.runtime().await.unwrap();
    let host = work.path().join("host");
    std::fs::create_dir_all(host.join("sub")).unwrap();
    // Writable by the pod (its root is no host ID): code it writes there
    // and maps executable goes through the map guard.
    std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut bytes = std::fs::read("/bin/busybox").unwrap();
    bytes[300] ^= 1;
    for p in [host.join("tool"), host.join("sub/tool")] {
        std::fs::write(&p, &bytes).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    struct Unmount(Vec<std::path::PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let mut binds = Unmount(Vec::new());
    for policy in ["vols", "vols-strict"] {
        let cfg = ima(&format!("host-{policy}"), policy);
        // kubelet's bind for a subPath `sub` of a volume.
        let uid = &cfg.metadata.as_ref().unwrap().uid;
        let sub = work
            .path()
            .join(format!("pods/{uid}/volume-subpaths/vol/c/0"));
        std::fs::create_dir_all(&sub).unwrap();
        nix::mount::mount(
            Some(&host.join("sub")),
            &sub,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        binds.0.push(sub.clone());
        let mut c = container_config("c", &image, &["sleep", "1000"]);
        for (dest, src) in [
            ("/h", host.clone()),
            ("/f", host.join("tool")),
            ("/s", sub.clone()),
        ] {
            c.mounts.push(cri::Mount {
                container_path: dest.into(),
                host_path: src.to_string_lossy().into(),
                ..Default::default()
            });
        }
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let c = start_container(&mut rt, &pod, &cfg, c).await;
        // It runs: busybox itself says its name is no applet.
        let run = "for p in /h/tool /f /s/tool; do $p; echo rc=$?; done";
        let ran = |out: &str, err: &str| {
            out.matches("rc=127").count() == 3 && err.matches("applet not found").count() == 3
        };
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        let (_, mapped, merr) = exec_sh(&mut rt, &c, "escape file-mmap /h/code.bin").await;
        let lines = entries_of(&log_lines(&d, &pod), &c);
        if policy == "vols-strict" {
            assert_eq!(out.matches("rc=126").count(), 3, "{out}{err}");
            for p in ["/h/tool", "/f", "/s/tool", "/h/code.bin"] {
                assert!(logged(&lines, p, None, "deny"), "{p}: {lines:?}");
            }
            assert!(!mapped.contains("RAN"), "{mapped}{merr}");
            stop_pod(&mut rt, &pod).await;
            continue;
        }
        assert!(ran(&out, &err), "{out}{err}\n{}", d.log());
        assert!(mapped.contains("RAN file-mmap"), "{mapped}{merr}");
        let code = sha256_hex(&std::fs::read(host.join("code.bin")).unwrap());
        assert!(
            logged(&lines, "/h/code.bin", Some(&code), "mmap"),
            "{lines:?}"
        );
        for p in ["/h/tool", "/f", "/s/tool"] {
            assert!(
                logged(&lines, p, Some(&sha256_hex(&bytes)), "exec"),
                "{p}: {lines:?}"
            );
        }
        // The host's own execution of it is not the pod's.
        host_run_not_logged(&d, &pod, &host.join("tool"));
        // Rewritten by the host: measured anew through each mount.
        bytes[301] ^= 1;
        std::fs::write(host.join("tool"), &bytes).unwrap();
        std::fs::write(host.join("sub/tool"), &bytes).unwrap();
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        assert!(ran(&out, &err), "{out}{err}");
        let lines = entries_of(&log_lines(&d, &pod), &c);
        for p in ["/h/tool", "/f", "/s/tool"] {
            assert!(
                logged(&lines, p, Some(&sha256_hex(&bytes)), "exec"),
                "{p}: {lines:?}"
            );
        }
        stop_pod(&mut rt, &pod).await;
    }
}
