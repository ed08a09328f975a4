//! Files written while or after they run: a mapped file rewritten in place
//! (ToMToU) or truncated, a script rewritten under its interpreter, a
//! program's loader rewritten under the program, a lease
//! holder that would stall the engine, and a gone container's watches,
//! which must hold up no open.

use imacri_integration::client::{exec_sh, exec_sh_within, run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};

/// A shell line's start that keeps the image's libc mapped for 2 s (the
/// dynamic `lazy` sleeping in the background).
const HELD_LIBC: &str = "lazy > /dev/null & sleep 0.5;";

/// ToMToU: a file mapped executable and then rewritten in place runs what
/// was written (the mapping reads the page cache), not what was measured.
/// In a plain pod the rewritten code runs; in an ima pod the write is a
/// `tomtou` entry (a violation the verifier reports) in measure mode, and
/// kills the container in enforce mode, where the file was one the policy
/// allows (the image's libc, first copied up so that it can be written in
/// place).
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_file_rewritten_in_place_is_a_violation() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);

    let plain = pod_config("tomtou-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    let (_, out, err) = exec_sh(&mut rt, &c, "escape tomtou /tmp/t.bin").await;
    assert!(out.contains("RAN tomtou 43"), "control: {out}{err}");
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-measure", "measure", &image).await;
    for c in [&a, &b] {
        let (_, out, err) = exec_sh(&mut rt, c, "escape tomtou /tmp/t.bin").await;
        assert!(out.contains("RAN tomtou 43"), "{out}{err}");
        let lines = log_lines(&d, &pod);
        let mine = entries_of(&lines, c);
        assert!(
            logged(&mine, "/tmp/t.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/t.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
        // Mapping it again measures it again (what it holds now); reading
        // a watched file is no violation.
        let before = entries_of(&log_lines(&d, &pod), c).len();
        sh_ok(
            &mut rt,
            c,
            "escape threaded-mmap /tmp/t.bin; cat /tmp/t.bin > /dev/null",
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        let c43 = sha256_hex(&[0xb8, 0x2b, 0, 0, 0, 0xc3]);
        assert!(logged(&mine, "/tmp/t.bin", Some(&c43), "mmap"), "{mine:#?}");
        let new: Vec<_> = mine[before..]
            .iter()
            .filter(|l| l.ends_with(" tomtou"))
            .collect();
        assert!(new.is_empty(), "{new:#?}");
        // truncate(2) opens nothing and sends fanotify no event: the read
        // lease sees it, and the `tomtou` is logged before the cut lands.
        let out = sh_ok(
            &mut rt,
            c,
            "cp /tmp/t.bin /tmp/cut.bin && escape truncate /tmp/cut.bin",
        )
        .await;
        assert!(out.contains("CUT truncate 0"), "{out}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(
            logged(&mine, "/tmp/cut.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
    }
    assert_running(&mut rt, &a, "the container").await;
    stop_pod(&mut rt, &pod).await;

    // Enforce, with a file the policy allows that the pod can write in
    // place: the image's libc, copied up (same digest). While it is mapped,
    // an open for writing is refused before a byte is written; the
    // container runs on with what was measured. Once nothing maps it (the
    // container's shells are static busybox), it is written as any file.
    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-enforce", "strict", &image).await;
    let refused = |out: &str| out.contains("Operation not permitted");
    for c in [&a, &b] {
        sh_ok(
            &mut rt,
            c,
            &format!("cp {LIBC} /tmp/l && cat /tmp/l > {LIBC}"),
        )
        .await;
        let (code, out, err) = exec_sh(&mut rt, c, &format!("escape tomtou {LIBC} keep")).await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(!out.contains("WROTE"), "{out}{err}");
        assert!(refused(&out), "{out}{err}\n{}", d.log());
        let out = sh_ok(
            &mut rt,
            c,
            &format!("{HELD_LIBC} cat /tmp/l > {LIBC}; echo rc=$?; wait"),
        )
        .await;
        assert!(out.ends_with("rc=1"), "{out}");
        let out = sh_ok(&mut rt, c, &format!("cat /tmp/l > {LIBC}; echo rc=$?")).await;
        assert!(out.ends_with("rc=0"), "nothing maps it: {out}");
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        assert_running(&mut rt, c, "the container").await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LIBC, None, "mmap"), "{mine:#?}");
        assert!(logged(&mine, LIBC, None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, LIBC, None, "tomtou"), "{mine:#?}");
    }
    // A truncate cannot be refused like an open: the truncater waits on
    // the lease while the container is killed, so it never cuts.
    let truncated = |d: &Imacri, c: &str| {
        let mine = entries_of(&log_lines(d, &pod), c);
        logged(&mine, LIBC, None, "tomtou")
    };
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (_, out, err) = exec_sh(&mut rt, &a, &format!("escape truncate {LIBC}")).await;
    assert!(out.contains("MAPPED") && !out.contains("CUT"), "{out}{err}");
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert_eq!(stats["fanotify"]["unleasedFiles"], 0, "{stats}");
    let st = imacri_integration::client::wait_exited(&mut rt, &a).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}");
    assert!(
        st.message.contains("truncated (its read lease broke)"),
        "{st:?}"
    );
    let violation = async {
        while let Ok(Some(e)) = events.message().await {
            if e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                && e.container_id == a
            {
                return true;
            }
        }
        false
    };
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), violation).await;
    assert_eq!(seen, Ok(true), "IMA_VIOLATION_EVENT for {a}");
    drop(events);
    assert!(truncated(&d, &a), "{}", d.log());
    // The watches are the group's and the leases the keeper's: a restarted
    // imacri reads them back and still refuses (not only notices after).
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (_, out, err) = exec_sh(
        &mut rt,
        &b,
        &format!("{HELD_LIBC} cat /tmp/l > {LIBC}; echo rc=$?; wait"),
    )
    .await;
    assert!(out.trim_end().ends_with("rc=1"), "{out}{err}\n{}", d.log());
    assert!(refused(&err), "{out}{err}");
    assert_running(&mut rt, &b, &d.log()).await;
    // A truncate while imacri is down waits on the kept lease; the next
    // imacri finds it breaking and kills the container.
    sh_ok(
        &mut rt,
        &b,
        &format!("escape truncate {LIBC} 2 > /tmp/cut.out 2>&1 &"),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    d.kill();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = imacri_integration::client::wait_exited(&mut rt, &b).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}\n{}", d.log());
    assert!(st.message.contains("while imacri was down"), "{st:?}");
    assert!(truncated(&d, &b), "{}", d.log());
    stop_pod(&mut rt, &pod).await;
}

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

