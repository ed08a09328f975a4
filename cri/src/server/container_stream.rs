//! Exec, Attach and PortForward: validate, then hand out a single-use URL
//! of the streaming server, which calls back through `StreamRuntime`
//! (implemented in `container_exec.rs`, `container_attach.rs` and
//! `sandbox_portforward.rs`).

use imacri_api::cri;
use imacri_runtime::pod::{ContainerPhase, SandboxPhase};
use imacri_runtime::{Error, Result};

use super::validate::non_empty;
use super::CriServer;
use crate::streaming::{Pending, ProcessIo, StreamRuntime};

fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<()> {
    if !(stdin || stdout || stderr) {
        return Err(Error::InvalidArgument(
            "one of stdin, stdout and stderr must be true".into(),
        ));
    }
    if tty && stderr {
        return Err(Error::InvalidArgument(
            "tty and stderr cannot both be true".into(),
        ));
    }
    Ok(())
}

impl CriServer {
    fn require_running(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        if c.state().phase != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        Ok(())
    }

    pub(crate) async fn exec(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse> {
        non_empty("container_id", &req.container_id)?;
        if req.cmd.is_empty() {
            return Err(Error::InvalidArgument("cmd must not be empty".into()));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.require_running(&req.container_id)?;
        Ok(cri::ExecResponse {
            url: self.streaming.url(Pending::Exec(req)),
        })
    }

    pub(crate) async fn attach(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse> {
        non_empty("container_id", &req.container_id)?;
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.require_running(&req.container_id)?;
        // A tty or stdin the container was not created with is not refused,
        // as in containerd: the container's own streams are attached (no
        // stderr of a tty, no stdin where it has none).
        Ok(cri::AttachResponse {
            url: self.streaming.url(Pending::Attach(req)),
        })
    }

    pub(crate) async fn port_forward(
        &self,
        req: cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse> {
        let sb = self.sandbox(&req.pod_sandbox_id)?;
        if sb.state().phase != SandboxPhase::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sb.id
            )));
        }
        // The ports are not checked here, as in containerd: clients name
        // each connection's port on its stream (a port no one can reach
        // fails that stream with an error that says so).
        Ok(cri::PortForwardResponse {
            url: self.streaming.url(Pending::PortForward(req)),
        })
    }
}

#[tonic::async_trait]
impl StreamRuntime for CriServer {
    async fn exec(&self, req: cri::ExecRequest, io: ProcessIo) -> Result<i32> {
        self.stream_exec(req, io).await
    }

    async fn attach(&self, req: cri::AttachRequest, io: ProcessIo) -> Result<()> {
        self.stream_attach(req, io).await
    }

    async fn dial(&self, pod: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        self.dial_pod(pod, port).await
    }
}
