//! The keeper process (`imacri internal fd-keeper`): holds what imacri
//! hands it, lets go of what nothing can wait on any more, answers for a
//! dead imacri what it took and will never answer, and exits when idle.

use nix::sys::socket::{accept, bind, listen, Backlog, UnixAddr};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::deny_unanswered;
use super::ids::{ids_dir, IdFile};
use super::keys::*;
use super::ledger::Ledger;
use super::wire::{recv_now, send, seqpacket};

/// True while a fanotify group (an fd of this process) still has a mark:
/// once every marked filesystem is gone, nothing can wait on it.
fn fanotify_marked(fd: BorrowedFd<'_>) -> bool {
    match std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())) {
        // "fanotify flags:..." is the group; marks are the other lines.
        Ok(info) => info
            .lines()
            .any(|l| l.starts_with("fanotify ") && !l.starts_with("fanotify flags:")),
        Err(_) => false,
    }
}

/// The filesystems (as `(major, minor)`) a fanotify group marks, from the
/// `sdev:` of its fdinfo (the kernel's dev_t: 12 bits major, 20 minor).
fn marked_filesystems(fd: BorrowedFd<'_>) -> Vec<(u64, u64)> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| l.strip_prefix("fanotify sdev:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .map(|d| (d >> 20, d & 0xf_ffff))
        .collect()
}

/// Whether a filesystem is still in use by anything but a fanotify group:
/// mounted in some mount namespace, or the root or working directory of
/// some process. A filesystem nothing uses any more can still be alive,
/// pinned by events queued in a group that marks it (a close after write
/// while imacri was down): the keeper must not keep such a group for ever.
fn filesystem_in_use(devs: &[(u64, u64)]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut namespaces = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let dir = p.path();
        for place in ["root", "cwd"] {
            if let Ok(m) = std::fs::metadata(dir.join(place)) {
                let d = m.dev();
                if devs.contains(&(libc::major(d) as u64, libc::minor(d) as u64)) {
                    return true;
                }
            }
        }
        let Ok(ns) = std::fs::read_link(dir.join("ns/mnt")) else {
            continue;
        };
        if !namespaces.insert(ns) {
            continue;
        }
        let info = std::fs::read_to_string(dir.join("mountinfo")).unwrap_or_default();
        let mounted = info.lines().filter_map(|l| l.split(' ').nth(2)).any(|mm| {
            let mut f = mm.split(':').map(|n| n.parse::<u64>().unwrap_or(u64::MAX));
            matches!((f.next(), f.next()), (Some(a), Some(b)) if devs.contains(&(a, b)))
        });
        if mounted {
            return true;
        }
    }
    false
}

/// How often kept fanotify groups are checked for marks left.
const MARK_CHECK: Duration = Duration::from_secs(2);

