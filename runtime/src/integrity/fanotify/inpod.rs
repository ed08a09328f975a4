//! What a container's processes hold of a watched file, read through the
//! container's own procfs (its pid namespace's: every process of it,
//! whichever mount namespace they are in): open (a script's interpreter),
//! mapped executable, or about to be (a task in a call that maps). A
//! watched file that nothing holds is written as any file (`writes.rs`).

use std::path::{Path, PathBuf};

use super::super::digest::FileKey;

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

/// Whether a process of the container may have `inode` mapped
/// executable, now or once a call in flight returns: a task of it is in
/// a call that maps (`mmap`, `mprotect`, `execve` loading an
/// interpreter; answered or not, its mapping may not be in its maps
/// yet) or on a CPU (where its call cannot be read), or a process maps
/// the file executable. Looked at through the container's own procfs,
/// calls first: a call that returns after that look made its mapping
/// before the maps are read, and one that starts after it is checked
/// for writers after this opener's write access counts (the kernel
/// counts it before fanotify asks), which refuses it. What cannot be
/// read counts as mapped. A task on a CPU is looked at again a few
/// times, 1 ms apart, before it counts.
pub(super) fn may_map(procfs: &Path, inode: (u64, u64)) -> bool {
    let mut looks = 0;
    loop {
        match calls_in_flight(procfs) {
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

/// How often a container's tasks are looked at again while one is on a CPU
/// or in a call that maps, before the file counts as mapped.
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

/// Whether a task listed in `procfs` (a container's) is in one of the
/// [`MAPPING_CALLS`], or on a CPU. A task gone meanwhile is skipped.
fn calls_in_flight(procfs: &Path) -> std::io::Result<bool> {
    for pid in processes(procfs)? {
        let Ok(tasks) = std::fs::read_dir(pid.join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
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
    let mut f = line.split_whitespace();
    let (Some(_), Some(perms), Some(_), Some(dev), Some(ino)) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return false;
    };
    let Some((major, minor)) = dev.split_once(':') else {
        return false;
    };
    let (Ok(major), Ok(minor), Ok(ino)) = (
        u32::from_str_radix(major, 16),
        u32::from_str_radix(minor, 16),
        ino.parse::<u64>(),
    ) else {
        return false;
    };
    perms.as_bytes().get(2) == Some(&b'x') && (libc::makedev(major, minor), ino) == inode
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

    /// A procfs of three processes: one with this process's maps (which
    /// map its executable, by the device and inode fstat gives), one idle,
    /// one gone while listed; then one in `mmap`, and one unreadable.
    #[test]
    fn a_process_mapping_a_file_or_about_to_is_found() {
        let procfs = tempfile::tempdir().unwrap();
        let proc_dir = |pid: &str, syscall: &str| {
            let task = procfs.path().join(pid).join("task").join(pid);
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("syscall"), syscall).unwrap();
            procfs.path().join(pid)
        };
        let own = std::fs::read_to_string("/proc/self/maps").unwrap();
        std::fs::write(proc_dir("10", "-1 0x7ffc 0x7f00\n").join("maps"), own).unwrap();
        std::fs::write(proc_dir("11", "230 0x0 0x0\n").join("maps"), "").unwrap();
        std::fs::create_dir(procfs.path().join("12")).unwrap();
        std::fs::create_dir(procfs.path().join("self")).unwrap();
        let me = std::fs::metadata("/proc/self/exe").unwrap();
        let other = tempfile::NamedTempFile::new().unwrap();
        let other = other.as_file().metadata().unwrap();
        assert!(may_map(procfs.path(), (me.dev(), me.ino())));
        assert!(!may_map(procfs.path(), (other.dev(), other.ino())));
        // A task in mmap: its mapping may not be in its maps yet.
        proc_dir("13", "9 0x0 0x1000 0x5 0x2 0x3 0x0 0x7ffc 0x7f00\n");
        assert!(may_map(procfs.path(), (other.dev(), other.ino())));
        std::fs::remove_dir_all(procfs.path().join("13")).unwrap();
        // Maps that cannot be read (a directory here): counted as mapped.
        std::fs::create_dir(proc_dir("14", "-1 0x0 0x0\n").join("maps")).unwrap();
        assert!(may_map(procfs.path(), (other.dev(), other.ino())));
        // No procfs at all: mapped.
        assert!(may_map(
            &procfs.path().join("none"),
            (other.dev(), other.ino())
        ));
    }
}
