//! NRI's connection multiplexing (containerd/nri `pkg/net/multiplex`): one
//! unix socket carries several byte streams, each frame an 8-byte header
//! (connection id, payload length; big endian) and its payload. The plugin
//! serves its ttrpc service on connection 1, the runtime on connection 2.
//!
//! Each logical connection becomes one end of an in-process duplex pipe, so
//! the `ttrpc` crate's client and server run on it unchanged.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

/// Where the plugin serves `nri.pkg.api.v1alpha1.Plugin`.
pub const PLUGIN_SERVICE_CONN: u32 = 1;
/// Where the runtime serves `nri.pkg.api.v1alpha1.Runtime`.
pub const RUNTIME_SERVICE_CONN: u32 = 2;

const HEADER_LEN: usize = 8;
/// A ttrpc message (10-byte header, up to 4 MiB): upstream's frame limit.
pub const MAX_PAYLOAD: usize = 10 + (4 << 20);
/// Chunk size of outgoing frames. Upstream's demultiplexer hands a frame to
/// a single Read and fails it (ENOMEM) if the reader's buffer is smaller;
/// Go ttrpc reads through a 4096-byte bufio.Reader, so no frame may exceed
/// that (a 64 KiB frame broke every plugin on large seccomp profiles).
const WRITE_CHUNK: usize = 4096;

pub struct Mux {
    tasks: Vec<JoinHandle<()>>,
    closed: watch::Receiver<bool>,
}

impl Mux {
    /// Splits `trunk` into the given logical connections; returns our end
    /// of each, in `ids` order.
    pub fn new(trunk: UnixStream, ids: &[u32]) -> (Mux, Vec<DuplexStream>) {
        let (rd, wr) = trunk.into_split();
        let wr = Arc::new(Mutex::new(wr));
        let (closed_tx, closed) = watch::channel(false);
        let closed_tx = Arc::new(closed_tx);
        let mut ends = Vec::new();
        let mut sinks: HashMap<u32, WriteHalf<DuplexStream>> = HashMap::new();
        let mut tasks = Vec::new();
        for &id in ids {
            let (ours, theirs) = tokio::io::duplex(MAX_PAYLOAD);
            let (r, w) = tokio::io::split(ours);
            sinks.insert(id, w);
            ends.push(theirs);
            tasks.push(tokio::spawn(pump_out(id, r, wr.clone(), closed_tx.clone())));
        }
        tasks.push(tokio::spawn(pump_in(rd, sinks, closed_tx)));
        (Mux { tasks, closed }, ends)
    }

    /// Resolves once the trunk is gone (peer closed, error, or [`Mux::close`]).
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.clone()
    }

    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.close();
    }
}

/// Frames from the trunk to their connection. A frame for a connection we
/// do not have is dropped, as upstream does; an oversized one ends the trunk.
async fn pump_in(
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut sinks: HashMap<u32, WriteHalf<DuplexStream>>,
    closed: Arc<watch::Sender<bool>>,
) {
    let mut hdr = [0u8; HEADER_LEN];
    let mut buf = Vec::new();
    loop {
        if rd.read_exact(&mut hdr).await.is_err() {
            break;
        }
        let id = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        if len > MAX_PAYLOAD {
            tracing::warn!(conn = id, len, "NRI frame over the size limit; closing");
            break;
        }
        buf.resize(len, 0);
        if rd.read_exact(&mut buf).await.is_err() {
            break;
        }
        if let Some(s) = sinks.get_mut(&id) {
            if s.write_all(&buf).await.is_err() {
                sinks.remove(&id);
            }
        }
    }
    let _ = closed.send(true);
    // Every connection sees EOF (dropping a split half would not close it).
    for (_, mut s) in sinks {
        let _ = s.shutdown().await;
    }
}

/// Bytes one connection writes, framed onto the trunk.
async fn pump_out(
    id: u32,
    mut r: ReadHalf<DuplexStream>,
    wr: Arc<Mutex<tokio::net::unix::OwnedWriteHalf>>,
    closed: Arc<watch::Sender<bool>>,
) {
    let mut buf = vec![0u8; WRITE_CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + n);
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&(n as u32).to_be_bytes());
        frame.extend_from_slice(&buf[..n]);
        if wr.lock().await.write_all(&frame).await.is_err() {
            let _ = closed.send(true);
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_reach_their_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ma, mut ea) = Mux::new(a, &[1, 2]);
        let (_mb, mut eb) = Mux::new(b, &[1, 2]);
        ea[1].write_all(b"to two").await.unwrap();
        ea[0].write_all(b"to one").await.unwrap();
        let mut got = [0u8; 6];
        eb[0].read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to one");
        eb[1].read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to two");
    }

    #[tokio::test]
    async fn peer_close_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        let (m, mut ends) = Mux::new(a, &[1]);
        drop(b);
        let mut c = m.closed();
        c.wait_for(|v| *v).await.unwrap();
        let mut x = [0u8; 1];
        assert_eq!(ends[0].read(&mut x).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn large_writes_are_chunked_and_reassembled() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ma, mut ea) = Mux::new(a, &[1]);
        let (_mb, mut eb) = Mux::new(b, &[1]);
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let d2 = data.clone();
        let w = tokio::spawn(async move { ea[0].write_all(&d2).await.unwrap() });
        let mut got = vec![0u8; data.len()];
        eb[0].read_exact(&mut got).await.unwrap();
        w.await.unwrap();
        assert_eq!(got, data);
    }
}
