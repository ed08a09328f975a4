//! ExecSync: run a command in a running container, capture its output
//! (capped at 16 MiB per stream) and exit code, with a timeout.

use imacri_api::cri;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::ids::new_id;
use imacri_runtime::io;
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{spec, Error, Result};
use std::time::Duration;

use super::lifecycle::SIGKILL;
use super::CriServer;

impl CriServer {
    pub(crate) async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse> {
        if req.cmd.is_empty() {
            return Err(Error::InvalidArgument("cmd must not be empty".into()));
        }
        if req.timeout < 0 {
            return Err(Error::InvalidArgument(
                "timeout must not be negative".into(),
            ));
        }
        let c = self.container(&req.container_id)?;
        if c.state().phase != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let base = self.c.container_spec(&c.id).await?;
        let base = base
            .process()
            .clone()
            .ok_or_else(|| Error::Internal(format!("container {} has no process", c.id)))?;
        let process = spec::exec_process(&base, &req.cmd, false)?;
        let exec_id = format!("exec-{}", &new_id()[..16]);
        let fifo_name = format!("{}-{exec_id}", c.id);
        let stdio = io::create_fifos(&self.cfg.fifo_dir(), &fifo_name, false, false)?;
        let out = stdio
            .stdout
            .clone()
            .map(|p| io::spawn_capture(p, io::MAX_EXEC_OUTPUT));
        let err = stdio
            .stderr
            .clone()
            .map(|p| io::spawn_capture(p, io::MAX_EXEC_OUTPUT));

        let run = async {
            self.c.exec(&c.id, &exec_id, &process, &stdio).await?;
            self.c.start_task(&c.id, &exec_id).await?;
            // containerd keeps an exited exec until DeleteProcess, so waiting
            // after start cannot miss a fast exit.
            let wait = self.c.wait_task(&c.id, &exec_id);
            let exit = if req.timeout > 0 {
                match tokio::time::timeout(Duration::from_secs(req.timeout as u64), wait).await {
                    Ok(r) => r?,
                    Err(_) => {
                        let _ = self.c.kill_task(&c.id, &exec_id, SIGKILL).await;
                        let _ = self.c.wait_task(&c.id, &exec_id).await;
                        return Err(Error::DeadlineExceeded(format!(
                            "command {:?} timed out after {}s",
                            req.cmd, req.timeout
                        )));
                    }
                }
            } else {
                wait.await?
            };
            Ok::<_, Error>(exit)
        }
        .await;
        if run.is_err() {
            for p in [&stdio.stdout, &stdio.stderr].into_iter().flatten() {
                io::unblock_reader(p);
            }
        }
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| async move {
            match h {
                Some(h) => tokio::task::spawn_blocking(move || h.join().unwrap_or_default())
                    .await
                    .unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let (stdout, stderr) = (join(out).await, join(err).await);
        let _ = self
            .c
            .delete_process(&c.id, &exec_id)
            .await
            .ignore_not_found();
        io::remove_fifos(&stdio);
        let (code, _) = run?;
        Ok(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: code as i32,
        })
    }
}
