//! imacri's copy of what it handed the keeper, by owner.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// imacri's copy of what the keeper holds, by owner (a container's group
/// with its events and leases, a seccomp listener with its notifications):
/// each owner's under a lock of its own in a lock-free map. A pod's threads
/// take it on every access they queue and answer; one of them stopped
/// holding it (its pod at its CPU limit) holds up only its own container.
#[derive(Default)]
pub(super) struct Given {
    pub(super) owners: papaya::HashMap<String, Arc<Mutex<Owned>>>,
}

#[derive(Default)]
pub(super) struct Owned {
    /// Forgotten with its owner: what comes after is not kept.
    pub(super) gone: bool,
    pub(super) fds: BTreeMap<String, OwnedFd>,
}

impl Given {
    pub(super) fn shard(&self, owner: &str) -> Option<Arc<Mutex<Owned>>> {
        self.owners.pin().get(owner).cloned()
    }

    /// Every key held, for tests.
    #[cfg(test)]
    pub(super) fn keys(&self) -> Vec<String> {
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
