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

use crate::integrity::pidfd;
use std::path::Path;

pub(super) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    Ok(pidfd::open(pid, 0)?)
}

fn pidfd_getfd(pidfd: BorrowedFd<'_>, n: RawFd) -> std::io::Result<OwnedFd> {
    Ok(pidfd::getfd(pidfd, n)?)
}

/// SIGKILL through a pidfd (see [`pidfd::kill`]).
pub(super) fn kill(pidfd: BorrowedFd<'_>) -> std::io::Result<()> {
    Ok(pidfd::kill(pidfd)?)
}

/// A pidfd of process `pid` if it is a keeper of `socket`: its fd
/// `listener` listens on it (bound to that path, unlinked since or not).
/// A keeper that died may have left its pid to another process.
fn keeper_process(socket: &Path, pid: i32, listener: RawFd) -> std::io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    let l = pidfd_getfd(pidfd.as_fd(), listener)?;
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
    listener: RawFd,
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
    /// Names the keeper taken over, once another holds all it held: an
    /// imacri that crashes before it killed it leaves it to the next one
    /// ([`kill_noted`]), not alive for good.
    pub(super) fn note(&self, socket: &Path) {
        let _ = std::fs::write(
            note_path(socket),
            format!("{} {}\n", self.pid, self.listener),
        );
    }

    /// Kills the keeper it was taken from (and waits for it, briefly): it
    /// would otherwise deny, once it resumed and found its holder gone,
    /// the events of groups another imacri reads by then.
    pub(super) fn kill(&self) -> std::io::Result<()> {
        kill(self.pidfd.as_fd())?;
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

/// Kills the keeper a crashed imacri took over and did not kill
/// ([`Taken::note`]), unless it is the keeper of `socket` still (its
/// ledger's): then nothing else holds what it holds. Whether one was
/// killed.
pub(super) fn kill_noted(socket: &Path) -> bool {
    let note = note_path(socket);
    let Ok(text) = std::fs::read_to_string(&note) else {
        return false;
    };
    let mut f = text.split_whitespace().map(str::parse::<i32>);
    let (Some(Ok(pid)), Some(Ok(listener))) = (f.next(), f.next()) else {
        let _ = std::fs::remove_file(&note);
        return false;
    };
    match ledger::read(socket) {
        Ok(w) if w.pid != pid => {}
        // Still the keeper (or none can be told): left to the takeover.
        _ => return false,
    }
    let killed = keeper_process(socket, pid, listener).and_then(|p| kill(p.as_fd()));
    let _ = std::fs::remove_file(&note);
    killed.is_ok()
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
    let w = ledger::read(socket)?;
    let mut taken = Taken {
        pid: w.pid,
        listener: w.listener,
        fds: Vec::new(),
        skipped: Vec::new(),
        pidfd: keeper_process(socket, w.pid, w.listener)?,
    };
    for (key, n) in w.held {
        match pidfd_getfd(taken.pidfd.as_fd(), n) {
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
        // not killed while its ledger still says it is the keeper...
        taken.note(&sock);
        assert!(!kill_noted(&sock));
        assert!(child.0.try_wait().unwrap().is_none());
        // ...killed once another keeper's ledger is there.
        std::fs::write(ledger::path(&sock), "keeper 1 3\n").unwrap();
        assert!(kill_noted(&sock));
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
