//! Checking one piece of evidence: what the verifier trusts (policy, the
//! node's enrolled AK or a handed-over key), what it accepts beyond
//! anchored gap-free evidence, and the newest TPM counters it saw per AK
//! (an older quote is a replay).

use anyhow::{anyhow, Context, Result};
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::verify::{self, Evidence, Expectations, Report, Verdict};
use std::path::{Path, PathBuf};

use super::{client, fetch, Target};

/// What a verifier accepts beyond fully anchored, gap-free evidence.
#[derive(Clone, Copy)]
pub(super) struct Accept {
    pub(super) unanchored: bool,
    pub(super) gaps: bool,
}

/// Where the verifier's trust in a node's AK comes from.
#[derive(Clone, Copy)]
pub(super) enum Registered<'a> {
    /// An enrolled node's file (`attest enroll`).
    Node(&'a Path),
    /// A key handed over by the node itself (`attest ak`).
    Ak(&'a Path),
    None,
}

impl<'a> Registered<'a> {
    pub(super) fn new(node: Option<&'a Path>, ak: Option<&'a Path>) -> Registered<'a> {
        match (node, ak) {
            (Some(n), _) => Registered::Node(n),
            (None, Some(a)) => Registered::Ak(a),
            (None, None) => Registered::None,
        }
    }
}

pub(super) fn load_inputs(
    policy: &Path,
    reg: Registered<'_>,
) -> Result<(Allowlist, Option<String>)> {
    let policy = Allowlist::load(policy).map_err(|e| anyhow!(e))?;
    let ak = match reg {
        Registered::Node(p) => Some(
            imacri_runtime::integrity::enroll::NodeIdentity::load(p)
                .map_err(|e| anyhow!(e))?
                .ak
                .public_key_pem,
        ),
        Registered::Ak(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        Registered::None => None,
    };
    Ok((policy, ak))
}

/// The newest TPM counters a verifier saw, per attestation key (sha256 of
/// its PEM, whitespace removed), in a JSON file.
pub(super) struct CounterBook {
    path: Option<PathBuf>,
    seen: std::collections::BTreeMap<String, verify::TpmCounters>,
}

impl CounterBook {
    pub(super) fn open(path: Option<&Path>) -> Result<CounterBook> {
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
        })
    }

    fn key(ak: &str) -> String {
        use sha2::Digest;
        let flat: String = ak.split_whitespace().collect();
        hex::encode(sha2::Sha256::digest(flat.as_bytes()))
    }

    fn last(&self, ak: Option<&str>) -> Option<verify::TpmCounters> {
        ak.and_then(|a| self.seen.get(&Self::key(a)).copied())
    }

    /// Moves the node's counters forward after evidence that verified.
    fn advance(&mut self, ak: Option<&str>, r: &Report) -> Result<()> {
        let (Some(ak), Some(c)) = (ak, r.counters) else {
            return Ok(());
        };
        if r.verdict == Verdict::Invalid {
            return Ok(());
        }
        let e = self.seen.entry(Self::key(ak)).or_insert(c);
        *e = (*e).max(c);
        if let Some(p) = &self.path {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&self.seen)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check(
    ev: &Evidence,
    pod: &str,
    nonce: &[u8],
    policy: &Allowlist,
    ak: Option<&str>,
    accept: Accept,
    book: &mut CounterBook,
) -> Result<Report> {
    let mut r = verify::verify(
        ev,
        &Expectations {
            pod_sandbox_id: pod,
            nonce,
            ak_pem: ak,
            policy,
            allow_unanchored: accept.unanchored,
            allow_gaps: accept.gaps,
            last_seen: book.last(ak),
        },
    );
    if ev.anchored && ak.is_none() {
        r.errors
            .push("no --node given: the evidence's own key proves nothing; enroll the node with `imacri attest enroll`".into());
        r.verdict = Verdict::Invalid;
    }
    book.advance(ak, &r)?;
    Ok(r)
}

pub(super) async fn verify_once(
    socket: &Target,
    pod: &str,
    policy: &Path,
    reg: Registered<'_>,
    saved: Option<(&Path, &str)>,
    accept: Accept,
    counters: Option<&Path>,
) -> Result<Report> {
    let (policy, ak) = load_inputs(policy, reg)?;
    let mut book = CounterBook::open(counters)?;
    let (ev, nonce) = match saved {
        Some((p, nonce)) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let ev: Evidence = serde_json::from_str(&text).context("evidence JSON")?;
            let nonce = hex::decode(nonce).context("--nonce must be hex")?;
            (ev, nonce)
        }
        None => {
            let nonce = rand::random::<[u8; 32]>().to_vec();
            (
                fetch(&mut client(socket).await?, pod, nonce.clone()).await?,
                nonce,
            )
        }
    };
    check(&ev, pod, &nonce, &policy, ak.as_deref(), accept, &mut book)
}
