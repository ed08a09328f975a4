//! The engine fails closed: a container whose measurement stops (its
//! fanotify reader fails) is killed with reason ImaUnmeasured and the gap is
//! in its log; it never runs on unmeasured. The reader fault is injected
//! with IMACRI_TEST_FANOTIFY_FAIL_AFTER (alone in this file: it is read from
//! the environment the daemon inherits).

use imacri_integration::client::{container_status, run_pod, start_container};
use imacri_integration::{attest, container_config, cri, pod_config, poll, Env, Imacri};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reader_kills_its_container() {
    let env = Env::get();
    std::env::set_var("IMACRI_TEST_FANOTIFY_FAIL_AFTER", "5");
    let d = Imacri::start(env).await.unwrap();
    std::env::remove_var("IMACRI_TEST_FANOTIFY_FAIL_AFTER");
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
