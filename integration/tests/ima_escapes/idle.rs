//! What a pod idle since its start does next (its calls parked meanwhile).

use super::*;

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
