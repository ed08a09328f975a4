//! imacri's share of its open files for pods (`leases.rs`: a watch's
//! lease, an execution's window; `held.rs`: a held writer), counted per
//! pod, and who gives one up when the share, or a pod's own limit, is
//! taken: pods filling it cut only their own watches short, and nothing
//! that cannot go without a lease (an execution, a shared mapping) is
//! refused while any pod has one to give.

use papaya::{Compute, Operation};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::Group;
use crate::integrity::sys::FdQuota;

/// Leases one pod may hold: each is an open file of imacri's (and of the
/// keeper's), so a pod mapping file after file must not use up the fds
/// every pod's measurement needs. Far above what a program maps.
pub const PER_POD: usize = 1024;

/// Pods a full node runs (kubelet's default `maxPods`). What a pod holds
/// that cannot be given back while it runs (held writers, `held.rs`) is
/// bounded by its share of half of imacri's open files on a full node:
/// watch leases, which can be given back, and execution windows, which
/// end within seconds, always have the other half.
const NODE_PODS: usize = 110;
/// The least a pod's share of held writers is, whatever imacri's limit.
const MIN_HELD: usize = 16;

/// What each pod needs of imacri's share on a full node for the share to
/// be called enough (`imacri check`): a few dozen mapped libraries and
/// execution windows.
pub const FULL_NODE_NEED: usize = NODE_PODS * 32;

/// imacri's share of its open files for pods' leases and held writers
/// when it runs with `open_files` open files: a quarter.
pub fn share_of(open_files: u64) -> usize {
    (open_files / 4) as usize
}

/// Held writers one pod may have when imacri may hold `limit` files.
pub fn held_share(limit: usize) -> usize {
    (limit / (2 * NODE_PODS)).max(MIN_HELD)
}

/// A lease as [`Table::leases_of`] lists it.
pub(super) type LeaseOf = (RawFd, Weak<Group>, (u64, u64), bool);

/// Whose lease an fd is.
pub(super) struct Holder {
    pub(super) group: Weak<Group>,
    pub(super) inode: (u64, u64),
    pub(super) pod: Arc<str>,
    /// Held across an execution's window (`window.rs`), not a watch's.
    pub(super) window: bool,
}

/// What one pod holds: every file (leases and held writers), and of
/// them the held writers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count {
    all: usize,
    held: usize,
}

impl Count {
    fn plus(self, held: bool) -> Count {
        Count {
            all: self.all + 1,
            held: self.held + usize::from(held),
        }
    }
}

/// Who holds which lease, and how many each pod holds. Lock-free: a pod's
/// threads take and give back leases, and one of them stopped mid-way (its
/// pod at its CPU limit) must hold up no other pod's.
#[derive(Default)]
pub(super) struct Table {
    pub(super) by_fd: papaya::HashMap<RawFd, Holder>,
    per_pod: papaya::HashMap<Arc<str>, Count>,
    total: AtomicUsize,
}

impl Table {
    /// Counts one more file of `pod`'s (a held writer if `held`); Err
    /// (counting nothing) past `limit` files in all, [`PER_POD`] for the
    /// pod, or its [`held_share`] of held writers.
    fn reserve(&self, limit: usize, pod: &str, held: bool) -> Result<(), FdQuota> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= limit {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(FdQuota::Imacri(limit));
        }
        let share = held_share(limit);
        let per_pod = self.per_pod.pin();
        let full = per_pod.compute(Arc::from(pod), |e| {
            let n = e.map_or(Count::default(), |(_, n)| *n);
            if n.all >= PER_POD {
                Operation::Abort(FdQuota::Pod(PER_POD))
            } else if held && n.held >= share {
                Operation::Abort(FdQuota::Held(share))
            } else {
                Operation::Insert(n.plus(held))
            }
        });
        if let Compute::Aborted(e) = full {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// Counts one more of `pod`'s, whatever the limits (the last imacri
    /// held it).
    pub(super) fn count_kept(&self, pod: &str, held: bool) {
        self.total.fetch_add(1, Ordering::AcqRel);
        self.per_pod.pin().update_or_insert(
            Arc::from(pod),
            |n| n.plus(held),
            Count::default().plus(held),
        );
    }

    /// Gives back what [`reserve`](Self::reserve) counted.
    pub(super) fn release(&self, pod: &str, held: bool) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.per_pod.pin().compute(Arc::from(pod), |e| match e {
            Some((_, n)) if n.all <= 1 => Operation::Remove,
            Some((_, n)) => Operation::Insert(Count {
                all: n.all - 1,
                held: n.held.saturating_sub(usize::from(held)),
            }),
            None => Operation::Abort(()),
        });
    }

