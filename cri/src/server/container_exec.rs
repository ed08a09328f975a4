//! Running a command in a container: one path for ExecSync (captured
//! output, timeout) and streaming Exec (the client's stdio, a TTY, resize),
//! as containerd's `execInternal` serves both.

use imacri_api::cri;
use imacri_runtime::error::IgnoreNotFound;
use imacri_runtime::ids::new_id;
use imacri_runtime::io::{self, StdioPaths};
use imacri_runtime::pod::ContainerPhase;
use imacri_runtime::{spec, Error, Result};

use super::lifecycle::SIGKILL;
use super::CriServer;
use crate::streaming::{ProcessIo, STDERR, STDOUT};

/// An exec process of a running container, from FIFOs to cleanup.
pub(crate) struct ExecProcess<'a> {
    server: &'a CriServer,
    pub cid: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    process: oci_spec::runtime::Process,
}

impl CriServer {
    /// The first half of an exec: the process (from the container's own
    /// spec) and its FIFOs. Readers attach to the FIFOs before `launch`.
    pub(crate) async fn prepare_exec(
        &self,
        container: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecProcess<'_>> {
        let c = self.container(container)?;
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
        let process = spec::exec_process(&base, cmd, tty)?;
        // Through imacri's init, runc would look up only the init: the
        // command is looked up here, so a missing one fails as in any pod.
        if imacri_runtime::integrity::init::runs_through(&process) {
            let root = std::path::PathBuf::from(format!("/proc/{}/root", c.state().pid));
            let env = process.env().clone().unwrap_or_default();
            let cwd = process.cwd().to_string_lossy();
            imacri_runtime::integrity::init::look_path(&root, &cwd, &env, &cmd[0]).map_err(
                |m| {
                    Error::FailedPrecondition(format!(
                        "container {}: exec failed: unable to start container process: {m}",
                        c.id
                    ))
                },
            )?;
        }
        let exec_id = format!("exec-{}", &new_id()[..16]);
        let stdio = io::create_fifos(
            &self.cfg.fifo_dir(),
            &format!("{}-{exec_id}", c.id),
            stdin,
            tty,
        )?;
        Ok(ExecProcess {
            server: self,
            cid: c.id.clone(),
            exec_id,
            stdio,
            process,
        })
    }

    /// Exec over a streaming session: the client's stdin, stdout/stderr and
    /// terminal size, until the process exits (or the client goes, which
    /// kills it).
    pub(crate) async fn stream_exec(&self, r: cri::ExecRequest, mut pio: ProcessIo) -> Result<i32> {
        let p = self
            .prepare_exec(&r.container_id, &r.cmd, r.tty, r.stdin)
            .await?;
        let mut forwarders = Vec::new();
        // Dropped once the process has exited (or failed to start): see
        // `io::open_reader`.
        let mut holders = Vec::new();
        let outputs = [
            (p.stdio.stdout.clone(), STDOUT),
            (p.stdio.stderr.clone(), STDERR),
        ];
        for (path, chan) in outputs {
            if let Some(path) = path {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
                let holder = match io::spawn_forwarder(&path, tx) {
                    Ok((_, holder)) => holder,
                    Err(e) => {
                        drop(holders);
                        p.cleanup().await;
                        return Err(e);
                    }
                };
                holders.push(holder);
                let out = pio.output.clone();
                forwarders.push(tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        if out.send((chan, d)).await.is_err() {
                            break;
                        }
                    }
                }));
            }
        }
        drop(pio.output);
        let stdin_writer = match (p.stdio.stdin.clone(), pio.stdin.take()) {
            (Some(path), Some(mut from_client)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                let writer = io::spawn_stdin_writer(path, rx);
                Some((
                    tokio::spawn(async move {
                        while let Some(d) = from_client.recv().await {
                            if tx.send(d).await.is_err() {
                                break;
                            }
                        }
                    }),
                    writer,
                ))
            }
            _ => None,
        };
        if let Err(e) = p.launch().await {
            drop(holders);
            p.cleanup().await;
            return Err(e);
        }
        let mut stdin_writer = stdin_writer;
        let mut gone = pio.gone;
        let exit = loop {
            tokio::select! {
                r = p.wait() => break r,
                Some((w, h)) = pio.resize.recv() => {
                    let _ = self.c.resize_pty(&p.cid, &p.exec_id, w, h).await;
                }
                // The client closed stdin: flush, then close the process's.
                Some(_) = async {
                    match stdin_writer.as_mut() {
                        Some((relay, _)) => Some(relay.await),
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((_, writer)) = stdin_writer.take() {
                        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                        let _ = self.c.close_stdin(&p.cid, &p.exec_id).await;
                    }
                }
                _ = &mut gone => {
                    p.kill().await;
                    break p.wait().await;
                }
            }
        };
        // Output is handed over when the process's writers close the FIFOs.
        drop(holders);
        for f in forwarders {
            let _ = f.await;
        }
        p.cleanup().await;
        exit
    }
}

impl ExecProcess<'_> {
    /// Creates and starts the process; on failure wakes a stdin writer
    /// still waiting for a reader (the output readers' holders are the
    /// caller's to drop).
    pub(crate) async fn launch(&self) -> Result<()> {
        let c = &self.server.c;
        let started = async {
            c.exec(&self.cid, &self.exec_id, &self.process, &self.stdio)
                .await?;
            c.start_task(&self.cid, &self.exec_id).await
        }
        .await;
        if started.is_err() {
            if let Some(p) = &self.stdio.stdin {
                io::unblock_writer(p);
            }
        }
        started.map(|_| ())
    }

    /// The exit code (containerd keeps an exited exec until it is deleted,
    /// so a fast exit is never missed).
    pub(crate) async fn wait(&self) -> Result<i32> {
        self.server
            .c
            .wait_task(&self.cid, &self.exec_id)
            .await
            .map(|(code, _)| code as i32)
    }

    pub(crate) async fn kill(&self) {
        let _ = self
            .server
            .c
            .kill_task(&self.cid, &self.exec_id, SIGKILL)
            .await;
    }

    /// Deletes the process (killing it if it still runs) and its FIFOs.
    pub(crate) async fn cleanup(self) {
        let _ = self
            .server
            .c
            .delete_process(&self.cid, &self.exec_id)
            .await
            .ignore_not_found();
        io::remove_fifos(&self.stdio);
    }
}
