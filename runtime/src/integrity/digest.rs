//! The leaf every integrity module shares: file digests, file identities and
//! the text form of paths. No imports from the rest of `integrity`.

use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

/// sha256 of a file read through `fd` from offset 0 (pread: the fd's own
/// offset is its opener's, untouched). Returns the digest and the length.
pub fn hash_fd(fd: BorrowedFd<'_>) -> std::io::Result<([u8; 32], u64)> {
    let mut h = Hashing::default();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        if let Some(done) = h.step(fd, &mut buf, u64::MAX)? {
            return Ok(done);
        }
    }
}

/// What [`Hashing::step`] reads at a time: large enough that the read
/// calls cost nothing next to the hashing (under 1%), small because every
/// pod hashing at once has a buffer of its own (a hundred pods starting
/// together: 25 MiB).
pub const HASH_BUF: usize = 256 << 10;

/// A file's sha256 taken a slice at a time, so a thread hashing a huge file
/// can put it down and hash someone else's between slices.
#[derive(Default)]
pub struct Hashing {
    h: Sha256,
    off: u64,
}

impl Hashing {
    /// Bytes hashed so far.
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// Hashes up to about `budget` more bytes of the file (whole reads of
    /// `buf`); the digest and the length once the file has ended.
    pub fn step(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        budget: u64,
    ) -> std::io::Result<Option<([u8; 32], u64)>> {
        let until = self.off.saturating_add(budget);
        while self.off < until {
            match nix::sys::uio::pread(fd, buf, self.off as i64) {
                Ok(0) => return Ok(Some((self.h.clone().finalize().into(), self.off))),
                Ok(n) => {
                    self.h.update(&buf[..n]);
                    self.off += n as u64;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }
}

/// `sha256:<hex>`, the form policies and evidence use.
pub fn digest_text(d: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// What makes a cached digest valid: the same inode with the same size and
/// modification and change times. A write changes mtime/ctime (fine-grained
/// once queried, Linux 6.13+), so a changed file never matches its old key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileKey {
    pub fn of(st: &nix::sys::stat::FileStat) -> FileKey {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// The inode alone, for invalidation on close-after-write.
    pub fn inode(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// A path as text without losing bytes: valid UTF-8 stays as it is, every
/// other byte and the backslash itself become `\xNN`. Two different paths
/// never share a text (a file named `a\xff` and one with the byte 0xff).
pub fn path_text(p: &OsStr) -> String {
    let bytes = p.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped_backslashes(&mut out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // valid_up_to() guarantees this prefix is UTF-8.
                push_escaped_backslashes(&mut out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                rest = &bad[n..];
            }
        }
    }
    out
}

fn push_escaped_backslashes(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\x5c");
        } else {
            out.push(c);
        }
    }
}

/// The path of an open file as its opener sees it: the kernel resolves the
/// fd relative to the opener's mount namespace, so a container's file reads
/// `/bin/sh`, not the host's rootfs path.
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    // Relative to a kept `/proc/self/fd`: every measured event reads one
    // path, and walking `/proc/self/fd/` each time costs ~1.4 us of ~3.
    static FDS: std::sync::OnceLock<Option<std::os::fd::OwnedFd>> = std::sync::OnceLock::new();
    let dir = FDS.get_or_init(|| {
        std::fs::File::open("/proc/self/fd")
            .ok()
            .map(std::os::fd::OwnedFd::from)
    });
    let n = fd.as_raw_fd().to_string();
    match dir {
        Some(d) => nix::fcntl::readlinkat(Some(d.as_raw_fd()), n.as_str()),
        None => nix::fcntl::readlink(format!("/proc/self/fd/{n}").as_str()),
    }
    .map(|p| path_text(p.as_os_str()))
    .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_digest_taken_in_slices_is_the_whole_files() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let whole = hash_fd(f.as_fd()).unwrap();
        assert_eq!(whole, (Sha256::digest(&data).into(), data.len() as u64));
        let mut h = Hashing::default();
        let mut buf = vec![0u8; 4096];
        let mut steps = 0;
        let sliced = loop {
            steps += 1;
            if let Some(d) = h.step(f.as_fd(), &mut buf, 100_000).unwrap() {
                break d;
            }
            assert!(h.offset() >= 100_000 * steps as u64);
        };
        assert_eq!(sliced, whole);
        assert!(steps > 29, "{steps}");
    }

    #[test]
    fn hashes_from_offset_zero() {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abc").unwrap();
        f.seek(std::io::SeekFrom::Start(2)).unwrap();
        let (d, n) = hash_fd(f.as_fd()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            digest_text(&d),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn non_utf8_paths_are_escaped_never_collapsed() {
        let raw = |b: &[u8]| path_text(OsStr::from_bytes(b));
        assert_eq!(raw(b"/bin/sh"), "/bin/sh");
        assert_eq!(raw("/opt/ünï".as_bytes()), "/opt/ünï");
        assert_eq!(raw(b"/tmp/a\xffb"), "/tmp/a\\xffb");
        assert_eq!(raw(b"/tmp/a\xfeb"), "/tmp/a\\xfeb");
        // Different bytes, different texts; a literal "\xff" differs too.
        assert_ne!(raw(b"/tmp/a\xffb"), raw(b"/tmp/a\\xffb"));
        assert_eq!(raw(b"/tmp/a\\xffb"), "/tmp/a\\x5cxffb");
    }
}
