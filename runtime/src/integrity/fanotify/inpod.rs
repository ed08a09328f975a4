//! What a container's processes hold of a watched file, read through the
//! container's own procfs (its pid namespace's: every process of it,
//! whichever mount namespace they are in): open (a script's interpreter),
//! mapped executable, or about to be (a task in a call that maps). A
//! watched file that nothing holds is written as any file (`writes.rs`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::super::digest::FileKey;
use super::super::engine::{Caller, Mapper};

/// Whether a process of the container's pid namespace has `inode`
/// open (its interpreter reading it): their fds, as the container's
/// own procfs (`procfs`) lists them. An opener being decided has no fd yet.
pub(super) fn has_open(procfs: &Path, inode: (u64, u64)) -> bool {
    let Ok(mut pids) = processes(procfs) else {
        // Cannot tell: counted as read, the safe side.
        return true;
    };
    pids.any(|p| {
        std::fs::read_dir(p.join("fd")).is_ok_and(|fds| {
            fds.flatten().any(|f| {
                nix::sys::stat::stat(&f.path()).is_ok_and(|st| FileKey::of(&st).inode() == inode)
            })
        })
    })
}

/// The calls that mapped a watched file executable, as far as they are
/// known: those still in flight are what [`may_map`] waits for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Calls {
    /// One per task (a task is in one call at a time: its next one means
    /// the last returned): calls and executions (never `Unknown`).
    known: Vec<Mapper>,
    /// A call whose caller is not known maps it, or did (a watch read back
    /// after a restart, a call the last imacri handed over, more callers
    /// than [`KEPT_CALLS`] still in their calls): every task of the
    /// container counts as a possible caller.
    pub(super) unknown: bool,
    /// How many callers were added: a watch ends only if none came while
    /// it was looked at (`writes.rs`).
    pub(super) added: u64,
}

/// How many callers a watched file keeps; past it, those out of their call
/// go, and if none did the file's callers count as unknown.
const KEPT_CALLS: usize = 64;

impl Calls {
    /// Callers unknown from the start (a watch read back after a restart).
    pub(super) fn unknown() -> Calls {
        Calls {
            unknown: true,
            ..Default::default()
        }
    }

    /// `by` maps the file (with the watch's table locked, before the
    /// mapping's writers check).
    pub(super) fn add(&mut self, by: Mapper) {
        self.add_in(Path::new("/proc"), by)
    }

    fn add_in(&mut self, proc: &Path, by: Mapper) {
        self.added += 1;
        let Some(tid) = tid_of(&by) else {
            self.unknown = true;
            self.known.clear();
            return;
        };
        if self.unknown {
            return;
        }
        self.known.retain(|k| tid_of(k) != Some(tid));
        if self.known.len() >= KEPT_CALLS {
            self.known.retain(|k| in_call(proc, k));
        }
        if self.known.len() >= KEPT_CALLS {
            self.unknown = true;
            self.known.clear();
            return;
        }
        self.known.push(by);
    }
}

/// The task of a known mapper.
fn tid_of(m: &Mapper) -> Option<u32> {
    match m {
        Mapper::Call(c) => Some(c.tid),
        Mapper::Execution(tid) => Some(*tid),
        Mapper::Unknown => None,
    }
}

/// Whether a process of the container may have `inode` mapped
/// executable, now or once a call in flight returns, or a process maps
/// the file executable (its maps, read through the container's own
/// procfs); what cannot be read counts as mapped.
///
/// The calls in flight are `calls`, added to the watch before each call's
/// writers check: one added after this look checks for writers after the
/// opener's write access counts (the kernel counts it before fanotify
/// asks) and is refused, so only those added before can map unseen, until
/// they return. A caller still in its call (`/proc/<tid>/syscall` shows
/// it, or "running": on a CPU, its call unreadable) is looked at again a
/// few times, 1 ms apart, before the file counts as mapped; then maps are
/// read (a call that returned made its mapping before). An interpreter's
/// loading is waited for alike, until its task is out of `execve`: the
/// kernel's own writers check of the interpreter comes after our answer,
/// and a writer that came and went before it would have the kernel load
/// what it wrote (after that check writers are held off until the mapping
/// is in place; a program's own execution is held by its window lease,
/// `window.rs`). Until 2026-12-05 every task of the
/// container on a CPU counted (its call could not be read), so a busy
/// process kept such files unwritable. With the callers unknown, that is
/// still the rule: any task on a CPU or in a call that maps.
pub(super) fn may_map(procfs: &Path, inode: (u64, u64), calls: &Calls) -> bool {
    may_map_in(Path::new("/proc"), procfs, inode, calls)
}

