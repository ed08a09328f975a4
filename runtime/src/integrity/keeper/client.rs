//! The keeper's client, used by imacri: hands fds over, takes them back,
//! keeps a copy of what it handed over to give a new keeper if the last
//! one died, and holds the keeper up while imacri runs.

use nix::sys::socket::UnixAddr;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ids::ids_dir;
use super::keys::owner_of;
use super::wire::{recv, send, seqpacket};

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
    /// Set while a keeper may lack some of what imacri handed over: a
    /// revive that did not finish (a put refused or unanswered half-way,
    /// the keeper at its open-file limit). The watch thread gives
    /// everything again until one finishes; the keeper's being alive says
    /// nothing about that.
    owed: Arc<AtomicBool>,
    /// Puts that left their fd owed, counted: a revive clears `owed` only
    /// if none came while it gave (one that came after it read that fd's
    /// owner would otherwise be cleared with the rest and never given).
    misses: Arc<AtomicU64>,
}

/// imacri's copy of what the keeper holds, by owner (a container's group
/// with its events and leases, a seccomp listener with its notifications):
/// each owner's under a lock of its own in a lock-free map. A pod's threads
/// take it on every access they queue and answer; one of them stopped
/// holding it (its pod at its CPU limit) holds up only its own container.
#[derive(Default)]
struct Given {
    owners: papaya::HashMap<String, Arc<Mutex<Owned>>>,
}

#[derive(Default)]
struct Owned {
    /// Forgotten with its owner: what comes after is not kept.
    gone: bool,
    fds: BTreeMap<String, OwnedFd>,
}

impl Given {
    fn shard(&self, owner: &str) -> Option<Arc<Mutex<Owned>>> {
        self.owners.pin().get(owner).cloned()
    }

    /// Every key held, for tests.
    #[cfg(test)]
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .owners
            .pin()
            .values()
            .flat_map(|o| {
                o.lock()
                    .map(|o| o.fds.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        keys.sort();
        keys
    }
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
            owed: Default::default(),
            misses: Default::default(),
        };
        k.start()?;
        Ok(k)
    }

