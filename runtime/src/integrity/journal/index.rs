//! Where entries lie in the log file, kept by its writer: a quote from a
//! verifier's checkpoint then reads the pod's own entries and the log's
//! tail, not the whole file (a scan of a 64 MB log took ~20 ms of the
//! node's CPU per quote: a watcher of 100 pods every 30 s, 2 s a round).
//!
//! Offsets only say where to read; what is sent is still what the file
//! holds there, checked line by line ([`super::view`]), and the verifier
//! replays it as before. A log changed outside imacri (its length is not
//! what the writer wrote) makes the index stale until the next start, and
//! evidence is found by scanning the file again.

use std::collections::HashMap;

/// Every this many lines, the offset of the next one is kept.
pub const STRIDE: u64 = 1024;

/// Where to read a pod's view from, under the snapshot's length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// The offset of each of the pod's own entries, in order.
    pub own: Vec<u64>,
    /// A line at or before the view's first (its index and offset).
    pub start: (u64, u64),
}

#[derive(Debug, Default)]
pub(super) struct LogIndex {
    /// Bytes and lines the writer wrote (or read back).
    len: u64,
    lines: u64,
    /// The offset of line `i * STRIDE`.
    marks: Vec<u64>,
    /// Each kept pod's entries (pods that exist; 8 bytes an entry, so a
    /// pod at the default quota of 20 000 entries holds 160 KB).
    pods: HashMap<String, Vec<u64>>,
    stale: bool,
}

impl LogIndex {
    /// A line of `bytes` bytes (its newline included) at the end of the
    /// log, an entry of `pod` when that pod is kept.
    pub(super) fn add(&mut self, bytes: u64, pod: Option<&str>) {
        if self.lines.is_multiple_of(STRIDE) {
            self.marks.push(self.len);
        }
        if let Some(pod) = pod {
            match self.pods.get_mut(pod) {
                Some(v) => v.push(self.len),
                None => {
                    self.pods.insert(pod.to_string(), vec![self.len]);
                }
            }
        }
        self.len += bytes;
        self.lines += 1;
    }

    /// How many pods' entries are located.
    pub(super) fn pods(&self) -> usize {
        self.pods.len()
    }

    /// A removed pod's offsets go (its quotes scan the log).
    pub(super) fn forget(&mut self, pod: &str) {
        self.pods.remove(pod);
    }

    /// From now on, nothing is located (until the log is read back).
    pub(super) fn spoil(&mut self, why: &str) {
        if !self.stale {
            tracing::warn!(
                "the measurement log {why}: evidence is found by reading all of it until imacri restarts"
            );
        }
        self.stale = true;
        self.marks = Vec::new();
        self.pods = HashMap::new();
    }

    /// Checks the index still describes a log of `file_len` bytes.
    fn fresh(&mut self, file_len: u64) -> bool {
        if !self.stale && file_len != self.len {
            self.spoil("is not the length imacri wrote (it was changed outside imacri)");
        }
        !self.stale
    }

    /// The nearest kept line at or before line `from` (None: stale).
    pub(super) fn mark(&mut self, file_len: u64, from: u64) -> Option<(u64, u64)> {
        if !self.fresh(file_len) {
            return None;
        }
        let i = (from / STRIDE).min((self.marks.len() as u64).saturating_sub(1));
        let at = self.marks.get(i as usize).copied().unwrap_or(0);
        Some((i * STRIDE, at))
    }

    /// The offsets of `pod`'s entries from its `from`-th on, at most `n`
    /// (None: stale, or a pod not kept).
    pub(super) fn own(
        &mut self,
        file_len: u64,
        pod: &str,
        from: u64,
        n: usize,
    ) -> Option<Vec<u64>> {
        if !self.fresh(file_len) {
            return None;
        }
        let own = self.pods.get(pod)?;
        let from = usize::try_from(from).map_or(own.len(), |f| f.min(own.len()));
        Some(own[from..].iter().take(n).copied().collect())
    }

