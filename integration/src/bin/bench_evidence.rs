//! Benchmark of what evidence costs for a long epoch: a node's log of
//! 200 000 entries (a 40-entry pod every 5 minutes for 17 days, 64 MB),
//! read back as imacri's start reads it (its index of where entries lie
//! made), read as a Quote reads it for one pod, from a verifier's
//! checkpoint (incremental: at the index's offsets, and from the whole
//! file as when the log was changed outside imacri) and from the first
//! entry (whole), and as a verifier without a checkpoint reads it in pages;
//! and the verifier's cost of building its checkpoint from those pages, and
//! of appraising the long-lived pod's history from pages of its entries.
//! Peak memory is the process's high-water mark, grown by each row in turn
//! (rows run smallest first). One pod in the log is long-lived (one entry in
//! ten, its quota of 20 000): its quote is timed with all its entries and
//! with only those after the ones the verifier appraised.
//! Run: `make bench` (or `target/release/bench_evidence`).

use anyhow::{Context, Result};
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::journal::{view, Epoch, Journal};
use imacri_runtime::integrity::log::{Entry, Event};
use imacri_runtime::integrity::verify::{Checkpoint, Expectations, PodPages};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const ENTRIES: u32 = 200_000;
const PER_POD: u32 = 40;
const PAGE: usize = 10_000;
/// Pods that still exist (the rest of the epoch's were removed).
const LIVE: u32 = 100;

/// The process's peak resident memory so far, KiB.
fn hwm() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmHWM")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A long-lived pod's, one entry in ten of the log (20 000: its quota).
const HEAVY: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

fn pod(i: u32) -> String {
    match i % 10 {
        5 => HEAVY.to_string(),
        _ => format!("{:064x}", i / PER_POD),
    }
}

fn write_log(path: &Path) -> Result<u64> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..ENTRIES {
        let e = Entry::new(
            15,
            [(i % 251) as u8; 32],
            &format!("/usr/lib/x86_64-linux-gnu/lib{i}.so.1"),
            &pod(i),
            &format!("{:064x}", i / (PER_POD / 2) + 7),
            Event::Mmap,
        );
        writeln!(f, "{e}")?;
    }
    f.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// Runs `f` `n` times: the median time and how far the peak memory grew.
fn row<T>(n: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Duration, u64, T)> {
    let before = hwm()?;
    let mut times = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        // One result at a time: the peak is one run's.
        drop(last.take());
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    let out = last.context("no run")?;
    Ok((median(times), hwm()?.saturating_sub(before), out))
}

/// A verifier without a checkpoint: every page asked for (the node's
/// time) and taken into a checkpoint (the verifier's), page by page.
fn from_pages(j: &Journal, path: &Path) -> Result<(Duration, Duration, Checkpoint)> {
    let epoch = Epoch {
        reset_count: Some(1),
        ..Default::default()
    };
    let mut cp = Checkpoint::unverified(&epoch).context("epoch")?;
    let (mut node, mut verifier) = (Duration::ZERO, Duration::ZERO);
    loop {
        let t = Instant::now();
        let (len, start) = j.page_start(cp.entries)?;
        let (page, more) = view::page(path, len, cp.entries, PAGE, start)?;
        node += t.elapsed();
        let t = Instant::now();
        for l in &page {
            cp.take(l).map_err(anyhow::Error::msg)?;
        }
        verifier += t.elapsed();
        if !more {
            return Ok((node, verifier, cp));
        }
    }
}

