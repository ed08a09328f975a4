//! The keeper stalls while imacri runs: waited for once, given what it missed,
//! replaced when it stays stalled.

use super::*;

/// The fd keeper stalled when a container starts (stopped here; at its
/// open-file limit or swapped out the same: it takes nothing), then killed:
/// the start is not failed for it, imacri owes the keeper what it did not
/// take (remembered, and new fds only remembered, without waiting on the
/// stalled keeper again), and the keeper started in its place is given it
/// all, so a later imacri crash finds the container's measurement kept:
/// an execution while imacri is down waits and is measured, no gap. Until
/// 2026-12-06 what a stalled keeper did not take was forgotten, and the
/// container ran unmeasured across a crash for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_keeper_is_given_what_it_missed_once_replaced() {
    use imacri_integration::runner::runner;
    use nix::sys::signal::{kill, Signal};
    let env = Env::get();
    let mut d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, "ima-keeper-stalled").await;
    let keeper = d.keeper_pids();
    assert_eq!(keeper.len(), 1, "{keeper:?}");
    let keeper = nix::unistd::Pid::from_raw(keeper[0]);
    let _stopped = Stopped::new(keeper);
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &env.busybox, "/tmp/new/true", setup).await;
    assert!(
        d.log().contains("did not take an fd"),
        "the stopped keeper took it?\n{}",
        d.log()
    );
    // Killed while stopped: what it was sent and did not read goes with it.
    kill(keeper, Signal::SIGKILL).unwrap();
    imacri_integration::poll::eventually("a new keeper", Duration::from_secs(20), || async {
        d.log()
            .contains("the fd keeper was gone: started again")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    crash_waits_measured(&mut d, (&pod, &c, &tmp), "after the stalled keeper").await;
    d.stop_leaving_nothing().await;
}

/// The fd keeper stalled (stopped here; swapped out or at its limits the
/// same) while an ima container executes new files: the first access that
/// finds it so waits out its timeout, the rest do not wait for it at all
/// (what they hand over or let go of is owed to it). Once it takes things
/// again it is given what it lacks and lets go of what imacri let go of
/// meanwhile (the events answered, their fds: nothing of them stays held,
/// here or there), and an imacri crash after that still finds the
/// container measured. Until 2026-12-06 every answered event waited 2 s
/// for the stalled keeper to drop it, and kept its fd open for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_keeper_slows_no_execution_and_keeps_nothing_stale() {
    use imacri_integration::runner::{go, next_out};
    let (mut d, pod, c, tmp, keeper) = fresh_runner("ima-keeper-stalls").await;
    let imacri = d.pid().unwrap() as i32;
    // What a healthy keeper and imacri hold for an executed file (its
    // watch: a read lease).
    go(&tmp, "0");
    assert_eq!(next_out(&tmp, "with the keeper up", &d).trim(), "ran");
    let normal = (fresh_file_held(imacri, 0), fresh_file_held(keeper, 0));
    let keeper = nix::unistd::Pid::from_raw(keeper);
    let stopped = Stopped::new(keeper);
    let mut took = Vec::new();
    for n in 1..=8 {
        let t0 = std::time::Instant::now();
        go(&tmp, &n.to_string());
        assert_eq!(next_out(&tmp, "with the keeper stalled", &d).trim(), "ran");
        took.push(t0.elapsed());
    }
    // The first finds it stalled (its put, then a revive, time out).
    let slow = took
        .iter()
        .skip(1)
        .filter(|t| **t > Duration::from_millis(800));
    assert_eq!(
        slow.count(),
        0,
        "executions waited for the stalled keeper: {took:?}"
    );
    // Said in imacri's status, for an admin to alert on.
    let keeper_state = || async {
        let mut rt = d.runtime().await.unwrap();
        imacri_integration::client::integrity_stats(&mut rt).await["keeper"].clone()
    };
    let st = keeper_state().await;
    assert_eq!(st["owes"], true, "{st}");
    assert!(st["heldNumbers"].as_u64() >= Some(1), "{st}");
    drop(stopped);
    // Settled within a few rounds (drops made while one ran wait for the
    // next): the keeper holds no answered event, and imacri and the keeper
    // hold for each file what they hold for one executed with the keeper
    // up (the answered events' fds, whose numbers imacri kept while the
    // keeper might hold them, are closed).
    let settled = imacri_integration::poll::eventually(
        "the keeper settled",
        Duration::from_secs(20),
        || async {
            let keys = d.keeper_keys();
            let held: Vec<_> = (1..=8)
                .map(|n| {
                    (
                        fresh_file_held(imacri, n),
                        fresh_file_held(keeper.as_raw(), n),
                    )
                })
                .collect();
            let stale = keys.iter().any(|k| k.starts_with("fev:"));
            let grouped = keys.iter().any(|k| k.starts_with("fan:"));
            (!stale && grouped && held.iter().all(|h| *h == normal)).then_some(())
        },
    )
    .await;
    if let Err(e) = settled {
        let held: Vec<_> = (1..=8)
            .map(|n| {
                (
                    fresh_file_held(imacri, n),
                    fresh_file_held(keeper.as_raw(), n),
                )
            })
            .collect();
        panic!(
            "{e}: keeper keys {:?}; (imacri, keeper) hold {held:?}, not {normal:?}\n{}",
            d.keeper_keys(),
            d.log()
        );
    }
    assert!(
        // Or, on a node slow enough for the stall to pass its limit,
        // replaced and given everything.
        d.log().contains("had not been given everything")
            || d.log().contains("the fd keeper was gone: started again"),
        "{}",
        d.log()
    );
    imacri_integration::poll::eventually(
        "the keeper owing nothing",
        Duration::from_secs(10),
        || async {
            let st = keeper_state().await;
            (st["owes"] == false && st["heldNumbers"] == 0 && st["rounds"].as_u64() >= Some(1))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    crash_waits_measured(&mut d, (&pod, &c, &tmp), "after the keeper resumed").await;
    d.stop_leaving_nothing().await;
}

/// A keeper that stays stalled (stopped here; hung, swapped out for good
/// the same) is replaced: once its rounds have timed out for 15 s, imacri
/// kills it (through a pidfd taken while its connection is up, so no other
/// process can get the signal) and starts another, given everything. The
/// answered events' fds held for the old one are freed, and an imacri crash
/// after that finds the container measured. Until 2026-12-06 a keeper
/// stalled for good left imacri owing for good: no protection against an
/// imacri crash, and one more fd held with every new file executed.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_stalled_for_long_is_replaced() {
    a_keeper_stalled_for_long("ima-keeper-stalls-long", Stall::Stop).await;
}

/// The same, the keeper frozen (a v1 freezer cgroup): killed, it does not
/// die until thawed, and keeps its socket taking connections. imacri lets
/// go of it (its connection and its socket's name) and starts another at
/// once; before, the next rounds found the frozen one again, for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_frozen_for_long_is_replaced() {
    a_keeper_stalled_for_long("ima-keeper-frozen-long", Stall::Freeze).await;
}

