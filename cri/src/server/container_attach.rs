//! Attach over a streaming session: the client gets the container's live
//! output (from the taps its log copiers feed) and writes to its stdin
//! (held open by imacri between attaches; closed for good when a
//! `stdin_once` container's client closes it).

use imacri_api::cri;
use imacri_runtime::Result;
use std::time::Duration;

use super::CriServer;
use crate::streaming::{ProcessIo, STDERR, STDOUT};

impl CriServer {
    pub(crate) async fn stream_attach(
        &self,
        r: cri::AttachRequest,
        mut pio: ProcessIo,
    ) -> Result<()> {
        let c = self.container(&r.container_id)?;
        let (taps, stdin_file) = self.attach_io(&c.id)?;
        let wanted = [(r.stdout, STDOUT), (r.stderr && !c.config.tty, STDERR)];
        for ((want, chan), tap) in wanted.into_iter().zip(taps) {
            if !want {
                continue;
            }
            let mut rx = tap.subscribe();
            let out = pio.output.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(d) => {
                            if out.send((chan, d)).await.is_err() {
                                break;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
            });
        }
        drop(pio.output);
        let mut stdin = match (r.stdin, stdin_file, pio.stdin.take()) {
            (true, Some(f), Some(from_client)) => Some(tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let (mut f, mut from_client) = (f, from_client);
                while let Some(d) = from_client.blocking_recv() {
                    if f.write_all(&d).is_err() {
                        break;
                    }
                }
            })),
            _ => None,
        };
        let id = c.id.clone();
        let exited = async { while !self.wait_exit(&id, Duration::from_secs(3600)).await {} };
        tokio::pin!(exited);
        let mut gone = pio.gone;
        loop {
            tokio::select! {
                _ = &mut exited => return Ok(()),
                _ = &mut gone => return Ok(()),
                Some((w, h)) = pio.resize.recv() => {
                    let _ = self.c.resize_pty(&id, "", w, h).await;
                }
                // The client closed stdin (its writer ended).
                Some(_) = async {
                    match stdin.as_mut() {
                        Some(writer) => Some(writer.await),
                        None => std::future::pending().await,
                    }
                } => {
                    stdin = None;
                    if let Err(e) = self.end_attached_stdin(&id).await {
                        tracing::warn!(container_id = %id, error = %e, "closing stdin");
                    }
                }
            }
        }
    }
}
