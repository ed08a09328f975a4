//! Watches and leases: bounded per container, cut per pod, given up first by what nothing maps.

use super::*;

/// Inode marks in the fanotify groups process `pid` holds: each group's
/// fdinfo lists one `fanotify ino:` line per mark (a watched file). A group
/// imacri holds twice (its own fd and its copy of the keeper's) is counted
/// once: the same fdinfo.
fn inode_marks(pid: i32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let groups: std::collections::HashSet<String> = fds
        .flatten()
        .filter(|f| {
            std::fs::read_link(f.path())
                .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[fanotify]")
        })
        .filter_map(|f| {
            let fd = f.file_name().to_string_lossy().into_owned();
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()
        })
        .collect();
    groups
        .iter()
        .map(|t| t.lines().filter(|l| l.starts_with("fanotify ino:")).count())
        .sum()
}

/// A watch on an executed script or a mapped file lasts while the file
/// can still be run or mapped (`fanotify/writes.rs`). Each used to pin its
/// inode in the kernel and count against the node's
/// `fs.fanotify.max_user_marks` until the container ended: a container
/// making, running and deleting scripts in a loop (no attacker needed)
/// grew its marks, and the deleted files' memory, without bound. A
/// container mapping ever new files and keeping them mapped is held to
/// `ima.max_watched_files` watches (its mappings past it refused, as a
/// file that cannot be watched is), which a file nothing holds any more
/// does not count against.
#[tokio::test(flavor = "multi_thread")]
async fn a_containers_watches_are_bounded() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "max_watched_files = 300").await;
    let mut rt = d.runtime().await.unwrap();
    let imacri = d.pid().unwrap() as i32;
    let cfg = ima("marks", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let before = inode_marks(imacri);
    // Scripts made, run and deleted: 1000 inodes, one path (one entry),
    // more than the container may watch at a time.
    let out = sh_ok(
        &mut rt,
        &c,
        "i=0; while [ $i -lt 1000 ]; do printf '#!/bin/sh\\n:\\n' > /tmp/s && chmod +x /tmp/s && /tmp/s && rm /tmp/s || echo failed-$i; i=$((i+1)); done; echo done",
    )
    .await;
    assert_eq!(out, "done", "{out}");
    let after_scripts = inode_marks(imacri);
    assert!(
        after_scripts <= before + 20,
        "{after_scripts} inode marks after 1000 scripts (from {before})"
    );
    // 400 scripts kept, each run once: more than the container may watch,
    // but nothing reads them once run, so the oldest watches end (found at
    // their paths: a script's watch has no lease to name its mark by).
    let out = sh_ok(
        &mut rt,
        &c,
        "mkdir /tmp/k; i=0; while [ $i -lt 400 ]; do printf '#!/bin/sh\\n:\\n' > /tmp/k/$i && chmod +x /tmp/k/$i && /tmp/k/$i || echo failed-$i; i=$((i+1)); done; echo done",
    )
    .await;
    assert_eq!(out, "done", "{out}");
    let marks = inode_marks(imacri);
    assert!(
        marks <= before + 300 + 20,
        "{marks} inode marks (from {before})"
    );
    // Files made and mapped, each kept mapped: past the limit, refused.
    let out = sh_ok(&mut rt, &c, "escape map-flood /tmp/m 400").await;
    let n = |out: &str, w: &str| -> usize {
        let f: Vec<&str> = out.split_whitespace().collect();
        let i = f.iter().position(|x| *x == w).unwrap();
        f[i + 1].parse().unwrap()
    };
    assert!(
        n(&out, "MAPPED") <= 300 && n(&out, "REFUSED") >= 100,
        "{out}"
    );
    let marks = inode_marks(imacri);
    assert!(
        marks <= before + 300 + 20,
        "{marks} inode marks (from {before})"
    );
    // Each file was written, mapped and deleted by the next round: none
    // of that is a write under a mapping (the close after writing read
    // once the file was deleted counted as one until 2026-12-06).
    let lines = log_lines(&d, &pod);
    assert!(!logged(&lines, "/tmp/m", None, "tomtou"), "{lines:#?}");
    // Those mappings are gone with their process: the next ones are
    // watched in their place.
    let out = sh_ok(&mut rt, &c, "escape map-flood /tmp/m 250").await;
    assert_eq!((n(&out, "MAPPED"), n(&out, "REFUSED")), (250, 0), "{out}");
    assert!(inode_marks(imacri) <= before + 300 + 20);
    // The container runs on, its known programs and scripts too.
    assert_eq!(
        sh_ok(
            &mut rt,
            &c,
            "printf '#!/bin/sh\\necho script\\n' > /tmp/t && chmod +x /tmp/t && /tmp/t"
        )
        .await,
        "script"
    );
    stop_pod(&mut rt, &pod).await;
}

