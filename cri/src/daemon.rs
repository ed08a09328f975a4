//! `imacri serve`: connect to containerd, recover state, serve CRI on the
//! unix socket until SIGTERM/SIGINT.

use anyhow::{bail, Context, Result};
use imacri_runtime::config::Config;
use imacri_runtime::containerd::Containerd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;

use crate::server::{attestation_service, services, CriServer};

/// Binds the CRI socket: refuses a socket a live server holds, replaces a
/// stale one, and sets mode 0660.
async fn bind_socket(path: &Path) -> Result<UnixListener> {
    bind_socket_as(path, 0o660, "").await
}

/// Binds a unix socket with `mode`, owned by `group` when one is named.
async fn bind_socket_as(path: &Path, mode: u32, group: &str) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is in use by a running server (another imacri?); stop it or pass --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if !group.is_empty() {
        let g = nix::unistd::Group::from_name(group)
            .with_context(|| format!("looking up group {group}"))?
            .with_context(|| format!("group {group} does not exist"))?;
        nix::unistd::chown(path, None, Some(g.gid))
            .with_context(|| format!("chown {} to group {group}", path.display()))?;
    }
    Ok(l)
}

/// Sets the open-file limit to its hard maximum, capped at
/// `keeper::MAX_OPEN_FILES`: every measured container holds a fanotify
/// group and every pending event an fd, so one pod's flood must not exhaust
/// imacri's descriptors, and the fd-number sweep after a crash stays
/// bounded. (Root here lacks CAP_SYS_RESOURCE: the hard limit is as far as
/// it goes.)
fn raise_nofile() {
    use imacri_runtime::integrity::keeper::open_files_limit;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = open_files_limit(lim.rlim_max);
        if want != lim.rlim_cur {
            let set = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &set) == 0 {
                tracing::debug!(from = lim.rlim_cur, to = want, "set RLIMIT_NOFILE");
            }
        }
    }
}

/// The attestation service's TCP endpoint, if configured: never without
/// mutual TLS (a verifier's client certificate must chain to `client_ca`).
async fn attestation_tcp(
    cfg: &Config,
) -> Result<Option<(tokio::net::TcpListener, tonic::transport::ServerTlsConfig)>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let a = &cfg.attestation;
    if a.tcp.is_empty() {
        return Ok(None);
    }
    let read = |p: &Path, key: &str| -> Result<Vec<u8>> {
        if p.as_os_str().is_empty() {
            bail!("attestation.tcp is set: attestation.{key} is required (the endpoint only serves mutual TLS)");
        }
        std::fs::read(p).with_context(|| format!("reading attestation.{key} {}", p.display()))
    };
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&a.tls_cert, "tls_cert")?,
            read(&a.tls_key, "tls_key")?,
        ))
        .client_ca_root(Certificate::from_pem(read(&a.client_ca, "client_ca")?))
        .client_auth_optional(false);
    let l = tokio::net::TcpListener::bind(&a.tcp)
        .await
        .with_context(|| format!("binding attestation.tcp {}", a.tcp))?;
    tracing::info!(address = %a.tcp, "serving attestation over mutual TLS");
    Ok(Some((l, tls)))
}

