//! Mounts beneath a volume, devices mapped elsewhere, a volume swapped under its
//! check.

use super::*;

/// A pod of `cfg` running container `c`: (pod, container).
async fn pod_with(
    rt: &mut imacri_integration::client::Rt,
    d: &Imacri,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> (String, String) {
    let pod = run_pod(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = start_container(rt, &pod, cfg, c).await;
    (pod, c)
}

/// Mounts made by this test on the host, taken down (deepest first) when
/// it ends, also when it fails.
struct HostMounts(Vec<std::path::PathBuf>);

impl HostMounts {
    fn mount(&mut self, args: &[&str], at: &std::path::Path) {
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount {args:?} {}", at.display());
        self.0.push(at.to_path_buf());
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-R")
                .arg(p)
                .status();
        }
    }
}

/// A volume brings the mounts beneath its host path along (a bind is
/// recursive), each with its own flags: a hostPath of a directory holding a
/// tmpfs (`/run`, `/dev`, kubelet's pods) held an executable filesystem no
/// mark of the pod watches, beneath the container's root where its
/// Landlock rule allows executions; and a volume with HostToContainer
/// propagation takes the host's later mounts, executable, too. Until
/// 2026-12-04 a program on either ran unmeasured in measure and enforce
/// mode. Now every mount of a volume's tree is noexec (a tmpfs volume with
/// a mount beneath it is not measured, all of it noexec), and propagation
/// from the host is refused. Under `volumes = "measure"` a volume with a
/// mount beneath it stays noexec, all of it.
#[tokio::test(flavor = "multi_thread")]
async fn mounts_beneath_a_volume_do_not_run() {
    use imacri_integration::escapes::{ima as ima_policy, node, stop_pod};
    let env = Env::get();
    let (d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    let mut rt = d.runtime().await.unwrap();
    let mut mounts = HostMounts(Vec::new());
    let policies =
        ["measure", "strict", "vols"].map(|p| (p, ima_policy(&format!("beneath-{p}"), p)));
    // dir/sub: a tmpfs beneath a plain directory; mem: a tmpfs of its own
    // (a measurable volume, the `vols` pod's emptyDir) with another beneath
    // it; later: a shared mount the host mounts beneath after the start.
    let (dir, mem, later) = (
        work.path().join("dir"),
        imacri_integration::kubelet_volume(work.path(), &policies[2].1, "mem"),
        work.path().join("later"),
    );
    for p in [&dir.join("sub"), &later] {
        std::fs::create_dir_all(p).unwrap();
    }
    mounts.mount(&["-t", "tmpfs", "sub"], &dir.join("sub"));
    mounts.mount(&["-t", "tmpfs", "mem"], &mem);
    std::fs::create_dir_all(mem.join("sub")).unwrap();
    mounts.mount(&["-t", "tmpfs", "memsub"], &mem.join("sub"));
    mounts.mount(&["--bind", later.to_str().unwrap()], &later);
    mounts.mount(&["--make-rshared"], &later);
    for p in [dir.join("sub/busybox"), mem.join("sub/busybox")] {
        std::fs::copy("/bin/busybox", p).unwrap();
    }
    let vol = |dest: &str, host: &std::path::Path, p: cri::MountPropagation| cri::Mount {
        container_path: dest.into(),
        host_path: host.to_string_lossy().into(),
        propagation: p as i32,
        ..Default::default()
    };
    let private = cri::MountPropagation::PropagationPrivate;
    let h2c = cri::MountPropagation::PropagationHostToContainer;
    let with = |n: &str, ms: Vec<cri::Mount>| {
        let mut c = container_config(n, &image, &["sleep", "1000"]);
        c.mounts = ms;
        c
    };
    let run = "/d/sub/busybox true; echo rc=$?; /m/sub/busybox true; echo rc=$?";
    let later_mount = |mounts: &mut HostMounts, n: &str| {
        let at = later.join(n);
        std::fs::create_dir_all(&at).unwrap();
        mounts.mount(&["-t", "tmpfs", n], &at);
        std::fs::copy("/bin/busybox", at.join("busybox")).unwrap();
    };

    // The control: a plain pod runs all three.
    let ms = vec![
        vol("/d", &dir, private),
        vol("/m", &mem, private),
        vol("/l", &later, h2c),
    ];
    let (pod, c) = pod_with(&mut rt, &d, &pod_config("beneath-plain"), with("c", ms)).await;
    assert_eq!(sh_ok(&mut rt, &c, run).await, "rc=0\nrc=0");
    later_mount(&mut mounts, "plain");
    assert_eq!(
        sh_ok(&mut rt, &c, "/l/plain/busybox true; echo rc=$?").await,
        "rc=0"
    );
    stop_pod(&mut rt, &pod).await;

    for (policy, cfg) in policies {
        let ms = vec![vol("/d", &dir, private), vol("/m", &mem, private)];
        let (pod, c) = pod_with(&mut rt, &d, &cfg, with("c", ms)).await;
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        assert_eq!(out.trim_end(), "rc=126\nrc=126", "{policy}: {out}{err}");
        assert_eq!(
            err.matches("Permission denied").count(),
            2,
            "{policy}: {err}"
        );
        // Nothing of the host's mounts later comes in.
        let e = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(with("l", vec![vol("/l", &later, h2c)])),
                sandbox_config: Some(cfg.clone()),
            })
            .await
            .expect_err("HostToContainer in an ima pod");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message()
                .contains("mounts[0].propagation=PROPAGATION_HOST_TO_CONTAINER"),
            "{e}"
        );
        stop_pod(&mut rt, &pod).await;
    }
    // The pod's own tmpfs volume without a mount beneath it still runs,
    // measured (its filesystem marked); one that is not the pod's (another
    // pod's emptyDir: others execute there too) runs measured through the
    // container's mount (noexec until 2026-12-05).
    let cfg = ima_policy("beneath-own", "vols");
    let own = imacri_integration::kubelet_volume(work.path(), &cfg, "own");
    let theirs = imacri_integration::kubelet_volume(work.path(), &pod_config("other"), "own");
    for p in [&own, &theirs] {
        mounts.mount(&["-t", "tmpfs", "own"], p);
        std::fs::create_dir_all(p.join("sub")).unwrap();
        std::fs::copy("/bin/busybox", p.join("busybox")).unwrap();
        std::fs::copy("/bin/busybox", p.join("sub/busybox")).unwrap();
    }
    // subPaths as kubelet binds them: of the pod's own volume, and one
    // claiming that volume's name whose filesystem is another's.
    let subpaths = own
        .ancestors()
        .nth(3)
        .unwrap()
        .join("volume-subpaths/own/c");
    let (own_sub, their_sub) = (subpaths.join("0"), subpaths.join("1"));
    for (at, from) in [(&own_sub, &own), (&their_sub, &theirs)] {
        std::fs::create_dir_all(at).unwrap();
        mounts.mount(&["--bind", from.join("sub").to_str().unwrap()], at);
    }
    let ms = vec![
        vol("/o", &own, private),
        vol("/t", &theirs, private),
        vol("/os", &own_sub, private),
        vol("/ts", &their_sub, private),
    ];
    let (pod, c) = pod_with(&mut rt, &d, &cfg, with("c", ms)).await;
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "for p in /o /t /os /ts; do $p/busybox true; echo rc=$?; done",
    )
    .await;
    assert_eq!(out.trim_end(), "rc=0\nrc=0\nrc=0\nrc=0", "{out}{err}");
    let log = imacri_integration::escapes::log_lines(&d, &pod);
    for p in ["/o/busybox", "/t/busybox", "/os/busybox", "/ts/busybox"] {
        assert!(
            imacri_integration::escapes::logged(&log, p, None, "exec"),
            "{p}: {log:#?}"
        );
    }
    stop_pod(&mut rt, &pod).await;
    drop(mounts);
}

