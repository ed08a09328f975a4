use super::super::index::{LogIndex, STRIDE};
use super::*;
use crate::integrity::log::Event;

fn entry(pod: &str, ctr: &str, path: &str) -> Entry {
    Entry::new(15, [1; 32], path, pod, ctr, Event::Exec)
}

/// A read of the whole file for `pod`'s view.
fn scan(
    path: &Path,
    len: u64,
    pod: &str,
    from: Option<u64>,
    budget: usize,
    chunk: usize,
) -> Result<(PodView, u64), ViewError> {
    let s = Scan {
        pod,
        own: true,
        start: (0, 0),
        budget,
    };
    s.run(path, len, from, chunk)
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
        pod_log_start: 0,
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
        pod_view(&path, len, "p", (9, 0), usize::MAX, None).unwrap(),
        plain(&text, "p", 0)
    );
    assert_eq!(
        pod_view(&path, len, "p", (6, 0), usize::MAX, None)
            .unwrap()
            .log,
        Vec::<String>::new()
    );
    assert!(!pod_view(&path, len, "p", (0, 0), usize::MAX, None)
        .unwrap()
        .log
        .join("\n")
        .contains("secret"));
    // Only the snapshot's length is read: later lines are not its.
    std::fs::write(&path, format!("{text}{}\n", entry("p", "c", "/late"))).unwrap();
    assert_eq!(
        pod_view(&path, len, "p", (0, 0), usize::MAX, None).unwrap(),
        plain(&text, "p", 0)
    );
    // A last line without its newline still counts.
    std::fs::write(&path, text.trim_end()).unwrap();
    assert_eq!(
        pod_view(&path, len - 1, "p", (2, 0), usize::MAX, None).unwrap(),
        plain(&text, "p", 2)
    );
    assert_eq!(
        pod_entries(&path, len - 1, "p", usize::MAX, None)
            .unwrap()
            .len(),
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
        pod_view(&path, len, "p", (0, 0), 1 << 20, None)
            .unwrap()
            .pod_log
            .len(),
        5
    );
    match pod_view(&path, len, "p", (0, 0), 10_000, None) {
        Err(ViewError::TooLarge { budget, own }) => {
            assert_eq!(budget, 10_000);
            assert!(own > 8_000, "{own}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        pod_entries(&path, len, "p", 10_000, None),
        Err(ViewError::TooLarge { .. })
    ));
    // Another pod's view carries them redacted: small.
    assert_eq!(
        pod_view(&path, len, "q", (0, 0), 10_000, None)
            .unwrap()
            .log
            .len(),
        6
    );
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
                page_in_chunks(&path, ((0, 0), len), from, (3, usize::MAX), chunk).unwrap();
            from += page.len() as u64;
            got.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(got, want, "chunk {chunk}");
    }
    assert!(!page(&path, len, 0, 10, (0, 0))
        .unwrap()
        .0
        .join("\n")
        .contains("secret"));
    assert_eq!(page(&path, len, 7, 10, (0, 0)).unwrap(), (vec![], false));
    assert_eq!(page(&path, len, 9, 10, (0, 0)).unwrap(), (vec![], false));
    // A byte budget splits pages too (one entry at least each).
    let mut got = Vec::new();
    loop {
        let (page, more) =
            page_in_chunks(&path, ((0, 0), len), got.len() as u64, (10, 300), 1 << 20).unwrap();
        assert!(!page.is_empty() && page.len() <= 2, "{page:?}");
        got.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(got, want);
    // Exactly a page's worth: no more.
    assert!(!page(&path, len, 4, 3, (0, 0)).unwrap().1);
    assert!(page(&path, len, 3, 3, (0, 0)).unwrap().1);
}

