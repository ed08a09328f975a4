//! A pod's thread with nothing to do ends, and starts again when there is.
//!
//! Each measured container has two threads of imacri's waiting on its fds:
//! its fanotify reader and its seccomp listener. With imacri's allocator
//! (mimalloc: pages of its own per thread, so that no thread waits on a lock
//! a throttled pod's thread holds) a thread costs ~75 KiB however little it
//! does (its stack, its heap, a page per size class it holds an object of):
//! 150 KiB per pod, and most pods are idle most of the time. So a pod's
//! thread that has had no event for [`QUIET`] parks: it hands the parking
//! thread its fds and what it was doing, and ends. The parking thread waits
//! on every parked fd with one epoll; when one becomes readable or hangs up
//! it starts a new thread that goes on where the last one stopped. What
//! arrives meanwhile (a permission event, a guarded call) waits in the
//! kernel, answered by nobody else, a thread's start longer (~30 us).
//!
//! The parking thread only waits and starts threads; it never does a pod's
//! work, so no pod can stall it. A thread that moved into its pod's cgroups
//! goes home before it parks: the parking lot's lock is never held by a
//! thread a pod's CPU limit can stop. A thread started again moves into
//! them only once its pod's uncharged budget is spent (`charge::work_for`):
//! a migration costs ~10 ms after a quiet spell, which the first event
//! would wait for. A thread that cannot be started is tried again every
//! [`RETRY`] while what it would answer waits: closed, not skipped.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::charge;

/// How long a thread waits without events before it parks.
pub const QUIET: Duration = Duration::from_secs(1);

/// How often a thread that could not be started is tried again.
pub const RETRY: Duration = Duration::from_millis(100);

/// When a polling thread last had something to do.
#[derive(Debug)]
pub struct Idle {
    since: Instant,
}

impl Default for Idle {
    fn default() -> Self {
        Idle {
            since: Instant::now(),
        }
    }
}

impl Idle {
    /// The thread handled something.
    pub fn worked(&mut self) {
        self.since = Instant::now();
    }

    /// Whether it has been quiet for [`QUIET`].
    pub fn is_over(&self) -> bool {
        self.since.elapsed() >= QUIET
    }

    /// How long the thread may wait for its next event: `wanted` (None:
    /// for ever), shortened to when it will have been quiet long enough.
    pub fn wait(&self, wanted: Option<Duration>) -> Duration {
        let left = QUIET.saturating_sub(self.since.elapsed());
        wanted.map_or(left, |w| w.min(left))
    }

    /// [`Self::wait`] as `poll`'s timeout (rounded up to milliseconds).
    pub fn poll_timeout(&self, wanted: Option<Duration>) -> nix::poll::PollTimeout {
        let ms = self.wait(wanted).as_micros().div_ceil(1000);
        nix::poll::PollTimeout::from(ms.min(u128::from(u16::MAX)) as u16)
    }
}

/// The thread a parked one is started again as.
#[derive(Debug, Clone, Copy)]
pub struct Spawn {
    pub name: &'static str,
    /// None: the default.
    pub stack: Option<usize>,
}

impl Spawn {
    /// Starts `f` on a thread of this kind (a reader's or listener's first
    /// thread, and every one the parking thread starts again).
    pub fn start(self, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut b = std::thread::Builder::new().name(self.name.into());
        if let Some(s) = self.stack {
            b = b.stack_size(s);
        }
        let here = charge::here();
        b.spawn(move || {
            here.adopt();
            f()
        })
        .map(|_| ())
    }
}

type Resume = Box<dyn FnOnce() + Send + 'static>;

struct Waiting {
    fds: Vec<RawFd>,
    spawn: Spawn,
    resume: Resume,
    /// Starts that failed (warned about once).
    failed: u32,
}

struct Lot {
    epoll: Epoll,
    parked: Mutex<Parked>,
}

#[derive(Default)]
struct Parked {
    next: u64,
    waiting: HashMap<u64, Waiting>,
    /// Ready, and their thread could not be started yet.
    unstarted: Vec<Waiting>,
}

