//! One exec or attach session, whatever the transport: the client's
//! channels (WebSocket channel protocol or SPDY streams, behind `ChanRx` /
//! `ChanTx`) are pumped to and from the runtime's process (`ProcessIo`), and
//! the exit status goes back in the protocol's form.

use imacri_runtime::Result;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::{Pending, StreamRuntime, RESIZE, STDIN, STDOUT};

pub(crate) enum In {
    Data(u8, Vec<u8>),
    CloseStdin,
}

#[tonic::async_trait]
pub(crate) trait ChanRx: Send {
    /// Next client message; None when the client is gone.
    async fn recv(&mut self) -> Option<In>;
}

#[tonic::async_trait]
pub(crate) trait ChanTx: Send {
    async fn send(&mut self, ch: u8, data: &[u8]) -> Result<()>;
    /// Sends the final status (if any) and closes the session.
    async fn finish(&mut self, status: Option<Vec<u8>>);
}

/// The runtime's end of a session.
pub(crate) struct ProcessIo {
    /// What the client writes to stdin; the sender is dropped when the
    /// client closes stdin. None if the session has no stdin.
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    /// (STDOUT | STDERR, data) for the client. The session ends once the
    /// process is done and every sender is dropped.
    pub output: mpsc::Sender<(u8, Vec<u8>)>,
    /// Terminal size changes (width, height).
    pub resize: mpsc::Receiver<(u32, u32)>,
    /// Resolves (with an error) when the client is gone: the runtime stops
    /// the process and cleans up.
    pub gone: oneshot::Receiver<()>,
}

/// The channel protocol a session negotiated (from its sub-protocol name).
#[derive(Clone, Copy)]
pub(crate) struct Channels {
    pub(crate) base64: bool,
    pub(crate) v4: bool,
    pub(crate) v5: bool,
}

impl Channels {
    pub(crate) fn new(protocol: &str) -> Channels {
        Channels {
            base64: protocol.contains("base64"),
            v4: protocol.starts_with("v4.") || protocol.starts_with("v5."),
            v5: protocol.starts_with("v5."),
        }
    }

    /// The final status on the error channel.
    pub(crate) fn status(&self, exit: std::result::Result<i32, String>) -> Option<Vec<u8>> {
        if !self.v4 {
            return match exit {
                Ok(0) => None,
                Ok(c) => {
                    Some(format!("command terminated with non-zero exit code: {c}").into_bytes())
                }
                Err(e) => Some(e.into_bytes()),
            };
        }
        let v = match exit {
            Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
            Ok(c) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {c}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}
            }),
            Err(e) => serde_json::json!({"metadata": {}, "status": "Failure", "message": e}),
        };
        Some(v.to_string().into_bytes())
    }
}

#[derive(serde::Deserialize)]
struct Size {
    #[serde(rename = "Width")]
    width: u32,
    #[serde(rename = "Height")]
    height: u32,
}

