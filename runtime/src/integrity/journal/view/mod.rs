//! One pod's view of the log for its evidence, read from a snapshot's
//! length in chunks: the log from an entry on (from the first, or from a
//! verifier's checkpoint), other pods' entries redacted, and the pod's own
//! entries. The log of a long epoch is tens of MiB: it is never held whole
//! (it was read into one string per quote, under the writer's lock, on an
//! async worker).

use memchr::memmem::Finder;
use std::fmt::Write;
use std::io::{Read, Seek};
use std::path::Path;

use super::index::Located;
use crate::integrity::log::Entry;
use window::Window;

/// What a pod's evidence holds of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    /// The index of `log`'s first entry in the epoch's log.
    pub log_start: u64,
    pub log: Vec<String>,
    /// The pod's entries from its `pod_log_start`th on.
    pub pod_log: Vec<String>,
    pub pod_log_start: u64,
}

mod page;
mod window;

#[cfg(test)]
use page::{located_pod_page, page_in_chunks, pod_page_in_chunks};
pub use page::{page, pod_page};

const CHUNK: usize = 1 << 20;

/// The largest evidence a Quote carries (the server encodes, `attest`
/// decodes, this much).
pub const MAX_EVIDENCE: usize = 64 * 1024 * 1024;

/// What a view may take of it (the quote and the rest take little).
pub const EVIDENCE_BUDGET: usize = MAX_EVIDENCE - (64 << 10);

/// A page's bytes at most (besides its entry count): entries of the first
/// template carry their paths, up to 16 KiB escaped.
pub const PAGE_BYTES: usize = 16 << 20;

/// A log line's bytes at most (an entry of the first template with a
/// path of 4 KiB, escaped 4 bytes a byte, and its fields).
pub const MAX_LINE: usize = 17 << 10;

/// At most how many bytes of lines [`pod_view`] makes for these arguments:
/// the log from the index's mark before `from` to the end (redacted lines
/// are at most a digest longer: counted a quarter more) and the pod's
/// entries it sends at their longest; without the index, its budget.
pub fn view_bound(len: u64, (from, pod_from): (u64, u64), located: Option<&Located>) -> usize {
    let Some(loc) = located else {
        return EVIDENCE_BUDGET;
    };
    let tail_at = if loc.start.0 <= from { loc.start.1 } else { 0 };
    let tail = usize::try_from(len.saturating_sub(tail_at)).unwrap_or(usize::MAX);
    let own = match usize::try_from(pod_from) {
        Ok(skip) if skip <= loc.own.len() => loc.own.len() - skip,
        _ => loc.own.len(),
    };
    (tail / 4 * 5)
        .saturating_add(own.saturating_mul(MAX_LINE))
        .min(EVIDENCE_BUDGET)
}

/// Why a view could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Past `budget` bytes, `own` of them the pod's own entries.
    #[error("past {budget} bytes ({own} of them the pod's own entries)")]
    TooLarge { budget: usize, own: usize },
}

/// Bytes a line takes in a message (its tag and length besides).
fn cost(l: &str) -> usize {
    l.len() + 4
}

/// The first `len` bytes of the log at `path` as `pod`'s evidence shows
/// them, from entry `from` on and from the pod's own entry `pod_from` on
/// (a verifier's checkpoint, and its appraisal of the pod's first
/// entries; from the first when the log or the pod has fewer), in at most
/// `budget` bytes: a pod that logged long paths could make its own entries
/// alone hundreds of MiB. Read where `located` says when it can be (the
/// journal's index), else from the whole file.
pub fn pod_view(
    path: &Path,
    len: u64,
    pod: &str,
    (from, pod_from): (u64, u64),
    budget: usize,
    located: Option<&Located>,
) -> Result<PodView, ViewError> {
    if let Some(loc) = located {
        if let Some(v) = located_view(path, len, pod, (from, pod_from), budget, loc)? {
            return Ok(v);
        }
        tracing::warn!(
            pod,
            path = %path.display(),
            "the measurement log does not hold the pod's entries where imacri wrote them (changed outside imacri?): reading all of it"
        );
    }
    if located.is_none() {
        tracing::debug!(
            pod,
            "evidence read from the whole log: its index does not locate the pod"
        );
    }
    let whole = Scan {
        pod,
        own: true,
        start: (0, 0),
        budget,
    };
    let (mut view, entries) = whole.run(path, len, Some(from), CHUNK)?;
    if entries < from {
        return Ok(whole.run(path, len, Some(0), CHUNK)?.0);
    }
    if let Ok(skip @ 1..) = usize::try_from(pod_from) {
        if skip <= view.pod_log.len() {
            view.pod_log.drain(..skip);
            view.pod_log_start = pod_from;
        }
    }
    Ok(view)
}

