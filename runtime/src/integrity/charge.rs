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
//! cgroups while they do: cgroup v1 places threads one by one.
//!
//! A migration costs 30-60 us right after another but 6-16 ms after ~50 ms
//! without one (the kernel waits for an RCU grace period; measured here).
//! Paid at once, it was the first thing an idle pod's next access waited
//! for: a restarted reader's (+6.4 ms on a cached execution) and a new
//! hashing thread's (~10 ms on a new file's). So a thread working for a pod
//! stays where it is while the pod's uncharged budget lasts ([`work_for`]):
//! [`UNCHARGED_BURST`] at once, refilled at [`UNCHARGED_PER_SECOND`], one
//! budget per pod shared by all its threads (a pod's hashing threads start
//! up to five times a second; a budget per thread start would grow with
//! them). A pod that works imacri harder pays: its threads move in, the
//! migration on a busy pod's account, and a throttled pod stalls only its
//! own threads. What a pod can have imacri spend uncharged is so bounded:
//! the burst, the rate, and one piece of work per thread (a batch of
//! events, a call, a 16 MiB hash slice) past the budget, which is then owed.
//!
//! A thread starts in the cgroups of the thread that spawned it: spawners
//! pass their place on ([`Here`]); a thread that serves every pod goes home
//! first thing.
//!
//! cgroup v2 keeps every thread of a process in one cgroup (threaded
//! subtrees aside), so there nothing is charged and `imacri check` says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The controllers a thread's CPU is accounted and limited by.
const CONTROLLERS: [&str; 2] = ["cpu", "cpuacct"];

/// CPU a pod's threads may spend for it outside its cgroups at once: the
/// first executions of a few new programs (sha256 reads ~1.5 GB/s here).
pub const UNCHARGED_BURST: Duration = Duration::from_millis(20);

/// ... and for each second after (0.5% of a core): a pod that asks more of
/// imacri than this has its threads move in.
pub const UNCHARGED_PER_SECOND: Duration = Duration::from_millis(5);

/// Wall-clock time one unit of uncharged CPU takes to earn back.
const REFILL: u64 = 1_000_000_000 / UNCHARGED_PER_SECOND.as_nanos() as u64;

/// The cgroup directories (one per hierarchy the CPU controllers are on)
/// whose `tasks` a thread joins to work for one pod, and the pod's
/// uncharged budget. One per pod: its containers share it.
#[derive(Debug)]
pub struct Charge {
    dirs: Vec<PathBuf>,
    /// When (ns on [`clock`]) the budget is whole again: the generic cell
    /// rate algorithm, one atomic, no lock a throttled thread could hold.
    whole_at: AtomicU64,
}

impl PartialEq for Charge {
    fn eq(&self, other: &Self) -> bool {
        self.dirs == other.dirs
    }
}

impl Eq for Charge {}

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
    Some(Charge::new(dirs))
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
        let dirs: Vec<PathBuf> = h.mounts.iter().map(|(m, _)| m.join(rel)).collect();
        // The pod's containers share one (and so one budget): found by its
        // directories while any of them holds it.
        static ALL: OnceLock<Mutex<HashMap<Vec<PathBuf>, Weak<Charge>>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = all.get(&dirs).and_then(Weak::upgrade) {
            return Some(c);
        }
        all.retain(|_, c| c.strong_count() > 0);
        let c = Arc::new(Charge::new(dirs.clone()));
        all.insert(dirs, Arc::downgrade(&c));
        Some(c)
    }

    fn new(dirs: Vec<PathBuf>) -> Charge {
        Charge {
            dirs,
            whole_at: AtomicU64::new(0),
        }
    }

    /// Takes `spent` (CPU used outside the pod's cgroups) from the pod's
    /// budget: whether any is left. What went past it is owed and earned
    /// back first.
    fn draw(&self, spent: Duration) -> bool {
        self.draw_at(spent, clock())
    }

    fn draw_at(&self, spent: Duration, now: u64) -> bool {
        let cost = u64::try_from(spent.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_mul(REFILL);
        let limit = UNCHARGED_BURST.as_nanos() as u64 * REFILL;
        let mut at = self.whole_at.load(Ordering::Relaxed);
        loop {
            let next = at.max(now).saturating_add(cost);
            match self.whole_at.compare_exchange_weak(
                at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next - now < limit,
                Err(seen) => at = seen,
            }
        }
    }

    fn join(&self, tid: i32) -> std::io::Result<()> {
        MOVES.fetch_add(1, Ordering::Relaxed);
        for d in &self.dirs {
            std::fs::write(d.join("tasks"), tid.to_string())?;
        }
        Ok(())
    }
}

