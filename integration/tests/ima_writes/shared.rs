//! Files mapped shared and writable, and mappings made outside the pod.

use super::*;

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