/// The view read at the index's offsets: the pod's own lines (each must
/// still be the pod's entry, starting a line) and the tail from the mark
/// before `from`. None: the file does not match the index.
fn located_view(
    path: &Path,
    len: u64,
    pod: &str,
    (from, pod_from): (u64, u64),
    budget: usize,
    loc: &Located,
) -> Result<Option<PodView>, ViewError> {
    let mut w = Window::open(path, len)?;
    let skip = match usize::try_from(pod_from) {
        Ok(n) if n <= loc.own.len() => n,
        _ => 0,
    };
    let mut pod_log = Vec::with_capacity(loc.own.len() - skip);
    let mut own = 0;
    for &at in &loc.own[skip..] {
        let Some(l) = w.line(at)? else {
            return Ok(None);
        };
        if !Entry::parse(&l).is_ok_and(|e| e.pod == pod) {
            return Ok(None);
        }
        own += cost(&l);
        if own > budget {
            return Err(ViewError::TooLarge { budget, own });
        }
        pod_log.push(l);
    }
    // A start past `from` (a checkpoint of another epoch asks from 0).
    let start = if loc.start.0 <= from {
        loc.start
    } else {
        (0, 0)
    };
    if !w.starts_line(start.1)? {
        return Ok(None);
    }
    let scan = Scan {
        pod,
        own: false,
        start,
        budget: budget - own,
    };
    let (mut view, lines) = scan
        .run(path, len, Some(from), CHUNK)
        .map_err(|e| match e {
            ViewError::TooLarge { .. } => ViewError::TooLarge { budget, own },
            e => e,
        })?;
    if lines < from {
        // Past the log's end: all of it, and all the pod's entries.
        return located_view(path, len, pod, (0, 0), budget, loc);
    }
    view.pod_log = pod_log;
    view.pod_log_start = skip as u64;
    Ok(Some(view))
}

/// The pod's own entries among the first `len` bytes of the log, in at
/// most `budget` bytes: read at the journal index's `offsets` of them when
/// the file still holds them there, else from the whole file.
pub fn pod_entries(
    path: &Path,
    len: u64,
    pod: &str,
    budget: usize,
    offsets: Option<&[u64]>,
) -> Result<Vec<String>, ViewError> {
    if let Some(offs) = offsets {
        match page::located_pod_page(path, len, pod, (usize::MAX, budget), offs)? {
            Some((entries, false)) => return Ok(entries),
            Some((_, true)) => {
                return Err(ViewError::TooLarge {
                    budget,
                    own: budget,
                })
            }
            None => tracing::warn!(
                pod,
                path = %path.display(),
                "the measurement log does not hold the pod's entries where imacri wrote them (changed outside imacri?): reading all of it"
            ),
        }
    }
    let scan = Scan {
        pod,
        own: true,
        start: (0, 0),
        budget,
    };
    Ok(scan.run(path, len, None, CHUNK)?.0.pod_log)
}

/// What a read of the whole log holds at once (a chunk and the line it
/// cut, up to twice a chunk).
pub const SCAN_BYTES: usize = 2 * CHUNK;

/// The bytes `pod`'s own entries take in a message (see [`cost`]) among the
/// first `len` bytes of the log, read a chunk at a time: what GetLog of a
/// pod the index does not locate reserves before it collects them.
pub fn pod_bytes(path: &Path, len: u64, pod: &str) -> std::io::Result<usize> {
    let needle = format!(" {pod} ");
    let finder = Finder::new(needle.as_bytes());
    let mut bytes = 0usize;
    in_chunks(path, (0, len), CHUNK, |text| {
        bytes = own_lines(&finder, text, pod).fold(bytes, |b, l| b.saturating_add(cost(l)));
        Ok(true)
    })?;
    Ok(bytes)
}

/// Reads the log from byte `at` (a line's start) to `len` chunk by chunk,
/// each cut after its last whole line (a last line without its newline is
/// one), and hands them to `f` until it says stop.
fn in_chunks(
    path: &Path,
    (at, len): (u64, u64),
    chunk: usize,
    mut f: impl FnMut(&str) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(at))?;
    let mut file = file.take(len.saturating_sub(at));
    let mut buf: Vec<u8> = Vec::with_capacity(chunk * 2);
    loop {
        let had = buf.len();
        buf.resize(had + chunk, 0);
        let n = file.read(&mut buf[had..])?;
        buf.truncate(had + n);
        if n == 0 {
            if !buf.is_empty() {
                buf.push(b'\n');
                f(utf8(&buf)?)?;
            }
            return Ok(());
        }
        if let Some(end) = memchr::memrchr(b'\n', &buf[had..]).map(|i| had + i) {
            if !f(utf8(&buf[..=end])?)? {
                return Ok(());
            }
            buf.drain(..=end);
        }
    }
}

