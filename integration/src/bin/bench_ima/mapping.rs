//! Executable mappings through the map guard: what a guarded, threaded or shared
//! mapping costs next to an unguarded one.

use super::*;

/// Median microseconds of an executable mapping of `file` in a child, with
/// or without the map guard's filter (answered by `engine` as the
/// registered container "bench-ctr"). `mode`: "plain", "guarded" or
/// "threaded" (guarded, with a second thread sharing the fd table, so each
/// call holds the other one still). The child runs in a cgroup of its own, as a
/// container's process does.
pub(crate) fn mapping_cost(engine: &Arc<Engine>, file: &Path, mode: &str) -> Result<f64> {
    child_cost(engine, "mmap-child", file, mode)
}

/// Median microseconds of an execution of the dynamically linked `file`
/// (`ls -d /`: ld.so maps 3 libraries) by a child in a cgroup of its own,
/// with (`guarded`) or without the map guard's filter. Two rounds each,
/// alternated, so both see the same machine.
/// Also (third) the same unmarked program under a filter whose listener
/// answers every call at once: what seccomp user notification costs by
/// itself, before imacri decides anything.
pub(crate) fn dynamic_exec_cost(
    engine: &Arc<Engine>,
    marked: &Path,
    unmarked: &Path,
) -> Result<(f64, f64, f64)> {
    let (mut plain, mut guarded, mut floor) = (0.0, 0.0, 0.0);
    for _ in 0..2 {
        plain += child_cost(engine, "exec-child", unmarked, "plain")? / 2.0;
        guarded += child_cost(engine, "exec-child", marked, "guarded")? / 2.0;
        floor += child_cost(engine, "exec-child", unmarked, "answered")? / 2.0;
    }
    Ok((plain, guarded, floor))
}

/// Runs `kind` (`mmap-child` or `exec-child`) on `file` in `mode` and
/// returns the median it prints.
pub(crate) fn child_cost(engine: &Arc<Engine>, kind: &str, file: &Path, mode: &str) -> Result<f64> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([kind, &file.to_string_lossy(), mode])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Its own v2 cgroup (hybrid hosts: the unified one) and v1 pids
    // cgroup, as runc makes them.
    let name = format!("imacri-bench-{}", child.id());
    let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|m| m.join("cgroup.threads").exists());
    let pids = Some(Path::new("/sys/fs/cgroup/pids")).filter(|m| m.is_dir());
    let cgs: Vec<_> = v2.into_iter().chain(pids).map(|m| m.join(&name)).collect();
    for cg in &cgs {
        std::fs::create_dir_all(cg)?;
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string())?;
    }
    let r = mapping_run(engine, &mut child, mode);
    let _ = child.kill();
    let _ = child.wait();
    for cg in &cgs {
        let _ = std::fs::remove_dir(cg);
    }
    r
}

fn mapping_run(engine: &Arc<Engine>, child: &mut std::process::Child, mode: &str) -> Result<f64> {
    use std::io::{BufRead, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if mode.trim_start_matches("shared-") != "plain" {
        let fd: i32 = line
            .trim()
            .strip_prefix("fd=")
            .context("child fd")?
            .parse()?;
        // SAFETY: raw syscalls with integer arguments; results checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as i32, 0) };
        anyhow::ensure!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        let got = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                fd,
                0,
            )
        };
        anyhow::ensure!(got >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        let listener = unsafe { OwnedFd::from_raw_fd(got as i32) };
        if mode == "answered" {
            std::thread::spawn(move || answer_all(listener));
        } else {
            imacri_runtime::integrity::mapguard::listen(
                Arc::downgrade(engine),
                listener,
                "bench-ctr".into(),
                None,
                None,
            )?;
        }
    }
    child.stdin.take().context("stdin")?.write_all(b"go\n")?;
    line.clear();
    out.read_line(&mut line)?;
    line.trim()
        .parse::<f64>()
        .with_context(|| format!("child said {line:?}"))
}

/// A listener that lets every call through at once (the mechanism's
/// floor), with synchronous wake-ups as imacri's: until the child is gone.
fn answer_all(listener: std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    // SAFETY: ioctls on a seccomp listener with zeroed plain-old-data.
    unsafe {
        libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _, 1u64);
        loop {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut p, 1, -1) < 0 {
                continue;
            }
            if p.revents & libc::POLLIN == 0 {
                return; // POLLHUP: the child is gone
            }
            let mut req: libc::seccomp_notif = std::mem::zeroed();
            if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut req) != 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                    _ => return,
                }
            }
            let mut resp: libc::seccomp_notif_resp = std::mem::zeroed();
            resp.id = req.id;
            resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
            libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND as _, &mut resp);
        }
    }
}