/// A script is read by its interpreter after its execution was measured,
/// a buffer at a time: rewritten in place while the interpreter sleeps, it
/// runs what was written (the control, in a plain pod). In an ima pod the
/// rewrite is seen as IMA's ToMToU sees it (the file is open by a reader
/// of the pod): in `measure` mode a `tomtou` violation, under `enforce`
/// the open for writing is refused (a `deny` entry) and what was measured
/// runs. Once the script is done, rewriting it is no violation. Under
/// `enforce` imacri is restarted while the script runs: the watch is the
/// group's, read back by the next imacri.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_rewritten_while_it_runs_is_seen() {
    let env = Env::get();
    let (mut d, image, work) = node(env, "").await;
    // Longer than ash's read buffer, so that the last line is read after
    // the sleep.
    let pad = "# padding padding padding padding padding padding padding";
    let mut text = String::from("#!/bin/sh\nsleep 6\n");
    for _ in 0..200 {
        text.push_str(pad);
        text.push('\n');
    }
    let off = text.len() + "echo ".len();
    text.push_str("echo SAFE\n");
    // The strict policy allows this script (by digest, anywhere).
    let golden = work.path().join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
    g["digests"] = serde_json::json!([format!("sha256:{}", sha256_hex(text.as_bytes()))]);
    std::fs::write(&golden, serde_json::to_vec(&g).unwrap()).unwrap();
    let make = format!(
        "printf '#!/bin/sh\\nsleep 6\\n' > /tmp/s.sh && for i in $(seq 200); do echo '{pad}' >> /tmp/s.sh; done && echo 'echo SAFE' >> /tmp/s.sh && chmod +x /tmp/s.sh"
    );
    let rewrite =
        format!("printf EVIL | dd of=/tmp/s.sh bs=1 seek={off} conv=notrunc 2>&1; echo dd=$?");
    let mut rt = d.runtime().await.unwrap();
    for (cfg, ev) in [
        (pod_config("script-plain"), None),
        (ima("script-measure", "measure"), Some("tomtou")),
        (ima("script-strict", "strict"), Some("deny")),
    ] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
        let (code, out, err) = exec_sh(
            &mut rt,
            &c,
            &format!("{make} && (/tmp/s.sh > /tmp/out 2>&1 &)"),
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if ev == Some("deny") {
            d.kill();
            d.spawn().await.unwrap();
            rt = d.runtime().await.unwrap();
        }
        let run = format!("{rewrite}; while [ ! -s /tmp/out ]; do sleep 0.2; done; cat /tmp/out");
        let (_, out, err) = exec_sh(&mut rt, &c, &run).await;
        match ev {
            Some("deny") => {
                assert!(out.contains("Operation not permitted"), "{out}{err}");
                assert!(out.contains("SAFE") && !out.contains("EVIL"), "{out}{err}");
            }
            _ => {
                assert!(out.contains("dd=0"), "{out}{err}");
                assert!(out.contains("EVIL"), "the rewrite ran: {out}{err}");
            }
        }
        if let Some(ev) = ev {
            let lines = log_lines(&d, &pod);
            assert!(logged(&lines, "/tmp/s.sh", None, ev), "{lines:#?}");
            let violations = lines.len();
            // Done running: a rewrite is fine (and what runs next is
            // measured again).
            let (_, out, err) = exec_sh(&mut rt, &c, &rewrite).await;
            assert!(out.contains("dd=0"), "{out}{err}");
            assert_eq!(log_lines(&d, &pod).len(), violations, "{}", d.log());
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// The kernel maps a dynamically linked program's interpreter (ld.so)
/// itself, with no `mmap` call the map guard could see, and then lets it be
/// opened for writing (the program itself is ETXTBSY while it runs). A
/// loader rewritten in place under a running program runs what was
/// written the next time the program calls into it (here: resolving a
/// lazily bound `puts`). In a plain pod the written code runs. In an ima
/// pod the loader is watched as a mapped library is: the write is a
/// `tomtou` entry in measure mode, and refused under enforce (the image's
/// own loader, copied up: a file the policy allows), where dynamic
/// programs then run on with what was measured. Until 2026-12-04 the
/// rewrite ran unlogged in both modes.
#[tokio::test(flavor = "multi_thread")]
async fn a_loader_rewritten_under_its_program_is_a_violation() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let attack = format!("escape loader-rewrite /bin/lazy {LOADER}");

    // The same, the task's first execution of the program having failed on
    // its interpreter (the loader renamed away and back in between).
    let hidden = format!("{attack} hide");

    let plain = pod_config("loader-plain");
    let (pod, c) = sleeping_pod(&mut rt, &d, &plain, &image).await;
    for a in [&attack, &hidden] {
        let (_, out, err) = exec_sh(&mut rt, &c, a).await;
        assert!(out.contains("RAN loader-rewrite 42"), "control: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "loader-measure", "measure", &image).await;
    for c in [&a, &b] {
        let (_, out, err) = exec_sh(&mut rt, c, &attack).await;
        // Measure mode lets the write through, logged before it lands.
        assert!(out.contains("RAN loader-rewrite 42"), "{out}{err}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, "/bin/lazy", None, "exec"), "{mine:#?}");
        assert!(
            logged(&mine, LOADER, None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
    }
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "loader-enforce", "strict", &image).await;
    for c in [&a, &b] {
        let (code, out, err) = exec_sh(&mut rt, c, &attack).await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            out.contains("loader-rewrite: Operation not permitted"),
            "{out}{err}\n{}",
            d.log()
        );
        assert_eq!(sh_ok(&mut rt, c, "lazy").await, "lazy");
        assert_running(&mut rt, c, "the container").await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LOADER, None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, LOADER, None, "tomtou"), "{mine:#?}");
    }
    stop_pod(&mut rt, &pod).await;

    // A task whose execution failed on the program's interpreter executes
    // the program again: that event is the program's, and the loader that
    // follows is watched all the same. Until 2026-12-04 the program was
    // taken for the awaited loader and the real loader went unwatched: its
    // rewrite ran unlogged in measure mode and was let through under
    // enforce.
    for (name, policy) in [
        ("loader-hidden-measure", "measure"),
        ("loader-hidden-enforce", "strict"),
    ] {
        let cfg = ima(name, policy);
        let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
        let (code, out, err) = exec_sh(&mut rt, &c, &hidden).await;
        let mine = entries_of(&log_lines(&d, &pod), &c);
        if policy == "measure" {
            assert!(out.contains("RAN loader-rewrite 42"), "{out}{err}");
            assert!(
                logged(&mine, LOADER, None, "tomtou"),
                "{mine:#?}\n{}",
                d.log()
            );
        } else {
            assert_ne!(code, 0, "{out}{err}");
            assert!(
                out.contains("loader-rewrite: Operation not permitted"),
                "{out}{err}\n{}",
                d.log()
            );
            assert!(logged(&mine, LOADER, None, "deny"), "{mine:#?}");
        }
        stop_pod(&mut rt, &pod).await;
    }
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

/// A file of the rootfs mapped shared and writable, its fd closed: on
/// overlayfs the mapping holds the upper layer's file, not the one a
/// process opens, so the kernel's refusal to execute a file open for writing
/// (ETXTBSY), the read lease that checks a mapping for writers, and the
/// close-after-write event that drops a remembered digest all miss it, and
/// writes through it raise no event and move no mtime. In a plain pod a
/// running program's code and an executable mapping are changed so
/// (`shared-exec`, `shared-cache`, `shared-mmap`: "RAN"); in an ima pod the
/// file is held open for writing for as long as such a mapping can exist
/// (its container's life, and across an imacri restart): its execution
/// fails as on any other filesystem (ETXTBSY), and its executable mapping is
/// a `writers` violation, refused under enforce, also for a file the policy
/// allows. Shared writable mappings themselves (a database's) work, from a
/// multi-threaded process too.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_mapped_shared_and_writable_runs_only_as_measured() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    const MODES: [&str; 3] = ["shared-exec", "shared-cache", "shared-mmap"];
    let busy = |out: &str| out.contains("Text file busy");

    let plain = pod_config("shared-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    for m in MODES {
        let (_, out, err) = exec_sh(&mut rt, &c, &format!("escape {m} /tmp/{m}")).await;
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}{err}");
    }
    for cmd in [
        "escape shared-exec /bin/sleeper keep".to_string(),
        format!("escape shared-mmap {LIBC} keep"),
    ] {
        let (_, out, err) = exec_sh(&mut rt, &c, &cmd).await;
        assert!(out.contains("RAN shared-"), "control {cmd}: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    // Measure mode, without a seccomp profile and with RuntimeDefault.
    let (pod, a, b) = two_containers(&d, &mut rt, "shared-measure", "measure", &image).await;
    for c in [&a, &b] {
        for m in ["shared-exec", "shared-cache"] {
            let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m} /tmp/{m}")).await;
            assert!(!out.contains("RAN"), "{m}: {out}{err}\n{}", d.log());
            assert!(busy(&out), "{m}: {out}{err}");
        }
        // Measured, and a violation: what runs may change.
        let (_, out, err) = exec_sh(&mut rt, c, "escape shared-mmap /tmp/shared-mmap").await;
        assert!(out.contains("RAN shared-mmap 43"), "{out}{err}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(
            logged(&mine, "/tmp/shared-mmap", None, "writers"),
            "{mine:#?}"
        );
        // A database's mappings work, on the rootfs and on /dev/shm.
        for cmd in [
            "escape shared-rw /tmp/db",
            "escape shared-rw /tmp/db2 threaded",
            "escape shared-rw /dev/shm/db",
        ] {
            assert_eq!(sh_ok(&mut rt, c, cmd).await, "SHARED ok", "{cmd}");
        }
    }
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert!(
        stats["fanotify"]["heldWriters"].as_u64() >= Some(8),
        "{stats}"
    );
    // Held by the fd keeper too: a mapping kept across an imacri restart
    // still keeps its file from running.
    let out = sh_ok(
        &mut rt,
        &a,
        "(escape shared-keep /tmp/k > /tmp/k.out 2>&1 &) ; sleep 0.5; cat /tmp/k.out",
    )
    .await;
    assert_eq!(out, "READY");
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (_, out, err) = exec_sh(&mut rt, &a, "/tmp/k; echo rc=$?").await;
    assert!(busy(&format!("{out}{err}")), "{out}{err}\n{}", d.log());
    assert_running(&mut rt, &a, "the container").await;
    stop_pod(&mut rt, &pod).await;

    // Enforce: files the policy allows, changed through such a mapping
    // after their check, are refused before.
    let (pod, a, b) = two_containers(&d, &mut rt, "shared-enforce", "strict", &image).await;
    for c in [&a, &b] {
        // shared-exec writes through its mapping whether or not the program
        // ran: last.
        for m in ["shared-cache", "shared-exec"] {
            let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m} /bin/sleeper keep")).await;
            assert!(!out.contains("RAN"), "{m}: {out}{err}\n{}", d.log());
            assert!(busy(&out), "{m}: {out}{err}");
        }
        let (_, out, err) = exec_sh(&mut rt, c, &format!("escape shared-mmap {LIBC} keep")).await;
        assert!(!out.contains("RAN"), "{out}{err}\n{}", d.log());
        assert!(out.contains("Operation not permitted"), "{out}{err}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LIBC, None, "writers"), "{mine:#?}");
        // libc stays held while the container runs: no program maps it
        // now; the rest of the image runs.
        let (code, out, err) = exec_sh(&mut rt, c, "hello").await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains("failed to map segment"), "{out}{err}");
        assert_eq!(
            sh_ok(&mut rt, c, "escape shared-rw /tmp/db3").await,
            "SHARED ok"
        );
    }
    stop_pod(&mut rt, &pod).await;
}

/// The same mapping made outside the pod (here by the test, as a host
/// daemon or a helper the pod passed an fd to would): nothing of imacri's
/// holds it, and the kernel cannot see it. A program of the pod's rootfs so
/// mapped then runs code changed through the mapping in a plain pod
/// ("RAN"); in an ima pod the execution (measured anew: the mapping's
/// writer closed the file, which dropped its digest) finds the overlay
/// file's upper file open for writing while the overlay file is not: a
/// `writers` violation, refused under enforce.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_made_outside_the_pod_is_a_writers_violation() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    // Maps the container's file shared and writable from here, runs it in
    // the container, and writes its exit code (42) while it sleeps.
    async fn run_changed(rt: &mut imacri_integration::client::Rt, c: &str, file: &str) -> String {
        let pid = imacri_integration::client::container_info(rt, c).await["pid"]
            .as_u64()
            .unwrap();
        let map = SharedMap::new(&format!("/proc/{pid}/root{file}"));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let patch = async {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            map.poke(SLEEPER_CODE, 42);
        };
        let cmd = format!("{file}; echo rc=$?");
        let (out, ()) = tokio::join!(exec_sh(rt, c, &cmd), patch);
        format!("{}{}", out.1, out.2)
    }

    let plain = pod_config("outside-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    sh_ok(&mut rt, &c, "escape write-sleeper /tmp/k").await;
    let out = run_changed(&mut rt, &c, "/tmp/k").await;
    assert!(out.contains("rc=42"), "control: {out}");
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "outside-measure", "measure", &image).await;
    for c in [&a, &b] {
        sh_ok(&mut rt, c, "escape write-sleeper /tmp/k").await;
        let out = run_changed(&mut rt, c, "/tmp/k").await;
        // Measure mode lets it run, as IMA does a file with writers, and
        // logs the violation.
        assert!(out.contains("rc="), "{out}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(
            logged(&mine, "/tmp/k", None, "writers"),
            "{mine:#?}\n{}",
            d.log()
        );
        // Only there: the image's own files (lower layers) are no writers'.
        let writers: Vec<_> = mine.iter().filter(|l| l.ends_with(" writers")).collect();
        assert!(
            writers.iter().all(|l| l.contains(" /tmp/k ")),
            "{writers:#?}"
        );
    }
    stop_pod(&mut rt, &pod).await;

    // Enforce, with the program the policy allows, copied up.
    let (pod, a, b) = two_containers(&d, &mut rt, "outside-enforce", "strict", &image).await;
    for c in [&a, &b] {
        sh_ok(
            &mut rt,
            c,
            "cat /bin/sleeper > /tmp/s && cat /tmp/s > /bin/sleeper",
        )
        .await;
        let out = run_changed(&mut rt, c, "/bin/sleeper").await;
        assert!(out.contains("rc=126"), "{out}\n{}", d.log());
        assert!(out.contains("Operation not permitted"), "{out}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, "/bin/sleeper", None, "writers"), "{mine:#?}");
        let writers: Vec<_> = mine.iter().filter(|l| l.ends_with(" writers")).collect();
        assert!(
            writers.iter().all(|l| l.contains(" /bin/sleeper ")),
            "{writers:#?}"
        );
    }
    stop_pod(&mut rt, &pod).await;
}

/// Holds executions of one file between imacri's answer and the kernel's
/// own writers check (`do_open_execat` checks after the open's permission
/// events are answered): a fanotify group of the test's with an
/// FAN_OPEN_PERM mark on the file, which the execution's open asks after
/// imacri's groups (they are of a higher class) allowed it. Answers every
/// other open at once.
struct ExecGate {
    held: std::sync::mpsc::Receiver<()>,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExecGate {
    fn new(path: &str) -> ExecGate {
        use nix::sys::fanotify::*;
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE,
        )
        .unwrap();
        fan.mark(
            MarkFlags::FAN_MARK_ADD,
            MaskFlags::FAN_OPEN_PERM,
            None,
            Some(path),
        )
        .unwrap();
        let (tx, held) = std::sync::mpsc::channel();
        let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let go = release.clone();
        let thread = std::thread::spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let me = std::process::id() as i32;
            let mut waiting = None;
            loop {
                let released = go.load(std::sync::atomic::Ordering::SeqCst);
                if released {
                    if let Some(ev) = waiting.take() {
                        let ev: FanotifyEvent = ev;
                        let fd = ev.fd().unwrap();
                        fan.write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW))
                            .unwrap();
                    }
                    return;
                }
                let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(20u8)).unwrap_or(0) == 0 {
                    continue;
                }
                for ev in fan.read_events().unwrap() {
                    let Some(fd) = ev.fd() else { continue };
                    if ev.pid() == me || waiting.is_some() {
                        fan.write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW))
                            .unwrap();
                    } else {
                        waiting = Some(ev);
                        let _ = tx.send(());
                    }
                }
            }
        });
        ExecGate {
            held,
            release,
            thread: Some(thread),
        }
    }
}

