//! Benchmarks of the fanotify measurement backend (needs root): the cost it
//! adds to an execution, cached and uncached, next to the same execution
//! unmeasured (interleaved, run by run), and cached with the whole
//! benchmark on one vCPU (imacri's own cost, without the two cross-vCPU
//! wake-ups of an idle VM); the map guard's cost per executable
//! mapping next to the same mmap unguarded; a dynamically linked program's
//! execution measured and map-guarded next to the same program neither;
//! what the ima guards add to a pod's start; and first-time hashing
//! throughput next to `openssl speed`.
//! Run: `make bench` (or `target/release/bench_ima`).
//!
//! The measured filesystem is a tmpfs of the benchmark's own (its own
//! superblock, as each container's overlay rootfs is), marked exactly as a
//! container's rootfs is, with the default policy's triggers.

use anyhow::{bail, Context, Result};
use imacri_runtime::integrity::digest::hash_fd;
use imacri_runtime::integrity::engine::{Engine, Measured, DEFAULT_MAX_FILE_SIZE};
use imacri_runtime::integrity::fanotify::{self, Target, Triggers};
use imacri_runtime::integrity::journal::Journal;
use imacri_runtime::integrity::policy::Mode;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod children;
mod mapping;

use children::{exec_child, exec_loop, init_cost, overlay_exec_cost};
use mapping::{
    child_cost, dynamic_exec_cost, filter_and_wait, guard_cost, mapping_cost, mmap_child,
};

const RUNS: usize = 300;

/// Runs of the rows after a quiet spell (each waits 1.3 s).
const IDLE_RUNS: usize = 9;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn exec_once(bin: &Path) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new(bin).status().context("exec")?;
    let d = t.elapsed();
    if !st.success() {
        bail!("{} failed", bin.display());
    }
    Ok(d)
}

/// Runs `f` with every thread of the benchmark (imacri's engine, its
/// reader among them) and so the processes they start on CPU 0, then puts
/// them back on every CPU they had.
fn on_one_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let all = sched_getaffinity(Pid::from_raw(0))?;
    let mut one = CpuSet::new();
    one.set(0)?;
    let tids: Vec<Pid> = std::fs::read_dir("/proc/self/task")?
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .map(Pid::from_raw)
        .collect();
    for t in &tids {
        sched_setaffinity(*t, &one)?;
    }
    let r = f();
    for t in &tids {
        let _ = sched_setaffinity(*t, &all);
    }
    r
}