fn may_map_in(proc: &Path, procfs: &Path, inode: (u64, u64), calls: &Calls) -> bool {
    let mut looks = 0;
    loop {
        let in_flight = match calls.unknown {
            true => calls_in_flight(procfs),
            false => Ok(calls.known.iter().any(|c| in_call(proc, c))),
        };
        match in_flight {
            Ok(false) => break,
            Ok(true) if looks < FLIGHT_LOOKS => {
                looks += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            _ => return true,
        }
    }
    maps_show(procfs, inode).unwrap_or(true)
}

/// Whether a mapper may still be on its way: its task's `syscall` file (in
/// `proc`, imacri's procfs, which names tasks as the map guard and the
/// fanotify events do) shows the call (an execution: `execve` or
/// `execveat`), or the task on a CPU, or cannot be read. A task gone, in
/// user mode or in another call is out of it. (A gone task's id given to a
/// new task only makes the look more careful; an execution that took its
/// leader's id did so after the interpreter's writers check.)
fn in_call(proc: &Path, m: &Mapper) -> bool {
    let Some(tid) = tid_of(m) else { return true };
    match std::fs::read_to_string(proc.join(tid.to_string()).join("syscall")) {
        Ok(text) => match m {
            Mapper::Call(c) => shows_call(&text, c),
            _ => shows_execution(&text),
        },
        Err(e) => !gone(&e),
    }
}

/// Whether a `syscall` file's text shows an `execve`/`execveat`, or
/// "running".
fn shows_execution(text: &str) -> bool {
    match text.split_whitespace().next() {
        Some("running") => true,
        Some(nr) => nr
            .parse::<i64>()
            .is_ok_and(|n| n == libc::SYS_execve || n == libc::SYS_execveat),
        None => false,
    }
}

/// Whether a `syscall` file's text (`nr arg1 .. arg6 sp pc`, in hex but
/// the number) shows call `c`, or "running".
fn shows_call(text: &str, c: &Caller) -> bool {
    let mut f = text.split_whitespace();
    match f.next() {
        Some("running") => true,
        Some(nr) if nr.parse::<i64>().ok() == Some(c.nr) => {
            let args = f
                .take(6)
                .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
            args.eq(c.args.iter().map(|a| Some(*a)))
        }
        _ => false,
    }
}

/// How often the callers (or with callers unknown, a container's tasks) are
/// looked at again while one is on a CPU or in a call that maps, before the
/// file counts as mapped.
const FLIGHT_LOOKS: usize = 5;

/// The system calls that can map a file executable (`execve` and
/// `execveat` an ELF interpreter, which the kernel maps itself).
const MAPPING_CALLS: [i64; 5] = [
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_pkey_mprotect,
    libc::SYS_execve,
    libc::SYS_execveat,
];

/// Which of the watched files `watches` (inode, its calls, whether a
/// script's) nothing of the container holds nor may be about to: for a
/// mapped file, no process maps it executable and no call that mapped it
/// is in flight ([`may_map`] without its waits); for a script, no process
/// has it open ([`has_open`]) and no task is in a call that maps or
/// executes. Each process's maps and fds are read once for all the files,
/// after the calls in flight were looked at (a call that returned made its
/// mapping before). What cannot be read holds everything.
pub(super) fn unheld<'a>(
    procfs: &Path,
    except: Option<u32>,
    watches: impl Iterator<Item = ((u64, u64), &'a Calls, bool)>,
) -> HashSet<(u64, u64)> {
    unheld_in(Path::new("/proc"), procfs, except, watches)
}

/// The task of `by` as the container's procfs names it (its innermost
/// pid namespace's ID, from imacri's `/proc/<tid>/status`).
pub(super) fn ns_tid(by: &Mapper) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", tid_of(by)?)).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// `except`: a task (as `procfs` names it) whose call in flight is not
/// waited for.
fn unheld_in<'a>(
    proc: &Path,
    procfs: &Path,
    except: Option<u32>,
    watches: impl Iterator<Item = ((u64, u64), &'a Calls, bool)>,
) -> HashSet<(u64, u64)> {
    let mut busy = None;
    let mut idle = Vec::new();
    for (inode, calls, script) in watches {
        let in_flight = if script || calls.unknown {
            *busy.get_or_insert_with(|| calls_in_flight_but(procfs, except).unwrap_or(true))
        } else {
            calls.known.iter().any(|c| in_call(proc, c))
        };
        if !in_flight {
            idle.push((inode, script));
        }
    }
    if idle.is_empty() {
        return HashSet::new();
    }
    let scripts = idle.iter().any(|(_, script)| *script);
    let Ok((mapped, open)) = holdings(procfs, scripts) else {
        return HashSet::new();
    };
    idle.into_iter()
        .filter(|(i, script)| match script {
            true => !open.contains(i),
            false => !mapped.contains(i),
        })
        .map(|(i, _)| i)
        .collect()
}

/// The inodes the processes `procfs` lists map executable, and (with
/// `fds`) have open.
#[allow(clippy::type_complexity)]
fn holdings(
    procfs: &Path,
    fds: bool,
) -> std::io::Result<(HashSet<(u64, u64)>, HashSet<(u64, u64)>)> {
    let (mut mapped, mut open) = (HashSet::new(), HashSet::new());
    for pid in processes(procfs)? {
        match std::fs::read_to_string(pid.join("maps")) {
            Ok(maps) => mapped.extend(maps.lines().filter_map(maps_line_executable)),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        }
        if !fds {
            continue;
        }
        match std::fs::read_dir(pid.join("fd")) {
            Ok(dir) => open.extend(dir.flatten().filter_map(|f| {
                nix::sys::stat::stat(&f.path())
                    .ok()
                    .map(|st| FileKey::of(&st).inode())
            })),
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((mapped, open))
}

/// Whether a task listed in `procfs` (a container's) is in one of the
/// [`MAPPING_CALLS`], or on a CPU (the rule where the callers are not
/// known). A task gone meanwhile is skipped.
fn calls_in_flight(procfs: &Path) -> std::io::Result<bool> {
    calls_in_flight_but(procfs, None)
}

/// [`calls_in_flight`], task `except` left out.
fn calls_in_flight_but(procfs: &Path, except: Option<u32>) -> std::io::Result<bool> {
    let except = except.map(|t| std::ffi::OsString::from(t.to_string()));
    for pid in processes(procfs)? {
        let Ok(tasks) = std::fs::read_dir(pid.join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if except.as_deref() == Some(task.file_name().as_os_str()) {
                continue;
            }
            match std::fs::read_to_string(task.path().join("syscall")) {
                Ok(text) if in_mapping_call(&text) => return Ok(true),
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                // Unreadable is not idle.
                Err(_) => return Ok(true),
            }
        }
    }
    Ok(false)
}

/// The directories of the processes `procfs` lists.
fn processes(procfs: &Path) -> std::io::Result<impl Iterator<Item = PathBuf>> {
    Ok(std::fs::read_dir(procfs)?.flatten().filter_map(|p| {
        let numeric = p
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok());
        numeric.then(|| p.path())
    }))
}

/// Whether a read of a task's procfs file failed because the task is gone.
fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// Whether a task's `syscall` file shows it on a CPU ("running") or in one
/// of the [`MAPPING_CALLS`] (in user mode it shows -1).
fn in_mapping_call(syscall: &str) -> bool {
    match syscall.split_whitespace().next() {
        Some("running") => true,
        Some(nr) => nr.parse::<i64>().is_ok_and(|n| MAPPING_CALLS.contains(&n)),
        None => false,
    }
}

/// Whether a process listed in `procfs` maps `inode` executable (its
/// `maps`, which name an overlay file by the overlay's device and inode,
/// as fstat does).
fn maps_show(procfs: &Path, inode: (u64, u64)) -> std::io::Result<bool> {
    for pid in processes(procfs)? {
        match std::fs::read_to_string(pid.join("maps")) {
            Ok(maps) if maps.lines().any(|l| maps_line_executes(l, inode)) => return Ok(true),
            Ok(_) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether a `maps` line (`range perms offset major:minor inode path`) maps
/// `inode` executable.
fn maps_line_executes(line: &str, inode: (u64, u64)) -> bool {
    maps_line_executable(line) == Some(inode)
}

/// The inode a `maps` line maps executable, if it does.
fn maps_line_executable(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let (Some(_), Some(perms), Some(_), Some(dev), Some(ino)) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return None;
    };
    let (major, minor) = dev.split_once(':')?;
    let (Ok(major), Ok(minor), Ok(ino)) = (
        u32::from_str_radix(major, 16),
        u32::from_str_radix(minor, 16),
        ino.parse::<u64>(),
    ) else {
        return None;
    };
    (perms.as_bytes().get(2) == Some(&b'x')).then(|| (libc::makedev(major, minor), ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn maps_lines_and_syscall_files_are_read() {
        let overlay = (libc::makedev(0, 0x3a), 1234);
        let line = "7f0c1000-7f0c2000 r-xp 00000000 00:3a 1234    /lib/x.so";
        assert!(maps_line_executes(line, overlay));
        assert!(!maps_line_executes(&line.replace("r-xp", "r--p"), overlay));
        assert!(!maps_line_executes(
            &line.replace(" 1234 ", " 1235 "),
            overlay
        ));
        let big = (libc::makedev(259, 0x1a3), 7);
        assert!(maps_line_executes("1-2 r-xp 0 103:1a3 7", big));
        assert!(!maps_line_executes(
            "7f0c1000-7f0c2000 rw-p 00000000 00:00 0",
            overlay
        ));
        assert!(in_mapping_call("running\n"));
        assert!(in_mapping_call(
            "9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffc 0x7f00\n"
        ));
        assert!(in_mapping_call(
            "59 0x1 0x2 0x3 0x0 0x0 0x0 0x7ffc 0x7f00\n"
        ));
        assert!(!in_mapping_call("-1 0x7ffc 0x7f00\n"), "user mode");
        assert!(!in_mapping_call(
            "230 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x7f00\n"
        ));
    }

    /// With the callers unknown (the rule for a watch read back after a
    /// restart): a procfs of three processes: one with this process's maps (which
    /// map its executable, by the device and inode fstat gives), one idle,
    /// one gone while listed; then one in `mmap`, and one unreadable.
    #[test]
    fn a_process_mapping_a_file_or_about_to_is_found() {
        let procfs = tempfile::tempdir().unwrap();
        let proc_dir = |pid: &str, syscall: &str| fake_process(procfs.path(), pid, syscall);
        let own = std::fs::read_to_string("/proc/self/maps").unwrap();
        std::fs::write(proc_dir("10", "-1 0x7ffc 0x7f00\n").join("maps"), own).unwrap();
        std::fs::write(proc_dir("11", "230 0x0 0x0\n").join("maps"), "").unwrap();
        std::fs::create_dir(procfs.path().join("12")).unwrap();
        std::fs::create_dir(procfs.path().join("self")).unwrap();
        let me = std::fs::metadata("/proc/self/exe").unwrap();
        let other = tempfile::NamedTempFile::new().unwrap();
        let other = other.as_file().metadata().unwrap();
        // Callers not known: every task of the container counts.
        let unknown = Calls::unknown();
        assert!(may_map(procfs.path(), (me.dev(), me.ino()), &unknown));
        assert!(!may_map(
            procfs.path(),
            (other.dev(), other.ino()),
            &unknown
        ));
        // A task in mmap: its mapping may not be in its maps yet.
        proc_dir("13", "9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffc 0x7f00\n");
        assert!(may_map(procfs.path(), (other.dev(), other.ino()), &unknown));
        std::fs::remove_dir_all(procfs.path().join("13")).unwrap();
        // Maps that cannot be read (a directory here): counted as mapped.
        std::fs::create_dir(proc_dir("14", "-1 0x0 0x0\n").join("maps")).unwrap();
        assert!(may_map(procfs.path(), (other.dev(), other.ino()), &unknown));
        // No procfs at all: mapped.
        assert!(may_map(
            &procfs.path().join("none"),
            (other.dev(), other.ino()),
            &unknown
        ));
    }

    /// A process `pid` of a stand-in procfs, its one task's `syscall` file
    /// showing `syscall`: its directory.
    fn fake_process(procfs: &Path, pid: &str, syscall: &str) -> PathBuf {
        let task = procfs.join(pid).join("task").join(pid);
        std::fs::create_dir_all(&task).unwrap();
        std::fs::write(task.join("syscall"), syscall).unwrap();
        procfs.join(pid)
    }

    /// A sweep's look at many watches at once: a file a process maps, one
    /// a process has open (a script's), and one nothing holds; then a
    /// task in `mmap` (every watch with callers unknown, and every script,
    /// stays) and maps that cannot be read (all stay).
    #[test]
    fn a_sweep_finds_what_nothing_holds() {
        let procfs = tempfile::tempdir().unwrap();
        let proc_dir = |pid: &str, syscall: &str| fake_process(procfs.path(), pid, syscall);
        let key = |m: &std::fs::Metadata| (m.dev(), m.ino());
        let me = key(&std::fs::metadata("/proc/self/exe").unwrap());
        let script = tempfile::NamedTempFile::new().unwrap();
        let open = key(&script.as_file().metadata().unwrap());
        let idle = tempfile::NamedTempFile::new().unwrap();
        let idle = key(&idle.as_file().metadata().unwrap());
        let p = proc_dir("10", "-1 0x7ffc 0x7f00\n");
        std::fs::write(
            p.join("maps"),
            std::fs::read_to_string("/proc/self/maps").unwrap(),
        )
        .unwrap();
        std::fs::create_dir(p.join("fd")).unwrap();
        std::os::unix::fs::symlink(script.path(), p.join("fd").join("3")).unwrap();
        let (known, unknown) = (Calls::default(), Calls::unknown());
        let watches = || {
            [
                (me, &known, false),
                (open, &known, true),
                (idle, &known, false),
                (idle, &unknown, true),
            ]
            .into_iter()
        };
        assert_eq!(
            unheld(procfs.path(), None, watches()),
            HashSet::from([idle])
        );
        // A task in mmap: the watches that wait for any task stay.
        proc_dir("13", "9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffc 0x7f00\n");
        assert_eq!(
            unheld(
                procfs.path(),
                None,
                [(idle, &known, false), (open, &unknown, false)].into_iter()
            ),
            HashSet::from([idle])
        );
        assert!(unheld(procfs.path(), None, [(idle, &unknown, true)].into_iter()).is_empty());
        // ... unless that task is the one the sweep is made for.
        assert_eq!(
            unheld(
                procfs.path(),
                Some(13),
                [(idle, &unknown, true)].into_iter()
            ),
            HashSet::from([idle])
        );
        std::fs::remove_dir_all(procfs.path().join("13")).unwrap();
        // Maps that cannot be read (a directory here): nothing is unheld.
        std::fs::create_dir(proc_dir("14", "-1 0x0 0x0\n").join("maps")).unwrap();
        assert!(unheld(procfs.path(), None, watches()).is_empty());
    }

    fn call(tid: u32, nr: i64) -> Caller {
        Caller {
            tid,
            nr,
            args: [0x7f00, 0x1000, 5, 2, 3, 0],
        }
    }

    #[test]
    fn a_call_is_told_from_its_syscall_file() {
        let c = call(7, libc::SYS_mmap);
        let shown = "9 0x7f00 0x1000 0x5 0x2 0x3 0x0 0x7ffc 0x7f00\n";
        assert!(shows_call(shown, &c));
        assert!(shows_call("running\n", &c), "on a CPU: cannot be told");
        assert!(!shows_call("-1 0x7ffc 0x7f00\n", &c), "user mode");
        assert!(
            !shows_call(&shown.replace("0x3 ", "0x4 "), &c),
            "another fd"
        );
        assert!(!shows_call(&shown.replacen('9', "10", 1), &c), "mprotect");
        assert!(!shows_call("230 0x0 0x0 0x0 0x0 0x0 0x0 0x1 0x2\n", &c));
    }

    /// A fake imacri procfs: task `tid`'s syscall file says `text`.
    fn task(proc: &Path, tid: u32, text: &str) {
        let dir = proc.join(tid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("syscall"), text).unwrap();
    }

    /// Known callers: only they are waited for, however busy the others
    /// (until 2026-12-05 any task of the container on a CPU counted).
    #[test]
    fn only_the_known_callers_still_in_their_calls_count() {
        let proc = tempfile::tempdir().unwrap();
        let procfs = tempfile::tempdir().unwrap();
        // The container: a busy task and one in mmap (not decided yet: its
        // writers check comes after the opener's).
        let busy = procfs.path().join("20").join("task").join("20");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("syscall"), "running\n").unwrap();
        std::fs::write(procfs.path().join("20").join("maps"), "").unwrap();
        let file = (libc::makedev(0, 0x3a), 1234);
        let mut calls = Calls::default();
        assert!(!may_map_in(proc.path(), procfs.path(), file, &calls));
        assert!(may_map_in(
            proc.path(),
            procfs.path(),
            file,
            &Calls::unknown()
        ));
        // A caller gone (no syscall file) or back in user mode: returned.
        calls.add_in(proc.path(), Mapper::Call(call(30, libc::SYS_mmap)));
        assert_eq!(calls.added, 1);
        assert!(!may_map_in(proc.path(), procfs.path(), file, &calls));
        task(proc.path(), 30, "-1 0x7ffc 0x7f00\n");
        assert!(!may_map_in(proc.path(), procfs.path(), file, &calls));
        // Still in its call, or on a CPU: the file may be mapped.
        task(proc.path(), 30, "9 0x7f00 0x1000 0x5 0x2 0x3 0x0 0x1 0x2\n");
        assert!(may_map_in(proc.path(), procfs.path(), file, &calls));
        task(proc.path(), 30, "running\n");
        assert!(may_map_in(proc.path(), procfs.path(), file, &calls));
        // Its next call replaces it.
        let next = Caller {
            args: [0; 6],
            ..call(30, libc::SYS_mprotect)
        };
        calls.add_in(proc.path(), Mapper::Call(next));
        assert_eq!(calls.known, vec![Mapper::Call(next)]);
        task(proc.path(), 30, "-1 0x7ffc 0x7f00\n");
        assert!(!may_map_in(proc.path(), procfs.path(), file, &calls));
        // An execution loading the file as its interpreter: until its task
        // is out of execve (its writers check of the file comes after our
        // answer; until 2026-12-05 it was not waited for).
        calls.add_in(proc.path(), Mapper::Execution(40));
        task(proc.path(), 40, "59 0x1 0x2 0x3 0x0 0x0 0x0 0x1 0x2\n");
        assert!(may_map_in(proc.path(), procfs.path(), file, &calls));
        task(proc.path(), 40, "running\n");
        assert!(may_map_in(proc.path(), procfs.path(), file, &calls));
        task(proc.path(), 40, "230 0x0 0x0 0x0 0x0 0x0 0x0 0x1 0x2\n");
        assert!(!may_map_in(proc.path(), procfs.path(), file, &calls));
        // A caller the last imacri handed over: unknown from then on.
        calls.add_in(proc.path(), Mapper::Unknown);
        assert!(calls.unknown && calls.known.is_empty());
        calls.add_in(proc.path(), Mapper::Call(call(31, libc::SYS_mmap)));
        assert!(calls.unknown && calls.known.is_empty());
        assert_eq!(calls.added, 5);
    }

    /// Past [`KEPT_CALLS`] callers, those out of their calls go; if none
    /// is, the callers count as unknown.
    #[test]
    fn callers_are_kept_bounded() {
        let proc = tempfile::tempdir().unwrap();
        let mut calls = Calls::default();
        for tid in 100..100 + KEPT_CALLS as u32 {
            calls.add_in(proc.path(), Mapper::Call(call(tid, libc::SYS_mmap)));
        }
        assert_eq!(calls.known.len(), KEPT_CALLS);
        // All gone: the next one finds room.
        calls.add_in(proc.path(), Mapper::Call(call(1, libc::SYS_mmap)));
        assert_eq!(calls.known, vec![Mapper::Call(call(1, libc::SYS_mmap))]);
        // All still in their calls: unknown.
        for tid in 200..200 + KEPT_CALLS as u32 {
            task(proc.path(), tid, "running\n");
            calls.add_in(proc.path(), Mapper::Call(call(tid, libc::SYS_mmap)));
        }
        assert!(!calls.unknown);
        calls.add_in(proc.path(), Mapper::Call(call(2, libc::SYS_mmap)));
        assert!(calls.unknown && calls.known.is_empty());
    }
}
