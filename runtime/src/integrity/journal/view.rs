//! One pod's view of the log for its evidence, read from a snapshot's
//! length in chunks: the log from an entry on (from the first, or from a
//! verifier's checkpoint), other pods' entries redacted, and the pod's own
//! entries. The log of a long epoch is tens of MiB: it is never held whole
//! (it was read into one string per quote, under the writer's lock, on an
//! async worker).

use memchr::memmem::Finder;
use std::io::Read;
use std::path::Path;

use crate::integrity::log::Entry;

/// What a pod's evidence holds of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    /// The index of `log`'s first entry in the epoch's log.
    pub log_start: u64,
    pub log: Vec<String>,
    pub pod_log: Vec<String>,
}

const CHUNK: usize = 1 << 20;

/// The largest evidence a Quote carries (the server encodes, `attest`
/// decodes, this much).
pub const MAX_EVIDENCE: usize = 64 * 1024 * 1024;

/// What a view may take of it (the quote and the rest take little).
pub const EVIDENCE_BUDGET: usize = MAX_EVIDENCE - (64 << 10);

/// A page's bytes at most (besides its entry count): entries of the first
/// template carry their paths, up to 16 KiB escaped.
pub const PAGE_BYTES: usize = 16 << 20;

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
/// them, from entry `from` on (from the first when the log has fewer), in
/// at most `budget` bytes: a pod that logged long paths could make its own
/// entries alone hundreds of MiB.
pub fn pod_view(
    path: &Path,
    len: u64,
    pod: &str,
    from: u64,
    budget: usize,
) -> Result<PodView, ViewError> {
    let (view, entries) = scan(path, len, pod, Some(from), budget, CHUNK)?;
    if entries < from {
        return Ok(scan(path, len, pod, Some(0), budget, CHUNK)?.0);
    }
    Ok(view)
}

/// The pod's own entries among the first `len` bytes of the log, in at
/// most `budget` bytes.
pub fn pod_entries(
    path: &Path,
    len: u64,
    pod: &str,
    budget: usize,
) -> Result<Vec<String>, ViewError> {
    Ok(scan(path, len, pod, None, budget, CHUNK)?.0.pod_log)
}

/// A page of the log for a verifier building its checkpoint: up to `max`
/// entries (and [`PAGE_BYTES`]) from entry `from` on, every one redacted,
/// and whether more follow (within the first `len` bytes).
pub fn page(path: &Path, len: u64, from: u64, max: usize) -> std::io::Result<(Vec<String>, bool)> {
    page_in_chunks(path, len, from, (max, PAGE_BYTES), CHUNK)
}

