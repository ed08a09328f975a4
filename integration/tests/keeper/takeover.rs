//! A keeper stalled when imacri starts is taken over, and a takeover cut by a
//! crash is finished by the next imacri.

use super::*;

/// imacri crashes while its fd keeper is stalled (stopped here; hung or
/// swapped out the same), with the keeper's backlog full (`full`: connects
/// time out) or not (they are taken, never answered), and an execution
/// waits on the container's group the stalled keeper holds. The next
/// imacri takes the stalled keeper's fds over (`pidfd_getfd`, by the
/// keeper's ledger of what it holds), kills it and starts another, given
/// everything: the execution is measured, with no gap, and a later crash
/// finds the container measured again. Until 2026-12-06 the next imacri
/// started a second keeper beside the stalled one (a full backlog) or gave
/// up on it (logging a gap and marking the containers anew), and in both
/// cases the stalled keeper kept the old groups: every execution in the
/// pod waited for it, for good.
async fn a_keeper_stalled_at_imacri_start(name: &str, how: Stall, full: bool) {
    use imacri_integration::runner::{go_while_down_with, next_out};
    let (mut d, pod, c, tmp, old) = fresh_runner(name).await;
    let stopped = Stopped::by(nix::unistd::Pid::from_raw(old), how);
    let backlog = full.then(|| fill_backlog(&d.state.join("fdkeeper.sock")));
    d.kill();
    go_while_down_with(&tmp, "1", "with the keeper stalled");
    d.respawn(&[]).await;
    let out = next_out(&tmp, "after the start", &d);
    assert_eq!(out.trim(), "ran", "{out}\n{}", d.log());
    drop(backlog);
    let log = pod_log(&d, &pod);
    assert!(logged(&log, &c, "/tmp/new/1/true", "exec"), "{log}");
    assert!(!has_gap(&log), "{log}\n{}", d.log());
    let now: Vec<i32> = d.keeper_pids().into_iter().filter(|p| *p != old).collect();
    assert!(
        now.len() == 1 && d.log().contains("took over what it held"),
        "keepers {now:?} besides the stalled one {old}\n{}",
        d.log()
    );
    imacri_integration::poll::eventually(
        "the new keeper holding the group",
        Duration::from_secs(10),
        || async {
            let keys = d.keeper_keys();
            keys.contains(&format!("fan:{c}")).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", d.keeper_keys(), d.log()));
    crash_waits_measured(&mut d, (&pod, &c, &tmp), "after the takeover").await;
    old_keeper_dies(&d, stopped, old).await;
    d.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_stalled_at_imacri_start_is_taken_over() {
    a_keeper_stalled_at_imacri_start("ima-keeper-stalled-start", Stall::Stop, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_stalled_at_imacri_start_with_its_backlog_full_is_taken_over() {
    a_keeper_stalled_at_imacri_start("ima-keeper-stalled-start-full", Stall::Stop, true).await;
}

/// Frozen (a v1 freezer cgroup): killed, it lives on until thawed, with
/// its socket taking connections; imacri starts another at once all the
/// same.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_frozen_at_imacri_start_is_taken_over() {
    a_keeper_stalled_at_imacri_start("ima-keeper-frozen-start", Stall::Freeze, false).await;
}

/// A starting imacri crashes in the midst of a takeover: once the
/// stalled keeper's fds are all handed to the keeper started in its place
/// (`IMACRI_TEST_CRASH_AT=FdKeeper:takeover`), or after the first of them
/// (`FdKeeper:handing`), the stalled one not killed yet. The next imacri
/// finishes the takeover (the stalled keeper is named, with its ledger, in
/// `fdkeeper.taken`): what it holds is handed to the keeper, and it is
/// killed. The container's execution, waiting all along, is measured with
/// no gap. With the takeover killing first and handing over after, the
/// crash released the groups (no keeper was left); without the note, the
/// stalled keeper lived on, and the new one lacked what was not handed yet.
#[tokio::test(flavor = "multi_thread")]
async fn an_imacri_crashing_as_it_takes_over_a_stalled_keeper_loses_nothing() {
    crashing_in_a_takeover("ima-keeper-takeover-crash", "FdKeeper:takeover").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imacri_crashing_as_it_hands_a_stalled_keepers_fds_over_loses_nothing() {
    crashing_in_a_takeover("ima-keeper-handing-crash", "FdKeeper:handing").await;
}

async fn crashing_in_a_takeover(name: &str, point: &str) {
    use imacri_integration::runner::{go_while_down_with, next_out};
    let (mut d, pod, c, tmp, old) = fresh_runner(name).await;
    let stopped = Stopped::new(nix::unistd::Pid::from_raw(old));
    d.kill();
    go_while_down_with(&tmp, "1", "with the keeper stalled");
    d.vars = vec![("IMACRI_TEST_CRASH_AT".into(), point.into())];
    let crashed = d.spawn().await;
    assert!(crashed.is_err(), "no crash at {point}\n{}", d.log());
    let keepers = d.keeper_pids();
    assert!(
        keepers.contains(&old) && keepers.len() == 2,
        "keepers {keepers:?} (the stalled one {old})"
    );
    d.respawn(&[]).await;
    let out = next_out(&tmp, "after the crash", &d);
    assert_eq!(out.trim(), "ran", "{out}\n{}", d.log());
    let log = pod_log(&d, &pod);
    assert!(logged(&log, &c, "/tmp/new/1/true", "exec"), "{log}");
    assert!(!has_gap(&log), "{log}\n{}", d.log());
    assert!(
        d.log()
            .contains("finished the takeover the last imacri began"),
        "{}",
        d.log()
    );
    old_keeper_dies(&d, stopped, old).await;
    crash_waits_measured(&mut d, (&pod, &c, &tmp), "after the crashed takeover").await;
    d.stop_leaving_nothing().await;
}
