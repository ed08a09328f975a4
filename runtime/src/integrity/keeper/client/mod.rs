//! The keeper's client, used by imacri: hands fds over, takes them back,
//! keeps a copy of what it handed over to give a new keeper if the last
//! one died, and holds the keeper up while imacri runs.

use nix::sys::socket::UnixAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::debt::{Debt, Round};
use super::ids::ids_dir;
use super::keys::owner_of;
use super::takeover;
use super::wire::{recv, send, seqpacket};
use crate::integrity::pidfd;
use given::{Given, Owned};

/// The client side, used by imacri.
#[derive(Clone)]
pub struct Keeper {
    path: PathBuf,
    /// imacri's binary, to start the keeper again if it is gone.
    exe: PathBuf,
    /// A `HOLD` connection: while it is open the keeper stays up even with
    /// nothing to keep, so no container start pays for starting it.
    hold: Arc<Mutex<Option<OwnedFd>>>,
    /// A copy of everything imacri handed over and did not take back: a
    /// keeper started after the last one died is given it all again
    /// (otherwise the node would silently lose its protection against an
    /// imacri crash).
    given: Arc<Given>,
    /// How many times a new keeper was given everything (`revive`): what a
    /// caller took back (`all`) and remembered after a revive never reached
    /// the new keeper (`catch_up`).
    revivals: Arc<AtomicU64>,
    /// What the keeper may lack or hold beyond what imacri handed over.
    debt: Arc<Debt>,
    /// The fds of a stalled keeper taken over at start, for `all`, and
    /// whether the keeper started in its place holds them all.
    taken: Arc<Mutex<Option<(Keyed, bool)>>>,
}

/// Fds with the keys they are held under.
type Keyed = Vec<(String, OwnedFd)>;

/// How long the keeper may stay alive and answer nothing (stopped, swapped
/// out, hung) before imacri replaces it: meanwhile an imacri crash would
/// lose what it lacks, and answered events' fds wait for it.
const STALL_LIMIT: Duration = Duration::from_secs(15);

/// How many answered events' fds may wait for a stalled keeper before it
/// is replaced sooner (a pod executing new files fast would otherwise run
/// imacri out of fds).
const HELD_NUMBERS_LIMIT: usize = 4096;

/// A request the keeper did not answer in time (a connect that found its
/// backlog full, a reply that did not come).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Whether the `HOLD` connection `c` is up: the keeper never writes to a
/// holder, so anything to read is its end.
fn up(c: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(c, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO) == Ok(0)
}

/// SIGKILL to the keeper at the other end of the `HOLD` connection `hold`
/// (a stalled one: a stopped process dies of it too); its pid. Through a
/// pidfd opened while that connection is still up, so the signal cannot
/// reach another process that took the pid of a keeper that died meanwhile.
/// imacri holds its own copy of everything the keeper held: nothing is
/// released; the watch starts another keeper and gives it everything.
fn kill_stalled(hold: BorrowedFd<'_>) -> std::io::Result<i32> {
    let cred = nix::sys::socket::getsockopt(&hold, nix::sys::socket::sockopt::PeerCredentials)?;
    let pid = cred.pid();
    let pidfd = pidfd::open(pid, 0)?;
    if !up(hold) {
        return Err(std::io::Error::other("the keeper ended meanwhile"));
    }
    pidfd::kill(pidfd.as_fd())?;
    Ok(pid)
}

/// See [`Keeper::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperState {
    pub owes: bool,
    pub held_numbers: usize,
    pub rounds: u64,
}

