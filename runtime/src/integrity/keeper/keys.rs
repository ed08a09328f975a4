//! The keys the keeper holds fds under, and which go with which: a
//! container's group (`fan:`) takes its events (`fev:`), leases (`fls:`) and
//! held writers (`fwh:`) with it, a seccomp listener its notifications
//! (`mev:`).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

/// Keys of fanotify groups start with this.
pub const FANOTIFY: &str = "fan:";

/// Keys of fanotify events an imacri was measuring (a copy of the event's
/// fd, handed over before hashing) start with this; see [`event_key`].
pub const FANOTIFY_EVENT: &str = "fev:";

/// An event the last imacri read and was measuring when it went away: the
/// file, and the number its reader got, by which the kernel matches the
/// answer (any process may write it to the group).
pub struct KeptEvent {
    pub number: i32,
    pub access: Access,
    /// The thread that opened the file.
    pub tid: i32,
    pub file: OwnedFd,
}

/// What a kept event was: a read, an execution, or the kernel loading a
/// program's ELF interpreter (an execution the next imacri must also watch
/// for writers: it cannot tell which program loads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Exec,
    Interpreter,
}

impl Access {
    pub fn of(exec: bool, interpreter: bool) -> Self {
        match (exec, interpreter) {
            (false, _) => Access::Read,
            (true, false) => Access::Exec,
            (true, true) => Access::Interpreter,
        }
    }

    pub fn is_exec(self) -> bool {
        self != Access::Read
    }

    fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Exec => "exec",
            Access::Interpreter => "interp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Access::Read, Access::Exec, Access::Interpreter]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// `fev:<container>:<number>:<read|exec|interp>:<tid>`.
pub fn event_key(container: &str, number: i32, access: Access, tid: i32) -> String {
    format!(
        "{FANOTIFY_EVENT}{container}:{number}:{}:{tid}",
        access.as_str()
    )
}

/// The container and the event's number, kind and thread of an
/// [`event_key`].
pub fn parse_event_key(key: &str) -> Option<(&str, i32, Access, i32)> {
    let rest = key.strip_prefix(FANOTIFY_EVENT)?;
    let mut f = rest.rsplitn(4, ':');
    let tid = f.next()?.parse().ok()?;
    let access = Access::parse(f.next()?)?;
    let number = f.next()?.parse().ok()?;
    Some((f.next()?, number, access, tid))
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
    file_key(LEASE, container, inode)
}

/// The container of a [`lease_key`].
pub fn parse_lease_key(key: &str) -> Option<&str> {
    parse_file_key(LEASE, key)
}

/// Keys of files a container mapped shared and writable from an overlay
/// filesystem, held open for writing while it runs (`fanotify/held.rs`):
/// `fwh:<container>:<dev>:<ino>:<serial>`. They go with the group.
pub const HELD: &str = "fwh:";

pub fn held_key(container: &str, inode: (u64, u64)) -> String {
    file_key(HELD, container, inode)
}

/// The container of a [`held_key`].
pub fn parse_held_key(key: &str) -> Option<&str> {
    parse_file_key(HELD, key)
}

/// `<prefix><container>:<dev>:<ino>:<serial>`: the serial makes each key
/// its own (one file can be kept again after it was let go while the old
/// key is being dropped).
fn file_key(prefix: &str, container: &str, inode: (u64, u64)) -> String {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}{container}:{}:{}:{}-{n}",
        inode.0,
        inode.1,
        std::process::id()
    )
}

fn parse_file_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let mut f = key.strip_prefix(prefix)?.rsplitn(4, ':');
    f.next()?;
    f.next()?.parse::<u64>().ok()?;
    f.next()?.parse::<u64>().ok()?;
    f.next()
}

/// The container whose group a per-file key ([`lease_key`], [`held_key`])
/// goes with.
fn file_owner(key: &str) -> Option<&str> {
    parse_lease_key(key).or_else(|| parse_held_key(key))
}

