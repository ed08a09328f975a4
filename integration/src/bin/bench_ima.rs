//! Benchmarks of the fanotify measurement backend (needs root): the cost it
//! adds to an execution, cached and uncached, next to the same execution
//! unmeasured, and first-time hashing throughput next to `openssl speed`.
//! Run: `make bench` (or `target/release/bench-ima`).
//!
//! The measured filesystem is a tmpfs of the benchmark's own (its own
//! superblock, as each container's overlay rootfs is), marked exactly as a
//! container's rootfs is, with the default policy's triggers.

use anyhow::{bail, Context, Result};
use imacri_runtime::integrity::digest::hash_fd;
use imacri_runtime::integrity::engine::{Engine, Measured};
use imacri_runtime::integrity::fanotify::{self, Target, Triggers};
use imacri_runtime::integrity::journal::Journal;
use imacri_runtime::integrity::policy::Mode;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUNS: usize = 300;

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

fn execs(bin: &Path, n: usize) -> Result<Vec<Duration>> {
    (0..n).map(|_| exec_once(bin)).collect()
}

fn main() -> Result<()> {
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
    let res = run(dir.path(), &fs);
    let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
    res
}

fn run(dir: &Path, fs: &Path) -> Result<()> {
    // busybox named as its `true` applet: a static 2 MB executable.
    let bin = fs.join("true");
    std::fs::copy("/bin/busybox", &bin).context("busybox-static is required")?;
    let size = std::fs::metadata(&bin)?.len();
    let _ = execs(&bin, 20)?;
    let base = median(execs(&bin, RUNS)?);

    // A 512 MiB file that looks like ELF (so a FILE_MMAP rule measures it).
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

    let journal = Arc::new(Journal::open(&dir.join("journal"), 15, None)?);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(journal, tx, 2);
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
            }),
            root: fs.to_path_buf(),
            triggers: Triggers::from_rules(&rules, |u| u),
            volumes: Vec::new(),
        },
    )?;
    let _ = exec_once(&bin)?; // first: hashed and logged
    let hits0 = engine.stats.cache_hits.load(Relaxed);
    let ns0 = engine.stats.hit_ns_total.load(Relaxed);
    let cached = median(execs(&bin, RUNS)?);
    let hits = engine.stats.cache_hits.load(Relaxed) - hits0;
    let handler_us =
        (engine.stats.hit_ns_total.load(Relaxed) - ns0) as f64 / hits.max(1) as f64 / 1e3;

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

    // Under load: cached executions while the big file is opened (FILE_MMAP
    // rule) and hashed by a worker; the reader thread must keep answering
    // the cached events meanwhile.
    let opener = {
        let elf = elf.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let _ = std::fs::File::open(&elf);
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
    drop(watch);

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
        "  handler time per cached event (us)", handler_us
    );
    println!(
        "{:<44} {:>10}   (+{:.0} us)",
        "exec, measured, first time (us)",
        format!("{uncached:.0}"),
        uncached - base
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
