//! Lines read at offsets the journal's index gives.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::utf8;

/// Reads lines at given offsets of the log's first `len` bytes, a few KiB
/// at a time (a pod's entries often come in runs: a container's start maps
/// its libraries one after another).
pub(super) struct Window {
    file: std::fs::File,
    len: u64,
    at: u64,
    buf: Vec<u8>,
}

/// Bytes read at a time; lines of long paths take up to 16 KiB.
const WINDOW: usize = 8 << 10;

impl Window {
    pub(super) fn open(path: &Path, len: u64) -> std::io::Result<Window> {
        Ok(Window {
            file: std::fs::File::open(path)?,
            len,
            at: 0,
            buf: Vec::new(),
        })
    }

    /// Whether `off` is where a line starts (or the end).
    pub(super) fn starts_line(&mut self, off: u64) -> std::io::Result<bool> {
        if off == 0 || off > self.len {
            return Ok(off == 0);
        }
        if !self.cover(off - 1, 1)? {
            return Ok(false);
        }
        Ok(self.buf[(off - 1 - self.at) as usize] == b'\n')
    }

    /// Makes the window hold `[from, from + n)` (within `len`); false when
    /// the file is shorter than that now.
    fn cover(&mut self, from: u64, n: usize) -> std::io::Result<bool> {
        let end = from + n as u64;
        if from >= self.at && end <= self.at + self.buf.len() as u64 {
            return Ok(true);
        }
        let size = n.max(WINDOW).min((self.len - from) as usize);
        self.buf.resize(size, 0);
        self.at = from;
        match self.file.read_exact_at(&mut self.buf, from) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.buf.clear();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The line starting at `off` (as `str::lines` gives it); None when no
    /// line starts there.
    pub(super) fn line(&mut self, off: u64) -> std::io::Result<Option<String>> {
        if off >= self.len {
            return Ok(None);
        }
        // The byte before it too, read with it: a newline (or none).
        let begin = off.saturating_sub(1);
        let mut n = WINDOW;
        loop {
            let n_in = n.min((self.len - off) as usize);
            if !self.cover(begin, (off - begin) as usize + n_in)? {
                return Ok(None);
            }
            let rel = (off - self.at) as usize;
            if off > 0 && self.buf[rel - 1] != b'\n' {
                return Ok(None);
            }
            let rest = &self.buf[rel..rel + n_in];
            let end = match memchr::memchr(b'\n', rest) {
                Some(i) => i,
                // The snapshot's last line may lack its newline.
                None if off + n_in as u64 == self.len => rest.len(),
                None => {
                    n *= 2;
                    continue;
                }
            };
            let l = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
            return Ok(Some(utf8(l)?.to_string()));
        }
    }
}
