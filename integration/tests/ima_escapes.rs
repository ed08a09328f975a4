//! What an attacker inside an ima pod would try to run code its owner
//! cannot see: executable mappings of memory-backed files (memfd, SysV shm),
//! of non-ELF files and through the loader (`ld.so FILE`), files mapped or
//! executed (fexecve) through an fd another process passed over a unix
//! socket (in the pod, or from a helper outside it), ptrace of the
//! entrypoint by an exec, `personality` tricks, 32-bit calls and
//! programs, a seccomp
//! listener of the process's own, other processes' roots (pause's
//! included), /dev/shm, scripts, and a file swapped in during the map
//! guard's check. Each works in a plain pod (the control); in an ima pod
//! each is measured (measure mode: its digest is in the log) or refused
//! (enforce mode with the image's golden policy: EPERM and a `deny` entry),
//! with kubelet's default (no seccomp profile) and with RuntimeDefault.
//! The rest of the attacker's tests: `ima_writes.rs` (files written while
//! or after they ran), `ima_crashes.rs` (imacri down mid-access),
//! `ima_floods.rs` (floods, quotas, a pod's CPU).

use imacri_integration::client::{create_container, exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, pod_config, Env};

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

#[tokio::test(flavor = "multi_thread")]
async fn other_roots_shm_scripts_and_rewritten_files() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    // Containers share the pod's pid namespace: each sees pause as pid 1
    // and the other's processes.
    let shared = |n: &str, arg: &str| {
        let mut c = container_config(n, &image, &["sleep", arg]);
        c.linux
            .get_or_insert_with(Default::default)
            .security_context = Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    };
    let find_b = "for p in /proc/[0-9]*; do grep -q 2002 $p/cmdline 2>/dev/null && echo ${p#/proc/} && break; done";

    for (policy, enforce) in [("measure", false), ("strict", true)] {
        let mut cfg = ima(&format!("roots-{policy}"), policy);
        cfg.linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        });
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let a = start_container(&mut rt, &pod, &cfg, shared("a", "1001")).await;
        let b = start_container(&mut rt, &pod, &cfg, shared("b", "2002")).await;

        // Pause's rootfs through /proc/1/root: nothing runs from it.
        let (_, out, err) = exec_sh(&mut rt, &a, "/proc/1/root/pause; echo rc=$?").await;
        assert!(out.contains("rc=126"), "{out}{err}");
        assert!(err.contains("Permission denied"), "{err}");

        // Another container's root: that container's mark would measure
        // it, but execution is allowed only beneath the caller's own root
        // (imacri's init, Landlock): refused in either mode.
        sh_ok(&mut rt, &b, "mkdir -p /tmp/other && cp /bin/busybox /tmp/other/echo && printf X | dd of=/tmp/other/echo bs=1 seek=300 conv=notrunc 2>/dev/null; echo ok").await;
        let pid_b = sh_ok(&mut rt, &a, find_b).await;
        assert!(!pid_b.is_empty());
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            &format!("/proc/{pid_b}/root/tmp/other/echo via-root; echo rc=$?"),
        )
        .await;
        assert!(
            !out.contains("via-root") && out.contains("rc=126"),
            "{out}{err}"
        );
        assert!(err.contains("Permission denied"), "{err}");
        // Its own container runs it, measured there.
        let (_, out, err) = exec_sh(&mut rt, &b, "/tmp/other/echo in-b; echo rc=$?").await;
        assert_eq!(out.contains("in-b"), !enforce, "{out}{err}");

        // /dev/shm (POSIX shm) is noexec: neither executed nor mapped.
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            "cp /bin/busybox /dev/shm/x && /dev/shm/x echo shm-ran; echo rc=$?; escape file-mmap /dev/shm/code.bin",
        )
        .await;
        assert!(
            !out.contains("shm-ran") && !out.contains("RAN"),
            "{out}{err}"
        );
        assert!(err.contains("Permission denied"), "{err}");

        // A script run by its shebang is an execution of the script.
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            "printf '#!/bin/sh\\necho script-ran\\n' > /tmp/s.sh && chmod +x /tmp/s.sh && /tmp/s.sh; echo rc=$?",
        )
        .await;
        assert_eq!(out.contains("script-ran"), !enforce, "{out}{err}");

        // Mapped while open for writing: a `writers` violation, refused
        // under enforce.
        let (_, out, _) = exec_sh(&mut rt, &a, "escape writers-mmap /tmp/w.bin").await;
        assert_eq!(out.contains("RAN"), !enforce, "{out}");

        let lines = log_lines(&d, &pod);
        let other = if enforce { "deny" } else { "exec" };
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/tmp/other/echo") && l.contains(&b) && l.ends_with(other)),
            "{lines:#?}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("/tmp/other/echo") && l.contains(&a)),
            "{lines:#?}"
        );
        // Each container's processes ran through imacri's init, measured
        // like any other program, with the digest its start entry declares
        // (what lets a verifier of another build trust it).
        for c in [&a, &b] {
            let init = lines
                .iter()
                .find(|l| {
                    l.contains(c)
                        && l.contains(&format!(" {} ", imacri_runtime::integrity::init::PATH))
                        && l.ends_with(" exec")
                })
                .unwrap_or_else(|| panic!("{lines:#?}"));
            let digest = init.split(' ').nth(3).unwrap();
            assert!(
                lines.iter().any(|l| l.contains(c)
                    && l.ends_with(" start")
                    && l.contains(&format!("init={digest}"))),
                "{lines:#?}"
            );
        }
        assert!(logged(&lines, "/tmp/s.sh", None, other), "{lines:#?}");
        assert!(logged(&lines, "/tmp/w.bin", None, "writers"), "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("/pause ")), "{lines:#?}");

        if !enforce {
            // A binary rewritten in place after it ran is measured again.
            let (_, out, err) = exec_sh(
                &mut rt,
                &a,
                "mkdir /tmp/rw && cp /bin/busybox /tmp/rw/true && /tmp/rw/true && printf Y | dd of=/tmp/rw/true bs=1 seek=200 conv=notrunc 2>/dev/null && /tmp/rw/true; echo rc=$?",
            )
            .await;
            assert!(out.contains("rc=0"), "{out}{err}");
            let lines = log_lines(&d, &pod);
            let rw: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains(" /tmp/rw/true ") && l.ends_with(" exec"))
                .collect();
            let digests: std::collections::HashSet<&str> =
                rw.iter().filter_map(|l| l.split(' ').nth(3)).collect();
            assert_eq!(digests.len(), 2, "{rw:#?}");
            // A name that is not UTF-8 is logged byte for byte (escaped),
            // never collapsed into a replacement character.
            let (_, out, err) = exec_sh(
                &mut rt,
                &a,
                "d=\"/tmp/n$(printf '\\377')\"; mkdir \"$d\" && cp /bin/busybox \"$d/true\" && \"$d/true\"; echo rc=$?",
            )
            .await;
            assert!(out.contains("rc=0"), "{out}{err}");
            let lines = log_lines(&d, &pod);
            // The path text is /tmp/n\xff/true; the log line escapes its
            // backslash once more.
            assert!(
                lines.iter().any(|l| l.contains(" /tmp/n\\x5cxff/true ")),
                "{lines:#?}"
            );
            assert!(!lines.iter().any(|l| l.contains('\u{fffd}')), "{lines:#?}");
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// Code injection by ptrace (which IMA cannot see) between an exec and the
/// container's own processes: each runs under a Landlock domain of its own
/// (imacri's init restricted each), and Landlock lets a process trace only
/// processes of its own domain or nested ones, so an exec cannot attach to
/// the entrypoint. The control: the same attach works in a plain pod.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cannot_ptrace_the_containers_processes() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    // The entrypoint's child is the target: a pid namespace's init cannot
    // be attached to at all.
    let sleeper = |n: &str| container_config(n, &image, &["sh", "-c", "sleep 1001 & wait"]);
    // StartContainer returns once the shell runs; its sleep may not be
    // forked yet (an ima pod measures it first), so wait for it.
    let target = "for i in $(seq 100); do pidof sleep && exit 0; sleep 0.05; done; exit 1";
    for (cfg, ima_pod) in [
        (pod_config("ptrace-plain"), false),
        (ima("ptrace-ima", "measure"), true),
    ] {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let c = start_container(&mut rt, &pod, &cfg, sleeper("c")).await;
        let pid = sh_ok(&mut rt, &c, target).await;
        assert!(!pid.is_empty());
        let (_, out, err) = exec_sh(&mut rt, &c, &format!("escape ptrace {pid}")).await;
        if ima_pod {
            assert!(!out.contains("RAN"), "{out}{err}");
            assert!(
                out.contains("ptrace: Operation not permitted"),
                "{out}{err}"
            );
            // Within one domain (the exec's own child) ptrace works: it is
            // the domains that differ, not ptrace that is gone.
            // (SIGKILL: attached before its execve, the child takes the
            // attach's SIGSTOP after the detach and would stay stopped,
            // deaf to SIGTERM, holding the exec's output open.)
            let (_, out, err) =
                exec_sh(&mut rt, &c, "sleep 1002 & escape ptrace $!; kill -9 $!").await;
            assert!(out.contains("RAN ptrace"), "own child: {out}{err}");
        } else {
            assert!(out.contains("RAN ptrace"), "control: {out}{err}");
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// How a file handed in over a unix socket can be executed.
const RECEIVED: [&str; 5] = [
    "recv-fexecve",
    "recv-proc",
    "recv-dirfd",
    "recv-cwd",
    "recv-chroot",
];

/// A helper outside the pod (here a plain pod sharing a hostPath with it)
/// hands a changed busybox, and its directory, over a unix socket. Their
/// filesystem is none the pod's marks watch, so no fanotify event would
/// measure their execution: in an ima pod every way to execute them is
/// refused, measure mode included. The control runs each in a plain pod.
#[tokio::test(flavor = "multi_thread")]
async fn files_handed_in_from_outside_the_pod_do_not_run() {
    let env = Env::get();
    let (d, image, work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let shared = work.path().join("fds");
    std::fs::create_dir_all(&shared).unwrap();
    let with_shared = |mut c: cri::ContainerConfig| {
        c.mounts.push(cri::Mount {
            container_path: "/x".into(),
            host_path: shared.to_string_lossy().into(),
            ..Default::default()
        });
        c
    };
    let sleeper = |n: &str| with_shared(container_config(n, &image, &["sleep", "1000"]));
    let profile = work.path().join("no-landlock.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "prctl"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();

    let helper = pod_config("fd-helper");
    let hp = run_pod(&mut rt, &helper).await.unwrap();
    let serve = "cp /bin/busybox /tmp/evil && printf X | dd of=/tmp/evil bs=1 seek=300 conv=notrunc 2>/dev/null && exec escape serve-fds /x/s /tmp/evil";
    start_container(
        &mut rt,
        &hp,
        &helper,
        with_shared(container_config("srv", &image, &["sh", "-c", serve])),
    )
    .await;
    for _ in 0..100 {
        if shared.join("s").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        shared.join("s").exists(),
        "the helper's socket never appeared"
    );

    let plain = pod_config("fd-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    for m in RECEIVED {
        let (_, out, err) = exec_sh(&mut rt, &c, &format!("escape {m} /x/s")).await;
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    for policy in ["measure", "strict"] {
        let cfg = ima(&format!("fd-{policy}"), policy);
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
        let b = start_container(&mut rt, &pod, &cfg, runtime_default(sleeper("b"))).await;
        // A profile of the pod's own that refuses Landlock and prctl: the
        // init's calls are allowed anyway, and no_new_privs comes from runc.
        let mut refusing = sleeper("c");
        refusing
            .linux
            .get_or_insert_with(Default::default)
            .security_context = Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: profile.to_string_lossy().into(),
            }),
            ..Default::default()
        });
        let c = start_container(&mut rt, &pod, &cfg, refusing).await;
        assert_eq!(sh_ok(&mut rt, &c, "echo up").await, "up");
        for c in [&a, &b, &c] {
            for m in RECEIVED {
                let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m} /x/s")).await;
                assert!(!out.contains("RAN"), "{policy} {m}: {out}{err}");
                assert!(
                    out.contains(&format!("{m}: Permission denied")),
                    "{policy} {m}: {out}{err}"
                );
            }
        }
        stop_pod(&mut rt, &pod).await;
    }
    stop_pod(&mut rt, &hp).await;
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

/// Threads of process `pid` named `comm`.
fn threads_named(pid: u32, comm: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| {
        d.flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })
            .count()
    })
}