impl Drop for ExecGate {
    fn drop(&mut self) {
        self.release
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A writer outside the pod racing an execution: while the execution is
/// held between imacri's answer and the kernel's writers check (`ExecGate`),
/// the test opens the container's program for writing, maps it shared and
/// writable, closes its fd and writes the exit code 42 through the
/// mapping. The kernel's check then counts no writer (the mapping holds the
/// overlay's upper file), and in a plain pod the changed program runs (42).
/// In an ima pod imacri answered the execution with a read lease on the file
/// held until the kernel's check: the writer's open waits on it, the
/// execution fails that check (ETXTBSY: the waiting open counts as a
/// writer), and only then does the writer get its file. Until 2026-12-04 the
/// changed program ran in measure and enforce mode.
/// A writer that opens a mapped file while a mapping call of it is checked
/// and not made yet (its caller on its way into the kernel's mapping; a
/// test hook holds the answer 1.5 s) finds no mapping in the container's
/// maps, but the call counts as one: refused under `anonymous_exec =
/// "deny"` (the mapping then runs what was measured), a `tomtou` in
/// measure mode. Letting it through unseen would have the mapping run the
/// rewritten file.
/// An executable mapping right after an outside process closed the fd
/// through which it mapped the file shared and writable. That close is
/// what makes the next check measure the file anew (and so look for such a
/// mapping of the overlay file's upper file, which the kernel does not
/// count as a writer); it comes through the container's closes group,
/// which its reader reads, while a mapping is decided on the map guard's
/// thread. Decided from the cached digest before the reader got to the
/// close, the mapping went through with no `writers` entry while the
/// outside process could change its code. With the reader held 2 s
/// before it reads closes (`IMACRI_TEST_CLOSES_DELAY`), a mapping made 1 s
/// after the close is a `writers` violation: the map guard reads the
/// closes queued before it decides.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_right_after_an_outside_writer_closed_is_checked() {
    let (d, image, _work) = node_with(Env::get(), "IMACRI_TEST_CLOSES_DELAY", "2000").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("closes-race", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    // Measured and cached: mapped once.
    let out = sh_ok(
        &mut rt,
        &c,
        "escape write-sleeper /tmp/lib && escape map-later /tmp/lib 0 0",
    )
    .await;
    assert!(out.contains("MAPPED"), "{out}");
    let pid = imacri_integration::client::container_info(&mut rt, &c).await["pid"]
        .as_u64()
        .unwrap();
    let mut rt2 = d.runtime().await.unwrap();
    let c2 = c.clone();
    // Opens the file now, maps it 1.5 s later.
    let later =
        tokio::spawn(
            async move { exec_sh(&mut rt2, &c2, "escape map-later /tmp/lib 1500 0").await },
        );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let map = SharedMap::new(&format!("/proc/{pid}/root/tmp/lib"));
    let (_, out, err) = later.await.unwrap();
    assert!(out.contains("MAPPED"), "{out}{err}");
    let mine = entries_of(&log_lines(&d, &pod), &c);
    assert!(
        logged(&mine, "/tmp/lib", None, "writers"),
        "{mine:#?}\n{}",
        d.log()
    );
    drop(map);
    stop_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_racing_a_mapping_call_is_seen() {
    let env = Env::get();
    let (mut d, image, _work) =
        node(env, "\n[ima.policies.nojit]\nanonymous_exec = \"deny\"").await;
    d.kill();
    d.vars = vec![(
        "IMACRI_TEST_MAPGUARD_ANSWER_DELAY".into(),
        "/tmp/slow.bin:1500".into(),
    )];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let race = "escape file-mmap /tmp/slow.bin > /tmp/m.out 2>&1 & \
                sleep 0.5; echo x > /tmp/slow.bin; echo rc=$?; wait; cat /tmp/m.out";
    for policy in ["nojit", "measure"] {
        let name = format!("map-race-{policy}");
        let (pod, a, _b) = two_containers(&d, &mut rt, &name, policy, &image).await;
        let (_, out, err) = exec_sh(&mut rt, &a, race).await;
        let mine = entries_of(&log_lines(&d, &pod), &a);
        if policy == "nojit" {
            assert!(
                out.contains("rc=1") && out.contains("RAN file-mmap"),
                "{out}{err}\n{}",
                d.log()
            );
            assert!(logged(&mine, "/tmp/slow.bin", None, "deny"), "{mine:#?}");
        } else {
            assert!(out.contains("rc=0"), "{out}{err}");
            assert!(
                logged(&mine, "/tmp/slow.bin", None, "tomtou"),
                "{mine:#?}\n{}",
                d.log()
            );
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// A write-open of a mapped file finds nothing mapping it, and while its
/// watch is about to end a new call maps the file: that call joined the
/// watch after the look, so the look is made again. Here the call waits
/// 1.5 s between joining and its writers check, the look 1 s before the
/// watch ends, and the writer closes at once without writing: had the
/// watch ended, the call would find no writer, map the file unwatched, and
/// the next writer would rewrite it under the mapping unseen.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_call_during_a_writers_look_keeps_the_watch() {
    let env = Env::get();
    let (mut d, image, _work) =
        node(env, "\n[ima.policies.nojit]\nanonymous_exec = \"deny\"").await;
    d.kill();
    d.vars = vec![
        (
            "IMACRI_TEST_MAPGUARD_WATCH_DELAY".into(),
            "/tmp/late.bin:1500".into(),
        ),
        (
            "IMACRI_TEST_WRITE_LOOK_DELAY".into(),
            "/tmp/late.bin:1000".into(),
        ),
    ];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, _b) = two_containers(&d, &mut rt, "map-look", "nojit", &image).await;
    // Mapped once (watched; the mapper gone), then: a process opens it (its
    // open, as every open, waits for the reader the look holds up), a
    // writer opens and closes, the process maps its fd 0.3 s into the
    // writer's look, and a second writer comes once the mapping is made.
    let race = "escape file-mmap /tmp/late.bin > /dev/null; \
                escape map-later /tmp/late.bin 600 30 > /tmp/m.out 2>&1 & \
                sleep 0.3; (: 3<> /tmp/late.bin); echo first=$?; \
                for i in $(seq 50); do grep -q MAPPED /tmp/m.out && break; sleep 0.1; done; \
                cat /tmp/m.out; echo evil > /tmp/late.bin; echo second=$?";
    let (_, out, err) = exec_sh(&mut rt, &a, race).await;
    assert!(out.contains("MAPPED map-later"), "{out}{err}");
    assert!(
        out.contains("second=1") && err.contains("Operation not permitted"),
        "rewritten under a mapping: {out}{err}\n{}",
        d.log()
    );
    let mine = entries_of(&log_lines(&d, &pod), &a);
    assert!(logged(&mine, "/tmp/late.bin", None, "deny"), "{mine:#?}");
    stop_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_racing_an_execution_cannot_change_what_runs() {
    let (d, image, _work) = node(Env::get(), "").await;
    let mut rt = d.runtime().await.unwrap();
    /// Runs `file` in container `c` with a writer racing it, the execution
    /// held for `hold`; returns the run's output and whether the writer
    /// had its file before the execution went on.
    async fn race(d: &Imacri, c: &str, file: &str, hold: u64) -> (String, bool) {
        let mut rt = d.runtime().await.unwrap();
        let pid = imacri_integration::client::container_info(&mut rt, c).await["pid"]
            .as_u64()
            .unwrap();
        let host = format!("/proc/{pid}/root{file}");
        let gate = ExecGate::new(&host);
        let cmd = format!("{file}; echo rc=$?");
        let c2 = c.to_string();
        let mut rt2 = d.runtime().await.unwrap();
        let run = tokio::spawn(async move { exec_sh(&mut rt2, &c2, &cmd).await });
        gate.held
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the execution reached the gate");
        let (done_tx, done) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let map = SharedMap::new(&host);
            map.poke(SLEEPER_CODE, 42);
            let _ = done_tx.send(());
            std::thread::sleep(std::time::Duration::from_secs(1));
        });
        let raced = done
            .recv_timeout(std::time::Duration::from_secs(hold))
            .is_ok();
        drop(gate);
        let (_, out, err) = run.await.unwrap();
        writer.join().unwrap();
        (format!("{out}{err}"), raced)
    }

    let (pod, c) = sleeping_pod(&mut rt, &d, &pod_config("race-plain"), &image).await;
    sh_ok(&mut rt, &c, "escape write-sleeper /tmp/k && /tmp/k").await;
    let (out, raced) = race(&d, &c, "/tmp/k", 2).await;
    assert!(raced && out.contains("rc=42"), "control: {raced} {out}");
    stop_pod(&mut rt, &pod).await;

    for (name, policy) in [("race-measure", "measure"), ("race-enforce", "strict")] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &ima(name, policy), &image).await;
        // The program the policy allows, copied up, run once (cached).
        sh_ok(
            &mut rt,
            &c,
            "cat /bin/sleeper > /tmp/s && cat /tmp/s > /bin/sleeper && /bin/sleeper",
        )
        .await;
        let (out, raced) = race(&d, &c, "/bin/sleeper", 2).await;
        assert!(!raced, "the writer had the file in the window: {out}");
        assert!(out.contains("rc=126"), "{out}\n{}", d.log());
        assert!(out.contains("Text file busy"), "{out}");
        assert_running(&mut rt, &c, "the container").await;
        // An execution that does not get past the kernel's check within
        // 5 s of a writer waiting is killed (a `writers` violation), and
        // the writer goes on.
        if policy == "measure" {
            let (out, raced) = race(&d, &c, "/bin/sleeper", 8).await;
            assert!(raced, "the writer waits no longer: {out}");
            assert!(out.contains("rc=137"), "{out}\n{}", d.log());
            let mine = entries_of(&log_lines(&d, &pod), &c);
            assert!(logged(&mine, "/bin/sleeper", None, "writers"), "{mine:#?}");
            assert_running(&mut rt, &c, "the container").await;
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// An execution whose file is rewritten between imacri's answer and the
/// kernel's own writers check (`do_open_execat`: the open with its
/// permission event, then `deny_write_access`) would run what was written
/// under the digest measured before. `escape exec-swap` starves the
/// executing child once it is answered (CPU 0, SCHED_IDLE, a spinner
/// there) and rewrites the file then, 20 times: on the rootfs (overlayfs),
/// on a measured tmpfs volume and on a hostPath on the host's disk (marked
/// through the container's mount) the writer waits on the execution's
/// read lease until the execution is past that check, which then refuses
/// it (ETXTBSY): the rewritten copy never runs.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_rewritten_before_the_kernels_check_never_runs_it() {
    let env = Env::get();
    let (d, image, work) = node(env, "\n[ima.policies.vols]\nvolumes = \"measure\"").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("exec-swap", "vols");
    let tv = imacri_integration::kubelet_tmpfs_volume(work.path(), &cfg, "tv");
    // A hostPath on the host's disk, marked through the container's mount,
    // which the pod may write (its root is no host ID).
    let hv = work.path().join("hv");
    std::fs::create_dir_all(&hv).unwrap();
    std::fs::set_permissions(&hv, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let mut cc = container_config("c", &image, &["sleep", "1000"]);
    for (dest, host) in [("/tv", &tv), ("/hv", &hv)] {
        cc.mounts.push(cri::Mount {
            container_path: dest.into(),
            host_path: host.to_string_lossy().into(),
            ..Default::default()
        });
    }
    let c = start_container(&mut rt, &pod, &cfg, cc).await;
    for dir in ["/tmp", "/tv", "/hv"] {
        let cmd = format!("escape exec-swap {dir}/prog 20");
        let (_, out, err) = exec_sh_within(&mut rt, &c, &cmd, 120).await;
        assert!(
            out.contains("HELD exec-swap") && !out.contains("SWAPPED"),
            "{dir}: {out}{err}\n{}",
            d.log()
        );
        // The rewrites went through (after the executions they raced were
        // refused): the race was run, not missed.
        let wrote: u32 = out
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(wrote > 0, "{dir}: no rewrite went through: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;
    nix::mount::umount2(&tv, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// A program's interpreter, which the kernel maps itself, is watched as a
/// mapped file, and the kernel's own writers check of it comes after
/// imacri answers its loading. `escape interp-swap` runs a program whose
/// `PT_INTERP` names a copy of the loader nothing else maps, starves the
/// execution on a busy CPU once that answer is given, and opens the loader
/// for writing then (40 tries): under `deny` every such open is refused,
/// the execution being counted as mapping the loader until it is out of
/// `execve`.
#[tokio::test(flavor = "multi_thread")]
async fn a_loader_is_not_written_while_an_execution_loads_it() {
    let env = Env::get();
    let (d, image, _work) = node(env, "\n[ima.policies.nojit]\nanonymous_exec = \"deny\"").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, _b) = two_containers(&d, &mut rt, "interp-swap", "nojit", &image).await;
    // "INTERP tries loaded refused busy after": no execution loaded the
    // loader as a writer left it, in any round; and the race was run in
    // one (writers refused, or let through once the execution failed its
    // own writers check). Under the full suite's load the 40 tries of a
    // round once all landed after the loading (`INTERP 40 0 0 0 2`): a
    // round that ran no race is run again, up to 3.
    let (mut rounds, mut ran) = (Vec::new(), false);
    while !ran && rounds.len() < 3 {
        let (_, out, err) = exec_sh_within(&mut rt, &a, "escape interp-swap /tmp/h 40", 120).await;
        let n: Vec<u32> = out
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        assert!(
            out.starts_with("INTERP") && n.len() == 5 && n[1] == 0,
            "{out}{err}\n{}",
            d.log()
        );
        ran = n[2] + n[3] > 0;
        rounds.push(out);
    }
    assert!(ran, "no round ran the race: {rounds:?}");
    stop_pod(&mut rt, &pod).await;
}
