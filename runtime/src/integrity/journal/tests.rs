use super::*;
use crate::integrity::log;

#[test]
fn concurrent_records_share_syncs_and_all_land() {
    let d = tempfile::tempdir().unwrap();
    let j = std::sync::Arc::new(Journal::open(d.path(), 15, None).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..25u8 {
                    j.record("p", "c", &format!("/f{t}-{i}"), [t; 32], Event::Exec, false)
                        .unwrap()
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
    assert_eq!(log::parse_log(&text).unwrap().len(), 200);
}

#[test]
fn a_removed_pod_keeps_nothing_but_its_entries() {
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 15, None).unwrap();
    for pod in ["gone", "alive"] {
        j.record(pod, "c", "/bin/sh", [1; 32], Event::Exec, false)
            .unwrap();
    }
    assert_eq!(j.pods_tracked(), (2, 2));
    j.forget("gone");
    assert_eq!(j.pods_tracked(), (1, 1));
    assert_eq!(j.summary("gone").measurements, 0);
    // An entry that comes late (a job that outlived its pod) is logged,
    // and makes no bookkeeping or summary again.
    let late = j
        .record("gone", "c", "/bin/late", [2; 32], Event::Exec, true)
        .unwrap();
    assert!(late.is_some());
    assert_eq!(j.pods_tracked(), (1, 1));
    drop(j);
    // Read back, only the pods named as existing get bookkeeping.
    let j = Journal::open(d.path(), 15, None).unwrap();
    assert_eq!(j.pods_tracked(), (2, 2));
    drop(j);
    let j = Journal::open_keeping(d.path(), 15, None, &|p| p == "alive").unwrap();
    assert_eq!(j.pods_tracked(), (1, 1));
    assert!(j.seen("alive", "c", "/bin/sh", &[1; 32], Event::Exec));
    let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
    assert_eq!(log::parse_log(&text).unwrap().len(), 3);
}

#[test]
fn unanchored_journal_dedupes_and_survives_reopen() {
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 15, None).unwrap();
    let a = j
        .record("p", "c", "/bin/sh", [1; 32], Event::Exec, false)
        .unwrap();
    assert!(a.is_some());
    assert!(j
        .record("p", "c", "/bin/sh", [1; 32], Event::Exec, false)
        .unwrap()
        .is_none());
    j.record("p", "c", "/tmp/x", [2; 32], Event::Deny, false)
        .unwrap();
    let s = j.summary("p");
    assert_eq!((s.measurements, s.violations), (2, 1));
    assert!(s.last_violation.unwrap().contains("/tmp/x"));
    drop(j);
    let j = Journal::open(d.path(), 15, None).unwrap();
    assert!(j.seen("p", "c", "/bin/sh", &[1; 32], Event::Exec));
    assert_eq!(j.summary("p").measurements, 2);
    let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
    assert_eq!(log::parse_log(&text).unwrap().len(), 2);
}

#[test]
fn quota_is_one_entry_then_refusals() {
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 15, None).unwrap().with_quota(3);
    j.record("p", "c", "-", [0; 32], Event::Start, false)
        .unwrap();
    for i in 0..2u8 {
        j.record("p", "c", &format!("/l{i}"), [1; 32], Event::Exec, false)
            .unwrap();
    }
    // A hard link more: refused, and the quota entry is logged once.
    for _ in 0..3 {
        let e = j.record("p", "c", "/l9", [1; 32], Event::Exec, false);
        assert!(
            matches!(e, Err(JournalError::Quota { quota: 3, .. })),
            "{e:?}"
        );
    }
    // Known measurements and other pods are unaffected; gaps still fit.
    assert!(j
        .record("p", "c", "/l0", [1; 32], Event::Exec, false)
        .unwrap()
        .is_none());
    assert!(j
        .record("q", "c", "/l0", [1; 32], Event::Exec, false)
        .unwrap()
        .is_some());
    assert!(j
        .record("p", "c", "-", [0; 32], Event::Gap, false)
        .unwrap()
        .is_some());
    let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
    let es = log::parse_log(&text).unwrap();
    assert_eq!(es.iter().filter(|e| e.event == Event::Quota).count(), 1);
    assert_eq!(j.summary("p").violations, 1);
    // Reopened, the pod is still over its quota, with no second entry.
    drop(j);
    let j = Journal::open(d.path(), 15, None).unwrap().with_quota(3);
    assert!(j
        .record("p", "c", "/new", [2; 32], Event::Exec, false)
        .is_err());
    let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
    assert_eq!(text.matches(" quota").count(), 1);
}

#[test]
fn corrupt_log_is_archived_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(Journal::log_path(d.path()), "garbage\n").unwrap();
    let j = Journal::open(d.path(), 15, None).unwrap();
    assert_eq!(j.summary("p").measurements, 0);
    let archived = std::fs::read_dir(d.path().join("archive")).unwrap().count();
    assert_eq!(archived, 1);
}
