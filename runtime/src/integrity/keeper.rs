//! Keeps the measurement fds open while imacri is not running (a crash, an
//! upgrade), so the containers of ima pods wait for the next imacri instead
//! of running on unmeasured or failing for good:
//! - the map guard's seccomp listeners: without a copy the kernel answers
//!   every guarded call with ENOSYS once imacri's copy closes (fail-closed,
//!   but a workload that maps a library later breaks);
//! - the fanotify groups (keys `fan:<container>`): without a copy the group
//!   is released when imacri's closes, and the kernel *allows* every pending
//!   and later execution unmeasured. With one, the marks stay, events queue
//!   and their tasks wait (killably) for the next imacri, which takes the
//!   group back.
//!
//! The keeper is `imacri internal fd-keeper --socket <state>/fdkeeper.sock`, a
//! session of its own so it outlives imacri. It holds nothing else, answers
//! only root (the socket is 0600), drops a listener once no task uses its
//! filter (POLLHUP), a fanotify group once imacri drops it or none of its
//! marked filesystems exists any more, and exits when it holds nothing and
//! no imacri holds on.
//!
//! Protocol (SOCK_SEQPACKET, one message per request): `PUT <key>` with one
//! fd; `DROP <key>`; `ALL`, answered by `FD <key>` messages with a copy
//! each, then `END`; `HOLD`, a connection imacri keeps open so the keeper
//! stays up.

use nix::sys::socket::{
    accept, bind, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Keys of fanotify groups start with this.
pub const FANOTIFY: &str = "fan:";

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

/// imacri keeps its open-file limit at most this (lowering a higher one):
/// every fd number a dead imacri could have held an event under is below
/// it, so the sweep that denies its unanswered events costs a bounded
/// 10-20 ms per group even where the hard limit is a million (systemd's
/// `LimitNOFILE=infinity`), not half a second. Room for a full node: an ima
/// pod holds at most `engine::PER_POD_QUEUE` event fds, plus a group and a
/// seccomp listener per container.
pub const MAX_OPEN_FILES: u64 = 32768;

/// The open-file limit imacri runs with, given its current hard limit.
pub fn open_files_limit(hard: u64) -> u64 {
    hard.min(MAX_OPEN_FILES)
}

/// Keys of fanotify events an imacri was measuring (a copy of the event's
/// fd, handed over before hashing) start with this; see [`event_key`].
pub const FANOTIFY_EVENT: &str = "fev:";

/// An event the last imacri read and was measuring when it went away: the
/// file, and the number its reader got, by which the kernel matches the
/// answer (any process may write it to the group).
pub struct KeptEvent {
    pub number: i32,
    pub exec: bool,
    /// The thread that opened the file.
    pub tid: i32,
    pub file: OwnedFd,
}

/// `fev:<container>:<number>:<exec|read>:<tid>`.
pub fn event_key(container: &str, number: i32, exec: bool, tid: i32) -> String {
    let kind = if exec { "exec" } else { "read" };
    format!("{FANOTIFY_EVENT}{container}:{number}:{kind}:{tid}")
}

/// The container and the event's number, kind and thread of an
/// [`event_key`].
pub fn parse_event_key(key: &str) -> Option<(&str, i32, bool, i32)> {
    let rest = key.strip_prefix(FANOTIFY_EVENT)?;
    let mut f = rest.rsplitn(4, ':');
    let tid = f.next()?.parse().ok()?;
    let exec = match f.next()? {
        "exec" => true,
        "read" => false,
        _ => return None,
    };
    let number = f.next()?.parse().ok()?;
    Some((f.next()?, number, exec, tid))
}

/// Keys of map-guard notifications an imacri was measuring (a copy of the
/// mapped file, handed over before hashing): `mev:<listener key>:<id>`.
pub const MAPPING_EVENT: &str = "mev:";

pub fn mapping_key(listener: &str, id: u64) -> String {
    format!("{MAPPING_EVENT}{listener}:{id}")
}

/// The listener's key and the notification id of a [`mapping_key`].
pub fn parse_mapping_key(key: &str) -> Option<(&str, u64)> {
    let (listener, id) = key.strip_prefix(MAPPING_EVENT)?.rsplit_once(':')?;
    Some((listener, id.parse().ok()?))
}

/// Keys of read leases on the files a container mapped executable (a copy
/// of imacri's own open file that holds the lease):
/// `fls:<container>:<dev>:<ino>:<serial>`, the serial making each lease's
/// key its own (one file can be leased again after its watch ended while
/// the old key is being dropped). They go with their container's group.
pub const LEASE: &str = "fls:";

pub fn lease_key(container: &str, inode: (u64, u64)) -> String {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{LEASE}{container}:{}:{}:{}-{n}",
        inode.0,
        inode.1,
        std::process::id()
    )
}

