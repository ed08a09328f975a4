//! Checking one piece of evidence: what the verifier trusts (policy, the
//! node's enrolled AK or a handed-over key), what it accepts beyond
//! anchored gap-free evidence, and per AK the newest TPM counters it saw
//! (an older quote is a replay) and how far it checked the node's log (its
//! checkpoint: later evidence carries only what follows).

use anyhow::{Context, Result};
use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_client::AttestationClient;
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::verify::{
    self, Checkpoint, Evidence, Expectations, PodPages, Report, Verdict,
};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

use super::{client, fetch, rpc, Since, Target, Trust};

/// A verifier's inputs, loaded once (for `watch`, once for every round).
pub(super) struct Checker {
    policy: Allowlist,
    /// The trusted AK (PEM): the enrolled node's, or one handed over.
    ak: Option<String>,
    allow_unanchored: bool,
    allow_gaps: bool,
    require_no_anonymous_exec: bool,
    page_entries: u32,
    pod_pages_after: u64,
    book: CounterBook,
}

/// Evidence fetched for checking, and the checkpoint it continues when this
/// verifier built one from the log's pages or appraised the pod's entries
/// before it from pages of them; or why those pages are invalid.
pub(super) type Fetched = std::result::Result<(Evidence, Option<Checkpoint>), String>;

impl Checker {
    pub(super) fn load(t: &Trust) -> Result<Checker> {
        let policy = Allowlist::load(&t.policy)?;
        let ak = match (&t.node, &t.ak) {
            (Some(n), _) => Some(
                imacri_runtime::integrity::enroll::NodeIdentity::load(n)?
                    .ak
                    .public_key_pem,
            ),
            (None, Some(a)) => Some(
                std::fs::read_to_string(a).with_context(|| format!("reading {}", a.display()))?,
            ),
            (None, None) => None,
        };
        Ok(Checker {
            policy,
            ak,
            allow_unanchored: t.allow_unanchored,
            allow_gaps: t.allow_gaps,
            require_no_anonymous_exec: t.require_anonymous_exec_denied,
            page_entries: t.page_entries,
            pod_pages_after: t.pod_pages_after,
            book: CounterBook::open(t.counters.as_deref())?,
        })
    }

    /// Evidence for `pod` answering `nonce`: from this verifier's
    /// checkpoint of the node's log, or from one it builds from the log's
    /// pages (so that no message carries the whole log). Errors: the node
    /// could not be asked.
    pub(super) async fn fetch(
        &self,
        c: &mut AttestationClient<Channel>,
        pod: &str,
        nonce: &[u8],
    ) -> Result<Fetched> {
        let kept = self.book.checkpoint(self.ak.as_deref());
        let pages = match kept {
            Some(_) => None,
            None => match pages(c, self.page_entries).await? {
                Ok(cp) => cp,
                Err(m) => return Ok(Err(m)),
            },
        };
        // The pod's entries before the checkpoint that this verifier has
        // not appraised under its policy and options come in pages of their
        // own when many (a new verifier, a changed policy: its whole
        // history might not fit one Quote); the Quote leaves out those
        // appraised.
        let x = self.expectations(pod, nonce, None);
        let base = match pages.as_ref().or(kept) {
            Some(cp) => match self.pod_pages(c, cp, &x).await? {
                Ok(Some(appraised)) => Some(appraised),
                Ok(None) => pages,
                Err(m) => return Ok(Err(m)),
            },
            None => None,
        };
        let under = verify::appraisal_key(&x);
        let since = base.as_ref().or(kept).map(|cp| {
            let (entry, epoch) = cp.since();
            Since {
                entry,
                epoch,
                pod_entry: cp.appraised_entries(pod, &under),
            }
        });
        Ok(Ok((fetch(c, pod, nonce.to_vec(), since).await?, base)))
    }

