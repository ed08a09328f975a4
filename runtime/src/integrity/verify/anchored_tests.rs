//! Anchored evidence without a TPM: a node simulated here keeps a log and a
//! PCR and signs TPMS_ATTEST quotes (marshalled as a TPM does) with a
//! software P-256 key, so that incremental evidence is tried the way a
//! node that lies would send it.

use super::*;
use crate::integrity::log::Event;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

const PCR: u32 = 15;

struct Node {
    key: SigningKey,
    log: Vec<Entry>,
    reset: u32,
    started_at: i64,
    clock: u64,
}

impl Node {
    fn new() -> Node {
        Node {
            key: SigningKey::from_slice(&[7u8; 32]).unwrap(),
            log: Vec::new(),
            reset: 3,
            started_at: 1_000,
            clock: 1,
        }
    }

    fn ak_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn add(&mut self, digest: u8, path: &str, pod: &str, ctr: &str, ev: Event) {
        self.log
            .push(Entry::new(PCR, [digest; 32], path, pod, ctr, ev));
    }

    fn start(&mut self, pod: &str, ctr: &str) {
        let words = format!(
            "img 2026-12-02T00:00:00Z {}",
            crate::integrity::init::start_word()
        );
        self.log
            .push(Entry::new(PCR, [7; 32], &words, pod, ctr, Event::Start));
    }