/// In a user namespace runc binds the host's file *at a device's container
/// path*, not the device's host path: a device mapped elsewhere (by a
/// device plugin, a CDI spec or any CRI client) brought that host file into
/// the container, executable and on a filesystem no mark watches, and it
/// ran unmeasured even under `enforce` (until 2026-12-04). Now such a
/// device is refused in every user-namespace pod, naming it; a device at
/// its own path works, and a pod without a user namespace (where runc makes
/// the node) still takes any path, as containerd.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_mapped_elsewhere_brings_no_host_file() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let host_file = work.path().join(format!("host-program-{}", rand_u32()));
    std::fs::copy("/bin/busybox", &host_file).unwrap();
    let host_file = host_file.to_string_lossy().into_owned();
    let with_device = |host: &str, at: &str| {
        let mut c = container_config("c", &env.busybox, &["sleep", "1000"]);
        c.devices.push(cri::Device {
            host_path: host.into(),
            container_path: at.into(),
            permissions: "rw".into(),
        });
        c
    };

    // Without a user namespace runc makes the node: a null device there.
    let plain = pod_config("device-plain");
    let (pod, c) = pod_with(&mut rt, &d, &plain, with_device("/dev/null", &host_file)).await;
    assert_eq!(
        sh_ok(&mut rt, &c, &format!("test -c {host_file} && echo node")).await,
        "node"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;

    let mut userns = pod_config("device-userns");
    imacri_integration::pod_userns(&mut userns, 3_200_000);
    for cfg in [ima(pod_config("device-ima")), userns] {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let e = create_container(&mut rt, &pod, &cfg, with_device("/dev/null", &host_file))
            .await
            .expect_err("a device whose container path names a host file");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(&host_file), "{e}");
        // A device at its own path is bound as itself.
        let c = start_container(&mut rt, &pod, &cfg, with_device("/dev/kmsg", "/dev/kmsg")).await;
        assert_eq!(
            sh_ok(&mut rt, &c, "test -c /dev/kmsg && echo node").await,
            "node"
        );
        imacri_integration::client::remove_pod(&mut rt, &pod).await;
    }
}

