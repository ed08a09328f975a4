//! Accesses in flight while imacri goes down (killed, restarted): an
//! execution or mapping waits for the next imacri, which measures it, or
//! is refused; none runs unmeasured.

use imacri_integration::client::run_pod;
use imacri_integration::escapes::*;
use imacri_integration::runner::*;
use imacri_integration::Env;

/// A runner (`runner.rs`) of `pod` whose own process tree (not an exec)
/// maps the file named on its fifo executable (`go(tmp, path)`).
async fn mapper(
    rt: &mut imacri_integration::client::Rt,
    pod: &str,
    cfg: &imacri_integration::cri::PodSandboxConfig,
    image: &str,
) -> (String, std::path::PathBuf) {
    runner(rt, pod, cfg, image, "escape file-mmap $x", "true").await
}

/// The fd keeper dies at the moment it has taken a starting container's
/// seccomp listener (held there: `IMACRI_TEST_HOLD_AT=FdKeeper:listener`):
/// the keeper started in its place is given it too, so after an imacri
/// crash the container's mappings wait for the next imacri and are
/// measured (the listener's twin of `restart.rs`
/// `a_keeper_dying_as_it_takes_a_group_is_replaced_with_it`).
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_a_listener_is_replaced_with_it() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("keeper-listener", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let hold = d.holding_at("FdKeeper:listener").await;
    let rt = d.runtime().await.unwrap();
    let (p, c) = (pod.clone(), cfg.clone());
    let start = tokio::spawn(async move {
        let mut rt = rt;
        mapper(&mut rt, &p, &c, &image).await
    });
    d.until_held(&hold).await;
    d.keeper_replaced().await;
    std::fs::remove_file(&hold).unwrap();
    let (_, tmp) = start.await.unwrap();
    mapping_waits_across_a_crash(&mut d, &pod, &tmp).await;
}