    /// `cp` with its appraisal of the pod's entries before it, made from
    /// the node's pages of them; None when few enough are left to come in
    /// the Quote (or the node does not page pods' entries).
    async fn pod_pages(
        &self,
        c: &mut AttestationClient<Channel>,
        cp: &Checkpoint,
        x: &Expectations<'_>,
    ) -> Result<std::result::Result<Option<Checkpoint>, String>> {
        let pod = x.pod_sandbox_id;
        let Some(mut pp) = PodPages::new(cp, x, self.pod_pages_after) else {
            return Ok(Ok(None));
        };
        while !pp.done() {
            let from_entry = pp.next();
            let r = match c
                .get_log_page(pb::GetLogPageRequest {
                    from_entry,
                    max_entries: self.page_entries,
                    pod_sandbox_id: pod.to_string(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(Ok(None)),
                Err(s) => return Err(rpc(&format!("GetLogPage({pod})"), s)),
            };
            // A node from before pages of a pod sends the log's (redacted).
            if r.pod_sandbox_id.is_empty() {
                return Ok(Ok(None));
            }
            let epoch = crate::evidence::epoch_from_proto(r.epoch.unwrap_or_default());
            if Some(cp.reset_count) != epoch.reset_count || cp.epoch_started_at != epoch.started_at
            {
                return Ok(Err(
                    "the node's log began a new epoch while it was read (a reboot): verify again"
                        .into(),
                ));
            }
            if r.pod_sandbox_id != pod || r.from_entry != from_entry {
                return Ok(Err(format!(
                    "asked for pod {pod}'s entries from its entry {from_entry}, the node sent pod {}'s from {}",
                    r.pod_sandbox_id, r.from_entry
                )));
            }
            if let Err(m) = pp.take(&r.entries, &r.backend, x) {
                return Ok(Err(m));
            }
            if r.entries.is_empty() {
                break;
            }
        }
        Ok(pp.finish(cp.clone(), pod).map(Some))
    }

    /// Checks what [`Checker::fetch`] brought.
    pub(super) fn check_fetched(&mut self, f: Fetched, pod: &str, nonce: &[u8]) -> Report {
        match f {
            Ok((ev, pages)) => self.check(&ev, pod, nonce, pages.as_ref()),
            Err(m) => Report::invalid(pod, vec![m]),
        }
    }

    /// Writes what was seen to the counters file, if it changed (`watch`
    /// once a round: the checkpoint holds every pod of the node's epoch).
    pub(super) fn save(&mut self) -> Result<()> {
        self.book.save()
    }

    /// Verifies evidence for `pod` that answers `nonce` (continuing `pages`,
    /// a checkpoint built or completed from pages, or the one kept); a valid
    /// one moves the counters seen and the checkpoint forward (in memory:
    /// see [`Checker::save`]).
    pub(super) fn check(
        &mut self,
        ev: &Evidence,
        pod: &str,
        nonce: &[u8],
        pages: Option<&Checkpoint>,
    ) -> Report {
        let ak = self.ak.as_deref();
        let mut r = verify::verify(ev, &self.expectations(pod, nonce, pages));
        if ev.anchored && ak.is_none() {
            r.errors
                .push("no --node given: the evidence's own key proves nothing; enroll the node with `imacri attest enroll`".into());
            r.verdict = Verdict::Invalid;
        }
        self.book.advance(ak, &r);
        r
    }
}

impl Checker {
    /// What evidence for `pod` answering `nonce` must show, continuing
    /// `pages` (a checkpoint built from the log's pages) or the one kept.
    fn expectations<'a>(
        &'a self,
        pod: &'a str,
        nonce: &'a [u8],
        pages: Option<&'a Checkpoint>,
    ) -> Expectations<'a> {
        let ak = self.ak.as_deref();
        Expectations {
            pod_sandbox_id: pod,
            nonce,
            ak_pem: ak,
            policy: &self.policy,
            allow_unanchored: self.allow_unanchored,
            allow_gaps: self.allow_gaps,
            require_no_anonymous_exec: self.require_no_anonymous_exec,
            last_seen: self.book.last(ak),
            checkpoint: pages.or(self.book.checkpoint(ak)),
        }
    }
}

/// What a verifier saw of a node, per attestation key (sha256 of its PEM,
/// whitespace removed), in a JSON file.
struct CounterBook {
    path: Option<PathBuf>,
    seen: std::collections::BTreeMap<String, Seen>,
    /// Changed since read or written.
    changed: bool,
}

/// The newest TPM counters (the fields of a file from before checkpoints)
/// and the checkpoint of the node's log.
#[derive(serde::Serialize, serde::Deserialize)]
struct Seen {
    #[serde(flatten)]
    counters: verify::TpmCounters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint: Option<Checkpoint>,
}

impl CounterBook {
    fn open(path: Option<&Path>) -> Result<CounterBook> {
        let seen = match path {
            Some(p) => match std::fs::read(p) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("counters file {}", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            },
            None => Default::default(),
        };
        Ok(CounterBook {
            path: path.map(Path::to_path_buf),
            seen,
            changed: false,
        })
    }

    fn key(ak: &str) -> String {
        use sha2::Digest;
        let flat: String = ak.split_whitespace().collect();
        hex::encode(sha2::Sha256::digest(flat.as_bytes()))
    }

    fn last(&self, ak: Option<&str>) -> Option<verify::TpmCounters> {
        ak.and_then(|a| self.seen.get(&Self::key(a)).map(|s| s.counters))
    }

    fn checkpoint(&self, ak: Option<&str>) -> Option<&Checkpoint> {
        ak.and_then(|a| self.seen.get(&Self::key(a))?.checkpoint.as_ref())
    }