async fn a_keeper_stalled_for_long(name: &str, how: Stall) {
    use imacri_integration::runner::{go, next_out};
    let (mut d, pod, c, tmp, old) = fresh_runner(name).await;
    let stopped = Stopped::by(nix::unistd::Pid::from_raw(old), how);
    // Its backlog filled too: imacri's connects then time out, and must not
    // start a second keeper beside the stalled one (which would take the
    // socket while the first still holds the groups).
    let backlog = fill_backlog(&d.state.join("fdkeeper.sock"));
    for n in 1..=3 {
        go(&tmp, &n.to_string());
        assert_eq!(next_out(&tmp, "with the keeper stalled", &d).trim(), "ran");
    }
    imacri_integration::poll::eventually(
        "the keeper replaced",
        Duration::from_secs(60),
        || async {
            let now: Vec<i32> = d.keeper_pids().into_iter().filter(|p| *p != old).collect();
            (now.len() == 1 && d.log().contains("the fd keeper stalled")).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: keepers {:?}\n{}", d.keeper_pids(), d.log()));
    drop(backlog);
    imacri_integration::poll::eventually(
        "the keeper owing nothing",
        Duration::from_secs(10),
        || async {
            let mut rt = d.runtime().await.unwrap();
            let st = imacri_integration::client::integrity_stats(&mut rt).await["keeper"].clone();
            (st["owes"] == false && st["heldNumbers"] == 0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    crash_waits_measured(
        &mut d,
        (&pod, &c, &tmp),
        "after the stalled keeper was replaced",
    )
    .await;
    old_keeper_dies(&d, stopped, old).await;
    d.stop_leaving_nothing().await;
}
