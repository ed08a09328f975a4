//! A private containerd per test process (its CRI plugin disabled unless a
//! test wants it on).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{spawn_service, wait_for};

/// Starts a containerd under `base/<name>`; `with_cri` leaves its own CRI
/// plugin enabled (to test that imacri refuses to share a namespace with it).
pub fn start_containerd(base: &Path, name: &str, with_cri: bool) -> Result<PathBuf> {
    start_containerd_pid(base, name, with_cri).map(|(sock, _)| sock)
}

/// As `start_containerd`, also returning the PID (to stop it in a test).
pub fn start_containerd_pid(base: &Path, name: &str, with_cri: bool) -> Result<(PathBuf, u32)> {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("containerd.sock");
    let disabled = if with_cri {
        ""
    } else {
        "\"io.containerd.grpc.v1.cri\""
    };
    let cfg = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [{disabled}]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = sock.display()
    );
    std::fs::write(dir.join("config.toml"), cfg)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log.try_clone()?)
        .stderr(log);
    let pid = spawn_service(cmd).context("starting containerd (apt-get install containerd)")?;
    wait_for("containerd", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    })?;
    Ok((sock, pid))
}

/// SIGKILL to the private containerd `pid` started as `name` under `base`
/// (its shims and their containers keep running), then the same containerd
/// again, as a crash and a service manager's restart; returns its new pid.
pub fn restart_containerd(base: &Path, name: &str, pid: u32) -> Result<u32> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(start_containerd_pid(base, name, false)?.1)
}
