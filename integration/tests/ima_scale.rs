//! A full node of ima pods: kubelet's default `maxPods` (110), started many
//! at a time as kubelet starts them after a node reboots, half of them
//! enforcing. Every pod's own program is measured (or refused) in its own
//! log, nothing runs out (fanotify groups, ID ranges, imacri's fds and
//! threads), and once they are gone imacri holds what it held before.

use imacri_integration::client::{container_status, exec_sh_within, run_pod, start_container};
use imacri_integration::escapes::{held_by, ima, log_lines, logged, node, stop_pod};
use imacri_integration::{container_config, cri, Env};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// kubelet's default `maxPods`.
const PODS: usize = 110;
/// Pods being started (or removed) at once.
const AT_ONCE: usize = 16;

/// How many fds of each kind a process holds: anonymous inodes by kind,
/// pipes and sockets, files by name (container IDs in it cut).
fn fd_kinds(pid: i32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for f in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let l = std::fs::read_link(f.path()).map_or("?".into(), |l| l.display().to_string());
        let k = if l.starts_with('/') {
            let name = l.rsplit('/').next().unwrap_or("");
            name.split(['_', '-'])
                .map(|p| if p.len() >= 32 { "<id>" } else { p })
                .collect::<Vec<_>>()
                .join("_")
        } else {
            l.split(':').next().unwrap_or("").to_string()
                + l.split(['[', ']'])
                    .nth(1)
                    .map(|t| format!("[{t}]"))
                    .unwrap_or_default()
                    .as_str()
        };
        *kinds.entry(k).or_default() += 1;
    }
    format!("{kinds:?}")
}

/// The names of a process's threads.
fn thread_names(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pod `i`'s own program at `file` (its digest as `sha256sum` printed
/// it in `out`, with the program's exit code after `rc=`) ran measured
/// (an `exec` entry) or was refused (126, a `deny` entry) by its policy,
/// in its own log, which holds no other pod's program at that path.
fn assert_judged(d: &imacri_integration::Imacri, i: usize, r: &Ran, out: &str, file: &str) {
    let digest = out
        .lines()
        .find(|l| l.ends_with(file))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("pod {i}: no digest in {out:?}"));
    let lines = log_lines(d, &r.pod);
    let (rc, entry) = if r.strict {
        ("rc=126", "deny")
    } else {
        ("rc=0", "exec")
    };
    assert!(out.contains(rc), "pod {i} (strict: {}): {out}", r.strict);
    assert!(
        logged(&lines, file, Some(digest), entry),
        "pod {i}: no {entry} entry for {digest}: {lines:#?}"
    );
    let others = lines
        .iter()
        .filter(|l| l.contains(file) && !l.contains(digest))
        .count();
    assert_eq!(others, 0, "pod {i}: {lines:#?}");
}

/// What one pod did: (pod, container, policy, ExecSync's exit code and
/// output).
struct Ran {
    pod: String,
    c: String,
    strict: bool,
    code: i32,
    out: String,
}

