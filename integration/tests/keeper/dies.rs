//! The keeper dies (as it takes a group, an execution, or while imacri takes back
//! its groups): replaced with everything it held; a pod torn down without
//! imacri is let go of.

use super::*;

/// The fd keeper dies (killed, out of memory) while imacri runs: imacri
/// starts a new one at once and gives it every group and listener again,
/// so a later imacri crash still finds the containers' measurement kept:
/// an execution made while imacri is down waits and is measured by the
/// next one, with no gap. (Before, the node silently lost that protection:
/// the execution ran unmeasured at once.)
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_keeper_is_replaced_with_everything_it_held() {
    use imacri_integration::runner::runner;
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-keeper-dies").await;
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &env.busybox, "/tmp/new/true", setup).await;
    d.keeper_replaced().await;

    crash_waits_measured(&mut d, (&pod, &c, &tmp), "after the keeper was replaced").await;
}

/// While imacri is down the keeper's groups fill with the events of closes
/// after writes (nobody reads them), and queued events pin the container's
/// filesystem: if the pod is then torn down without imacri (a node wiped,
/// a test's cleanup), the keeper must still let go of the group once
/// nothing uses that filesystem, and exit, instead of holding it (and the
/// filesystem) for ever.
#[tokio::test(flavor = "multi_thread")]
async fn the_keeper_lets_go_of_a_pod_torn_down_without_imacri() {
    use imacri_integration::client::start_container;
    let env = Env::get();
    let name = format!("keeper-teardown-{:06x}", rand::random::<u32>() % 0xffffff);
    let (sock, containerd) =
        imacri_integration::start_containerd_pid(&env.base, &name, false).unwrap();
    let mut d = Imacri::start_full(
        env,
        &name,
        &["--containerd-address", sock.to_str().unwrap()],
    )
    .await
    .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "keeper-teardown").await;
    let writer = container_config(
        "w",
        &env.busybox,
        &[
            "sh",
            "-c",
            "while true; do echo x > /tmp/f; sleep 0.05; done",
        ],
    );
    start_container(&mut rt, &pod, &cfg, writer).await;
    d.kill();
    // Closes after writes queue up in the kept group meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!d.keeper_pids().is_empty(), "the keeper holds the pod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(containerd as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    imacri_integration::cleanup::reap_run(&env.base.join(&name));
    imacri_integration::poll::eventually("the keeper exits", Duration::from_secs(20), || async {
        d.keeper_pids().is_empty().then_some(())
    })
    .await
    .unwrap();
}

/// The fd keeper dies at the moment it has taken a container's fanotify
/// group from a StartContainer, before imacri's call returned (held there:
/// `IMACRI_TEST_HOLD_AT=FdKeeper:fan`): the keeper imacri starts in its
/// place must be given that group too, or a later imacri crash releases
/// it and the container runs unmeasured while imacri is down (and the next
/// imacri logs a gap). Before 2026-12-06 imacri remembered what it handed
/// over only once the keeper had answered, so the new keeper lacked it.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_a_group_is_replaced_with_it() {
    use imacri_integration::runner::runner;
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-keeper-dies-at-put").await;
    let hold = d.holding_at("FdKeeper:fan").await;
    let rt = d.runtime().await.unwrap();
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (p, c, image) = (pod.clone(), cfg.clone(), env.busybox.clone());
    let start = tokio::spawn(async move {
        let mut rt = rt;
        runner(&mut rt, &p, &c, &image, "/tmp/new/true", setup).await
    });
    d.until_held(&hold).await;
    d.keeper_replaced().await;
    std::fs::remove_file(&hold).unwrap();
    let (c, tmp) = start.await.unwrap();

    crash_waits_measured(
        &mut d,
        (&pod, &c, &tmp),
        "after the keeper died taking the group",
    )
    .await;
    d.stop_leaving_nothing().await;
}

/// The fd keeper dies at the moment it has taken an execution imacri is
/// about to hash (held there: `IMACRI_TEST_HOLD_AT=FdKeeper:fev`): the
/// keeper started in its place is given it too, so when imacri then
/// crashes the next one measures the execution and lets it run, instead of
/// the keeper refusing it as an event nobody took.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_an_execution_is_replaced_with_it() {
    use imacri_integration::runner::{run_across_keeper_and_imacri_deaths, runner};
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-keeper-dies-at-event").await;
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &env.busybox, "/tmp/new/true", setup).await;
    let out = run_across_keeper_and_imacri_deaths(&mut d, &tmp, "", "FdKeeper:fev").await;
    assert_eq!(out.trim(), "ran", "{out}\n{}", d.log());
    let log = pod_log(&d, &pod);
    assert!(logged(&log, &c, "/tmp/new/true", "exec"), "{log}");
    assert!(!has_gap(&log), "{log}");
    let mut rt = d.runtime().await.unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    d.stop_leaving_nothing().await;
}

/// The fd keeper dies while a starting imacri takes back what it held
/// (held right after the keeper handed everything over:
/// `IMACRI_TEST_HOLD_AT=FdKeeper:all`): the keeper started in its place
/// was given only what imacri had remembered by then, not the groups it
/// was taking back. Once taken back they must be given to it, or an imacri
/// crash releases them and the containers run unmeasured while imacri is
/// down (and the next imacri logs a gap), as until 2026-12-06.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_while_imacri_takes_back_its_groups_is_given_them() {
    use imacri_integration::runner::runner;
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-keeper-dies-at-start").await;
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &env.busybox, "/tmp/new/true", setup).await;
    let hold = d.dir.path().join("held");
    let file = hold.to_string_lossy().into_owned();
    let (state, log) = (d.state.clone(), d.dir.path().join("imacri.log"));
    // The keeper dies while the new imacri stands at the step; the test
    // waits for its replacement, then lets the start go on.
    let kill = async {
        imacri_integration::poll::eventually(
            "the keeper's handover",
            Duration::from_secs(60),
            || {
                let hold = hold.clone();
                async move { hold.exists().then_some(()) }
            },
        )
        .await
        .unwrap();
        let old = imacri_integration::keeper_pids_of(&state);
        imacri_integration::kill_keeper_of(&state);
        imacri_integration::poll::eventually("a new keeper", Duration::from_secs(10), || {
            let (state, log, old) = (state.clone(), log.clone(), old.clone());
            async move {
                let now = imacri_integration::keeper_pids_of(&state);
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                (!now.is_empty()
                    && now.iter().all(|p| !old.contains(p))
                    && said.contains("the fd keeper was gone"))
                .then_some(())
            }
        })
        .await
        .unwrap();
        std::fs::remove_file(&hold).unwrap();
    };
    let vars = [
        ("IMACRI_TEST_HOLD_AT", "FdKeeper:all"),
        ("IMACRI_TEST_HOLD_FILE", file.as_str()),
    ];
    tokio::join!(d.respawn(&vars), kill);

    crash_waits_measured(
        &mut d,
        (&pod, &c, &tmp),
        "after the keeper died during imacri's start",
    )
    .await;
    d.stop_leaving_nothing().await;
}
