//! Mapping calls held at once, files mapped shared and writable.

use super::*;

/// Each rootfs file a pod maps shared and writable is held open by imacri
/// (and its fd keeper) until the container is gone (`fanotify/held.rs`): a
/// pod mapping file after file is held to its share (1024 open files, with
/// its leases), past which its shared mappings of new files are refused
/// (EPERM); imacri's fds grow by no more, another pod's mappings still
/// work, and all of it goes with the pod.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_shared_mappings_holds_a_bounded_number_of_files() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let imacri = d.pid().unwrap() as i32;
    let keeper = *d.keeper_pids().first().unwrap();
    let (fds_before, _) = held_by(imacri);
    let (keeper_before, _) = held_by(keeper);
    let cfg = ima("shared-flood", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let out = sh_ok(
        &mut rt,
        &c,
        "mkdir /tmp/f && escape shared-flood /tmp/f 1100",
    )
    .await;
    let n = |w: &str| -> usize {
        let f: Vec<&str> = out.split_whitespace().collect();
        let i = f.iter().position(|x| *x == w).unwrap();
        f[i + 1].parse().unwrap()
    };
    assert_eq!(n("MAPPED") + n("REFUSED"), 1100, "{out}");
    assert!(n("MAPPED") <= 1024 && n("REFUSED") >= 76, "{out}");
    // Each held file is an fd of imacri's, one of its copy of what the
    // keeper holds (re-given to a restarted keeper) and one of the keeper's.
    let (fds, _) = held_by(imacri);
    assert!(
        fds <= fds_before + 2 * 1024 + 64,
        "imacri holds {fds} fds (from {fds_before})"
    );
    let (kfds, _) = held_by(keeper);
    assert!(
        kfds <= keeper_before + 1024 + 64,
        "the keeper holds {kfds} fds (from {keeper_before})"
    );
    // Another pod is not held to this one's share.
    let cfg2 = ima("shared-other", "measure");
    let (pod2, c2) = sleeping_pod(&mut rt, &d, &cfg2, &image).await;
    assert_eq!(
        sh_ok(&mut rt, &c2, "escape shared-rw /tmp/db").await,
        "SHARED ok"
    );
    stop_pod(&mut rt, &pod2).await;
    stop_pod(&mut rt, &pod).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (fds_after, _) = held_by(imacri);
    assert!(
        fds_after <= fds_before + 8,
        "imacri holds {fds_after} fds after the pods (from {fds_before})"
    );
    let (kfds_after, _) = held_by(keeper);
    assert!(
        kfds_after <= keeper_before + 8,
        "the keeper holds {kfds_after} fds after the pods (from {keeper_before})"
    );
}

/// A pod's threads, each looping a guarded call that is held (the calling
/// process is multi-threaded), keep as many calls waiting at once as it has
/// threads: imacri handles them with a bounded number of threads of its own
/// (one at a time per container, as their holding is), not a thread per
/// waiting call (until 2026-12-03: +3212 threads in 3 s), and goes on
/// answering them.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_held_calls_takes_a_bounded_number_of_threads() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let pid = d.pid().unwrap();
    let threads = || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<i64>().ok())
            .unwrap()
    };
    let cfg = ima("held-flood", "measure");
    let (pod, _) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let held = |v: serde_json::Value| v["fanotify"]["heldCalls"].as_u64().unwrap();
    let before = threads();
    let calls0 = held(imacri_integration::client::integrity_stats(&mut rt).await);
    let flood = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("flood", &image, &["escape", "held-flood", "300"]),
    )
    .await;
    let mut most = 0;
    for _ in 0..60 {
        most = most.max(threads() - before);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let calls = held(imacri_integration::client::integrity_stats(&mut rt).await) - calls0;
    eprintln!("imacri threads: {before} before, up to +{most} with 300 flooding threads; {calls} calls held");
    assert!(
        most < 30,
        "imacri took {most} threads more for one container's held calls"
    );
    // Each holds the 299 other threads still (~100 us each): slow, but on.
    assert!(calls > 20, "only {calls} held calls in 3 s");
    let st = imacri_integration::client::container_status(&mut rt, &flood).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    stop_pod(&mut rt, &pod).await;
}
