//! Reading the log back at start, line by line. A long epoch's log runs to
//! tens of MB (~320 bytes an entry: 64 MB at 200 000 entries); read whole
//! and parsed into a vector it took about three times its size at every
//! start until 2026-12-05, with bookkeeping for every pod it names on top,
//! enough to get an imacri with a memory limit killed before it served a
//! call. Now only the entries after the last point the TPM's PCR vouches
//! for are kept (to be extended), and only pods that still exist get
//! bookkeeping and a summary.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use super::super::log::{self, Entry};
use super::super::podlogs::PodLogs;
use super::index::LogIndex;
use super::PodSummary;

/// What the log holds, as far as the journal needs to know at start.
#[derive(Default)]
pub(super) struct ReadBack {
    /// The kept pods' summaries.
    pub(super) pods: HashMap<String, PodSummary>,
    /// Entries read.
    pub(super) count: u64,
    /// Where they lie (the kept pods' entries).
    pub(super) index: LogIndex,
    /// The last line has no newline.
    pub(super) unterminated: bool,
    /// With a PCR to read against: the entries after the last point whose
    /// replay equals it (template hash, pod, container), which the TPM has
    /// not seen; None when no point of the log replays to it.
    pub(super) unextended: Option<Vec<([u8; 32], String, String)>>,
}

/// Why the log cannot be read back.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadBackError {
    #[error("line {line}: {error}")]
    Corrupt { line: usize, error: log::ParseError },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Which pods the log read back keeps what of.
pub struct Keep<'a> {
    /// Bookkeeping and summaries (pods that exist).
    pub pods: &'a dyn Fn(&str) -> bool,
    /// Where their entries lie (those and removed pods still quotable).
    pub located: &'a dyn Fn(&str) -> bool,
}

/// Reads `path` (missing: empty) into `pod_logs` and the returned
/// summaries for the pods `keep` names; with `pcr`, finds what of the log
/// the PCR has seen.
pub(super) fn read_back(
    path: &Path,
    pcr: Option<[u8; 32]>,
    keep: &Keep<'_>,
    pod_logs: &PodLogs,
) -> Result<ReadBack, ReadBackError> {
    let mut out = ReadBack {
        unextended: pcr.map(|_| Vec::new()),
        ..Default::default()
    };
    // Before any entry, the replay is the all-zero PCR.
    let mut running = [0u8; 32];
    let mut held = pcr == Some(running);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.unextended = out.unextended.filter(|_| held);
            return Ok(out);
        }
        Err(e) => return Err(e.into()),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    for i in 0.. {
        buf.clear();
        let mut bytes = reader.read_until(b'\n', &mut buf)? as u64;
        if bytes == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else {
            // Written without its newline (a crash mid-write): the journal
            // ends it before the next entry, which would join it.
            out.unterminated = true;
            bytes += 1;
        }
        // As `lines()` reads them (and so does the view).
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if line.is_empty() {
            out.index.add(bytes, None);
            continue;
        }
        let e =
            Entry::parse(line).map_err(|error| ReadBackError::Corrupt { line: i + 1, error })?;
        out.index
            .add(bytes, (keep.located)(&e.pod).then_some(e.pod.as_str()));
        out.count += 1;
        if let (Some(pcr), Some(tail)) = (pcr, out.unextended.as_mut()) {
            running = log::extend(&running, &e.template_hash);
            if running == pcr {
                held = true;
                tail.clear();
            } else {
                tail.push((e.template_hash, e.pod.clone(), e.container.clone()));
            }
        }
        if (keep.pods)(&e.pod) {
            super::note_summary(&mut out.pods, &e, false);
            let key = pod_logs.key_of(&e);
            if let Ok(mut p) = pod_logs.of(&e.pod).lock() {
                p.note(&e, key);
            }
        }
    }
    out.unextended = out.unextended.filter(|_| held);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::log::Event;

    #[test]
    fn read_back_finds_what_the_pcr_has_seen_and_keeps_only_living_pods() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("log");
        let es: Vec<Entry> = (0..5u8)
            .map(|i| {
                let pod = if i % 2 == 0 { "alive" } else { "gone" };
                Entry::new(15, [i; 32], &format!("/f{i}"), pod, "c", Event::Exec)
            })
            .collect();
        let text: String = es.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let alive = |p: &str| p == "alive";
        let keep = Keep {
            pods: &alive,
            located: &alive,
        };
        // The PCR saw the first three.
        let pcr = log::replay(&es[..3]);
        let logs = PodLogs::default();
        let r = read_back(&path, Some(pcr), &keep, &logs).unwrap();
        assert_eq!(r.count, 5);
        let tail = r.unextended.unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0], (es[3].template_hash, "gone".into(), "c".into()));
        assert_eq!(r.pods.len(), 1);
        assert_eq!(r.pods["alive"].measurements, 3);
        assert_eq!(logs.len(), 1);
        // All of it, none of it (a fresh PCR with nothing logged: the empty
        // prefix), and a PCR no prefix replays to.
        let all = read_back(&path, Some(log::replay(&es)), &keep, &PodLogs::default()).unwrap();
        assert_eq!(all.unextended.unwrap().len(), 0);
        let none = read_back(&path, Some([0; 32]), &keep, &PodLogs::default()).unwrap();
        assert_eq!(none.unextended.unwrap().len(), 5);
        let other = read_back(&path, Some([9; 32]), &keep, &PodLogs::default()).unwrap();
        assert!(other.unextended.is_none());
        // No TPM: nothing to find; a missing log is empty.
        assert!(read_back(&path, None, &keep, &PodLogs::default())
            .unwrap()
            .unextended
            .is_none());
        let missing = read_back(
            &d.path().join("no"),
            Some([0; 32]),
            &keep,
            &PodLogs::default(),
        );
        assert_eq!(missing.unwrap().unextended.unwrap().len(), 0);
        // A line that is no entry.
        std::fs::write(&path, format!("{}\nnot an entry\n", es[0])).unwrap();
        let bad = read_back(&path, None, &keep, &PodLogs::default());
        assert!(matches!(bad, Err(ReadBackError::Corrupt { line: 2, .. })));
    }
}