/// imacri's fds held by imacri whose link ends with `suffix`.
fn fds_on(pid: i32, suffix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|f| {
                    std::fs::read_link(f.path())
                        .is_ok_and(|l| l.to_string_lossy().ends_with(suffix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// imacri holds a quarter of its open-file limit for all pods' leases and
/// held writers (8192 under systemd's `LimitNOFILE=infinity`, 5000 here;
/// the test hook makes it 300 so that two pods fill it). Until 2026-12-06
/// pods that filled it cut every other pod short: another pod's shared
/// writable mapping of a new file was refused (EPERM: SQLite in WAL mode
/// maps its `-shm` file so) and its executable mappings went unleased (a
/// truncate of them seen only after the fact). Now a pod's held writers
/// are bounded by its share of a full node, and the pod holding the most
/// gives a watch lease up for a pod holding fewer.
#[tokio::test(flavor = "multi_thread")]
async fn pods_filling_imacris_files_cut_only_their_own_watches() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_LEASE_LIMIT", "300").await;
    let mut rt = d.runtime().await.unwrap();
    let imacri = d.pid().unwrap() as i32;
    let given_up = |v: &serde_json::Value| v["integrity"]["fanotify"]["leasesGivenUp"].as_u64();
    // Held writers, which cannot be given back: 16 at most (a share of a
    // full node, and never fewer).
    let (held_pod, a) = sleeping_pod(&mut rt, &d, &ima("fill-held", "measure"), &image).await;
    let out = sh_ok(
        &mut rt,
        &a,
        "mkdir /tmp/f && escape shared-flood /tmp/f 100",
    )
    .await;
    assert_eq!(out, "MAPPED 16 REFUSED 84");
    // Ever new files mapped executable: watched, leased while imacri has
    // room (its 300 less the other pod's 16), by their marks after that.
    let (leases_pod, b) = sleeping_pod(&mut rt, &d, &ima("fill-leases", "measure"), &image).await;
    let out = sh_ok(&mut rt, &b, "escape map-flood /tmp/m.bin 400").await;
    assert_eq!(out, "MAPPED 400 REFUSED 0");
    let info = imacri_integration::client::status_info(&mut rt).await;
    assert_eq!(given_up(&info), Some(0), "{info}");
    // Another pod gets its held writer and its lease all the same, each
    // a lease the second pod gives up.
    let (pod, c) = sleeping_pod(&mut rt, &d, &ima("fill-victim", "measure"), &image).await;
    assert_eq!(
        sh_ok(&mut rt, &c, "escape shared-rw /tmp/db").await,
        "SHARED ok"
    );
    let out = sh_ok(&mut rt, &c, "escape file-mmap /tmp/victim.bin").await;
    assert!(out.starts_with("RAN file-mmap"), "{out}");
    assert!(
        fds_on(imacri, "/tmp/victim.bin") >= 1,
        "no lease on the third pod's mapped file:\n{}",
        d.log()
    );
    let info = imacri_integration::client::status_info(&mut rt).await;
    assert!(given_up(&info) >= Some(2), "{info}");
    // The first pod, short by more than one, takes leases back from the
    // second in turn, not from the third.
    let out = sh_ok(&mut rt, &a, "escape file-mmap /tmp/held.bin").await;
    assert!(out.starts_with("RAN file-mmap"), "{out}");
    assert!(fds_on(imacri, "/tmp/held.bin") >= 1);
    assert!(fds_on(imacri, "/tmp/victim.bin") >= 1);
    for p in [pod, leases_pod, held_pod] {
        stop_pod(&mut rt, &p).await;
    }
}

/// A pod's leases (`share::PER_POD`, 1024) are fewer than a container's
/// watches (`ima.max_watched_files`, 4096), and the watches of files the
/// container's exited processes mapped end only in a sweep: until
/// 2026-12-06 that came at the watch limit only, so a pod that had mapped
/// 1024 files over its life (a build running compiler after compiler)
/// mapped every new one unleased (a truncate of it seen only after the
/// fact). At its lease limit it now sweeps too.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_at_its_lease_limit_lets_go_of_what_nothing_maps() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, c) = sleeping_pod(&mut rt, &d, &ima("lease-sweep", "measure"), &image).await;
    // Two processes one after the other, 700 new files each.
    for _ in 0..2 {
        assert_eq!(
            sh_ok(&mut rt, &c, "escape map-flood /tmp/m.bin 700").await,
            "MAPPED 700 REFUSED 0"
        );
    }
    let info = imacri_integration::client::status_info(&mut rt).await;
    let f = &info["integrity"]["fanotify"];
    assert_eq!(f["unleasedFiles"].as_u64(), Some(0), "{f}");
    assert!(f["sweptWatches"].as_u64() >= Some(600), "{f}");
    stop_pod(&mut rt, &pod).await;
}

/// When imacri's share of open files is held evenly (no pod holds two
/// more than another, so no watch lease goes from one to the other), an
/// execution's window and a held writer, which cannot go without a file
/// of imacri's, take a watch lease from the pods holding the most, the
/// asking pod itself included: the pods still execute a new file and
/// map one shared.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_on_a_full_node_takes_a_watch_lease() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_LEASE_LIMIT", "300").await;
    let mut rt = d.runtime().await.unwrap();
    let mut pods = Vec::new();
    for name in ["even-a", "even-b"] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &ima(name, "measure"), &image).await;
        assert_eq!(
            sh_ok(&mut rt, &c, "escape map-flood /tmp/m.bin 200").await,
            "MAPPED 200 REFUSED 0"
        );
        pods.push((pod, c));
    }
    let info = imacri_integration::client::status_info(&mut rt).await;
    let f = &info["integrity"]["fanotify"];
    assert!(f["leasesGivenUp"].as_u64() >= Some(40), "{f}");
    for (_, c) in &pods {
        assert_eq!(
            sh_ok(
                &mut rt,
                c,
                "mkdir /tmp/x && cp /bin/busybox /tmp/x/busybox && /tmp/x/busybox true && echo ran"
            )
            .await,
            "ran"
        );
    }
    for (_, c) in &pods {
        assert_eq!(
            sh_ok(&mut rt, c, "escape shared-rw /tmp/db").await,
            "SHARED ok"
        );
    }
    for (p, _) in pods {
        stop_pod(&mut rt, &p).await;
    }
}