    /// (Re)opens the `HOLD` connection. A live one is kept: the keeper
    /// takes a holder's leaving for imacri's death and denies what was in
    /// flight.
    fn hold(&self) -> std::io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if let Ok(h) = self.hold.lock() {
            if let Some(c) = h.as_ref() {
                let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::ZERO) == Ok(0) {
                    return Ok(());
                }
            }
        }
        let s = self.connect()?;
        send(s.as_fd(), "HOLD", None)?;
        if let Ok(mut h) = self.hold.lock() {
            *h = Some(s);
        }
        Ok(())
    }

    /// Starts the keeper unless one answers.
    fn start(&self) -> std::io::Result<()> {
        let (path, exe) = (&self.path, &self.exe);
        let k = self;
        if k.connect().is_ok() {
            return k.hold();
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
        let s = seqpacket()?;
        let addr = UnixAddr::new(&self.path)?;
        nix::sys::socket::connect(s.as_raw_fd(), &addr)?;
        nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(2, 0),
        )?;
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
        let owed_before = self.owed.load(Ordering::SeqCst);
        let put = match owed_before {
            true => Err(std::io::Error::other("the keeper owes earlier fds")),
            false => self.put_once(key, fd).or_else(|_| {
                self.revive()?;
                self.put_once(key, fd)
            }),
        };
        crate::crash::at(
            "FdKeeper",
            key.split_once(':').map_or("listener", |(k, _)| k),
        );
        if let Err(e) = put {
            // Until a revive finishes, an imacri crash would lose it (and
            // whatever else the keeper missed): the watch retries.
            self.misses.fetch_add(1, Ordering::SeqCst);
            self.owed.store(true, Ordering::SeqCst);
            if !owed_before {
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
    /// handed over before: the last one may have died with all of it.
    fn revive(&self) -> std::io::Result<usize> {
        // Counted before what is given is read: a caller whose remembering
        // raced this one sees the count moved and gives it again.
        self.revivals.fetch_add(1, Ordering::SeqCst);
        self.owed.store(true, Ordering::SeqCst);
        let misses = self.misses.load(Ordering::SeqCst);
        self.start()?;
        let shards: Vec<Arc<Mutex<Owned>>> = self.given.owners.pin().values().cloned().collect();
        let mut n = 0;
        for shard in shards {
            let Ok(o) = shard.lock() else { continue };
            for (k, f) in o.fds.iter() {
                self.put_once(k, f.as_fd())?;
                n += 1;
            }
        }
        self.owed.store(false, Ordering::SeqCst);
        // A put left owed while this one gave may have come after its
        // owner was given: owed still.
        if self.misses.load(Ordering::SeqCst) != misses {
            self.owed.store(true, Ordering::SeqCst);
        }
        Ok(n)
    }

    /// Watches the keeper for as long as this process lives: if it dies
    /// (killed, out of memory), a new one is started at once and given
    /// everything again, instead of the next imacri crash finding nothing
    /// kept and the containers running on unmeasured.
    pub fn supervise(&self) -> std::io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let k = self.clone();
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
                let owed = k.owed.load(Ordering::SeqCst);
                if alive && !owed {
                    continue;
                }
                match k.revive() {
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

    /// Where the id files of the listeners kept here live.
    pub fn ids_dir(&self) -> PathBuf {
        ids_dir(&self.path)
    }

    /// Tells the keeper to close its copy of `key` (no reply awaited beyond
    /// its acknowledgement; a gone keeper holds nothing anyway).
    pub fn drop_key(&self, key: &str) -> std::io::Result<()> {
        self.forget(key);
        let s = self.connect()?;
        send(s.as_fd(), &format!("DROP {key}"), None)?;
        match recv(s.as_fd())? {
            (Some(t), _) if t == "OK" => Ok(()),
            (t, _) => Err(std::io::Error::other(format!("fd keeper answered {t:?}"))),
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
        if self.revivals() == since {
            return Ok(());
        }
        let n = self.revive()?;
        tracing::warn!(given = n, "the fd keeper was started again while imacri took back what it held: given everything again");
        Ok(())
    }

    /// Copies of every fd the keeper holds, with their keys.
    pub fn all(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
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

#[cfg(test)]
mod tests {
    use super::super::keys::*;
    use super::super::server::{run, IDLE_EXIT};
    use super::*;

    /// A client of the keeper at `sock` that never starts one itself.
    fn client_of(sock: &Path) -> Keeper {
        Keeper {
            path: sock.to_path_buf(),
            exe: PathBuf::from("/nonexistent"),
            hold: Default::default(),
            given: Default::default(),
            revivals: Default::default(),
            owed: Default::default(),
            misses: Default::default(),
        }
    }

    /// A keeper running at `sock` on a thread, and a client of it.
    fn keeper_at(sock: &Path) -> (Keeper, std::thread::JoinHandle<std::io::Result<()>>) {
        let s2 = sock.to_path_buf();
        let t = std::thread::spawn(move || run(&s2));
        let k = client_of(sock);
        let deadline = Instant::now() + Duration::from_secs(5);
        while k.connect().is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        (k, t)
    }

    /// A keeper at `sock` that refuses its first `refuse` PUTs (as one at
    /// its open-file limit fails them: the fd never arrives, nor an
    /// answer), keeps HOLD connections and records the keys it took.
    fn refusing_keeper(sock: &Path, refuse: usize) -> Arc<Mutex<Vec<String>>> {
        use nix::sys::socket::{accept, bind, listen, Backlog};
        let l = seqpacket().unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(sock).unwrap()).unwrap();
        listen(&l, Backlog::new(16).unwrap()).unwrap();
        let took: Arc<Mutex<Vec<String>>> = Default::default();
        let keys = took.clone();
        std::thread::spawn(move || {
            let (mut refuse, mut holders) = (refuse, Vec::new());
            // SAFETY: accept returns a new fd we own.
            while let Ok(c) = accept(l.as_raw_fd())
                .map(|c| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c) })
            {
                match recv(c.as_fd()) {
                    Ok((Some(t), _)) if t == "HOLD" => holders.push(c),
                    Ok((Some(t), Some(_))) if t.starts_with("PUT ") => {
                        let answer = match refuse {
                            0 => {
                                keys.lock().unwrap().push(t[4..].to_string());
                                "OK"
                            }
                            _ => {
                                refuse -= 1;
                                "NO"
                            }
                        };
                        send(c.as_fd(), answer, None).unwrap();
                    }
                    _ => {}
                }
            }
        });
        took
    }

    /// A keeper started again that took only part of what imacri gave it
    /// (a put failed half-way) is alive, so the watch would see nothing
    /// wrong: it is given everything again until it has it all. Before,
    /// it stayed without what it missed, and an imacri crash then released
    /// that (a container's group: its executions ran unmeasured).
    #[test]
    fn a_keeper_that_took_part_of_everything_is_given_it_all_again() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let took = refusing_keeper(&sock, 1);
        let k = client_of(&sock);
        let f = std::fs::File::open("/dev/null").unwrap();
        let keys = [format!("{FANOTIFY}a"), format!("{FANOTIFY}b")];
        for key in &keys {
            k.remember(key, f.as_fd());
        }
        let since = k.revivals();
        k.revivals.fetch_add(1, Ordering::SeqCst);
        assert!(k.catch_up(since).is_err(), "the refusal was not seen");
        k.supervise().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = took.lock().unwrap().clone();
            got.sort();
            got.dedup();
            if got == keys {
                break;
            }
            assert!(Instant::now() < deadline, "the keeper has only {got:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_client_that_connects_and_says_nothing_holds_up_no_one() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let (k, t) = keeper_at(&sock);
        // A client stopped between its connect and its send (a thread of a
        // pod at its CPU limit): the keeper read it and waited up to 1 s.
        let mute: Vec<OwnedFd> = (0..3).map(|_| k.connect().unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let (r, _w) = nix::unistd::pipe().unwrap();
        let t0 = Instant::now();
        for i in 0..20 {
            k.put(&format!("c{i}/p1/1"), r.as_fd()).unwrap();
        }
        assert_eq!(k.all().unwrap().len(), 20);
        for i in 0..20 {
            k.drop_key(&format!("c{i}/p1/1")).unwrap();
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(500), "{took:?}");
        // A mute client that speaks at last is served.
        send(mute[0].as_fd(), "ALL", None).unwrap();
        assert_eq!(recv(mute[0].as_fd()).unwrap().0.as_deref(), Some("END"));
        drop(mute);
        drop(r);
        t.join().unwrap().unwrap();
    }

    /// A lease is held by its open file, which imacri and the keeper both
    /// hold a copy of: when a container's group goes, both let go of its
    /// leases (imacri's copy kept them, and every open for writing of a
    /// file the gone container had mapped waited out fs.lease-break-time).
    #[test]
    fn a_groups_leases_go_with_it_here_and_in_the_keeper() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let (k, t) = keeper_at(&sock);
        let mapped = dir.path().join("mapped");
        std::fs::write(&mapped, b"code").unwrap();
        let leased = std::fs::File::open(&mapped).unwrap();
        // SAFETY: fcntl on an fd of ours, no pointers.
        let r = unsafe { libc::fcntl(leased.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        // The lease made this process its owner: no SIGIO when it breaks.
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::fcntl(leased.as_raw_fd(), libc::F_SETOWN, 0) },
            0
        );
        let group = std::fs::File::open("/dev/null").unwrap();
        let other = std::fs::File::open("/dev/null").unwrap();
        let (la, lb) = (lease_key("a", (1, 2)), lease_key("b", (1, 2)));
        k.put(&format!("{FANOTIFY}a"), group.as_fd()).unwrap();
        k.put(&la, leased.as_fd()).unwrap();
        k.put(&event_key("a", 7, Access::Exec, 1), other.as_fd())
            .unwrap();
        k.put(&format!("{FANOTIFY}b"), other.as_fd()).unwrap();
        k.put(&lb, other.as_fd()).unwrap();
        drop(leased);
        let open_to_write = || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&mapped)
        };
        let e = open_to_write().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "{e}");
        k.drop_key(&format!("{FANOTIFY}a")).unwrap();
        open_to_write().expect("the lease outlived its group");
        let b = vec![format!("{FANOTIFY}b"), lb];
        let here = k.given.keys();
        assert_eq!(here, b);
        let there: Vec<String> = k.all().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(there, b);
        k.drop_key(&b[0]).unwrap();
        assert!(k.given.keys().is_empty());
        drop((group, other));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn fds_are_kept_and_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let (k, t) = keeper_at(&sock);
        // While an imacri holds on, an empty keeper stays up.
        k.hold().unwrap();
        std::thread::sleep(IDLE_EXIT + Duration::from_millis(700));
        assert!(k.connect().is_ok(), "the keeper left while held");
        // A pipe stands in for a listener: its read end hangs up when the
        // write end closes, as a listener does when its tasks are gone.
        let (r, w) = nix::unistd::pipe().unwrap();
        k.put("c1/p1/1", r.as_fd()).unwrap();
        drop(r);
        let all = k.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "c1/p1/1");
        drop(all);
        drop(w);
        k.hold.lock().unwrap().take();
        // Hung up: dropped; then idle and empty: the keeper exits.
        t.join().unwrap().unwrap();
        assert!(!sock.exists());
    }
}