    pub(super) fn remove(&self, fd: RawFd) {
        if let Some(h) = self.by_fd.pin().remove(&fd) {
            self.release(&h.pod, false);
        }
    }

    /// The pod holding the most files, if it holds more than one more
    /// than `pod` does (so that giving one of its up for `pod` evens them
    /// out rather than swapping who is short).
    fn above(&self, pod: &str) -> Option<Arc<str>> {
        let per_pod = self.per_pod.pin();
        let mine = per_pod.get(pod).map_or(0, |n| n.all);
        let (top, n) = per_pod.iter().max_by_key(|(_, n)| n.all)?;
        (n.all > mine + 1 && **top != *pod).then(|| top.clone())
    }

    /// The `n` pods holding the most files, the most first.
    fn most(&self, n: usize) -> Vec<Arc<str>> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .per_pod
            .pin()
            .iter()
            .map(|(p, c)| (p.clone(), c.all))
            .collect();
        all.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
        all.into_iter().take(n).map(|(p, _)| p).collect()
    }

    /// Some of `pod`'s leases: (fd, group, inode, an execution
    /// window's).
    fn leases_of(&self, pod: &str, most: usize) -> Vec<LeaseOf> {
        self.by_fd
            .pin()
            .iter()
            .filter(|(_, h)| *h.pod == *pod)
            .take(most)
            .map(|(fd, h)| (*fd, h.group.clone(), h.inode, h.window))
            .collect()
    }
}

/// Who holds what of imacri's share, and the share.
pub(super) struct Share {
    pub(super) table: Table,
    /// Files the process may hold for pods: a quarter of its open-file
    /// limit ([`share_of`]).
    pub(super) limit: usize,
}

/// What an open file of imacri's is kept for: they differ in what gives
/// way for them when imacri's share is all taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// A watch's lease: without one the watch goes on by its mark.
    Watch,
    /// An execution's window (`window.rs`): without it the execution is
    /// refused.
    Window,
    /// A held writer (`held.rs`): without it the mapping is refused.
    Held,
}
impl Share {
    /// Counts one more file of `pod`'s (see [`Table::reserve`]). When
    /// imacri's are all taken, a lease is given up for it (a watch's goes
    /// on with its mark alone, as one past the limits always did): for a
    /// watch, by the pod holding the most if that is two or more more
    /// than `pod` holds, so pods filling imacri's share cut only their own
    /// watches short; for what cannot go without (an execution's window,
    /// a held writer), by whichever pod holds the most, `pod` itself
    /// included, so that no execution or shared mapping is refused while
    /// any pod has a lease to give. At the pod's own limit, what cannot go
    /// without takes one of the pod's own.
    pub(super) fn reserve(&self, pod: &str, u: Use) -> Result<(), FdQuota> {
        let mut tries = 0;
        loop {
            let Err(e) = self.table.reserve(self.limit, pod, u == Use::Held) else {
                return Ok(());
            };
            let given = tries < 4
                && match (e, u) {
                    (FdQuota::Imacri(_), Use::Watch) => {
                        self.give_from(self.table.above(pod).as_slice())
                    }
                    (FdQuota::Imacri(_), _) => self.give_from(&self.table.most(8)),
                    (FdQuota::Pod(_), Use::Window | Use::Held) => self.give_from(&[pod.into()]),
                    _ => false,
                };
            if !given {
                return Err(e);
            }
            tries += 1;
        }
    }

