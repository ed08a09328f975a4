//! Executable mappings: memory-backed files, the loader, fds passed in, ways around
//! the map guard's filter (32-bit calls, an own listener, an own profile), a
//! file swapped in during the check, sharers that cannot be held.

use super::*;

const MAPPINGS: [&str; 12] = [
    "memfd-mmap",
    "memfd-sealed",
    "memfd-future",
    "memfd-mprotect",
    "worker-mprotect",
    "shm-mprotect",
    "shmat-exec",
    "file-mmap",
    "worker-mmap",
    "fd-pass-mmap",
    "personality",
    "ia32-rie",
];

/// Ways past the map guard's seccomp filter rather than through it: the
/// same call as a 32-bit syscall (`int 0x80`), and a seccomp listener of the
/// process's own answering CONTINUE first.
const AROUND_THE_GUARD: [&str; 2] = ["compat-mprotect", "own-listener"];

/// Secret memory (`memfd_secret`): nothing but its mapper can read it, so
/// nothing could measure it; the kernel mounts it noexec, so it runs in no
/// pod (the control included), measured or not.
async fn secret_memory_never_runs(rt: &mut imacri_integration::client::Rt, c: &str) {
    for m in ["secret-mmap", "secret-mprotect"] {
        let (code, out, err) = exec_sh(rt, c, &format!("escape {m}")).await;
        assert_ne!(code, 0, "{m}: {out}{err}");
        assert!(!out.contains("RAN"), "{m}: {out}{err}");
        assert!(
            out.contains("Operation not permitted") || out.contains("Permission denied"),
            "{m}: {out}{err}"
        );
    }
}

/// In an ima pod neither gets a call past the guard: a foreign
/// architecture's call is not allowed at all, and the kernel gives no
/// second listener to a task whose filters already have one.
async fn around_the_guard_fails(rt: &mut imacri_integration::client::Rt, c: &str) {
    // Killed by seccomp's bad-architecture action: SIGSYS (128 + 31).
    let (_, out, err) = exec_sh(rt, c, "escape compat-mprotect; echo rc=$?").await;
    assert!(!out.contains("RAN"), "a 32-bit mprotect ran: {out}{err}");
    assert!(
        out.trim_end().ends_with("rc=159"),
        "compat-mprotect: {out}{err}"
    );
    let (_, out, err) = exec_sh(rt, c, "escape own-listener; echo rc=$?").await;
    assert!(!out.contains("RAN"), "a listener of its own: {out}{err}");
    assert!(
        out.contains("own-listener: Device or resource busy") && out.trim_end().ends_with("rc=1"),
        "own-listener: {out}{err}"
    );
}

