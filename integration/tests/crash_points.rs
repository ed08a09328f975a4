//! imacri killed at each step of the calls that make and unmake pods and
//! containers (`IMACRI_TEST_CRASH_AT=<RPC>:<step>`, the steps of its step
//! log): the next imacri leaves nothing half-made behind (containerd
//! objects, mounts, files, network namespaces, IP addresses, shims), what
//! was cut short can be made again under its name, and an ima container
//! whose task was made or started before the crash never runs unmeasured.

use imacri_integration::client::{create_container, exec_sh, pods, run_pod, Rt};
use imacri_integration::cuts::{
    addressed, back_to, container_steps, containers_of, content_of, create_or_start, created_for,
    executing_with_volumes, finished_by_the_next_call, ima_pod_node, made, pod_log,
    rolled_back_then_retried, sandbox_ids, shapes, sleeper_runs, stop_and_remove, Made,
    UNMAKE_STEPS,
};
use imacri_integration::{cri, own_pids, pod_config, Env, Imacri};
use std::path::Path;
use std::time::Duration;

async fn crash_at(d: &mut Imacri, point: &str) {
    d.respawn(&[("IMACRI_TEST_CRASH_AT", point)]).await;
}

/// RunPodSandbox cut at each of its steps, for each shape of pod: the
/// next imacri rolls the pod back (no pod listed, nothing of it left, its
/// address given back) and the same config runs (kubelet's retry).
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cut_short_at_any_step_is_rolled_back() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    for (cfg, steps) in shapes("cut-run") {
        for step in steps.iter() {
            let case = format!(
                "{}: RunPodSandbox:{step}",
                cfg.metadata.as_ref().unwrap().name
            );
            let before = made(&d).await;
            let had = sandbox_ids(&d);
            crash_at(&mut d, &format!("RunPodSandbox:{step}")).await;
            let mut rt = d.runtime().await.unwrap();
            run_pod(&mut rt, &cfg)
                .await
                .expect_err(&format!("{case}: imacri died in it"));
            let cut: Vec<String> = sandbox_ids(&d).difference(&had).cloned().collect();
            assert_eq!(cut.len(), 1, "{case}: one record made: {cut:?}");
            d.respawn(&[]).await;
            let mut rt = d.runtime().await.unwrap();
            assert!(
                !pods(&mut rt).await.iter().any(|p| p.id == cut[0]),
                "{case}: the pod cut short is listed"
            );
            rolled_back_then_retried(&d, &mut rt, (&cut[0], &cfg), &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}

/// StopPodSandbox and RemovePodSandbox cut short: the next imacri reports
/// the pod as it is (not ready), and the call made again finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_stop_or_removal_cut_short_is_finished_by_the_next_call() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    for (cfg, _) in shapes("cut-stop") {
        for point in UNMAKE_STEPS {
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            d.respawn(&[]).await;
            let before = made(&d).await;
            let mut rt = d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg).await.unwrap();
            sleeper_runs(&mut rt, &pod, &cfg).await;
            crash_at(&mut d, point).await;
            let mut rt = d.runtime().await.unwrap();
            let removed = stop_and_remove(&mut rt, &pod).await.is_ok();
            assert!(
                !removed,
                "{case}: imacri did not die in the stop or removal"
            );
            d.respawn(&[]).await;
            let mut rt = d.runtime().await.unwrap();
            let released = point == "StopPodSandbox:released" || point.starts_with("RemovePod");
            if let Some(p) = pods(&mut rt).await.iter().find(|p| p.id == pod && released) {
                assert_eq!(
                    p.state,
                    cri::PodSandboxState::SandboxNotready as i32,
                    "{case}: a pod whose stop was cut short is ready"
                );
            }
            finished_by_the_next_call(&d, &mut rt, &pod, &before, &case).await;
        }
    }
    d.stop_leaving_nothing().await;
}

