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
//! stays up; `SYNC` (the keeper starts a record of the keys put from now
//! on) and `PRUNE` (it lets go of every key not put since the `SYNC`): how
//! imacri settles what the keeper holds after it stalled or died (a drop
//! it never heard). Unknown requests are answered `?`.

mod client;
mod debt;
mod ids;
mod keys;
mod ledger;
mod server;
mod takeover;
mod wire;

pub use client::{Keeper, KeeperState};
pub use ids::{ids_dir, IdFile};
pub use keys::*;
pub use server::{close_inherited, run};

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;

/// What the keeper at `socket` holds by its ledger: each key with the fd
/// number it has in the keeper (for a look at that fd in `/proc`).
pub fn ledger_of(socket: &Path) -> std::io::Result<BTreeMap<String, RawFd>> {
    ledger::read(socket).map(|w| w.held)
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

/// Writes the answer to the event a reader got as fd `number` (ours or a
/// previous reader's); false when no event waits under that number.
pub fn respond(group: BorrowedFd<'_>, number: i32, allow: bool) -> bool {
    let response = if allow {
        libc::FAN_ALLOW
    } else {
        libc::FAN_DENY
    };
    respond_with(group, number, response).is_ok()
}

/// Denies the event a reader got as fd `number` with `errno` for its task
/// (FAN_DENY_ERRNO: Linux 6.13, a group of class FAN_CLASS_PRE_CONTENT,
/// and an errno open(2) could give); Err when the kernel takes no such
/// answer (EINVAL: then none was given) or no event waits (ENOENT).
pub fn respond_errno(group: BorrowedFd<'_>, number: i32, errno: i32) -> nix::Result<()> {
    const FAN_ERRNO_SHIFT: u32 = 24;
    respond_with(
        group,
        number,
        libc::FAN_DENY | ((errno as u32 & 0xff) << FAN_ERRNO_SHIFT),
    )
}

fn respond_with(group: BorrowedFd<'_>, number: i32, response: u32) -> nix::Result<()> {
    let r = libc::fanotify_response {
        fd: number,
        response,
    };
    // SAFETY: the response is a plain C struct, written whole.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&r as *const libc::fanotify_response).cast::<u8>(),
            std::mem::size_of::<libc::fanotify_response>(),
        )
    };
    // ENOENT: no event waits under that number.
    nix::unistd::write(group, bytes).map(drop)
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_bounds_the_sweep() {
        // systemd's LimitNOFILE=infinity gives 2^20 (fs.nr_open).
        assert_eq!(super::open_files_limit(1 << 20), super::MAX_OPEN_FILES);
        assert_eq!(super::open_files_limit(20000), 20000);
    }
}
