//! Events the keeper kept, answered by the next imacri: by their numbers, which
//! its own reader gets too.

use super::*;

/// The runner's program: `stale` runs two new files the hash hook holds
/// (they keep the pod's two hashing threads busy) and then `/bin/sleeper`
/// (the image's, which the enforcing policy allows), so that its event,
/// handed to the keeper, waits to be hashed; `flood` runs 16 new files at
/// once (busybox and a byte: the policy allows none), each saying `RAN`
/// if it ran.
const STALE_OR_FLOOD: &str = "case $x in \
    stale) /tmp/s/sleeper-a/true & /tmp/s/sleeper-b/true & sleep 0.3; /bin/sleeper; wait ;; \
    flood) for i in $(seq 1 16); do ( /tmp/s/sleeper$i/true && echo RAN$i ) & done; wait ;; \
    esac";

/// The new files `STALE_OR_FLOOD` runs.
const NEW_FILES: &str = "for i in -a -b $(seq 1 16); do mkdir -p /tmp/s/sleeper$i && \
    cat /bin/busybox > /tmp/s/sleeper$i/true && echo $i >> /tmp/s/sleeper$i/true && \
    chmod +x /tmp/s/sleeper$i/true; done";

/// The number the last imacri's reader got for the event the keeper
/// `keeper` holds of a file whose path ends with `path` (its ledger says
/// which of its fds holds which key).
fn kept_number_of(d: &Imacri, keeper: i32, path: &str) -> Option<i32> {
    use imacri_runtime::integrity::keeper::{ledger_of, parse_event_key};
    let held = ledger_of(&d.state.join("fdkeeper.sock")).ok()?;
    held.iter().find_map(|(key, fd)| {
        let (_, number, _, _) = parse_event_key(key)?;
        let link = std::fs::read_link(format!("/proc/{keeper}/fd/{fd}")).ok()?;
        link.to_string_lossy().ends_with(path).then_some(number)
    })
}

/// An event the last imacri answered and the keeper did not hear let go
/// of (stalled then: imacri owed it the drop and did not ask) before
/// imacri crashed: the keeper still holds it, and the next imacri, which
/// cannot tell it from one still waiting, answers it by its number. The
/// kernel matches an answer to an event of the group by that number alone,
/// and the new imacri's reader gets the number for an event of its own
/// (here one of 16 new files the pod's enforcing policy refuses): were the
/// old event answered after the reader began, that file would take the
/// old one's "allow" and run unmeasured (measured asynchronously, the
/// kept events let `RAN2` through in this test). Kept events are answered
/// on the thread that takes the group back, before its reader reads.
#[tokio::test(flavor = "multi_thread")]
async fn an_answered_event_the_keeper_still_held_answers_no_other() {
    use imacri_integration::client::{exec_sh, run_pod};
    use imacri_integration::escapes::{ima, node_with};
    use imacri_integration::runner::{go, go_while_down_with, next_out, next_out_within, runner};
    let env = Env::get();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_HASH_DELAY", "sleeper").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("ima-keeper-stale-event", "strict");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let (c, tmp) = runner(&mut rt, &pod, &cfg, &image, STALE_OR_FLOOD, NEW_FILES).await;
    let keeper = d.keeper_pids();
    assert_eq!(keeper.len(), 1, "{keeper:?}");
    let keeper = keeper[0];
    go(&tmp, "stale");
    imacri_integration::poll::eventually(
        "sleeper's event with the keeper",
        Duration::from_secs(10),
        || async { kept_number_of(&d, keeper, "/bin/sleeper").map(|_| ()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", d.keeper_keys(), d.log()));
    let stopped = Stopped::new(nix::unistd::Pid::from_raw(keeper));
    // An access that finds the keeper stalled: imacri owes it from then
    // on, so sleeper's answer asks it no drop.
    let owing = {
        let (mut rt, c) = (rt.clone(), c.clone());
        tokio::spawn(async move {
            exec_sh(
                &mut rt,
                &c,
                "cat /bin/busybox > /tmp/n && chmod +x /tmp/n && /tmp/n true",
            )
            .await
        })
    };
    let out = next_out(&tmp, "sleeper's run", &d);
    assert_eq!(out.lines().last(), Some("ran"), "{out}\n{}", d.log());
    let _ = owing.await;
    d.kill();
    drop(stopped);
    let number = kept_number_of(&d, keeper, "/bin/sleeper")
        .unwrap_or_else(|| panic!("the keeper let sleeper's event go: {:?}", d.keeper_keys()));
    go_while_down_with(&tmp, "flood", "new files while imacri is down");
    d.spawn().await.unwrap();
    // The old event's number, free in the new imacri, is given to the
    // flood's events as they are read; the old event was answered before
    // (hashed on the thread that takes the group back, before its reader
    // reads anything).
    let imacri = d.pid().unwrap();
    let mut reused = None;
    let t0 = std::time::Instant::now();
    while reused.is_none() && t0.elapsed() < Duration::from_secs(10) {
        reused = std::fs::read_link(format!("/proc/{imacri}/fd/{number}"))
            .ok()
            .filter(|l| l.starts_with("/tmp/s/"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = next_out_within(&tmp, "after the flood", &d, Duration::from_secs(90));
    assert!(
        !out.contains("RAN"),
        "a file the policy refuses ran: {out}\n{}",
        d.log()
    );
    assert!(
        reused.is_some(),
        "no event of the flood got number {number}: the test tried nothing\n{}",
        d.log()
    );
    let mut rt = d.runtime().await.unwrap();
    imacri_integration::escapes::stop_pod(&mut rt, &pod).await;
    d.stop_leaving_nothing().await;
}
