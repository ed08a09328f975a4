//! The log in pages, for a verifier that has not checked it yet: the whole
//! log with every entry redacted (to build its checkpoint), and one pod's
//! own entries whole (to appraise a history too long for one Quote).

use memchr::memmem::Finder;
use std::path::Path;

use super::window::Window;
use super::{cost, in_chunks, own_lines, redacted, CHUNK, PAGE_BYTES};
use crate::integrity::log::Entry;

/// A page of the log for a verifier building its checkpoint: up to `max`
/// entries (and [`PAGE_BYTES`]) from entry `from` on, every one redacted,
/// and whether more follow (within the first `len` bytes). `start` is a
/// line at or before `from` and its offset, from the journal's index.
pub fn page(
    path: &Path,
    len: u64,
    from: u64,
    max: usize,
    start: (u64, u64),
) -> std::io::Result<(Vec<String>, bool)> {
    let start = match start.0 <= from && Window::open(path, len)?.starts_line(start.1)? {
        true => start,
        false => (0, 0),
    };
    page_in_chunks(path, (start, len), from, (max, PAGE_BYTES), CHUNK)
}

pub(super) fn page_in_chunks(
    path: &Path,
    ((first, at), len): ((u64, u64), u64),
    from: u64,
    (max, max_bytes): (usize, usize),
    chunk: usize,
) -> std::io::Result<(Vec<String>, bool)> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut line = first;
    let mut more = false;
    in_chunks(path, (at, len), chunk, |text| {
        // Whole chunks before the page are only counted.
        let count = memchr::memchr_iter(b'\n', text.as_bytes()).count() as u64;
        if line + count <= from {
            line += count;
            return Ok(true);
        }
        for l in text.lines() {
            line += 1;
            if line <= from {
                continue;
            }
            let shown = redacted(l);
            if full(&out, bytes, &shown, (max, max_bytes)) {
                more = true;
                return Ok(false);
            }
            bytes += cost(&shown);
            out.push(shown);
        }
        Ok(true)
    })?;
    Ok((out, more))
}

/// A page of `pod`'s own entries, whole, for a verifier appraising its
/// history in parts: up to `max` entries (and [`PAGE_BYTES`]) from the
/// pod's `from`-th entry on (counted from its first in the log), and
/// whether more of them follow (within the first `len` bytes). `offsets`:
/// the journal index's offsets of the pod's entries from the `from`-th on
/// (one past the page at least), read when the file still holds the pod's
/// entries there; else the whole file is read.
pub fn pod_page(
    path: &Path,
    len: u64,
    pod: &str,
    from: u64,
    max: usize,
    offsets: Option<&[u64]>,
) -> std::io::Result<(Vec<String>, bool)> {
    if let Some(offs) = offsets {
        if let Some(p) = located_pod_page(path, len, pod, (max, PAGE_BYTES), offs)? {
            return Ok(p);
        }
        tracing::warn!(
            pod,
            path = %path.display(),
            "the measurement log does not hold the pod's entries where imacri wrote them (changed outside imacri?): reading all of it"
        );
    }
    pod_page_in_chunks(path, len, pod, from, (max, PAGE_BYTES), CHUNK)
}

/// Whether a page of `out` (of `bytes`) is full before line `l`.
fn full(out: &[String], bytes: usize, l: &str, (max, max_bytes): (usize, usize)) -> bool {
    out.len() == max || (!out.is_empty() && bytes + cost(l) > max_bytes)
}

/// The page read at the index's offsets; None: a line there is not the
/// pod's entry (the file does not match the index).
pub(super) fn located_pod_page(
    path: &Path,
    len: u64,
    pod: &str,
    limits: (usize, usize),
    offsets: &[u64],
) -> std::io::Result<Option<(Vec<String>, bool)>> {
    let mut w = Window::open(path, len)?;
    let (mut out, mut bytes) = (Vec::new(), 0);
    for &at in offsets {
        let Some(l) = w.line(at)? else {
            return Ok(None);
        };
        if !Entry::parse(&l).is_ok_and(|e| e.pod == pod) {
            return Ok(None);
        }
        if full(&out, bytes, &l, limits) {
            return Ok(Some((out, true)));
        }
        bytes += cost(&l);
        out.push(l);
    }
    Ok(Some((out, false)))
}

pub(super) fn pod_page_in_chunks(
    path: &Path,
    len: u64,
    pod: &str,
    from: u64,
    limits: (usize, usize),
    chunk: usize,
) -> std::io::Result<(Vec<String>, bool)> {
    let needle = format!(" {pod} ");
    let finder = Finder::new(needle.as_bytes());
    let (mut out, mut bytes, mut seen, mut more) = (Vec::new(), 0, 0u64, false);
    in_chunks(path, (0, len), chunk, |text| {
        for l in own_lines(&finder, text, pod) {
            seen += 1;
            if seen <= from {
                continue;
            }
            if full(&out, bytes, l, limits) {
                more = true;
                return Ok(false);
            }
            bytes += cost(l);
            out.push(l.to_string());
        }
        Ok(true)
    })?;
    Ok((out, more))
}
