//! containerd killed and started again at each step of the calls that make
//! pods and containers, while imacri holds the call at that step
//! (`IMACRI_TEST_HOLD_AT`): the call goes on against the new containerd,
//! and succeeds or fails; what it made works, what it left is listed so
//! that its removal leaves what was there before, the same config can be
//! made again, and an ima container never runs unmeasured.

use imacri_integration::client::{create_container, exec_sh, pods, run_pod, Rt};
use imacri_integration::cuts::{
    back_to, container_steps, containers_of, content_of, create_or_start, created_for,
    failing_container_steps, ima, made, pod_log, shapes, sleeper_runs, Made, EXECUTES_NEW_FILES,
    UNMAKE_STEPS,
};
use imacri_integration::poll::eventually;
use imacri_integration::{container_config, cri, own_pids, pod_config, Env, Imacri};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An imacri on a containerd of its own, which the test restarts.
struct Node {
    d: Imacri,
    name: String,
    pid: u32,
    hold: PathBuf,
}

impl Node {
    async fn new(tag: &str) -> Node {
        let env = Env::get();
        let name = format!("{tag}-{:06x}", rand::random::<u32>() % 0xffffff);
        let (sock, pid) =
            imacri_integration::start_containerd_pid(&env.base, &name, false).unwrap();
        let d = Imacri::start_full(
            env,
            &format!("iso-{:08x}", rand::random::<u32>()),
            &["--containerd-address", sock.to_str().unwrap()],
        )
        .await
        .unwrap();
        d.pull(&env.busybox).await;
        let hold = d.dir.path().join("held");
        Node { d, name, pid, hold }
    }

    /// The next calls stop at `point` until the test lets them go on.
    async fn hold_at(&mut self, point: &str) {
        self.hold_then(point, &[]).await;
    }

    /// `hold_at`, with more of the test hooks (`IMACRI_TEST_FAIL_AT`).
    async fn hold_then(&mut self, point: &str, more: &[(&str, &str)]) {
        let hold = self.hold.to_string_lossy().into_owned();
        let mut env = vec![
            ("IMACRI_TEST_HOLD_AT", point),
            ("IMACRI_TEST_HOLD_FILE", hold.as_str()),
        ];
        env.extend_from_slice(more);
        self.d.respawn(&env).await;
    }

