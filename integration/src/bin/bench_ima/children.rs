//! Costs paid per process: an execution on an overlay root, imacri's init, and
//! the children these benchmarks run.

use super::*;

/// Median microseconds of busybox executed from two overlay filesystems
/// (a container's rootfs is one), one unmeasured and one measured as a
/// container's rootfs (cached), interleaved: an execution of an overlay
/// file is answered with a read lease in place (`fanotify/window.rs`),
/// taken at its first execution.
pub(crate) fn overlay_exec_cost(
    engine: &Arc<Engine>,
    dir: &Path,
    rules: &[imacri_runtime::integrity::policy::Rule],
) -> Result<(f64, f64)> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let layers = dir.join("ovl");
    std::fs::create_dir_all(&layers)?;
    mount(
        Some("tmpfs"),
        &layers,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=16m"),
    )?;
    let merged = layers.join("merged");
    let unmarked = layers.join("unmarked");
    let res = (|| {
        for d in [
            "lower", "upper", "work", "merged", "upper2", "work2", "unmarked",
        ] {
            std::fs::create_dir_all(layers.join(d))?;
        }
        std::fs::copy("/bin/busybox", layers.join("lower/true"))?;
        for (m, upper, work) in [(&merged, "upper", "work"), (&unmarked, "upper2", "work2")] {
            let opts = format!(
                "lowerdir={0}/lower,upperdir={0}/{upper},workdir={0}/{work}",
                layers.display()
            );
            mount(
                Some("overlay"),
                m,
                Some("overlay"),
                MsFlags::empty(),
                Some(opts.as_str()),
            )
            .context("mounting an overlay")?;
        }
        let watch = fanotify::watch(
            engine,
            Target {
                measured: Arc::new(Measured {
                    pod: "bench-pod".into(),
                    container: "bench-ovl".into(),
                    mode: Mode::Measure,
                    allowlist: None,
                    charge: None,
                    quiet: Default::default(),
                    no_anonymous_exec: false,
                }),
                root: merged.clone(),
                triggers: Triggers::from_rules(rules, |u| u),
                volumes: Vec::new(),
                mounted: Vec::new(),
                init: None,
            },
            None,
        )?;
        let (bin, plain_bin) = (merged.join("true"), unmarked.join("true"));
        // The first hashed, its lease taken.
        let _ = execs(&bin, 20)?;
        let _ = execs(&plain_bin, 20)?;
        let (mut plain, mut cached) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            plain.push(exec_once(&plain_bin)?);
            cached.push(exec_once(&bin)?);
        }
        drop(watch);
        Ok((median(plain), median(cached)))
    })();
    for m in [&merged, &unmarked, &layers] {
        let _ = umount2(m, MntFlags::MNT_DETACH);
    }
    res
}

/// imacri's init (`integrity::init`): an exec of `bin` directly, through
/// the init, and through the init told to deny procfs writes (a rule per
/// entry of `/`), interleaved; then execs of `bin` timed by a child running
/// without and under the init's Landlock restriction (`exec-loop`).
pub(crate) fn init_cost(dir: &Path, bin: &Path) -> Result<(f64, f64, f64, f64, f64)> {
    let init = imacri_runtime::integrity::init::install(dir)?;
    let timed = |c: &mut Command| -> Result<Duration> {
        let t = Instant::now();
        let st = c.status()?;
        anyhow::ensure!(st.success(), "{c:?} failed");
        Ok(t.elapsed())
    };
    let (mut direct, mut through, mut deny) = (Vec::new(), Vec::new(), Vec::new());
    let deny_var = imacri_runtime::integrity::init::DENY_PROC_WRITES;
    for _ in 0..RUNS / 3 {
        direct.push(timed(&mut Command::new(bin))?);
        through.push(timed(Command::new(&init).arg(bin))?);
        deny.push(timed(Command::new(&init).arg(bin).env(deny_var, "1"))?);
    }
    let me = std::env::current_exe()?;
    // Each child's samples (ns, one per line), the two kinds of child
    // alternating round by round: the VM's drift between one long loop and
    // the other was as large as the difference (-20 to +61 us).
    let looped = |c: &mut Command, into: &mut Vec<Duration>| -> Result<()> {
        let out = c.output()?;
        anyhow::ensure!(out.status.success(), "{c:?}: {out:?}");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            into.push(Duration::from_nanos(l.trim().parse()?));
        }
        Ok(())
    };
    let (mut plain, mut restricted) = (Vec::new(), Vec::new());
    for _ in 0..EXEC_LOOP_ROUNDS {
        looped(Command::new(&me).arg("exec-loop").arg(bin), &mut plain)?;
        looped(
            Command::new(&init).arg(&me).arg("exec-loop").arg(bin),
            &mut restricted,
        )?;
    }
    Ok((
        median(direct),
        median(through),
        median(deny),
        median(plain),
        median(restricted),
    ))
}

/// Rounds of `exec-loop` children per kind in `init_cost`.
const EXEC_LOOP_ROUNDS: usize = 6;

/// The child of `init_cost`: execs `bin` RUNS/2/EXEC_LOOP_ROUNDS times,
/// prints each duration in nanoseconds.
pub(crate) fn exec_loop(bin: &Path) -> Result<()> {
    for d in execs(bin, RUNS / 2 / EXEC_LOOP_ROUNDS)? {
        println!("{}", d.as_nanos());
    }
    Ok(())
}

/// The child of `dynamic_exec_cost`: runs `file -d /` RUNS/2 times (under
/// the filter when `guarded`) and prints the median in microseconds.
pub(crate) fn exec_child(file: &Path, guarded: bool) -> Result<()> {
    filter_and_wait(guarded)?;
    let mut v = Vec::with_capacity(RUNS / 2);
    for _ in 0..RUNS / 2 {
        let t = Instant::now();
        let st = Command::new(file)
            .args(["-d", "/"])
            .stdout(std::process::Stdio::null())
            .status()?;
        v.push(t.elapsed());
        anyhow::ensure!(st.success(), "{} failed", file.display());
    }
    println!("{:.2}", median(v));
    Ok(())
}