/// The container of a [`lease_key`].
pub fn parse_lease_key(key: &str) -> Option<&str> {
    let mut f = key.strip_prefix(LEASE)?.rsplitn(4, ':');
    f.next()?;
    f.next()?.parse::<u64>().ok()?;
    f.next()?.parse::<u64>().ok()?;
    f.next()
}

/// Writes the answer to the event a reader got as fd `number` (ours or a
/// previous reader's); false when no event waits under that number.
pub fn respond(group: BorrowedFd<'_>, number: i32, allow: bool) -> bool {
    let r = libc::fanotify_response {
        fd: number,
        response: if allow {
            libc::FAN_ALLOW
        } else {
            libc::FAN_DENY
        },
    };
    // SAFETY: the response is a plain C struct, written whole.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&r as *const libc::fanotify_response).cast::<u8>(),
            std::mem::size_of::<libc::fanotify_response>(),
        )
    };
    // ENOENT: no event waits under that number.
    nix::unistd::write(group, bytes).is_ok()
}

/// Answers "deny" for every event of a fanotify group that a reader took
/// and can no longer answer (it is gone), but those under `kept` numbers
/// (handed to the keeper, measured by the next imacri). The kernel keys
/// answers by the fd number the reader got, so every number a previous
/// reader could have held is tried (below our open-file limit: the same
/// binary, the same limit, at most [`MAX_OPEN_FILES`]). Returns how many
/// events were denied.
pub fn deny_unanswered(group: BorrowedFd<'_>, kept: &[i32]) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall on a local struct.
    let top = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(MAX_OPEN_FILES) as i32
    } else {
        MAX_OPEN_FILES as i32
    };
    (0..top)
        .filter(|n| !kept.contains(n) && respond(group, *n, false))
        .count()
}

/// The event numbers kept for `container`'s group.
fn kept_numbers(held: &BTreeMap<String, OwnedFd>, container: &str) -> Vec<i32> {
    held.keys()
        .filter_map(|k| parse_event_key(k))
        .filter(|(c, ..)| *c == container)
        .map(|(_, n, ..)| n)
        .collect()
}

/// The notification ids kept for the listener under `listener`.
fn kept_ids(held: &BTreeMap<String, OwnedFd>, listener: &str) -> Vec<u64> {
    held.keys()
        .filter_map(|k| parse_mapping_key(k))
        .filter(|(l, _)| *l == listener)
        .map(|(_, id)| id)
        .collect()
}

/// Events whose container's group (or whose listener) is no longer held
/// are let go: nobody will answer them through it. A group's leases go with
/// it too (each an open file of the container's, and a lease nobody answers
/// makes every open for writing of its file wait out `fs.lease-break-time`).
fn drop_orphan_events(held: &mut BTreeMap<String, OwnedFd>) {
    let live: std::collections::HashSet<String> = held
        .keys()
        .filter_map(|k| k.strip_prefix(FANOTIFY))
        .map(str::to_string)
        .collect();
    let listeners: std::collections::HashSet<String> = held
        .keys()
        .filter(|k| is_listener_key(k))
        .cloned()
        .collect();
    held.retain(|k, _| {
        parse_event_key(k).is_none_or(|(c, ..)| live.contains(c))
            && parse_lease_key(k).is_none_or(|c| live.contains(c))
            && parse_mapping_key(k).is_none_or(|(l, _)| listeners.contains(l))
    });
}

/// Whether `other` goes when `key` goes ([`drop_orphan_events`]'s rule for
/// one key): a group's events and leases, a listener's notifications.
fn goes_with(key: &str, other: &str) -> bool {
    if let Some(c) = key.strip_prefix(FANOTIFY) {
        parse_event_key(other).is_some_and(|(o, ..)| o == c) || parse_lease_key(other) == Some(c)
    } else if is_listener_key(key) {
        parse_mapping_key(other).is_some_and(|(l, _)| l == key)
    } else {
        false
    }
}

/// Whether `key` names a seccomp listener (not a group or an event).
fn is_listener_key(key: &str) -> bool {
    !key.starts_with(FANOTIFY)
        && !key.starts_with(FANOTIFY_EVENT)
        && !key.starts_with(MAPPING_EVENT)
        && !key.starts_with(LEASE)
}

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
    fn path_for(dir: &Path, key: &str) -> PathBuf {
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

/// How long an idle keeper with nothing to keep waits for a client.
/// How long the keeper keeps a connection whose request has not come.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

const IDLE_EXIT: Duration = Duration::from_secs(2);

fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn send(sock: BorrowedFd<'_>, text: &str, fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map(|_| ())
}

/// One message: its text (None at EOF) and its fd, if any.
fn recv(sock: BorrowedFd<'_>) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    recv_with(sock, MsgFlags::empty())
}

/// [`recv`] of a message that is there already: EAGAIN if none is.
fn recv_now(sock: BorrowedFd<'_>) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    recv_with(sock, MsgFlags::MSG_DONTWAIT)
}

fn recv_with(
    sock: BorrowedFd<'_>,
    flags: MsgFlags,
) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for f in raw {
                // SAFETY: the kernel just gave us this fd.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Ok((None, fd));
    }
    Ok((Some(String::from_utf8_lossy(&buf[..n]).into_owned()), fd))
}

