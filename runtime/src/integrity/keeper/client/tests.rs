//! The keeper's client against a keeper on a thread of the test (or a
//! stand-in that refuses or never answers).

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
        debt: Default::default(),
        taken: Default::default(),
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

/// Keys the keeper at `k` holds, sorted.
fn held_by(k: &Keeper) -> Vec<String> {
    let mut keys: Vec<String> = k.all().unwrap().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys
}

/// What imacri let go of while the keeper owed (stalled: not asked)
/// goes from the keeper at the next round, and what imacri took
/// meanwhile comes to it; an answered event's number stays taken until
/// then, and until imacri has taken back what the keeper held at its
/// start (before, the keeper would be made to let go of that too).
#[test]
fn what_imacri_let_go_of_while_the_keeper_owed_goes_at_the_next_round() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let (k, t) = keeper_at(&sock);
    k.hold().unwrap();
    let f = std::fs::File::open("/dev/null").unwrap();
    let group = format!("{FANOTIFY}a");
    let (e1, e2) = (
        event_key("a", 7, Access::Exec, 1),
        event_key("a", 8, Access::Exec, 1),
    );
    for key in [&group, &e1] {
        k.put(key, f.as_fd()).unwrap();
    }
    assert!(k.debt.owe(), "owed before");
    let t0 = Instant::now();
    let answered = f.try_clone().unwrap();
    let number = answered.as_raw_fd();
    k.drop_event(&e1, answered.into());
    k.put(&e2, f.as_fd()).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        held_by(&k),
        [group.clone(), e1.clone()],
        "the keeper was asked"
    );
    assert_eq!(k.debt.numbers_held(), 1);
    // Not settled yet: given everything, let go of nothing.
    k.revive(k.debt.begin(true).unwrap()).unwrap();
    assert_eq!(held_by(&k), [group.clone(), e1.clone(), e2.clone()]);
    assert_eq!(
        k.debt.numbers_held(),
        1,
        "{number} freed while the keeper held it"
    );
    k.catch_up(k.revivals()).unwrap();
    assert_eq!(held_by(&k), [group.clone(), e2.clone()]);
    assert_eq!(k.debt.numbers_held(), 0);
    assert!(!k.debt.owed());
    // Back to asking the keeper.
    k.drop_key(&group).unwrap();
    assert!(held_by(&k).is_empty());
    k.hold.lock().unwrap().take();
    drop(f);
    t.join().unwrap().unwrap();
}

/// A keeper that takes connections and never answers (stopped): the
/// first put waits out its timeouts, then nothing waits for it (puts
/// and drops are owed) and no connect waits for room in its full
/// backlog without end.
#[test]
fn a_stalled_keeper_is_waited_for_once() {
    use nix::sys::socket::{bind, listen, Backlog};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let l = seqpacket().unwrap();
    bind(l.as_raw_fd(), &UnixAddr::new(&sock).unwrap()).unwrap();
    listen(&l, Backlog::new(1).unwrap()).unwrap();
    let k = client_of(&sock);
    let f = std::fs::File::open("/dev/null").unwrap();
    let t0 = Instant::now();
    k.put("c1/p1/1", f.as_fd()).unwrap();
    let first = t0.elapsed();
    assert!(first < Duration::from_secs(7), "{first:?}");
    assert!(k.debt.owed());
    let t0 = Instant::now();
    for i in 0..50 {
        let key = event_key("c1", i, Access::Exec, 1);
        k.put(&key, f.as_fd()).unwrap();
        k.drop_event(&key, f.try_clone().unwrap().into());
    }
    let rest = t0.elapsed();
    assert!(rest < Duration::from_millis(200), "{rest:?}");
    assert_eq!(k.debt.numbers_held(), 50);
    // A round finds it as stalled: it fails in bounded time.
    let t0 = Instant::now();
    assert!(k.catch_up(0).is_err());
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    assert_eq!(k.debt.numbers_held(), 50);
    drop(l);
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