/// A log of `n` entries of pods "p", "q" and "pq" (some with paths
/// longer than a read window), its text and its index.
fn indexed(path: &Path, n: usize) -> (String, LogIndex) {
    let long = format!("/{}", "y".repeat(20_000));
    let mut text = String::new();
    let mut ix = LogIndex::default();
    for i in 0..n {
        let pod = ["p", "q", "pq", "q", "q"][i % 5];
        let p = match i % 97 {
            0 => format!("{long}{i}"),
            _ => format!("/bin/{i}"),
        };
        let line = format!("{}\n", entry(pod, "c", &p));
        ix.add(line.len() as u64, Some(pod));
        text.push_str(&line);
    }
    std::fs::write(path, &text).unwrap();
    (text, ix)
}

#[test]
fn located_views_are_the_views_of_the_whole_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let n = 2 * STRIDE as usize + 300;
    let (text, mut ix) = indexed(&path, n);
    let len = text.len() as u64;
    let last = n as u64;
    for from in [
        0,
        1,
        5,
        STRIDE - 1,
        STRIDE,
        STRIDE + 1,
        2 * STRIDE + 7,
        last - 1,
        last,
        last + 1,
        10 * last,
    ] {
        let loc = ix.locate(len, "p", from).unwrap();
        assert!(loc.start.0 <= from);
        // Read where the index says, not from the whole file.
        assert!(located_view(&path, len, "p", (from, 0), usize::MAX, &loc)
            .unwrap()
            .is_some());
        let v = pod_view(&path, len, "p", (from, 0), usize::MAX, Some(&loc)).unwrap();
        assert_eq!(v, plain(&text, "p", from), "from {from}");
        assert_eq!(
            v,
            pod_view(&path, len, "p", (from, 0), usize::MAX, None).unwrap()
        );
        // A page from the mark is the page from the first line.
        let (page_at, more) = page(&path, len, from, 50, ix.mark(len, from).unwrap()).unwrap();
        assert_eq!(
            (page_at, more),
            page(&path, len, from, 50, (0, 0)).unwrap(),
            "from {from}"
        );
    }
    // A located view keeps to its budget, the pod's own entries first.
    let loc = ix.locate(len, "p", 0).unwrap();
    match pod_view(&path, len, "p", (0, 0), 30_000, Some(&loc)) {
        Err(ViewError::TooLarge { own, .. }) => assert!(own > 20_000, "{own}"),
        other => panic!("{other:?}"),
    }
    // The tail counts after them.
    let own: usize = plain(&text, "p", 0).pod_log.iter().map(|l| cost(l)).sum();
    match pod_view(&path, len, "p", (last - 20, 0), own + 1_000, Some(&loc)) {
        Err(ViewError::TooLarge { budget, own: o }) => assert_eq!((budget, o), (own + 1_000, own)),
        other => panic!("{other:?}"),
    }
    assert!(pod_view(&path, len, "p", (last - 2, 0), own + 1_000, Some(&loc)).is_ok());
    let tail = ix.locate(len, "q", last - 3).unwrap();
    let v = pod_view(&path, len, "q", (last - 3, 0), usize::MAX, Some(&tail)).unwrap();
    assert_eq!(v.log.len(), 3);
}