    /// Moves the node's counters and checkpoint forward after evidence
    /// that verified.
    fn advance(&mut self, ak: Option<&str>, r: &Report) {
        let (Some(ak), Some(c)) = (ak, r.counters) else {
            return;
        };
        if r.verdict == Verdict::Invalid {
            return;
        }
        let e = self.seen.entry(Self::key(ak)).or_insert(Seen {
            counters: c,
            checkpoint: None,
        });
        // Valid evidence is never older than what was seen (see
        // `verify::TpmCounters`): its checkpoint is the newest.
        e.counters = e.counters.max(c);
        if r.checkpoint.is_some() {
            e.checkpoint.clone_from(&r.checkpoint);
        }
        self.changed = true;
    }

    fn save(&mut self) -> Result<()> {
        let Some(p) = self.path.as_ref().filter(|_| self.changed) else {
            return Ok(());
        };
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.seen)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
        self.changed = false;
        Ok(())
    }
}

/// `attest verify`: fresh evidence from the node, or `saved` evidence
/// (file, hex nonce).
pub(super) async fn verify_once(
    socket: &Target,
    pod: &str,
    trust: &Trust,
    saved: Option<(&Path, &str)>,
) -> Result<Report> {
    let mut checker = Checker::load(trust)?;
    match saved {
        Some((p, nonce)) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let ev: Evidence = serde_json::from_str(&text).context("evidence JSON")?;
            let nonce = hex::decode(nonce).context("--nonce must be hex")?;
            let r = checker.check(&ev, pod, &nonce, None);
            checker.save()?;
            Ok(r)
        }
        None => {
            let nonce = rand::random::<[u8; 32]>().to_vec();
            let f = checker
                .fetch(&mut client(socket).await?, pod, &nonce)
                .await?;
            let r = checker.check_fetched(f, pod, &nonce);
            checker.save()?;
            Ok(r)
        }
    }
}

/// A checkpoint built from the node's log, page by page; None from a node
/// without a TPM (or one that serves no pages), whose evidence carries the
/// whole log. The inner error: the pages are not a log a quote could prove.
async fn pages(
    c: &mut AttestationClient<Channel>,
    max_entries: u32,
) -> Result<std::result::Result<Option<Checkpoint>, String>> {
    let mut built: Option<Checkpoint> = None;
    loop {
        let from_entry = built.as_ref().map_or(0, |b| b.entries);
        let r = match c
            .get_log_page(pb::GetLogPageRequest {
                from_entry,
                max_entries,
                ..Default::default()
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(Ok(None)),
            Err(s) => return Err(rpc("GetLogPage", s)),
        };
        let epoch = crate::evidence::epoch_from_proto(r.epoch.unwrap_or_default());
        let cp = match &mut built {
            Some(b) => {
                if Some(b.reset_count) != epoch.reset_count
                    || b.epoch_started_at != epoch.started_at
                {
                    return Ok(Err(
                        "the node's log began a new epoch while it was read (a reboot): verify again".into(),
                    ));
                }
                b
            }
            None => match Checkpoint::unverified(&epoch) {
                Some(b) => built.insert(b),
                None => return Ok(Ok(None)),
            },
        };
        if r.from_entry != from_entry {
            return Ok(Err(format!(
                "asked for the log from entry {from_entry}, the node sent it from {}",
                r.from_entry
            )));
        }
        for l in &r.entries {
            if let Err(m) = cp.take(l) {
                return Ok(Err(m));
            }
        }
        if !r.more {
            return Ok(Ok(built));
        }
        if r.entries.is_empty() {
            return Ok(Err(
                "the node said more log entries follow but sent none".into()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counters file from before checkpoints still loads; once a
    /// checkpoint is kept, it is written beside the counters and read back.
    #[test]
    fn counters_files_of_before_load_and_keep_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counters.json");
        let ak = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        let key = CounterBook::key(ak);
        std::fs::write(
            &path,
            format!(r#"{{"{key}": {{"reset_count": 3, "restart_count": 0, "clock": 7}}}}"#),
        )
        .unwrap();
        let mut book = CounterBook::open(Some(&path)).unwrap();
        assert_eq!(book.last(Some(ak)).map(|c| c.clock), Some(7));
        assert!(book.checkpoint(Some(ak)).is_none());
        let mut r = Report::invalid("p", vec![]);
        r.verdict = Verdict::Trusted;
        r.counters = Some(verify::TpmCounters {
            reset_count: 3,
            restart_count: 0,
            clock: 9,
        });
        r.checkpoint = Some(Checkpoint {
            reset_count: 3,
            entries: 5,
            ..Default::default()
        });
        book.advance(Some(ak), &r);
        book.save().unwrap();
        let back = CounterBook::open(Some(&path)).unwrap();
        assert_eq!(back.last(Some(ak)).map(|c| c.clock), Some(9));
        assert_eq!(back.checkpoint(Some(ak)).map(|c| c.entries), Some(5));
        // Invalid evidence moves nothing.
        let mut bad = r.clone();
        bad.verdict = Verdict::Invalid;
        bad.checkpoint = None;
        let mut book = back;
        book.advance(Some(ak), &bad);
        assert!(!book.changed);
    }
}
