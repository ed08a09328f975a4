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
    let verifier_task = verifier.map(|l| {
        let svc = attestation_service(server.clone());
        let done = stopped(stop_rx.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(crate::server::deadline::DeadlineLayer)
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

/// How long a graceful stop waits for measured accesses in flight (a large
/// file being hashed) to be answered.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// One line per node capability for `imacri check`; Err if pods cannot run.
pub async fn check(cfg: &Config) -> Result<bool> {
    let mut ok = true;
    let mut line = |name: &str, good: bool, detail: String| {
        println!(
            "{:<18} {:<8} {detail}",
            name,
            if good { "ok" } else { "missing" }
        );
        if !good && matches!(name, "containerd" | "containerd-cri" | "runc") {
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
            match imacri_runtime::idmap::probe_snapshotter(&c, &cfg.containerd.snapshotter).await {
                Ok(()) => line(
                    "idmapped-rootfs",
                    true,
                    "user-namespace pods run on ID-mapped image layers (no copy)".into(),
                ),
                Err(why) => line(
                    "idmapped-rootfs",
                    false,
                    format!("{why}; user-namespace pods get a chowned copy of their image"),
                ),
            }
        }
        Err(e) => line("containerd", false, e.to_string()),
    }
    let runc = std::process::Command::new("runc").arg("--version").output();
    match runc {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            line("runc", true, text.lines().next().unwrap_or("").to_string());
            match imacri_runtime::sysinfo::runc_exec_nofile_race(&text) {
                None => line(
                    "runc-exec-rlimits",
                    true,
                    "execs get the container's rlimits".into(),
                ),
                Some(why) => line("runc-exec-rlimits", false, why),
            }
        }
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
    match imacri_runtime::sysinfo::criu_check() {
        Ok(()) => line("criu", true, "`criu check` passes".into()),
        Err(why) => line(
            "criu",
            false,
            format!("CheckpointContainer is unavailable: `criu check`: {why}"),
        ),
    }
    match imacri_runtime::integrity::kernel::probe() {
        Ok(()) => line(
            "ima-namespaces",
            true,
            "a user namespace's securityfs has ima/active".into(),
        ),
        Err(r) => line("ima-namespaces", false, r),
    }
    let fan = imacri_runtime::integrity::fanotify::probe();
    match &fan {
        Ok(()) => line(
            "fanotify",
            true,
            "permission events (FAN_OPEN_EXEC_PERM) with filesystem marks".into(),
        ),
        Err(r) => line("fanotify", false, r.clone()),
    }
    let landlock = imacri_runtime::integrity::init::probe().and_then(|abi| {
        if imacri_runtime::integrity::init::noexec(&cfg.root) {
            Err(format!(
                "root {} is on a filesystem mounted noexec: imacri's container init cannot run \
                 from there (nor from a bind mount of it)",
                cfg.root.display()
            ))
        } else {
            Ok(abi)
        }
    });
    match &landlock {
        Ok(abi) => line(
            "ima-landlock",
            true,
            format!(
                "Landlock ABI {abi}: ima pods' processes run through imacri's init ({}), which \
                 allows execution only beneath the container's root (no file from another \
                 filesystem, fd or root runs); ima containers get no_new_privs",
                imacri_runtime::integrity::init::PATH
            ),
        ),
        Err(r) => line("ima-landlock", false, r.clone()),
    }
    match imacri_runtime::integrity::fanotify::lease_probe() {
        Ok(()) => line(
            "ima-tomtou",
            true,
            "files ima containers map executable: an open for writing asks first (refused \
             under enforce), a truncate(2) breaks imacri's read lease and waits until the \
             violation is logged (under enforce, until the container is killed)"
                .into(),
        ),
        Err(r) => line(
            "ima-tomtou",
            false,
            format!("{r}; opens for writing of mapped files are still decided first"),
        ),
    }
    match imacri_runtime::integrity::fanotify::deny_errno_probe() {
        Ok(()) => line(
            "ima-exec-window",
            true,
            "an execution of a rootfs (overlay) file is answered with a read lease held until \
             the kernel's writers check; a file open for writing is refused with ETXTBSY; a \
             program's ELF interpreter is watched for writers as a mapping"
                .into(),
        ),
        Err(r) => line("ima-exec-window", false, r),
    }
    let fan = fan.and_then(|()| landlock.map(|_| ()));
    match imacri_runtime::integrity::guard::probe() {
        Ok(()) => line(
            "ima-guards",
            true,
            "ima pods: vm.memfd_noexec=2 per pid namespace, user.max_user_namespaces=0, \
             no SYS_ADMIN/SYS_RESOURCE/... capabilities (however spelt), volumes noexec with \
             every mount beneath them, no mount propagation from the host, no 32-bit programs"
                .into(),
        ),
        Err(r) => line("ima-guards", false, r),
    }
    let open_file = imacri_runtime::integrity::guard::node_open_file_interpreters();
    match imacri_runtime::integrity::guard::probe_binfmt() {
        Ok(()) => line(
            "ima-binfmt",
            true,
            format!(
                "ima pods get a binfmt_misc of their own: the node's interpreters ({} opened in \
                 advance with flag F) do not run there",
                open_file.len()
            ),
        ),
        Err(why) if open_file.is_empty() => line(
            "ima-binfmt",
            true,
            format!(
                "no node interpreter is opened in advance (flag F); a pod's own binfmt_misc: {why}"
            ),
        ),
        Err(why) => line(
            "ima-binfmt",
            false,
            format!(
                "ima pods are refused while the node has binfmt_misc interpreters opened in \
                 advance (flag F: {}) and cannot get a binfmt_misc of their own: {why}",
                open_file.join(", ")
            ),
        ),
    }
    match imacri_runtime::integrity::mapguard::probe() {
        Ok(()) => line(
            "ima-map-guard",
            true,
            format!(
                "ima pods: mmap/mprotect with PROT_EXEC of any file measured through seccomp user \
                 notification, {}; shmat(SHM_EXEC) and READ_IMPLIES_EXEC refused; native \
                 syscalls only; the tasks sharing a caller's fd table or memory held still \
                 (ptrace) during its call, refused if they cannot be; an overlay file mapped \
                 shared and writable held open for writing until its container is gone (not \
                 executable meanwhile), and one whose upper file is open for writing (a mapping \
                 from outside the pod) a writers violation; pause's rootfs noexec",
                imacri_runtime::integrity::mapguard::file_source()
            ),
        ),
        Err(r) => line("ima-map-guard", false, r),
    }
    match imacri_runtime::integrity::charge::available() {
        Ok(()) => line(
            "ima-charges",
            true,
            "imacri's hashing, seccomp answers and fanotify answers for an ima pod run in the \
             pod's cpu and cpuacct cgroups (counted against its CPU limit, throttled with it)"
                .into(),
        ),
        Err(why) => line("ima-charges", false, why),
    }
    line(
        "ima-restarts",
        true,
        "while imacri is down, ima pods' executions and executable mappings wait (fanotify \
         groups and seccomp listeners held by `imacri internal fd-keeper`; events taken but \
         unanswered are denied); if the keeper is lost too, gaps are logged (fail_mode)"
            .into(),
    );
    let node = imacri_runtime::integrity::setting::NodeSupport {
        kernel: imacri_runtime::integrity::kernel::probe(),
        fanotify: fan,
    };
    match imacri_runtime::integrity::setting::resolve_backend(cfg.ima.backend, &node) {
        Ok(b) => line(
            "ima-backend",
            !matches!(b, imacri_runtime::integrity::setting::Backend::None(_)),
            format!("configured {:?}: ima pods get {b}", cfg.ima.backend).to_lowercase(),
        ),
        Err(e) => line("ima-backend", false, e.to_string()),
    }
    if cfg.ima.tpm_tcti.is_empty() {
        line(
            "tpm",
            false,
            if Path::new("/dev/tpmrm0").exists() {
                "/dev/tpmrm0 exists but ima.tpm_tcti is empty: set it to \"device:/dev/tpmrm0\" to anchor measurements".into()
            } else {
                "no ima.tpm_tcti configured and no /dev/tpmrm0: measurements are unanchored".into()
            },
        );
    } else {
        let tcti = cfg.ima.tpm_tcti.clone();
        let pcr = cfg.ima.pcr;
        let probe = tokio::task::spawn_blocking(move || {
            imacri_runtime::integrity::tpm::probe(&tcti, pcr)
                .map(|v| (v, imacri_runtime::integrity::tpm::has_ek_certificate(&tcti)))
        })
        .await;
        match probe {
            Ok(Ok((v, cert))) => line(
                "tpm",
                true,
                format!(
                    "{} reachable, PCR {pcr} = {}; {}",
                    cfg.ima.tpm_tcti,
                    hex_short(&v),
                    if cert {
                        "RSA EK certificate present (verifiers enroll with --ek-ca)"
                    } else {
                        "no RSA EK certificate in NV: verifiers must pin the EK (attest ek)"
                    }
                ),
            ),
            Ok(Err(e)) => line("tpm", false, e.to_string()),
            Err(e) => line("tpm", false, e.to_string()),
        }
    }
    let cni = imacri_runtime::cni::Cni::new(
        cfg.cni.conf_dir.clone(),
        cfg.cni.bin_dirs.clone(),
        cfg.root.join("cni"),
    );
    match cni.config() {
        Ok(c) => line(
            "cni",
            true,
            format!("network {:?} from {}", c.name, c.file.display()),
        ),
        Err(e) => line(
            "cni",
            false,
            format!("{e} (only host-network pods can run)"),
        ),
    }
    if cfg.nri.enable {
        let launched = std::fs::read_dir(&cfg.nri.plugin_path)
            .map(|d| d.flatten().count())
            .unwrap_or(0);
        line(
            "nri",
            true,
            format!(
                "plugins on {} ({}) and {launched} in {}; default rule {:?}, {} named rule(s); ima pods are never weakened",
                cfg.nri.socket_path.display(),
                if cfg.nri.disable_connections { "closed" } else { "open" },
                cfg.nri.plugin_path.display(),
                cfg.nri.default.security,
                cfg.nri.plugins.len()
            ),
        );
    } else {
        line(
            "nri",
            false,
            "off: set [nri] enable = true to run NRI plugins".into(),
        );
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.contains("Seccomp:"))
        .unwrap_or(false);
    line(
        "seccomp",
        seccomp,
        if seccomp {
            "filters supported".into()
        } else {
            "not in this kernel".into()
        },
    );
    let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    line(
        "apparmor",
        apparmor,
        if apparmor {
            "enabled".into()
        } else {
            "not enabled: RuntimeDefault is not applied, Localhost profiles are rejected".into()
        },
    );
    let selinux = Path::new("/sys/fs/selinux/enforce").exists();
    line(
        "selinux",
        selinux,
        if selinux {
            "enabled".into()
        } else {
            "not enabled: SELinux options are ignored".into()
        },
    );
    Ok(ok)
}

fn hex_short(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        + "..."
}
