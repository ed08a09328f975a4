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

mod dies;
mod events;
mod stalls;
mod takeover;

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