/// The client side, used by imacri.
#[derive(Clone)]
pub struct Keeper {
    path: PathBuf,
    /// imacri's binary, to start the keeper again if it is gone.
    exe: PathBuf,
    /// A `HOLD` connection: while it is open the keeper stays up even with
    /// nothing to keep, so no container start pays for starting it.
    hold: std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>,
    /// A copy of everything imacri handed over and did not take back, by
    /// key: a keeper started after the last one died is given it all again
    /// (otherwise the node would silently lose its protection against an
    /// imacri crash).
    given: std::sync::Arc<std::sync::Mutex<BTreeMap<String, OwnedFd>>>,
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
    /// so one that does not answer is started again (once).
    pub fn put(&self, key: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.put_once(key, fd).or_else(|_| {
            self.revive()?;
            self.put_once(key, fd)
        })?;
        self.remember(key, fd);
        Ok(())
    }

    /// Records that the keeper holds `fd` under `key` (handed over by the
    /// last imacri and taken back now), to give it again to a new keeper.
    pub fn remember(&self, key: &str, fd: BorrowedFd<'_>) {
        let (Ok(copy), key) = (fd.try_clone_to_owned(), key.to_string()) else {
            return;
        };
        // Nothing is closed (a syscall) while the lock is held: a pod's
        // threads take it, and one stopped holding it would stall the rest.
        let replaced = self.given.lock().ok().and_then(|mut g| g.insert(key, copy));
        drop(replaced);
    }

    /// Forgets `key` here only (the keeper let it go by itself: a listener
    /// no task uses any more), and what goes with it as in the keeper (a
    /// group's leases and events, a listener's notifications): kept here,
    /// a lease of a gone container's would stay held by imacri.
    pub fn forget(&self, key: &str) {
        // Closed once the lock is let go (see `remember`).
        let removed: Vec<OwnedFd> = match self.given.lock() {
            Ok(mut g) => {
                let mut out: Vec<OwnedFd> = g.remove(key).into_iter().collect();
                let with: Vec<String> = g.keys().filter(|k| goes_with(key, k)).cloned().collect();
                for k in with {
                    out.extend(g.remove(&k));
                }
                out
            }
            Err(_) => Vec::new(),
        };
        drop(removed);
    }

    /// Starts a keeper (if none answers) and gives it everything imacri
    /// handed over before: the last one may have died with all of it.
    fn revive(&self) -> std::io::Result<usize> {
        self.start()?;
        let Ok(given) = self.given.lock() else {
            return Ok(0);
        };
        for (k, f) in given.iter() {
            self.put_once(k, f.as_fd())?;
        }
        Ok(given.len())
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
                if alive {
                    continue;
                }
                match k.revive() {
                    Ok(n) => tracing::warn!(given = n, "the fd keeper was gone: started again and given every group and listener"),
                    Err(e) => {
                        tracing::error!(error = %e, "the fd keeper is gone and cannot be started: an imacri crash now leaves ima containers unmeasured");
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

    /// Copies of every fd the keeper holds, with their keys.
    pub fn all(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let s = self.connect()?;
        send(s.as_fd(), "ALL", None)?;
        let mut out = Vec::new();
        loop {
            match recv(s.as_fd())? {
                (Some(t), Some(fd)) if t.starts_with("FD ") => out.push((t[3..].to_string(), fd)),
                (Some(t), _) if t == "END" => return Ok(out),
                (t, _) => return Err(std::io::Error::other(format!("fd keeper answered {t:?}"))),
            }
        }
    }
}

/// The keeper process. Returns when there is nothing left to keep.
pub fn run(path: &Path) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let _ = std::fs::remove_file(path);
    let l = seqpacket()?;
    bind(l.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&l, Backlog::new(64)?)?;
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
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
                if serve_one(c.as_fd(), &mut held) {
                    holders.push(c);
                }
            } else if since.elapsed() < REQUEST_WAIT {
                waiting.push((c, since));
            }
        }
        if ready {
            // SAFETY: accept returns a new fd we own.
            if let Ok(c) = accept(l.as_raw_fd()).map(|f| unsafe { OwnedFd::from_raw_fd(f) }) {
                // Served at once when its request is there (the usual case),
                // else when it comes.
                let mut one = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
                let now = matches!(poll(&mut one, PollTimeout::ZERO), Ok(n) if n > 0);
                if !now {
                    waiting.push((c, Instant::now()));
                } else if serve_one(c.as_fd(), &mut held) {
                    holders.push(c);
                }
            }
            idle_since = Instant::now();
        }
        drop_orphan_events(&mut held);
        if held.is_empty()
            && holders.is_empty()
            && waiting.is_empty()
            && idle_since.elapsed() > IDLE_EXIT
        {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
    }
}

