//! The `imacri` command: `serve`, `check`, `attest`, `config default`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use imacri_runtime::config::{Config, DEFAULT_TOML};
use imacri_runtime::logsink::{self, LogSink, SinkGuard};
use std::path::PathBuf;

/// mimalloc, for Rust's allocations and (`override`) every C library's in
/// the process: each thread allocates from pages of its own and frees into
/// another thread's with an atomic push, so no thread waits on a lock
/// another holds. glibc's malloc locks an arena per call that misses the
/// thread's cache, and the threads working for a pod run in the pod's CPU
/// cgroup, where they are stopped wherever they are when it reaches its
/// limit (on the way back to user mode, a timer interrupt's too): one
/// stopped inside `realloc` held its arena for the rest of the period, and
/// every other pod's reader, hashing thread and the gRPC workers that
/// shared the arena waited ~90 ms with it (`perf` of
/// `a_throttled_pod_does_not_stall_other_pods`: 3 runs in ~42; none in 42
/// since). The price is memory per thread, ~75 KiB: an ima container's
/// reader and listener end while idle (`integrity::park`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "imacri",
    version,
    about = "A CRI runtime with per-pod file integrity"
)]
struct Cli {
    /// Config file (default /etc/imacri/config.toml; missing = defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Default)]
struct Overrides {
    /// CRI socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Persistent state directory.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Volatile state directory.
    #[arg(long)]
    state: Option<PathBuf>,
    #[arg(long)]
    containerd_address: Option<PathBuf>,
    #[arg(long)]
    containerd_namespace: Option<String>,
    /// containerd hosts.toml directory (e.g. /etc/containerd/certs.d).
    #[arg(long)]
    registry_config_path: Option<PathBuf>,
    /// "text" or "json".
    #[arg(long)]
    log_format: Option<String>,
    /// CNI network config directory.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// CNI plugin directory (replaces the configured list).
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
    /// Backend for ima pods: auto, kernel or fanotify.
    #[arg(long)]
    ima_backend: Option<imacri_runtime::integrity::setting::BackendChoice>,
    /// TPM for anchoring measurements, e.g. "device:/dev/tpmrm0" or
    /// "swtpm:host=127.0.0.1,port=2321".
    #[arg(long)]
    tpm_tcti: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    /// The verifier-only socket (attestation service alone; "" for none).
    #[arg(long)]
    attest_socket: Option<PathBuf>,
    /// Also serve attestation on this TCP address, with mutual TLS
    /// (needs --attest-tls-cert, --attest-tls-key, --attest-client-ca).
    #[arg(long)]
    attest_tcp: Option<String>,
    #[arg(long)]
    attest_tls_cert: Option<PathBuf>,
    #[arg(long)]
    attest_tls_key: Option<PathBuf>,
    #[arg(long)]
    attest_client_ca: Option<PathBuf>,
    /// Image for pod sandboxes (pinned: kubelet never collects it);
    /// unset: imacri's built-in pause image.
    #[arg(long)]
    sandbox_image: Option<String>,
    /// CDI spec directory (repeat; replaces the configured list, lowest
    /// priority first).
    #[arg(long)]
    cdi_spec_dir: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve CRI on the socket.
    Serve(Overrides),
    /// Report what this node supports.
    Check(Overrides),
    /// Attestation of ima pods: keys, policies, logs, quotes, verification.
    Attest {
        /// The node's verifier socket (the attestation service alone; the
        /// CRI socket serves it too).
        #[arg(long, global = true, default_value = "/run/imacri/attest.sock")]
        socket: PathBuf,
        /// Reach the node over TCP with mutual TLS instead
        /// (https://HOST:PORT, the node's `attestation.tcp`).
        #[arg(long, global = true)]
        endpoint: Option<String>,
        /// CA the node's certificate must chain to.
        #[arg(long, global = true)]
        tls_ca: Option<PathBuf>,
        /// This verifier's client certificate and key.
        #[arg(long, global = true)]
        tls_cert: Option<PathBuf>,
        #[arg(long, global = true)]
        tls_key: Option<PathBuf>,
        #[command(subcommand)]
        cmd: imacri_cri::attest::AttestCmd,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Helpers the daemon runs as child processes.
    #[command(hide = true)]
    Internal {
        #[command(subcommand)]
        cmd: InternalCmd,
    },
}

#[derive(Subcommand)]
enum InternalCmd {
    /// Activate the IMA namespace of a pinned user namespace (kernel backend).
    ImaActivate {
        #[arg(long)]
        userns: PathBuf,
        /// File with the rendered policy.
        #[arg(long)]
        policy_file: PathBuf,
        #[arg(long)]
        hash: Option<String>,
        #[arg(long)]
        template: Option<String>,
    },
    /// Hold the map guard's seccomp listener fds while imacri is down.
    FdKeeper {
        #[arg(long)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the default configuration, commented.
    Default,
}

impl Overrides {
    fn apply(self, mut c: Config) -> Config {
        if let Some(v) = self.socket {
            c.socket = v;
        }
        if let Some(v) = self.root {
            c.root = v;
        }
        if let Some(v) = self.state {
            c.state = v;
        }
        if let Some(v) = self.containerd_address {
            c.containerd.address = v;
        }
        if let Some(v) = self.containerd_namespace {
            c.containerd.namespace = v;
        }
        if let Some(v) = self.registry_config_path {
            c.registry.config_path = v;
        }
        if let Some(v) = self.log_format {
            c.log.format = v;
        }
        if let Some(v) = self.log_level {
            c.log.level = v;
        }
        if let Some(v) = self.cni_conf_dir {
            c.cni.conf_dir = v;
        }
        if let Some(v) = self.cni_bin_dir {
            c.cni.bin_dirs = vec![v];
        }
        if let Some(v) = self.attest_socket {
            c.attestation.socket = v;
        }
        if let Some(v) = self.attest_tcp {
            c.attestation.tcp = v;
        }
        if let Some(v) = self.attest_tls_cert {
            c.attestation.tls_cert = v;
        }
        if let Some(v) = self.attest_tls_key {
            c.attestation.tls_key = v;
        }
        if let Some(v) = self.attest_client_ca {
            c.attestation.client_ca = v;
        }
        if let Some(v) = self.sandbox_image {
            c.sandbox_image = v;
        }
        if !self.cdi_spec_dir.is_empty() {
            c.cdi_spec_dirs = self.cdi_spec_dir;
        }
        if let Some(v) = self.ima_backend {
            c.ima.backend = v;
        }
        if let Some(v) = self.tpm_tcti {
            c.ima.tpm_tcti = v;
        }
        c
    }
}

/// Logs through [`LogSink`]: no thread waits on stderr (see there). A
/// panic first lets what was logged before it be written.
fn init_logging(cfg: &Config) -> Result<(LogSink, SinkGuard)> {
    let (sink, guard) = LogSink::spawn(std::io::stderr(), logsink::QUEUED_LIMIT)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let s = sink.clone();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || s.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    let hook = std::panic::take_hook();
    let s = sink.clone();
    std::panic::set_hook(Box::new(move |info| {
        s.wait_written(std::time::Duration::from_millis(200));
        hook(info)
    }));
    Ok((sink, guard))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Runs before any thread exists: joining a user namespace needs that.
    if let Cmd::Internal {
        cmd:
            InternalCmd::ImaActivate {
                userns,
                policy_file,
                hash,
                template,
            },
    } = &cli.cmd
    {
        let policy = std::fs::read_to_string(policy_file)?;
        imacri_runtime::integrity::kernel::activate_in_userns(
            userns,
            &imacri_runtime::integrity::kernel::Activation {
                hash: hash.as_deref(),
                template: template.as_deref(),
                policy: &policy,
            },
        )?;
        return Ok(());
    }
    if let Cmd::Internal {
        cmd: InternalCmd::FdKeeper { socket },
    } = &cli.cmd
    {
        imacri_runtime::integrity::keeper::close_inherited();
        imacri_runtime::integrity::keeper::run(socket)?;
        return Ok(());
    }
    imacri_runtime::integrity::charge::born_home();
    // The runtime's threads never work for a pod: they are at home, and a
    // reader or hashing thread they start knows it is (no move to make).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(imacri_runtime::integrity::charge::born_home)
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Internal { .. } => Ok(()),
        Cmd::Config {
            cmd: ConfigCmd::Default,
        } => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Cmd::Serve(o) => {
            let cfg = o.apply(Config::load(cli.config.as_deref())?);
            let (sink, _guard) = init_logging(&cfg)?;
            if let Err(e) = imacri_cri::daemon::serve(cfg).await {
                tracing::error!("{e:#}");
                sink.wait_written(std::time::Duration::from_secs(1));
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Attest {
            socket,
            endpoint,
            tls_ca,
            tls_cert,
            tls_key,
            cmd,
        } => {
            let target = match endpoint {
                None => imacri_cri::attest::Target::Socket(socket),
                Some(url) => imacri_cri::attest::Target::Tls {
                    url,
                    ca: tls_ca,
                    cert: tls_cert,
                    key: tls_key,
                },
            };
            let code = imacri_cri::attest::run(&target, cmd)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("imacri attest: {e:#}");
                    1
                });
            std::process::exit(code);
        }
        Cmd::Check(o) => {
            let cfg = o.apply(Config::load(cli.config.as_deref())?);
            let ok = imacri_cri::check::check(&cfg).await?;
            std::process::exit(if ok { 0 } else { 1 });
        }
    }
}
