//! Each step of the calls that make and unmake pods and containers made to
//! fail (`IMACRI_TEST_FAIL_AT=<RPC>:<step>`: the first call to reach it
//! fails there, as if what the step did had failed after doing its work).
//! Unlike a crash (`crash_points.rs`), the call's own rollback runs, with
//! no restart to help: the call answers with the step's error, leaves what
//! was there before (containerd objects, mounts, files, network
//! namespaces, IP addresses, shims, the fd keeper's files), and kubelet's
//! retry works; a container whose start failed is exited, its process
//! gone, and the pod's next container is measured; a stop or removal that
//! failed is finished by the next call.

use imacri_integration::client::{create_container, exec_sh, pods, run_pod, Rt};
use imacri_integration::cuts::{
    back_to, containers_of, create_or_start, created_for, executing_with_volumes,
    failing_container_steps, finished_by_the_next_call, ima_pod_node, made, pod_log,
    rolled_back_then_retried, shapes, sleeper_runs, stop_and_remove, UNMAKE_STEPS,
};
use imacri_integration::{cri, Env, Imacri};

async fn failing_at(d: &mut Imacri, point: &str) {
    d.respawn(&[("IMACRI_TEST_FAIL_AT", point)]).await;
}

/// The call failed with the error made at `point`, not another one.
fn made_to_fail(e: &tonic::Status, point: &str) {
    let (what, step) = point.split_once(':').unwrap();
    assert!(
        e.message()
            .contains(&format!("{what} made to fail at its step {step}")),
        "{point}: not the failure made there: {e}"
    );
}

/// The pods whose creation imacri says it rolled back, in order.
fn rolled_back_pods(d: &Imacri) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains("pod's creation rolled back"))
        .filter_map(|l| {
            let (_, id) = l.split_once("pod_sandbox_id=")?;
            Some(id.chars().take(64).collect())
        })
        .collect()
}

/// The pod rolled back after the `had` first (its log line comes a moment
/// after it is logged).
async fn pod_rolled_back(d: &Imacri, had: usize, case: &str) -> String {
    for _ in 0..100 {
        if let Some(id) = rolled_back_pods(d).get(had) {
            return id.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{case}: no rollback logged\n{}", d.log());
}

/// RunPodSandbox failing at each of its steps, for each shape of pod: the
/// call rolls the pod back before it answers (no pod listed, nothing of it
/// left, its address given back) and the same config runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_failing_at_any_step_is_rolled_back_by_its_call() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    for (cfg, steps) in shapes("fail-run") {
        for step in steps.iter() {
            let point = format!("RunPodSandbox:{step}");
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            failing_at(&mut d, &point).await;
            let before = made(&d).await;
            let had = rolled_back_pods(&d).len();
            let mut rt = d.runtime().await.unwrap();
            let e = run_pod(&mut rt, &cfg)
                .await
                .expect_err(&format!("{case}: the pod was made"));
            made_to_fail(&e, &point);
            assert!(pods(&mut rt).await.is_empty(), "{case}: a pod is listed");
            let gone = pod_rolled_back(&d, had, &case).await;
            rolled_back_then_retried(&d, &mut rt, (&gone, &cfg), &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}

/// A copy of busybox run in container `c` is in the pod's log.
async fn runs_measured(d: &Imacri, rt: &mut Rt, pod: &str, c: &str, case: &str) {
    let (code, out, err) = exec_sh(
        rt,
        c,
        "mkdir -p /tmp/r && cp /bin/busybox /tmp/r/echo && /tmp/r/echo on",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "on"), "{case}: {err}");
    let log = pod_log(d, pod);
    assert!(
        log.lines()
            .any(|l| l.contains(c) && l.contains("/tmp/r/echo")),
        "{case}: what the container ran is not measured:\n{log}"
    );
}

/// CreateContainer and StartContainer failing at each step, in an ima pod
/// with a host volume (ID-mapped binds) and an image volume: a creation
/// leaves nothing; a start leaves the container exited with StartError, no
/// task (its process is gone), and removable to what was there; the same
/// config is then created, started and measured.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_failing_at_any_step_is_rolled_back_or_exited() {
    let (mut d, vol, cfg, pod) = ima_pod_node("fail-create").await;
    let config = |n: &str| executing_with_volumes(n, vol.path());
    for (i, point) in failing_container_steps().into_iter().enumerate() {
        let name = format!("c{i}");
        failing_at(&mut d, &point).await;
        let before = made(&d).await;
        let mut rt = d.runtime().await.unwrap();
        let started = created_for(&point, &mut rt, &pod, &cfg, config(&name)).await;
        let e = create_or_start(&mut rt, started.clone(), (&pod, &cfg), config(&name))
            .await
            .expect_err(&format!("{point}: it did not fail"));
        made_to_fail(&e, &point);
        let listed = containers_of(&mut rt, &pod).await;
        match &started {
            None => assert!(listed.is_empty(), "{point}: {listed:?}"),
            Some(id) => {
                let st = imacri_integration::client::container_status(&mut rt, id).await;
                assert_eq!(
                    (st.state, st.reason.as_str()),
                    (cri::ContainerState::ContainerExited as i32, "StartError"),
                    "{point}: {st:?}"
                );
                assert!(st.message.contains("made to fail"), "{point}: {st:?}");
                let objects = Env::get()
                    .all_objects_at(&d.containerd(), &d.namespace)
                    .await
                    .unwrap();
                assert!(
                    !objects.contains(&format!("task {id}")),
                    "{point}: its task is left: {objects:?}"
                );
                rt.remove_container(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{point}: removing it: {e}"));
            }
        }
        back_to(&d, &before, &point).await;
        // kubelet's retry, under the same name: made, started, measured.
        let c = create_container(&mut rt, &pod, &cfg, config(&name))
            .await
            .unwrap_or_else(|e| panic!("{point}: the retry: {e}\n{}", d.log()));
        rt.start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{point}: the retry's start: {e}\n{}", d.log()));
        runs_measured(&d, &mut rt, &pod, &c, &point).await;
        rt.remove_container(cri::RemoveContainerRequest { container_id: c })
            .await
            .unwrap();
        back_to(&d, &before, &format!("{point}, after the retry")).await;
    }
    let mut rt = d.runtime().await.unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    d.stop_leaving_nothing().await;
}

/// StopPodSandbox, RemovePodSandbox and RemoveContainer failing at each
/// step (with a running container), for each shape of pod: the failed
/// call answers with the error, and the next stop and removal leave what
/// was there before and give the address back.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmaking_failing_at_any_step_is_finished_by_the_next_call() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let points = UNMAKE_STEPS.iter().copied().chain(["RemoveContainer:nri"]);
    let points: Vec<&str> = points.collect();
    for (cfg, _) in shapes("fail-stop") {
        for point in &points {
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            failing_at(&mut d, point).await;
            let before = made(&d).await;
            let mut rt = d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg).await.unwrap();
            sleeper_runs(&mut rt, &pod, &cfg).await;
            let e = stop_and_remove(&mut rt, &pod)
                .await
                .expect_err(&format!("{case}: neither the stop nor the removal failed"));
            made_to_fail(&e, point);
            assert!(
                pods(&mut rt).await.iter().any(|p| p.id == pod),
                "{case}: a pod whose removal failed is forgotten"
            );
            finished_by_the_next_call(&d, &mut rt, &pod, &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}
