//! ExecSync: run a command in a running container, capture its output
//! (capped at 16 MiB per stream) and exit code, with a timeout. The process
//! itself is `container_exec.rs`'s, shared with streaming Exec.

use imacri_api::cri;
use imacri_runtime::io;
use imacri_runtime::{Error, Result};
use std::time::Duration;

use super::CriServer;

impl CriServer {
    pub(crate) async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse> {
        if req.cmd.is_empty() {
            return Err(Error::InvalidArgument("cmd must not be empty".into()));
        }
        let p = self
            .prepare_exec(&req.container_id, &req.cmd, false, false)
            .await?;
        let capture = |f: &Option<std::path::PathBuf>| {
            f.clone()
                .map(|p| io::spawn_capture(p, io::MAX_EXEC_OUTPUT))
                .transpose()
        };
        let (out, err) = match (capture(&p.stdio.stdout), capture(&p.stdio.stderr)) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                p.cleanup().await;
                return Err(e);
            }
        };
        let (out, out_hold, out_stop) = unzip3(out);
        let (err, err_hold, err_stop) = unzip3(err);
        let run = async {
            p.launch().await?;
            // Zero or negative: no timeout, as in containerd.
            if req.timeout <= 0 {
                return p.wait().await;
            }
            match tokio::time::timeout(Duration::from_secs(req.timeout as u64), p.wait()).await {
                Ok(r) => r,
                Err(_) => {
                    p.kill().await;
                    let _ = p.wait().await;
                    Err(Error::DeadlineExceeded(format!(
                        "command {:?} timed out after {}s",
                        req.cmd, req.timeout
                    )))
                }
            }
        }
        .await;
        // The process is gone: the readers end when the shim's ends close,
        // which a process it left behind holding them open delays for as
        // long as that runs (containerd 1.6 waits too); past
        // `drain_exec_sync_io_timeout_ms`, if set, they are stopped.
        drop((out_hold, err_hold));
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| async move {
            match h {
                Some(h) => tokio::task::spawn_blocking(move || h.join().unwrap_or_default())
                    .await
                    .unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let both = async { (join(out).await, join(err).await) };
        let drain = Duration::from_millis(self.cfg.drain_exec_sync_io_timeout_ms);
        let drained = match drain.is_zero() {
            true => Some(both.await),
            false => tokio::time::timeout(drain, both).await.ok(),
        };
        // Ends the readers if they are still reading.
        drop((out_stop, err_stop));
        p.cleanup().await;
        // A timeout is what the caller hears first (as from containerd).
        let exit_code = run?;
        let Some((stdout, stderr)) = drained else {
            return Err(Error::Held(format!(
                "failed to drain the output of command {:?} in {drain:?}: it is still held open by other processes (one the command left running?)",
                req.cmd
            )));
        };
        Ok(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        })
    }
}

type Capture = (std::thread::JoinHandle<Vec<u8>>, std::fs::File, io::Stop);

fn unzip3(
    c: Option<Capture>,
) -> (
    Option<std::thread::JoinHandle<Vec<u8>>>,
    Option<std::fs::File>,
    Option<io::Stop>,
) {
    match c {
        Some((h, f, s)) => (Some(h), Some(f), Some(s)),
        None => (None, None, None),
    }
}