    /// Once `call` stands at its held step, kills containerd, starts it
    /// again and lets the call go on; its result.
    async fn restart_there<T: Send + 'static>(
        &mut self,
        point: &str,
        call: tokio::task::JoinHandle<T>,
    ) -> T {
        self.held(point, &call).await;
        self.pid =
            imacri_integration::restart_containerd(&Env::get().base, &self.name, self.pid).unwrap();
        std::fs::remove_file(&self.hold).unwrap();
        call.await.unwrap()
    }

    /// As `restart_there`, but containerd stays down until the call ended.
    async fn down_there<T: Send + 'static>(
        &mut self,
        point: &str,
        call: tokio::task::JoinHandle<T>,
    ) -> T {
        self.held(point, &call).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::remove_file(&self.hold).unwrap();
        let res = call.await.unwrap();
        self.pid = imacri_integration::start_containerd_pid(&Env::get().base, &self.name, false)
            .unwrap()
            .1;
        res
    }

    /// Waits until `call` stands at its held step.
    async fn held<T>(&self, point: &str, call: &tokio::task::JoinHandle<T>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.hold.exists() {
            assert!(
                !call.is_finished(),
                "{point}: the call ended without reaching the step\n{}",
                self.d.log()
            );
            assert!(Instant::now() < deadline, "{point}: not reached");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Removes `pod` once containerd answers again.
    async fn remove_pod(&self, pod: &str) {
        let rt = self.d.runtime().await.unwrap();
        eventually("the pod's removal", Duration::from_secs(30), || {
            let mut rt = rt.clone();
            async move {
                let stop = rt
                    .stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    })
                    .await;
                let removed = rt
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    })
                    .await;
                (stop.is_ok() && removed.is_ok()).then_some(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.d.log()));
    }

    async fn remove_container(&self, id: &str) {
        let rt = self.d.runtime().await.unwrap();
        eventually("the container's removal", Duration::from_secs(30), || {
            let mut rt = rt.clone();
            async move {
                rt.remove_container(cri::RemoveContainerRequest {
                    container_id: id.to_string(),
                })
                .await
                .ok()
                .map(|_| ())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.d.log()));
    }

    /// The retry `c` (the same config made again) starts; once removed,
    /// what was there `before` is all there is.
    async fn retry_runs(&self, rt: &mut Rt, c: &str, point: &str, before: &Made) {
        rt.start_container(cri::StartContainerRequest {
            container_id: c.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("{point}: the retry's start: {e}\n{}", self.d.log()));
        self.remove_container(c).await;
        back_to(&self.d, before, &format!("{point}, after the retry")).await;
    }

    async fn stop(mut self) {
        self.d.stop_leaving_nothing().await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The first call after containerd came back may still meet the old
/// connection: `f` is tried until it works.
async fn after_restart<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually(what, Duration::from_secs(30), &mut f)
        .await
        .unwrap()
}

/// RunPodSandbox with containerd restarted at each of its steps, for each
/// shape of pod: a pod that comes back ready runs a container; one that
/// failed is gone or listed not ready; either way its removal leaves what
/// was there, and the config runs again.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_made_across_a_containerd_restart_is_whole_or_removable() {
    let mut n = Node::new("ctd-run").await;
    for (cfg, steps) in shapes("ctd-run") {
        for step in steps.iter() {
            let point = format!("RunPodSandbox:{step}");
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            n.d.respawn(&[]).await;
            let before: Made = made(&n.d).await;
            n.hold_at(&point).await;
            let mut rt = n.d.runtime().await.unwrap();
            let c = cfg.clone();
            let res = n
                .restart_there(
                    &case,
                    tokio::spawn(async move { run_pod(&mut rt, &c).await }),
                )
                .await;
            let mut rt = n.d.runtime().await.unwrap();
            let name = cfg.metadata.as_ref().unwrap().name.clone();
            let listed: Vec<cri::PodSandbox> = pods(&mut rt)
                .await
                .into_iter()
                .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
                .collect();
            match &res {
                Ok(pod) => {
                    let (pod, cfg) = (pod.clone(), cfg.clone());
                    after_restart(&format!("{case}: a container in the pod"), || {
                        let (mut rt, pod, cfg) = (rt.clone(), pod.clone(), cfg.clone());
                        async move {
                            let c = create_container(
                                &mut rt,
                                &pod,
                                &cfg,
                                container_config("c", &Env::get().busybox, &["sleep", "1000"]),
                            )
                            .await
                            .ok()?;
                            rt.start_container(cri::StartContainerRequest {
                                container_id: c.clone(),
                            })
                            .await
                            .ok()?;
                            let (code, out, _) = exec_sh(&mut rt, &c, "echo ran").await;
                            (code == 0 && out.trim() == "ran").then_some(())
                        }
                    })
                    .await;
                }
                Err(e) => {
                    for p in &listed {
                        assert_eq!(
                            p.state,
                            cri::PodSandboxState::SandboxNotready as i32,
                            "{case}: failed ({e}), yet its pod is ready"
                        );
                    }
                }
            }
            for p in &listed {
                n.remove_pod(&p.id).await;
            }
            back_to(&n.d, &before, &case).await;
            // The same config again (kubelet's retry).
            n.d.respawn(&[]).await;
            let mut rt = n.d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg)
                .await
                .unwrap_or_else(|e| panic!("{case}: the retry: {e}\n{}", n.d.log()));
            sleeper_runs(&mut rt, &pod, &cfg).await;
            n.remove_pod(&pod).await;
            back_to(&n.d, &before, &format!("{case}, after the retry")).await;
        }
    }
    n.stop().await;
}