fn page_in_chunks(
    path: &Path,
    len: u64,
    from: u64,
    (max, max_bytes): (usize, usize),
    chunk: usize,
) -> std::io::Result<(Vec<String>, bool)> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut line = 0u64;
    let mut more = false;
    in_chunks(path, len, chunk, |text| {
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
            let full = out.len() == max || (!out.is_empty() && bytes + cost(&shown) > max_bytes);
            if full {
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

/// Reads the first `len` bytes of the log chunk by chunk, each cut after
/// its last whole line (a last line without its newline is one), and hands
/// them to `f` until it says stop.
fn in_chunks(
    path: &Path,
    len: u64,
    chunk: usize,
    mut f: impl FnMut(&str) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?.take(len);
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
    e.redacted()
        .map_or_else(|| l.to_string(), |r| r.to_string())
}

/// The view (with the log from `from`, if any) and the number of entries
/// read.
fn scan(
    path: &Path,
    len: u64,
    pod: &str,
    from: Option<u64>,
    budget: usize,
    chunk: usize,
) -> Result<(PodView, u64), ViewError> {
    let needle = format!(" {pod} ");
    let mut cut = Cut {
        pod,
        finder: Finder::new(needle.as_bytes()),
        from,
        line: 0,
        view: PodView {
            log_start: from.unwrap_or_default(),
            ..Default::default()
        },
        own: 0,
        bytes: 0,
        budget,
    };
    in_chunks(path, len, chunk, |text| Ok(cut.lines(text)))?;
    if cut.bytes > budget {
        return Err(ViewError::TooLarge {
            budget,
            own: cut.own,
        });
    }
    Ok((cut.view, cut.line))
}

struct Cut<'a> {
    pod: &'a str,
    finder: Finder<'a>,
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
        // Most lines are other pods': the pod's ID is looked for (SIMD)
        // and only the lines holding it are parsed.
        let mut last = None;
        for at in self.finder.find_iter(text.as_bytes()) {
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            // The pause container's entries name the pod twice.
            if last == Some(start) {
                continue;
            }
            last = Some(start);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            let l = &text[start..end];
            if Entry::parse(l).is_ok_and(|e| e.pod == self.pod) {
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
mod tests {
    use super::*;
    use crate::integrity::log::Event;

    fn entry(pod: &str, ctr: &str, path: &str) -> Entry {
        Entry::new(15, [1; 32], path, pod, ctr, Event::Exec)
    }

    /// The view as the whole text shows it, line by line.
    fn plain(text: &str, pod: &str, from: u64) -> PodView {
        let lines: Vec<&str> = text.lines().collect();
        let from = if (lines.len() as u64) < from { 0 } else { from };
        let shown = |l: &str| match Entry::parse(l) {
            Ok(e) if e.pod != pod => e.redacted().unwrap().to_string(),
            _ => l.to_string(),
        };
        PodView {
            log_start: from,
            log: lines[from as usize..].iter().map(|l| shown(l)).collect(),
            pod_log: lines
                .iter()
                .filter(|l| Entry::parse(l).unwrap().pod == pod)
                .map(|l| l.to_string())
                .collect(),
        }
    }

    #[test]
    fn every_chunk_size_gives_the_view_of_the_whole_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let es = [
            entry("p", "p", "/pause"),
            entry("q", "c", "/their/secret"),
            entry("p", "c", "/bin/sh"),
            entry("pq", "p", "/bin/p q"),
            entry("q", "p", "/p"),
            entry("p", "c", "/bin/ls"),
        ];
        let text: String = es.iter().map(|e| e.to_string() + "\n").collect();
        std::fs::write(&path, &text).unwrap();
        let len = text.len() as u64;
        for chunk in [1, 7, 100, 250, 251, 1000, 1 << 20] {
            for from in 0..=7 {
                let (v, n) = scan(&path, len, "p", Some(from), usize::MAX, chunk).unwrap();
                assert_eq!(n, 6);
                if from <= 6 {
                    assert_eq!(v, plain(&text, "p", from), "chunk {chunk} from {from}");
                }
            }
            let (v, _) = scan(&path, len, "p", None, usize::MAX, chunk).unwrap();
            assert_eq!(v.pod_log.len(), 3);
            assert!(v.log.is_empty());
        }
        assert_eq!(
            pod_view(&path, len, "p", 9, usize::MAX).unwrap(),
            plain(&text, "p", 0)
        );
        assert_eq!(
            pod_view(&path, len, "p", 6, usize::MAX).unwrap().log,
            Vec::<String>::new()
        );
        assert!(!pod_view(&path, len, "p", 0, usize::MAX)
            .unwrap()
            .log
            .join("\n")
            .contains("secret"));
        // Only the snapshot's length is read: later lines are not its.
        std::fs::write(&path, format!("{text}{}\n", entry("p", "c", "/late"))).unwrap();
        assert_eq!(
            pod_view(&path, len, "p", 0, usize::MAX).unwrap(),
            plain(&text, "p", 0)
        );
        // A last line without its newline still counts.
        std::fs::write(&path, text.trim_end()).unwrap();
        assert_eq!(
            pod_view(&path, len - 1, "p", 2, usize::MAX).unwrap(),
            plain(&text, "p", 2)
        );
        assert_eq!(
            pod_entries(&path, len - 1, "p", usize::MAX).unwrap().len(),
            3
        );
    }

    #[test]
    fn a_view_past_its_budget_says_how_much_is_the_pods_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // A pod that logged long paths.
        let long = format!("/{}", "x".repeat(4000));
        let mut es = vec![entry("q", "c", "/bin/sh")];
        es.extend((0..5).map(|i| entry("p", "c", &format!("{long}{i}"))));
        let text: String = es.iter().map(|e| e.to_string() + "\n").collect();
        std::fs::write(&path, &text).unwrap();
        let len = text.len() as u64;
        assert_eq!(
            pod_view(&path, len, "p", 0, 1 << 20).unwrap().pod_log.len(),
            5
        );
        match pod_view(&path, len, "p", 0, 10_000) {
            Err(ViewError::TooLarge { budget, own }) => {
                assert_eq!(budget, 10_000);
                assert!(own > 8_000, "{own}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pod_entries(&path, len, "p", 10_000),
            Err(ViewError::TooLarge { .. })
        ));
        // Another pod's view carries them redacted: small.
        assert_eq!(pod_view(&path, len, "q", 0, 10_000).unwrap().log.len(), 6);
    }

    #[test]
    fn pages_carry_every_entry_redacted_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let es: Vec<Entry> = (0..7)
            .map(|i| entry(["p", "q"][i % 2], "c", &format!("/secret/{i}")))
            .collect();
        let text: String = es.iter().map(|e| e.to_string() + "\n").collect();
        std::fs::write(&path, &text).unwrap();
        let len = text.len() as u64;
        let want: Vec<String> = es
            .iter()
            .map(|e| e.redacted().unwrap().to_string())
            .collect();
        for chunk in [1, 50, 1 << 20] {
            let mut got = Vec::new();
            let mut from = 0;
            loop {
                let (page, more) =
                    page_in_chunks(&path, len, from, (3, usize::MAX), chunk).unwrap();
                from += page.len() as u64;
                got.extend(page);
                if !more {
                    break;
                }
            }
            assert_eq!(got, want, "chunk {chunk}");
        }
        assert!(!page(&path, len, 0, 10)
            .unwrap()
            .0
            .join("\n")
            .contains("secret"));
        assert_eq!(page(&path, len, 7, 10).unwrap(), (vec![], false));
        assert_eq!(page(&path, len, 9, 10).unwrap(), (vec![], false));
        // A byte budget splits pages too (one entry at least each).
        let mut got = Vec::new();
        loop {
            let (page, more) =
                page_in_chunks(&path, len, got.len() as u64, (10, 300), 1 << 20).unwrap();
            assert!(!page.is_empty() && page.len() <= 2, "{page:?}");
            got.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(got, want);
        // Exactly a page's worth: no more.
        assert!(!page(&path, len, 4, 3).unwrap().1);
        assert!(page(&path, len, 3, 3).unwrap().1);
    }
}