    /// TPMS_ATTEST of a quote of sha256 PCR 15 holding `pcr`.
    fn attest(&self, nonce: &[u8], pcr: &[u8; 32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(0xff54_4347u32.to_be_bytes()); // TPM_GENERATED_VALUE
        b.extend(0x8018u16.to_be_bytes()); // TPM_ST_ATTEST_QUOTE
        b.extend(0u16.to_be_bytes()); // qualifiedSigner: empty name
        b.extend((nonce.len() as u16).to_be_bytes());
        b.extend(nonce);
        b.extend(self.clock.to_be_bytes());
        b.extend(self.reset.to_be_bytes());
        b.extend(0u32.to_be_bytes()); // restart count
        b.push(1); // safe
        b.extend(0u64.to_be_bytes()); // firmware version
        b.extend(1u32.to_be_bytes()); // one selection
        b.extend(0x000bu16.to_be_bytes()); // sha256
        b.push(3);
        b.extend([0x00, 0x80, 0x00]); // PCR 15
        b.extend(32u16.to_be_bytes());
        b.extend(Sha256::digest(pcr));
        b
    }

    /// Evidence for `pod` from entry `from`, quoting the PCR the whole log
    /// extended, as an honest node builds it.
    fn evidence(&mut self, pod: &str, nonce: &[u8], from: usize) -> Evidence {
        self.clock += 1;
        let pcr = log::replay(&self.log);
        let attest = self.attest(nonce, &pcr);
        let sig: Signature = self.key.sign(&attest);
        let (r, s) = sig.split_bytes();
        Evidence {
            pod_sandbox_id: pod.into(),
            backend: "fanotify".into(),
            anchored: true,
            pcr: PCR,
            epoch: Epoch {
                reset_count: Some(self.reset),
                restart_count: Some(0),
                started_at: self.started_at,
                broken: None,
            },
            nonce: nonce.to_vec(),
            log: self.log[from..]
                .iter()
                .map(|e| match e.pod == pod {
                    true => e.to_string(),
                    false => e.redacted().unwrap().to_string(),
                })
                .collect(),
            log_start: from as u64,
            pod_log: self
                .log
                .iter()
                .filter(|e| e.pod == pod)
                .map(|e| e.to_string())
                .collect(),
            pod_log_start: 0,
            quote: Some(QuoteEvidence {
                attest,
                signature_r: r.to_vec(),
                signature_s: s.to_vec(),
                pcr_value: pcr.to_vec(),
            }),
            ak_public_pem: self.ak_pem(),
        }
    }
}

fn policy() -> Allowlist {
    Allowlist::parse(&format!(
        r#"{{"files": {{"/bin/sh": ["sha256:{}"]}}}}"#,
        hex::encode([1u8; 32])
    ))
    .unwrap()
}

const NONCE: &[u8] = &[5; 16];

fn check(node: &Node, ev: &Evidence, pod: &str, p: &Allowlist, cp: Option<&Checkpoint>) -> Report {
    let ak = node.ak_pem();
    verify(
        ev,
        &Expectations {
            pod_sandbox_id: pod,
            nonce: NONCE,
            ak_pem: Some(&ak),
            policy: p,
            allow_unanchored: false,
            allow_gaps: false,
            require_no_anonymous_exec: false,
            last_seen: None,
            checkpoint: cp,
        },
    )
}

/// Two pods' entries, then a checkpoint after full evidence for `p`.
fn checked_node(p: &Allowlist) -> (Node, Checkpoint) {
    let mut node = Node::new();
    node.start("p", "c");
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    node.start("q", "d");
    node.add(2, "/their/secret", "q", "d", Event::Exec);
    node.add(1, "/bin/sh", "q", "d", Event::Exec);
    let ev = node.evidence("p", NONCE, 0);
    let r = check(&node, &ev, "p", p, None);
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    let cp = r.checkpoint.expect("a checkpoint from verified evidence");
    assert_eq!((cp.entries, cp.reset_count), (5, 3));
    assert_eq!(cp.pods["p"].entries, 2);
    assert_eq!(cp.pods["q"].entries, 3);
    (node, cp)
}

#[test]
fn incremental_evidence_continues_the_checkpoint_to_where_full_evidence_ends() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    node.add(2, "/more/secret", "q", "d", Event::Exec);
    let ev = node.evidence("p", NONCE, 5);
    assert_eq!(ev.log.len(), 2);
    let r = check(&node, &ev, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    assert_eq!((r.log_start, r.log_entries, r.pod_entries), (5, 7, 2));
    let inc = r.checkpoint.unwrap();
    // The same checkpoint as from the whole log.
    let whole = node.evidence("p", NONCE, 0);
    let full = check(&node, &whole, "p", &p, None);
    assert_eq!(full.checkpoint.as_ref(), Some(&inc));
    // Another pod, whose earlier entries this verifier saw only redacted,
    // continues from there too; its earlier violation is still appraised.
    node.add(1, "/bin/sh", "q", "d", Event::Exec);
    let ev = node.evidence("q", NONCE, 7);
    assert_eq!(ev.log.len(), 1);
    let r = check(&node, &ev, "q", &p, Some(&inc));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    let paths: Vec<&str> = r.violations.iter().map(|v| v.path.as_str()).collect();
    assert_eq!(paths, ["/their/secret", "/more/secret"], "{r:?}");
    assert!(r.checkpoint.is_some(), "violations are findings: {r:?}");
    // Nothing new: evidence from the end carries no entry.
    let ev = node.evidence("q", NONCE, 8);
    let r = check(&node, &ev, "q", &p, r.checkpoint.as_ref());
    assert_eq!(
        (r.verdict, r.log_entries),
        (Verdict::Violations, 8),
        "{r:?}"
    );
}

#[test]
fn incremental_evidence_that_does_not_continue_the_checkpoint_is_invalid() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    node.add(9, "/tmp/evil", "p", "c", Event::Exec);
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    let honest = node.evidence("p", NONCE, 5);
    let mut past = node.evidence("p", NONCE, 6);
    let before = node.evidence("p", NONCE, 4);
    let invalid = |ev: &Evidence, cp: Option<&Checkpoint>, says: &str| {
        let r = check(&node, ev, "p", &p, cp);
        assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
        assert!(r.checkpoint.is_none(), "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains(says)), "{says}: {r:?}");
    };
    // The new violation left out of the carried log.
    let mut ev = honest.clone();
    ev.log.remove(0);
    ev.pod_log.remove(2);
    invalid(&ev, Some(&cp), "does not replay");
    // Starting past an entry the verifier never saw, or before the
    // checkpoint (the quote still covers the whole log).
    past.pod_log.remove(2);
    invalid(&past, Some(&cp), "entries in between would go unseen");
    invalid(&before, Some(&cp), "entries in between would go unseen");
    // No checkpoint: it cannot be replayed.
    invalid(&honest, None, "checked none of the node's log");
    // Unanchored evidence proves nothing before its first entry.
    let mut ev = honest.clone();
    ev.anchored = false;
    ev.quote = None;
    invalid(&ev, Some(&cp), "unanchored");
    // A reboot: a new epoch's log from the old checkpoint's entry.
    let mut rebooted = Node::new();
    rebooted.reset = 4;
    rebooted.started_at = 2_000;
    for _ in 0..7 {
        rebooted.add(1, "/bin/sh", "p", "c", Event::Exec);
    }
    let ev = rebooted.evidence("p", NONCE, 5);
    let r = check(&rebooted, &ev, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("ask for the whole log")),
        "{r:?}"
    );
    // Claiming the old epoch does not pass the quote's reset count.
    let mut ev = ev;
    ev.epoch.reset_count = Some(3);
    ev.epoch.started_at = 1_000;
    let r = check(&rebooted, &ev, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    assert!(r.errors.iter().any(|e| e.contains("rebooted")), "{r:?}");
    // The honest one passes, its violation found.
    let r = check(&node, &honest, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations[0].path, "/tmp/evil");
}

/// Pod p ran a file no policy allows, then one it does; pod q ran its own.
fn with_a_violation() -> Node {
    let mut node = Node::new();
    node.start("p", "c");
    node.add(9, "/tmp/evil", "p", "c", Event::Exec);
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    node.add(2, "/their/secret", "q", "d", Event::Exec);
    node
}

#[test]
fn the_pods_entries_before_the_checkpoint_cannot_be_withheld_or_changed() {
    let p = policy();
    let mut node = with_a_violation();
    // A verifier checked the log through p's neighbour's evidence.
    let ev = node.evidence("q", NONCE, 0);
    let cp = check(&node, &ev, "q", &p, None).checkpoint.unwrap();
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    let honest = node.evidence("p", NONCE, 4);
    let r = check(&node, &honest, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations[0].path, "/tmp/evil");
    let invalid = |ev: &Evidence, says: &str| {
        let r = check(&node, ev, "p", &p, Some(&cp));
        assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains(says)), "{says}: {r:?}");
    };
    // Withheld: the violation left out.
    let mut ev = honest.clone();
    ev.pod_log.remove(1);
    invalid(&ev, "the log was modified");
    let mut ev = honest.clone();
    ev.pod_log.truncate(2);
    invalid(&ev, "withheld");
    // Changed: another digest and path, its template hash made to match.
    let mut ev = honest.clone();
    ev.pod_log[1] = Entry::new(PCR, [1; 32], "/bin/sh", "p", "c", Event::Exec).to_string();
    invalid(&ev, "not those this verifier checked");
    // Edited in place (the template hash no longer matches).
    let mut ev = honest.clone();
    ev.pod_log[1] = ev.pod_log[1].replace(&hex::encode([9u8; 32]), &hex::encode([1u8; 32]));
    invalid(&ev, "not an entry of this pod");
    // Reordered.
    let mut ev = honest.clone();
    ev.pod_log.swap(1, 2);
    invalid(&ev, "not those this verifier checked");
    // Redacted, or another pod's.
    let mut ev = honest.clone();
    ev.pod_log[1] = node.log[1].redacted().unwrap().to_string();
    invalid(&ev, "not an entry of this pod");
    let mut ev = honest;
    ev.pod_log[1] = node.log[3].to_string();
    invalid(&ev, "not an entry of this pod");
}

