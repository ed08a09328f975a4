//! The decision on a measured access: appraised against the pod's policy,
//! watched for writers where it maps or runs a script, checked for open
//! writers, recorded, answered; and the violations it notices.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use super::{Content, Engine, Measured, Notice, Pending, WatchedAs};
use crate::integrity::digest::{digest_text, fd_path, FileKey};
use crate::integrity::elf;
use crate::integrity::journal::JournalError;
use crate::integrity::log::Event;
use crate::integrity::policy::Mode;

impl Engine {
    /// A file `t` mapped executable is being opened for writing; the
    /// opener waits for the answer. Under `enforce` it is refused (a `deny`
    /// entry: the attempt is an alert, and the file keeps what was
    /// measured); otherwise let through as a `tomtou` violation, written to
    /// the log before the opener can write. Unrecorded: refused.
    /// `what` the file is (mapped executable, a script being read).
    pub fn write_open(&self, t: &Measured, path: &str, watched: WatchedAs) -> bool {
        let what = watched.what();
        let enforce = watched.kept_by(t);
        let (event, reason) = if enforce {
            (
                Event::Deny,
                format!("opened for writing while {what}: refused"),
            )
        } else {
            (
                Event::Tomtou,
                format!("{what}, then opened for writing while the container ran"),
            )
        };
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, %reason, "ima violation: a watched file opened for writing");
        let r = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], event, true);
        let allow = !enforce && r.is_ok();
        if !allow {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        self.notice(t, path.to_string(), String::new(), !allow, reason);
        allow
    }

    /// A file `t` mapped executable was written since, by a writer no
    /// check saw open: a `tomtou` entry (a violation) and, under `enforce`,
    /// the container is killed, since a mapping may now run what no policy
    /// allowed.
    pub fn tomtou(&self, t: &Measured, path: &str, watched: WatchedAs, how: &str) {
        let reason = format!("{}, then {how} while the container ran", watched.what());
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, %reason, "ima violation: tomtou");
        let r = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], Event::Tomtou, true);
        if watched.kept_by(t) || r.is_err() {
            let _ = self.notices.send(Notice {
                pod: t.pod.clone(),
                container: t.container.clone(),
                path: path.to_string(),
                digest: String::new(),
                denied: true,
                reason: format!("{reason}: {path}"),
                stopped: true,
            });
        } else {
            self.notice(t, path.to_string(), String::new(), false, reason);
        }
    }

    /// A process of `t` was killed on its way into executing `path`: a
    /// writer opened the file before the kernel's own writers check, and
    /// the execution did not get past that check in time (a `writers`
    /// violation).
    pub fn execution_stopped(&self, t: &Measured, path: &str) {
        let reason = "opened for writing while being executed, and the execution did not get past the kernel's writers check: its process was killed".to_string();
        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, %reason, "ima violation: writers");
        let _ = self
            .journal
            .record(&t.pod, &t.container, path, [0; 32], Event::Writers, true);
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        self.notice(t, path.to_string(), String::new(), true, reason);
    }

    /// Appraises, records and answers one measured access: of the file
    /// whose identity is `measured` and whose content is `content`. `hit`:
    /// when a cache hit's handling began, for the time-to-answer statistic
    /// (taken before the answer: answering wakes the waiting task, which
    /// may preempt this thread).
    pub(super) fn decide(
        &self,
        t: &Measured,
        mut pending: Box<dyn Pending>,
        kind: Event,
        (content, measured): (Content, FileKey),
        hit: Option<std::time::Instant>,
    ) {
        let digest = content.digest;
        let fd = pending.fd();
        // Mapped executable: by a call, or by the kernel (a program's
        // interpreter, which stays writable while it runs).
        let maps = kind == Event::Mmap || (kind == Event::Exec && pending.loads());
        let path = fd_path(fd);
        let digest_hex = digest_text(&digest);
        let runs = matches!(kind, Event::Exec | Event::Mmap);
        let enforce = t.mode == Mode::Enforce && runs;
        if kind == Event::Mmap {
            self.stats.mappings.fetch_add(1, Ordering::Relaxed);
        }
        let verdict = t
            .allowlist
            .as_ref()
            .and_then(|a| a.check_file(&path, &digest_hex, kind));
        let deny = verdict.is_some() && enforce;
        let elf = match kind {
            Event::Exec => content.elf.class,
            _ => None,
        };
        if elf.is_some_and(|class| class != elf::ELFCLASS64) {
            // A 32-bit program runs in compat mode, and the kernel gives one
            // without PT_GNU_STACK READ_IMPLIES_EXEC: after a far jump to
            // 64-bit code its mmap(PROT_READ) of any file maps it
            // executable, a call the map guard's filter (which looks for
            // PROT_EXEC) lets through unmeasured. Nothing 32-bit can run
            // under the guard anyway (its own system calls are not the
            // filter's architecture): refused in every mode, and logged as
            // refused.
            let reason = concat!(
                "a 32-bit program: it could map files executable without asking ",
                "(READ_IMPLIES_EXEC), and cannot run under the map guard"
            );
            return self.refuse_program(t, pending, path, digest, reason);
        }
        if t.no_anonymous_exec && elf.is_some() && content.elf.exec_stack {
            // The kernel would map the program's stack executable at the
            // execution itself: memory no file backs, which the pod's
            // policy denies. Refused in every mode, and logged as refused.
            let reason = concat!(
                "a program asking for an executable stack (PT_GNU_STACK with PF_X), ",
                "which the pod's policy denies (anonymous_exec = \"deny\")"
            );
            return self.refuse_program(t, pending, path, digest, reason);
        }
        // A mapping to be allowed is watched first: from here on an open
        // for writing waits for the watch's answer, so the check below sees
        // every writer that opened before it.
        let mut watch = None;
        if let Some(w) = (maps && !deny).then(|| self.write_watch(t)).flatten() {
            let placed = match kind {
                // The event's own file, decided on the reader itself.
                Event::Exec => w.watch_own(fd, pending.mapper()),
                _ => w.watch(fd, pending.mapper()),
            };
            match placed {
                Ok(true) => watch = Some(w),
                Ok(false) => {}
                // Unwatched, a mapping could be rewritten unseen.
                Err(e) if enforce || t.no_anonymous_exec || e.refuses() => {
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a mapping cannot be watched for writers; refused");
                    }
                    self.stats.denied.fetch_add(1, Ordering::Relaxed);
                    pending.answer(false);
                    let reason = format!("cannot be watched for writers: {e}");
                    return self.notice(t, path, digest_hex, true, reason);
                }
                Err(e) => {
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a mapped file is not watched for writers")
                    }
                }
            }
        }
        if let Some((slow, delay)) = &self.map_watch_delay {
            if kind == Event::Mmap && path.contains(slow.as_str()) {
                // Test only: watched, and not checked for writers yet.
                std::thread::sleep(*delay);
            }
        }
        // A script is read by its interpreter after this answer: watched
        // first, so that no rewrite under the interpreter goes unseen.
        if kind == Event::Exec && !deny && elf.is_none() {
            if let Some(w) = self.write_watch(t) {
                if let Err(e) = w.watch_script(fd, pending.mapper()) {
                    if enforce || e.refuses() {
                        if let Some(unsaid) = t.quiet.take() {
                            tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "a script cannot be watched for writers; refused");
                        }
                        self.stats.denied.fetch_add(1, Ordering::Relaxed);
                        pending.answer(false);
                        let reason = format!("cannot be watched for writers: {e}");
                        return self.notice(t, path, digest_hex, true, reason);
                    }
                    if let Some(unsaid) = t.quiet.take() {
                        tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, %path, error = %e, unsaid, "an executed script is not watched for writers");
                    }
                }
            }
        }
        // Checked right before the answer: a writer could change what runs
        // after it was measured. For mappings, any writer; an execution of
        // a file open for writing is refused by the kernel itself (ETXTBSY),
        // and so is opening a running executable for writing, except where
        // the kernel cannot see the writer: an overlay file's upper file
        // mapped shared and writable by a process that closed its fd (one
        // outside the pod: the pod's own are held, `fanotify/held.rs`).
        // Such a mapping is made through an open for writing, whose close
        // drops the cached digest: a cache hit needs no look.
        let measured_anew = runs && hit.is_none();
        let open_writers = (maps || measured_anew) && runs && open_for_writing(fd);
        let hidden = measured_anew && !open_writers && crate::integrity::overlay::upper_written(fd);
        // A writer that opened before the watch and closed before the check
        // above leaves no open writer, but what maps is then not what was
        // measured: the identity must still be the measured one. (Its close
        // is read after this answer, as is a close that came before the
        // measuring, which the watch then tells apart by this identity.)
        let changed = maps
            && !open_writers
            && nix::sys::stat::fstat(fd.as_raw_fd())
                .map_or(true, |st| FileKey::of(&st) != measured);
        if hidden || changed {
            // What was hashed may change (or changed) under the mapping.
            self.invalidate(measured.inode());
        }
        if hidden || (maps && (open_writers || changed)) {
            let reason = if hidden {
                "its overlay upper file is open for writing (a shared writable mapping) while executed or mapped executable"
            } else if changed {
                "written between its measuring and its writers check while mapped executable"
            } else {
                "open for writing while executed or mapped executable"
            }
            .to_string();
            let r = self
                .journal
                .record(&t.pod, &t.container, &path, digest, Event::Writers, true);
            // Where the policy denies executable memory no file backs, a
            // mapping of a file someone can write is refused in any mode.
            if enforce || (maps && t.no_anonymous_exec) || r.is_err() {
                if let Some(w) = &watch {
                    w.unwatch(fd);
                }
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                pending.answer(false);
                return self.notice(t, path, digest_hex, true, reason);
            }
            self.notice(t, path.clone(), digest_hex.clone(), false, reason);
        }
        let logged = if deny { Event::Deny } else { kind };
        let new = match self.journal.record(
            &t.pod,
            &t.container,
            &path,
            digest,
            logged,
            verdict.is_some(),
        ) {
            Ok(e) => e.is_some(),
            Err(e) => {
                // Unrecorded means unmeasured: refused in every mode.
                let quota = matches!(e, JournalError::Quota { .. });
                if !quota {
                    tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, "cannot append to the measurement log");
                }
                if let Some(w) = &watch {
                    w.unwatch(fd);
                }
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                pending.answer(false);
                return self.notice(t, path, digest_hex, true, e.to_string());
            }
        };
        if deny {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t0) = hit {
            self.stats
                .hit_ns_total
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if kind == Event::Exec {
            pending.program(content.elf);
        }
        if let Some((slow, delay)) = &self.map_answer_delay {
            if kind == Event::Mmap && !deny && path.contains(slow.as_str()) {
                // Test only: checked, and not mapped yet.
                std::thread::sleep(*delay);
            }
        }
        pending.answer(!deny);
        if let Some(reason) = verdict {
            if new || deny {
                self.notice(t, path, digest_hex, deny, reason);
            }
        }
    }

    /// A program refused in every mode, whatever its digest (a guard's
    /// rule, not the policy's): logged as refused, told as a violation.
    fn refuse_program(
        &self,
        t: &Measured,
        pending: Box<dyn Pending>,
        path: String,
        digest: [u8; 32],
        reason: &str,
    ) {
        let _ = self
            .journal
            .record(&t.pod, &t.container, &path, digest, Event::Deny, true);
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        pending.answer(false);
        self.notice(t, path, digest_text(&digest), true, reason.to_string())
    }

    pub(super) fn notice(
        &self,
        t: &Measured,
        path: String,
        digest: String,
        denied: bool,
        reason: String,
    ) {
        let _ = self.notices.send(Notice {
            pod: t.pod.clone(),
            container: t.container.clone(),
            path,
            digest,
            denied,
            reason,
            stopped: false,
        });
    }

    /// A source that cannot go on: the gap is logged and the server told to
    /// kill the container.
    /// An access of `t`'s the kernel refused because it could not open
    /// its file for the reader (`e`): counted, and logged at the first of
    /// a row (a node out of files refuses many).
    pub(in crate::integrity) fn unopened(&self, t: &Measured, e: nix::errno::Errno, first: bool) {
        self.stats.unopened.fetch_add(1, Ordering::Relaxed);
        if first {
            tracing::warn!(pod_sandbox_id = %t.pod, container_id = %t.container, error = %e, "the kernel could not open an accessed file for imacri and refused the access (its task got EPERM); imacri may be at its open-file limit");
        }
    }

    pub(in crate::integrity) fn stopped(&self, t: &Measured, reason: String) {
        tracing::error!(pod_sandbox_id = %t.pod, container_id = %t.container, %reason, "measurement stopped; the container is killed");
        self.gap(t, "-");
        let _ = self.notices.send(Notice {
            pod: t.pod.clone(),
            container: t.container.clone(),
            path: String::new(),
            digest: String::new(),
            denied: false,
            reason,
            stopped: true,
        });
    }
}