/// CreateContainer and StartContainer of an ima container with containerd
/// restarted at each step: a container made runs (and is measured: what it
/// executes is in the pod's log); one that failed is removable; nothing is
/// left once it is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_made_across_a_containerd_restart_is_whole_measured_or_removable() {
    let env = Env::get();
    let mut n = Node::new("ctd-create").await;
    let mut cfg = ima(pod_config("ctd-create"));
    own_pids(&mut cfg);
    let mut rt = n.d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let config = |n: &str| container_config(n, &env.busybox, &["sh", "-c", EXECUTES_NEW_FILES]);
    for (i, point) in container_steps().iter().enumerate() {
        let name = format!("c{i}");
        n.d.respawn(&[]).await;
        let before = made(&n.d).await;
        let mut rt = n.d.runtime().await.unwrap();
        let first = created_for(point, &mut rt, &pod, &cfg, config(&name)).await;
        n.hold_at(point).await;
        let mut rt: Rt = n.d.runtime().await.unwrap();
        let (p, c, f) = (pod.clone(), cfg.clone(), first.clone());
        let cc = config(&name);
        let res = n
            .restart_there(
                point,
                tokio::spawn(async move { create_or_start(&mut rt, f, (&p, &c), cc).await }),
            )
            .await;
        let mut rt = n.d.runtime().await.unwrap();
        if let Ok(id) = &res {
            let st = imacri_integration::client::container_status(&mut rt, id).await;
            if st.state == cri::ContainerState::ContainerCreated as i32 {
                after_restart(&format!("{point}: the start"), || {
                    let (mut rt, id) = (rt.clone(), id.clone());
                    async move {
                        rt.start_container(cri::StartContainerRequest { container_id: id })
                            .await
                            .ok()
                            .map(|_| ())
                    }
                })
                .await;
            }
            // What it executes is measured, now that containerd is back.
            let loops = |log: &str| {
                log.lines()
                    .filter(|l| l.contains(id.as_str()) && l.contains("/tmp/l/"))
                    .count()
            };
            let then = loops(&pod_log(&n.d, &pod));
            tokio::time::sleep(Duration::from_secs(2)).await;
            let log = pod_log(&n.d, &pod);
            assert!(
                loops(&log) >= then + 5,
                "{point}: what the container executes is not measured ({then}, then {}):\n{log}\n{}",
                loops(&log),
                n.d.log()
            );
        }
        for c in containers_of(&mut rt, &pod).await {
            n.remove_container(&c.id).await;
        }
        back_to(&n.d, &before, point).await;
        // The same config again, made and started.
        n.d.respawn(&[]).await;
        let mut rt = n.d.runtime().await.unwrap();
        let c = create_container(&mut rt, &pod, &cfg, config(&name))
            .await
            .unwrap_or_else(|e| panic!("{point}: the retry: {e}\n{}", n.d.log()));
        n.retry_runs(&mut rt, &c, point, &before).await;
    }
    n.remove_pod(&pod).await;
    n.stop().await;
}

/// StopPodSandbox, RemovePodSandbox and RemoveContainer with containerd
/// restarted at each of their steps, for each shape of pod: the call
/// finishes or fails; made again once containerd is back, it leaves what
/// was there before (nothing of the pod in containerd, no mount, no file,
/// no address).
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_unmade_across_a_containerd_restart_is_gone_once_asked_again() {
    let mut n = Node::new("ctd-stop").await;
    // With and without pause; plain and ima.
    for (cfg, _) in shapes("ctd-stop").into_iter().skip(1).take(2) {
        for point in UNMAKE_STEPS {
            let case = format!("{}: {point}", cfg.metadata.as_ref().unwrap().name);
            n.d.respawn(&[]).await;
            let before = made(&n.d).await;
            let mut rt = n.d.runtime().await.unwrap();
            let pod = run_pod(&mut rt, &cfg).await.unwrap();
            let c = sleeper_runs(&mut rt, &pod, &cfg).await;
            n.hold_at(point).await;
            let mut rt = n.d.runtime().await.unwrap();
            let (p, cid) = (pod.clone(), c.clone());
            let remove_first = point.starts_with("RemoveContainer");
            let _ = n
                .restart_there(
                    &case,
                    tokio::spawn(async move {
                        if remove_first {
                            rt.remove_container(cri::RemoveContainerRequest { container_id: cid })
                                .await?;
                        }
                        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                            pod_sandbox_id: p.clone(),
                        })
                        .await?;
                        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
                            .await
                    }),
                )
                .await;
            // Made again by the same imacri (the hold holds the first call only).
            n.remove_pod(&pod).await;
            back_to(&n.d, &before, &case).await;
        }
    }
    n.stop().await;
}

