//! The engine fails closed: a container whose measurement stops (its
//! fanotify reader fails) is killed with reason ImaUnmeasured and the gap is
//! in its log; it never runs on unmeasured. The reader fault is injected
//! with IMACRI_TEST_FANOTIFY_FAIL_AFTER. An access the kernel cannot open
//! for imacri is refused by the kernel, and is not the reader's failure.

use imacri_integration::client::{container_status, run_pod, start_container};
use imacri_integration::{attest, container_config, cri, pod_config, poll, Env, Imacri};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reader_kills_its_container() {
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.respawn(&[("IMACRI_TEST_FANOTIFY_FAIL_AFTER", "5")]).await;
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = pod_config("failclosed-reader");
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("app", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    // Executions until the reader gives up; those after it wait unanswered
    // (never run unmeasured) until the container is killed.
    for _ in 0..10 {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            rt.exec_sync(cri::ExecSyncRequest {
                container_id: c.clone(),
                cmd: vec!["sh".into(), "-c".into(), "ls / >/dev/null; true".into()],
                timeout: 3,
            }),
        )
        .await;
        if container_status(&mut rt, &c).await.state == cri::ContainerState::ContainerExited as i32
        {
            break;
        }
    }
    let st = poll::eventually("the container killed", Duration::from_secs(30), || {
        let mut rt = rt.clone();
        let c = c.clone();
        async move {
            let st = container_status(&mut rt, &c).await;
            (st.state == cri::ContainerState::ContainerExited as i32).then_some(st)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}");
    assert!(st.message.contains("measurement stopped"), "{st:?}");
    assert_eq!(st.exit_code, 137);
    let (code, log, err) = attest(&d, &["log", &pod]);
    assert_eq!(code, 0, "{err}");
    assert!(
        log.lines().any(|l| l.ends_with(" gap") && l.contains(&c)),
        "{log}"
    );
}

/// imacri at its open-file limit (its soft limit lowered under it by the
/// test, as a spike of the node's pods would bring it there): the kernel
/// cannot open an execution's file for imacri's reader, so it refuses that
/// execution itself (EPERM) and nothing runs unmeasured. That failed read
/// is not the reader's end: the container is not killed for it, no gap is
/// logged, and once imacri has files again the container's next execution
/// is measured and runs. Until 2026-12-06 the reader took it for its own
/// failure and the container was killed (ImaUnmeasured).
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_imacri_cannot_open_is_refused_and_the_container_lives() {
    use imacri_integration::runner::{go, next_out, runner};
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = pod_config("failclosed-emfile");
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &env.busybox, "/tmp/new/true", setup).await;
    go(&tmp, "");
    assert_eq!(next_out(&tmp, "first", &d).trim(), "ran");
    let pid = d.pid().unwrap() as i32;
    let limit = d.at_open_file_limit();
    // A client connecting meanwhile waits in the socket's backlog; imacri
    // does not spin on the accept it cannot make.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(") ")
            .unwrap()
            .1
            .split(' ')
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime and stime (fields 14 and 15), in clock ticks.
        f[11] + f[12]
    };
    let client = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let before = cpu();
    go(&tmp, "");
    let out = next_out(&tmp, "at imacri's limit", &d);
    std::thread::sleep(Duration::from_millis(1000));
    let spent = cpu() - before;
    drop(limit);
    assert!(
        out.contains("refused") && out.contains("Operation not permitted"),
        "{out}\n{}",
        d.log()
    );
    assert!(spent < 50, "imacri spent {spent} ticks at its limit");
    drop(client);
    go(&tmp, "");
    let out = next_out(&tmp, "with files again", &d);
    assert_eq!(out.trim(), "ran", "{out}\n{}", d.log());
    let st = container_status(&mut rt, &c).await;
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{st:?}\n{}",
        d.log()
    );
    let (code, log, err) = attest(&d, &["log", &pod]);
    assert_eq!(code, 0, "{err}");
    assert!(!log.lines().any(|l| l.ends_with(" gap")), "{log}");
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert!(
        stats["fanotify"]["unopenedEvents"].as_u64() >= Some(1),
        "{stats}"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// The map guard's twin: imacri at its open-file limit cannot take the
/// file a running process of the container maps executable, so that
/// mapping is refused (nothing maps unmeasured) and the container lives;
/// once imacri has files again its next mapping is measured and made.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_imacri_cannot_open_is_refused_and_the_container_lives() {
    use imacri_integration::escapes::{ima, node};
    use imacri_integration::runner::{go, next_out, runner};
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("failclosed-emfile-map", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let setup = "cp /bin/busybox /tmp/m.bin";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &image, "$x", setup).await;
    // Run (measured) with imacri as usual; it maps 2 s later, at the limit.
    go(&tmp, "escape map-later /tmp/m.bin 2000 1");
    std::thread::sleep(Duration::from_millis(700));
    let limit = d.at_open_file_limit();
    let out = next_out(&tmp, "at imacri's limit", &d);
    drop(limit);
    assert!(
        out.contains("map-later:") && !out.contains("MAPPED"),
        "{out}\n{}",
        d.log()
    );
    go(&tmp, "escape map-later /tmp/m.bin 0 1");
    let out = next_out(&tmp, "with files again", &d);
    assert!(out.contains("MAPPED"), "{out}\n{}", d.log());
    let st = container_status(&mut rt, &c).await;
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