fn utf8(b: &[u8]) -> std::io::Result<&str> {
    std::str::from_utf8(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Another pod's entry as evidence shows it: digest and path withheld
/// (entries of the first template, which cannot be redacted, whole).
fn redacted(l: &str) -> String {
    match Entry::parse(l) {
        Ok(e) => redact(&e, l),
        Err(_) => l.to_string(),
    }
}

fn redact(e: &Entry, l: &str) -> String {
    let Some(r) = e.redacted() else {
        return l.to_string();
    };
    // Sized from the line (a redacted one is at most a few bytes longer):
    // `to_string` grows its buffer by doubling, and a whole log's view
    // took 1.8 times its text (+102 MiB for a 56 MB view).
    let mut out = String::with_capacity(l.len() + 32);
    let _ = write!(out, "{r}");
    out
}

/// The lines of `text` (whole lines) that are `pod`'s entries. Most lines
/// are other pods': the pod's ID is looked for (SIMD, by `finder`: " ID ")
/// and only the lines holding it are parsed.
fn own_lines<'t>(
    finder: &'t Finder<'t>,
    text: &'t str,
    pod: &'t str,
) -> impl Iterator<Item = &'t str> + 't {
    let mut last = None;
    finder.find_iter(text.as_bytes()).filter_map(move |at| {
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        // The pause container's entries name the pod twice.
        if last == Some(start) {
            return None;
        }
        last = Some(start);
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        let l = &text[start..end];
        Entry::parse(l).is_ok_and(|e| e.pod == pod).then_some(l)
    })
}

/// A read of the log for one pod's view.
struct Scan<'a> {
    pod: &'a str,
    /// Whether the pod's own entries are looked for (not when the index
    /// found them).
    own: bool,
    /// The line the read starts at, and its offset.
    start: (u64, u64),
    budget: usize,
}

impl Scan<'_> {
    /// The view (with the log from `from`, if any) and the number of
    /// entries read (the start's included).
    fn run(
        &self,
        path: &Path,
        len: u64,
        from: Option<u64>,
        chunk: usize,
    ) -> Result<(PodView, u64), ViewError> {
        let needle = format!(" {} ", self.pod);
        let mut cut = Cut {
            pod: self.pod,
            finder: self.own.then(|| Finder::new(needle.as_bytes())),
            from,
            line: self.start.0,
            view: PodView {
                log_start: from.unwrap_or_default(),
                ..Default::default()
            },
            own: 0,
            bytes: 0,
            budget: self.budget,
        };
        in_chunks(path, (self.start.1, len), chunk, |text| Ok(cut.lines(text)))?;
        if cut.bytes > self.budget {
            return Err(ViewError::TooLarge {
                budget: self.budget,
                own: cut.own,
            });
        }
        Ok((cut.view, cut.line))
    }
}

struct Cut<'a> {
    pod: &'a str,
    finder: Option<Finder<'a>>,
    from: Option<u64>,
    /// Entries before this chunk.
    line: u64,
    view: PodView,
    /// Bytes of the pod's own entries, and of the whole view.
    own: usize,
    bytes: usize,
    budget: usize,
}

impl Cut<'_> {
    /// Takes what the view needs from whole lines (`text` ends with '\n');
    /// false once past the budget.
    fn lines(&mut self, text: &str) -> bool {
        if let Some(f) = &self.finder {
            for l in own_lines(f, text, self.pod) {
                self.own += cost(l);
                self.bytes += cost(l);
                self.view.pod_log.push(l.to_string());
            }
        }
        if self.bytes > self.budget {
            return false;
        }
        let count = memchr::memchr_iter(b'\n', text.as_bytes()).count() as u64;
        let first = self.line;
        self.line += count;
        let Some(from) = self.from else {
            return true;
        };
        if self.line <= from {
            return true;
        }
        let skip = from.saturating_sub(first) as usize;
        for l in text.lines().skip(skip) {
            let shown = self.shown(l);
            self.bytes += cost(&shown);
            if self.bytes > self.budget {
                return false;
            }
            self.view.log.push(shown);
        }
        true
    }

    /// A line as the pod's evidence shows it: other pods' entries with
    /// digest and path withheld (entries of the first template, which
    /// cannot be redacted, are shown whole).
    fn shown(&self, l: &str) -> String {
        match Entry::parse(l) {
            Ok(e) if e.pod != self.pod => redact(&e, l),
            _ => l.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