/// Runs an exec or attach session to its end: until the process exits (and
/// its output is drained) or the client goes.
pub(crate) async fn run(
    rt: &dyn StreamRuntime,
    p: Pending,
    rx: &mut dyn ChanRx,
    tx: &mut dyn ChanTx,
    ch: Channels,
) -> Result<()> {
    let wants_stdin = match &p {
        Pending::Exec(r) => r.stdin,
        Pending::Attach(r) => r.stdin,
        Pending::PortForward(_) => false,
    };
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(16);
    let mut stdin_tx = wants_stdin.then_some(stdin_tx);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let (gone_tx, gone_rx) = oneshot::channel();
    let io = ProcessIo {
        stdin: wants_stdin.then_some(stdin_rx),
        output: out_tx,
        resize: resize_rx,
        gone: gone_rx,
    };
    let job = async move {
        match p {
            Pending::Exec(r) => rt.exec(r, io).await.map_err(|e| e.to_string()),
            Pending::Attach(r) => rt
                .attach(r, io)
                .await
                .map(|()| 0)
                .map_err(|e| e.to_string()),
            Pending::PortForward(_) => Err("port-forward is not an exec session".into()),
        }
    };
    tokio::pin!(job);
    // An empty frame on the first writable channel tells the client we're up.
    tx.send(STDOUT, &[]).await?;
    let mut gone = Some(gone_tx);
    let mut client_open = true;
    let exit = loop {
        tokio::select! {
            m = rx.recv(), if client_open => match m {
                Some(In::Data(STDIN, d)) => {
                    if let Some(s) = &stdin_tx {
                        let _ = s.send(d).await;
                    }
                }
                Some(In::Data(RESIZE, d)) => {
                    if let Ok(sz) = serde_json::from_slice::<Size>(&d) {
                        let _ = resize_tx.try_send((sz.width, sz.height));
                    }
                }
                Some(In::CloseStdin) => stdin_tx = None,
                Some(_) => {}
                None => {
                    // The client is gone: the runtime stops the process;
                    // wait for it to clean up.
                    client_open = false;
                    stdin_tx = None;
                    gone = None;
                }
            },
            o = out_rx.recv() => {
                if let Some((c, d)) = o {
                    if tx.send(c, &d).await.is_err() {
                        gone = None;
                    }
                }
            }
            e = &mut job => break e,
        }
    };
    drop(gone);
    // Drain what the process wrote last.
    while let Ok(Some((c, d))) = tokio::time::timeout(Duration::from_secs(2), out_rx.recv()).await {
        if tx.send(c, &d).await.is_err() {
            break;
        }
    }
    if client_open {
        tx.finish(ch.status(exit)).await;
    } else if let Err(e) = exit {
        tracing::debug!(error = %e, "session ended after the client left");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imacri_api::cri;

    fn exec_request(stdin: bool) -> cri::ExecRequest {
        cri::ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            stdin,
            stdout: true,
            ..Default::default()
        }
    }

    #[test]
    fn statuses() {
        let v4 = Channels::new("v4.channel.k8s.io");
        let ok: serde_json::Value = serde_json::from_slice(&v4.status(Ok(0)).unwrap()).unwrap();
        assert_eq!(ok["status"], "Success");
        let bad: serde_json::Value = serde_json::from_slice(&v4.status(Ok(3)).unwrap()).unwrap();
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
        let v1 = Channels::new("channel.k8s.io");
        assert_eq!(v1.status(Ok(0)), None);
        assert!(String::from_utf8(v1.status(Ok(2)).unwrap())
            .unwrap()
            .contains("exit code: 2"));
    }

    /// A runtime that echoes stdin to stdout and exits 7 once stdin closes.
    struct Echo;

    #[tonic::async_trait]
    impl StreamRuntime for Echo {
        async fn exec(&self, _: cri::ExecRequest, mut io: ProcessIo) -> Result<i32> {
            let mut stdin = io.stdin.take().expect("stdin");
            while let Some(d) = stdin.recv().await {
                let _ = io.output.send((STDOUT, d)).await;
            }
            Ok(7)
        }
        async fn attach(&self, _: cri::AttachRequest, _: ProcessIo) -> Result<()> {
            Ok(())
        }
        async fn dial(&self, _: &str, _: u16) -> std::io::Result<tokio::net::TcpStream> {
            Err(std::io::Error::other("no"))
        }
    }

    struct Script(Vec<In>);
    #[tonic::async_trait]
    impl ChanRx for Script {
        async fn recv(&mut self) -> Option<In> {
            if self.0.is_empty() {
                // The client stays connected.
                std::future::pending::<()>().await;
            }
            Some(self.0.remove(0))
        }
    }

    #[derive(Default)]
    struct Sink(Vec<(u8, Vec<u8>)>, Option<Option<Vec<u8>>>);
    #[tonic::async_trait]
    impl ChanTx for Sink {
        async fn send(&mut self, ch: u8, data: &[u8]) -> Result<()> {
            self.0.push((ch, data.to_vec()));
            Ok(())
        }
        async fn finish(&mut self, status: Option<Vec<u8>>) {
            self.1 = Some(status);
        }
    }

    #[tokio::test]
    async fn stdin_reaches_the_process_and_the_exit_code_the_client() {
        let mut rx = Script(vec![In::Data(STDIN, b"hi".to_vec()), In::CloseStdin]);
        let mut tx = Sink::default();
        run(
            &Echo,
            Pending::Exec(exec_request(true)),
            &mut rx,
            &mut tx,
            Channels::new("v4.channel.k8s.io"),
        )
        .await
        .unwrap();
        assert_eq!(tx.0, vec![(STDOUT, vec![]), (STDOUT, b"hi".to_vec())]);
        let status: serde_json::Value = serde_json::from_slice(&tx.1.unwrap().unwrap()).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "7");
    }
}
