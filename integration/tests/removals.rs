//! What imacri leaves in containerd when a removal or a creation is cut
//! short: RemoveContainer deletes the container's containerd record and
//! snapshot after its response, so a graceful stop and RemovePodSandbox wait
//! for that, and the next start removes what a crash left (also a container
//! a crash caught between its containerd record and imacri's), touching
//! nothing of another imacri sharing the namespace.

use imacri_integration::client::{create_container, run_pod, start_container};
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use std::time::{Duration, Instant};

fn sleeper(name: &str) -> cri::ContainerConfig {
    container_config(name, &Env::get().busybox, &["sleep", "1000"])
}

/// containerd's objects in `d`'s namespace naming `id`.
async fn objects_of(d: &Imacri, id: &str) -> Vec<String> {
    Env::get()
        .all_objects(&d.namespace)
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.contains(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_inside_create_container_leaves_nothing_after_the_next_start() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    // Another imacri in the same namespace: nothing of its is ours to sweep.
    let other = Imacri::start_full(env, &d.namespace, &[]).await.unwrap();
    let mut ort = other.runtime().await.unwrap();
    let ocfg = pod_config("removals-other");
    let opod = run_pod(&mut ort, &ocfg).await.unwrap();
    let oc = create_container(&mut ort, &opod, &ocfg, sleeper("c"))
        .await
        .unwrap();

    let cfg = pod_config("removals-crash");
    let mut rt = d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    d.respawn(&[("IMACRI_TEST_CRASH_AT", "CreateContainer:containerd")])
        .await;
    let mut rt = d.runtime().await.unwrap();
    let before = env.all_objects(&d.namespace).await.unwrap();
    create_container(&mut rt, &pod, &cfg, sleeper("c"))
        .await
        .expect_err("imacri died inside CreateContainer");
    // containerd holds a container (and its snapshot and creation lease)
    // that no record of imacri's does.
    let after = env.all_objects(&d.namespace).await.unwrap();
    let cut: Vec<&String> = after.iter().filter(|o| !before.contains(o)).collect();
    let orphan = cut
        .iter()
        .find_map(|o| o.strip_prefix("container "))
        .unwrap_or_else(|| panic!("no containerd container from the cut creation: {cut:?}"))
        .to_string();
    assert!(cut.iter().any(|o| o.starts_with("lease ")), "{cut:?}");
    assert!(cut.contains(&&format!("snapshot {orphan}")), "{cut:?}");

    d.respawn(&[]).await;
    let now = env.all_objects(&d.namespace).await.unwrap();
    let left: Vec<&&String> = cut.iter().filter(|o| now.contains(o)).collect();
    assert!(
        left.is_empty(),
        "left after the next start: {left:?}\n{}",
        d.log()
    );
    let theirs = env.all_objects(&d.namespace).await.unwrap();
    for id in [&opod, &oc] {
        assert!(
            theirs.contains(&format!("container {id}")),
            "another imacri's {id} was swept: {theirs:?}"
        );
    }
    // The pod lives on: its container can be made now, under its name.
    let mut rt = d.runtime().await.unwrap();
    let c = create_container(&mut rt, &pod, &cfg, sleeper("c"))
        .await
        .unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: c })
        .await
        .unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    imacri_integration::client::remove_pod(&mut ort, &opod).await;
    assert!(objects_of(&d, &pod).await.is_empty());
    drop(other);
    d.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_containers_records_go_after_the_response_and_are_never_left() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    // Each deletion after a response waits 3 s first.
    d.respawn(&[("IMACRI_TEST_REMOVAL_DELAY", "3000")]).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("removals-later");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let remove = |rt: &mut imacri_integration::client::Rt, id: String| {
        let mut rt = rt.clone();
        async move {
            let t = Instant::now();
            rt.remove_container(cri::RemoveContainerRequest { container_id: id })
                .await
                .unwrap();
            t.elapsed()
        }
    };

    // A graceful stop waits for the deletion (a running container's, whose
    // task goes before the response).
    let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
    let took = remove(&mut rt, a.clone()).await;
    assert!(
        took < Duration::from_secs(2),
        "RemoveContainer took {took:?}"
    );
    assert!(
        !objects_of(&d, &a).await.is_empty(),
        "the hook did not hold the deletion"
    );
    assert!(!objects_of(&d, &a)
        .await
        .iter()
        .any(|o| o.starts_with("task ")));
    d.stop();
    let left = objects_of(&d, &a).await;
    assert!(
        left.is_empty(),
        "a graceful stop left {left:?}\n{}",
        d.log()
    );

    // A crash right after the response: the next start deletes them.
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let b = create_container(&mut rt, &pod, &cfg, sleeper("b"))
        .await
        .unwrap();
    remove(&mut rt, b.clone()).await;
    assert!(!objects_of(&d, &b).await.is_empty());
    d.respawn(&[("IMACRI_TEST_REMOVAL_DELAY", "3000")]).await;
    let left = objects_of(&d, &b).await;
    assert!(
        left.is_empty(),
        "left after a crash and a start: {left:?}\n{}",
        d.log()
    );

    // RemovePodSandbox waits for its containers' deletions: nothing of the
    // pod is in containerd once it returns.
    let mut rt = d.runtime().await.unwrap();
    let c = create_container(&mut rt, &pod, &cfg, sleeper("c"))
        .await
        .unwrap();
    remove(&mut rt, c.clone()).await;
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    let left = objects_of(&d, &c).await;
    assert!(left.is_empty(), "RemovePodSandbox left {left:?}");
    d.stop_leaving_nothing().await;
}