/// The fd keeper dies at the moment it has taken a mapping imacri is about
/// to hash (held there: `IMACRI_TEST_HOLD_AT=FdKeeper:mev`): the keeper
/// started in its place is given it too, so when imacri then crashes the
/// next one measures the mapping and answers it (it runs, logged) instead
/// of the keeper refusing it as one nobody took.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_a_mapping_is_replaced_with_it() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("keeper-mapping", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let (_, tmp) = mapper(&mut rt, &pod, &cfg, &image).await;
    let out =
        run_across_keeper_and_imacri_deaths(&mut d, &tmp, "/tmp/held.bin", "FdKeeper:mev").await;
    assert!(out.contains("RAN file-mmap"), "{out}\n{}", d.log());
    assert!(
        logged(&log_lines(&d, &pod), "/tmp/held.bin", None, "mmap"),
        "{}",
        d.log()
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// The fd keeper dies at the moment it has taken the read lease on a file
/// a container mapped executable (held there:
/// `IMACRI_TEST_HOLD_AT=FdKeeper:fls`): the keeper started in its place is
/// given it too, so a truncate of that file while imacri is then down
/// (truncate(2) opens nothing: only the lease sees it) waits on the kept
/// lease, and the next imacri logs it (`tomtou`) before the cut lands.
/// Without it the lease went with the crashed imacri and the cut landed
/// unseen.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_a_lease_is_replaced_with_it() {
    use imacri_integration::client::sh_ok;
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("keeper-lease", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    sh_ok(&mut rt, &c, "cp /bin/busybox /tmp/cut.bin").await;
    let hold = d.holding_at("FdKeeper:fls").await;
    let mut rt = d.runtime().await.unwrap();
    // Cut 8 s after its mapping: imacri is down by then.
    let cut = "escape truncate /tmp/cut.bin 8 > /tmp/cut.out 2>&1 &";
    sh_ok(&mut rt, &c, cut).await;
    d.until_held(&hold).await;
    d.keeper_replaced().await;
    std::fs::remove_file(&hold).unwrap();
    let pid = imacri_integration::client::container_info(&mut rt, &c).await["pid"]
        .as_u64()
        .unwrap();
    let out = std::path::PathBuf::from(format!("/proc/{pid}/root/tmp/cut.out"));
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    imacri_integration::poll::eventually("the mapping", std::time::Duration::from_secs(20), || {
        let o = read();
        async move { o.contains("MAPPED").then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", read(), d.log()));
    d.kill();
    // The cut is made while imacri is down, and waits on the lease.
    tokio::time::sleep(std::time::Duration::from_secs(9)).await;
    assert!(!read().contains("CUT"), "the cut did not wait: {}", read());
    d.respawn(&[]).await;
    imacri_integration::poll::eventually(
        "the cut logged",
        std::time::Duration::from_secs(20),
        || {
            let lines = entries_of(&log_lines(&d, &pod), &c);
            async move { logged(&lines, "/tmp/cut.bin", None, "tomtou").then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", read(), d.log()));
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// The fd keeper dies at the moment it has taken a file of the rootfs a
/// container mapped shared and writable (held open for writing so that it
/// cannot be executed while such a mapping may change it; held there:
/// `IMACRI_TEST_HOLD_AT=FdKeeper:fwh`): the keeper started in its place is
/// given it too, so after an imacri crash the file still fails to execute
/// (ETXTBSY). Without it the crash closed the last writer and the file ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_dying_as_it_takes_a_held_writer_is_replaced_with_it() {
    use imacri_integration::client::{exec_sh, sh_ok};
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("keeper-writer", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let hold = d.holding_at("FdKeeper:fwh").await;
    let mut rt = d.runtime().await.unwrap();
    sh_ok(&mut rt, &c, "escape shared-keep /tmp/k > /tmp/k.out 2>&1 &").await;
    d.until_held(&hold).await;
    d.keeper_replaced().await;
    std::fs::remove_file(&hold).unwrap();
    imacri_integration::poll::eventually("the mapping", std::time::Duration::from_secs(20), || {
        let (mut rt, c) = (rt.clone(), c.clone());
        async move {
            let out = sh_ok(&mut rt, &c, "cat /tmp/k.out").await;
            (out == "READY").then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    d.respawn(&[]).await;
    let mut rt = d.runtime().await.unwrap();
    let (_, out, err) = exec_sh(&mut rt, &c, "/tmp/k; echo rc=$?").await;
    assert!(
        format!("{out}{err}").contains("Text file busy"),
        "{out}{err}\n{}",
        d.log()
    );
    stop_pod(&mut rt, &pod).await;
}

/// A process that was running before imacri went away maps a file
/// executable while imacri is down and after it is back: the call waits for
/// the next imacri (the fd keeper held the seccomp listener), which measures
/// it; it neither fails with ENOSYS nor runs unmeasured.
#[tokio::test(flavor = "multi_thread")]
async fn mappings_of_running_processes_wait_for_a_restarted_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("escape-restart", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let (_, tmp) = mapper(&mut rt, &pod, &cfg, &image).await;
    mapping_waits_across_a_crash(&mut d, &pod, &tmp).await;
}

/// The container's own process tree (`mapper`, working in `tmp`) maps a
/// file executable with imacri up, then while imacri is down after a
/// crash: the second call waits for the next imacri (the fd keeper held
/// the seccomp listener), which measures it; it neither fails with ENOSYS
/// nor runs unmeasured.
async fn mapping_waits_across_a_crash(
    d: &mut imacri_integration::Imacri,
    pod: &str,
    tmp: &std::path::Path,
) {
    // Control: with imacri up it maps and runs.
    go(tmp, "/tmp/before.bin");
    assert!(next_out(tmp, "first", d).contains("RAN file-mmap"));

    d.kill();
    go_while_down_with(tmp, "/tmp/after.bin", "the mapping");
    d.respawn(&[]).await;
    let out = next_out(tmp, "after the restart", d);
    assert!(out.contains("RAN file-mmap"), "{out}\n{}", d.log());
    // And it was measured, by the new imacri.
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    let lines = log_lines(d, pod);
    assert!(
        lines.iter().any(|l| l.contains("/tmp/after.bin")
            && l.contains(&code_file)
            && l.ends_with(" mmap")),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, pod).await;
}

/// While imacri is down (killed, or stopped for an upgrade), an ima
/// container's fanotify group stays with the fd keeper: an execution then
/// waits, and the next imacri measures it (measure) or refuses it
/// (enforce). Nothing ran unmeasured, so no gap is logged and fail_mode
/// "closed" has nothing to kill.
#[tokio::test(flavor = "multi_thread")]
async fn executions_wait_for_a_restarted_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "fail_mode = \"closed\"").await;
    for (policy, graceful) in [("measure", false), ("strict", true)] {
        let mut rt = d.runtime().await.unwrap();
        let cfg = ima(&format!("exec-restart-{policy}"), policy);
        let pod = run_pod(&mut rt, &cfg).await.unwrap();
        // A changed busybox: in no policy.
        let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true && echo x >> /tmp/new/true";
        let (c, tmp) = runner(&mut rt, &pod, &cfg, &image, "/tmp/new/true", setup).await;
        let pid = imacri_integration::client::container_info(&mut rt, &c).await["pid"].as_u64();
        drop(rt);
        if graceful {
            d.stop();
        } else {
            d.kill();
        }
        go_while_down(&tmp, policy);
        d.spawn().await.unwrap();
        let out = next_out(&tmp, "after the restart", &d);
        let lines = log_lines(&d, &pod);
        if policy == "measure" {
            assert_eq!(out.trim(), "ran", "{out}");
            assert!(logged(&lines, "/tmp/new/true", None, "exec"), "{lines:#?}");
        } else {
            assert!(out.contains("refused"), "{out}");
            assert!(logged(&lines, "/tmp/new/true", None, "deny"), "{lines:#?}");
        }
        assert!(
            !lines.iter().any(|l| l.ends_with(" gap")),
            "{policy}: a gap was logged though nothing ran unmeasured: {lines:#?}"
        );
        assert!(
            d.log()
                .contains("fanotify group taken back from the fd keeper"),
            "{}",
            d.log()
        );
        let mut rt = d.runtime().await.unwrap();
        let st = imacri_integration::client::container_info(&mut rt, &c).await;
        assert_eq!(
            st["pid"].as_u64(),
            pid,
            "fail_mode closed killed a container that waited"
        );
        stop_pod(&mut rt, &pod).await;
    }
}

/// An event an imacri read but never answered (it died hashing) is refused
/// once it is gone (by the fd keeper, and again by the next imacri before
/// it answers anything): the kernel matches answers by fd number, so an old
/// event must not be answered by a new event's "allow", nor leave its task
/// waiting forever.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_in_flight_at_a_crash_is_refused() {
    let env = Env::get();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_FANOTIFY_STALL", "/tmp/stall/").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("exec-in-flight", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let setup = "mkdir -p /tmp/stall && cp /bin/busybox /tmp/stall/true";
    let (_c, tmp) = runner(&mut rt, &pod, &cfg, &image, "/tmp/stall/true", setup).await;
    drop(rt);
    // Read by imacri and never answered: the execution waits...
    go_while_down(&tmp, "stalled");
    // ...and is refused once that imacri is gone.
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
    let out = next_out(&tmp, "after the restart", &d);
    assert!(out.contains("refused"), "{out}");
    // The next execution of the same file is measured as usual.
    go(&tmp, "");
    let out = next_out(&tmp, "for the second execution", &d);
    assert_eq!(out.trim(), "ran", "{out}");
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&lines, "/tmp/stall/true", None, "exec"),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// The same for an executable mapping: a notification the dead imacri
/// received and never answered is refused (EPERM) instead of leaving its
/// task blocked in mmap until killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_in_flight_at_a_crash_is_refused() {
    let env = Env::get();
    let (mut d, image, _work) =
        node_with(env, "IMACRI_TEST_MAPGUARD_STALL", "/tmp/stall.bin").await;
    let (pod, tmp) = mapping_runner(&d, &image, "map-in-flight", "/tmp/stall.bin").await;
    go_while_down(&tmp, "stalled mapping");
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
    let out = next_out(&tmp, "after the restart", &d);
    assert!(!out.contains("RAN file-mmap"), "{out}");
    assert!(out.contains("refused"), "{out}");
    // Mapping it again is measured and allowed.
    go(&tmp, "");
    let out = next_out(&tmp, "for the second mapping", &d);
    assert!(out.contains("RAN file-mmap"), "{out}");
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// A crash while a mapped file is being hashed: the map guard handed the
/// file to the fd keeper under the notification's id first (the caller
/// shares nothing, so the file cannot change under its fd), so the next
/// imacri measures it and answers the call: the mapping succeeds and is
/// logged. (A call received and not handed over is still refused: above.)
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_hashed_at_a_crash_is_measured_by_the_next_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_HASH_DELAY", "/tmp/slowmap.bin").await;
    let (pod, tmp) = mapping_runner(&d, &image, "map-hashed", "/tmp/slowmap.bin").await;
    go(&tmp, "");
    crash_while_hashing(&mut d, "the mapped file").await;
    let out = next_out(&tmp, "after the restart", &d);
    assert!(out.contains("RAN file-mmap"), "{out}\n{}", d.log());
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&lines, "/tmp/slowmap.bin", None, "mmap"),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// A crash while the kernel's load of a program's ELF interpreter is being
/// hashed: the event handed to the fd keeper says it is an interpreter's,
/// so the next imacri watches the loader for writers as the one that read
/// it would have (`loader.rs`): a rewrite under the program (still
/// running: once nothing maps the loader, a write is no violation) is a
/// `tomtou`.
/// Until 2026-12-04 the next imacri measured it as a plain execution and
/// watched nothing: the rewrite went unlogged.
#[tokio::test(flavor = "multi_thread")]
async fn an_interpreter_hashed_at_a_crash_is_watched_by_the_next_imacri() {
    use imacri_integration::client::{exec_sh, sh_ok};
    let env = Env::get();
    let loader = LOADER.rsplit('/').next().unwrap();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_HASH_DELAY", loader).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("interp-hashed", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    // The container's first dynamic program: its loader is hashed anew
    // (the exec call returns once it runs, so it is not waited for here).
    let bg = {
        let (mut rt, c) = (rt.clone(), c.clone());
        let run = "lazy 60 >/tmp/out 2>&1 </dev/null & echo $! > /tmp/lazy.pid";
        tokio::spawn(async move { exec_sh(&mut rt, &c, run).await })
    };
    crash_while_hashing(&mut d, "the loader").await;
    bg.abort();
    let mut rt = d.runtime().await.unwrap();
    // Running (past its execution; the exec's shell may not read its maps).
    let comm = "cat /proc/$(cat /tmp/lazy.pid)/comm";
    imacri_integration::poll::eventually("lazy runs", std::time::Duration::from_secs(20), || {
        let (mut rt, c) = (rt.clone(), c.clone());
        async move {
            let (_, out, _) = exec_sh(&mut rt, &c, comm).await;
            (out.trim() == "lazy").then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    // Measure mode lets the write through, logged before it lands.
    sh_ok(
        &mut rt,
        &c,
        &format!("printf X | dd of={LOADER} bs=1 seek=4000 conv=notrunc 2>/dev/null; echo done"),
    )
    .await;
    let mine = entries_of(&log_lines(&d, &pod), &c);
    assert!(logged(&mine, "/bin/lazy", None, "exec"), "{mine:#?}");
    assert!(logged(&mine, LOADER, None, "exec"), "{mine:#?}");
    assert!(
        logged(&mine, LOADER, None, "tomtou"),
        "{mine:#?}\n{}",
        d.log()
    );
    sh_ok(&mut rt, &c, "kill $(cat /tmp/lazy.pid)").await;
    stop_pod(&mut rt, &pod).await;
}

/// Kills imacri once `what`'s hashing (made 2 s longer by the test hook)
/// has begun, and starts it again without the hook.
async fn crash_while_hashing(d: &mut imacri_integration::Imacri, what: &str) {
    imacri_integration::poll::eventually(
        &format!("{what}'s hash in flight"),
        std::time::Duration::from_secs(20),
        || async {
            d.log()
                .contains("test hook: hashing 2 s longer")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
}