/// Pod `i`: one sleeping container, then a program of its own (busybox
/// with the pod's number appended: a digest in no policy), its digest as
/// `sha256sum` (an image program) reports it, and a dynamic program.
async fn one_pod(mut rt: imacri_integration::client::Rt, image: String, i: usize) -> Ran {
    let strict = i % 2 == 1;
    let cfg = ima(
        &format!("full-{i}"),
        if strict { "strict" } else { "measure" },
    );
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("pod {i}: {e}"));
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("c", &image, &["sleep", "100000"]),
    )
    .await;
    let (code, out, err) = exec_sh_within(
        &mut rt,
        &c,
        &format!(
            "cp /bin/busybox /tmp/busybox && echo {i} >> /tmp/busybox && sha256sum /tmp/busybox && /tmp/busybox true; echo rc=$?; hello"
        ),
        120,
    )
    .await;
    Ran {
        pod,
        c,
        strict,
        code,
        out: format!("{out}{err}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_node_of_ima_pods() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let imacri = d.pid().unwrap() as i32;
    // One pod first, so that what imacri sets up once is not counted.
    let warm = one_pod(rt.clone(), image.clone(), 0).await;
    stop_pod(&mut rt, &warm.pod).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = held_by(imacri);

    let t = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = Vec::new();
    for i in 0..PODS {
        let (rt, image, gate) = (rt.clone(), image.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            one_pod(rt, image, i).await
        }));
    }
    let mut ran = Vec::new();
    for t in tasks {
        ran.push(t.await.unwrap_or_else(|e| panic!("{e}\n{}", d.log())));
    }
    let started = t.elapsed();
    let busy = held_by(imacri);

    for (i, r) in ran.iter().enumerate() {
        assert!(r.out.contains("hello dynamic"), "pod {i}: {}", r.out);
        assert_eq!(r.code, 0, "pod {i}: {}", r.out);
        assert_judged(&d, i, r, &r.out, "/tmp/busybox");
        let st = container_status(&mut rt, &r.c).await;
        assert_eq!(
            st.state,
            cri::ContainerState::ContainerRunning as i32,
            "pod {i}: {st:?}"
        );
    }
    // Idle pods' readers and listeners end (`park.rs`); what stays per pod
    // is its groups, listener and pins.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = held_by(imacri);
    let kinds = fd_kinds(imacri);
    let per_pod = |n: usize, b: usize| (n.saturating_sub(b)) as f64 / PODS as f64;
    eprintln!(
        "{PODS} ima pods started in {started:?}; imacri (fds, threads): {before:?} before, {busy:?} busy, {idle:?} idle: {:.1} fds and {:.2} threads per idle pod",
        per_pod(idle.0, before.0),
        per_pod(idle.1, before.1)
    );
    // Each: its container's log, output pipes and init, its group(s),
    // listener and pidfd, and two fds per leased file (imacri's, and its
    // copy of the fd keeper's): busybox, `hello`, its loader and libc.
    assert!(
        per_pod(idle.0, before.0) <= 32.0,
        "fds per idle pod: {before:?} before, {idle:?} with {PODS} pods: {kinds}"
    );
    assert!(
        per_pod(idle.1, before.1) <= 0.5,
        "threads per idle pod: {before:?} before, {idle:?} with {PODS} pods"
    );

    // imacri killed under a full node: the next one takes every pod back
    // (groups, leases and listeners from the fd keeper), and each pod's
    // next program of its own is judged as before.
    d.kill();
    let t = Instant::now();
    d.spawn().await.unwrap();
    let back = t.elapsed();
    let rt = d.runtime().await.unwrap();
    let imacri = d.pid().unwrap() as i32;
    let mut tasks = Vec::new();
    for (i, r) in ran.iter().enumerate() {
        let (mut rt, gate, c) = (rt.clone(), gate.clone(), r.c.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let cmd = format!("mkdir /tmp/again && cp /bin/busybox /tmp/again/busybox && echo again-{i} >> /tmp/again/busybox && sha256sum /tmp/again/busybox && /tmp/again/busybox true; echo rc=$?");
            exec_sh_within(&mut rt, &c, &cmd, 120).await
        }));
    }
    for (i, (t, r)) in tasks.into_iter().zip(&ran).enumerate() {
        let (code, out, err) = t.await.unwrap();
        assert_eq!(code, 0, "pod {i} after the restart: {out}{err}");
        assert_judged(&d, i, r, &format!("{out}{err}"), "/tmp/again/busybox");
    }
    let again = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let taken_back = held_by(imacri);
    eprintln!(
        "restarted imacri answered in {back:?}, every pod judged again {again:?} after the kill; (fds, threads) once idle: {taken_back:?}"
    );
    assert!(
        per_pod(taken_back.0, before.0) <= 32.0,
        "fds per idle pod after the restart: {before:?} before the pods, {taken_back:?} with them: {}",
        fd_kinds(imacri)
    );

    let t = Instant::now();
    let mut tasks = Vec::new();
    for r in &ran {
        let (mut rt, gate, pod) = (rt.clone(), gate.clone(), r.pod.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            stop_pod(&mut rt, &pod).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let removed = t.elapsed();
    // tokio's blocking threads (CRI calls' file and mount work) end after
    // 10 s idle.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = held_by(imacri);
    while (after.0 > before.0 + 2 || after.1 > before.1 + 2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = held_by(imacri);
    }
    eprintln!("removed in {removed:?}; imacri (fds, threads) after: {after:?}");
    assert!(
        after.0 <= before.0 + 2 && after.1 <= before.1 + 2,
        "imacri (fds, threads): {before:?} before, {after:?} after {PODS} pods: {} {:?}",
        fd_kinds(imacri),
        thread_names(imacri)
    );
    let left = env.all_objects(&d.namespace).await.unwrap();
    assert!(left.is_empty(), "left in containerd: {left:?}");
}
