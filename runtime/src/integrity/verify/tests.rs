use super::*;
use crate::integrity::log::Event;

fn unanchored(entries: &[Entry], pod: &str) -> Evidence {
    let log: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
    Evidence {
        pod_sandbox_id: pod.into(),
        backend: "fanotify".into(),
        pcr: 15,
        nonce: vec![1, 2, 3],
        pod_log: entries
            .iter()
            .filter(|e| e.pod == pod)
            .map(|e| e.to_string())
            .collect(),
        log,
        ..Default::default()
    }
}

fn policy() -> Allowlist {
    Allowlist::parse(&format!(
        r#"{{"files": {{"/bin/sh": ["sha256:{}"]}}}}"#,
        hex::encode([1u8; 32])
    ))
    .unwrap()
}

fn x<'a>(p: &'a Allowlist, nonce: &'a [u8]) -> Expectations<'a> {
    Expectations {
        pod_sandbox_id: "p",
        nonce,
        ak_pem: None,
        policy: p,
        allow_unanchored: true,
        allow_gaps: true,
        require_no_anonymous_exec: false,
        last_seen: None,
        checkpoint: None,
    }
}

fn start(ctr: &str) -> Entry {
    start_saying(ctr, "")
}

/// A start entry through the init, with `more` words after it.
fn start_saying(ctr: &str, more: &str) -> Entry {
    let words = format!(
        "img 2026-12-02T00:00:00Z {}{more}",
        crate::integrity::init::start_word()
    );
    Entry::new(15, [7; 32], &words, "p", ctr, Event::Start)
}

#[test]
fn a_policy_allowing_anonymous_exec_is_a_violation_when_required() {
    let p = policy();
    let es = [start("c"), start_saying("d", " anonymous_exec=deny")];
    let lax = x(&p, &[1, 2, 3]);
    assert_eq!(
        verify(&unanchored(&es, "p"), &lax).verdict,
        Verdict::Trusted
    );
    let strict = Expectations {
        require_no_anonymous_exec: true,
        ..x(&p, &[1, 2, 3])
    };
    let r = verify(&unanchored(&es, "p"), &strict);
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations.len(), 1, "{r:?}");
    assert_eq!(r.violations[0].container, "c");
    assert!(r.violations[0].reason.contains("anonymous_exec"));
    // The pause container (the pod's own ID) runs only imacri's pause.
    let pause = [Entry::new(
        15,
        [7; 32],
        "pause 2026-12-02T00:00:00Z",
        "p",
        "p",
        Event::Start,
    )];
    assert_eq!(
        verify(&unanchored(&pause, "p"), &strict).verdict,
        Verdict::Trusted
    );
}

