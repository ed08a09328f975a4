//! Lease holders and a stopped container's watches hold up no one.

use super::*;

/// A process that holds a write lease makes every other open of its file
/// wait for it (up to fs.lease-break-time, 45 s). imacri opens the files it
/// measures (the event fd fanotify opens for the reader, its own file for a
/// read lease of a mapped one) without waiting: a lease holder in one pod
/// cannot stall a reader or the hashing threads every pod shares. Mapping
/// the file works (without a lease of imacri's); running it is refused at
/// once (the kernel denies an event whose file fanotify cannot open).
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_holder_cannot_stall_the_engine() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, _b) = two_containers(&d, &mut rt, "wrlease", "measure", &image).await;
    let ms = |out: &str| -> u64 {
        out.trim()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let (code, out, err) = exec_sh(&mut rt, &a, "escape wrlease-mmap /tmp/wl.bin").await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("RAN wrlease-mmap 42 IN"), "{out}\n{}", d.log());
    assert!(
        ms(&out) < 5000,
        "the mapping waited on the lease: {out}\n{}",
        d.log()
    );
    let mine = entries_of(&log_lines(&d, &pod), &a);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    assert!(
        logged(&mine, "/tmp/wl.bin", Some(&code_file), "mmap"),
        "{mine:#?}\n{}",
        d.log()
    );
    let (code, out, err) = exec_sh(
        &mut rt,
        &a,
        "cp /bin/busybox /tmp/wl-exec && escape wrlease-exec /tmp/wl-exec",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("EXEC ") && !out.starts_with("EXEC 0 "),
        "{out}\n{}",
        d.log()
    );
    assert!(ms(&out) < 5000, "the execution waited on the lease: {out}");
    // The reader goes on: the next execution runs at once.
    let t0 = std::time::Instant::now();
    assert_eq!(sh_ok(&mut rt, &a, "hello").await, "hello dynamic");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    stop_pod(&mut rt, &pod).await;
}

/// A container's watches are its fanotify group's, and a mark that asks
/// for permission events makes every open of its file wait for the group's
/// reader: once the container is gone, so must its group be, or the next
/// open of a file it mapped waits forever (what outlives a container: a
/// pod's tmpfs volume, measured under `volumes = "measure"`; the host's
/// files a guarded process maps). Here one container mapped a file of the
/// pod's volume and ran a script from it, another mapped one and exited by
/// itself. Once they are gone, the host opens each for writing at once,
/// and nothing more is logged for them.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_containers_watches_hold_up_no_open() {
    let env = Env::get();
    let (d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("gone-watch", "vols");
    let vol = imacri_integration::kubelet_tmpfs_volume(work.path(), &cfg, "vol");
    let with_vol = |mut c: cri::ContainerConfig| {
        c.mounts.push(cri::Mount {
            container_path: "/x".into(),
            host_path: vol.to_string_lossy().into(),
            ..Default::default()
        });
        c
    };
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let stopped = start_container(
        &mut rt,
        &pod,
        &cfg,
        with_vol(container_config("a", &image, &["sleep", "1000"])),
    )
    .await;
    let (code, out, err) = exec_sh(
        &mut rt,
        &stopped,
        "escape file-mmap /x/a.bin && printf '#!/bin/sh\\nexec sleep 1000\\n' > /x/s.sh && chmod +x /x/s.sh && (/x/s.sh > /dev/null 2>&1 &)",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}\n{}", d.log());
    let exited = start_container(
        &mut rt,
        &pod,
        &cfg,
        with_vol(container_config(
            "b",
            &image,
            &["escape", "file-mmap", "/x/b.bin"],
        )),
    )
    .await;
    let st = imacri_integration::client::wait_exited(&mut rt, &exited).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&entries_of(&lines, &stopped), "/x/a.bin", None, "mmap"),
        "{lines:#?}"
    );
    assert!(
        logged(&entries_of(&lines, &exited), "/x/b.bin", None, "mmap"),
        "{lines:#?}"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: stopped.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    for c in [&stopped, &exited] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.to_string(),
        })
        .await
        .unwrap();
    }
    let logged_before = log_lines(&d, &pod).len();
    for f in ["a.bin", "s.sh", "b.bin"] {
        // In a thread of its own: an open that waits on a permission
        // event nobody reads cannot be given up by the one waiting.
        let path = vol.join(f);
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let opened = std::fs::OpenOptions::new().write(true).open(&path);
            let _ = done.send(opened.map(drop).map_err(|e| e.to_string()));
        });
        match result.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(r) => assert_eq!(r, Ok(()), "{f}"),
            Err(_) => panic!(
                "opening {f} for writing waits on a gone container's watch (/proc/locks:\n{})\n{}",
                std::fs::read_to_string("/proc/locks").unwrap_or_default(),
                d.log()
            ),
        }
    }
    assert_eq!(log_lines(&d, &pod).len(), logged_before);
    stop_pod(&mut rt, &pod).await;
    nix::mount::umount2(&vol, nix::mount::MntFlags::MNT_DETACH).unwrap();
}
