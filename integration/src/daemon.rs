//! imacri daemons a test starts: own socket, root and state; restartable.

use anyhow::{bail, Context, Result};
use imacri_api::cri::image_service_client::ImageServiceClient;
use imacri_api::cri::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use crate::{client, cri, pod_config, Env};

/// Path of the imacri binary (built by `cargo build --bins`; IMACRI_BIN overrides).
pub fn imacri_bin() -> PathBuf {
    if let Ok(p) = std::env::var("IMACRI_BIN") {
        return PathBuf::from(p);
    }
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let bin = [dir.join("imacri"), dir.join("../imacri")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("imacri"));
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` first (make test does)",
        bin.display()
    );
    bin
}

/// One imacri daemon with its own socket, root and state.
pub struct Imacri {
    pub namespace: String,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The verifier-only socket (attestation service alone).
    pub attest_socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    args: Vec<String>,
    /// Environment of the next `spawn` (test fault injection).
    pub vars: Vec<(String, String)>,
    /// The next `spawn`'s stderr instead of `imacri.log` (taken by it).
    pub stderr: Option<std::fs::File>,
}

impl Imacri {
    pub async fn start(env: &Env) -> Result<Imacri> {
        Self::start_with(env, &[]).await
    }

    /// An imacri in a containerd namespace of its own, so a test can check
    /// that nothing at all is left in it.
    pub async fn start_isolated(env: &Env) -> Result<Imacri> {
        let ns = format!("iso-{:08x}", rand::random::<u32>());
        Self::start_full(env, &ns, &[]).await
    }

    pub async fn start_with(env: &Env, extra: &[&str]) -> Result<Imacri> {
        Self::start_full(env, &env.namespace, extra).await
    }

    pub async fn start_full(env: &Env, namespace: &str, extra: &[&str]) -> Result<Imacri> {
        Self::start_configured(env, namespace, extra, "").await
    }

    /// With `config` as its config file (TOML; flags still win).
    pub async fn start_configured(
        env: &Env,
        namespace: &str,
        extra: &[&str],
        config: &str,
    ) -> Result<Imacri> {
        let dir = tempfile::Builder::new()
            .prefix("imacri-")
            .tempdir_in(&env.base)?;
        let socket = dir.path().join("imacri.sock");
        let attest_socket = dir.path().join("attest.sock");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--config".into(),
            dir.path().join("none.toml").to_string_lossy().into(),
            "--socket".into(),
            socket.to_string_lossy().into(),
            "--attest-socket".into(),
            attest_socket.to_string_lossy().into(),
            "--root".into(),
            root.to_string_lossy().into(),
            "--state".into(),
            state.to_string_lossy().into(),
            "--containerd-address".into(),
            env.containerd_sock.to_string_lossy().into(),
            "--containerd-namespace".into(),
            namespace.to_string(),
            "--registry-config-path".into(),
            env.hosts_dir.to_string_lossy().into(),
            "--cni-conf-dir".into(),
            env.cni_conf_dir.to_string_lossy().into(),
            "--cni-bin-dir".into(),
            "/usr/lib/cni".into(),
            "--log-level".into(),
            "info,imacri_cri=debug,imacri_runtime=debug".into(),
        ];
        // Flags in `extra` replace the defaults above.
        for flag in extra.iter().filter(|a| a.starts_with("--")) {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args.drain(i..i + 2);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        std::fs::write(dir.path().join("none.toml"), config)?;
        let mut me = Imacri {
            namespace: namespace.to_string(),
            child: None,
            dir,
            socket,
            attest_socket,
            root,
            state,
            args,
            vars: Vec::new(),
            stderr: None,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// Starts (again) the daemon with the same directories.
    pub async fn spawn(&mut self) -> Result<()> {
        let log = match self.stderr.take() {
            Some(f) => f,
            None => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("imacri.log"))?,
        };
        let child = Command::new(imacri_bin())
            .args(&self.args)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning imacri")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut rt) = self.runtime().await {
                if rt.version(cri::VersionRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("imacri exited with {status}: {}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("imacri did not come up: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the daemon (a crash) and starts it again with `vars` as its
    /// environment (test hooks such as `IMACRI_TEST_CRASH_AT`).
    pub async fn respawn(&mut self, vars: &[(&str, &str)]) {
        self.kill();
        self.vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn().await.expect("respawning imacri");
    }

    /// The socket of the containerd this daemon uses.
    pub fn containerd(&self) -> PathBuf {
        self.args
            .iter()
            .position(|a| a == "--containerd-address")
            .and_then(|i| self.args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::Env::get().containerd_sock.clone())
    }

    /// A graceful stop, after which nothing of this daemon's is left in its
    /// containerd namespace.
    pub async fn stop_leaving_nothing(&mut self) {
        self.stop();
        let all = crate::Env::get()
            .all_objects_at(&self.containerd(), &self.namespace)
            .await
            .expect("listing containerd's objects");
        assert!(all.is_empty(), "left in containerd: {all:?}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("imacri.log")).unwrap_or_default()
    }

    /// The log once it has all of `parts` (imacri's log thread writes a
    /// line a moment after it is logged), waiting up to 10 s.
    pub async fn log_with(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if parts.iter().all(|p| log.contains(p)) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {parts:?} in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn channel(&self) -> Result<Channel> {
        Ok(containerd_client::connect(&self.socket).await?)
    }

    pub async fn runtime(&self) -> Result<RuntimeServiceClient<Channel>> {
        Ok(RuntimeServiceClient::new(self.channel().await?))
    }

    pub async fn images(&self) -> Result<ImageServiceClient<Channel>> {
        Ok(ImageServiceClient::new(self.channel().await?))
    }

    /// Pulls `image` (panics on failure).
    pub async fn pull(&self, image: &str) {
        self.images()
            .await
            .expect("image client")
            .pull_image(cri::PullImageRequest {
                image: client::image(image),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e}"));
    }

    /// A runtime client and a running pod `name` with busybox pulled.
    pub async fn busybox_pod(
        &self,
        env: &Env,
        name: &str,
    ) -> (client::Rt, String, cri::PodSandboxConfig) {
        self.pull(&env.busybox).await;
        let mut rt = self.runtime().await.expect("runtime client");
        let cfg = pod_config(name);
        let pod = client::run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", self.log()));
        (rt, pod, cfg)
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills imacri and its fd keeper: the node lost both (e.g. a service
    /// manager killing imacri's whole cgroup), so nothing held the
    /// containers' measurement while it was down.
    pub fn kill_all(&mut self) {
        self.kill();
        self.kill_keeper();
    }

    /// The pids of this daemon's fd keeper (`imacri internal fd-keeper`).
    pub fn keeper_pids(&self) -> Vec<i32> {
        keeper_pids_of(&self.state)
    }

    /// The keys the fd keeper holds, as its `ALL` lists them (the fds it
    /// sends with them are discarded by the kernel: no room is given).
    pub fn keeper_keys(&self) -> Vec<String> {
        use nix::sys::socket::{
            connect, recv, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::AsRawFd;
        let s = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new(&self.state.join("fdkeeper.sock")).unwrap();
        connect(s.as_raw_fd(), &addr).unwrap();
        nix::sys::socket::send(s.as_raw_fd(), b"ALL", MsgFlags::empty()).unwrap();
        let mut keys = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            match std::str::from_utf8(&buf[..n]).unwrap() {
                "END" | "" => return keys,
                t => keys.push(t.strip_prefix("FD ").unwrap_or(t).to_string()),
            }
        }
    }

    /// SIGKILL to the fd keeper alone, returning once it is gone (its
    /// groups released unless someone else holds them).
    pub fn kill_keeper(&self) {
        kill_keeper_of(&self.state)
    }

    /// Kills the fd keeper; returns once imacri has started another.
    pub async fn keeper_replaced(&self) {
        let old = self.keeper_pids();
        assert!(!old.is_empty(), "no fd keeper runs");
        self.kill_keeper();
        crate::poll::eventually("a new keeper", Duration::from_secs(10), || async {
            let now = self.keeper_pids();
            (!now.is_empty()
                && now.iter().all(|p| !old.contains(p))
                && self.log().contains("the fd keeper was gone"))
            .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    /// Respawns imacri so that the first call to reach `point` stands there
    /// (`IMACRI_TEST_HOLD_AT`) while the file it names exists: that file.
    pub async fn holding_at(&mut self, point: &str) -> PathBuf {
        let hold = self.dir.path().join("held");
        let file = hold.to_string_lossy().into_owned();
        self.respawn(&[
            ("IMACRI_TEST_HOLD_AT", point),
            ("IMACRI_TEST_HOLD_FILE", &file),
        ])
        .await;
        hold
    }

    /// Waits until a call stands at the point `holding_at` named.
    pub async fn until_held(&self, hold: &std::path::Path) {
        crate::poll::eventually("the held point", Duration::from_secs(60), || async {
            hold.exists().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    /// Lowers imacri's soft open-file limit under what it holds, so that its
    /// next open fails with EMFILE (as at its limit on a node whose pods
    /// took its files), until the guard is dropped.
    pub fn at_open_file_limit(&self) -> OpenFileLimit {
        at_open_file_limit(self.pid().expect("imacri runs") as i32)
    }
}

/// `Imacri::at_open_file_limit` for process `pid` (imacri's fd keeper too).
pub fn at_open_file_limit(pid: i32) -> OpenFileLimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on the pid with plain structs (the hard limit kept:
    // raising it back would need CAP_SYS_RESOURCE).
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    // Its lowest free fd number: it has every fd below (poll takes no more
    // fds than the limit).
    let used: std::collections::BTreeSet<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let low = libc::rlimit {
        rlim_cur: (0..).find(|n| !used.contains(n)).unwrap() as u64,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &low, std::ptr::null_mut()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    OpenFileLimit { pid, old }
}

impl Imacri {
    /// SIGTERM and wait: a graceful shutdown.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }
}

impl Drop for Imacri {
    fn drop(&mut self) {
        self.kill();
        // A failed test's daemon log outlives its temporary directory, so a
        // flake seen once in a full run can be read afterwards.
        if std::thread::panicking() {
            let test = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .replace("::", "-");
            let keep = std::env::temp_dir().join(format!("imacri-failed-{test}.log"));
            if std::fs::write(&keep, self.log()).is_ok() {
                eprintln!("imacri's log of this test: {}", keep.display());
            }
        }
    }
}

/// Runs `imacri attest --socket <d> ARGS`; returns (exit code, stdout, stderr).
pub fn attest(d: &Imacri, args: &[&str]) -> (i32, String, String) {
    attest_at(&d.attest_socket, args)
}

/// `imacri attest golden IMAGE --out OUT` from the registry, as a verifier
/// host makes reference values (no containerd involved).
pub fn golden_from_registry(d: &Imacri, env: &Env, image: &str, out: &Path) {
    let hosts = env.hosts_dir.to_str().unwrap_or_default();
    let out = out.to_str().unwrap_or_default();
    let args = [
        "golden",
        image,
        "--registry-config-path",
        hosts,
        "--out",
        out,
    ];
    let (code, _, err) = attest(d, &args);
    assert_eq!(code, 0, "attest golden {image}: {err}");
}

/// `imacri attest --socket SOCKET ARGS...`: (exit code, stdout, stderr).
pub fn attest_at(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(imacri_bin())
        .arg("attest")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running imacri attest");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The pids of the fd keeper of the imacri whose state directory is
/// `state` (`imacri internal fd-keeper`).
pub fn keeper_pids_of(state: &std::path::Path) -> Vec<i32> {
    let sock = state.join("fdkeeper.sock");
    let want = format!("fd-keeper\0--socket\0{}", sock.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&want).then_some(pid)
        })
        .collect()
}

/// `Imacri::kill_keeper` of the imacri whose state directory is `state`
/// (for a test that kills it while that imacri is being started).
pub fn kill_keeper_of(state: &std::path::Path) {
    let killed = keeper_pids_of(state);
    for pid in &killed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed
        .iter()
        .any(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| !c.is_empty()))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Imacri::at_open_file_limit`'s guard: gives imacri its limit back.
pub struct OpenFileLimit {
    pid: i32,
    old: libc::rlimit,
}

impl Drop for OpenFileLimit {
    fn drop(&mut self) {
        // SAFETY: prlimit with a plain struct; a gone imacri fails it (ESRCH).
        unsafe {
            libc::prlimit(
                self.pid,
                libc::RLIMIT_NOFILE,
                &self.old,
                std::ptr::null_mut(),
            )
        };
    }
}
