//! Container stdio: FIFOs handed to containerd's shim, copied by imacri into
//! the CRI log file (`<RFC3339Nano> <stdout|stderr> <F|P> <line>`), and output
//! capture for ExecSync.

use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::{Error, Result};

/// Longest log line written as one entry; longer lines become `P` entries,
/// as kubelet expects (containerd's max_container_log_line_size default).
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// ExecSync output cap (CVE-2022-1708).
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: Option<PathBuf>,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn as_strings(&self) -> (String, String, String) {
        let s = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        (s(&self.stdin), s(&self.stdout), s(&self.stderr))
    }
}

/// Creates FIFOs `<dir>/<name>-{stdin,stdout,stderr}`.
pub fn create_fifos(dir: &Path, name: &str, stdin: bool, tty: bool) -> Result<StdioPaths> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let make = |suffix: &str| -> Result<PathBuf> {
        let p = dir.join(format!("{name}-{suffix}"));
        let _ = std::fs::remove_file(&p);
        mkfifo(&p, Mode::from_bits_truncate(0o600))
            .map_err(|e| Error::io("creating fifo", &p, e.into()))?;
        Ok(p)
    };
    Ok(StdioPaths {
        stdin: if stdin { Some(make("stdin")?) } else { None },
        stdout: Some(make("stdout")?),
        // With a TTY stdout and stderr are one stream.
        stderr: if tty { None } else { Some(make("stderr")?) },
        terminal: tty,
    })
}

pub fn remove_fifos(p: &StdioPaths) {
    for f in [&p.stdin, &p.stdout, &p.stderr].into_iter().flatten() {
        let _ = std::fs::remove_file(f);
    }
}

/// Opens and closes a FIFO's read end without blocking, so a writer stuck
/// in open() returns (its writes then fail with EPIPE).
pub fn unblock_writer(fifo: &Path) {
    let _ = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

/// Holds a FIFO open for writing without waiting for a reader (O_RDWR), so
/// an interactive container's stdin stays open.
pub fn hold_open(fifo: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo)
        .map_err(|e| Error::io("opening fifo", fifo, e))
}

/// The container's CRI log file, shared by the stdout and stderr copiers and
/// reopened by ReopenContainerLog.
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<Option<File>>>,
}

impl LogFile {
    pub fn open(path: &Path) -> Result<LogFile> {
        let f = Self::open_file(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(Some(f))),
        })
    }

    fn open_file(path: &Path) -> Result<File> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("creating log dir", parent, e))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(|e| Error::io("opening container log", path, e))
    }

    /// Reopens the file at the same path (after kubelet rotated it).
    pub fn reopen(&self) -> Result<()> {
        let f = Self::open_file(&self.path)?;
        let mut g = self
            .file
            .lock()
            .map_err(|_| Error::Internal("log lock poisoned".into()))?;
        *g = Some(f);
        Ok(())
    }

    fn write(&self, data: &[u8]) {
        if let Ok(mut g) = self.file.lock() {
            if let Some(f) = g.as_mut() {
                if let Err(e) = f.write_all(data) {
                    tracing::warn!(path = %self.path.display(), error = %e, "writing container log");
                }
            }
        }
    }
}

fn timestamp() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, false)
}

/// Splits a byte stream into CRI log entries. Keeps partial-line state.
#[derive(Default)]
pub struct LogFormatter {
    pending: Vec<u8>,
}

impl LogFormatter {
    /// Formats what `data` completes; `ts` stamps each entry.
    pub fn push(&mut self, stream: &str, data: &[u8], ts: &str, out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        loop {
            if let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
                if nl <= MAX_LOG_LINE {
                    let line: Vec<u8> = self.pending.drain(..=nl).collect();
                    entry(out, ts, stream, "F", &line[..line.len() - 1]);
                    continue;
                }
            }
            if self.pending.len() > MAX_LOG_LINE {
                let chunk: Vec<u8> = self.pending.drain(..MAX_LOG_LINE).collect();
                entry(out, ts, stream, "P", &chunk);
                continue;
            }
            break;
        }
    }

    /// At end of stream, an unterminated last line is a full entry.
    pub fn finish(&mut self, stream: &str, ts: &str, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            entry(out, ts, stream, "F", &rest);
        }
    }
}