/// Closes every fd but stdio: the keeper outlives imacri and must not hold
/// on to what imacri inherited (a parent's pipes). Call first thing in the
/// keeper process, never in a process with fds of its own.
pub fn close_inherited() {
    // SAFETY: close_range on fds this fresh process does not use.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// How long the keeper keeps a connection whose request has not come.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// How long an idle keeper with nothing to keep waits for a client.
pub(super) const IDLE_EXIT: Duration = Duration::from_secs(2);

/// The keeper process. Returns when there is nothing left to keep.
pub fn run(path: &Path) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let _ = std::fs::remove_file(path);
    let l = seqpacket()?;
    bind(l.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&l, Backlog::new(64)?)?;
    let mut ledger = Ledger::create(path, l.as_raw_fd());
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
    // The keys put since imacri's last `SYNC` (None: no round under way).
    let mut synced: Option<BTreeSet<String>> = None;
    // Open HOLD connections: an imacri is running.
    let mut holders: Vec<OwnedFd> = Vec::new();
    // Connections whose request has not arrived yet. Served when it has,
    // never waited on: a client is often a thread working for a pod, which
    // a pod at its CPU limit stops wherever it is (between its connect and
    // its send, too); reading such a connection made every other pod's
    // request wait out that pod's period.
    let mut waiting: Vec<(OwnedFd, Instant)> = Vec::new();
    let mut idle_since = Instant::now();
    let mut last_mark_check = Instant::now();
    loop {
        let keys: Vec<String> = held.keys().cloned().collect();
        let n = keys.len();
        let mut fds = vec![PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            held.values()
                .map(|f| PollFd::new(f.as_fd(), PollFlags::empty())),
        );
        fds.extend(
            holders
                .iter()
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(
            waiting
                .iter()
                .map(|(f, _)| PollFd::new(f.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let ready = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        // A listener whose filter no task uses any more is done.
        let gone: Vec<String> = fds[1..1 + n]
            .iter()
            .zip(&keys)
            .filter(|(f, _)| {
                f.revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
            })
            .map(|(_, k)| k.clone())
            .collect();
        // A holder says nothing after HOLD: any event means it went away.
        let h = holders.len();
        let left: Vec<bool> = fds[1 + n..1 + n + h]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        // A waiting request arrived (or its client went away).
        let arrived: Vec<bool> = fds[1 + n + h..]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for k in gone {
            held.remove(&k);
            let _ = std::fs::remove_file(IdFile::path_for(&ids_dir(path), &k));
        }
        if last_mark_check.elapsed() >= MARK_CHECK {
            last_mark_check = Instant::now();
            // While no imacri holds on (nobody reads the groups), a group
            // whose filesystems nothing uses any more goes too.
            let unread = holders.is_empty();
            held.retain(|k, f| {
                !k.starts_with(FANOTIFY)
                    || (fanotify_marked(f.as_fd())
                        && (!unread || filesystem_in_use(&marked_filesystems(f.as_fd()))))
            });
        }
        // Before anything new is opened (a request's fd, a connection): a
        // number closed above is not in the ledger under its old key then.
        ledger.sync(&held);
        if left.iter().any(|l| *l) {
            // The imacri that read the groups' events is gone: what it took
            // and did not answer, nobody ever will. Deny it now, so no task
            // waits forever and no event pins a container's filesystem.
            for (k, f) in held.iter() {
                if let Some(c) = k.strip_prefix(FANOTIFY) {
                    deny_unanswered(f.as_fd(), &kept_numbers(&held, c));
                } else if !is_listener_key(k) {
                    // An event being measured: the next imacri does it.
                } else if let Ok(ids) = IdFile::open(&ids_dir(path), k) {
                    ids.deny_orphans(f.as_fd(), &kept_ids(&held, k));
                }
            }
        }
        let mut gone_holders = left.into_iter();
        holders.retain(|_| !gone_holders.next().unwrap_or(false));
        if !holders.is_empty() {
            idle_since = Instant::now();
        }
        let mut arrived = arrived.into_iter();
        for (c, since) in std::mem::take(&mut waiting) {
            if arrived.next().unwrap_or(false) {
                if serve_one(c.as_fd(), &mut held, &mut synced, &mut ledger) {
                    holders.push(c);
                }
            } else if since.elapsed() < REQUEST_WAIT {
                waiting.push((c, since));
            }
        }
        if ready {
            // SAFETY: accept returns a new fd we own.
            let accepted = accept(l.as_raw_fd()).map(|f| unsafe { OwnedFd::from_raw_fd(f) });
            if let Err(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE) = accepted {
                // At the open-file limit the connection stays queued and
                // the listener readable: a pause, not a spin, until an fd
                // is free (a client gives up after its timeout and imacri
                // gives everything again once the keeper takes it).
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(c) = accepted {
                // Served at once when its request is there (the usual case),
                // else when it comes.
                let mut one = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
                let now = matches!(poll(&mut one, PollTimeout::ZERO), Ok(n) if n > 0);
                if !now {
                    waiting.push((c, Instant::now()));
                } else if serve_one(c.as_fd(), &mut held, &mut synced, &mut ledger) {
                    holders.push(c);
                }
            }
            idle_since = Instant::now();
        }
        drop_orphan_events(&mut held);
        ledger.sync(&held);
        if held.is_empty()
            && holders.is_empty()
            && waiting.is_empty()
            && idle_since.elapsed() > IDLE_EXIT
        {
            ledger.remove();
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
    }
}

/// Serves one request that has arrived (the read does not wait); true for
/// HOLD (the connection is then kept).
fn serve_one(
    c: BorrowedFd<'_>,
    held: &mut BTreeMap<String, OwnedFd>,
    synced: &mut Option<BTreeSet<String>>,
    ledger: &mut Ledger,
) -> bool {
    let Ok((Some(text), fd)) = recv_now(c) else {
        return false;
    };
    let answer = if text == "HOLD" {
        return true;
    } else if let Some(key) = text.strip_prefix("PUT ") {
        match fd {
            Some(fd) => {
                held.insert(key.to_string(), fd);
                if let Some(s) = synced.as_mut() {
                    s.insert(key.to_string());
                }
                "OK"
            }
            // Its fd did not come (the keeper at its open-file limit): said
            // at once, so the client need not wait out its timeout.
            None => "NOFD",
        }
    } else if let Some(key) = text.strip_prefix("DROP ") {
        held.remove(key);
        if let Some(s) = synced.as_mut() {
            s.remove(key);
        }
        // What goes with it (a group's events and leases) goes before the
        // answer: a lease's file keeps the container's rootfs busy.
        drop_orphan_events(held);
        "OK"
    } else if text == "SYNC" {
        *synced = Some(BTreeSet::new());
        "OK"
    } else if text == "PRUNE" {
        // What imacri did not give in its round is what it let go of while
        // this keeper did not hear it (stalled) or what the keeper took
        // late (a put it gave up waiting for).
        match synced.take() {
            Some(s) => {
                held.retain(|k, _| s.contains(k));
                drop_orphan_events(held);
                "OK"
            }
            None => "NOSYNC",
        }
    } else if text == "ALL" {
        for (k, f) in held.iter() {
            if send(c, &format!("FD {k}"), Some(f.as_fd())).is_err() {
                return false;
            }
        }
        "END"
    } else {
        "?"
    };
    // What imacri is told it holds is in the ledger first.
    ledger.sync(held);
    let _ = send(c, answer, None);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_is_in_use_while_mounted() {
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata("/proc/self/root").unwrap().dev();
        assert!(filesystem_in_use(&[(
            libc::major(d) as u64,
            libc::minor(d) as u64
        )]));
        assert!(!filesystem_in_use(&[(4095, 1_048_575)]));
    }
}
