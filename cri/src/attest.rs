//! `imacri attest`: the verifier side. Talks to a node's attestation service
//! over its verifier socket (`attestation.socket`, which serves nothing
//! else; forward it to reach a remote node) and checks the evidence locally
//! with `imacri_runtime::integrity::verify`.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_client::AttestationClient;
use imacri_runtime::integrity::allowlist::Allowlist;
use imacri_runtime::integrity::verify::{self, Evidence, Expectations, Report, Verdict};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum AttestCmd {
    /// Print the node's attestation key (PEM SubjectPublicKeyInfo) for registration.
    Ak {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the node's endorsement key (PEM), for an operator to pin with
    /// `enroll --ek-pubkey` when its TPM has no EK certificate. Read it
    /// while the node is known good (at provisioning).
    Ek {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Enroll the node: check its EK (certificate chain or pin) and its
    /// attestation key's public area, then prove with a credential only its
    /// TPM can activate that the AK lives there. Writes the node file
    /// `verify --node` and `watch --node` trust.
    Enroll {
        /// CA certificates (PEM, roots and intermediates) the EK
        /// certificate must chain to.
        #[arg(long, required_unless_present = "ek_pubkey")]
        ek_ca: Option<PathBuf>,
        /// The node's EK public key (PEM, from `attest ek`), pinned.
        #[arg(long, conflicts_with = "ek_ca")]
        ek_pubkey: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a policy allowing every regular file of an image. By default
    /// read from the image's registry, on this host, without containerd (a
    /// verifier computes its reference values without asking the node it
    /// will judge); --from-node asks the node's GoldenPolicy instead.
    Golden {
        image: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Ask the node (its pulled copy) instead of the registry.
        #[arg(long)]
        from_node: bool,
        /// containerd-style hosts.toml directory for mirrors and CAs.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        registry_config_path: PathBuf,
        #[arg(long, env = "IMACRI_REGISTRY_USERNAME")]
        username: Option<String>,
        #[arg(long, env = "IMACRI_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// An OAuth2 refresh token for a token-auth registry.
        #[arg(long, env = "IMACRI_REGISTRY_IDENTITY_TOKEN", hide_env_values = true)]
        identity_token: Option<String>,
    },
    /// Print a pod's measurement log entries.
    Log { pod: String },
    /// Fetch evidence for a pod and print it as JSON.
    Quote {
        pod: String,
        /// Hex nonce (default: 32 random bytes).
        #[arg(long)]
        nonce: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a pod. Prints a JSON report; exit 0 trusted, 1 violations,
    /// 2 evidence invalid, tampered or unavailable.
    Verify {
        #[arg(long)]
        pod: String,
        /// Allowed digests (JSON, e.g. from `attest golden`).
        #[arg(long)]
        policy: PathBuf,
        /// The enrolled node (from `attest enroll`): only its AK is trusted.
        #[arg(long, conflicts_with = "ak")]
        node: Option<PathBuf>,
        /// The node's attestation key, registered without enrollment (from
        /// `attest ak`; trusts whatever key the node handed over).
        #[arg(long)]
        ak: Option<PathBuf>,
        /// Verify saved evidence (from `attest quote`) instead of asking the node.
        #[arg(long, requires = "nonce")]
        evidence: Option<PathBuf>,
        /// With --evidence: the hex nonce the evidence must answer.
        #[arg(long)]
        nonce: Option<String>,
        /// Accept evidence from a node without a TPM (proves nothing).
        #[arg(long)]
        allow_unanchored: bool,
        /// Trust a pod whose log has gaps (it was not measured for a while).
        #[arg(long)]
        allow_gaps: bool,
        /// File remembering the newest TPM counters seen per attestation
        /// key: a quote older than that is refused (replay), and a valid
        /// one moves it forward.
        #[arg(long)]
        counters: Option<PathBuf>,
    },
    /// Verify every ima pod periodically; prints one alert line per new
    /// violation or invalid evidence.
    Watch {
        #[arg(long)]
        policy: PathBuf,
        /// The enrolled node (from `attest enroll`).
        #[arg(long, conflicts_with = "ak")]
        node: Option<PathBuf>,
        #[arg(long)]
        ak: Option<PathBuf>,
        /// e.g. 30s, 5m, 500ms.
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Stop after this many rounds (default: forever).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        allow_unanchored: bool,
        #[arg(long)]
        allow_gaps: bool,
        /// As for verify: the newest TPM counters seen, kept across runs.
        #[arg(long)]
        counters: Option<PathBuf>,
    },
}

/// Where the node's attestation service is.
pub enum Target {
    /// Its verifier socket (or the CRI socket), local or forwarded.
    Socket(PathBuf),
    /// Its TCP endpoint, with mutual TLS.
    Tls {
        url: String,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    },
}

async fn client(target: &Target) -> Result<AttestationClient<Channel>> {
    let ch = match target {
        Target::Socket(socket) => containerd_client::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?,
        Target::Tls { url, ca, cert, key } => {
            use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
            let _ = rustls::crypto::ring::default_provider().install_default();
            let read = |p: &Option<PathBuf>, what: &str| -> Result<Vec<u8>> {
                let p = p
                    .as_ref()
                    .ok_or_else(|| anyhow!("--endpoint needs --{what}"))?;
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca, "tls-ca")?))
                .identity(Identity::from_pem(
                    read(cert, "tls-cert")?,
                    read(key, "tls-key")?,
                ));
            Endpoint::from_shared(url.clone())
                .with_context(|| format!("endpoint {url}"))?
                .tls_config(tls)
                .context("TLS configuration")?
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?
        }
    };
    Ok(AttestationClient::new(ch).max_decoding_message_size(64 * 1024 * 1024))
}

fn write_or_print(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

pub fn parse_interval(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("interval {s:?}: use e.g. 30s, 5m, 500ms"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("interval {s:?}: unit must be ms, s, m or h"),
    })
}

/// Runs one subcommand; returns the process exit code.
pub async fn run(socket: &Target, cmd: AttestCmd) -> Result<i32> {
    match cmd {
        AttestCmd::Ak { out } => {
            let r = client(socket)
                .await?
                .get_attestation_key(pb::GetAttestationKeyRequest {})
                .await
                .map_err(|s| rpc("GetAttestationKey", s))?
                .into_inner();
            write_or_print(out.as_deref(), &r.pem)?;
            Ok(0)
        }
        AttestCmd::Ek { out } => {
            let pem = crate::enroll::ek(&mut client(socket).await?).await?;
            write_or_print(out.as_deref(), &pem)?;
            Ok(0)
        }
        AttestCmd::Enroll {
            ek_ca,
            ek_pubkey,
            out,
        } => {
            let node = crate::enroll::enroll(
                &mut client(socket).await?,
                ek_ca.as_deref(),
                ek_pubkey.as_deref(),
            )
            .await?;
            write_or_print(Some(&out), &(serde_json::to_string_pretty(&node)? + "\n"))?;
            eprintln!(
                "enrolled {} (EK {}; AK name {})",
                node.hostname, node.ek.anchor, node.ak.name
            );
            Ok(0)
        }
        AttestCmd::Golden {
            image,
            out,
            from_node: true,
            ..
        } => {
            let r = client(socket)
                .await?
                .golden_policy(pb::GoldenPolicyRequest { image })
                .await
                .map_err(|s| rpc("GoldenPolicy", s))?
                .into_inner();
            write_or_print(out.as_deref(), &r.policy_json)?;
            eprintln!("{} files", r.files);
            Ok(0)
        }
        AttestCmd::Golden {
            image,
            out,
            from_node: false,
            registry_config_path,
            username,
            password,
            identity_token,
        } => {
            let creds = imacri_runtime::image::Credentials {
                username: username.unwrap_or_default(),
                password: password.unwrap_or_default(),
                identity_token: identity_token.unwrap_or_default(),
                ..Default::default()
            };
            let a = imacri_runtime::integrity::golden::from_registry(
                &image,
                &registry_config_path,
                &creds,
                &std::env::temp_dir(),
            )
            .await
            .with_context(|| format!("reading {image} from its registry"))?;
            write_or_print(out.as_deref(), &a.to_json())?;
            eprintln!("{} files", a.files.len());
            Ok(0)
        }
        AttestCmd::Log { pod } => {
            let r = client(socket)
                .await?
                .get_log(pb::GetLogRequest {
                    pod_sandbox_id: pod,
                })
                .await
                .map_err(|s| rpc("GetLog", s))?
                .into_inner();
            for l in r.entries {
                println!("{l}");
            }
            Ok(0)
        }
        AttestCmd::Quote { pod, nonce, out } => {
            let nonce = match nonce {
                Some(h) => hex::decode(&h).context("--nonce must be hex")?,
                None => rand::random::<[u8; 32]>().to_vec(),
            };
            let ev = fetch(&mut client(socket).await?, &pod, nonce).await?;
            write_or_print(out.as_deref(), &(serde_json::to_string_pretty(&ev)? + "\n"))?;
            Ok(0)
        }
        AttestCmd::Verify {
            pod,
            policy,
            node,
            ak,
            evidence,
            nonce,
            allow_unanchored,
            allow_gaps,
            counters,
        } => {
            let code = match verify_once(
                socket,
                &pod,
                &policy,
                Registered::new(node.as_deref(), ak.as_deref()),
                evidence
                    .as_deref()
                    .map(|e| (e, nonce.as_deref().unwrap_or_default())),
                Accept {
                    unanchored: allow_unanchored,
                    gaps: allow_gaps,
                },
                counters.as_deref(),
            )
            .await
            {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    r.verdict.exit_code()
                }
                Err(e) => {
                    eprintln!("imacri attest verify: {e:#}");
                    Verdict::Invalid.exit_code()
                }
            };
            Ok(code)
        }
        AttestCmd::Watch {
            policy,
            node,
            ak,
            interval,
            count,
            allow_unanchored,
            allow_gaps,
            counters,
        } => {
            watch(
                socket,
                &policy,
                Registered::new(node.as_deref(), ak.as_deref()),
                parse_interval(&interval)?,
                count,
                counters.as_deref(),
                Accept {
                    unanchored: allow_unanchored,
                    gaps: allow_gaps,
                },
            )
            .await?;
            Ok(0)
        }
    }
}

async fn fetch(c: &mut AttestationClient<Channel>, pod: &str, nonce: Vec<u8>) -> Result<Evidence> {
    let ev = c
        .quote(pb::QuoteRequest {
            pod_sandbox_id: pod.to_string(),
            nonce,
        })
        .await
        .map_err(|s| rpc(&format!("Quote({pod})"), s))?
        .into_inner()
        .evidence
        .ok_or_else(|| anyhow!("the node returned no evidence"))?;
    Ok(crate::evidence::from_proto(ev))
}

/// "GetLog: NotFound: pod sandbox ... not found": the node's words, with the code.
pub(crate) fn rpc(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{what}: {:?}: {}", s.code(), s.message())
}

/// What a verifier accepts beyond fully anchored, gap-free evidence.
#[derive(Clone, Copy)]
struct Accept {
    unanchored: bool,
    gaps: bool,
}

/// Where the verifier's trust in a node's AK comes from.
#[derive(Clone, Copy)]
enum Registered<'a> {
    /// An enrolled node's file (`attest enroll`).
    Node(&'a Path),
    /// A key handed over by the node itself (`attest ak`).
    Ak(&'a Path),
    None,
}

impl<'a> Registered<'a> {
    fn new(node: Option<&'a Path>, ak: Option<&'a Path>) -> Registered<'a> {
        match (node, ak) {
            (Some(n), _) => Registered::Node(n),
            (None, Some(a)) => Registered::Ak(a),
            (None, None) => Registered::None,
        }
    }
}

fn load_inputs(policy: &Path, reg: Registered<'_>) -> Result<(Allowlist, Option<String>)> {
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
struct CounterBook {
    path: Option<PathBuf>,
    seen: std::collections::BTreeMap<String, verify::TpmCounters>,
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
fn check(
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

async fn verify_once(
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

async fn watch(
    socket: &Target,
    policy: &Path,
    reg: Registered<'_>,
    interval: Duration,
    count: Option<u64>,
    counters: Option<&Path>,
    accept: Accept,
) -> Result<()> {
    let (policy, ak) = load_inputs(policy, reg)?;
    let mut book = CounterBook::open(counters)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut round = 0u64;
    loop {
        round += 1;
        match client(socket).await {
            Ok(mut c) => match c.list_pods(pb::ListPodsRequest {}).await {
                Ok(list) => {
                    for p in list.into_inner().pods.into_iter().filter(|p| p.ready) {
                        let nonce = rand::random::<[u8; 32]>().to_vec();
                        let alerts = match fetch(&mut c, &p.pod_sandbox_id, nonce.clone()).await {
                            Ok(ev) => {
                                let r = check(
                                    &ev,
                                    &p.pod_sandbox_id,
                                    &nonce,
                                    &policy,
                                    ak.as_deref(),
                                    accept,
                                    &mut book,
                                );
                                match r {
                                    Ok(r) => alert_lines(&p, &r),
                                    Err(e) => vec![format!(
                                        "ALERT pod={} counters not recorded: {e:#}",
                                        p.pod_sandbox_id
                                    )],
                                }
                            }
                            Err(e) => vec![format!(
                                "ALERT pod={} name={}/{} evidence unavailable: {e:#}",
                                p.pod_sandbox_id, p.namespace, p.name
                            )],
                        };
                        for a in alerts {
                            if seen.insert(a.clone()) {
                                println!("{a}");
                            }
                        }
                    }
                }
                Err(s) => eprintln!("ListPods: {}", s.message()),
            },
            Err(e) => eprintln!("{e:#}"),
        }
        if count.is_some_and(|n| round >= n) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

fn alert_lines(p: &pb::ImaPod, r: &Report) -> Vec<String> {
    let who = format!("pod={} name={}/{}", p.pod_sandbox_id, p.namespace, p.name);
    let mut out: Vec<String> = r
        .errors
        .iter()
        .map(|e| format!("ALERT {who} evidence invalid: {e}"))
        .collect();
    out.extend(r.violations.iter().map(|v| {
        format!(
            "ALERT {who} container={} {} path={} digest={} reason={:?}",
            v.container,
            v.event.as_str(),
            v.path,
            v.digest,
            v.reason
        )
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("7").unwrap(), Duration::from_secs(7));
        assert!(parse_interval("soon").is_err());
        assert!(parse_interval("3d").is_err());
    }
}
