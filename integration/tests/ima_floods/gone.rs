//! A gone pod leaves nothing open in imacri or the keeper.

use super::*;

/// One ima pod whose two containers map a file, run a script and a dynamic
/// program (groups, marks, leases, listeners and their keeper copies), left
/// running.
async fn busy_pod(
    d: &imacri_integration::Imacri,
    rt: &mut imacri_integration::client::Rt,
    image: &str,
    name: &str,
) -> String {
    let (pod, a, b) = two_containers(d, rt, name, "measure", image).await;
    for c in [&a, &b] {
        let out = sh_ok(
            rt,
            c,
            "escape file-mmap /tmp/m.bin && escape threaded-mmap /tmp/m.bin && escape shared-rw /tmp/db && printf '#!/bin/sh\\necho script\\n' > /tmp/s.sh && chmod +x /tmp/s.sh && /tmp/s.sh && hello",
        )
        .await;
        assert!(out.ends_with("SHARED ok\nscript\nhello dynamic"), "{out}");
    }
    // As kubelet does every few seconds: a CPU sample kept per container
    // and pod.
    rt.list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .unwrap();
    rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
        .await
        .unwrap();
    pod
}

/// imacri's (and its keeper's) fds and threads once it has settled.
async fn settled(d: &imacri_integration::Imacri) -> ((usize, usize), Option<(usize, usize)>) {
    // Hashing threads linger 200 ms after their last job.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let keeper = d.keeper_pids().first().copied();
    (held_by(d.pid().unwrap() as i32), keeper.map(held_by))
}

/// What imacri keeps in memory per pod and container, by its status: the
/// journal's bookkeeping and summaries, the digests of the containers'
/// files, and the CRI records beside the stores.
async fn kept_records(rt: &mut imacri_integration::client::Rt) -> Vec<(String, u64)> {
    let v = imacri_integration::client::status_info(rt).await;
    let i = &v["integrity"];
    let mut out = vec![
        ("journalPods".to_string(), &i["journalPods"]),
        ("journalSummaries".to_string(), &i["journalSummaries"]),
        ("cachedDigests".to_string(), &i["fanotify"]["cachedDigests"]),
    ];
    let records = v["records"].as_object().expect("records in the status");
    out.extend(records.iter().map(|(k, v)| (k.clone(), v)));
    out.into_iter()
        .map(|(k, v)| {
            let n = v.as_u64().unwrap_or_else(|| panic!("{k}: {v} in {i}"));
            (k, n)
        })
        .collect()
}

/// Each record count `after` is at most what it was `before`.
fn no_more_records(before: &[(String, u64)], after: &[(String, u64)], what: &str) {
    for ((k, b), (_, a)) in before.iter().zip(after) {
        assert!(a <= b, "{k}: {b} before, {a} {what} ({after:?})");
    }
}

/// Whatever imacri holds for an ima pod goes with it: after pods that
/// mapped files (each watched with a lease, kept by the fd keeper too),
/// mapped a rootfs file shared and writable (held open for writing), ran
/// scripts and dynamic programs, imacri and its keeper hold no more fds or
/// threads than before them (imacri's copy of a gone container's leases
/// stayed open until 2026-12-04), nor records in memory: the journal's
/// bookkeeping, the digests of the pods' files, CPU samples (each pod's
/// stayed for as long as imacri ran until 2026-12-05). The same for a pod
/// an imacri took back after a crash (its groups, leases and listeners from
/// the keeper), and a restarted imacri keeps nothing of the removed pods
/// its journal names.
#[tokio::test(flavor = "multi_thread")]
async fn a_gone_pod_leaves_nothing_open() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let pod = busy_pod(&d, &mut rt, &image, "leak-0").await;
    stop_pod(&mut rt, &pod).await;
    let (before, keeper_before) = settled(&d).await;
    let records = kept_records(&mut rt).await;
    for i in 1..=4 {
        let pod = busy_pod(&d, &mut rt, &image, &format!("leak-{i}")).await;
        let alive = kept_records(&mut rt).await;
        // The counts see them while they live.
        for k in [
            "journalPods",
            "journalSummaries",
            "cachedDigests",
            "cpuSamples",
        ] {
            let n = |r: &[(String, u64)]| r.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
            assert!(
                n(&alive) > n(&records),
                "{k} with a pod: {alive:?}, without: {records:?}"
            );
        }
        stop_pod(&mut rt, &pod).await;
    }
    let (after, keeper_after) = settled(&d).await;
    assert!(
        after.0 <= before.0 + 2 && after.1 <= before.1 + 2,
        "imacri (fds, threads): {before:?} before, {after:?} after 4 pods"
    );
    no_more_records(
        &records,
        &kept_records(&mut rt).await,
        "after 4 pods came and went",
    );
    if let (Some(b), Some(a)) = (keeper_before, keeper_after) {
        assert!(a.0 <= b.0, "the fd keeper's fds: {b:?} before, {a:?} after");
    }
    // Taken back after a crash, then gone.
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let pod = busy_pod(&d, &mut rt, &image, "leak-warm").await;
    stop_pod(&mut rt, &pod).await;
    let (before, keeper_before) = settled(&d).await;
    let records = kept_records(&mut rt).await;
    let pod = busy_pod(&d, &mut rt, &image, "leak-crash").await;
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let taken_back = settled(&d).await.0;
    stop_pod(&mut rt, &pod).await;
    let (after, keeper_after) = settled(&d).await;
    // The restarted imacri read the journal back (every pod this node ran,
    // leak-0 to leak-warm among them): it keeps bookkeeping for none of
    // the removed ones.
    no_more_records(
        &records,
        &kept_records(&mut rt).await,
        "after a pod taken back after a crash went",
    );
    assert!(
        after.0 <= before.0 + 2 && after.1 <= before.1 + 2,
        "imacri (fds, threads): {before:?} before, {taken_back:?} with the pod taken back, {after:?} after it"
    );
    if let (Some(b), Some(a)) = (keeper_before, keeper_after) {
        assert!(a.0 <= b.0, "the fd keeper's fds: {b:?} before, {a:?} after");
    }
}
