//! Other processes' roots, /dev/shm, scripts, ptrace of the entrypoint, files
//! handed in from outside the pod.

use super::*;

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