#[test]
fn a_checkpoint_survives_its_file() {
    let p = policy();
    let (_, cp) = checked_node(&p);
    let text = serde_json::to_string(&cp).unwrap();
    assert!(text.contains(&hex::encode(cp.pcr)), "{text}");
    let back: Checkpoint = serde_json::from_str(&text).unwrap();
    assert_eq!(back, cp);
    assert_eq!(cp.since(), (5, 1_000));
}

/// The log as GetLogPage shows it: every entry redacted.
fn pages(node: &Node) -> Vec<String> {
    node.log
        .iter()
        .map(|e| e.redacted().unwrap().to_string())
        .collect()
}

fn built(epoch: &Epoch, lines: &[String]) -> Result<Checkpoint, String> {
    let mut cp = Checkpoint::unverified(epoch).expect("anchored");
    for l in lines {
        cp.take(l)?;
    }
    Ok(cp)
}

#[test]
fn a_checkpoint_built_from_pages_is_proven_by_the_quote_after_it() {
    let p = policy();
    let mut node = with_a_violation();
    let epoch = node.evidence("p", NONCE, 0).epoch;
    let cp = built(&epoch, &pages(&node)).unwrap();
    assert_eq!(cp.entries, 4);
    // Nothing logged since: the evidence carries no entry, the pod's own
    // (its violation too) are appraised and proven by the replay.
    let ev = node.evidence("p", NONCE, 4);
    let r = check(&node, &ev, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(
        (r.log_start, r.violations[0].path.as_str()),
        (4, "/tmp/evil")
    );
    let whole = node.evidence("p", NONCE, 0);
    assert_eq!(
        r.checkpoint,
        check(&node, &whole, "p", &p, None).checkpoint,
        "the same as from the whole log"
    );
    // Unanchored: nothing could prove pages.
    let mut none = epoch.clone();
    none.reset_count = None;
    assert!(Checkpoint::unverified(&none).is_none());
}

#[test]
fn pages_that_are_not_the_quoted_log_are_invalid() {
    let p = policy();
    let mut node = with_a_violation();
    let honest = pages(&node);
    let ev = node.evidence("p", NONCE, 4);
    let epoch = ev.epoch.clone();
    // The pod's violation passed off as another pod's (its template hash
    // kept, so the PCR would still replay): the entry is inconsistent.
    let mut relabelled = honest.clone();
    relabelled[1] = relabelled[1].replace(" p c ", " q c ");
    let e = built(&epoch, &relabelled).unwrap_err();
    assert!(e.contains("the log was modified"), "{e}");
    // Its commitment changed.
    let mut changed = honest.clone();
    let c = hex::encode(Entry::parse(&changed[1]).unwrap().content.unwrap());
    changed[1] = changed[1].replace(&c, &"ab".repeat(32));
    assert!(built(&epoch, &changed).unwrap_err().contains("modified"));
    // Left out (and so out of the pod's entries): the replay fails.
    let mut dropped = honest.clone();
    dropped.remove(1);
    let cp = built(&epoch, &dropped).unwrap();
    let mut ev3 = node.evidence("p", NONCE, 3);
    ev3.pod_log.remove(1);
    let r = check(&node, &ev3, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("does not replay")),
        "{r:?}"
    );
    // Reordered: the replay fails.
    let mut reordered = honest.clone();
    reordered.swap(2, 3);
    let cp = built(&epoch, &reordered).unwrap();
    let r = check(&node, &ev, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
    // Not a log line.
    assert!(built(&epoch, &["junk".to_string()]).is_err());
    // The honest pages pass.
    let cp = built(&epoch, &honest).unwrap();
    assert_eq!(
        check(&node, &ev, "p", &p, Some(&cp)).verdict,
        Verdict::Violations
    );
}

/// Evidence leaving out the pod's first `skip` entries, as a node answers
/// a verifier that kept their appraisal.
fn skipping(node: &mut Node, pod: &str, from: usize, skip: usize) -> Evidence {
    let mut ev = node.evidence(pod, NONCE, from);
    ev.pod_log.drain(..skip);
    ev.pod_log_start = skip as u64;
    ev
}

fn key_of(p: &Allowlist) -> [u8; 32] {
    appraise::key(&paging("", p))
}

#[test]
fn a_kept_appraisal_spares_the_pods_earlier_entries() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    // "q" had a violation the verifier found when it saw q's entries (and
    // p's, redacted).
    let ev = node.evidence("q", NONCE, 5);
    let r = check(&node, &ev, "q", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    let cp = r.checkpoint.unwrap();
    assert_eq!(cp.appraised_entries("q", &key_of(&p)), 3);
    assert_eq!(cp.appraised_entries("p", &key_of(&p)), 2);
    node.add(1, "/bin/sh", "q", "d", Event::Exec);
    node.add(1, "/bin/sh", "p", "c", Event::Exec);
    // q's evidence with only its new entry: the kept violation is still
    // reported, and the checkpoint is the one full evidence gives.
    let ev = skipping(&mut node, "q", 5, 3);
    assert_eq!(ev.pod_log.len(), 1);
    let r = check(&node, &ev, "q", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations.len(), 1, "{r:?}");
    assert_eq!(r.violations[0].path, "/their/secret");
    assert_eq!((r.pod_entries, r.pod_log_start), (3, 3));
    let whole = node.evidence("q", NONCE, 5);
    let full = check(&node, &whole, "q", &p, Some(&cp));
    assert_eq!(r.checkpoint, full.checkpoint);
    let cp2 = r.checkpoint.unwrap();
    // p's appraisal covers its first 2 entries, the checkpoint 3 of them
    // (one seen redacted in q's evidence): that one comes whole.
    assert_eq!(cp2.pods["p"].entries, 3);
    let ev = skipping(&mut node, "p", 7, 2);
    assert_eq!(ev.pod_log.len(), 1);
    let r = check(&node, &ev, "p", &p, Some(&cp2));
    assert_eq!(r.verdict, Verdict::Trusted, "{r:?}");
    assert_eq!(r.pod_entries, 2);
    assert_eq!(r.checkpoint.unwrap().appraised_entries("p", &key_of(&p)), 3);
}

#[test]
fn leaving_out_entries_the_verifier_did_not_appraise_is_invalid() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    let ev = node.evidence("q", NONCE, 5);
    let cp = check(&node, &ev, "q", &p, Some(&cp)).checkpoint.unwrap();
    node.add(9, "/tmp/evil", "p", "c", Event::Exec);
    // More left out than was appraised, or fewer.
    let (more, fewer) = (
        skipping(&mut node, "p", 5, 3),
        skipping(&mut node, "p", 5, 1),
    );
    let honest = skipping(&mut node, "p", 5, 2);
    let whole = node.evidence("p", NONCE, 5);
    let invalid = |ev: &Evidence, p: &Allowlist, says: &str| {
        let r = check(&node, ev, "p", p, Some(&cp));
        assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
        assert!(r.checkpoint.is_none(), "{r:?}");
        assert!(r.errors.iter().any(|e| e.contains(says)), "{says}: {r:?}");
    };
    invalid(&more, &p, "kept no appraisal");
    invalid(&fewer, &p, "kept no appraisal");
    // Under another policy the kept appraisal does not count: a policy
    // that revokes a digest sees the pod's whole history again.
    let stricter = Allowlist::parse(r#"{"files": {}}"#).unwrap();
    assert_eq!(cp.appraised_entries("p", &key_of(&stricter)), 0);
    invalid(&honest, &stricter, "kept no appraisal");
    let r = check(&node, &whole, "p", &stricter, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert!(r.violations.iter().any(|v| v.path == "/bin/sh"), "{r:?}");
    // Another backend than the one appraised.
    let mut ev = honest.clone();
    ev.backend = "kernel".into();
    invalid(&ev, &p, "kept no appraisal");
    // The node leaves out the new entry of the pod, or one of its kept
    // ones without saying so.
    let mut ev = honest.clone();
    ev.pod_log.clear();
    invalid(&ev, &p, "differ from the log's entries");
    let mut ev = whole.clone();
    ev.pod_log.remove(0);
    invalid(&ev, &p, "not those this verifier checked");
    // Honest, the new violation is found.
    let r = check(&node, &honest, "p", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations.len(), 1, "{r:?}");
    assert_eq!(r.violations[0].path, "/tmp/evil");
}

/// What a verifier of `pod` under `p` expects, for pages of its entries.
fn paging<'a>(pod: &'a str, p: &'a Allowlist) -> Expectations<'a> {
    Expectations {
        pod_sandbox_id: pod,
        nonce: NONCE,
        ak_pem: None,
        policy: p,
        allow_unanchored: false,
        allow_gaps: false,
        require_no_anonymous_exec: false,
        last_seen: None,
        checkpoint: None,
    }
}

/// The pod's entries as a node pages them (GetLogPage for the pod): whole.
fn own(node: &Node, pod: &str) -> Vec<String> {
    node.log
        .iter()
        .filter(|e| e.pod == pod)
        .map(|e| e.to_string())
        .collect()
}

/// `cp` with the pod's entries before it appraised from `pages`.
fn appraised_from(
    cp: &Checkpoint,
    x: &Expectations<'_>,
    pages: &[&[String]],
    backend: &str,
) -> Result<Checkpoint, String> {
    let mut pp = PodPages::new(cp, x, 0).expect("entries to page");
    for page in pages {
        assert!(!pp.done());
        pp.take(page, backend, x)?;
    }
    pp.finish(cp.clone(), x.pod_sandbox_id)
}

#[test]
fn a_history_appraised_from_its_pages_is_left_out_of_the_evidence() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    // "q" (a violation among its 3 entries) was seen only redacted.
    let x = paging("q", &p);
    assert!(
        PodPages::new(&cp, &x, 3).is_none(),
        "few enough for the Quote"
    );
    assert!(
        PodPages::new(&cp, &paging("p", &p), 0).is_none(),
        "appraised"
    );
    node.add(1, "/bin/sh", "q", "d", Event::Exec);
    let q = own(&node, "q");
    // Pages of 2; the second one holds an entry past the checkpoint (left
    // to the Quote).
    let cp2 = appraised_from(&cp, &x, &[&q[..2], &q[2..]], "fanotify").unwrap();
    assert_eq!(cp2.appraised_entries("q", &key_of(&p)), 3);
    let ev = skipping(&mut node, "q", 5, 3);
    assert_eq!(ev.pod_log.len(), 1);
    let r = check(&node, &ev, "q", &p, Some(&cp2));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    assert_eq!(r.violations[0].path, "/their/secret");
    assert_eq!((r.pod_log_start, r.pod_entries), (3, 3));
    // As full evidence from the checkpoint concludes.
    let whole = node.evidence("q", NONCE, 5);
    let full = check(&node, &whole, "q", &p, Some(&cp));
    assert_eq!(r.checkpoint, full.checkpoint);
    // From a checkpoint built from the log's pages: the quote proves both.
    let fresh = built(&ev.epoch, &pages(&node)[..5]).unwrap();
    let cp3 = appraised_from(&fresh, &x, &[&q], "fanotify").unwrap();
    let r = check(&node, &ev, "q", &p, Some(&cp3));
    assert_eq!(r.verdict, Verdict::Violations, "{r:?}");
    let (got, want) = (r.checkpoint.unwrap(), full.checkpoint.unwrap());
    assert_eq!((got.entries, got.pcr), (want.entries, want.pcr));
    assert_eq!(got.pods["q"], want.pods["q"]);
}

#[test]
fn pages_of_a_pod_that_are_not_its_logged_entries_are_refused() {
    let p = policy();
    let (node, cp) = checked_node(&p);
    let x = paging("q", &p);
    let q = own(&node, "q");
    let refused = |pages: &[&[String]], backend: &str, says: &str| {
        let e = appraised_from(&cp, &x, pages, backend).unwrap_err();
        assert!(e.contains(says), "{says}: {e}");
    };
    // Its violation rewritten as an allowed entry, consistent in itself:
    // not what the log's hash of the pod's entries holds.
    let mut clean = q.clone();
    clean[1] = Entry::new(PCR, [1; 32], "/bin/sh", "q", "d", Event::Exec).to_string();
    refused(&[&clean], "fanotify", "do not fold");
    // One left out (the node then says none follow), or one withheld.
    refused(&[&q[..2], &[]], "fanotify", "withheld");
    let mut short = q.clone();
    short.remove(1);
    refused(&[&short], "fanotify", "withheld");
    // Another pod's entry, a redacted one, an inconsistent one, junk.
    let p_entry = own(&node, "p")[1].clone();
    let redacted = Entry::parse(&q[1]).unwrap().redacted().unwrap().to_string();
    let relabelled = q[1].replace(" /their/secret ", " /bin/sh ");
    for bad in [p_entry, redacted, relabelled] {
        let page = [q[0].clone(), bad, q[2].clone()];
        refused(&[&page], "fanotify", "not an entry of this pod as logged");
    }
    refused(&[&["junk".to_string()]], "fanotify", "the pod's entry 1");
    // The backend changes between pages.
    let mut pp = PodPages::new(&cp, &x, 0).unwrap();
    pp.take(&q[..1], "fanotify", &x).unwrap();
    let e = pp.take(&q[1..], "kernel", &x).unwrap_err();
    assert!(e.contains("measured by \"kernel\""), "{e}");
    // A backend other than the evidence's: the evidence is invalid.
    let cp2 = appraised_from(&cp, &x, &[&q], "kernel").unwrap();
    let mut node = node;
    let ev = skipping(&mut node, "q", 5, 3);
    let r = check(&node, &ev, "q", &p, Some(&cp2));
    assert_eq!(r.verdict, Verdict::Invalid, "{r:?}");
}

/// A pod that logs violation after violation (long paths, up to its quota)
/// cannot grow what its verifier keeps and reports past the first listed
/// ones: the rest are counted.
#[test]
fn violations_past_the_listed_ones_are_counted() {
    let p = policy();
    let (mut node, cp) = checked_node(&p);
    let long = "x".repeat(4000);
    let extra = LISTED_VIOLATIONS + 50;
    for i in 0..extra {
        node.add(9, &format!("/tmp/{long}/{i}"), "q", "d", Event::Exec);
    }
    let ev = node.evidence("q", NONCE, 5);
    let r = check(&node, &ev, "q", &p, Some(&cp));
    assert_eq!(r.verdict, Verdict::Violations, "{:?}", r.errors);
    // Its earlier violation first, then the new ones in the log's order.
    assert_eq!(r.violations.len(), LISTED_VIOLATIONS);
    assert_eq!(r.violations[0].path, "/their/secret");
    assert!(r.violations[1].path.ends_with("/0"));
    assert_eq!(r.violations_unlisted, 51);
    let cp = r.checkpoint.unwrap();
    let kept = serde_json::to_string(&cp).unwrap().len();
    assert!(kept < 600_000, "{kept} bytes kept");
    // Ten more: the same listed, counted on from the kept appraisal.
    for i in 0..10 {
        node.add(9, &format!("/tmp/more/{i}"), "q", "d", Event::Exec);
    }
    let all = LISTED_VIOLATIONS + 50 + 3;
    let ev = skipping(&mut node, "q", 5 + extra, all);
    assert_eq!(ev.pod_log.len(), 10);
    let r2 = check(&node, &ev, "q", &p, Some(&cp));
    assert_eq!(r2.verdict, Verdict::Violations, "{:?}", r2.errors);
    assert_eq!(r2.violations, r.violations);
    assert_eq!(r2.violations_unlisted, 61);
    // The same as the whole log concludes.
    let whole = node.evidence("q", NONCE, 0);
    let full = check(&node, &whole, "q", &p, None);
    assert_eq!(
        (full.violations, full.violations_unlisted),
        (r2.violations, 61)
    );
}
