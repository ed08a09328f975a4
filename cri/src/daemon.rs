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

use crate::server::{services, CriServer};

/// Binds the CRI socket: refuses a socket a live server holds, replaces a
/// stale one, and sets mode 0660.
async fn bind_socket(path: &Path) -> Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

pub async fn serve(cfg: Config) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    tokio::spawn(crate::streaming::serve(
        stream_listener,
        streaming,
        std::sync::Arc::downgrade(&server),
    ));
    let (runtime, images) = services(server);
    tracing::info!(socket = %cfg.socket.display(), "serving CRI");
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    tonic::transport::Server::builder()
        .add_service(runtime)
        .add_service(images)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("CRI server")?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// One line per node capability for `imacri check`; Err if pods cannot run.
pub async fn check(cfg: &Config) -> Result<bool> {
    let mut ok = true;
    let mut line = |name: &str, good: bool, detail: String| {
        println!(
            "{:<18} {:<8} {detail}",
            name,
            if good { "ok" } else { "missing" }
        );
        if !good && matches!(name, "containerd" | "runc") {
            ok = false;
        }
    };
    match Containerd::connect(
        &cfg.containerd.address,
        &cfg.containerd.namespace,
        Duration::from_secs(2),
    )
    .await
    {
        Ok(c) => {
            let v = c.version().await.map(|v| v.version).unwrap_or_default();
            let cri = c.cri_plugin_loaded().await.unwrap_or(false);
            line(
                "containerd",
                true,
                format!("{} at {}", v, cfg.containerd.address.display()),
            );
            line(
                "containerd-cri",
                !cri,
                if cri {
                    "containerd's CRI plugin is enabled: disable it (disabled_plugins)".into()
                } else {
                    "disabled, as required".into()
                },
            );
        }
        Err(e) => line("containerd", false, e.to_string()),
    }
    let runc = std::process::Command::new("runc").arg("--version").output();
    match runc {
        Ok(o) if o.status.success() => line(
            "runc",
            true,
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        ),
        _ => line("runc", false, "runc not found in PATH".into()),
    }
    line(
        "cgroups",
        true,
        format!("{:?}", imacri_runtime::sysinfo::cgroup_version()),
    );
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    line(
        "user-namespaces",
        userns > 0,
        format!("max_user_namespaces={userns}"),
    );
    line(
        "ima-namespaces",
        false,
        "not in this kernel (no IMA namespace support in mainline)".into(),
    );
    line(
        "cni",
        false,
        "CNI networking is not implemented in this imacri version".into(),
    );
    line(
        "tpm",
        Path::new("/dev/tpmrm0").exists(),
        if Path::new("/dev/tpmrm0").exists() {
            "/dev/tpmrm0".into()
        } else {
            "no /dev/tpmrm0".into()
        },
    );
    Ok(ok)
}
