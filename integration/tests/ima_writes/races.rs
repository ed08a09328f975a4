//! Writers racing a mapping call or an execution.

use super::*;

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