#[test]
fn a_log_that_does_not_match_its_index_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (text, mut ix) = indexed(&path, 300);
    let len = text.len() as u64;
    let loc = ix.locate(len, "p", 120).unwrap();
    let p_line = text.lines().next().unwrap();
    let q_line = text.lines().nth(1).unwrap();
    // The node's admin edits the file: what is sent is what it holds,
    // as a read of the whole file finds it.
    let edits = [
        // Every line one byte later.
        format!("\n{text}"),
        // Every line one byte earlier.
        text[1..].to_string(),
        // The pod's entry swapped with another pod's of the same length.
        text.replacen(p_line, &q_line.replace(" q ", " x "), 1),
        // Its path rewritten in place (the offsets still hold).
        text.replacen("/bin/5\n", "/bin/6\n", 1),
        // Shorter than the snapshot.
        text[..text.len() / 2].to_string(),
    ];
    for (i, edited) in edits.iter().enumerate() {
        std::fs::write(&path, edited).unwrap();
        let got = pod_view(&path, len, "p", (120, 0), usize::MAX, Some(&loc)).unwrap();
        let whole = pod_view(&path, len, "p", (120, 0), usize::MAX, None).unwrap();
        assert_eq!(got, whole, "edit {i}");
        let at_offsets = located_view(&path, len, "p", (120, 0), usize::MAX, &loc).unwrap();
        assert_eq!(at_offsets.is_some(), i == 3, "edit {i}");
    }
    // The start of a page no line starts at: the page from the first.
    std::fs::write(&path, format!("\n{text}")).unwrap();
    let mark = (
        100,
        text.lines().take(100).map(|l| l.len() as u64 + 1).sum(),
    );
    assert_eq!(
        page(&path, len + 1, 100, 5, mark).unwrap(),
        page(&path, len + 1, 100, 5, (0, 0)).unwrap()
    );
}

#[test]
fn a_view_leaves_out_the_pods_first_entries_only_when_it_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (text, mut ix) = indexed(&path, STRIDE as usize + 50);
    let len = text.len() as u64;
    let last = STRIDE + 50;
    let all = plain(&text, "p", 0).pod_log;
    let n = all.len() as u64;
    for (from, pod_from, start) in [
        (last - 10, 3, 3),
        (last - 10, n, n),
        // More than the pod has: all of them.
        (last - 10, n + 1, 0),
        // A start past the log's end: all of the log and of the pod's.
        (last + 5, 3, 0),
    ] {
        let loc = ix.locate(len, "p", from).unwrap();
        let want = all[start as usize..].to_vec();
        for located in [Some(&loc), None] {
            let v = pod_view(&path, len, "p", (from, pod_from), usize::MAX, located).unwrap();
            assert_eq!(v.pod_log, want, "{from} {pod_from} {}", located.is_some());
            assert_eq!(v.pod_log_start, start);
            let log_start = if from > last { 0 } else { from };
            assert_eq!(v.log, plain(&text, "p", log_start).log);
        }
    }
}

/// All of `pod`'s entries read page by page, from its `from`-th on.
fn pod_pages(
    (path, len, pod): (&Path, u64, &str),
    mut from: u64,
    mut read: impl FnMut(u64) -> (Vec<String>, bool),
) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let (page, more) = read(from);
        assert!(
            !more || !page.is_empty(),
            "{path:?} {len} {pod}: more, none sent"
        );
        from += page.len() as u64;
        got.extend(page);
        if !more {
            return got;
        }
    }
}

