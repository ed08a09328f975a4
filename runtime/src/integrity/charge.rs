//! imacri's work for a pod, charged to the pod's CPU.
//!
//! Kernel IMA hashes a file in the task that executes it, so a pod pays for
//! its own measurements: they count against its CPU limit and are throttled
//! with it. imacri's threads would otherwise do that work in imacri's
//! cgroup, where a pod limited to a tenth of a core could make the node
//! spend cores: a one-byte write to a 4 GiB program and an execution make
//! imacri read 4 GiB; a loop of `mprotect(PROT_EXEC)` keeps a seccomp
//! listener busy; a loop of opens under a policy that measures reads keeps a
//! fanotify reader busy. So the threads that work for one pod (its hashing
//! threads, its containers' seccomp listeners and fanotify readers) join
//! the pod's `cpu` and `cpuacct`
//! cgroups while they do: cgroup v1 places threads one by one. A migration
//! costs 30-60 us right after another but 6-16 ms after ~50 ms without one
//! (the kernel waits for an RCU grace period; measured here), so it is paid
//! when a thread starts working for another pod, not per call, and a
//! reader or listener starting again after a quiet spell (`park.rs`) moves
//! only once it has used [`UNCHARGED`] of CPU ([`enter_when_busy`]): the
//! first event after a pod was idle does not wait for a grace period. A
//! throttled pod stalls only its own threads.
//! A thread starts in the cgroups of the thread that spawned it: a held
//! mapping call's thread, spawned by the listener, works in the pod's; a
//! thread that serves every pod goes home first thing.
//!
//! cgroup v2 keeps every thread of a process in one cgroup (threaded
//! subtrees aside), so there nothing is charged and `imacri check` says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The controllers a thread's CPU is accounted and limited by.
const CONTROLLERS: [&str; 2] = ["cpu", "cpuacct"];

/// The cgroup directories (one per hierarchy the CPU controllers are on)
/// whose `tasks` a thread joins to work for one pod.
#[derive(Debug, PartialEq, Eq)]
pub struct Charge {
    dirs: Vec<PathBuf>,
}

/// Where the CPU controllers' v1 hierarchies are mounted, and imacri's own
/// cgroup in each (where a thread goes home to).
#[derive(Debug)]
struct Hierarchies {
    mounts: Vec<(PathBuf, Vec<String>)>,
    home: Charge,
}

fn hierarchies() -> Option<&'static Hierarchies> {
    static H: OnceLock<Option<Hierarchies>> = OnceLock::new();
    H.get_or_init(|| {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mounts = cpu_mounts(&mountinfo);
        let home = own_dirs(&mounts, &own)?;
        (!mounts.is_empty()).then_some(Hierarchies { mounts, home })
    })
    .as_ref()
}

/// The mount points of v1 hierarchies with a CPU controller, with their
/// controllers (`cpu,cpuacct` may share one).
fn cpu_mounts(mountinfo: &str) -> Vec<(PathBuf, Vec<String>)> {
    let mut out: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let opts = r.nth(1).unwrap_or_default();
        let ctrls: Vec<String> = opts
            .split(',')
            .filter(|o| CONTROLLERS.contains(o))
            .map(str::to_string)
            .collect();
        let Some(point) = left.split_whitespace().nth(4) else {
            continue;
        };
        if ctrls.is_empty() || out.iter().any(|(_, c)| c == &ctrls) {
            continue;
        }
        out.push((PathBuf::from(point), ctrls));
    }
    out
}

/// imacri's own cgroup directory in each CPU hierarchy, from
/// `/proc/self/cgroup` (`<id>:<controllers>:<path>`).
fn own_dirs(mounts: &[(PathBuf, Vec<String>)], own: &str) -> Option<Charge> {
    let dirs = mounts
        .iter()
        .map(|(point, ctrls)| {
            own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, list, path) = (f.next()?, f.next()?, f.next()?);
                let listed: Vec<&str> = list.split(',').collect();
                ctrls
                    .iter()
                    .all(|c| listed.contains(&c.as_str()))
                    .then(|| point.join(path.trim_start_matches('/')))
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Charge { dirs })
}

impl Charge {
    /// The charge for the cgroup at `path` (as in the OCI spec's
    /// cgroupsPath); None where threads cannot be placed (cgroup v2) or
    /// the path is empty.
    pub fn for_cgroup(path: &str) -> Option<Arc<Charge>> {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            return None;
        }
        let h = hierarchies()?;
        Some(Arc::new(Charge {
            dirs: h.mounts.iter().map(|(m, _)| m.join(rel)).collect(),
        }))
    }

    fn join(&self, tid: i32) -> std::io::Result<()> {
        for d in &self.dirs {
            std::fs::write(d.join("tasks"), tid.to_string())?;
        }
        Ok(())
    }
}

