//! Where imacri's log lines go: one thread of imacri's own writes them to
//! stderr; every other thread only hands its line over, bounded and lossy.
//!
//! Written directly, a line is a `write(2)` under stderr's lock. Threads
//! working for a pod run in its CPU cgroup and are stopped wherever they
//! are when it reaches its limit (in practice on the way back from a
//! syscall): one stopped right after its `write` holds the lock for the
//! rest of the period, and every thread that logs next (gRPC handlers,
//! other pods' readers) waits with it. And a log reader that falls behind
//! (a full pipe to journald) would stop every thread that logs, the
//! measurement of every pod among them. So a line goes on a lock-free
//! queue ([`Inbox`]) and the writer is woken (`unpark`, no lock); past
//! [`QUEUED_LIMIT`] bytes waiting, lines are dropped and counted, and the
//! writer says how many before the next line it writes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::inbox::Inbox;

/// Bytes of log lines that may wait for the writer; more are dropped.
pub const QUEUED_LIMIT: usize = 4 << 20;

struct Shared {
    inbox: Inbox<Vec<u8>>,
    queued: AtomicUsize,
    dropped: AtomicU64,
    closing: AtomicBool,
    limit: usize,
}

/// A handle threads write their lines to (`std::io::Write`, one `write`
/// per line as tracing's formatter makes them); cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
    writer: Thread,
}

/// Owns the writer thread: dropped, it writes what waits and stops.
pub struct SinkGuard {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl LogSink {
    /// Starts the writer thread, writing to `out` with at most `limit`
    /// bytes waiting.
    pub fn spawn(
        out: impl Write + Send + 'static,
        limit: usize,
    ) -> std::io::Result<(LogSink, SinkGuard)> {
        let shared = Arc::new(Shared {
            inbox: Inbox::new(),
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            limit,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("imacri-log".into())
            .spawn(move || write_lines(&s, out))?;
        Ok((
            LogSink {
                shared: shared.clone(),
                writer: worker.thread().clone(),
            },
            SinkGuard {
                shared,
                worker: Some(worker),
            },
        ))
    }

    /// Hands `line` to the writer; false when it was dropped (too much
    /// waits already).
    pub fn line(&self, line: &[u8]) -> bool {
        let s = &self.shared;
        let before = s.queued.fetch_add(line.len(), Ordering::AcqRel);
        if before + line.len() > s.limit {
            s.queued.fetch_sub(line.len(), Ordering::AcqRel);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        s.inbox.push(line.to_vec());
        self.writer.unpark();
        true
    }

    /// Waits up to `limit` for every line handed over so far to be written
    /// (before the process exits, or a panic ends it).
    pub fn wait_written(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        self.writer.unpark();
        while self.shared.queued.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Lossy by design: a dropped line is counted, not an error.
        self.line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(w) = self.worker.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

fn write_lines(s: &Shared, mut out: impl Write) {
    loop {
        let lines = s.inbox.take_all();
        if lines.is_empty() {
            if s.closing.load(Ordering::Acquire) {
                return;
            }
            std::thread::park();
            continue;
        }
        let n: usize = lines.iter().map(Vec::len).sum();
        let mut buf = Vec::with_capacity(n + 128);
        let dropped = s.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                buf,
                "imacri: {dropped} log lines dropped (more than {} bytes waited to be written)",
                s.limit
            );
        }
        for l in &lines {
            buf.extend_from_slice(l);
        }
        // Nothing to do about a failed write to stderr but go on.
        let _ = out.write_all(&buf);
        let _ = out.flush();
        s.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the writer wrote, shared with the test; `gate` held makes the
    /// writer wait (a slow log reader).
    #[derive(Clone, Default)]
    struct Out {
        text: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _g = self.gate.lock().unwrap();
            self.text.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_of_many_threads_are_written_whole_and_in_each_threads_order() {
        let out = Out::default();
        let (sink, guard) = LogSink::spawn(out.clone(), QUEUED_LIMIT).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut s = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        s.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.wait_written(Duration::from_secs(5));
        let text = String::from_utf8(out.text.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let want: Vec<String> = (0..500).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(mine, want);
        }
        drop(guard);
    }

    #[test]
    fn a_stalled_reader_stalls_no_writer_and_drops_are_reported() {
        let out = Out::default();
        let (mut sink, guard) = LogSink::spawn(out.clone(), 1000).unwrap();
        let gate = out.gate.lock().unwrap();
        // The writer takes the first line and waits on the reader; what
        // comes next piles up to the limit and then is dropped, at once.
        sink.write_all(b"first\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let line = [b'x'; 99];
        for _ in 0..100 {
            sink.write_all(&line).unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        let dropped = sink.shared.dropped.load(Ordering::Relaxed);
        assert!((85..=95).contains(&dropped), "{dropped}");
        drop(gate);
        sink.wait_written(Duration::from_secs(5));
        sink.write_all(b"after\n").unwrap();
        sink.wait_written(Duration::from_secs(5));
        let text = String::from_utf8(out.text.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\n"), "{text}");
        assert!(
            text.contains(&format!("imacri: {dropped} log lines dropped")),
            "{text}"
        );
        assert!(text.ends_with("after\n"), "{text}");
        drop(guard);
    }
}
