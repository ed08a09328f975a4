//! Restart recovery: kill -9 imacri while pods run and start it again;
//! everything is back with the same IDs and states, exits that happened
//! meanwhile are recorded, logs continue. Also log rotation and the
//! daemon's socket handling.

use imacri_integration::cuts::pod_log;
use imacri_integration::runner::{entry_logged as logged, has_gap, run_ima_pod as ima_pod};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::time::Duration;

async fn lines(path: &std::path::Path) -> usize {
    tokio::fs::read_to_string(path)
        .await
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

async fn grows(path: &std::path::Path) -> bool {
    let start = lines(path).await;
    imacri_integration::poll::eventually("the log grows", Duration::from_secs(10), || async {
        (lines(path).await > start + 2).then_some(())
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_and_restart_recovers_everything() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    d.pull(&env.busybox).await;
    let cfg = pod_config("restart");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let create = |c: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(c),
        sandbox_config: Some(cfg.clone()),
    };
    let ticker = rt
        .create_container(create(container_config(
            "ticker",
            &env.busybox,
            &["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let quitter = rt
        .create_container(create(container_config(
            "quitter",
            &env.busybox,
            &["sh", "-c", "sleep 2; exit 7"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let waiting = rt
        .create_container(create(container_config(
            "waiting",
            &env.busybox,
            &["sh", "-c", "echo started-late"],
        )))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    for c in [&ticker, &quitter] {
        rt.start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    }
    let log = std::path::Path::new(&cfg.log_directory).join("ticker/0.log");
    assert!(grows(&log).await, "ticker logs");

    d.kill();
    tokio::time::sleep(Duration::from_secs(3)).await; // quitter exits meanwhile
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();

    let pods = imacri_integration::client::pods(&mut rt).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].id, pod);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    let status =
        |rt: &mut imacri_integration::cri::runtime_service_client::RuntimeServiceClient<_>,
         id: String| {
            let mut rt = rt.clone();
            async move {
                rt.container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
            }
        };
    let t = status(&mut rt, ticker.clone()).await;
    assert_eq!(t.state, cri::ContainerState::ContainerRunning as i32);
    assert!(grows(&log).await, "the log continues after the restart");
    let q = status(&mut rt, quitter.clone()).await;
    assert_eq!(q.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(q.exit_code, 7);
    assert!(q.finished_at > q.started_at);
    let w = status(&mut rt, waiting.clone()).await;
    assert_eq!(w.state, cri::ContainerState::ContainerCreated as i32);
    rt.start_container(cri::StartContainerRequest {
        container_id: waiting.clone(),
    })
    .await
    .unwrap();

    // Log rotation: kubelet renames the file and asks us to reopen.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: ticker.clone(),
    })
    .await
    .unwrap();
    assert!(grows(&log).await, "new log file after reopen");
    let e = rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: quitter.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // Exec still works on the recovered container.
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: ticker.clone(),
            cmd: vec!["echo".into(), "still-here".into()],
            timeout: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"still-here\n");

    // A second daemon on the same socket is refused; SIGTERM is graceful.
    let other =
        Imacri::start_full(env, &d.namespace, &["--socket", d.socket.to_str().unwrap()]).await;
    let err = format!(
        "{:#}",
        other
            .err()
            .expect("second server on a live socket must fail")
    );
    assert!(err.contains("in use by a running server"), "{err}");
    let status = d.stop().unwrap();
    assert!(status.success(), "graceful shutdown: {status:?}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());
}

/// containerd restarts (its shims keep running) under an ima pod: the pod's
/// measurement goes on without a gap. A new file executed in the running
/// container after the restart is measured, a container created and
/// started after it gets the guards, runs through imacri's init and is
/// measured from its first instruction, and nothing is left afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn an_ima_pod_stays_measured_across_a_containerd_restart() {
    use imacri_integration::client::{exec_sh, sh_ok, start_container};
    let env = Env::get();
    let name = format!("ima-ctd-restart-{:06x}", rand::random::<u32>() % 0xffffff);
    let (sock, pid) = imacri_integration::start_containerd_pid(&env.base, &name, false).unwrap();
    let d = Imacri::start_full(
        env,
        "ima-restart",
        &["--containerd-address", sock.to_str().unwrap()],
    )
    .await
    .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-ctd-restart").await;
    let sleeper = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);
    let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
    assert_eq!(sh_ok(&mut rt, &a, "echo before").await, "before");

    imacri_integration::restart_containerd(&env.base, &name, pid).unwrap();

    // Exec works again once containerd is back; what it runs is measured.
    let out = imacri_integration::poll::eventually(
        "exec after the containerd restart",
        Duration::from_secs(20),
        || {
            let mut rt = rt.clone();
            let a = a.clone();
            async move {
                let (code, out, _) = exec_sh(
                    &mut rt,
                    &a,
                    "mkdir -p /tmp/r && cp /bin/busybox /tmp/r/echo && /tmp/r/echo after",
                )
                .await;
                (code == 0).then_some(out)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(out.trim(), "after");
    let b = start_container(&mut rt, &pod, &cfg, sleeper("b")).await;
    assert_eq!(
        sh_ok(&mut rt, &b, "cat /proc/sys/vm/memfd_noexec").await,
        "2"
    );

    let log = pod_log(&d, &pod);
    let has = |container: &str, path: &str, ev: &str| logged(&log, container, path, ev);
    assert!(has(&a, "/tmp/r/echo", "exec"), "{log}");
    // b's entrypoint ran through imacri's init, then sleep (busybox).
    assert!(
        has(&b, imacri_runtime::integrity::init::PATH, "exec"),
        "{log}"
    );
    assert!(has(&b, "/bin/busybox", "exec"), "{log}");
    assert!(has(&b, "", "start"), "{log}");
    assert!(
        !has_gap(&log),
        "a containerd restart is no gap in the measurement: {log}"
    );

    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    assert!(env
        .all_objects_at(&sock, "ima-restart")
        .await
        .unwrap()
        .is_empty());
}

/// imacri crashes between CreateContainer and StartContainer of an ima
/// pod's container (kubelet retries the start against the next imacri):
/// the container starts measured as if nothing happened — guards set,
/// through imacri's init, entries from its first instruction, no gap — and
/// the pod's running container is still measured.
#[tokio::test(flavor = "multi_thread")]
async fn an_ima_container_created_before_a_crash_starts_measured() {
    use imacri_integration::client::{create_container, sh_ok, start_container};
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-crash-created").await;
    let sleeper = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);
    let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
    let b = create_container(&mut rt, &pod, &cfg, sleeper("b"))
        .await
        .unwrap();
    // Not while a's entrypoint is being measured: an execution in flight
    // at a crash is refused (`ima_crashes.rs`), which would end a.
    imacri_integration::poll::eventually("a runs sleep", Duration::from_secs(10), || async {
        logged(&pod_log(&d, &pod), &a, "/bin/busybox", "exec").then_some(())
    })
    .await
    .unwrap();

    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: b.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    for c in [&a, &b] {
        assert_eq!(
            sh_ok(&mut rt, c, "cat /proc/sys/vm/memfd_noexec").await,
            "2"
        );
        assert_eq!(
            sh_ok(
                &mut rt,
                c,
                "mkdir -p /tmp/r && cp /bin/busybox /tmp/r/echo && /tmp/r/echo ran"
            )
            .await,
            "ran"
        );
    }
    let log = pod_log(&d, &pod);
    let has = |container: &str, path: &str, ev: &str| logged(&log, container, path, ev);
    for c in [&a, &b] {
        assert!(has(c, "/tmp/r/echo", "exec"), "{c}: {log}");
        assert!(
            has(c, imacri_runtime::integrity::init::PATH, "exec"),
            "{c}: {log}"
        );
    }
    assert!(has(&b, "", "start"), "{log}");
    assert!(
        !has_gap(&log),
        "with the keeper, a crash is no gap in the measurement: {log}"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// A graceful stop (SIGTERM: an upgrade, `systemctl restart`) answers the
/// measured executions it has already read before imacri exits: an exec
/// whose file is being hashed when SIGTERM comes runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_answers_executions_in_flight() {
    stopped_while_hashing("ima-graceful", false).await;
}

/// A crash (kill -9) while a file is being hashed: the event was handed to
/// the fd keeper before hashing began, so the next imacri measures it and
/// answers it by the number the dead one got; the exec runs and is logged
/// by the next imacri (events read but not handed over are still refused:
/// `ima_crashes.rs` `an_execution_in_flight_at_a_crash_is_refused`).
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_hashed_at_a_crash_is_measured_by_the_next_imacri() {
    stopped_while_hashing("ima-crash-hashing", true).await;
}

/// An ima pod whose entrypoint executes a new file whose hashing takes 2 s
/// longer (a test hook); imacri is stopped (SIGTERM, or SIGKILL if
/// `crash`) meanwhile and started again: the execution must run and be
/// logged.
async fn stopped_while_hashing(name: &str, crash: bool) {
    use imacri_integration::client::{exec_sh, sh_ok, start_container};
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    d.kill();
    d.vars = vec![("IMACRI_TEST_HASH_DELAY".into(), "/tmp/slowexec/".into())];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, name).await;
    let a = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "a",
            &env.busybox,
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/slowexec && cp /bin/busybox /tmp/slowexec/echo && sleep 0.5 && \
                 /tmp/slowexec/echo ran >/tmp/out 2>/tmp/err; echo $? >/tmp/rc; sleep 1000",
            ],
        ),
    )
    .await;
    // Stopped once that file's hashing has begun (whatever the load).
    imacri_integration::poll::eventually("the hash in flight", Duration::from_secs(20), || async {
        d.log()
            .contains("test hook: hashing 2 s longer")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    if crash {
        d.kill();
        d.vars.clear();
    } else {
        let t = std::time::Instant::now();
        let status = d.stop().unwrap();
        assert!(status.success(), "graceful shutdown: {status:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "imacri stopped without waiting for the hash in flight ({:?})",
            t.elapsed()
        );
    }
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let rc = imacri_integration::poll::eventually("the exec ends", Duration::from_secs(20), || {
        let mut rt = rt.clone();
        let a = a.clone();
        async move {
            let (_, out, _) = exec_sh(&mut rt, &a, "cat /tmp/rc 2>/dev/null").await;
            (!out.trim().is_empty()).then(|| out.trim().to_string())
        }
    })
    .await
    .unwrap();
    let err = sh_ok(&mut rt, &a, "cat /tmp/err").await;
    assert_eq!(
        rc,
        "0",
        "the exec in flight was refused: {err}\n{}",
        d.log()
    );
    assert_eq!(sh_ok(&mut rt, &a, "cat /tmp/out").await, "ran");
    let log = pod_log(&d, &pod);
    assert!(logged(&log, &a, "/tmp/slowexec/echo", "exec"), "{log}");
    assert!(!has_gap(&log), "{log}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// imacri's log is written by one thread of its own: a log reader that
/// stops reading (a full pipe to journald) holds up no request and no
/// pod's measurement. Here imacri's stderr is a pipe nobody reads: after
/// several pipefuls of log, requests (each logs a line) are still served
/// at once, and an ima pod's container starts, runs and is measured.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_reader_that_stops_reading_holds_up_nothing() {
    use imacri_integration::client::{sh_ok, start_container};
    use std::os::fd::AsRawFd;
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    d.kill();
    let (unread, w) = nix::unistd::pipe().unwrap();
    d.stderr = Some(std::fs::File::from(w));
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    // Each logs a debug line of about 100 bytes: 3000 fill the pipe (64 KiB)
    // several times over.
    let calls = async {
        for _ in 0..3000 {
            rt.version(cri::VersionRequest::default()).await.unwrap();
        }
    };
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("requests wait on the log reader");
    let took = t0.elapsed();
    let mut waiting: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    assert_eq!(
        unsafe { libc::ioctl(unread.as_raw_fd(), libc::FIONREAD, &mut waiting) },
        0
    );
    assert!(waiting >= 60_000, "the pipe is not full: {waiting} bytes");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (pod, cfg) = ima_pod(&d, &mut rt, "unread-log").await;
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("c", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(
        sh_ok(&mut rt, &c, "cp /bin/busybox /tmp/echo && /tmp/echo ran").await,
        "ran"
    );
    assert!(logged(&pod_log(&d, &pod), &c, "/tmp/echo", "exec"));
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    drop(unread);
}
