//! Taking a stalled keeper's fds over at imacri's start: a keeper that
//! answers nothing (stopped, hung, swapped out for good) still holds the
//! containers' groups, and their executions wait on it. Left alone, the
//! next imacri could only give up on what it holds (marking the containers
//! anew, a gap each) and start a second keeper beside it, while every
//! execution of those pods kept waiting on the old groups for good. Its
//! fds are copied out of it instead (`pidfd_getfd` needs nothing of the
//! process, stopped or not), by what its ledger says each is, and then it
//! is killed: nothing it held is released (imacri holds the copies), and
//! it can never resume to deny events of groups another imacri now reads.

use super::keys::{is_listener_key, FANOTIFY};
use super::ledger;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use crate::integrity::pidfd;

/// A pidfd of process `pid` if it is a keeper of `socket`: its fd
/// `listener` listens on it (bound to that path, unlinked since or not).
/// A keeper that died may have left its pid to another process.
fn keeper_process(socket: &Path, pid: i32, listener: RawFd) -> std::io::Result<OwnedFd> {
    let pidfd = pidfd::open(pid, 0)?;
    let l = pidfd::getfd(pidfd.as_fd(), listener)?;
    match listens_on(l.as_fd(), socket) {
        true => Ok(pidfd),
        false => Err(std::io::Error::other(format!(
            "process {pid} is not an fd keeper of {}",
            socket.display()
        ))),
    }
}

/// Whether `fd` is a socket listening on `socket`.
fn listens_on(fd: BorrowedFd<'_>, socket: &Path) -> bool {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};
    let bound = getsockname::<UnixAddr>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.path().map(Path::to_path_buf));
    bound.as_deref() == Some(socket) && getsockopt(&fd, sockopt::AcceptConn) == Ok(true)
}

/// Whether `fd` is what `key` holds: a group is a fanotify group, a
/// listener a seccomp listener, the rest (events' files, leases, held
/// writers) files of a filesystem. A ledger that lags its keeper by a
/// number reused since cannot give imacri something else under a key.
fn fits(key: &str, fd: BorrowedFd<'_>) -> bool {
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    if key.starts_with(FANOTIFY) {
        kind == "anon_inode:[fanotify]"
    } else if is_listener_key(key) {
        kind == "anon_inode:seccomp notify"
    } else {
        kind.starts_with('/')
    }
}

/// What was copied out of a stalled keeper, which is still alive.
pub(super) struct Taken {
    pub pid: i32,
    /// The ledger it was taken by.
    ledger: String,
    pub fds: Vec<(String, OwnedFd)>,
    /// Keys the ledger names whose fd was not there or not of their kind.
    pub skipped: Vec<String>,
    pidfd: OwnedFd,
}

/// Where a keeper taken over is named until it is killed.
fn note_path(socket: &Path) -> std::path::PathBuf {
    socket.with_file_name("fdkeeper.taken")
}

impl Taken {
    /// Names the keeper taken over, with the ledger it was taken by, before
    /// anything is handed to the keeper started in its place: an imacri
    /// that crashes before it killed it leaves the rest to the next one
    /// ([`finish_noted`]), not a keeper alive for good and one holding part.
    pub(super) fn note(&self, socket: &Path) {
        let _ = std::fs::write(note_path(socket), &self.ledger);
    }

