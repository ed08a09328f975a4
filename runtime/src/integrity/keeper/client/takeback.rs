//! What a starting imacri takes back from the keeper the last one left
//! (`all`), a stalled keeper's fds taken over, and the new keeper caught up
//! with what imacri holds once that is done (`catch_up`).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::super::takeover;
use super::super::wire::{recv, send};
use super::{is_timeout, Keeper};

impl Keeper {
    /// The count `catch_up` compares with: taken before `all`.
    pub fn revivals(&self) -> u64 {
        self.revivals.load(Ordering::SeqCst)
    }

    /// After taking back what `all` gave (at start) and remembering what
    /// is still wanted: if a keeper was started again since `since` (the
    /// last one died meanwhile), it was given only what was remembered
    /// then; it is given everything now, or an imacri crash would release
    /// what it lacks (a running container's group: unmeasured).
    pub fn catch_up(&self, since: u64) -> std::io::Result<()> {
        // From now on the keeper may let go of what imacri does not hold.
        self.debt.settle();
        if self.revivals() == since && !self.debt.owed() && !self.debt.unheard() {
            return Ok(());
        }
        let round = self
            .debt
            .begin(true)
            .ok_or_else(|| std::io::Error::other("the record of what was given is unusable"))?;
        let n = self.revive(round)?;
        tracing::warn!(given = n, "the fd keeper was started again while imacri took back what it held: given everything again");
        Ok(())
    }

    /// Lets go of a keeper just killed: the `HOLD` connection to it and its
    /// socket's name, so the next round starts another at once (called in
    /// a round, or before the watch runs: no keeper is started meanwhile). Killed is
    /// not yet dead: a process frozen by a (v1) freezer cgroup dies only
    /// once thawed, and until then it would take the next connections
    /// (the kernel queues them) and answer none, and imacri holding it
    /// would take it for the keeper, stalled again.
    pub(super) fn forsake(&self) {
        if let Ok(mut h) = self.hold.lock() {
            *h = None;
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Takes the fds of the keeper at our socket, which answers nothing,
    /// for [`all`](Self::all): copied out of it (`takeover.rs`), handed to
    /// a keeper started in its place, and only then is it killed, so that
    /// at no moment imacri's copies alone hold the groups (an imacri crash
    /// then would release them: the containers unmeasured, a gap each).
    /// Whether another keeper was started (and holds all of it, if the
    /// stash says so). Called before the watch runs, or in a round.
    pub(super) fn take_over(&self) -> bool {
        let t = match takeover::copy_out(&self.path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "the fd keeper answers nothing and cannot be taken over: another is started, and what the first holds is lost to imacri (running ima containers get a gap, and their executions wait on it until it resumes)");
                return false;
            }
        };
        t.note(&self.path);
        self.forsake();
        let started = self.start();
        let handed = started.as_ref().is_ok()
            && t.fds.iter().enumerate().all(|(i, (k, f))| {
                let put = self.put_once(k, f.as_fd()).is_ok();
                if i == 0 {
                    crate::crash::at("FdKeeper", "handing");
                }
                put
            });
        crate::crash::at("FdKeeper", "takeover");
        match t.kill() {
            Ok(()) => takeover::unnote(&self.path),
            Err(e) => {
                tracing::error!(pid = t.pid, error = %e, "the stalled fd keeper cannot be killed: if it resumes it denies events imacri reads")
            }
        }
        tracing::warn!(pid = t.pid, taken = t.fds.len(), skipped = ?t.skipped, handed, "the fd keeper answered nothing at imacri's start (stalled): took over what it held, handed it to another and killed it");
        if let Ok(mut slot) = self.taken.lock() {
            *slot = Some((t.fds, handed));
        }
        started.is_ok()
    }

    /// Copies of every fd the keeper holds, with their keys. At imacri's
    /// start, of one that answers nothing (stalled), taken over (handed to
    /// another keeper; owed to it where that failed).
    pub fn all(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let stashed = || self.taken.lock().ok().and_then(|mut t| t.take());
        let (taken, handed) = match stashed() {
            Some(t) => t,
            None => match self.ask_all() {
                // Connected (its backlog had room), never answered.
                Err(e) if is_timeout(&e) => {
                    // In a round: no other starts a keeper meanwhile.
                    let round = self.debt.begin(true);
                    self.take_over();
                    let t = stashed();
                    if let Some(r) = round {
                        self.debt.end(r, t.as_ref().is_some_and(|(_, h)| *h), false);
                    }
                    t.ok_or(e)?
                }
                answered => return answered,
            },
        };
        if !handed {
            // The caller read `revivals` before this: `catch_up` gives the
            // new keeper everything taken back.
            self.debt.owe();
        }
        Ok(taken)
    }

    fn ask_all(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let s = self.connect()?;
        send(s.as_fd(), "ALL", None)?;
        let mut out = Vec::new();
        loop {
            match recv(s.as_fd())? {
                (Some(t), Some(fd)) if t.starts_with("FD ") => out.push((t[3..].to_string(), fd)),
                (Some(t), _) if t == "END" => {
                    crate::crash::at("FdKeeper", "all");
                    return Ok(out);
                }
                (t, _) => return Err(std::io::Error::other(format!("fd keeper answered {t:?}"))),
            }
        }
    }
}