/// CreateContainer and StartContainer cut at each step, in an ima pod with
/// a host volume (ID-mapped binds): the next imacri leaves either no
/// container or one that removes cleanly; the same config is created and
/// started again; a container whose task the crash left created starts,
/// and one whose task had started runs on measured: a program it runs
/// after the restart is in the pod's log.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_cut_short_at_any_step_is_never_half_made_nor_unmeasured() {
    let (mut d, vol, cfg, pod) = ima_pod_node("cut-create").await;
    let config = |n: &str| executing_with_volumes(n, vol.path());
    for (i, point) in container_steps().iter().enumerate() {
        let name = format!("c{i}");
        d.respawn(&[]).await;
        let before = made(&d).await;
        let mut rt = d.runtime().await.unwrap();
        let in_start = point.starts_with("Start");
        let made_first = created_for(point, &mut rt, &pod, &cfg, config(&name)).await;
        crash_at(&mut d, point).await;
        let mut rt = d.runtime().await.unwrap();
        create_or_start(&mut rt, made_first, (&pod, &cfg), config(&name))
            .await
            .expect_err(&format!("{point}: imacri died in it"));
        d.respawn(&[]).await;
        let mut rt = d.runtime().await.unwrap();
        let listed = containers_of(&mut rt, &pod).await;
        for c in &listed {
            let st = imacri_integration::client::container_status(&mut rt, &c.id).await;
            if *point == "StartContainer:start" {
                // Its task started: what it executes after the restart is
                // measured (the kept groups were taken back, not released).
                let loops = |log: &str| {
                    log.lines()
                        .filter(|l| l.contains(&c.id) && l.contains("/tmp/l/"))
                        .count()
                };
                let at_restart = loops(&pod_log(&d, &pod));
                tokio::time::sleep(Duration::from_secs(2)).await;
                let log = pod_log(&d, &pod);
                assert!(
                    loops(&log) >= at_restart + 5,
                    "{point}: what the container executed after the restart is not measured ({at_restart} before, then {}):\n{log}",
                    loops(&log)
                );
                assert_eq!(
                    st.state,
                    cri::ContainerState::ContainerRunning as i32,
                    "{point}: {st:?}\n{}",
                    d.log()
                );
                let (code, out, err) = exec_sh(
                    &mut rt,
                    &c.id,
                    "mkdir -p /tmp/r && cp /bin/busybox /tmp/r/echo && /tmp/r/echo on",
                )
                .await;
                assert_eq!((code, out.trim()), (0, "on"), "{point}: {err}");
                let log = pod_log(&d, &pod);
                assert!(
                    log.lines()
                        .any(|l| l.contains(&c.id) && l.contains("/tmp/r/echo")),
                    "{point}: what the container ran after the restart is not measured:\n{log}"
                );
            } else if in_start {
                // Its task was made, not started: the container starts now.
                assert_eq!(
                    st.state,
                    cri::ContainerState::ContainerCreated as i32,
                    "{point}: {st:?}"
                );
                rt.start_container(cri::StartContainerRequest {
                    container_id: c.id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{point}: the next start: {e}\n{}", d.log()));
                let (code, out, err) = exec_sh(&mut rt, &c.id, "echo ran").await;
                assert_eq!((code, out.trim()), (0, "ran"), "{point}: {err}");
            }
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: c.id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{point}: removing what the crash left: {e}"));
        }
        back_to(&d, &before, point).await;
        // kubelet's retry, under the same name.
        let c = create_container(&mut rt, &pod, &cfg, config(&name))
            .await
            .unwrap_or_else(|e| panic!("{point}: the retry: {e}\n{}", d.log()));
        rt.start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{point}: the retry's start: {e}\n{}", d.log()));
        rt.remove_container(cri::RemoveContainerRequest { container_id: c })
            .await
            .unwrap();
        back_to(&d, &before, &format!("{point}, after the retry")).await;
    }
    let mut rt = d.runtime().await.unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    d.stop_leaving_nothing().await;
}

/// The bridge plugin of `bin` replaced by one that fails every call.
fn break_bridge(bin: &Path) {
    let bridge = bin.join("bridge");
    let _ = std::fs::remove_file(&bridge);
    std::fs::write(
        &bridge,
        "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"broken for the test\"}'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&bridge, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn mend_bridge(bin: &Path) {
    let bridge = bin.join("bridge");
    let _ = std::fs::remove_file(&bridge);
    std::os::unix::fs::symlink("/usr/lib/cni/bridge", &bridge).unwrap();
}

/// `pod` is listed not ready (still holding its address if it got one),
/// and once the network plugin works again its removal leaves what was
/// there `before` and gives its address back.
async fn kept_then_removed(
    d: &Imacri,
    rt: &mut Rt,
    (bin, pod, had_address): (&Path, &str, bool),
    before: &Made,
) {
    let env = Env::get();
    let p = pods(rt)
        .await
        .into_iter()
        .find(|p| p.id == pod)
        .unwrap_or_else(|| panic!("a pod whose rollback failed is forgotten\n{}", d.log()));
    assert_eq!(p.state, cri::PodSandboxState::SandboxNotready as i32);
    assert_eq!(addressed(env).contains(pod), had_address, "its address");
    // What kubelet's garbage collection does with it: its status, then
    // StopPodSandbox and RemovePodSandbox.
    let st = imacri_integration::client::pod_status(rt, pod).await;
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    // While the plugin fails, so does the stop, saying why; the pod stays.
    let err = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .expect_err("a stop whose CNI DEL fails");
    assert!(err.message().contains("broken for the test"), "{err}");
    assert!(pods(rt).await.iter().any(|p| p.id == pod));
    mend_bridge(bin);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .unwrap_or_else(|e| panic!("stop: {e}\n{}", d.log()));
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .unwrap_or_else(|e| panic!("removal: {e}\n{}", d.log()));
    back_to(d, before, "after the removal").await;
    assert!(
        !addressed(env).contains(pod),
        "the address was not given back"
    );
}

/// A RunPodSandbox cut short whose rollback then fails (here CNI DEL: its
/// plugin errs) keeps the pod, not ready, rather than forgetting what is
/// left: RemovePodSandbox (kubelet's garbage collection) tears it down once
/// the network plugin works again. The same without a crash: ADD fails,
/// and so does the rollback's DEL.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_that_fails_keeps_the_pod_for_its_removal() {
    let env = Env::get();
    // Plugins of this imacri's own, so that one can be broken.
    let bin = tempfile::tempdir_in(&env.base).unwrap();
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.path().join(p)).unwrap();
    }
    let mut d = Imacri::start_full(
        env,
        &format!("iso-{:08x}", rand::random::<u32>()),
        &["--cni-bin-dir", bin.path().to_str().unwrap()],
    )
    .await
    .unwrap();
    d.pull(&env.busybox).await;
    let before = made(&d).await;
    let mut cfg = pod_config("cut-rollback");
    own_pids(&mut cfg);
    let had = sandbox_ids(&d);
    crash_at(&mut d, "RunPodSandbox:cni").await;
    let mut rt = d.runtime().await.unwrap();
    run_pod(&mut rt, &cfg).await.expect_err("imacri died in it");
    let cut: Vec<String> = sandbox_ids(&d).difference(&had).cloned().collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    break_bridge(bin.path());
    d.respawn(&[]).await;
    let mut rt = d.runtime().await.unwrap();
    kept_then_removed(&d, &mut rt, (bin.path(), &cut[0], true), &before).await;

    break_bridge(bin.path());
    let had = sandbox_ids(&d);
    let err = run_pod(&mut rt, &cfg).await.expect_err("CNI ADD fails");
    assert!(err.message().contains("broken for the test"), "{err}");
    let failed: Vec<String> = sandbox_ids(&d).difference(&had).cloned().collect();
    assert_eq!(failed.len(), 1, "{failed:?}\n{}", d.log());
    kept_then_removed(&d, &mut rt, (bin.path(), &failed[0], false), &before).await;
    d.stop_leaving_nothing().await;
}