fn entry(out: &mut Vec<u8>, ts: &str, stream: &str, tag: &str, line: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(line);
    out.push(b'\n');
}

/// Output of a running container for attached clients.
pub type Tap = tokio::sync::broadcast::Sender<Vec<u8>>;

/// Copies a FIFO into the log (if the container has one) until its writers
/// (the shim, and `open_reader`'s holder) close it, also handing each chunk
/// to attached clients (`tap`). Returns the holder with the task.
///
/// A task on the caller's tokio runtime, not a thread: every running
/// container has two of these, and as threads (stack, 32 KiB buffer each)
/// they were ~80 of the ~120 KiB of anonymous memory imacri held per pod
/// (`BENCH_ONLY=memory target/release/bench`). The read buffer lives only
/// between a wake-up and the next wait. Log writes are plain appends to the
/// page cache, done in place.
pub fn spawn_log_copier(
    fifo: &Path,
    stream: &'static str,
    log: Option<LogFile>,
    tap: Option<Tap>,
) -> Result<(tokio::task::JoinHandle<()>, File)> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| Error::Internal(format!("log copier outside the async runtime: {e}")))?;
    let (f, holder) = open_reader(fifo)?;
    let rx = {
        // Registered with the runtime's reactor, so made on it.
        let _in = rt.enter();
        tokio::net::unix::pipe::Receiver::from_file(f)
            .map_err(|e| Error::io("opening fifo", fifo, e))?
    };
    let h = rt.spawn(async move {
        let mut fmt = LogFormatter::default();
        let mut out = Vec::new();
        loop {
            if rx.readable().await.is_err() {
                break;
            }
            let mut buf = [0u8; 16 * 1024];
            let n = match rx.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            if let Some(t) = &tap {
                let _ = t.send(buf[..n].to_vec());
            }
            if let Some(log) = &log {
                out.clear();
                fmt.push(stream, &buf[..n], &timestamp(), &mut out);
                if !out.is_empty() {
                    log.write(&out);
                }
                // A burst's formatted copy is not kept for an idle container.
                out.shrink_to(4 * 1024);
            }
        }
        if let Some(log) = &log {
            out.clear();
            fmt.finish(stream, &timestamp(), &mut out);
            if !out.is_empty() {
                log.write(&out);
            }
        }
    });
    Ok((h, holder))
}

/// Forwards a FIFO's data to `tx` until its writers close it (for exec
/// streams); blocks a thread like the other readers. Returns
/// `open_reader`'s holder with the thread.
pub fn spawn_forwarder(
    fifo: &Path,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(JoinHandle<()>, File)> {
    let (mut f, holder) = open_reader(fifo)?;
    let h = std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    Ok((h, holder))
}

/// Writes what arrives on `rx` into a FIFO (a process's stdin); closing
/// `rx` closes the process's stdin.
pub fn spawn_stdin_writer(
    fifo: PathBuf,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut f) = OpenOptions::new().write(true).open(&fifo) else {
            return;
        };
        while let Some(data) = rx.blocking_recv() {
            if f.write_all(&data).is_err() {
                break;
            }
        }
    })
}

/// Opens a FIFO's read end now, so nothing written to it from here on is
/// lost however late the reading thread runs: a short process and its shim
/// can open, write and close the FIFO before a thread that opened it later
/// got to run, and a pipe's data dies with its last open end.
///
/// The second file is a write end that keeps the reader from seeing end of
/// file before the shim has opened its own: keep it until the process has
/// exited (or failed to start), then drop it; the reader ends when the
/// shim's end closes too.
pub fn open_reader(fifo: &Path) -> Result<(File, File)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| Error::io("opening fifo", fifo, e))?;
    let holder = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| Error::io("opening fifo", fifo, e))?;
    // Blocking reads from here on: the holder guarantees a writer.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| Error::io("opening fifo", fifo, e.into()))?;
    Ok((f, holder))
}

/// Ends a capture early when dropped (its reading thread returns what it
/// read so far).
pub struct Stop {
    /// The write end of a pipe the reader polls beside the FIFO: closed,
    /// it wakes the reader.
    _write_end: std::os::fd::OwnedFd,
}