#[test]
fn pod_pages_carry_the_pods_entries_whole_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (text, mut ix) = indexed(&path, STRIDE as usize + 300);
    let len = text.len() as u64;
    let all = plain(&text, "p", 0).pod_log;
    let n = all.len() as u64;
    assert!(all.iter().any(|l| l.len() > 20_000));
    for from in [0, 1, 7, n - 1, n, n + 3] {
        let want = all.get(from as usize..).unwrap_or_default().to_vec();
        // At the index's offsets (one past the page, as the journal gives
        // them), from the whole file in chunks of every size, and split by
        // bytes (one entry at least a page).
        let located = pod_pages((&path, len, "p"), from, |f| {
            let offs = ix.own(len, "p", f, 8).unwrap();
            pod_page(&path, len, "p", f, 7, Some(&offs)).unwrap()
        });
        assert_eq!(located, want, "from {from}");
        for chunk in [1, 300, 1 << 20] {
            let scanned = pod_pages((&path, len, "p"), from, |f| {
                pod_page_in_chunks(&path, len, "p", f, (7, usize::MAX), chunk).unwrap()
            });
            assert_eq!(scanned, want, "from {from} chunk {chunk}");
        }
        let by_bytes = pod_pages((&path, len, "p"), from, |f| {
            let (page, more) = pod_page_in_chunks(&path, len, "p", f, (7, 3_000), 1 << 20).unwrap();
            assert!(page.len() == 1 || page.iter().map(|l| cost(l)).sum::<usize>() <= 3_000);
            (page, more)
        });
        assert_eq!(by_bytes, want);
    }
    // GetLog's read: all of them at the index's offsets, within its budget.
    // Where the index does not locate the pod, it first counts what they
    // take ("pq"'s lines, which hold " p ", not among them).
    assert_eq!(
        pod_bytes(&path, len, "p").unwrap(),
        all.iter().map(|l| cost(l)).sum::<usize>()
    );
    assert_eq!(pod_bytes(&path, len, "nobody").unwrap(), 0);
    let every = ix.own(len, "p", 0, usize::MAX).unwrap();
    assert_eq!(
        pod_entries(&path, len, "p", usize::MAX, Some(&every)).unwrap(),
        all
    );
    match pod_entries(&path, len, "p", 30_000, Some(&every)) {
        Err(ViewError::TooLarge { budget, own }) => assert!(own * 2 > budget),
        other => panic!("{other:?}"),
    }
    // Read where the index says, not from the whole file.
    let offs = ix.own(len, "p", 0, 8).unwrap();
    assert!(located_pod_page(&path, len, "p", (7, PAGE_BYTES), &offs)
        .unwrap()
        .is_some());
    // Exactly a page's worth: no more.
    let offs = ix.own(len, "p", n - 3, 4).unwrap();
    assert!(!pod_page(&path, len, "p", n - 3, 3, Some(&offs)).unwrap().1);
    assert!(!pod_page(&path, len, "p", n - 3, 3, None).unwrap().1);
    assert!(pod_page(&path, len, "p", n - 4, 3, None).unwrap().1);
    // Another pod's lines are never in it ("pq" holds "p" but is not it).
    assert!(pod_page(&path, len, "p", 0, 100_000, None)
        .unwrap()
        .0
        .iter()
        .all(|l| Entry::parse(l).unwrap().pod == "p"));
    // A file that no longer matches the index: what the whole file holds.
    let shifted = format!("\n{text}");
    std::fs::write(&path, &shifted).unwrap();
    let len = shifted.len() as u64;
    let offs = ix.own(text.len() as u64, "p", 5, 11).unwrap();
    assert_eq!(
        pod_page(&path, len, "p", 5, 10, Some(&offs)).unwrap(),
        pod_page(&path, len, "p", 5, 10, None).unwrap()
    );
    assert_eq!(
        pod_page(&path, len, "p", 5, 10, None).unwrap().0,
        all[5..15]
    );
}

#[test]
fn a_views_bound_is_never_below_what_it_makes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let n = 2 * STRIDE as usize + 300;
    let (text, mut ix) = indexed(&path, n);
    let len = text.len() as u64;
    let bytes = |v: &PodView| {
        v.log
            .iter()
            .chain(&v.pod_log)
            .map(|l| l.len())
            .sum::<usize>()
    };
    for pod in ["p", "q"] {
        for from in [
            0,
            1,
            STRIDE,
            STRIDE + 7,
            n as u64 - 3,
            n as u64,
            5 * n as u64,
        ] {
            for pod_from in [0, 3, 10_000] {
                let loc = ix.locate(len, pod, from).unwrap();
                let v =
                    pod_view(&path, len, pod, (from, pod_from), usize::MAX, Some(&loc)).unwrap();
                let bound = view_bound(len, (from, pod_from), Some(&loc));
                assert!(
                    bytes(&v) <= bound,
                    "{pod} {from} {pod_from}: {} > {bound}",
                    bytes(&v)
                );
            }
        }
    }
    // Without the index: the budget.
    assert_eq!(view_bound(len, (0, 0), None), EVIDENCE_BUDGET);
}