#[test]
fn a_container_without_a_start_entry_is_untrusted() {
    let p = policy();
    let ok = [
        start("c"),
        Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
    ];
    let r = verify(&unanchored(&ok, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    assert_eq!(r.pod_entries, 1);
    // A second container whose entries come without (or before) its start.
    let bad = [
        start("c"),
        Entry::new(15, [1; 32], "/bin/sh", "p", "d", Event::Exec),
        start("d"),
    ];
    let r = verify(&unanchored(&bad, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations.len(), 1);
    assert_eq!(r.violations[0].container, "d");
    assert!(r.violations[0].reason.contains("start entry"));
}

#[test]
fn the_init_a_start_entry_declares_is_trusted_whatever_the_build() {
    let p = policy();
    // An init digest of another imacri build, declared by the start.
    let other = [9u8; 32];
    let declaring = |ctr: &str, d: [u8; 32]| {
        Entry::new(
            15,
            [7; 32],
            &format!("img 2026-12-02T00:00:00Z init=sha256:{}", hex::encode(d)),
            "p",
            ctr,
            Event::Start,
        )
    };
    let init = |ctr: &str, d: [u8; 32]| {
        Entry::new(15, d, crate::integrity::init::PATH, "p", ctr, Event::Exec)
    };
    let ok = [declaring("c", other), init("c", other)];
    let r = verify(&unanchored(&ok, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    // The file on the node is not what imacri declared: a violation.
    let swapped = [declaring("c", other), init("c", [8; 32])];
    let r = verify(&unanchored(&swapped, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    // Another container's declaration does not cover this one (whose
    // start declares this build's init).
    let undeclared = [declaring("c", other), start("d"), init("d", other)];
    let r = verify(&unanchored(&undeclared, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations[0].container, "d");
    // The declaration covers the init's path only.
    let elsewhere = [
        declaring("c", other),
        Entry::new(15, other, "/bin/init", "p", "c", Event::Exec),
    ];
    let r = verify(&unanchored(&elsewhere, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
}

#[test]
fn a_container_that_did_not_run_through_the_init_is_untrusted() {
    let p = policy();
    let old = Entry::new(
        15,
        [7; 32],
        "img 2026-12-02T00:00:00Z",
        "p",
        "c",
        Event::Start,
    );
    let pause = Entry::new(
        15,
        [7; 32],
        "pause 2026-12-02T00:00:00Z",
        "p",
        "p",
        Event::Start,
    );
    let es = [pause.clone(), old];
    let r = verify(&unanchored(&es, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations.len(), 1, "{r:?}");
    assert_eq!(r.violations[0].container, "c");
    assert!(r.violations[0].reason.contains("init"), "{r:?}");
    // Pause never does; nor do containers of the kernel backend.
    let r = verify(&unanchored(&[pause], "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    let mut kernel = unanchored(&es, "p");
    kernel.backend = "kernel".into();
    let r = verify(&kernel, &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
}

#[test]
fn unanchored_log_is_appraised() {
    let es = [
        start("c"),
        Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
        Entry::new(15, [2; 32], "/bin/other", "q", "c", Event::Exec),
        Entry::new(15, [0; 32], "-", "p", "c", Event::Gap),
    ];
    let p = policy();
    let r = verify(&unanchored(&es, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    assert_eq!((r.pod_entries, r.gaps), (1, 1));
    // Without --allow-gaps the gap alone makes it untrusted.
    let strict = Expectations {
        allow_gaps: false,
        ..x(&p, &[1, 2, 3])
    };
    let r = verify(&unanchored(&es, "p"), &strict);
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations[0].event, Event::Gap);
    // A backend that measured nothing proves nothing.
    let mut none = unanchored(&es, "p");
    none.backend = "none (measurement unavailable)".into();
    assert_eq!(verify(&none, &x(&p, &[1, 2, 3])).verdict, Verdict::Invalid);
    let es2 = [
        start("c"),
        Entry::new(15, [9; 32], "/tmp/evil", "p", "c", Event::Exec),
    ];
    let r = verify(&unanchored(&es2, "p"), &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Violations);
    assert_eq!(r.violations[0].path, "/tmp/evil");
}

#[test]
fn other_pods_come_redacted_and_own_entries_never_may() {
    let p = policy();
    let es = [
        start("c"),
        Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
        Entry::new(15, [2; 32], "/their/secret", "q", "c", Event::Exec),
    ];
    let mut ev = unanchored(&es, "p");
    ev.log[2] = es[2].redacted().unwrap().to_string();
    assert!(!ev.log.join("\n").contains("secret"));
    let r = verify(&ev, &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    // Withholding the pod's own (violating) entry is caught, and so is
    // passing it off as another pod's.
    let es = [
        start("c"),
        Entry::new(15, [9; 32], "/tmp/evil", "p", "c", Event::Exec),
    ];
    let mut ev = unanchored(&es, "p");
    ev.log[1] = es[1].redacted().unwrap().to_string();
    ev.pod_log.truncate(1);
    let r = verify(&ev, &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    assert!(r.errors.iter().any(|e| e.contains("withheld")), "{r:?}");
    ev.log[1] = ev.log[1].replace(" p c ", " q c ");
    let r = verify(&ev, &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    assert!(r.errors.iter().any(|e| e.contains("modified")), "{r:?}");
}

#[test]
fn tampering_and_wrong_nonce_are_invalid() {
    let es = [
        start("c"),
        Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec),
    ];
    let p = policy();
    let mut ev = unanchored(&es, "p");
    ev.log[1] = ev.log[1].replace(&hex::encode([1u8; 32]), &hex::encode([3u8; 32]));
    let r = verify(&ev, &x(&p, &[1, 2, 3]));
    assert_eq!(r.verdict, Verdict::Invalid);
    assert!(r.errors.iter().any(|e| e.contains("modified")), "{r:?}");
    let r = verify(&unanchored(&es, "p"), &x(&p, &[9]));
    assert_eq!(r.verdict, Verdict::Invalid);
    let mut strict = x(&p, &[1, 2, 3]);
    strict.allow_unanchored = false;
    assert_eq!(
        verify(&unanchored(&es, "p"), &strict).verdict,
        Verdict::Invalid
    );
}