/// Waits until daemon `pid` has no reader, listener or held call's thread.
async fn until_parked(d: &imacri_integration::Imacri, pid: u32, what: &str) {
    let busy = || {
        ["imacri-fanotify", "imacri-seccomp", "imacri-maphold"]
            .map(|n| threads_named(pid, n))
            .iter()
            .sum::<usize>()
    };
    imacri_integration::poll::eventually(what, std::time::Duration::from_secs(15), || async {
        (busy() == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {} left\n{}", busy(), d.log()));
}

/// An attacker who waits until the pod is idle: imacri's reader and
/// listener of an idle container end (`integrity/park.rs`: a thread costs
/// ~75 KiB) and start again when an event or a call comes. What the pod
/// does first after that is measured (measure) or refused (enforce) as
/// ever: a changed copy of busybox executed, a file of code mapped
/// executable by the container's own process (whose listener was parked,
/// not an exec's new one).
#[tokio::test(flavor = "multi_thread")]
async fn what_an_idle_pod_does_next_is_measured_or_refused() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let pid = d.pid().unwrap();
    // Waits (builtin `read` on a fifo: no execution, no call) until told.
    let waiter = |n: &str| {
        container_config(
            n,
            &image,
            &[
                "sh",
                "-c",
                "cp /bin/busybox /tmp/true && echo x >> /tmp/true && mkfifo /tmp/go && read x < /tmp/go; \
                 /tmp/true; echo exec=$? > /tmp/out; escape file-mmap >> /tmp/out 2>&1; exec sleep 1000",
            ],
        )
    };
    let mut pods = Vec::new();
    for policy in ["measure", "strict"] {
        let cfg = ima(&format!("idle-{policy}"), policy);
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let c = start_container(&mut rt, &pod, &cfg, waiter("c")).await;
        pods.push((policy, pod, c));
    }
    until_parked(
        &d,
        pid,
        "no reader or listener thread while the pods are idle",
    )
    .await;
    // Their work is parked: each container's reader and listener.
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    let parked = stats["fanotify"]["parkedThreads"].as_u64().unwrap_or(0);
    assert!(parked >= 4, "{stats}");
    let moves = stats["fanotify"]["threadMoves"].as_u64();
    for (_, _, c) in &pods {
        sh_ok(&mut rt, c, "echo go > /tmp/go").await;
    }
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    for (policy, pod, c) in &pods {
        let out = imacri_integration::poll::eventually(
            "the waiter's output",
            std::time::Duration::from_secs(20),
            || {
                let (mut rt, c) = (rt.clone(), c.clone());
                async move {
                    let (_, out, _) = exec_sh(&mut rt, &c, "cat /tmp/out").await;
                    (out.lines().count() >= 2).then_some(out)
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{policy}: {e}\n{}", d.log()));
        let mine = entries_of(&log_lines(&d, pod), c);
        if *policy == "measure" {
            assert!(out.contains("exec=0"), "{out}");
            assert!(out.contains("RAN file-mmap"), "{out}");
            assert!(logged(&mine, "/tmp/true", None, "exec"), "{mine:#?}");
            assert!(
                logged(&mine, "/tmp/code.bin", Some(&code_file), "mmap"),
                "{mine:#?}"
            );
        } else {
            assert!(!out.contains("exec=0"), "{out}");
            assert!(out.contains("file-mmap: Operation not permitted"), "{out}");
            assert!(logged(&mine, "/tmp/true", None, "deny"), "{mine:#?}");
            assert!(!logged(&mine, "/tmp/true", None, "exec"), "{mine:#?}");
            assert!(logged(&mine, "/tmp/code.bin", None, "deny"), "{mine:#?}");
        }
        assert_running(&mut rt, c, policy).await;
    }
    // None of imacri's threads moved into the pods' cgroups to do it (a
    // move after a quiet spell waits ~10 ms for an RCU grace period, which
    // the pod's execution would wait for): their uncharged budgets covered
    // it (charge.rs).
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    let after = stats["fanotify"]["threadMoves"].as_u64();
    assert!(moves.is_some() && after == moves, "{moves:?} -> {stats}");
    // Parked again, then removed: a parked reader is started to end.
    until_parked(&d, pid, "parked again").await;
    for (_, pod, _) in &pods {
        stop_pod(&mut rt, pod).await;
    }
}

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