/// A process whose io_uring has a worker (a kernel thread sharing its fd
/// table, which ptrace cannot hold still) maps a library the policy
/// allows, as one without. Only in `a` (RuntimeDefault has no io_uring).
async fn uring_maps_as_any(rt: &mut imacri_integration::client::Rt, c: &str, a: &str) {
    if c != a {
        return;
    }
    let (code, out, err) = exec_sh(rt, c, "escape uring-mmap /bin/busybox").await;
    assert_eq!(code, 0, "uring-mmap: {out}{err}");
    assert!(out.contains("MAPPED uring-mmap"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn executable_mappings_are_measured_or_refused() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let page = page_digest();
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);

    // The control: every one of them runs in a plain pod.
    let plain = pod_config("escape-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    for m in MAPPINGS.iter().chain(&AROUND_THE_GUARD) {
        let (code, out, err) = exec_sh(&mut rt, &c, &format!("escape {m}")).await;
        assert_eq!(code, 0, "control {m}: {out}{err}");
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}");
    }
    // io_uring can swap the file under an fd (the swap is done at 200 ms).
    let (_, out, err) = exec_sh(&mut rt, &c, "escape uring-swap 400").await;
    assert!(out.contains("RAN uring-swap"), "control: {out}{err}");
    // So can a process sharing only the address space run what is swapped in.
    let (_, out, err) = exec_sh(&mut rt, &c, "escape uring-vm-swap 400").await;
    assert!(out.contains("RAN uring-vm-swap"), "control: {out}{err}");
    secret_memory_never_runs(&mut rt, &c).await;
    stop_pod(&mut rt, &pod).await;

    // Measure mode, without a seccomp profile and with RuntimeDefault: what
    // ran is in the log with the digest of what was mapped; what cannot be
    // measured (SHM_EXEC, READ_IMPLIES_EXEC) is refused.
    let (pod, a, b) = two_containers(&d, &mut rt, "escape-measure", "measure", &image).await;
    for c in [&a, &b] {
        for m in [
            "memfd-mmap",
            "memfd-sealed",
            "memfd-future",
            "memfd-mprotect",
            "shm-mprotect",
            "file-mmap",
            "worker-mmap",
            "worker-mprotect",
            "fd-pass-mmap",
        ] {
            let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert!(
                out.contains(&format!("RAN {m}")),
                "{m}: {out}{err}\n{}",
                d.log()
            );
        }
        // A 32-bit program (READ_IMPLIES_EXEC from the kernel, 64-bit
        // calls after a far jump) is refused before it runs: it mapped a
        // file executable with PROT_READ, unmeasured, until 2026-12-04.
        for m in ["shmat-exec", "personality", "ia32-rie"] {
            let (code, out, _) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert_ne!(code, 0, "{m}: {out}");
            assert!(out.contains("Operation not permitted"), "{m}: {out}");
        }
        around_the_guard_fails(&mut rt, c).await;
        uring_maps_as_any(&mut rt, c, &a).await;
        secret_memory_never_runs(&mut rt, c).await;
        // A dynamic program: the loader is an execution, libc a mapping.
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        // A program run through an fd another process passed over a unix
        // socket (fexecve) is measured like any execution.
        assert_eq!(
            sh_ok(
                &mut rt,
                c,
                "cp /bin/busybox /tmp/passed-true && escape fd-pass-exec /tmp/passed-true; echo rc=$?"
            )
            .await,
            "rc=0"
        );
    }
    let lines = log_lines(&d, &pod);
    for c in [&a, &b] {
        let mine = entries_of(&lines, c);
        assert!(
            logged(&mine, "memfd:payload", Some(&page), "mmap"),
            "{mine:#?}"
        );
        // A memfd is always open for writing: what runs may change.
        assert!(
            logged(&mine, "memfd:payload", Some(&page), "writers"),
            "{mine:#?}"
        );
        // Unless it is sealed against writes: then it is what was measured.
        assert!(
            logged(&mine, "memfd:sealed", Some(&page), "mmap"),
            "{mine:#?}"
        );
        assert!(!logged(&mine, "memfd:sealed", None, "writers"), "{mine:#?}");
        // Sealed against future writes only, it was changed through a
        // mapping made before the seal after it was measured: a violation.
        assert!(logged(&mine, "memfd:future", None, "writers"), "{mine:#?}");
        assert!(logged(&mine, "/SYSV", Some(&page), "mmap"), "{mine:#?}");
        assert!(
            logged(&mine, "/tmp/code.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/passed.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        // Mapped by a thread other than the main one (a library loaded
        // from a worker thread).
        assert!(
            logged(&mine, "/tmp/worker.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/wprot.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(logged(&mine, "/tmp/passed-true", None, "exec"), "{mine:#?}");
        // The 32-bit program's attempt is a violation of its own.
        assert!(logged(&mine, "/tmp/ia32-rie", None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, "/tmp/ia32-rie", None, "exec"), "{mine:#?}");
        assert!(logged(&mine, LOADER, None, "exec"), "{mine:#?}");
        assert!(logged(&mine, LIBC, None, "mmap"), "{mine:#?}");
        assert!(logged(&mine, "/bin/hello", None, "exec"), "{mine:#?}");
        assert!(logged(&mine, "", None, "start"), "{mine:#?}");
    }
    stop_pod(&mut rt, &pod).await;

    // Enforce mode with the image's golden policy: the image's own programs,
    // loader and libc run; every other mapping is refused and logged.
    let (pod, a, b) = two_containers(&d, &mut rt, "escape-enforce", "strict", &image).await;
    for c in [&a, &b] {
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        // A worker thread loading a library the policy allows.
        let (code, out, err) = exec_sh(&mut rt, c, &format!("escape worker-mmap {LIBC}")).await;
        assert_eq!(code, 0, "{out}{err}\n{}", d.log());
        assert!(out.contains("MAPPED worker-mmap"), "{out}{err}");
        around_the_guard_fails(&mut rt, c).await;
        uring_maps_as_any(&mut rt, c, &a).await;
        secret_memory_never_runs(&mut rt, c).await;
        for m in MAPPINGS {
            let (code, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert_ne!(code, 0, "{m} ran under enforce: {out}{err}");
            assert!(!out.contains("RAN"), "{m}: {out}");
            assert!(out.contains("Operation not permitted"), "{m}: {out}");
        }
        // The loader mapping a changed program: refused, whatever its name.
        let (_, out, err) = exec_sh(
            &mut rt,
            c,
            &format!("cp /bin/hello /tmp/evil && printf X | dd of=/tmp/evil bs=1 seek=400 conv=notrunc 2>/dev/null; {LOADER} /tmp/evil; echo rc=$?"),
        )
        .await;
        assert!(
            !out.contains("hello dynamic"),
            "ld.so ran a changed program: {out}{err}"
        );
        // An execution refused leaves no way to map the file instead.
        let (_, out, _) = exec_sh(&mut rt, c, "escape after-deny /tmp/evil").await;
        assert!(out.contains("execve: Operation not permitted"), "{out}");
        assert!(out.contains("after-deny: Operation not permitted"), "{out}");
        // A passed fd is no way around the policy either.
        let (_, out, _) = exec_sh(
            &mut rt,
            c,
            "cp /bin/busybox /tmp/passed-true && escape fd-pass-exec /tmp/passed-true; echo rc=$?",
        )
        .await;
        assert!(
            out.contains("fd-pass-exec: Operation not permitted"),
            "{out}"
        );
        // Reading is not running: a binary outside the policy can be read.
        let sum = sh_ok(&mut rt, c, "sha256sum /tmp/evil | head -c 64").await;
        assert_eq!(sum.len(), 64);
    }
    let lines = log_lines(&d, &pod);
    // Memory-backed files can change under the mapping: refused as
    // `writers` before any policy check. The rest: not in the policy.
    for path in ["memfd:payload", "memfd:future", "/SYSV"] {
        assert!(logged(&lines, path, None, "writers"), "{path}: {lines:#?}");
    }
    for path in [
        "memfd:sealed",
        "/tmp/code.bin",
        "/tmp/worker.bin",
        "/tmp/wprot.bin",
        "/tmp/evil",
        "/tmp/passed.bin",
        "/tmp/passed-true",
        "/tmp/ia32-rie",
    ] {
        assert!(logged(&lines, path, None, "deny"), "{path}: {lines:#?}");
    }
    stop_pod(&mut rt, &pod).await;
}

/// seccomp's CONTINUE lets the kernel read a call's arguments again after
/// the map guard checked them: a second thread `dup2`s another file onto an
/// mmap's fd (also when the mmap is a worker thread's, or the process's
/// main thread is gone), or maps a file under an anonymous range being
/// made executable, in between (the window widened here by
/// IMACRI_TEST_MAPGUARD_SWAP_WINDOW). The threads sharing the caller's
/// table are held still from before the check until the call returned.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_swapped_in_during_the_check_is_not_mapped() {
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_MAPGUARD_SWAP_WINDOW", "600").await;
    let mut rt = d.runtime().await.unwrap();
    let swap = |m: &str| format!("escape swap-{m} /bin/busybox");
    let held = |v: serde_json::Value| v["fanotify"]["heldCalls"].as_u64().unwrap();
    // The threads that would swap are held still from before the check
    // until the call has returned: what was measured is what is mapped, in
    // either mode, and nothing needs killing.
    for (name, policy) in [("hold-measure", "measure"), ("hold-enforce", "strict")] {
        let (pod, a, b) = two_containers(&d, &mut rt, name, policy, &image).await;
        let before = held(imacri_integration::client::integrity_stats(&mut rt).await);
        for c in [&a, &b] {
            for m in ["mmap", "mprotect", "worker", "leader"] {
                let (code, out, err) = exec_sh(&mut rt, c, &swap(m)).await;
                assert!(!out.contains("RAN"), "{policy} {m}: {out}{err}");
                // The mapping holds what was measured; or (mprotect) the
                // file was mapped over the range only after the call, not
                // executable, and jumping into it faults (SIGSEGV).
                assert!(
                    out.contains(&format!("swap-{m}: not swapped in time")) || code == 139,
                    "{policy} {m}: {code} {out}{err}\n{}",
                    d.log()
                );
            }
            // An honest multi-threaded program maps what it asks for.
            let (_, out, err) = exec_sh(&mut rt, c, "escape threaded-mmap /bin/busybox").await;
            assert!(out.contains("MAPPED threaded-mmap"), "{policy}: {out}{err}");
            // The swapper went on afterwards: an honest program's threads
            // are only paused.
            assert_running(&mut rt, c, policy).await;
        }
        // An io_uring request (run by a kernel thread, which ptrace cannot
        // hold) puts another file under the fd during the check: what was
        // mapped is compared after the call, before any of it can run, and
        // the process is killed (a `tomtou` entry; under enforce its
        // container too). (No io_uring under RuntimeDefault.)
        let (code, out, err) = exec_sh(&mut rt, &a, "escape uring-swap 0").await;
        assert!(!out.contains("RAN"), "{policy} uring-swap: {out}{err}");
        assert_eq!(code, 137, "{policy} uring-swap: {out}{err}\n{}", d.log());
        // A process sharing only the address space (not the fd table),
        // spinning on the address mapped over, is held too and killed with
        // the caller. (In a container of its own: under enforce `a` is gone
        // now, and `b` runs under RuntimeDefault, which has no io_uring.)
        let v = start_container(
            &mut rt,
            &pod,
            &ima(name, policy),
            container_config("v", &image, &["sleep", "1000"]),
        )
        .await;
        let (code, out, err) = exec_sh(&mut rt, &v, "escape uring-vm-swap 0").await;
        assert!(!out.contains("RAN"), "{policy} uring-vm-swap: {out}{err}");
        assert_eq!(code, 137, "{policy} uring-vm-swap: {out}{err}\n{}", d.log());
        let stats = imacri_integration::client::integrity_stats(&mut rt).await;
        let now = held(stats.clone());
        assert!(now >= before + 8, "{policy}: {before} -> {now}");
        assert_eq!(stats["fanotify"]["unheldCalls"], 0, "{stats}");
        let lines = log_lines(&d, &pod);
        for c in [&a, &b] {
            let mine = entries_of(&lines, c);
            assert!(
                !mine.iter().any(|l| l.contains("/tmp/swapped-")),
                "{policy}: {mine:#?}"
            );
            assert!(!logged(&mine, "-", None, "gap"), "{policy}: {mine:#?}");
        }
        for c in [&a, &v] {
            let mine = entries_of(&lines, c);
            assert!(
                logged(&mine, "/tmp/uswap.bin", None, "tomtou"),
                "{policy}: {mine:#?}"
            );
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// Where the sharers cannot be held (a test hook stands for a task blocked
/// in the kernel or traced by someone else), the call is refused: nothing
/// else could tell what the kernel maps. Single-threaded callers are not
/// affected.
#[tokio::test(flavor = "multi_thread")]
async fn calls_whose_sharers_cannot_be_held_are_refused() {
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_MAPGUARD_NO_HOLD", "1").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, b) = two_containers(&d, &mut rt, "unheld", "measure", &image).await;
    for c in [&a, &b] {
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        for cmd in [
            "escape swap-mmap /bin/busybox",
            "escape threaded-mmap /bin/busybox",
        ] {
            let (code, out, err) = exec_sh(&mut rt, c, cmd).await;
            assert_ne!(code, 0, "{cmd}: {out}{err}");
            assert!(out.contains("Operation not permitted"), "{cmd}: {out}{err}");
            assert!(
                !out.contains("RAN") && !out.contains("MAPPED"),
                "{cmd}: {out}"
            );
        }
        assert_running(&mut rt, c, "the container").await;
    }
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert!(
        stats["fanotify"]["unheldCalls"].as_u64() >= Some(4),
        "{stats}"
    );
    let lines = log_lines(&d, &pod);
    assert!(
        !lines.iter().any(|l| l.contains("/tmp/swapped-")),
        "{lines:#?}"
    );
    stop_pod(&mut rt, &pod).await;
}

/// A container of `image` that sleeps, under the seccomp profile at `path`
/// (a pod's own, Localhost).
fn under_profile(name: &str, image: &str, path: &str) -> cri::ContainerConfig {
    let mut c = container_config(name, image, &["sleep", "1000"]);
    c.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxContainerSecurityContext {
        seccomp: Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: path.into(),
        }),
        ..Default::default()
    });
    c
}

/// A seccomp profile of the pod's own keeps its decisions, and decides a
/// guarded call only as far as it says. A rule handing `mmap` to a tracer
/// (SCMP_ACT_TRACE) let a tracer in the pod resume an executable mapping
/// past the guard, and rules denying `mmap`, `mprotect` and `personality`
/// under conditions of their own left the other cases to the profile's
/// default allow, unguarded: files mapped executable unmeasured and
/// READ_IMPLIES_EXEC set (until 2026-12-04). Now the first profile is
/// refused at CreateContainer, and under the second the rest of each call
/// goes through the guard.
#[tokio::test(flavor = "multi_thread")]
async fn a_pods_own_seccomp_profile_opens_no_way_around_the_guard() {
    let env = Env::get();
    let (d, image, work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let profile = |name: &str, json: &str| -> String {
        let p = work.path().join(name);
        std::fs::write(&p, json).unwrap();
        p.to_string_lossy().into()
    };
    // Executable mappings (prot & PROT_EXEC) go to the tracer.
    let tracing = profile(
        "trace.json",
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mmap"], "action": "SCMP_ACT_TRACE", "args": [{"index": 2, "value": 4, "valueTwo": 4, "op": "SCMP_CMP_MASKED_EQ"}]}]}"#,
    );
    // Huge-page mappings, PROT_SEM and one personality value decided;
    // everything else left to the default.
    let partial = profile(
        "partial.json",
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mmap"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 3, "value": 262144, "valueTwo": 262144, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["mprotect"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 2, "value": 8, "valueTwo": 8, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_EQ"}]}]}"#,
    );
    let partial_escapes = ["file-mmap", "memfd-mprotect", "personality"];

    // The control: in a plain pod the tracer lets the mapping run, and
    // the partial profile decides none of these.
    let plain = pod_config("own-profile-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let t = start_container(&mut rt, &pod, &plain, under_profile("t", &image, &tracing)).await;
    let (_, out, err) = exec_sh(&mut rt, &t, "escape trace-mmap").await;
    assert!(out.contains("RAN trace-mmap"), "control: {out}{err}");
    let p = start_container(&mut rt, &pod, &plain, under_profile("p", &image, &partial)).await;
    for m in partial_escapes {
        let (_, out, err) = exec_sh(&mut rt, &p, &format!("escape {m}")).await;
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    let cfg = ima("own-profile-ima", "measure");
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let e = create_container(&mut rt, &pod, &cfg, under_profile("t", &image, &tracing))
        .await
        .expect_err("a profile handing mmap to a tracer");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("seccomp") && e.message().contains("SCMP_ACT_TRACE"),
        "{e}"
    );
    let p = start_container(&mut rt, &pod, &cfg, under_profile("p", &image, &partial)).await;
    for m in ["file-mmap", "memfd-mprotect"] {
        let (_, out, err) = exec_sh(&mut rt, &p, &format!("escape {m}")).await;
        assert!(out.contains(&format!("RAN {m}")), "{m}: {out}{err}");
    }
    let (code, out, _) = exec_sh(&mut rt, &p, "escape personality").await;
    assert_ne!(code, 0, "READ_IMPLIES_EXEC was set: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let mine = entries_of(&log_lines(&d, &pod), &p);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    assert!(
        logged(&mine, "/tmp/code.bin", Some(&code_file), "mmap"),
        "{mine:#?}"
    );
    assert!(
        logged(&mine, "memfd:payload", Some(&page_digest()), "mmap"),
        "{mine:#?}"
    );
    stop_pod(&mut rt, &pod).await;
}