/// The event numbers kept for `container`'s group.
pub(super) fn kept_numbers(held: &BTreeMap<String, OwnedFd>, container: &str) -> Vec<i32> {
    held.keys()
        .filter_map(|k| parse_event_key(k))
        .filter(|(c, ..)| *c == container)
        .map(|(_, n, ..)| n)
        .collect()
}

/// The notification ids kept for the listener under `listener`.
pub(super) fn kept_ids(held: &BTreeMap<String, OwnedFd>, listener: &str) -> Vec<u64> {
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
pub(super) fn drop_orphan_events(held: &mut BTreeMap<String, OwnedFd>) {
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
            && file_owner(k).is_none_or(|c| live.contains(c))
            && parse_mapping_key(k).is_none_or(|(l, _)| listeners.contains(l))
    });
}

/// The key whose going takes `key` with it (a group's for its events and
/// leases, a listener's for its notifications; [`drop_orphan_events`]'s
/// rule for one key), or `key` itself.
pub(super) fn owner_of(key: &str) -> std::borrow::Cow<'_, str> {
    if let Some((c, ..)) = parse_event_key(key) {
        format!("{FANOTIFY}{c}").into()
    } else if let Some(c) = file_owner(key) {
        format!("{FANOTIFY}{c}").into()
    } else if let Some((l, _)) = parse_mapping_key(key) {
        l.into()
    } else {
        key.into()
    }
}

/// Whether `key` names a seccomp listener (not a group or an event).
pub(super) fn is_listener_key(key: &str) -> bool {
    !key.starts_with(FANOTIFY)
        && !key.starts_with(FANOTIFY_EVENT)
        && !key.starts_with(MAPPING_EVENT)
        && !key.starts_with(LEASE)
        && !key.starts_with(HELD)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// imacri's copy of what the keeper holds goes by owner: a key's owner
    /// is the key whose going takes it along in the keeper.
    #[test]
    fn a_keys_owner_is_what_takes_it_along() {
        let file = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let keys = [
            format!("{FANOTIFY}a"),
            format!("{FANOTIFY}ab"),
            event_key("a", 7, Access::Exec, 1),
            event_key("ab", 7, Access::Exec, 1),
            lease_key("a", (1, 2)),
            lease_key("ab", (1, 2)),
            held_key("a", (1, 3)),
            held_key("ab", (1, 3)),
            "c1/p1/1".to_string(),
            mapping_key("c1/p1/1", 4),
            "c1/p1/10".to_string(),
            mapping_key("c1/p1/10", 4),
        ];
        for owner in keys.iter().filter(|k| owner_of(k) == k.as_str()) {
            let mut held: BTreeMap<String, OwnedFd> =
                keys.iter().map(|k| (k.clone(), file())).collect();
            held.remove(owner);
            drop_orphan_events(&mut held);
            let mut gone: Vec<&String> = keys
                .iter()
                .filter(|k| *k != owner && !held.contains_key(*k))
                .collect();
            let mut owned: Vec<&String> = keys
                .iter()
                .filter(|k| *k != owner && owner_of(k) == owner.as_str())
                .collect();
            gone.sort();
            owned.sort();
            assert_eq!(gone, owned, "{owner}");
        }
    }

    #[test]
    fn event_keys_round_trip() {
        let c = "3b48b7a8b2acc22ad0839b2532189cd0812d8576402178d35211ea12f4b568fc";
        let k = event_key(c, 37, Access::Exec, 4242);
        assert!(k.starts_with(FANOTIFY_EVENT));
        assert_eq!(parse_event_key(&k), Some((c, 37, Access::Exec, 4242)));
        for a in [Access::Read, Access::Interpreter] {
            assert_eq!(parse_event_key(&event_key(c, 5, a, 1)), Some((c, 5, a, 1)));
        }
        // Keys of an imacri from before interpreters were kept as such.
        assert_eq!(
            parse_event_key(&format!("{FANOTIFY_EVENT}{c}:5:exec:1")),
            Some((c, 5, Access::Exec, 1))
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
        held.insert(event_key("a", 7, Access::Exec, 1), file());
        held.insert(event_key("a", 9, Access::Read, 1), file());
        held.insert(event_key("b", 7, Access::Exec, 1), file());
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
}