/// Parks the calling thread's work: `resume(state)` runs on a new thread
/// once one of `fds` (which `state` owns and keeps open) is readable or
/// hung up. The caller ends right after Ok. Err(state) when there is no
/// parking: the caller goes on waiting itself.
pub fn park<T: Send + 'static>(
    fds: &[RawFd],
    spawn: Spawn,
    state: T,
    resume: fn(T),
) -> Result<(), T> {
    let Some(lot) = lot() else {
        return Err(state);
    };
    charge::leave();
    let mut parked = lot.parked.lock().unwrap_or_else(|p| p.into_inner());
    let token = parked.next;
    parked.next += 1;
    // Registered with the lot locked: the parking thread finds the entry of
    // any event it gets for it.
    let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT;
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: `state` owns the fd and keeps it open while parked.
        let b = unsafe { BorrowedFd::borrow_raw(*fd) };
        if let Err(e) = lot.epoll.add(b, EpollEvent::new(flags, token)) {
            tracing::warn!(error = %e, thread = spawn.name, "cannot park a thread; it goes on waiting");
            unregister(lot, &fds[..i]);
            return Err(state);
        }
    }
    parked.waiting.insert(
        token,
        Waiting {
            fds: fds.to_vec(),
            spawn,
            resume: Box::new(move || resume(state)),
            failed: 0,
        },
    );
    Ok(())
}

/// How many threads' work is parked now (for tests and stats).
pub fn parked() -> usize {
    lot().map_or(0, |l| {
        l.parked
            .lock()
            .map_or(0, |p| p.waiting.len() + p.unstarted.len())
    })
}

fn unregister(lot: &Lot, fds: &[RawFd]) {
    for fd in fds {
        // SAFETY: as in `park`: open while its entry (or caller) holds it.
        let _ = lot.epoll.delete(unsafe { BorrowedFd::borrow_raw(*fd) });
    }
}

/// The parking lot, its thread started on first use (None if it cannot be).
fn lot() -> Option<&'static Lot> {
    static LOT: OnceLock<Option<&'static Lot>> = OnceLock::new();
    *LOT.get_or_init(|| {
        let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "no parking for idle threads: epoll");
                return None;
            }
        };
        let lot: &'static Lot = Box::leak(Box::new(Lot {
            epoll,
            parked: Mutex::default(),
        }));
        let started = std::thread::Builder::new()
            .name("imacri-park".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                // Started by a thread parking, maybe in a pod's cgroups.
                charge::home();
                run(lot)
            });
        match started {
            Ok(_) => Some(lot),
            Err(e) => {
                tracing::warn!(error = %e, "no parking for idle threads: no thread");
                None
            }
        }
    })
}

fn run(lot: &Lot) -> ! {
    let mut events = vec![EpollEvent::empty(); 64];
    loop {
        let retry = {
            let p = lot.parked.lock().unwrap_or_else(|p| p.into_inner());
            !p.unstarted.is_empty()
        };
        let timeout = match retry {
            true => EpollTimeout::from(RETRY.as_millis() as u16),
            false => EpollTimeout::NONE,
        };
        let n = match lot.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                tracing::error!(error = %e, "parking lot: epoll_wait");
                std::thread::sleep(RETRY);
                0
            }
        };
        let ready = {
            let mut p = lot.parked.lock().unwrap_or_else(|p| p.into_inner());
            let mut ready: Vec<Waiting> = p.unstarted.drain(..).collect();
            for ev in &events[..n] {
                // Gone: another of its fds was ready in this batch.
                if let Some(w) = p.waiting.remove(&ev.data()) {
                    unregister(lot, &w.fds);
                    ready.push(w);
                }
            }
            ready
        };
        let unstarted: Vec<Waiting> = ready.into_iter().filter_map(start).collect();
        if !unstarted.is_empty() {
            let mut p = lot.parked.lock().unwrap_or_else(|p| p.into_inner());
            p.unstarted.extend(unstarted);
        }
    }
}

