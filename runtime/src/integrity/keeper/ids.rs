//! Which seccomp notifications a dead imacri had received: its last id per
//! kept listener, in a file of its own.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// The last notification id imacri received on one kept seccomp listener,
/// in a file of its own under `<state>/mapguard-ids/`: what an imacri that
/// died had received but not answered has an id at most this, and is
/// denied by whoever finds the listener orphaned (the keeper as imacri's
/// connection drops, the next imacri before it listens).
pub struct IdFile {
    path: PathBuf,
    file: std::fs::File,
}

/// How far below the last received id orphans are looked for (more
/// notifications than this in flight at once is beyond a pod's quotas).
const ORPHAN_WINDOW: u64 = 16384;

impl IdFile {
    pub(super) fn path_for(dir: &Path, key: &str) -> PathBuf {
        dir.join(key.replace('/', "_"))
    }

    /// Opens (creating) the id file of listener `key`.
    pub fn open(dir: &Path, key: &str) -> std::io::Result<IdFile> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path_for(dir, key);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(IdFile { path, file })
    }

    /// Records a received id (one positioned write, no fsync: the file is
    /// on the state tmpfs and only has to outlive the process).
    pub fn record(&self, id: u64) {
        use std::os::unix::fs::FileExt;
        let _ = self.file.write_at(&id.to_le_bytes(), 0);
    }

    pub fn last(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, 0)
            .ok()
            .map(|()| u64::from_le_bytes(b))
    }

    /// Denies (EPERM) every notification of `notify` received (by an
    /// imacri now gone) and never answered. Notifications not received yet
    /// are left alone (the kernel answers EINPROGRESS for them).
    pub fn deny_orphans(&self, notify: BorrowedFd<'_>, kept: &[u64]) -> usize {
        let Some(last) = self.last() else { return 0 };
        let mut denied = 0;
        for id in last.saturating_sub(ORPHAN_WINDOW)..=last {
            if kept.contains(&id) {
                // Handed to the keeper while hashed: the next imacri
                // measures it.
                continue;
            }
            // SAFETY: plain old data, zeroed then filled.
            let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
            resp.id = id;
            resp.error = -libc::EPERM;
            // SAFETY: an ioctl on a seccomp listener with a response struct.
            let r = unsafe {
                libc::ioctl(
                    notify.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_SEND as _,
                    &mut resp as *mut libc::seccomp_notif_resp,
                )
            };
            if r == 0 {
                denied += 1;
            }
        }
        denied
    }

    /// The listener is done: its file goes.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the id files of the keeper at `socket` live.
pub fn ids_dir(socket: &Path) -> PathBuf {
    socket.with_file_name("mapguard-ids")
}