/// Under `volumes = "measure"`, a volume whose host path runs through a
/// directory the pod controls (in a disk volume of its own) could name the
/// host's tmpfs when CreateContainer bound it and the pod's own memory
/// volume when it checked it (and when StartContainer marked it): the pod
/// swaps that directory for links. The host's tmpfs was then executable in
/// the container and unmarked, and a program there ran unmeasured (until
/// 2026-12-04). Now what is bound is compared with what was checked (device
/// and inode), and what is marked is what is bound: the host's tmpfs,
/// through the container's mount (since 2026-12-05 every volume on a local
/// filesystem runs, measured). The moments between the
/// steps are widened here (IMACRI_TEST_VOLUME_CHECK_WINDOW) and the links
/// swapped in them.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_swapped_under_its_check_does_not_run() {
    use imacri_integration::escapes::{ima as ima_policy, log_lines, logged, node, stop_pod};
    let env = Env::get();
    let (mut d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    d.kill();
    d.vars = vec![("IMACRI_TEST_VOLUME_CHECK_WINDOW".into(), "1500".into())];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let mut mounts = HostMounts(Vec::new());
    let cfg = ima_policy("swap-vol", "vols");
    let own = imacri_integration::kubelet_volume(work.path(), &cfg, "mem");
    let host = work.path().join("host-shm");
    std::fs::create_dir_all(&host).unwrap();
    for (p, whose) in [(&own, "pod's"), (&host, "host's")] {
        mounts.mount(&["-t", "tmpfs", "swap"], p);
        std::fs::copy("/bin/busybox", p.join("busybox")).unwrap();
        std::fs::write(p.join("whose"), whose).unwrap();
    }
    // A directory in a volume of the pod's own (a disk emptyDir), which the
    // pod turns into links at will.
    let disk = work.path().join("disk");
    let dir = disk.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let point = |to: Option<&std::path::Path>| {
        let _ = std::fs::remove_file(&dir);
        let _ = std::fs::remove_dir(&dir);
        match to {
            Some(to) => std::os::unix::fs::symlink(to, &dir).unwrap(),
            None => std::fs::create_dir(&dir).unwrap(),
        }
    };
    let with = |n: &str| {
        let mut c = container_config(n, &image, &["sleep", "1000"]);
        c.mounts = vec![cri::Mount {
            container_path: "/v".into(),
            host_path: dir.to_string_lossy().into(),
            ..Default::default()
        }];
        c
    };
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));

    // The control: it names the pod's own volume all along, which runs,
    // measured.
    point(Some(&own));
    let c = start_container(&mut rt, &pod, &cfg, with("own")).await;
    assert_eq!(
        sh_ok(&mut rt, &c, "/v/busybox true; echo rc=$?").await,
        "rc=0"
    );
    assert!(
        logged(&log_lines(&d, &pod), "/v/busybox", None, "exec"),
        "{}",
        d.log()
    );

    // A plain directory when CreateContainer resolves the path, the host's
    // tmpfs when it binds it, the pod's own volume when it checks it (each
    // step 1.5 s apart here).
    point(None);
    let mut rt2 = d.runtime().await.unwrap();
    let (p2, c2, swapped) = (pod.clone(), cfg.clone(), with("swapped"));
    let create = tokio::spawn(async move {
        rt2.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: p2,
            config: Some(swapped),
            sandbox_config: Some(c2),
        })
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(750)).await;
    point(Some(&host));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    point(Some(&own));
    let id = create.await.unwrap().unwrap().into_inner().container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    // The host's tmpfs is what the container has, and what was marked: it
    // runs measured through the container's mount (until 2026-12-05 the
    // host's tmpfs was noexec; marked as the pod's own, its filesystem, it
    // would have put the host's executions there into the pod's log).
    assert_eq!(sh_ok(&mut rt, &id, "cat /v/whose").await, "host's");
    assert_eq!(
        sh_ok(&mut rt, &id, "/v/busybox true; echo rc=$?").await,
        "rc=0"
    );
    let log = log_lines(&d, &pod);
    let swapped = imacri_integration::escapes::entries_of(&log, &id);
    assert!(logged(&swapped, "/v/busybox", None, "exec"), "{log:#?}");
    // The host's own execution there is none of the pod's.
    imacri_integration::escapes::host_run_not_logged(&d, &pod, &host.join("busybox"));
    stop_pod(&mut rt, &pod).await;
    drop(mounts);
}