/// The leases a container keeps on files it executed (`window.rs`: 64 at
/// most, for the next execution of each to find in place) are a cache:
/// when imacri's share of open files is taken, an idle one goes first.
/// Until 2026-12-06 they could not be given up: containers that had each
/// run 64 programs (a node of 78 of them at this machine's share of 5000)
/// held the whole share, and every new execution on the node was refused.
#[tokio::test(flavor = "multi_thread")]
async fn kept_execution_leases_make_way() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_LEASE_LIMIT", "150").await;
    let mut rt = d.runtime().await.unwrap();
    // 60 programs, each a new file: with busybox and imacri's init, kept
    // each (below the 64 past which the idle ones go).
    let run_many = "i=0; while [ $i -lt 60 ]; do mkdir -p /tmp/e$i && cp /bin/busybox /tmp/e$i/busybox && /tmp/e$i/busybox true || echo refused-$i; i=$((i+1)); done; echo done";
    let mut pods = Vec::new();
    for name in ["kept-a", "kept-b", "kept-c"] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &ima(name, "measure"), &image).await;
        assert_eq!(sh_ok(&mut rt, &c, run_many).await, "done", "{name}");
        pods.push(pod);
    }
    for p in pods {
        stop_pod(&mut rt, &p).await;
    }
}

/// A pod holding its 1024 leases (here watches of files a process of it
/// mapped and left) still executes a new file and maps one shared: an
/// execution's window and a held writer, which cannot go without a lease,
/// take one of the pod's own (until 2026-12-06 both were refused, EPERM).
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_at_its_lease_limit_still_executes() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, c) = sleeping_pod(&mut rt, &d, &ima("lease-full", "measure"), &image).await;
    assert_eq!(
        sh_ok(&mut rt, &c, "escape map-flood /tmp/m.bin 1100").await,
        "MAPPED 1100 REFUSED 0"
    );
    assert_eq!(
        sh_ok(
            &mut rt,
            &c,
            "mkdir /tmp/x && cp /bin/busybox /tmp/x/busybox && /tmp/x/busybox true && echo ran"
        )
        .await,
        "ran"
    );
    assert_eq!(
        sh_ok(&mut rt, &c, "escape shared-rw /tmp/db").await,
        "SHARED ok"
    );
    stop_pod(&mut rt, &pod).await;
}
