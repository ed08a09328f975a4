//! Plugins that crash, hang or fail, and updates nobody asked for.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn crashing_hanging_and_failing_plugins_and_unsolicited_updates() {
    let env = Env::get();
    let mut nri = Nri::new(env);
    // Synchronize in parts of one object each (upstream's `more`).
    let d = Imacri::start_configured(
        env,
        &env.namespace,
        &[],
        &nri.config("")
            .replace("[nri]\n", "[nri]\nsync_message_bytes = 1\n"),
    )
    .await
    .unwrap();
    let (mut rt, pod, cfg) = d.busybox_pod(env, "nri-faults").await;
    let before = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("before", &env.busybox, &["sleep", "1000"]),
    )
    .await;

    // A peer that connects and never registers is dropped after the
    // registration timeout and blocks nobody meanwhile.
    let idle = std::os::unix::net::UnixStream::connect(&nri.socket).unwrap();
    // Synchronize hands the plugin the running container; its unsolicited
    // update lands in the container's cgroup.
    nri.connect(
        env,
        "10",
        "updater",
        &json!({"events_file": nri.events("updater"), "unsolicited_memory": 200u64 << 20}),
    );
    let l = wait_for(&nri.events("updater"), "UpdateContainersResult");
    // Upstream's stub put the parts back together: one Synchronize, all of it.
    let syncs: Vec<&String> = l.iter().filter(|x| x.starts_with("Synchronize ")).collect();
    assert_eq!(syncs.len(), 1, "{l:?}");
    assert!(
        l.iter().any(|x| x.starts_with("SyncContainer before/")),
        "{l:?}"
    );
    d.log_with(&["NRI plugin registered"]).await;
    assert!(
        l.iter().any(|x| x == "UpdateContainersResult 0/<nil>"),
        "{l:?}"
    );
    let limit = sh_ok(&mut rt, &before, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max").await;
    assert_eq!(limit, (200u64 << 20).to_string());

    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("did not register within") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(idle);

    // A plugin that calls back from inside StartContainer to update the
    // very container being started gets a refusal (the container is busy),
    // not a deadlock that would cost it its connection.
    nri.connect(
        env,
        "15",
        "callback",
        &json!({"events_file": nri.events("callback"), "update_on_start": "busy"}),
    );
    start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("busy", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    let l = wait_for(&nri.events("callback"), "UpdateContainersResult");
    assert!(
        l.iter().any(|x| x == "UpdateContainersResult 1/<nil>"),
        "{l:?}"
    );
    assert!(
        !d.log()
            .lines()
            .any(|l| l.contains("15-callback") && l.contains("dropped")),
        "{}",
        d.log()
    );
    nri.stop_last();

    // A plugin failing a request fails it.
    let mut bad = container_config("refused", &env.busybox, &["sleep", "1000"]);
    bad.annotations
        .insert("nri-test/fail".into(), "policy says no".into());
    let e = create_container(&mut rt, &pod, &cfg, bad)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("10-updater") && e.message().contains("policy says no"),
        "{e:?}"
    );

    // A plugin that crashes mid-request and one that hangs are dropped; the
    // requests go on without them.
    nri.connect(
        env,
        "20",
        "crasher",
        &json!({"events_file": nri.events("crasher"), "crash_on": "CreateContainer"}),
    );
    nri.connect(
        env,
        "30",
        "hanger",
        &json!({"events_file": nri.events("hanger"), "hang_on": "StartContainer"}),
    );
    let t = Instant::now();
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("after", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(
        container_status(&mut rt, &c).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    d.log_with(&["NRI plugin dropped"]).await;
    // Later containers do not wait for them at all.
    let t = Instant::now();
    start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("later", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