fn execs(bin: &Path, n: usize) -> Result<Vec<Duration>> {
    (0..n).map(|_| exec_once(bin)).collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mmap-child") => {
            let mode = args[3].strip_prefix("shared-");
            let m = mode.unwrap_or(&args[3]);
            return mmap_child(
                Path::new(&args[2]),
                m != "plain",
                m == "threaded",
                mode.is_some(),
            );
        }
        Some("exec-child") => return exec_child(Path::new(&args[2]), args[3] != "plain"),
        Some("exec-loop") => return exec_loop(Path::new(&args[2])),
        _ => {}
    }
    let dir = tempfile::tempdir()?;
    let fs = dir.path().join("fs");
    std::fs::create_dir_all(&fs)?;
    nix::mount::mount(
        Some("tmpfs"),
        &fs,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=2g"),
    )
    .context("mounting a tmpfs (run as root)")?;
    // The same executable on a tmpfs of its own that nothing marks.
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain)?;
    let res = nix::mount::mount(
        Some("tmpfs"),
        &plain,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .context("mounting a tmpfs")
    .and_then(|()| {
        let unmarked = plain.join("true");
        std::fs::copy("/bin/busybox", &unmarked).context("busybox-static is required")?;
        run(dir.path(), &fs, &unmarked)
    });
    for m in [&fs, &plain] {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    res
}

fn run(dir: &Path, fs: &Path, unmarked: &Path) -> Result<()> {
    // busybox named as its `true` applet: a static 2 MB executable.
    let bin = fs.join("true");
    std::fs::copy("/bin/busybox", &bin).context("busybox-static is required")?;
    let size = std::fs::metadata(&bin)?.len();
    let _ = execs(&bin, 20)?;

    // A 512 MiB executable file that looks like ELF (its execution is
    // measured, then refused by the kernel as no valid ELF).
    let elf = fs.join("big.so");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&elf)?;
        let mut chunk = vec![0x5au8; 1 << 20];
        chunk[..4].copy_from_slice(b"\x7fELF");
        for _ in 0..512 {
            f.write_all(&chunk)?;
            chunk[..4].copy_from_slice(&[0x5a; 4]);
        }
    }
    std::fs::set_permissions(&elf, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // The same CPU load without measurement: hashing it on another thread.
    let base_loaded = {
        let elf = elf.clone();
        let hasher = std::thread::spawn(move || {
            std::fs::File::open(&elf).and_then(|f| hash_fd(f.as_fd()).map(|_| ()))
        });
        std::thread::sleep(Duration::from_millis(20));
        let mut v = Vec::new();
        while !hasher.is_finished() && v.len() < RUNS {
            v.push(exec_once(&bin)?);
        }
        let _ = hasher.join();
        if v.is_empty() {
            f64::NAN
        } else {
            median(v)
        }
    };

    // imacri's runtime threads are at home; the pod's cgroups (as kubelet
    // makes them, in the CPU hierarchies) are where its work is charged once
    // its uncharged budget is spent.
    imacri_runtime::integrity::charge::born_home();
    let pod_cgroup = format!("/imacri-bench-pod-{}", std::process::id());
    let pod_dirs: Vec<_> = ["cpu", "cpuacct"]
        .into_iter()
        .filter_map(|c| imacri_runtime::integrity::charge::dir_in(c, &pod_cgroup))
        .collect();
    for d in &pod_dirs {
        std::fs::create_dir_all(d)?;
    }
    let r = measured_run(
        dir,
        fs,
        unmarked,
        &bin,
        &elf,
        size,
        base_loaded,
        &pod_cgroup,
    );
    // Its threads gone home (the hashing threads linger 200 ms).
    for d in &pod_dirs {
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn measured_run(
    dir: &Path,
    fs: &Path,
    unmarked: &Path,
    bin: &Path,
    elf: &Path,
    size: u64,
    base_loaded: f64,
    pod_cgroup: &str,
) -> Result<()> {
    let (bin, elf) = (bin.to_path_buf(), elf.to_path_buf());
    let journal = Arc::new(Journal::open(&dir.join("journal"), 15, None)?);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(journal, tx, DEFAULT_MAX_FILE_SIZE);
    let rules = imacri_runtime::integrity::policy::parse(
        &imacri_runtime::integrity::setting::PolicyConfig::default()
            .rules
            .join("\n"),
    )?;
    let watch = fanotify::watch(
        &engine,
        Target {
            measured: Arc::new(Measured {
                pod: "bench-pod".into(),
                container: "bench-ctr".into(),
                mode: Mode::Measure,
                allowlist: None,
                charge: imacri_runtime::integrity::charge::Charge::for_cgroup(pod_cgroup),
                quiet: Default::default(),
                no_anonymous_exec: false,
            }),
            root: fs.to_path_buf(),
            triggers: Triggers::from_rules(&rules, |u| u),
            volumes: Vec::new(),
            mounted: Vec::new(),
            init: None,
        },
        None,
    )?;
    let _ = exec_once(&bin)?; // first: hashed and logged
    let hits0 = engine.stats.cache_hits.load(Relaxed);
    let ns0 = engine.stats.hit_ns_total.load(Relaxed);
    // Interleaved with the same file unmeasured (a copy on a tmpfs nothing
    // marks), so the VM's drift between phases does not land in the gap.
    let (mut plain, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plain.push(exec_once(unmarked)?);
        cached.push(exec_once(&bin)?);
    }
    let (base, cached) = (median(plain), median(cached));
    let hits = engine.stats.cache_hits.load(Relaxed) - hits0;
    let handler_us =
        (engine.stats.hit_ns_total.load(Relaxed) - ns0) as f64 / hits.max(1) as f64 / 1e3;

    // The same with the executions and the reader on one vCPU: what
    // imacri's answer costs without the two cross-vCPU wake-ups an idle VM
    // adds to it (the exec wakes the reader, the answer wakes the exec).
    let (one_plain, one_cached) = on_one_cpu(|| {
        let (mut plain, mut cached) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            plain.push(exec_once(unmarked)?);
            cached.push(exec_once(&bin)?);
        }
        Ok((median(plain), median(cached)))
    })?;

    // After a quiet spell the reader has parked (its thread ended): the
    // first execution waits for a thread to start again.
    let (mut idle_plain, mut idle_cached) = (Vec::new(), Vec::new());
    for _ in 0..IDLE_RUNS {
        std::thread::sleep(imacri_runtime::integrity::park::QUIET + Duration::from_millis(300));
        idle_plain.push(exec_once(unmarked)?);
        idle_cached.push(exec_once(&bin)?);
    }
    let (idle_plain, idle_cached) = (median(idle_plain), median(idle_cached));

    // Uncached: a new file (new inode) each time, copied outside the timing.
    let mut unc = Vec::with_capacity(RUNS / 3);
    for i in 0..RUNS / 3 {
        let sub = fs.join(format!("u{i}"));
        std::fs::create_dir_all(&sub)?;
        let b = sub.join("true");
        std::fs::copy(&bin, &b)?;
        unc.push(exec_once(&b)?);
    }
    let uncached = median(unc);

    // A new file after a quiet spell: the reader starts again and a
    // hashing thread starts; neither waits for a move into the pod's
    // cgroups (charge.rs: ~10 ms after a quiet spell) while the pod's
    // uncharged budget lasts.
    let (mut idle_plain_new, mut idle_new) = (Vec::new(), Vec::new());
    for i in 0..IDLE_RUNS {
        let sub = fs.join(format!("idle{i}"));
        std::fs::create_dir_all(&sub)?;
        let b = sub.join("true");
        std::fs::copy(&bin, &b)?;
        std::thread::sleep(imacri_runtime::integrity::park::QUIET + Duration::from_millis(300));
        idle_plain_new.push(exec_once(unmarked)?);
        idle_new.push(exec_once(&b)?);
    }
    let (idle_plain_new, idle_new) = (median(idle_plain_new), median(idle_new));

    // A new file every 100 ms, from a pod that has spent its uncharged
    // budget (charge.rs): its threads work in its cgroups, and one that
    // went home whenever the queue was empty moved back for each file,
    // after ~100 ms without a move (a grace period each).
    let (mut paced_plain, mut paced) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let sub = fs.join(format!("paced{i}"));
        std::fs::create_dir_all(&sub)?;
        let b = sub.join("true");
        std::fs::copy(&bin, &b)?;
        std::thread::sleep(Duration::from_millis(100));
        paced_plain.push(exec_once(unmarked)?);
        paced.push(exec_once(&b)?);
    }
    // The first ones spend what is left of the budget (~3 s of these).
    let (paced_plain, paced) = (
        median(paced_plain.split_off(30)),
        median(paced.split_off(30)),
    );

    // Under load: cached executions while the big file is executed and
    // hashed by a worker; the reader thread must keep answering the cached
    // events meanwhile.
    let opener = {
        let elf = elf.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let _ = Command::new(&elf).status();
            t.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let mut loaded = Vec::new();
    while !opener.is_finished() && loaded.len() < RUNS {
        loaded.push(exec_once(&bin)?);
    }
    let open_wait = opener
        .join()
        .map_err(|_| anyhow::anyhow!("opener panicked"))?;
    let under_load = if loaded.is_empty() {
        f64::NAN
    } else {
        median(loaded.clone())
    };
    // The map guard: a child maps a file of the marked filesystem
    // executable, under a seccomp filter whose notifications the engine
    // answers (cached: the file is measured once), next to the same child
    // without a filter.
    let _ = mapping_cost(&engine, &bin, "guarded")?;
    let map_guarded = mapping_cost(&engine, &bin, "guarded")?;
    let held_before = engine.stats.held_calls.load(Relaxed);
    let map_threaded = mapping_cost(&engine, &bin, "threaded")?;
    // Shared calls, each held still (mapguard/hold.rs).
    let held = engine.stats.held_calls.load(Relaxed) - held_before;
    let map_plain = mapping_cost(&engine, &bin, "plain")?;
    // A shared writable mapping (a database's) of a file that needs no
    // holding (fanotify/held.rs: not overlayfs), which the guard now sees.
    let db = fs.join("shared.db");
    std::fs::write(&db, vec![0u8; 4096])?;
    let shared_plain = mapping_cost(&engine, &db, "shared-plain")?;
    let shared_guarded = mapping_cost(&engine, &db, "shared-guarded")?;
    let shared_threaded = mapping_cost(&engine, &db, "shared-threaded")?;
    // A dynamically linked program: its exec measured, its libraries
    // guarded, next to the same program neither.
    let ls = fs.join("ls");
    let ls_plain = unmarked.with_file_name("ls");
    for dst in [&ls, &ls_plain] {
        std::fs::copy("/usr/bin/ls", dst).context("coreutils' ls")?;
    }
    let _ = child_cost(&engine, "exec-child", &ls, "guarded")?; // first: hashed
    let events0 = engine.stats.events.load(Relaxed);
    let (dyn_plain, dyn_guarded, dyn_floor) = dynamic_exec_cost(&engine, &ls, &ls_plain)?;
    let dyn_events = (engine.stats.events.load(Relaxed) - events0) as f64 / RUNS as f64;
    drop(watch);
    let (ovl_plain, ovl_cached) = overlay_exec_cost(&engine, dir, &rules)?;
    let (guard_ms, seal_ms) = guard_cost()?;
    let (init_direct, init_through, init_deny, ll_plain, ll_restricted) = init_cost(dir, unmarked)?;

    // Hashing throughput through an fd, as the engine reads files.
    let big = fs.join("big");
    let chunk = vec![0x5au8; 1 << 20];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big)?;
        for _ in 0..1024 {
            f.write_all(&chunk)?;
        }
    }
    let f = std::fs::File::open(&big)?;
    let _ = hash_fd(f.as_fd())?;
    let t = Instant::now();
    let (_, n) = hash_fd(f.as_fd())?;
    let gbps = n as f64 / t.elapsed().as_secs_f64() / 1e9;
    let openssl = Command::new("openssl")
        .args([
            "speed", "-evp", "sha256", "-bytes", "16384", "-seconds", "2",
        ])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .rev()
                .find(|l| l.starts_with("sha256"))
                .and_then(|l| l.split_whitespace().last().map(str::to_string))
        })
        .and_then(|k| k.trim_end_matches('k').parse::<f64>().ok())
        .map(|kbps| kbps * 1000.0 / 1e9);

    println!("fanotify measurement benchmark ({RUNS} runs, busybox {size} bytes, medians)");
    println!(
        "{:<44} {:>10}",
        "exec, unmeasured (us)",
        format!("{base:.0}")
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us)",
        "exec, measured, cached (us)",
        format!("{cached:.0}"),
        cached - base
    );
    println!(
        "{:<44} {:>10.1}   (target < 50 us)",
        "  time to decide a cached event (us)", handler_us
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us against {:.0} unmeasured there: imacri's own, no cross-vCPU wake-ups)",
        "exec, measured, cached, all on one vCPU (us)",
        format!("{one_cached:.0}"),
        one_cached - one_plain,
        one_plain
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us against {:.0} unmeasured; park.rs)",
        "exec, cached, first after 1 s idle (us)",
        format!("{idle_cached:.0}"),
        idle_cached - idle_plain,
        idle_plain
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us against {:.0} unmeasured there; window.rs)",
        "exec, measured, cached, on overlayfs (us)",
        format!("{ovl_cached:.0}"),
        ovl_cached - ovl_plain,
        ovl_plain
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us)",
        "exec, measured, first time (us)",
        format!("{uncached:.0}"),
        uncached - base
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us against {:.0} unmeasured; charge.rs)",
        "exec, first time, first after 1 s idle (us)",
        format!("{idle_new:.0}"),
        idle_new - idle_plain_new,
        idle_plain_new
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us against {:.0} unmeasured; hashq.rs)",
        "exec, first time, one per 100 ms, busy (us)",
        format!("{paced:.0}"),
        paced - paced_plain,
        paced_plain
    );
    println!(
        "{:<44} {:>10}",
        "exec, unmeasured, while a core hashes (us)",
        format!("{base_loaded:.0}")
    );
    println!(
        "{:<44} {:>10}   ({} execs while the engine hashed a 512 MiB file for {:.0} ms)",
        "exec, measured, cached, same load (us)",
        format!("{under_load:.0}"),
        loaded.len(),
        open_wait.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>10.1}",
        "mmap(PROT_EXEC) of a file, unguarded (us)", map_plain
    );
    println!(
        "{:<44} {:>10.1}   (+{:.1} us; a dynamic exec maps ~2-5)",
        "mmap(PROT_EXEC), map guard, cached (us)",
        map_guarded,
        map_guarded - map_plain
    );
    println!(
        "{:<44} {:>10.1}   (+{:.1} us; {held} calls held: the other thread stopped during each)",
        "mmap(PROT_EXEC), map guard, 2 threads (us)",
        map_threaded,
        map_threaded - map_plain
    );
    println!(
        "{:<44} {:>10.1}",
        "mmap(MAP_SHARED, RW) of a file, unguarded (us)", shared_plain
    );
    println!(
        "{:<44} {:>10.1}   (+{:.1} us)",
        "mmap(MAP_SHARED, RW), map guard (us)",
        shared_guarded,
        shared_guarded - shared_plain
    );
    println!(
        "{:<44} {:>10.1}   (+{:.1} us: held like the above)",
        "mmap(MAP_SHARED, RW), map guard, 2 threads (us)",
        shared_threaded,
        shared_threaded - shared_plain
    );
    println!(
        "{:<44} {:>10.0}",
        "dynamic exec (ls, 3 libraries), plain (us)", dyn_plain
    );
    println!(
        "{:<44} {:>10.0}   (+{:.0} us; {dyn_events:.1} measured events each)",
        "  measured and map-guarded, cached (us)",
        dyn_guarded,
        dyn_guarded - dyn_plain
    );
    println!(
        "{:<44} {:>10.0}   (+{:.0} us: seccomp notification alone)",
        "  its mappings answered at once (us)",
        dyn_floor,
        dyn_floor - dyn_plain
    );
    println!(
        "{:<44} {:>10.2}",
        "pod start: memfd/userns guards (ms)", guard_ms
    );
    println!(
        "{:<44} {:>10.2}",
        "pod start: pause rootfs seal (ms)", seal_ms
    );
    println!(
        "{:<44} {:>10.0}   (+{:.0} us: each container's and exec's process)",
        "exec through imacri's init (Landlock) (us)",
        init_through,
        init_through - init_direct
    );
    println!(
        "{:<44} {:>10.0}   (+{:.0} us over the init: anonymous_exec = deny)",
        "init, procfs writes denied (us)",
        init_deny,
        init_deny - init_through
    );
    println!(
        "{:<44} {:>10.0}   ({:+.1} us: Landlock's check of each exec)",
        "exec by a process the init restricted (us)",
        ll_restricted,
        ll_restricted - ll_plain
    );
    println!(
        "{:<44} {:>10.2}   (target >= 1 GB/s)",
        "sha256 through the event fd (GB/s)", gbps
    );
    match openssl {
        Some(o) => println!(
            "{:<44} {:>10.2}",
            "openssl speed -evp sha256, 16 KiB (GB/s)", o
        ),
        None => println!("openssl speed: unavailable"),
    }
    Ok(())
}