/// Serves one request that has arrived (the read does not wait); true for
/// HOLD (the connection is then kept).
fn serve_one(c: BorrowedFd<'_>, held: &mut BTreeMap<String, OwnedFd>) -> bool {
    let Ok((Some(text), fd)) = recv_now(c) else {
        return false;
    };
    if text == "HOLD" {
        return true;
    }
    if let Some(key) = text.strip_prefix("PUT ") {
        if let Some(fd) = fd {
            held.insert(key.to_string(), fd);
            let _ = send(c, "OK", None);
        }
    } else if let Some(key) = text.strip_prefix("DROP ") {
        held.remove(key);
        // What goes with it (a group's events and leases) goes before the
        // answer: a lease's file keeps the container's rootfs busy.
        drop_orphan_events(held);
        let _ = send(c, "OK", None);
    } else if text == "ALL" {
        for (k, f) in held.iter() {
            if send(c, &format!("FD {k}"), Some(f.as_fd())).is_err() {
                return false;
            }
        }
        let _ = send(c, "END", None);
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_bounds_the_sweep() {
        // systemd's LimitNOFILE=infinity gives 2^20 (fs.nr_open).
        assert_eq!(super::open_files_limit(1 << 20), super::MAX_OPEN_FILES);
        assert_eq!(super::open_files_limit(20000), 20000);
    }

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

    #[test]
    fn event_keys_round_trip() {
        let c = "3b48b7a8b2acc22ad0839b2532189cd0812d8576402178d35211ea12f4b568fc";
        let k = event_key(c, 37, true, 4242);
        assert!(k.starts_with(FANOTIFY_EVENT));
        assert_eq!(parse_event_key(&k), Some((c, 37, true, 4242)));
        assert_eq!(
            parse_event_key(&event_key(c, 5, false, 1)),
            Some((c, 5, false, 1))
        );
        assert_eq!(parse_event_key(&format!("{FANOTIFY}{c}")), None);
        assert_eq!(parse_event_key("fev:c:x:exec:1"), None);
        assert_eq!(parse_event_key("fev:c:1:run:1"), None);
    }

    #[test]
    fn events_go_with_their_group() {
        let file = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut held = BTreeMap::new();
        held.insert(format!("{FANOTIFY}a"), file());
        held.insert(event_key("a", 7, true, 1), file());
        held.insert(event_key("a", 9, false, 1), file());
        held.insert(event_key("b", 7, true, 1), file());
        let (la, lb) = (lease_key("a", (2049, 12)), lease_key("b", (2049, 12)));
        held.insert(la.clone(), file());
        held.insert(lb.clone(), file());
        held.insert("c1/p1/1".to_string(), file());
        held.insert(mapping_key("c1/p1/1", 41), file());
        held.insert(mapping_key("c2/p1/2", 42), file());
        drop_orphan_events(&mut held);
        assert_eq!(kept_numbers(&held, "a"), vec![7, 9]);
        assert!(kept_numbers(&held, "b").is_empty());
        assert!(held.contains_key(&la));
        assert!(!held.contains_key(&lb));
        assert_eq!(parse_lease_key(&lease_key("a", (1, 2))), Some("a"));
        assert_eq!(parse_lease_key("fls:a:x:2:1-1"), None);
        assert!(held.contains_key("c1/p1/1"));
        assert_eq!(kept_ids(&held, "c1/p1/1"), vec![41]);
        assert!(kept_ids(&held, "c2/p1/2").is_empty());
        assert_eq!(
            parse_mapping_key(&mapping_key("c1/p1/1", 41)),
            Some(("c1/p1/1", 41))
        );
    }

    /// A keeper running at `sock` on a thread, and a client of it.
    fn keeper_at(sock: &Path) -> (Keeper, std::thread::JoinHandle<std::io::Result<()>>) {
        let s2 = sock.to_path_buf();
        let t = std::thread::spawn(move || run(&s2));
        let k = Keeper {
            path: sock.to_path_buf(),
            exe: PathBuf::from("/nonexistent"),
            hold: Default::default(),
            given: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while k.connect().is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        (k, t)
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
        k.put(&event_key("a", 7, true, 1), other.as_fd()).unwrap();
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
        let here: Vec<String> = k.given.lock().unwrap().keys().cloned().collect();
        assert_eq!(here, b);
        let there: Vec<String> = k.all().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(there, b);
        k.drop_key(&b[0]).unwrap();
        assert!(k.given.lock().unwrap().is_empty());
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