/// Reads a FIFO to the end into memory, keeping at most `cap` bytes (the rest
/// is read and dropped so the process never blocks on a full pipe). The
/// returned file is `open_reader`'s holder; dropping the [`Stop`] ends the
/// read before the end (a process that outlived an exec can hold its
/// output open for as long as it runs).
pub fn spawn_capture(fifo: PathBuf, cap: usize) -> Result<(JoinHandle<Vec<u8>>, File, Stop)> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let (mut f, holder) = open_reader(&fifo)?;
    let (stop_rd, stop_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("making a pipe for", &fifo, e.into()))?;
    let h = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let stopped = {
                let mut fds = [
                    PollFd::new(f.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop_rd.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                }
                fds[1].revents().is_some_and(|r| !r.is_empty())
            };
            if stopped {
                break;
            }
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = cap.saturating_sub(out.len());
                    out.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        out
    });
    Ok((
        h,
        holder,
        Stop {
            _write_end: stop_wr,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a shim does with a short exec's output FIFO: opens both ends,
    /// writes, closes everything, possibly before the capturing thread ever
    /// ran. The output must still be captured.
    #[test]
    fn capture_keeps_output_written_before_its_thread_runs() {
        let d = tempfile::tempdir().unwrap();
        let p = create_fifos(d.path(), "x", false, false)
            .unwrap()
            .stdout
            .unwrap();
        let (h, holder, _stop) = spawn_capture(p.clone(), 1024).unwrap();
        like_a_shim(&p, b"hello");
        drop(holder);
        assert_eq!(h.join().unwrap(), b"hello");
    }

    /// A shim's whole life with an output FIFO: both ends opened, the
    /// process's output written, everything closed.
    fn like_a_shim(p: &Path, data: &[u8]) {
        let _fr = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .unwrap();
        let mut fw = OpenOptions::new().write(true).open(p).unwrap();
        fw.write_all(data).unwrap();
    }

    #[test]
    fn forwarder_keeps_output_written_before_its_thread_runs() {
        let d = tempfile::tempdir().unwrap();
        let p = create_fifos(d.path(), "x", false, false)
            .unwrap()
            .stdout
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let (h, holder) = spawn_forwarder(&p, tx).unwrap();
        like_a_shim(&p, b"hi\n");
        drop(holder);
        h.join().unwrap();
        let mut got = Vec::new();
        while let Ok(d) = rx.try_recv() {
            got.extend(d);
        }
        assert_eq!(got, b"hi\n");
    }

    fn fmt(chunks: &[&[u8]]) -> String {
        let mut f = LogFormatter::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push("stdout", c, "T", &mut out);
        }
        f.finish("stdout", "T", &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn full_lines_across_chunks() {
        assert_eq!(
            fmt(&[b"hel", b"lo\nworld\n"]),
            "T stdout F hello\nT stdout F world\n"
        );
    }

    #[test]
    fn unterminated_tail_is_flushed() {
        assert_eq!(fmt(&[b"a\nb"]), "T stdout F a\nT stdout F b\n");
    }

    #[test]
    fn long_lines_become_partial_entries() {
        let long = vec![b'x'; MAX_LOG_LINE + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let s = fmt(&[&input]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("T stdout P "));
        assert_eq!(lines[0].len(), "T stdout P ".len() + MAX_LOG_LINE);
        assert_eq!(lines[1], format!("T stdout F {}", "x".repeat(10)));
    }

    #[test]
    fn empty_lines_are_entries() {
        assert_eq!(fmt(&[b"\n"]), "T stdout F \n");
    }

    #[tokio::test]
    async fn fifo_round_trip_into_log() {
        let d = tempfile::tempdir().unwrap();
        let p = create_fifos(d.path(), "c", false, false).unwrap();
        let log = LogFile::open(&d.path().join("logs/c.log")).unwrap();
        let out = p.stdout.clone().unwrap();
        let (h, holder) = spawn_log_copier(&out, "stdout", Some(log), None).unwrap();
        like_a_shim(&out, b"one\ntwo");
        drop(holder);
        h.await.unwrap();
        let text = std::fs::read_to_string(d.path().join("logs/c.log")).unwrap();
        let entries: Vec<Vec<&str>> = text.lines().map(|l| l.splitn(4, ' ').collect()).collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(&entries[0][1..], ["stdout", "F", "one"]);
        assert_eq!(&entries[1][1..], ["stdout", "F", "two"]);
        assert!(chrono::DateTime::parse_from_rfc3339(entries[0][0]).is_ok());
    }
}