/// Whether this node charges pods for imacri's work (for `imacri check`).
pub fn available() -> Result<(), String> {
    match hierarchies() {
        Some(_) => Ok(()),
        None => Err(
            "no cgroup v1 CPU hierarchy (cgroup v2 places a process's threads together): \
             imacri's hashing, seccomp and fanotify answers run on imacri's CPU, not the pods'"
                .into(),
        ),
    }
}

/// Where a thread works now, as far as it knows.
enum Place {
    /// Not known: a new thread starts in its spawner's cgroup, which may
    /// be a pod's (a thread spawned by a listener working for a pod).
    Unknown,
    /// imacri's own cgroups.
    Home,
    /// A pod's.
    In(Arc<Charge>),
}

thread_local! {
    static CURRENT: std::cell::RefCell<Place> = const { std::cell::RefCell::new(Place::Unknown) };
}

/// Moves the calling thread into `charge`'s cgroups (None: imacri's own),
/// unless it is there already. A cgroup that is gone (its pod is being
/// removed) leaves the thread where it is: the work is the pod's last.
pub fn enter(charge: Option<&Arc<Charge>>) {
    let same = CURRENT.with(|c| match (&*c.borrow(), charge) {
        (Place::Home, None) => true,
        (Place::In(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    });
    if same {
        return;
    }
    let Some(h) = hierarchies() else { return };
    let to = charge.map_or(&h.home, |c| c.as_ref());
    match to.join(gettid()) {
        Ok(()) => {
            CURRENT.with(|c| *c.borrow_mut() = charge.map_or(Place::Home, |c| Place::In(c.clone())))
        }
        Err(e) => {
            tracing::debug!(error = %e, dirs = ?to.dirs, "cannot move a thread into a pod's cgroup: its work runs uncharged");
            // Maybe half moved (cpu but not cpuacct): home whole, whatever
            // this thread was in before.
            CURRENT.with(|c| *c.borrow_mut() = Place::Unknown);
            home();
        }
    }
}

/// CPU a reader's or listener's thread may use for its pod (since it
/// started) before it moves into the pod's cgroups. What a pod can have
/// imacri spend uncharged is this per thread start: one a second at most
/// per reader and per listener (`park::QUIET`), 0.2% of a core each.
pub const UNCHARGED: std::time::Duration = std::time::Duration::from_millis(2);

/// [`enter`], once the calling thread has used [`UNCHARGED`] of CPU: a
/// thread that answers a few events and parks again never waits for a
/// migration.
pub fn enter_when_busy(charge: Option<&Arc<Charge>>) {
    let there = CURRENT.with(|c| match (&*c.borrow(), charge) {
        (Place::In(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (Place::Home, None) => true,
        _ => false,
    });
    if there || thread_cpu() < UNCHARGED {
        return;
    }
    enter(charge);
}

/// Home, if the calling thread moved into a pod's cgroups: before it
/// parks, so that it takes the parking lot's lock where no pod's CPU limit
/// can stop it. A thread that never moved stays (a grace period spared).
pub fn leave() {
    if CURRENT.with(|c| matches!(*c.borrow(), Place::In(_))) {
        home();
    }
}

/// The calling thread is in imacri's own cgroups (spawned by a thread that
/// is): [`enter`] need not move it there.
pub fn born_home() {
    CURRENT.with(|c| *c.borrow_mut() = Place::Home);
}

/// CPU the calling thread has used.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills `ts`, a plain struct we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        // Unknown: as if busy (charged, as before).
        return std::time::Duration::MAX;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Back to imacri's own cgroups (a thread done with a pod's work, before
/// it exits: a thread left in a pod's cgroup keeps it from being removed).
pub fn home() {
    if CURRENT.with(|c| matches!(*c.borrow(), Place::Home)) {
        return;
    }
    if let Some(h) = hierarchies() {
        if let Err(e) = h.home.join(gettid()) {
            tracing::warn!(error = %e, "cannot move a thread back to imacri's cgroup");
            return;
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Place::Home);
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments.
    (unsafe { libc::syscall(libc::SYS_gettid) }) as i32
}

/// The directory of the cgroup at `path` in `controller`'s hierarchy
/// (`cpu` or `cpuacct`), for tests and diagnostics.
pub fn dir_in(controller: &str, path: &str) -> Option<PathBuf> {
    let rel = path.trim_start_matches('/');
    hierarchies()?
        .mounts
        .iter()
        .find(|(_, c)| c.iter().any(|c| c == controller))
        .map(|(m, _)| m.join(rel))
}

/// Whether `dir`'s `tasks` lists thread `tid`.
pub fn lists(dir: &Path, tid: i32) -> bool {
    std::fs::read_to_string(dir.join("tasks"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == tid.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
34 25 0:29 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
35 34 0:30 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
38 34 0:33 / /sys/fs/cgroup/cpu,cpuacct rw shared:14 - cgroup cgroup rw,cpu,cpuacct
39 34 0:34 / /sys/fs/cgroup/memory rw shared:15 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_cpu_hierarchies_and_our_place_in_them() {
        let m = cpu_mounts(MOUNTINFO);
        assert_eq!(
            m,
            vec![(
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                vec!["cpu".to_string(), "cpuacct".to_string()]
            )]
        );
        let own = "12:memory:/system.slice/imacri\n4:cpu,cpuacct:/system.slice/imacri\n0::/system.slice/imacri\n";
        assert_eq!(
            own_dirs(&m, own).unwrap().dirs,
            vec![PathBuf::from(
                "/sys/fs/cgroup/cpu,cpuacct/system.slice/imacri"
            )]
        );
        // Separate hierarchies (this machine's kind): one directory each.
        let split = "38 34 0:33 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                     39 34 0:34 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n";
        let m = cpu_mounts(split);
        assert_eq!(m.len(), 2);
        let own = "3:cpuacct:/\n2:cpu:/a\n";
        assert_eq!(
            own_dirs(&m, own).unwrap().dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/a"),
                PathBuf::from("/sys/fs/cgroup/cpuacct/")
            ]
        );
        // cgroup v2 only: nothing to charge.
        assert!(cpu_mounts("35 34 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n").is_empty());
    }

    /// A pod's cgroup made in both CPU hierarchies, and its directories.
    fn made(name: &str) -> (Arc<Charge>, Vec<PathBuf>) {
        let dirs: Vec<PathBuf> = CONTROLLERS.iter().filter_map(|c| dir_in(c, name)).collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        (Charge::for_cgroup(name).unwrap(), dirs)
    }

    /// Whether this thread is listed in each of `charge`'s cgroups now, and
    /// after it went home.
    fn listed_then_home(charge: &Charge) -> (Vec<bool>, Vec<bool>) {
        let tid = gettid();
        let now = charge.dirs.iter().map(|d| lists(d, tid)).collect();
        home();
        (now, charge.dirs.iter().map(|d| lists(d, tid)).collect())
    }

    /// Removes the test's cgroup, then checks the thread was in it and
    /// left it.
    fn removed_after(dirs: &[PathBuf], seen: (Vec<bool>, Vec<bool>)) {
        for d in dirs {
            std::fs::remove_dir(d).unwrap();
        }
        assert!(seen.0.iter().all(|x| *x), "{seen:?}");
        assert!(seen.1.iter().all(|x| !*x), "{seen:?}");
    }

    /// A real thread in a real cgroup (the tests run as root on a v1 CPU
    /// hierarchy; skipped where there is none, which `available` reports).
    #[test]
    fn a_thread_joins_a_pods_cgroup_and_goes_home() {
        if available().is_err() {
            return;
        }
        let name = format!("/imacri-charge-test-{}", std::process::id());
        let (charge, dirs) = made(&name);
        let seen = std::thread::spawn(move || {
            enter(Some(&charge));
            listed_then_home(&charge)
        })
        .join()
        .unwrap();
        removed_after(&dirs, seen);
    }

    /// A pod cgroup half there (one hierarchy's directory missing): the
    /// thread is not left in the other one.
    #[test]
    fn a_half_move_goes_home() {
        if available().is_err() {
            return;
        }
        let name = format!("/imacri-charge-half-{}", std::process::id());
        let charge = Charge::for_cgroup(&name).unwrap();
        if charge.dirs.len() < 2 {
            return; // one hierarchy for both: nothing can be half done
        }
        let first = charge.dirs[0].clone();
        std::fs::create_dir_all(&first).unwrap();
        let f = first.clone();
        let left = std::thread::spawn(move || {
            let tid = gettid();
            enter(Some(&charge));
            lists(&f, tid)
        })
        .join()
        .unwrap();
        std::fs::remove_dir(&first).unwrap();
        assert!(!left);
    }

    /// A thread spawned by one working for a pod starts in the pod's
    /// cgroup (as a held mapping call's thread does): it goes home too.
    #[test]
    fn a_thread_spawned_in_a_pods_cgroup_goes_home() {
        if available().is_err() {
            return;
        }
        let name = format!("/imacri-charge-spawned-{}", std::process::id());
        let (charge, dirs) = made(&name);
        let seen = std::thread::spawn(move || {
            enter(Some(&charge));
            let c = charge.clone();
            let child = std::thread::spawn(move || listed_then_home(&c))
                .join()
                .unwrap();
            home();
            child
        })
        .join()
        .unwrap();
        removed_after(&dirs, seen);
    }
}