/// Starts `w`'s thread; gives `w` back if it cannot be.
fn start(w: Waiting) -> Option<Waiting> {
    let Waiting {
        fds,
        spawn,
        resume,
        failed,
    } = w;
    // The closure comes back out of a spawn that failed through the slot.
    let slot = Arc::new(Mutex::new(Some(resume)));
    let taken = slot.clone();
    let started = spawn.start(move || {
        let resume = taken.lock().ok().and_then(|mut r| r.take());
        if let Some(r) = resume {
            r()
        }
    });
    match started {
        Ok(()) => None,
        Err(e) => {
            if failed == 0 {
                tracing::warn!(error = %e, thread = spawn.name, "cannot start a parked thread again; what it answers waits, tried again every {RETRY:?}");
            }
            let resume = slot.lock().ok().and_then(|mut r| r.take())?;
            Some(Waiting {
                fds,
                spawn,
                resume,
                failed: failed.saturating_add(1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::mpsc;

    #[test]
    fn a_thread_is_quiet_once_nothing_came_for_a_while() {
        let mut i = Idle::default();
        assert!(!i.is_over());
        assert!(i.wait(None) <= QUIET);
        assert_eq!(
            i.wait(Some(Duration::from_millis(10))),
            Duration::from_millis(10)
        );
        i.since = Instant::now() - QUIET;
        assert!(i.is_over());
        assert_eq!(i.wait(None), Duration::ZERO);
        i.worked();
        assert!(!i.is_over());
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
    }

    const SPAWN: Spawn = Spawn {
        name: "imacri-test-park",
        stack: None,
    };

    #[test]
    fn parked_work_goes_on_on_a_new_thread_once_an_fd_is_ready() {
        let (r, w) = pipe();
        let (other_r, _other_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let fds = [other_r.as_raw_fd(), r.as_raw_fd()];
        let me = std::thread::current().id();
        let state = (r, other_r, tx);
        park(&fds, SPAWN, state, |(r, _o, tx)| {
            nix::unistd::read(r.as_raw_fd(), &mut [0u8; 1]).unwrap();
            let name = std::thread::current().name().map(str::to_string);
            tx.send((std::thread::current().id(), name, r)).unwrap();
        })
        .map_err(|_| "no parking")
        .unwrap();
        // Nothing ready: nothing runs.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        nix::unistd::write(&w, b"x").unwrap();
        let (id, name, r) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_ne!(id, me);
        assert_eq!(name.as_deref(), Some("imacri-test-park"));
        // Parked again with the same fd (unregistered when it was started):
        // a hang-up wakes it too.
        let (tx, rx) = mpsc::channel();
        let fd = r.as_raw_fd();
        park(&[fd], SPAWN, (r, tx), |(_r, tx)| tx.send(()).unwrap())
            .map_err(|_| "no parking")
            .unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(w);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Parked work whose thread cannot be started is kept, not dropped:
    /// dropping it would close a fanotify group, and the kernel answers a
    /// closed group's events "allow".
    #[test]
    fn work_whose_thread_cannot_start_is_kept_not_dropped() {
        let (r, w) = pipe();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let impossible = Spawn {
            name: "imacri-test-park-impossible",
            // No such stack can be mapped: every start fails.
            stack: Some(1 << 60),
        };
        let state = (r, Dropped(dropped.clone()), ran.clone());
        park(
            &[state.0.as_raw_fd()],
            impossible,
            state,
            |(_r, _d, ran)| ran.store(true, std::sync::atomic::Ordering::SeqCst),
        )
        .map_err(|_| "no parking")
        .unwrap();
        nix::unistd::write(&w, b"x").unwrap();
        // Tried, failed, and tried again every RETRY meanwhile.
        std::thread::sleep(RETRY * 3);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_bad_fd_is_not_parked_and_the_state_comes_back() {
        let (tx, _rx) = mpsc::channel::<()>();
        let (r, _w) = pipe();
        let good = r.as_raw_fd();
        // A regular file cannot be waited on with epoll (EPERM).
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let back = park(&[good, file.as_raw_fd()], SPAWN, tx, |_| {});
        assert!(back.is_err());
        // The good fd was unregistered again: it can be parked afresh.
        let (tx, rx) = mpsc::channel();
        park(&[good], SPAWN, (r, tx), |(_r, tx)| tx.send(()).unwrap())
            .map_err(|_| "no parking")
            .unwrap();
        drop(_w);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