pub async fn serve(cfg: Config) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_nofile();
    let c = Containerd::connect(
        &cfg.containerd.address,
        &cfg.containerd.namespace,
        Duration::from_secs(cfg.containerd.connect_timeout_secs),
    )
    .await?;
    let v = c.version().await?;
    tracing::info!(version = %v.version, address = %cfg.containerd.address.display(), namespace = %cfg.containerd.namespace, "connected to containerd");
    if cfg.containerd.namespace == "k8s.io" && c.cri_plugin_loaded().await? {
        bail!(
            "containerd's own CRI plugin is running and manages the k8s.io namespace imacri uses. \
             Disable it: add `disabled_plugins = [\"io.containerd.grpc.v1.cri\"]` to containerd's \
             config.toml and restart containerd (or give imacri another --containerd-namespace)"
        );
    }
    let listener = bind_socket(&cfg.socket).await?;
    let (streaming, stream_listener) =
        crate::streaming::Streaming::bind(&cfg.streaming.address, cfg.streaming.port)
            .await
            .with_context(|| {
                format!(
                    "binding the streaming server on {}:{}",
                    cfg.streaming.address, cfg.streaming.port
                )
            })?;
    let server = CriServer::new(cfg.clone(), c, streaming.clone()).await?;
    server.start_nri().await?;
    // Start-up (image records, recovery, probes) leaves freed heap glibc
    // keeps mapped; hand it back so idle RSS is what the daemon holds.
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let runtime: std::sync::Weak<dyn crate::streaming::StreamRuntime> =
        std::sync::Arc::downgrade(&server) as _;
    tokio::spawn(crate::streaming::serve(stream_listener, streaming, runtime));
    let attestation = attestation_service(server.clone());
    // The verifier-only endpoint: the attestation service and nothing
    // else, so a verifier holds no power over the node.
    let verifier = if cfg.attestation.socket.as_os_str().is_empty() {
        None
    } else {
        Some(
            bind_socket_as(
                &cfg.attestation.socket,
                cfg.attestation.socket_mode,
                &cfg.attestation.socket_group,
            )
            .await?,
        )
    };
    let tcp = attestation_tcp(&cfg).await?;
    let (runtime, images) = services(server.clone());
    tracing::info!(socket = %cfg.socket.display(), attest_socket = %cfg.attestation.socket.display(), "serving CRI");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let held = crate::server::held::Limits::from_secs(cfg.attestation.unread_secs);
    let verifier_task = verifier.map(|l| {
        let svc = attestation_service(server.clone());
        let done = stopped(stop_rx.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(crate::server::deadline::DeadlineLayer)
                .layer(crate::server::held::layer(held))
                .add_service(svc)
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), done)
                .await
        })
    });
    let tcp_task = tcp.map(|(l, tls)| {
        let svc = attestation_service(server.clone());
        let done = stopped(stop_rx.clone());
        tokio::spawn(async move {
            let builder = tonic::transport::Server::builder().tls_config(tls);
            match builder {
                Ok(b) => {
                    b.layer(crate::server::deadline::DeadlineLayer)
                        .layer(crate::server::held::layer(held))
                        .add_service(svc)
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(l),
                            done,
                        )
                        .await
                }
                Err(e) => Err(e),
            }
        })
    });
    tonic::transport::Server::builder()
        .layer(crate::server::deadline::DeadlineLayer)
        .layer(crate::server::held::layer(held))
        .add_service(runtime)
        .add_service(images)
        .add_service(attestation)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stop_rx))
        .await
        .context("CRI server")?;
    if let Some(t) = tcp_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %e, "verifier TCP endpoint");
        }
    }
    if let Some(t) = verifier_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %e, "verifier endpoint");
        }
        let _ = std::fs::remove_file(&cfg.attestation.socket);
    }
    server.stop_nri().await;
    server.finish_removals(None, REMOVALS_LIMIT).await;
    server
        .delete_leases("whose deletion after a response failed")
        .await;
    // The containers live on: their fanotify groups stay with the fd keeper.
    // What was read is answered first (a crash's in-flight events are
    // refused instead); the rest waits in the kernel for the next imacri.
    if let Some(e) = server.integrity.engine.clone() {
        e.detach();
        let left = tokio::task::spawn_blocking(move || e.drain(DRAIN_LIMIT))
            .await
            .unwrap_or(usize::MAX);
        if left > 0 {
            tracing::warn!(
                left,
                "stopping with measured accesses unanswered: the next imacri refuses them"
            );
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// How long a graceful stop waits for containerd deletions of removed
/// containers still in flight.
const REMOVALS_LIMIT: Duration = Duration::from_secs(10);

/// How long a graceful stop waits for measured accesses in flight (a large
/// file being hashed) to be answered.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
