//! The fd keeper, which holds the measurement of ima containers while
//! imacri is down: it dies (replaced, given everything again), stalls
//! (stopped or frozen: imacri waits for it once, then replaces it; a
//! starting imacri takes it over), and lets go of what nothing needs.
//! Each ends with an imacri crash that must find the container measured.

use imacri_integration::cuts::pod_log;
use imacri_integration::runner::{
    crash_waits_measured, entry_logged as logged, has_gap, run_ima_pod as ima_pod,
};
use imacri_integration::{container_config, Env, Imacri};
use std::path::Path;
use std::time::Duration;

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

/// How many fds of process `pid` are open on the runner's fresh file
/// `/tmp/new/<n>/true`.
fn fresh_file_held(pid: i32, n: u32) -> usize {
    let name = format!("/tmp/new/{n}/true");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .filter(|l| l.to_string_lossy().ends_with(&name))
        .count()
}

/// The runner's program executing a new file `/tmp/new/$x/true` (busybox
/// with a byte of its own: hashed anew), or `/tmp/new/true` without `$x`.
const FRESH: &str = "if [ -n \"$x\" ]; then mkdir /tmp/new/$x && cat /bin/busybox > /tmp/new/$x/true \
                     && echo $x >> /tmp/new/$x/true && chmod +x /tmp/new/$x/true && /tmp/new/$x/true; \
                     else /tmp/new/true; fi";

/// An isolated imacri with an ima pod `name` whose runner executes
/// [`FRESH`]: the daemon, the pod, the runner and its `/tmp`, and the pid
/// of the daemon's one fd keeper.
async fn fresh_runner(name: &str) -> (Imacri, String, String, std::path::PathBuf, i32) {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, cfg) = ima_pod(&d, &mut rt, name).await;
    let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true";
    let (c, tmp) =
        imacri_integration::runner::runner(&mut rt, &pod, &cfg, &env.busybox, FRESH, setup).await;
    let keeper = d.keeper_pids();
    assert_eq!(keeper.len(), 1, "{keeper:?}");
    (d, pod, c, tmp, keeper[0])
}

/// Connections to the unix socket `sock` until its listener's backlog is
/// full (a stalled listener accepts none): held until dropped.
fn fill_backlog(sock: &Path) -> Vec<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new(sock).unwrap();
    let mut held = Vec::new();
    for _ in 0..200 {
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let s = socket(AddressFamily::Unix, SockType::SeqPacket, flags, None).unwrap();
        match connect(s.as_raw_fd(), &addr) {
            Ok(()) => held.push(s),
            Err(nix::errno::Errno::EAGAIN) => return held,
            Err(e) => panic!("connecting to {sock:?}: {e}"),
        }
    }
    panic!("the backlog of {sock:?} never filled")
}

/// How a test stalls a process: SIGSTOP, or a (v1) freezer cgroup, in
/// which a SIGKILL waits until the process is thawed.
#[derive(Clone, Copy, Debug)]
enum Stall {
    Stop,
    Freeze,
}

/// A process stalled until this is dropped: a failing test must not leave
/// a stalled keeper behind (it never exits by itself).
struct Stopped {
    pid: nix::unistd::Pid,
    freezer: Option<std::path::PathBuf>,
}

impl Stopped {
    fn new(pid: nix::unistd::Pid) -> Self {
        Self::by(pid, Stall::Stop)
    }

    fn by(pid: nix::unistd::Pid, how: Stall) -> Self {
        let freezer = match how {
            Stall::Stop => {
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                None
            }
            Stall::Freeze => {
                let cg = std::path::PathBuf::from(format!(
                    "/sys/fs/cgroup/freezer/imacri-it-{:08x}",
                    rand::random::<u32>()
                ));
                std::fs::create_dir(&cg).unwrap();
                std::fs::write(cg.join("cgroup.procs"), pid.to_string()).unwrap();
                std::fs::write(cg.join("freezer.state"), "FROZEN").unwrap();
                let t0 = std::time::Instant::now();
                while std::fs::read_to_string(cg.join("freezer.state"))
                    .unwrap()
                    .trim()
                    != "FROZEN"
                {
                    assert!(t0.elapsed() < Duration::from_secs(10), "{pid} not frozen");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some(cg)
            }
        };
        Stopped { pid, freezer }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGCONT);
        let Some(cg) = &self.freezer else { return };
        let _ = std::fs::write(cg.join("freezer.state"), "THAWED");
        let _ = std::fs::write("/sys/fs/cgroup/freezer/cgroup.procs", self.pid.to_string());
        for _ in 0..100 {
            if std::fs::remove_dir(cg).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
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

/// Once `stopped` lets the stalled keeper `old` go on, it is dead (it was
/// killed): it holds nothing a test's daemon could still talk to.
async fn old_keeper_dies(d: &Imacri, stopped: Stopped, old: i32) {
    drop(stopped);
    imacri_integration::poll::eventually(
        "the old keeper dead",
        Duration::from_secs(10),
        || async { (!d.keeper_pids().contains(&old)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: keepers {:?}", d.keeper_pids()));
}

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
