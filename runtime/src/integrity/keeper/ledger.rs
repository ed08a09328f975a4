//! The keeper's ledger: which of its fd numbers holds which key, in a file
//! beside its socket (`fdkeeper.ledger`). A keeper that stalls (stopped,
//! hung, swapped out for good) answers nothing, not even `ALL`: the next
//! imacri reads its ledger and copies its fds out of it (`pidfd_getfd`,
//! which needs nothing of the keeper: `takeover.rs`), instead of leaving
//! it the groups, whose events would then wait on it for good.
//!
//! Lines: `keeper <pid> <listener fd>` first, then `+ <fd> <key>` (held
//! under `fd`) and `- <key>` (let go) in the order they happened. The
//! keeper writes what changed before it answers the request that changed
//! it and before it opens anything new (a number it closed is then never
//! recorded under an old key while it is reused), one `write` each, to a
//! file on the state directory's tmpfs; the file is rewritten whole
//! (`rename`) when it grows past what it describes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Where the ledger of the keeper at `socket` lives.
pub(super) fn path(socket: &Path) -> PathBuf {
    socket.with_file_name("fdkeeper.ledger")
}

/// Keys are imacri's (container IDs, numbers, inodes): escaped anyway, so
/// no key can break a line.
fn escape(key: &str) -> String {
    key.replace('\\', "\\\\").replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(o) => out.push(o),
            None => {}
        }
    }
    out
}

/// The keeper's side: writes what it holds as it changes.
pub(super) struct Ledger {
    path: PathBuf,
    header: String,
    /// None once a write failed: the file is removed, and a stalled
    /// keeper is then not taken over (its fds cannot be told apart).
    file: Option<std::fs::File>,
    /// What the file says now.
    written: BTreeMap<String, RawFd>,
    /// Lines in the file.
    lines: usize,
}

impl Ledger {
    /// A ledger for the keeper listening on `listener`, empty.
    pub(super) fn create(socket: &Path, listener: RawFd) -> Ledger {
        let mut l = Ledger {
            path: path(socket),
            header: format!("keeper {} {listener}\n", std::process::id()),
            file: None,
            written: BTreeMap::new(),
            lines: 0,
        };
        l.rewrite();
        l
    }

    /// Records how `held` differs from what the file says.
    pub(super) fn sync(&mut self, held: &BTreeMap<String, OwnedFd>) {
        if self.file.is_none() {
            return;
        }
        let mut out = String::new();
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|k| !held.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            out.push_str(&format!("- {}\n", escape(&k)));
            self.written.remove(&k);
            self.lines += 1;
        }
        for (k, f) in held.iter() {
            let n = f.as_raw_fd();
            if self.written.get(k) != Some(&n) {
                out.push_str(&format!("+ {n} {}\n", escape(k)));
                self.written.insert(k.clone(), n);
                self.lines += 1;
            }
        }
        if out.is_empty() {
            return;
        }
        // Rewritten whole once mostly history (the log of a busy node's
        // events would otherwise grow without bound).
        if self.lines > 2 * self.written.len() + 256 {
            self.rewrite();
            return;
        }
        let ok = self
            .file
            .as_mut()
            .is_some_and(|f| f.write_all(out.as_bytes()).is_ok());
        if !ok {
            self.broken();
        }
    }

    /// The file anew, with what is held now, put in place at once.
    fn rewrite(&mut self) {
        let tmp = self.path.with_extension("new");
        let mut text = self.header.clone();
        for (k, n) in self.written.iter() {
            text.push_str(&format!("+ {n} {}\n", escape(k)));
        }
        let file = std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .and_then(|()| std::fs::OpenOptions::new().append(true).open(&self.path));
        match file {
            Ok(f) => {
                self.file = Some(f);
                self.lines = self.written.len() + 1;
            }
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
                self.broken();
            }
        }
    }

    fn broken(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }

    /// The keeper exits: nothing to take over.
    pub(super) fn remove(&mut self) {
        self.broken();
    }
}

/// What a keeper's ledger says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Written {
    pub pid: i32,
    pub listener: RawFd,
    pub held: BTreeMap<String, RawFd>,
}

/// Reads the ledger of the keeper at `socket`.
pub(super) fn read(socket: &Path) -> std::io::Result<Written> {
    parse(&std::fs::read_to_string(path(socket))?)
        .ok_or_else(|| std::io::Error::other("the fd keeper's ledger is malformed"))
}

pub(super) fn parse(text: &str) -> Option<Written> {
    let mut lines = text.lines();
    let mut head = lines.next()?.strip_prefix("keeper ")?.split(' ');
    let pid = head.next()?.parse().ok()?;
    let listener = head.next()?.parse().ok()?;
    let mut held = BTreeMap::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("+ ") {
            let (n, k) = rest.split_once(' ')?;
            held.insert(unescape(k), n.parse().ok()?);
        } else {
            held.remove(&unescape(l.strip_prefix("- ")?));
        }
    }
    Some(Written {
        pid,
        listener,
        held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn the_ledger_says_what_is_held_through_changes_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fdkeeper.sock");
        let mut l = Ledger::create(&sock, 7);
        let mut held = BTreeMap::new();
        let odd = "fan:a b\nc\\d".to_string();
        held.insert(odd.clone(), fd());
        held.insert("fev:x:1:exec:2".to_string(), fd());
        l.sync(&held);
        held.remove("fev:x:1:exec:2");
        // A key whose fd was replaced under it: the new number.
        held.insert(odd.clone(), fd());
        l.sync(&held);
        let want = |held: &BTreeMap<String, OwnedFd>| Written {
            pid: std::process::id() as i32,
            listener: 7,
            held: held
                .iter()
                .map(|(k, f)| (k.clone(), f.as_fd().as_raw_fd()))
                .collect(),
        };
        assert_eq!(read(&sock).unwrap(), want(&held));
        // Churn well past what is held: rewritten, still right, and small.
        for i in 0..2000 {
            held.insert(format!("fev:x:{i}:exec:2"), fd());
            l.sync(&held);
            held.remove(&format!("fev:x:{i}:exec:2"));
            l.sync(&held);
        }
        assert_eq!(read(&sock).unwrap(), want(&held));
        let lines = std::fs::read_to_string(path(&sock))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 600, "{lines} lines for {} keys", held.len());
        l.remove();
        assert!(read(&sock).is_err());
    }

    #[test]
    fn a_malformed_ledger_says_nothing() {
        assert_eq!(parse("keeper x 3\n"), None);
        assert_eq!(parse("keeper 1 3\n+ x fan:a\n"), None);
        assert_eq!(parse("keeper 1 3\n? fan:a\n"), None);
        assert_eq!(parse(""), None);
    }
}