    /// Has one of `givers`, the first that can, give a lease up; whether
    /// one did. A lease kept on an executed file no execution is in the
    /// window of goes first (a cache: the file's next execution takes one
    /// anew), then a watch's.
    fn give_from(&self, givers: &[Arc<str>]) -> bool {
        givers.iter().any(|p| {
            let leases = self.table.leases_of(p, 64);
            let give = |windows: bool| {
                leases
                    .iter()
                    .filter(|l| l.3 == windows)
                    .any(|(fd, group, inode, _)| {
                        group.upgrade().is_some_and(|g| {
                            if windows {
                                g.give_up_window(*inode, *fd)
                            } else {
                                g.give_up_lease(*inode, *fd)
                            }
                        })
                    })
            };
            give(true) || give(false)
        })
    }

    /// Whether `pod` holds its [`PER_POD`] files: a new watch of its would
    /// go without a lease.
    pub(super) fn full(&self, pod: &str) -> bool {
        self.table
            .per_pod
            .pin()
            .get(pod)
            .is_some_and(|n| n.all >= PER_POD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's leases are bounded, and so are all of imacri's; a lease
    /// given back makes room.
    #[test]
    fn a_pod_holds_at_most_its_share() {
        let t = Table::default();
        let add = |fd: RawFd, pod: &str, limit: usize| {
            t.reserve(limit, pod, false)?;
            t.by_fd.pin().insert(
                fd,
                Holder {
                    group: Weak::new(),
                    inode: (0, 0),
                    pod: pod.into(),
                    window: false,
                },
            );
            Ok::<(), FdQuota>(())
        };
        for fd in 0..PER_POD as RawFd {
            add(fd, "a", 4 * PER_POD).unwrap();
        }
        assert_eq!(add(-1, "a", 4 * PER_POD), Err(FdQuota::Pod(PER_POD)));
        assert_eq!(add(-2, "b", PER_POD), Err(FdQuota::Imacri(PER_POD)));
        add(-3, "b", 4 * PER_POD).unwrap();
        t.remove(-3);
        t.remove(0);
        add(0, "a", 4 * PER_POD).unwrap();
        for fd in 0..PER_POD as RawFd {
            t.remove(fd);
        }
        assert!(t.per_pod.pin().is_empty());
        assert_eq!(t.total.load(Ordering::Relaxed), 0);
    }

    /// Held writers, which cannot be given back, are held to a pod's
    /// share of a full node; a pod holding more than another by two or
    /// more is the one to give a lease up for it.
    #[test]
    fn held_writers_stay_within_a_share_and_the_top_pod_gives_up() {
        let t = Table::default();
        let limit = 5000;
        let share = held_share(limit);
        assert_eq!(share, 22);
        assert_eq!(held_share(300), MIN_HELD);
        for _ in 0..share {
            t.reserve(limit, "a", true).unwrap();
        }
        assert_eq!(t.reserve(limit, "a", true), Err(FdQuota::Held(share)));
        // Leases still come, and another pod's held writers.
        t.reserve(limit, "a", false).unwrap();
        t.reserve(limit, "b", true).unwrap();
        assert_eq!(t.above("b").as_deref(), Some("a"));
        assert_eq!(t.above("a"), None);
        // One held writer given back makes room for one.
        t.release("a", true);
        t.reserve(limit, "a", true).unwrap();
        // Even counts: nobody gives up for a pod short by one.
        let u = Table::default();
        u.reserve(limit, "a", false).unwrap();
        assert_eq!(u.above("b"), None);
        u.reserve(limit, "a", false).unwrap();
        assert_eq!(u.above("b").as_deref(), Some("a"));
        // What cannot go without asks the pods holding the most in turn.
        u.reserve(limit, "b", false).unwrap();
        let most: Vec<String> = u.most(8).iter().map(|p| p.to_string()).collect();
        assert_eq!(most, ["a", "b"]);
        assert_eq!(u.most(1).len(), 1);
    }
}