/// The child: (optionally) installs a filter sending mmap with PROT_EXEC or
/// MAP_SHARED to a listener, waits for "go", maps `file` executable (or,
/// `shared`, shared and writable) RUNS times and prints the median in
/// microseconds.
pub(crate) fn mmap_child(file: &Path, guarded: bool, threaded: bool, shared: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    // A second thread, parked: it shares the fd table, as in any
    // multi-threaded program.
    let _parked = threaded.then(|| {
        std::thread::spawn(|| loop {
            std::thread::park();
        })
    });
    filter_and_wait(guarded)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(shared)
        .open(file)?;
    let (prot, flags) = match shared {
        true => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
        false => (libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE),
    };
    let mut v = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        // SAFETY: a fresh mapping, unmapped at once.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, file.as_raw_fd(), 0) };
        v.push(t.elapsed());
        anyhow::ensure!(
            p != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        unsafe { libc::munmap(p, 4096) };
    }
    println!("{:.2}", median(v));
    Ok(())
}

/// Median milliseconds the ima guards add to a pod's start: the sysctl
/// helper (vm.memfd_noexec, user.max_user_namespaces) and the pause seal,
/// each on a fresh process in new user, pid and mount namespaces.
pub(crate) fn guard_cost() -> Result<(f64, f64)> {
    use imacri_runtime::integrity::guard;
    let mut apply = Vec::new();
    let mut seal = Vec::new();
    for _ in 0..20 {
        let mut child = Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--fork",
                "--mount",
                "sleep",
                "30",
            ])
            .spawn()?;
        // The forked sleep is unshare's child: wait for its namespaces.
        let pid = child_pid(child.id())?;
        let own = std::fs::read_link("/proc/self/ns/mnt")?;
        anyhow::ensure!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))? != own,
            "the probe process shares imacri's mount namespace"
        );
        let t = Instant::now();
        guard::apply(
            pid,
            Path::new(&format!("/proc/{pid}/ns/user")),
            guard::Scope::Pod,
        )?;
        apply.push(t.elapsed());
        let t = Instant::now();
        guard::seal_root_noexec(pid)?;
        seal.push(t.elapsed());
        let _ = child.kill();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        );
        let _ = child.wait();
    }
    Ok((median(apply) / 1e3, median(seal) / 1e3))
}

/// The pid of `parent`'s child once it has exec'd `sleep`.
fn child_pid(parent: u32) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = kids
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        {
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
            {
                return Ok(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("unshare's child did not start")
}

/// In a child: installs (when `guarded`) a filter sending mmap with
/// PROT_EXEC or MAP_SHARED to a listener and prints its fd (else "ready"),
/// then waits for "go" on stdin.
pub(crate) fn filter_and_wait(guarded: bool) -> Result<()> {
    use std::io::{BufRead, Write};
    if guarded {
        let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        let prog = [
            f(0x20, 0, 0, 0),                       // ld nr
            f(0x15, 0, 5, libc::SYS_mmap as u32),   // mmap?
            f(0x20, 0, 0, 32),                      // ld args[2] (prot)
            f(0x45, 2, 0, libc::PROT_EXEC as u32),  // PROT_EXEC?
            f(0x20, 0, 0, 40),                      // ld args[3] (flags)
            f(0x45, 0, 1, libc::MAP_SHARED as u32), // MAP_SHARED?
            f(0x06, 0, 0, 0x7fc0_0000),             // SECCOMP_RET_USER_NOTIF
            f(0x06, 0, 0, 0x7fff_0000),             // SECCOMP_RET_ALLOW
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut _,
        };
        // SAFETY: a valid filter program that outlives the calls.
        let fd = unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::syscall(
                libc::SYS_seccomp,
                1, /* SET_MODE_FILTER */
                8, /* NEW_LISTENER */
                &fprog,
            )
        };
        anyhow::ensure!(fd >= 0, "seccomp: {}", std::io::Error::last_os_error());
        println!("fd={fd}");
    } else {
        println!("ready");
    }
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go)?;
    Ok(())
}