/// A verifier appraising the long-lived pod's entries before `cp` from
/// pages of them (a new verifier, or a changed policy): the node's time,
/// the verifier's, and the entries appraised.
fn own_pages(j: &Journal, path: &Path, cp: &Checkpoint) -> Result<(Duration, Duration, u64)> {
    // Every digest the log holds is allowed: no violations to keep.
    let policy = Allowlist {
        digests: (0..251u8)
            .map(|b| format!("sha256:{}", hex::encode([b; 32])))
            .collect(),
        ..Default::default()
    };
    let x = Expectations {
        pod_sandbox_id: HEAVY,
        nonce: &[],
        ak_pem: None,
        policy: &policy,
        allow_unanchored: false,
        allow_gaps: false,
        require_no_anonymous_exec: false,
        last_seen: None,
        checkpoint: None,
    };
    let mut pp = PodPages::new(cp, &x, 0).context("the pod's entries")?;
    let (mut node, mut verifier) = (Duration::ZERO, Duration::ZERO);
    while !pp.done() {
        let t = Instant::now();
        let (len, offsets) = j.pod_page_start(HEAVY, pp.next(), PAGE + 1)?;
        let (page, _) = view::pod_page(path, len, HEAVY, pp.next(), PAGE, offsets.as_deref())?;
        node += t.elapsed();
        let t = Instant::now();
        pp.take(&page, "fanotify", &x).map_err(anyhow::Error::msg)?;
        verifier += t.elapsed();
    }
    let t = Instant::now();
    let n = cp.pods[HEAVY].entries;
    pp.finish(cp.clone(), HEAVY).map_err(anyhow::Error::msg)?;
    Ok((node, verifier + t.elapsed(), n))
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let path = Journal::log_path(dir.path());
    let len = write_log(&path)?;
    // The last pod's, checked up to its last 40 entries' start.
    let last = pod(ENTRIES - 1);
    let from = u64::from(ENTRIES - PER_POD);
    println!(
        "evidence of one pod from a log of {ENTRIES} entries ({} MB), {PER_POD} entries a pod, {LIVE} pods alive:",
        len >> 20
    );
    println!(
        "{:<50} {:>10} {:>12} {:>9}",
        "", "median", "peak +MiB", "entries"
    );
    let print = |what: &str, t: Duration, mem: u64, n: usize| {
        println!(
            "{what:<50} {:>8.1}ms {:>12.1} {n:>9}",
            t.as_secs_f64() * 1e3,
            mem as f64 / 1024.0
        )
    };
    let first_live = pod(ENTRIES - LIVE * PER_POD);
    let (t, mem, j) = row(1, || {
        Ok(Journal::open_keeping(dir.path(), 15, None, &|p| {
            p >= first_live.as_str()
        })?)
    })?;
    print(
        "node: log read back at start (index made)",
        t,
        mem,
        ENTRIES as usize,
    );
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let snap = rt.block_on(j.snapshot(vec![], &last, from))?;
    let located = snap.located.context("the index located nothing")?;
    let (t, mem, v) = row(21, || {
        let snap = rt.block_on(j.snapshot(vec![], &last, from))?;
        Ok(view::pod_view(
            &path,
            snap.log_len,
            &last,
            (from, 0),
            view::EVIDENCE_BUDGET,
            snap.located.as_ref(),
        )?)
    })?;
    print(
        "node: Quote from a checkpoint (incremental)",
        t,
        mem,
        v.log.len() + v.pod_log.len(),
    );
    let (t, mem, v) = row(5, || {
        Ok(view::pod_view(
            &path,
            len,
            &last,
            (from, 0),
            view::EVIDENCE_BUDGET,
            None,
        )?)
    })?;
    print(
        "node: the same, log changed outside imacri",
        t,
        mem,
        v.log.len() + v.pod_log.len(),
    );
    // The long-lived pod: all its entries, or only those after the ones
    // the verifier appraised.
    let appraised = (0..ENTRIES - PER_POD).filter(|i| i % 10 == 5).count() as u64;
    for (what, pod_from) in [
        ("node: the same for a pod of 20 000 entries", 0),
        ("  its first entries appraised by the verifier", appraised),
    ] {
        let (t, mem, v) = row(5, || {
            let snap = rt.block_on(j.snapshot(vec![], HEAVY, from))?;
            Ok(view::pod_view(
                &path,
                snap.log_len,
                HEAVY,
                (from, pod_from),
                view::EVIDENCE_BUDGET,
                snap.located.as_ref(),
            )?)
        })?;
        print(what, t, mem, v.log.len() + v.pod_log.len());
    }
    let (_, mem, (node, verifier, cp)) = row(1, || from_pages(&j, &path))?;
    let n = cp.entries as usize;
    print(
        &format!("node: GetLogPage, every page of {PAGE}"),
        node,
        mem,
        n,
    );
    print(
        "verifier: its checkpoint from those pages",
        verifier,
        mem,
        n,
    );
    let (_, mem, (node, verifier, kept)) = row(1, || own_pages(&j, &path, &cp))?;
    print(
        &format!("node: the 20 000-entry pod's, pages of {PAGE}"),
        node,
        mem,
        kept as usize,
    );
    print(
        "verifier: its appraisal from those pages",
        verifier,
        mem,
        kept as usize,
    );
    let whole = Some(&located);
    let (t, mem, v) = row(2, || {
        Ok(view::pod_view(
            &path,
            len,
            &last,
            (0, 0),
            view::EVIDENCE_BUDGET,
            whole,
        )?)
    })?;
    print(
        "node: Quote of the whole log",
        t,
        mem,
        v.log.len() + v.pod_log.len(),
    );
    Ok(())
}