/// Threads moved between cgroups (into a pod's or home), since start.
static MOVES: AtomicU64 = AtomicU64::new(0);

/// How many times a thread of imacri's moved between cgroups: each may
/// have waited for a grace period.
pub fn moves() -> u64 {
    MOVES.load(Ordering::Relaxed)
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

/// Nanoseconds since imacri first asked (monotonic).
fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Place {
    /// Whether it is `charge`'s cgroups (None: imacri's own).
    fn is(&self, charge: Option<&Arc<Charge>>) -> bool {
        match (self, charge) {
            (Place::Home, None) => true,
            (Place::In(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

/// Whether the calling thread is in a pod's cgroups.
fn in_a_pod() -> bool {
    CURRENT.with(|c| matches!(*c.borrow(), Place::In(_)))
}

/// Where a thread works now, as far as it knows.
#[derive(Clone)]
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
    /// The thread's CPU time when it last drew on a budget or came home:
    /// what it used since then was not charged to anyone.
    static DRAWN: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
    /// The pod whose budget the thread drew on last: what it uses until it
    /// draws again or goes home is that pod's.
    static DRAWING: std::cell::RefCell<Option<Arc<Charge>>> = const { std::cell::RefCell::new(None) };
}

/// Where the calling thread is, for a thread it spawns ([`Here::adopt`]):
/// a new thread starts in its spawner's cgroups.
#[derive(Clone)]
pub struct Here(Place);

/// The calling thread's place, to pass to a thread it spawns.
pub fn here() -> Here {
    Here(CURRENT.with(|c| c.borrow().clone()))
}

impl Here {
    /// On the new thread, first thing: it is where its spawner was.
    pub fn adopt(self) {
        CURRENT.with(|c| *c.borrow_mut() = self.0);
    }
}

/// The calling thread is in imacri's own cgroups and was never moved (one
/// of the runtime's threads, which never work for a pod).
pub fn born_home() {
    CURRENT.with(|c| *c.borrow_mut() = Place::Home);
}

/// Moves the calling thread into `charge`'s cgroups (None: imacri's own),
/// unless it is there already. A cgroup that is gone (its pod is being
/// removed) leaves the thread where it is: the work is the pod's last.
fn enter(charge: Option<&Arc<Charge>>) {
    if CURRENT.with(|c| c.borrow().is(charge)) {
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

/// Before a piece of work for `charge`'s pod (a batch of events, a call, a
/// hash slice): the calling thread draws what it used since its last draw
/// from the pod's budget, and moves into the pod's cgroups once that is
/// spent. A thread there stays until it goes home ([`leave`], [`home`]).
pub fn work_for(charge: Option<&Arc<Charge>>) {
    let Some(charge) = charge else { return };
    if CURRENT.with(|c| c.borrow().is(Some(charge))) {
        return;
    }
    // In another pod's cgroups (a thread never serves two pods; were it
    // to, it is charged where it works).
    if in_a_pod() {
        return enter(Some(charge));
    }
    DRAWING.with(|d| {
        let mut d = d.borrow_mut();
        if !d.as_ref().is_some_and(|d| Arc::ptr_eq(d, charge)) {
            *d = Some(charge.clone());
        }
    });
    if !charge.draw(spent_since_drawn()) {
        enter(Some(charge));
    }
}

/// The calling thread's CPU since its last draw (and from now on, since
/// this one).
fn spent_since_drawn() -> Duration {
    let now = thread_cpu();
    now.saturating_sub(DRAWN.with(|d| d.replace(now)))
}

/// Done with a pod's work for now: home, if the calling thread moved into
/// the pod's cgroups (before it parks, so that it takes the parking lot's
/// lock where no pod's CPU limit can stop it); otherwise [`settle`] and
/// stay (a grace period spared).
pub fn leave() {
    if in_a_pod() {
        return home();
    }
    settle();
}

/// What the calling thread used outside a pod's cgroups since its last
/// draw is drawn from the pod's budget: the last piece of work of a thread
/// that ends or waits counts too. Nothing to do in the pod's cgroups.
pub fn settle() {
    if in_a_pod() {
        return;
    }
    if let Some(charge) = DRAWING.with(|d| d.borrow_mut().take()) {
        charge.draw(spent_since_drawn());
    }
}

/// CPU the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills `ts`, a plain struct we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        // Unknown: as if the budget were spent (charged).
        return Duration::MAX;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
    // What it used in the pod's cgroups was charged there.
    DRAWN.with(|d| d.set(thread_cpu()));
    DRAWING.with(|d| d.borrow_mut().take());
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

    #[test]
    fn a_pods_budget_lets_a_burst_through_then_is_owed() {
        let c = Charge::new(Vec::new());
        let ms = |n: u64| Duration::from_millis(n);
        // Wall time that earns `d` of uncharged CPU back.
        let back = |d: Duration| d.as_nanos() as u64 * REFILL;
        let t0 = 10_000_000_000;
        assert!(c.draw_at(Duration::ZERO, t0));
        assert!(c.draw_at(UNCHARGED_BURST - ms(1), t0), "within the burst");
        // 1 ms past it: the next piece of work is charged, and stays so
        // until what went past is earned back.
        assert!(!c.draw_at(ms(2), t0));
        assert!(!c.draw_at(Duration::ZERO, t0 + back(ms(1)) - 1000));
        assert!(c.draw_at(Duration::ZERO, t0 + back(ms(1)) + 1000));
        // Idle long enough: the whole burst again, and no more.
        let later = t0 + 1000 * back(UNCHARGED_BURST);
        assert!(c.draw_at(UNCHARGED_BURST - ms(1), later));
        assert!(!c.draw_at(ms(1) + Duration::from_nanos(1), later));
        // A thread's CPU that cannot be read counts as the whole budget.
        let d = Charge::new(Vec::new());
        assert!(!d.draw_at(Duration::MAX, t0));
    }

    /// Busy for `d` of this thread's CPU.
    fn burn(d: Duration) {
        let until = thread_cpu() + d;
        while thread_cpu() < until {
            std::hint::black_box(0u64.wrapping_add(1));
        }
    }

    /// A thread working for a pod stays at home while the pod's budget
    /// lasts (no migration to wait for), moves in once it is spent, and
    /// the pod's other threads share what is left of it.
    #[test]
    fn a_thread_moves_into_its_pods_cgroup_once_the_budget_is_spent() {
        if available().is_err() {
            return;
        }
        let name = format!("/imacri-charge-budget-{}", std::process::id());
        let (charge, dirs) = made(&name);
        assert!(Arc::ptr_eq(&charge, &Charge::for_cgroup(&name).unwrap()));
        let c = charge.clone();
        let (first, busy) = std::thread::spawn(move || {
            let tid = gettid();
            work_for(Some(&c));
            burn(Duration::from_millis(1));
            let first = lists(&c.dirs[0], tid);
            burn(UNCHARGED_BURST);
            work_for(Some(&c));
            let busy = lists(&c.dirs[0], tid);
            leave();
            (first, (busy, lists(&c.dirs[0], tid)))
        })
        .join()
        .unwrap();
        assert!(!first, "a little work stays uncharged");
        assert_eq!(busy, (true, false), "charged once spent, then home");
        // Earned back; then a thread's last piece of work, done uncharged,
        // is drawn when it is done (leave): the next thread pays for it.
        charge.whole_at.store(0, Ordering::Relaxed);
        let c = charge.clone();
        let last = std::thread::spawn(move || {
            let tid = gettid();
            work_for(Some(&c));
            burn(UNCHARGED_BURST + Duration::from_millis(1));
            leave();
            lists(&c.dirs[0], tid)
        })
        .join()
        .unwrap();
        assert!(!last, "it did its last piece where it was");
        // Another container of the pod: the same budget, spent by it.
        let c = Charge::for_cgroup(&name).unwrap();
        let other = std::thread::spawn(move || {
            work_for(Some(&c));
            listed_then_home(&c)
        })
        .join()
        .unwrap();
        drop(charge);
        removed_after(&dirs, other);
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