async fn busybox_image(d: &Imacri) -> Option<cri::Image> {
    d.images()
        .await
        .unwrap()
        .image_status(cri::ImageStatusRequest {
            image: imacri_integration::client::image(&Env::get().busybox),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
}

async fn remove_image(d: &Imacri, id: &str) {
    d.images()
        .await
        .unwrap()
        .remove_image(cri::RemoveImageRequest {
            image: imacri_integration::client::image(id),
        })
        .await
        .unwrap();
}

/// PullImage with containerd restarted while a blob is written and at the
/// steps after the fetch: the pull succeeds or fails; once made again it has
/// the image, and after the image's removal no blob, ingest or layer of the
/// pull is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_across_a_containerd_restart_leaves_no_blob_or_layer() {
    let env = Env::get();
    let mut n = Node::new("ctd-pull").await;
    let image = |i: &str| imacri_integration::client::image(i);
    if let Some(i) = busybox_image(&n.d).await {
        remove_image(&n.d, &i.id).await;
    }
    let before = content_of(&n.d).await;
    for step in ["writing", "fetched", "unpacked", "registered"] {
        let point = format!("PullImage:{step}");
        n.hold_at(&point).await;
        let mut images = n.d.images().await.unwrap();
        let res = n
            .restart_there(
                &point,
                tokio::spawn(async move {
                    images
                        .pull_image(cri::PullImageRequest {
                            image: image(&Env::get().busybox),
                            ..Default::default()
                        })
                        .await
                }),
            )
            .await;
        let d = &n.d;
        after_restart(&format!("{point}: the pull again"), || async move {
            let mut images = d.images().await.ok()?;
            images
                .pull_image(cri::PullImageRequest {
                    image: image(&env.busybox),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        let i = busybox_image(&n.d)
            .await
            .unwrap_or_else(|| panic!("{point} ({res:?}): no image after the pull made again"));
        remove_image(&n.d, &i.id).await;
        let mut last = String::new();
        for _ in 0..100 {
            let now = content_of(&n.d).await;
            last = format!("{:?}", now.difference(&before).collect::<Vec<_>>());
            if now.is_subset(&before) {
                last.clear();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            last.is_empty(),
            "{point} ({res:?}): left: {last}\n{}",
            n.d.log()
        );
    }
    n.stop().await;
}

/// CreateContainer and StartContainer failing while containerd is down:
/// at a step of CreateContainer before the container's containerd record
/// (because containerd went down), or after it, or at a step of
/// StartContainer (a local failure, made by the test, while containerd is
/// down). The call's clean-up cannot reach containerd either; once it is
/// back, without an imacri restart, what a failed creation made (a snapshot
/// prepared under the creation's lease, the containerd container) goes,
/// and so does a failed start's task: its process does not run on beside
/// the container kubelet starts in its place. The same config is then
/// created and started.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_failed_with_containerd_down_leaves_nothing_once_it_is_back() {
    let env = Env::get();
    let mut n = Node::new("ctd-down").await;
    let mut cfg = ima(pod_config("ctd-down"));
    own_pids(&mut cfg);
    let mut rt = n.d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let config = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);
    for (i, point) in failing_container_steps().into_iter().enumerate() {
        let name = format!("c{i}");
        n.d.respawn(&[]).await;
        let before = made(&n.d).await;
        let mut rt: Rt = n.d.runtime().await.unwrap();
        let started = created_for(&point, &mut rt, &pod, &cfg, config(&name)).await;
        // Before CreateContainer's containerd record, the call fails as
        // containerd is down; after it (and in StartContainer, whose task
        // calls come after a step), only if the test says so.
        let asks = ["lease", "snapshot", "user", "volumes+spec", "nri+rules"]
            .map(|s| format!("CreateContainer:{s}"));
        let fail = [("IMACRI_TEST_FAIL_AT", point.as_str())];
        let fail = if asks.contains(&point) {
            &[][..]
        } else {
            &fail[..]
        };
        n.hold_then(&point, fail).await;
        let mut rt: Rt = n.d.runtime().await.unwrap();
        let (p, c, cc, s) = (pod.clone(), cfg.clone(), config(&name), started.clone());
        let call = tokio::spawn(async move { create_or_start(&mut rt, s, (&p, &c), cc).await });
        let res = n.down_there(&point, call).await;
        assert!(res.is_err(), "{point}: it worked with containerd down");
        let mut rt = n.d.runtime().await.unwrap();
        if let Some(id) = &started {
            let st = imacri_integration::client::container_status(&mut rt, id).await;
            assert_eq!(st.reason, "StartError", "{point}: {st:?}");
            // Its task goes once containerd is back, before anyone
            // removes the container.
            let task = format!("task {id}");
            eventually(
                &format!("{point}: its task deleted"),
                Duration::from_secs(20),
                || {
                    let (d, task) = (&n.d, task.clone());
                    async move { (!made(d).await.objects.contains(&task)).then_some(()) }
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", n.d.log()));
            n.remove_container(id).await;
        }
        assert!(containers_of(&mut rt, &pod).await.is_empty(), "{point}");
        back_to(&n.d, &before, &point).await;
        let c = after_restart(&format!("{point}: the retry"), || {
            let (mut rt, pod, cfg, cc) = (rt.clone(), pod.clone(), cfg.clone(), config(&name));
            async move { create_container(&mut rt, &pod, &cfg, cc).await.ok() }
        })
        .await;
        n.retry_runs(&mut rt, &c, &point, &before).await;
    }
    n.remove_pod(&pod).await;
    n.stop().await;
}
