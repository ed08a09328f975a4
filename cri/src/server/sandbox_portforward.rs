//! PortForward's connections: `127.0.0.1:<port>` dialed inside the pod's
//! network namespace (the host's for host-network pods).

use imacri_runtime::pod::SandboxPhase;

use super::CriServer;

impl CriServer {
    pub(crate) async fn dial_pod(
        &self,
        pod: &str,
        port: u16,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let sb = self
            .sandbox(pod)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))?;
        let st = sb.state();
        if st.phase != SandboxPhase::Ready {
            return Err(std::io::Error::other(format!(
                "pod sandbox {} is not ready",
                sb.id
            )));
        }
        connect_in(st.netns, port).await
    }
}

/// Connects to 127.0.0.1:port inside the network namespace at `netns`.
async fn connect_in(
    netns: Option<std::path::PathBuf>,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<std::net::TcpStream> {
            if let Some(ns) = netns {
                // This thread alone moves into the pod's network namespace.
                let f = std::fs::File::open(ns)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread died"))??;
    tokio::net::TcpStream::from_std(s)
}
