//! What the last imacri left with the fd keeper, sorted by owner for the
//! next one to take back: each container's fanotify group with the events
//! it was measuring, the read leases of its watched files and the files it
//! held open for writing; each seccomp listener with the mappings it was
//! measuring. The keeper holds fds by key (`keeper::keys`); what belongs to
//! an owner that is not there (an event without its group) is left out, so
//! it goes with the keeper's copy.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use super::fanotify::KeptGroup;
use super::keeper::{self, KeptEvent};
use super::mapguard::KeptListener;

/// The fds the fd keeper held for the last imacri.
#[derive(Default)]
pub struct Kept {
    /// Fanotify groups by container ID, with what each was measuring.
    pub groups: HashMap<String, KeptGroup>,
    /// Seccomp listeners with their keys and the mappings being measured.
    pub listeners: Vec<KeptListener>,
}

impl Kept {
    /// Sorts the keeper's `(key, fd)` pairs (`Keeper::all`) by owner.
    pub fn sort(all: Vec<(String, OwnedFd)>) -> Kept {
        let mut kept = Kept::default();
        let mut events: HashMap<String, Vec<KeptEvent>> = HashMap::new();
        let mut mappings: HashMap<String, Vec<(u64, OwnedFd)>> = HashMap::new();
        let mut leases: HashMap<String, Vec<(String, OwnedFd)>> = HashMap::new();
        let mut held: HashMap<String, Vec<(String, OwnedFd)>> = HashMap::new();
        for (key, fd) in all {
            if let Some(ctr) = keeper::parse_lease_key(&key) {
                leases.entry(ctr.to_string()).or_default().push((key, fd));
            } else if let Some(ctr) = keeper::parse_held_key(&key) {
                held.entry(ctr.to_string()).or_default().push((key, fd));
            } else if let Some((listener, id)) = keeper::parse_mapping_key(&key) {
                mappings
                    .entry(listener.to_string())
                    .or_default()
                    .push((id, fd));
            } else if let Some((ctr, number, access, tid)) = keeper::parse_event_key(&key) {
                events.entry(ctr.to_string()).or_default().push(KeptEvent {
                    number,
                    access,
                    tid,
                    file: fd,
                });
            } else if let Some(ctr) = key.strip_prefix(keeper::FANOTIFY) {
                kept.groups.insert(
                    ctr.to_string(),
                    KeptGroup {
                        group: fd,
                        events: Vec::new(),
                        leases: Vec::new(),
                        held: Vec::new(),
                    },
                );
            } else {
                kept.listeners.push(KeptListener {
                    key,
                    fd,
                    mappings: Vec::new(),
                });
            }
        }
        for l in kept.listeners.iter_mut() {
            l.mappings = mappings.remove(&l.key).unwrap_or_default();
        }
        // The keeper holds a group's events, leases and writers only with
        // the group.
        for (ctr, g) in kept.groups.iter_mut() {
            g.events = events.remove(ctr).unwrap_or_default();
            g.leases = leases.remove(ctr).unwrap_or_default();
            g.held = held.remove(ctr).unwrap_or_default();
        }
        kept
    }

    /// The keeper's key of container `ctr`'s group.
    pub fn group_key(ctr: &str) -> String {
        format!("{}{ctr}", keeper::FANOTIFY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keeper::Access;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn each_kept_fd_goes_with_its_owner() {
        let lease = keeper::lease_key("c1", (1, 2));
        let all = vec![
            (keeper::event_key("c1", 7, Access::Exec, 42), fd()),
            (lease.clone(), fd()),
            (keeper::held_key("c1", (1, 3)), fd()),
            (Kept::group_key("c1"), fd()),
            (keeper::mapping_key("/run/l1", 9), fd()),
            ("/run/l1".to_string(), fd()),
            (Kept::group_key("c2"), fd()),
            // Owners that are not there: left out.
            (keeper::event_key("gone", 8, Access::Read, 43), fd()),
            (keeper::lease_key("gone", (1, 4)), fd()),
            (keeper::mapping_key("/run/gone", 10), fd()),
        ];
        let kept = Kept::sort(all);
        assert_eq!(kept.groups.len(), 2);
        let c1 = &kept.groups["c1"];
        assert_eq!(c1.events.len(), 1);
        assert_eq!(
            (c1.events[0].number, c1.events[0].access, c1.events[0].tid),
            (7, Access::Exec, 42)
        );
        assert_eq!(c1.leases.len(), 1);
        assert_eq!(c1.leases[0].0, lease);
        assert_eq!(c1.held.len(), 1);
        let c2 = &kept.groups["c2"];
        assert!(c2.events.is_empty() && c2.leases.is_empty() && c2.held.is_empty());
        assert_eq!(kept.listeners.len(), 1);
        assert_eq!(kept.listeners[0].key, "/run/l1");
        let ids: Vec<u64> = kept.listeners[0].mappings.iter().map(|m| m.0).collect();
        assert_eq!(ids, vec![9]);
    }
}
