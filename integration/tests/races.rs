//! Two calls on one pod at once, each at every step of the first: a
//! container created or started while its pod is stopped and removed
//! (held at the step, `IMACRI_TEST_HOLD_AT`, while the other call runs).
//! kubelet's pod worker does not do this for one pod, but other clients
//! and kubelet's garbage collection can: nothing may be left behind, and
//! no container may run in a pod that was stopped. Also a container
//! stopped and removed while it starts.

use imacri_integration::client::{create_container, pods, run_pod, Rt};
use imacri_integration::cuts::{
    back_to, containers_of, create_or_start, created_for, executing_with_volumes,
    failing_container_steps, made, shapes, stop_and_remove, Made,
};
use imacri_integration::{cri, Env, Imacri};
use std::time::{Duration, Instant};

/// Waits until a call stands at its held step (`hold` made).
async fn held<T>(
    d: &Imacri,
    hold: &std::path::Path,
    point: &str,
    call: &tokio::task::JoinHandle<T>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !hold.exists() {
        assert!(
            !call.is_finished(),
            "{point}: the call ended without reaching the step\n{}",
            d.log()
        );
        assert!(Instant::now() < deadline, "{point}: not reached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Once `pod` is stopped and removed (kubelet's garbage collection), it
/// is not listed, no container of it is, and what was there `before` is.
async fn removed_whole(d: &Imacri, rt: &mut Rt, pod: &str, before: &Made, case: &str) {
    stop_and_remove(rt, pod)
        .await
        .unwrap_or_else(|e| panic!("{case}: the removal: {e}\n{}", d.log()));
    assert!(
        !pods(rt).await.iter().any(|p| p.id == pod),
        "{case}: the pod is listed"
    );
    let left = containers_of(rt, pod).await;
    assert!(
        left.is_empty(),
        "{case}: containers of the removed pod: {left:?}"
    );
    back_to(d, before, case).await;
}

/// The containers of `pod` that run.
async fn running_in(rt: &mut Rt, pod: &str) -> Vec<String> {
    containers_of(rt, pod)
        .await
        .into_iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .map(|c| c.id)
        .collect()
}

/// CreateContainer or StartContainer held at each of its steps while the
/// pod is stopped and, if the stop gets through meanwhile, removed (what
/// kubelet's garbage collection does), in the ima pod shapes (with and
/// without pause). Once the calls ended no container of the pod runs (one
/// started meanwhile is stopped, or its start fails), and once the pod is
/// removed no container of it is listed and nothing of either call is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_made_while_its_pod_goes_neither_runs_nor_stays() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let vol = tempfile::tempdir_in(&env.base).unwrap();
    let ima_shapes = shapes("race")
        .into_iter()
        .filter(|(c, _)| c.annotations.contains_key("imacri.dev/ima"));
    for (cfg, _) in ima_shapes {
        for (i, point) in failing_container_steps().into_iter().enumerate() {
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            let config = executing_with_volumes(&format!("c{i}"), vol.path());
            d.respawn(&[]).await;
            let before = made(&d).await;
            let hold = d.holding_at(&point).await;
            let mut rt = d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg).await.unwrap();
            let started = created_for(&point, &mut rt, &pod, &cfg, config.clone()).await;
            let (mut r, p, c) = (rt.clone(), pod.clone(), cfg.clone());
            let call =
                tokio::spawn(
                    async move { create_or_start(&mut r, started, (&p, &c), config).await },
                );
            held(&d, &hold, &case, &call).await;
            let (mut r, p) = (rt.clone(), pod.clone());
            let unmake = tokio::spawn(async move {
                r.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: p.clone(),
                })
                .await?;
                r.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
                    .await?;
                Ok::<_, tonic::Status>(())
            });
            // As far as the stop and removal get while the call stands still.
            tokio::time::sleep(Duration::from_millis(500)).await;
            std::fs::remove_file(&hold).unwrap();
            // Either may fail (the call on a pod stopped meanwhile); what
            // is left is what counts.
            let _ = call.await.unwrap();
            let unmade = unmake.await.unwrap();
            let running = running_in(&mut rt, &pod).await;
            assert!(
                running.is_empty(),
                "{case}: runs in a pod stopped ({unmade:?}): {running:?}\n{}",
                d.log()
            );
            removed_whole(&d, &mut rt, &pod, &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}

/// The other order: StopPodSandbox or RemovePodSandbox (of a ready pod)
/// held at each of its steps while a container is created, or one created
/// before is started, in the pod. The container call waits for the pod's
/// call (or fails at once where the pod is not ready already), then fails
/// with a code and message that say why (the pod is not ready, or was
/// removed); nothing of it is left once the pod is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_call_after_its_pods_stop_began_fails_clearly() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let vol = tempfile::tempdir_in(&env.base).unwrap();
    let (cfg, _) = shapes("race-late")
        .into_iter()
        .find(|(c, s)| c.annotations.contains_key("imacri.dev/ima") && s.contains(&"task"))
        .unwrap();
    let points = [
        "StopPodSandbox:containers",
        "StopPodSandbox:released",
        "RemovePodSandbox:containers",
        "RemovePodSandbox:teardown",
    ];
    for point in points {
        for start in [false, true] {
            let case = format!(
                "{point}, then a container's {}",
                if start { "start" } else { "creation" }
            );
            let config = executing_with_volumes("late", vol.path());
            d.respawn(&[]).await;
            let before = made(&d).await;
            let hold = d.holding_at(point).await;
            let mut rt = d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg).await.unwrap();
            let created: Option<String> = match start {
                true => Some(
                    create_container(&mut rt, &pod, &cfg, config.clone())
                        .await
                        .unwrap(),
                ),
                false => None,
            };
            let (mut r, p) = (rt.clone(), pod.clone());
            let remove = point.starts_with("Remove");
            let unmake = tokio::spawn(async move {
                if remove {
                    r.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
                        .await
                        .map(|_| ())
                } else {
                    r.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: p })
                        .await
                        .map(|_| ())
                }
            });
            held(&d, &hold, &case, &unmake).await;
            let (mut r, p, c, id) = (rt.clone(), pod.clone(), cfg.clone(), created.clone());
            let call =
                tokio::spawn(async move { create_or_start(&mut r, id, (&p, &c), config).await });
            // It waits for the pod's call, or fails at once if the pod is
            // not ready already (its pause killed) or its container gone.
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::remove_file(&hold).unwrap();
            unmake
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{case}: the pod's call: {e}\n{}", d.log()));
            let e = call
                .await
                .unwrap()
                .expect_err(&format!("{case}: it worked"));
            // A removal's own teardown makes the pod not ready before it is
            // gone: a creation that met that fails at once.
            let not_ready = (tonic::Code::FailedPrecondition, "is not ready");
            let whys = match (remove, &created) {
                (true, Some(c)) => vec![(tonic::Code::NotFound, c.as_str())],
                (true, None) => vec![(tonic::Code::NotFound, "was removed"), not_ready],
                (false, _) => vec![not_ready],
            };
            assert!(
                whys.iter()
                    .any(|(code, why)| e.code() == *code && e.message().contains(why)),
                "{case}: {e:?}"
            );
            assert!(
                running_in(&mut rt, &pod).await.is_empty(),
                "{case}: a container runs"
            );
            removed_whole(&d, &mut rt, &pod, &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}

/// StartContainer held at each of its steps while the same container is
/// stopped (no grace period) and removed (`crictl rm -f`, kubelet's
/// garbage collection of a container it gave up on): the stop and removal
/// wait for the start, then stop and remove what it started. Once they
/// ended the container is not listed and nothing of it is left (its task,
/// shim, mounts, files, or what the fd keeper held for it).
#[tokio::test(flavor = "multi_thread")]
async fn a_container_stopped_and_removed_while_it_starts_leaves_nothing() {
    let (mut d, vol, cfg, pod) = imacri_integration::cuts::ima_pod_node("race-self").await;
    let starts = failing_container_steps()
        .into_iter()
        .filter(|p| p.starts_with("StartContainer:"));
    for (i, point) in starts.enumerate() {
        let config = executing_with_volumes(&format!("s{i}"), vol.path());
        d.respawn(&[]).await;
        let before = made(&d).await;
        let hold = d.holding_at(&point).await;
        let mut rt = d.runtime().await.unwrap();
        let id = create_container(&mut rt, &pod, &cfg, config).await.unwrap();
        let (mut r, c) = (rt.clone(), id.clone());
        let call = tokio::spawn(async move {
            r.start_container(cri::StartContainerRequest { container_id: c })
                .await
        });
        held(&d, &hold, &point, &call).await;
        let (mut r, c) = (rt.clone(), id.clone());
        let unmake = tokio::spawn(async move {
            r.stop_container(cri::StopContainerRequest {
                container_id: c.clone(),
                timeout: 0,
            })
            .await?;
            r.remove_container(cri::RemoveContainerRequest { container_id: c })
                .await?;
            Ok::<_, tonic::Status>(())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!unmake.is_finished(), "{point}: the stop did not wait");
        std::fs::remove_file(&hold).unwrap();
        call.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{point}: the start: {e}\n{}", d.log()));
        unmake
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{point}: the stop and removal: {e}\n{}", d.log()));
        let left = containers_of(&mut rt, &pod).await;
        assert!(left.is_empty(), "{point}: listed: {left:?}");
        back_to(&d, &before, &point).await;
    }
    let mut rt = d.runtime().await.unwrap();
    stop_and_remove(&mut rt, &pod).await.unwrap();
    d.stop_leaving_nothing().await;
}