/// RemoveContainer of `id`, then containerd (`pid`) killed at once.
async fn remove_then_kill(rt: &mut imacri_integration::client::Rt, id: &str, pid: u32) {
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// containerd away when a removed container's records are deleted (it
/// restarts): imacri tries again until it is back, so the container's
/// snapshot is not left on disk until imacri's own next start; and a
/// RemovePodSandbox then leaves nothing of the pod.
#[tokio::test(flavor = "multi_thread")]
async fn a_removal_cut_short_by_a_containerd_restart_finishes_when_it_is_back() {
    let env = Env::get();
    let name = format!("removals-ctd-{:06x}", rand::random::<u32>() % 0xffffff);
    let (sock, pid) = imacri_integration::start_containerd_pid(&env.base, &name, false).unwrap();
    let ns = "removals-ctd";
    let mut d = Imacri::start_full(env, ns, &["--containerd-address", sock.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    // Each attempt of a deletion after a response waits 2 s first:
    // containerd is down by the first, and RemovePodSandbox below comes
    // before the second.
    d.respawn(&[("IMACRI_TEST_REMOVAL_DELAY", "2000")]).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("removals-ctd");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = create_container(&mut rt, &pod, &cfg, sleeper("c"))
        .await
        .unwrap();
    let of_c =
        |all: Vec<String>| -> Vec<String> { all.into_iter().filter(|o| o.contains(&c)).collect() };
    remove_then_kill(&mut rt, &c, pid).await;
    d.log_with(&["not deleted yet; retrying"]).await;
    let pid = imacri_integration::start_containerd_pid(&env.base, &name, false)
        .unwrap()
        .1;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = of_c(env.all_objects_at(&sock, ns).await.unwrap());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in containerd 20 s after its restart: {left:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same imacri all along (no start swept it).
    assert!(!d
        .log()
        .contains("removing a containerd container no record holds"));

    // RemovePodSandbox right after containerd is back leaves nothing of
    // the pod, whatever the background retry has done by then.
    let e = create_container(&mut rt, &pod, &cfg, sleeper("e"))
        .await
        .unwrap();
    remove_then_kill(&mut rt, &e, pid).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("not deleted yet; retrying").count() < 2 {
        assert!(Instant::now() < deadline, "no failed deletion of {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = imacri_integration::start_containerd_pid(&env.base, &name, false)
        .unwrap()
        .1;
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    let left: Vec<String> = env
        .all_objects_at(&sock, ns)
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.contains(&e))
        .collect();
    assert!(left.is_empty(), "RemovePodSandbox left {left:?}");
    d.stop();
    let all = env.all_objects_at(&sock, ns).await.unwrap();
    assert!(all.is_empty(), "left in containerd: {all:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The sweep removes only what has no record at all and runs nothing: a
/// container whose record cannot be read, or that runs without one (its
/// record lost some other way), is the user's, and is left as it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_with_an_unreadable_or_lost_record_is_left_alone() {
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = pod_config("removals-kept");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let running = start_container(&mut rt, &pod, &cfg, sleeper("running")).await;
    let unreadable = create_container(&mut rt, &pod, &cfg, sleeper("unreadable"))
        .await
        .unwrap();
    d.kill();
    let records = d.root.join("containers");
    let moved = d.root.join("moved-record");
    std::fs::rename(records.join(&running), &moved).unwrap();
    let state = records.join(&unreadable).join("state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{not json").unwrap();
    d.spawn().await.unwrap();
    let of_running = objects_of(&d, &running).await;
    assert!(
        of_running.contains(&format!("container {running}"))
            && of_running.contains(&format!("task {running}")),
        "a running container without a record was swept: {of_running:?}\n{}",
        d.log()
    );
    let of_unreadable = objects_of(&d, &unreadable).await;
    assert!(
        of_unreadable.contains(&format!("container {unreadable}")),
        "a container with an unreadable record was swept: {of_unreadable:?}\n{}",
        d.log()
    );
    // Both back, and removed with their pod as usual.
    d.kill();
    std::fs::rename(&moved, records.join(&running)).unwrap();
    std::fs::write(&state, good).unwrap();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    d.stop_leaving_nothing().await;
}