/// Whether the file's content can change under what was measured (IMA's
/// open-writers): someone has it open for writing, or it has no name and is
/// not sealed against writes (a memfd or SysV segment: pseudo files whose
/// writers the kernel does not count). Fails closed: a file that can take
/// neither check counts as written.
pub fn open_for_writing(fd: BorrowedFd<'_>) -> bool {
    let raw = fd.as_raw_fd();
    let nameless = nix::sys::stat::fstat(raw).map_or(true, |st| st.st_nlink == 0);
    if nameless {
        // Only F_SEAL_WRITE makes a memfd stable: the kernel refuses it
        // while any shared writable mapping exists. F_SEAL_FUTURE_WRITE
        // refuses only new writes and new writable mappings; one made
        // before the seal keeps writing the pages a mapping of ours would
        // run (until 2026-12-04 it counted as sealed: `ima_escapes/`
        // `memfd-future`).
        // SAFETY: fcntl on a valid fd with integer arguments.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        let sealed = seals >= 0 && seals & libc::F_SEAL_WRITE != 0;
        if !sealed {
            return true;
        }
    }
    // `fd` may be the process's own open file (the map guard's), and a
    // lease is the file's: one the process holds through it must be left
    // alone (a read lease taken here would replace it, and the release drop
    // it). Held, it answers the question: a read lease stands only while
    // nobody has the file open for writing, a write lease only while
    // nobody else has it open at all, so only this very file can be
    // open for writing (a write lease being downgraded for a reader reads
    // as F_RDLCK; one being broken by a writer as F_UNLCK, checked below).
    // SAFETY: fcntl on a valid fd with integer arguments.
    let held = unsafe { libc::fcntl(raw, libc::F_GETLEASE) };
    if held == libc::F_RDLCK || held == libc::F_WRLCK {
        let mode = unsafe { libc::fcntl(raw, libc::F_GETFL) } & libc::O_ACCMODE;
        return mode != libc::O_RDONLY;
    }
    // A read lease is refused exactly when the inode's write count is
    // positive (the kernel's check_conflicting_open); released at once.
    let r = unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_RDLCK) };
    if r != 0 {
        return true;
    }
    unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_UNLCK) };
    false
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::integrity::digest::hash_fd;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Mutex;

    struct Recorded {
        fd: OwnedFd,
        answers: Arc<Mutex<Vec<(String, bool)>>>,
        name: String,
    }

    impl Pending for Recorded {
        fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
        fn answer(self: Box<Self>, allow: bool) {
            self.answers
                .lock()
                .unwrap()
                .push((self.name.clone(), allow));
        }
    }

    #[test]
    fn open_writers_are_seen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bin");
        std::fs::write(&p, b"\x7fELF").unwrap();
        let r = std::fs::File::open(&p).unwrap();
        assert!(!open_for_writing(r.as_fd()));
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert!(open_for_writing(r.as_fd()));
        drop(w);
        assert!(!open_for_writing(r.as_fd()));
        // A lease held through the file itself answers, and stays.
        let lease = |f: &std::fs::File, t: libc::c_int| unsafe {
            libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, t)
        };
        let held = |f: &std::fs::File| unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) };
        assert_eq!(lease(&r, libc::F_WRLCK), 0);
        assert!(!open_for_writing(r.as_fd()));
        assert_eq!(held(&r), libc::F_WRLCK);
        assert_eq!(lease(&r, libc::F_RDLCK), 0);
        assert!(!open_for_writing(r.as_fd()));
        assert_eq!(held(&r), libc::F_RDLCK);
        assert_eq!(lease(&r, libc::F_UNLCK), 0);
        drop(r);
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        assert_eq!(lease(&rw, libc::F_WRLCK), 0);
        assert!(open_for_writing(rw.as_fd()));
        assert_eq!(held(&rw), libc::F_WRLCK);
        drop(rw);
        // A memfd: the kernel counts no writers, but anyone with its fd can
        // write; sealed against writes it is stable.
        // SAFETY: memfd_create with a static name; the fd is owned below.
        let m = unsafe {
            use std::os::fd::FromRawFd;
            let fd = libc::memfd_create(c"m".as_ptr(), libc::MFD_ALLOW_SEALING);
            assert!(fd >= 0);
            OwnedFd::from_raw_fd(fd)
        };
        assert!(open_for_writing(m.as_fd()));
        // Sealed against future writes only, it is still written through a
        // shared writable mapping made before the seal.
        let seal = |t: libc::c_int| unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, t) };
        assert_eq!(seal(libc::F_SEAL_FUTURE_WRITE), 0);
        assert!(open_for_writing(m.as_fd()));
        assert_eq!(seal(libc::F_SEAL_WRITE), 0);
        assert!(!open_for_writing(m.as_fd()));
    }

    #[test]
    fn decisions_record_refuse_and_respect_quota() {
        let d = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(d.path(), 15, None).unwrap().with_quota(3));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = Engine::new(journal.clone(), tx, DEFAULT_MAX_FILE_SIZE);
        let answers = Arc::new(Mutex::new(Vec::new()));
        let bin = d.path().join("bin");
        std::fs::write(&bin, b"payload").unwrap();
        let (digest, _) = hash_fd(std::fs::File::open(&bin).unwrap().as_fd()).unwrap();
        let allow = Allowlist {
            files: [(
                bin.to_string_lossy().into_owned(),
                [digest_text(&digest)].into(),
            )]
            .into(),
            ..Default::default()
        };
        let target = Arc::new(Measured {
            pod: "p".into(),
            container: "c".into(),
            mode: Mode::Enforce,
            allowlist: Some(Arc::new(allow)),
            charge: None,
            quiet: Default::default(),
            no_anonymous_exec: false,
        });
        let pend = |path: &std::path::Path, name: &str| {
            Box::new(Recorded {
                fd: std::fs::File::open(path).unwrap().into(),
                answers: answers.clone(),
                name: name.into(),
            })
        };
        let key = |p: &std::path::Path| FileKey::of(&nix::sys::stat::stat(p).unwrap());
        // Allowed digest: allowed and logged.
        let m = (Content::digest_only(digest), key(&bin));
        engine.decide(&target, pend(&bin, "ok"), Event::Mmap, m, None);
        // Another file: denied in enforce mode.
        let other = d.path().join("other");
        std::fs::write(&other, b"evil").unwrap();
        let m = (Content::digest_only([9; 32]), key(&other));
        engine.decide(&target, pend(&other, "evil"), Event::Exec, m, None);
        // Mapped while open for writing: refused even with an allowed digest.
        let w = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
        let m = (Content::digest_only(digest), key(&bin));
        engine.decide(&target, pend(&bin, "written"), Event::Mmap, m, None);
        drop(w);
        // Quota (3) reached: the next new measurement is refused.
        let third = d.path().join("third");
        std::fs::write(&third, b"x").unwrap();
        let m = (Content::digest_only([3; 32]), key(&third));
        engine.decide(&target, pend(&third, "over"), Event::Read, m, None);
        let a = answers.lock().unwrap().clone();
        assert_eq!(
            a,
            vec![
                ("ok".to_string(), true),
                ("evil".to_string(), false),
                ("written".to_string(), false),
                ("over".to_string(), false)
            ]
        );
        let text = std::fs::read_to_string(Journal::log_path(d.path())).unwrap();
        let events: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(events, ["mmap", "deny", "writers", "quota"]);
    }

    /// An engine logging to `dir` (a quota of 15), and where answers go.
    #[allow(clippy::type_complexity)]
    fn engine_in(dir: &std::path::Path) -> (Arc<Engine>, Arc<Mutex<Vec<(String, bool)>>>) {
        let journal = Arc::new(Journal::open(dir, 15, None).unwrap());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Engine::new(journal, tx, DEFAULT_MAX_FILE_SIZE),
            Arc::new(Mutex::new(Vec::new())),
        )
    }

    /// A file that cannot be read (here: open for writing only, as a
    /// filesystem whose reads fail would leave it) is a `gap`: let through
    /// in measure mode, except as code where the policy denies executable
    /// memory no measured file backs.
    #[test]
    fn an_unhashable_mapping_runs_only_where_anonymous_exec_is_allowed() {
        let d = tempfile::tempdir().unwrap();
        let (engine, answers) = engine_in(d.path());
        let lib = d.path().join("lib.so");
        std::fs::write(&lib, b"code").unwrap();
        for (deny, kind) in [
            (false, Event::Mmap),
            (true, Event::Mmap),
            (true, Event::Read),
        ] {
            let target = Arc::new(Measured {
                pod: "p".into(),
                container: format!("c-{deny}-{kind:?}"),
                mode: Mode::Measure,
                allowlist: None,
                charge: None,
                quiet: Default::default(),
                no_anonymous_exec: deny,
            });
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .write(true)
                .open(&lib)
                .unwrap()
                .into();
            let key = FileKey::of(&nix::sys::stat::fstat(fd.as_raw_fd()).unwrap());
            let pending = Box::new(Recorded {
                fd,
                answers: answers.clone(),
                name: format!("{deny} {kind:?}"),
            });
            engine.measure_now(target, pending, key, kind);
        }
        let a = answers.lock().unwrap().clone();
        assert_eq!(
            a,
            vec![
                ("false Mmap".to_string(), true),
                ("true Mmap".to_string(), false),
                ("true Read".to_string(), true)
            ]
        );
    }

    #[test]
    fn a_mapping_of_a_file_written_since_it_was_measured_is_refused() {
        // Its writer opened before the watch and closed before the writers
        // check: no writer is open, but the file is not what was measured.
        let d = tempfile::tempdir().unwrap();
        let (engine, answers) = engine_in(d.path());
        let lib = d.path().join("lib.so");
        std::fs::write(&lib, b"measured").unwrap();
        let (digest, _) = hash_fd(std::fs::File::open(&lib).unwrap().as_fd()).unwrap();
        let measured = (
            Content::digest_only(digest),
            FileKey::of(&nix::sys::stat::stat(&lib).unwrap()),
        );
        let target = Arc::new(Measured {
            pod: "p".into(),
            container: "c".into(),
            mode: Mode::Measure,
            allowlist: None,
            charge: None,
            quiet: Default::default(),
            no_anonymous_exec: true,
        });
        let pend = |name: &str| {
            Box::new(Recorded {
                fd: std::fs::File::open(&lib).unwrap().into(),
                answers: answers.clone(),
                name: name.into(),
            })
        };
        engine.decide(&target, pend("same"), Event::Mmap, measured, None);
        std::fs::write(&lib, b"swapped!").unwrap();
        engine.decide(&target, pend("changed"), Event::Mmap, measured, None);
        let a = answers.lock().unwrap().clone();
        assert_eq!(
            a,
            vec![("same".to_string(), true), ("changed".to_string(), false)]
        );
    }
}