    /// Where `pod`'s view from line `from` lies in a log of `file_len`
    /// bytes (None: stale, or a pod not kept).
    pub(super) fn locate(&mut self, file_len: u64, pod: &str, from: u64) -> Option<Located> {
        let start = self.mark(file_len, from)?;
        let own = self.pods.get(pod)?.clone();
        Some(Located { own, start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_offsets_follow_the_lines_written() {
        let mut ix = LogIndex::default();
        for i in 0..(STRIDE * 2 + 5) {
            ix.add(10, Some(if i % 100 == 0 { "p" } else { "q" }));
        }
        ix.forget("q");
        let len = (STRIDE * 2 + 5) * 10;
        assert_eq!(ix.mark(len, 0), Some((0, 0)));
        assert_eq!(ix.mark(len, STRIDE - 1), Some((0, 0)));
        assert_eq!(ix.mark(len, STRIDE + 3), Some((STRIDE, STRIDE * 10)));
        // Past the end: the last mark.
        assert_eq!(ix.mark(len, u64::MAX), Some((STRIDE * 2, STRIDE * 20)));
        let l = ix.locate(len, "p", 5).unwrap();
        assert_eq!(l.start, (0, 0));
        assert_eq!(l.own.len(), 21);
        assert_eq!(l.own[1], 1000);
        assert_eq!(ix.own(len, "p", 1, 2), Some(vec![1000, 2000]));
        assert_eq!(ix.own(len, "p", 20, 5), Some(vec![20000]));
        assert_eq!(ix.own(len, "p", u64::MAX, 5), Some(vec![]));
        // A forgotten pod is not located.
        assert_eq!(ix.own(len, "q", 0, 5), None);
        assert_eq!(ix.locate(len, "q", 0), None);
        // A log of another length: stale for good.
        assert_eq!(ix.locate(len + 1, "p", 0), None);
        assert_eq!(ix.locate(len, "p", 0), None);
        assert_eq!(ix.mark(len, 0), None);
    }

    #[test]
    fn an_empty_log_starts_at_its_beginning() {
        let mut ix = LogIndex::default();
        assert_eq!(ix.mark(0, 7), Some((0, 0)));
        ix.add(5, Some("p"));
        assert_eq!(ix.locate(5, "p", 0).unwrap().own, vec![0]);
    }

    /// Where the journal's snapshot says `pod`'s view from `from` lies.
    fn located(j: &super::super::Journal, pod: &str, from: u64) -> Option<Located> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(j.snapshot(vec![], pod, from)).unwrap().located
    }

    #[test]
    fn the_journal_locates_what_it_wrote_and_read_back() {
        use super::super::Journal;
        use crate::integrity::log::Event;
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path(), 15, None).unwrap();
        for i in 0..(STRIDE + 10) {
            let pod = if i % 10 == 0 { "a" } else { "b" };
            j.record(pod, "c", &format!("/f{i}"), [1; 32], Event::Exec, false)
                .unwrap();
        }
        let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        let want: Vec<u64> = (0..STRIDE + 10)
            .filter(|i| i % 10 == 0)
            .map(|i| starts[i as usize])
            .collect();
        let l = located(&j, "a", STRIDE + 3).unwrap();
        assert_eq!(l.own, want);
        assert_eq!(l.start, (STRIDE, starts[STRIDE as usize]));
        assert_eq!(
            j.page_start(STRIDE + 3).unwrap(),
            (text.len() as u64, l.start)
        );
        drop(j);
        // Read back at the next start, the same; only pods that exist.
        let j = Journal::open_keeping(d.path(), 15, None, &|p| p == "a").unwrap();
        assert_eq!(located(&j, "a", STRIDE + 3).unwrap().own, want);
        assert_eq!(located(&j, "b", 0), None);
        // A removed pod still quotable: located, with no bookkeeping.
        j.retire("a");
        assert_eq!(located(&j, "a", STRIDE + 3).unwrap().own, want);
        assert_eq!(j.summary("a").measurements, 0);
        j.forget("a");
        assert_eq!(located(&j, "a", 0), None);
        drop(j);
        // Read back with one: located, not kept.
        let keep = super::super::Keep {
            pods: &|p| p == "b",
            located: &|p| p == "a" || p == "b",
        };
        let j = Journal::open_with(d.path(), 15, None, &keep).unwrap();
        assert_eq!(located(&j, "a", STRIDE + 3).unwrap().own, want);
        assert_eq!(j.summary("a").measurements, 0);
        assert!(j.summary("b").measurements > 0);
        drop(j);
        // A last line cut short of its newline is ended before the next.
        let path = Journal::log_path(d.path());
        std::fs::write(&path, text.trim_end()).unwrap();
        let j = Journal::open(d.path(), 15, None).unwrap();
        j.record("a", "c", "/after", [1; 32], Event::Exec, false)
            .unwrap();
        let l = located(&j, "a", 0).unwrap();
        assert_eq!(l.own.len(), want.len() + 1);
        assert_eq!(*l.own.last().unwrap(), text.len() as u64);
        let now = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            crate::integrity::log::parse_log(&now).unwrap().len() as u64,
            STRIDE + 11
        );
        // Changed outside imacri: nothing is located from then on.
        std::fs::write(&path, format!("{now}\n")).unwrap();
        assert_eq!(located(&j, "a", 0), None);
        assert_eq!(j.page_start(5).unwrap().1, (0, 0));
        std::fs::write(&path, &now).unwrap();
        assert_eq!(located(&j, "a", 0), None);
    }
}
