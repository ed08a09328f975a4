//! `imacri attest`: the verifier side. Talks to a node's attestation service
//! over its verifier socket (`attestation.socket`, which serves nothing
//! else; forward it to reach a remote node) and checks the evidence locally
//! with `imacri_runtime::integrity::verify`.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_client::AttestationClient;
use imacri_runtime::integrity::verify::{Evidence, Verdict};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

// Checking evidence (the inputs a verifier trusts, the TPM counters it
// saw) and watching every ima pod of a node, each in a file of its own.
mod check;
mod watch;

use check::verify_once;
use watch::watch;

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
        /// Only the log after the entries a verifier checked (its
        /// checkpoint's `entries`), in the epoch begun at `--from-epoch`
        /// (its `epoch_started_at`); another epoch gets the whole log.
        #[arg(long, requires = "from_epoch")]
        from_entry: Option<u64>,
        #[arg(long, requires = "from_entry")]
        from_epoch: Option<i64>,
        /// With --from-entry: leave out the pod's first N entries (those
        /// the verifier appraised: its checkpoint's
        /// `pods.<pod>.appraisal.entries`).
        #[arg(long, requires = "from_entry", default_value_t = 0)]
        pod_from_entry: u64,
    },
    /// Verify a pod. Prints a JSON report; exit 0 trusted, 1 violations,
    /// 2 evidence invalid, tampered or unavailable.
    Verify {
        #[arg(long)]
        pod: String,
        #[command(flatten)]
        trust: Trust,
        /// Verify saved evidence (from `attest quote`) instead of asking the node.
        #[arg(long, requires = "nonce")]
        evidence: Option<PathBuf>,
        /// With --evidence: the hex nonce the evidence must answer.
        #[arg(long)]
        nonce: Option<String>,
    },
    /// Verify every ima pod periodically; prints one alert line per new
    /// violation or invalid evidence.
    Watch {
        #[command(flatten)]
        trust: Trust,
        /// e.g. 30s, 5m, 500ms.
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Stop after this many rounds (default: forever).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// What `verify` and `watch` check evidence against and accept.
#[derive(clap::Args)]
pub struct Trust {
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
    /// Accept evidence from a node without a TPM (proves nothing).
    #[arg(long)]
    allow_unanchored: bool,
    /// Trust a pod whose log has gaps (it was not measured for a while).
    #[arg(long)]
    allow_gaps: bool,
    /// Require every container's policy to have denied executable memory no
    /// file backs (`anonymous_exec = "deny"`, declared by its start entry):
    /// code that no measurement shows could not have run.
    #[arg(long)]
    require_anonymous_exec_denied: bool,
    /// File remembering the newest TPM counters seen per attestation key:
    /// a quote older than that is refused (replay), and a valid one moves
    /// it forward. Kept across runs.
    #[arg(long)]
    counters: Option<PathBuf>,
    /// Entries per GetLogPage call while building a checkpoint (tests).
    #[arg(long, default_value_t = 10_000, hide = true)]
    page_entries: u32,
    /// A pod's entries before the checkpoint that this verifier has not
    /// appraised come in pages of their own past this many (tests).
    #[arg(long, default_value_t = 1024, hide = true)]
    pod_pages_after: u64,
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
    Ok(AttestationClient::new(ch).max_decoding_message_size(crate::evidence::MAX_EVIDENCE))
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
            print_log(&mut client(socket).await?, &pod).await?;
            Ok(0)
        }
        AttestCmd::Quote {
            pod,
            nonce,
            out,
            from_entry,
            from_epoch,
            pod_from_entry,
        } => {
            let nonce = match nonce {
                Some(h) => hex::decode(&h).context("--nonce must be hex")?,
                None => rand::random::<[u8; 32]>().to_vec(),
            };
            let since = from_entry.zip(from_epoch).map(|(entry, epoch)| Since {
                entry,
                epoch,
                pod_entry: pod_from_entry,
            });
            let ev = fetch(&mut client(socket).await?, &pod, nonce, since).await?;
            write_or_print(out.as_deref(), &(serde_json::to_string_pretty(&ev)? + "\n"))?;
            Ok(0)
        }
        AttestCmd::Verify {
            pod,
            trust,
            evidence,
            nonce,
        } => {
            let saved = evidence
                .as_deref()
                .map(|e| (e, nonce.as_deref().unwrap_or_default()));
            let code = match verify_once(socket, &pod, &trust, saved).await {
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
            trust,
            interval,
            count,
        } => {
            watch(socket, &trust, parse_interval(&interval)?, count).await?;
            Ok(0)
        }
    }
}

/// Prints a pod's entries, page by page (a long history passes what one
/// message carries); from GetLog on a node that does not page a pod's
/// entries, or for a pod it no longer quotes (removed, or without ima).
async fn print_log(c: &mut AttestationClient<Channel>, pod: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut from, mut epoch) = (0, None);
    loop {
        let req = pb::GetLogPageRequest {
            from_entry: from,
            max_entries: 0,
            pod_sandbox_id: pod.to_string(),
        };
        let r = match c.get_log_page(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if from == 0 && quotes_no_pages(s.code()) => break,
            Err(s) => return Err(rpc(&format!("GetLogPage({pod})"), s)),
        };
        if r.pod_sandbox_id.is_empty() && from == 0 {
            break;
        }
        let started = r.epoch.map(|e| e.started_at);
        if *epoch.get_or_insert(started) != started {
            bail!("the node's log began a new epoch while it was read (a reboot): read it again");
        }
        for l in &r.entries {
            writeln!(out, "{l}")?;
        }
        from += r.entries.len() as u64;
        if !r.more || r.entries.is_empty() {
            return Ok(out.flush()?);
        }
    }
    let r = c
        .get_log(pb::GetLogRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .map_err(|s| rpc("GetLog", s))?
        .into_inner();
    for l in r.entries {
        writeln!(out, "{l}")?;
    }
    Ok(out.flush()?)
}

/// GetLogPage's answers for a pod that GetLog may still know: a node
/// without pages of a pod, a pod removed and no longer quotable, one
/// without ima.
fn quotes_no_pages(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unimplemented | NotFound | FailedPrecondition)
}

/// Where a verifier's checkpoint ends: the node's log entries it
/// checked, their epoch, and the pod's entries it appraised.
#[derive(Debug, Clone, Copy, Default)]
struct Since {
    entry: u64,
    epoch: i64,
    pod_entry: u64,
}

/// Evidence for `pod` answering `nonce`, from where `since` says the
/// verifier checked the node's log before.
async fn fetch(
    c: &mut AttestationClient<Channel>,
    pod: &str,
    nonce: Vec<u8>,
    since: Option<Since>,
) -> Result<Evidence> {
    let since = since.unwrap_or_default();
    let ev = c
        .quote(pb::QuoteRequest {
            pod_sandbox_id: pod.to_string(),
            nonce,
            from_entry: since.entry,
            from_epoch: since.epoch,
            pod_from_entry: since.pod_entry,
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