    /// Kills the keeper it was taken from (and waits for it, briefly): it
    /// would otherwise deny, once it resumed and found its holder gone,
    /// the events of groups another imacri reads by then.
    pub(super) fn kill(&self) -> std::io::Result<()> {
        pidfd::kill(self.pidfd.as_fd())?;
        let mut gone = [nix::poll::PollFd::new(
            self.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        // A process in an uninterruptible sleep (or a v1-frozen one) dies
        // once it wakes: nothing it holds is released meanwhile (imacri
        // holds the copies).
        let _ = nix::poll::poll(&mut gone, nix::poll::PollTimeout::from(2000u16));
        Ok(())
    }
}

/// Finishes a takeover a crashed imacri began ([`Taken::note`]): what the
/// keeper it took over holds is copied out again and `put` to the keeper
/// of `socket` now (which may have got only part of it), then that keeper
/// is killed. Nothing is done while the ledger of `socket` still names it
/// (it is the keeper: the note is stale) or names no keeper at all. The
/// pid of the keeper killed, if one was.
pub(super) fn finish_noted(
    socket: &Path,
    put: impl Fn(&str, BorrowedFd<'_>) -> std::io::Result<()>,
) -> std::io::Result<Option<i32>> {
    let note = note_path(socket);
    let Ok(text) = std::fs::read_to_string(&note) else {
        return Ok(None);
    };
    let Some(w) = ledger::parse(&text) else {
        unnote(socket);
        return Ok(None);
    };
    match ledger::read(socket) {
        Ok(now) if now.pid != w.pid => {}
        Ok(_) => {
            unnote(socket);
            return Ok(None);
        }
        Err(_) => return Ok(None),
    }
    let t = copy_out_by(socket, w, text).inspect_err(|_| unnote(socket))?;
    for (k, f) in &t.fds {
        put(k, f.as_fd())?;
    }
    t.kill()?;
    unnote(socket);
    Ok(Some(t.pid))
}

/// The keeper taken over was killed: nothing to leave to the next imacri.
pub(super) fn unnote(socket: &Path) {
    let _ = std::fs::remove_file(note_path(socket));
}

/// Copies out of the keeper at `socket`, which does not answer, everything
/// its ledger says it holds; the keeper is left alive (`Taken::kill`), so
/// that until another holds it all, two processes do. Err, with nothing
/// taken, when there is no ledger or it names a process that is not that
/// socket's keeper.
pub(super) fn copy_out(socket: &Path) -> std::io::Result<Taken> {
    let text = std::fs::read_to_string(ledger::path(socket))?;
    let w = ledger::parse(&text)
        .ok_or_else(|| std::io::Error::other("the fd keeper's ledger is malformed"))?;
    copy_out_by(socket, w, text)
}

/// [`copy_out`] by the ledger `w` (read from `text`).
fn copy_out_by(socket: &Path, w: ledger::Written, text: String) -> std::io::Result<Taken> {
    let mut taken = Taken {
        pid: w.pid,
        ledger: text,
        fds: Vec::new(),
        skipped: Vec::new(),
        pidfd: keeper_process(socket, w.pid, w.listener)?,
    };
    for (key, n) in w.held {
        match pidfd::getfd(taken.pidfd.as_fd(), n) {
            Ok(fd) if fits(&key, fd.as_fd()) => taken.fds.push((key, fd)),
            _ => taken.skipped.push(key),
        }
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stopped process playing the keeper: a listener on `socket`, a
    /// fanotify group stand-in (an eventfd, of the wrong kind), a file, and
    /// a ledger saying so (and naming a key whose fd is gone).
    #[test]
    fn a_stopped_keepers_fds_are_copied_out_by_its_ledger_and_it_is_killed_once_replaced() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fdkeeper.sock");
        let file = dir.path().join("kept");
        std::fs::write(&file, "x").unwrap();
        // The child: fds 100 (listener), 101 (a file), 102 (an eventfd); stops.
        let script = format!(
            "import socket,os,signal\n\
             l=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\n\
             l.bind('{s}'); l.listen(1); os.dup2(l.fileno(),100)\n\
             f=os.open('{f}',os.O_RDONLY); os.dup2(f,101)\n\
             e=os.eventfd(0); os.dup2(e,102)\n\
             open('{s}.ready','w').close()\n\
             os.kill(os.getpid(),signal.SIGSTOP)\n",
            s = sock.display(),
            f = file.display()
        );
        let child = std::process::Command::new("python3")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        // A failing test leaves no stopped child behind.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reaped(child);
        let ready = sock.with_extension("sock.ready");
        let t0 = std::time::Instant::now();
        while !ready.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the child never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        let pid = child.0.id() as i32;
        // Another process's ledger (ours: fd 0 of ours is no listener) is
        // refused first.
        std::fs::write(
            ledger::path(&sock),
            format!("keeper {} 0\n+ 101 fls:c:1:2:3\n", std::process::id()),
        )
        .unwrap();
        assert!(copy_out(&sock).is_err());
        std::fs::write(
            ledger::path(&sock),
            format!("keeper {pid} 100\n+ 101 fls:c:1:2:3\n+ 102 fan:c\n+ 109 fev:c:1:exec:1\n"),
        )
        .unwrap();
        let taken = copy_out(&sock).unwrap();
        assert_eq!(taken.pid, pid);
        // Named for the next imacri (this one "crashed" before killing it):
        // nothing done while its ledger still says it is the keeper (a
        // stale note)...
        taken.note(&sock);
        let put = std::cell::RefCell::new(Vec::new());
        let put_one = |k: &str, _: BorrowedFd<'_>| {
            put.borrow_mut().push(k.to_string());
            Ok(())
        };
        assert_eq!(finish_noted(&sock, put_one).unwrap(), None);
        assert!(child.0.try_wait().unwrap().is_none());
        assert!(!note_path(&sock).exists());
        // ...finished once another keeper's ledger is there: what it holds
        // put to that keeper, then killed.
        taken.note(&sock);
        std::fs::write(ledger::path(&sock), "keeper 1 3\n").unwrap();
        assert_eq!(finish_noted(&sock, put_one).unwrap(), Some(pid));
        assert_eq!(*put.borrow(), ["fls:c:1:2:3"]);
        assert!(!note_path(&sock).exists());
        let keys: Vec<&str> = taken.fds.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["fls:c:1:2:3"]);
        assert_eq!(taken.skipped, ["fan:c", "fev:c:1:exec:1"]);
        let st = child.0.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
        // The copy outlives the keeper.
        let mut s = String::new();
        std::io::Read::read_to_string(
            &mut std::fs::File::from(taken.fds.into_iter().next().unwrap().1),
            &mut s,
        )
        .unwrap();
        assert_eq!(s, "x");
    }
}