impl Keeper {
    /// Connects to the keeper at `path`, starting `exe internal fd-keeper` when none
    /// answers.
    pub fn ensure(path: &Path, exe: &Path) -> std::io::Result<Keeper> {
        let k = Keeper {
            path: path.to_path_buf(),
            exe: exe.to_path_buf(),
            hold: Default::default(),
            given: Default::default(),
            revivals: Default::default(),
            debt: Default::default(),
            taken: Default::default(),
        };
        k.start_with(true)?;
        match takeover::finish_noted(path, |key, fd| k.put_once(key, fd)) {
            Ok(Some(pid)) => tracing::warn!(pid, "finished the takeover the last imacri began: what the stalled fd keeper held is with the keeper, and it was killed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "the takeover the last imacri began cannot be finished (left for the next start): what the stalled fd keeper holds and the keeper lacks is lost to imacri"),
        }
        Ok(k)
    }

    /// (Re)opens the `HOLD` connection. A live one is kept: the keeper
    /// takes a holder's leaving for imacri's death and denies what was in
    /// flight.
    fn hold(&self) -> std::io::Result<()> {
        if self.holding() {
            return Ok(());
        }
        let s = self.connect()?;
        send(s.as_fd(), "HOLD", None)?;
        if let Ok(mut h) = self.hold.lock() {
            *h = Some(s);
        }
        Ok(())
    }

    /// Whether the `HOLD` connection is up (the keeper it reaches lives).
    fn holding(&self) -> bool {
        let Ok(h) = self.hold.lock() else {
            return false;
        };
        h.as_ref().is_some_and(|c| up(c.as_fd()))
    }

    /// Starts the keeper unless one answers.
    fn start(&self) -> std::io::Result<()> {
        self.start_with(false)
    }

    /// [`start`](Self::start); at imacri's start (`take_over`), a keeper
    /// that takes no connection is taken over first.
    fn start_with(&self, take_over: bool) -> std::io::Result<()> {
        let (path, exe) = (&self.path, &self.exe);
        let k = self;
        match k.connect() {
            Ok(_) => return k.hold(),
            // Our keeper is there and takes no connection (stalled, its
            // backlog full): a second one started beside it would take the
            // socket while the first still holds the groups, and deny what
            // the next imacri reads once it resumes and finds its holder
            // gone. The watch kills it first (`kill_stalled`).
            Err(e) if is_timeout(&e) && self.holding() => return Err(e),
            // The last imacri's keeper, the same: what it holds is taken
            // from it and handed to another, and it is killed.
            Err(e) if is_timeout(&e) && take_over && self.take_over() => return Ok(()),
            Err(_) => {}
        }
        let _ = std::fs::remove_file(path);
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["internal", "fd-keeper", "--socket"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if k.connect().is_ok() {
                // Reaped by a thread so it never lingers as a zombie of ours.
                std::thread::spawn(move || child.wait());
                return k.hold();
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(std::io::Error::other(format!("fd keeper exited: {st}")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(std::io::Error::other("fd keeper did not come up"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connect(&self) -> std::io::Result<OwnedFd> {
        use nix::sys::socket::{setsockopt, sockopt};
        let s = seqpacket()?;
        let addr = UnixAddr::new(&self.path)?;
        let wait = nix::sys::time::TimeVal::new(2, 0);
        // Bounds the connect too: a stalled keeper's backlog fills, and a
        // connect then waits for room without end.
        setsockopt(&s, sockopt::SendTimeout, &wait)?;
        nix::sys::socket::connect(s.as_raw_fd(), &addr)?;
        setsockopt(&s, sockopt::ReceiveTimeout, &wait)?;
        Ok(s)
    }

    /// Hands the keeper a copy of `fd` under `key`. An idle keeper exits,
    /// so one that does not answer is started again (once). A keeper that
    /// still does not take it (at its open-file limit, stalled) owes it:
    /// it stays remembered and the watch (`supervise`) gives it everything
    /// again until it has it, so Ok means "kept, or as soon as the keeper
    /// can"; Err only when not even a copy could be made here.
    pub fn put(&self, key: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        // Remembered first: a keeper that dies once it has taken `fd`, before
        // this returns, is replaced (`supervise`) with what is remembered;
        // remembered after, the new keeper would lack `fd` and an imacri
        // crash would then release it (a container's group: it runs on
        // unmeasured).
        if !self.remember(key, fd) {
            return Err(std::io::Error::other(format!(
                "{key}: no copy of its fd to keep"
            )));
        }
        // A keeper that owes already is stalled or failing: the watch gives
        // it everything (this too) as soon as it takes things again, and
        // the caller (an execution being measured) does not wait out its
        // timeouts meanwhile.
        let owed_before = self.debt.owed();
        let put = match owed_before {
            true => Err(std::io::Error::other("the keeper owes earlier fds")),
            false => self.put_once(key, fd).or_else(|_| {
                // Started again (once) unless a round is under way already.
                self.debt
                    .begin(false)
                    .ok_or_else(|| std::io::Error::other("the keeper is being given everything"))
                    .and_then(|r| self.revive(r))?;
                self.put_once(key, fd)
            }),
        };
        crate::crash::at(
            "FdKeeper",
            key.split_once(':').map_or("listener", |(k, _)| k),
        );
        if let Err(e) = put {
            // Until a round finishes, an imacri crash would lose it (and
            // whatever else the keeper missed): the watch retries.
            // Said once per stall: a round this put started may have made
            // the keeper owed already.
            if self.debt.owe() || !owed_before {
                tracing::warn!(key, error = %e, "the fd keeper did not take an fd: it owes it (and what follows) until it can");
            }
        }
        Ok(())
    }

    /// Records that the keeper holds `fd` under `key` (handed over by the
    /// last imacri and taken back now), to give it again to a new keeper.
    /// Whether a copy is remembered.
    pub fn remember(&self, key: &str, fd: BorrowedFd<'_>) -> bool {
        let Ok(copy) = fd.try_clone_to_owned() else {
            return false;
        };
        let owner = owner_of(key);
        let shard = self
            .given
            .owners
            .pin()
            .get_or_insert_with(owner.into_owned(), Default::default)
            .clone();
        // Nothing is closed (a syscall) while the lock is held.
        let (kept, dropped) = match shard.lock() {
            Ok(mut o) if !o.gone => (true, o.fds.insert(key.to_string(), copy)),
            _ => (false, Some(copy)),
        };
        drop(dropped);
        kept
    }

    /// Forgets `key` here only (the keeper let it go by itself: a listener
    /// no task uses any more), and what goes with it as in the keeper (a
    /// group's leases and events, a listener's notifications): kept here,
    /// a lease of a gone container's would stay held by imacri.
    pub fn forget(&self, key: &str) {
        let owner = owner_of(key);
        // Closed once the lock is let go (see `remember`).
        let removed: Vec<OwnedFd> = if owner == key {
            let shard = self.given.owners.pin().remove(key).cloned();
            // Taken out now: the map frees what it removed only later.
            shard
                .and_then(|s| {
                    let mut o = s.lock().ok()?;
                    o.gone = true;
                    Some(std::mem::take(&mut o.fds).into_values().collect())
                })
                .unwrap_or_default()
        } else {
            self.given
                .shard(&owner)
                .and_then(|s| s.lock().ok()?.fds.remove(key))
                .into_iter()
                .collect()
        };
        drop(removed);
    }

    /// Starts a keeper (if none answers) and gives it everything imacri
    /// handed over before (the last one may have died with all of it),
    /// then has it let go of what imacri let go of while it owed (once
    /// imacri has taken back what it held at start: `catch_up`).
    fn revive(&self, round: Round<'_>) -> std::io::Result<usize> {
        // Counted before what is given is read: a caller whose remembering
        // raced this one sees the count moved and gives it again.
        self.revivals.fetch_add(1, Ordering::SeqCst);
        let given = self.give_all();
        let pruned = matches!(given, Ok((_, true)));
        self.debt.end(round, given.is_ok(), pruned);
        given.map(|(n, _)| n)
    }

    /// The round's work: how many fds were given, and whether the keeper
    /// let go of the rest.
    fn give_all(&self) -> std::io::Result<(usize, bool)> {
        self.start()?;
        // A keeper of an older imacri knows no SYNC (it hangs up): it is
        // given everything, as then, and lets go of nothing.
        let synced = self.request("SYNC")?;
        self.debt.answering();
        let shards: Vec<Arc<Mutex<Owned>>> = self.given.owners.pin().values().cloned().collect();
        let mut n = 0;
        for shard in shards {
            // Held while given: a drop of one of these (which forgets it
            // here under this lock first) reaches the keeper after its put.
            let Ok(o) = shard.lock() else { continue };
            for (k, f) in o.fds.iter() {
                self.put_once(k, f.as_fd())?;
                n += 1;
            }
        }
        let pruned = synced && self.debt.settled() && self.request("PRUNE")?;
        Ok((n, pruned))
    }

    /// Sends `what` alone; true when the keeper answered OK, false when it
    /// hung up without an answer (it does not know `what`).
    fn request(&self, what: &str) -> std::io::Result<bool> {
        let s = self.connect()?;
        send(s.as_fd(), what, None)?;
        match recv(s.as_fd())? {
            (Some(t), _) if t == "OK" => Ok(true),
            (None, _) => Ok(false),
            (t, _) => Err(std::io::Error::other(format!(
                "fd keeper answered {t:?} to {what}"
            ))),
        }
    }

    /// Watches the keeper for as long as this process lives: if it dies
    /// (killed, out of memory), a new one is started at once and given
    /// everything again, instead of the next imacri crash finding nothing
    /// kept and the containers running on unmeasured.
    pub fn supervise(&self) -> std::io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let k = self.clone();
        // Since when rounds have found the keeper alive and not answering.
        let mut stalled_since: Option<Instant> = None;
        std::thread::Builder::new()
            .name("imacri-keeper-watch".into())
            .spawn(move || loop {
                let held = k
                    .hold
                    .lock()
                    .ok()
                    .and_then(|h| h.as_ref().and_then(|c| c.try_clone().ok()));
                let alive = held.as_ref().is_some_and(|c| {
                    let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
                    // The keeper never writes to a holder: anything is its end.
                    !matches!(poll(&mut fds, PollTimeout::from(1000u16)), Ok(n) if n > 0)
                });
                if alive && !k.debt.owed() {
                    stalled_since = None;
                    continue;
                }
                let revived = k.debt.begin(true).map_or_else(
                    || Err(std::io::Error::other("the record of what was given is unusable")),
                    |r| k.revive(r),
                );
                let timed_out = matches!(&revived, Err(e) if is_timeout(e));
                match (alive && timed_out, stalled_since) {
                    (false, _) => stalled_since = None,
                    (true, None) => stalled_since = Some(Instant::now()),
                    (true, Some(t)) => {
                        let held_numbers = k.debt.numbers_held();
                        if t.elapsed() >= STALL_LIMIT || held_numbers >= HELD_NUMBERS_LIMIT {
                            // In a round: no other starts a keeper meanwhile.
                            let round = k.debt.begin(true);
                            if let Some(c) = &held {
                                match kill_stalled(c.as_fd()) {
                                    Ok(pid) => {
                                        k.forsake();
                                        tracing::error!(pid, stalled_s = t.elapsed().as_secs(), held_numbers, "the fd keeper stalled (it takes and answers nothing): killed, to start another and give it everything");
                                    }
                                    Err(e) => tracing::error!(error = %e, "the fd keeper stalled and cannot be killed"),
                                }
                            }
                            if let Some(r) = round {
                                k.debt.end(r, false, false);
                            }
                            stalled_since = None;
                            continue;
                        }
                    }
                }
                match revived {
                    Ok(n) if alive => tracing::warn!(given = n, "the fd keeper had not been given everything: given every group and listener again"),
                    Ok(n) => tracing::warn!(given = n, "the fd keeper was gone: started again and given every group and listener"),
                    Err(e) => {
                        match alive {
                            true => tracing::error!(error = %e, "the fd keeper cannot be given everything imacri handed over: an imacri crash now leaves some ima containers unmeasured"),
                            false => tracing::error!(error = %e, "the fd keeper is gone and cannot be started: an imacri crash now leaves ima containers unmeasured"),
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            })
            .map(|_| ())
    }

    /// What imacri's status reports of the keeper: whether it owes (an
    /// imacri crash now would lose what it lacks: measured containers run
    /// unmeasured meanwhile, and a gap is logged), how many answered
    /// events' fds wait for it to let go, and how many times it was given
    /// everything again.
    pub fn state(&self) -> KeeperState {
        KeeperState {
            owes: self.debt.owed() || self.debt.unheard(),
            held_numbers: self.debt.numbers_held(),
            rounds: self.revivals(),
        }
    }

    /// Where the id files of the listeners kept here live.
    pub fn ids_dir(&self) -> PathBuf {
        ids_dir(&self.path)
    }

    /// Tells the keeper to close its copy of `key`. A keeper that owes
    /// is not asked (the watch's next round makes it let go); one that
    /// does not answer is then owed too: Err in both cases, when it may
    /// still hold `key`.
    pub fn drop_key(&self, key: &str) -> std::io::Result<()> {
        self.forget(key);
        if self.debt.owed() {
            self.debt.owe_drop();
            return Err(std::io::Error::other(
                "the fd keeper owes: let go of at its next round",
            ));
        }
        let dropped = self.connect().and_then(|s| {
            send(s.as_fd(), &format!("DROP {key}"), None)?;
            match recv(s.as_fd())? {
                (Some(t), _) if t == "OK" => Ok(()),
                (t, _) => Err(std::io::Error::other(format!("fd keeper answered {t:?}"))),
            }
        });
        if let Err(e) = &dropped {
            if self.debt.owe_drop() {
                tracing::warn!(key, error = %e, "the fd keeper did not let go of an fd: owed (with what follows) until it can");
            }
        }
        dropped
    }

    /// [`drop_key`](Self::drop_key) of an answered event whose fd is
    /// `fd`: while the keeper may still hold the event, its number stays
    /// taken (a next imacri would answer the number's next event by it).
    pub fn drop_event(&self, key: &str, fd: OwnedFd) {
        if self.drop_key(key).is_err() {
            self.debt.hold_number(fd);
        }
    }

    fn put_once(&self, key: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let s = self.connect()?;
        send(s.as_fd(), &format!("PUT {key}"), Some(fd))?;
        // Wait for the keeper to have it before the caller goes on.
        match recv(s.as_fd())? {
            (Some(t), _) if t == "OK" => Ok(()),
            (t, _) => Err(std::io::Error::other(format!("fd keeper answered {t:?}"))),
        }
    }
}

mod given;
mod takeback;
#[cfg(test)]
mod tests;