/// PullImage cut while a blob is written, after every blob is fetched,
/// after the layers are unpacked and after the image is recorded: the next
/// imacri leaves no blob, ingest or layer of the pull cut short (or has the
/// image, whole), and the pull made again gets the image.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_cut_short_leaves_no_blob_or_layer() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    let before = content_of(&d).await;
    for step in ["writing", "fetched", "unpacked", "registered"] {
        let case = format!("PullImage:{step}");
        crash_at(&mut d, &case).await;
        let mut images = d.images().await.unwrap();
        images
            .pull_image(cri::PullImageRequest {
                image: imacri_integration::client::image(&env.busybox),
                ..Default::default()
            })
            .await
            .expect_err(&format!("{case}: imacri died in it"));
        d.respawn(&[]).await;
        let mut images = d.images().await.unwrap();
        let listed = images
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images;
        let pulled = listed.iter().find(|i| i.repo_tags.contains(&env.busybox));
        if let Some(i) = pulled {
            assert_eq!(step, "registered", "{case}: an image half pulled is listed");
            images
                .remove_image(cri::RemoveImageRequest {
                    image: imacri_integration::client::image(&i.id),
                })
                .await
                .unwrap();
        }
        let mut last = String::new();
        for _ in 0..50 {
            let now = content_of(&d).await;
            last = format!("{:?}", now.difference(&before).collect::<Vec<_>>());
            if now.is_subset(&before) {
                last.clear();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(last.is_empty(), "{case}: left: {last}\n{}", d.log());
        d.pull(&env.busybox).await;
        let mut images = d.images().await.unwrap();
        let id = images
            .image_status(cri::ImageStatusRequest {
                image: imacri_integration::client::image(&env.busybox),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap_or_else(|| panic!("{case}: the pull made again has no image"))
            .id;
        images
            .remove_image(cri::RemoveImageRequest {
                image: imacri_integration::client::image(&id),
            })
            .await
            .unwrap();
    }
    d.stop();
}
