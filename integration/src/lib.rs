//! Test environment for end-to-end tests: a private containerd (CRI plugin
//! disabled), Debian's docker-registry on free loopback ports (one anonymous,
//! one with htpasswd auth), test images built from busybox-static and pushed
//! with skopeo, and imacri daemons started per test. Nothing here is a mock.

pub mod cleanup;
pub mod client;
pub mod critest;
pub mod images;
pub mod kubelet;
pub mod peers;

use anyhow::{anyhow, bail, Context, Result};
use imacri_api::cri::image_service_client::ImageServiceClient;
use imacri_api::cri::runtime_service_client::RuntimeServiceClient;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub use imacri_api::cri;

pub struct Env {
    pub base: PathBuf,
    pub containerd_sock: PathBuf,
    pub namespace: String,
    /// Anonymous registry, "127.0.0.1:PORT".
    pub registry: String,
    /// Registry requiring basic auth (user `imacri`, password `secret`).
    pub auth_registry: String,
    /// HTTPS registry with a certificate from a test CA (trusted through
    /// its hosts.toml `ca`).
    pub tls_registry: String,
    /// containerd hosts.toml directory; maps registry.k8s.io to `registry`.
    pub hosts_dir: PathBuf,
    /// `<registry>/test/busybox:latest`
    pub busybox: String,
    /// Image with Entrypoint, User alice, WorkingDir, Env.
    pub configured: String,
    /// CNI config dir: bridge + host-local + portmap (loopback is implicit).
    pub cni_conf_dir: PathBuf,
    /// The pod subnet of that config.
    pub pod_subnet: String,
}

/// Writes the test CNI network: one bridge for every imacri of this test
/// process, host-local IPAM with its own data dir.
fn write_cni_config(base: &Path) -> Result<(PathBuf, String)> {
    let dir = base.join("cni");
    std::fs::create_dir_all(&dir)?;
    let n = std::process::id() % 250 + 1;
    let subnet = format!("10.{n}.0.0/16");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "imacri-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": format!("imit{}", std::process::id() % 100000),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": base.join("cni-ipam").to_string_lossy(),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(
        dir.join("10-imacri-test.conflist"),
        serde_json::to_vec_pretty(&conf)?,
    )?;
    Ok((dir, subnet))
}

pub const AUTH_USER: &str = "imacri";
pub const AUTH_PASSWORD: &str = "secret";

static ENV: OnceLock<Env> = OnceLock::new();

/// Spawns long-lived services from a thread that lives as long as the test
/// process, with PR_SET_PDEATHSIG so they die with it.
fn spawn_service(mut cmd: Command) -> Result<u32> {
    static KEEPER: OnceLock<mpsc::Sender<(Command, mpsc::Sender<Result<u32>>)>> = OnceLock::new();
    let tx = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<Result<u32>>)>();
        std::thread::spawn(move || {
            let mut children = Vec::new();
            for (mut cmd, reply) in rx {
                let r = cmd.spawn().map(|c| {
                    let pid = c.id();
                    children.push(c);
                    pid
                });
                let _ = reply.send(r.map_err(|e| anyhow!("spawning service: {e}")));
            }
        });
        tx
    });
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (rtx, rrx) = mpsc::channel();
    tx.send((cmd, rtx))
        .map_err(|_| anyhow!("service keeper gone"))?;
    rrx.recv().map_err(|_| anyhow!("service keeper gone"))?
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} not ready after {timeout:?}")
}

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("integration tests need root (containerd, runc, mounts): run them as root, e.g. via `make test`");
    }
}

/// A test CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key).
fn make_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=imacri-test-ca",
        "-days",
        "2",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "reg.key",
        "-out",
        "reg.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "reg.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "reg.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])?;
    Ok((dir.join("ca.crt"), dir.join("reg.crt"), dir.join("reg.key")))
}

fn start_registry(base: &Path, name: &str, htpasswd: Option<&Path>) -> Result<String> {
    start_registry_tls(base, name, htpasswd, None)
}

fn start_registry_tls(
    base: &Path,
    name: &str,
    htpasswd: Option<&Path>,
    tls: Option<(&Path, &Path)>,
) -> Result<String> {
    let port = free_port();
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: imacri-test\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let tls = tls
        .map(|(c, k)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            )
        })
        .unwrap_or_default();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
        dir.join("data").display()
    );
    std::fs::write(dir.join("config.yml"), cfg)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(log.try_clone()?)
        .stderr(log);
    spawn_service(cmd).context("starting docker-registry (apt-get install docker-registry)")?;
    wait_for("docker-registry", Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(format!("127.0.0.1:{port}"))
}

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

/// Removes what earlier test processes (now gone) left when a test failed
/// before cleaning up.
fn reap_stale_runs() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("imacri-it-") else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !alive(pid) {
                cleanup::reap_run(&e.path());
            }
        }
    }
    cleanup::reap_bridges(|pid| pid != (std::process::id() % 100000).to_string() && !alive(pid));
}

/// At exit of the test process: the environment's containers, shims, mounts,
/// bridges and directories go, so a passing run leaves nothing behind.
extern "C" fn reap_at_exit() {
    if let Some(env) = ENV.get() {
        cleanup::reap_run(&env.base);
    }
    let mine = (std::process::id() % 100000).to_string();
    cleanup::reap_bridges(|pid| pid == mine);
}

impl Env {
    /// The shared environment, started on first use.
    pub fn get() -> &'static Env {
        ENV.get_or_init(|| {
            require_root();
            // SAFETY: registers a plain function; it runs once, at exit.
            unsafe { libc::atexit(reap_at_exit) };
            Env::start().unwrap_or_else(|e| panic!("test environment: {e:#}"))
        })
    }

    fn start() -> Result<Env> {
        reap_stale_runs();
        let base = std::env::temp_dir().join(format!("imacri-it-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base)?;
        let containerd_sock = start_containerd(&base, "containerd", false)?;
        let registry = start_registry(&base, "registry", None)?;
        let htpasswd = base.join("htpasswd");
        let hash = bcrypt::hash(AUTH_PASSWORD, 5)?;
        std::fs::write(&htpasswd, format!("{AUTH_USER}:{hash}\n"))?;
        let auth_registry = start_registry(&base, "auth-registry", Some(&htpasswd))?;
        let (ca, cert, key) = make_certs(&base.join("certs"))?;
        let tls_registry = start_registry_tls(&base, "tls-registry", None, Some((&cert, &key)))?;

        let hosts_dir = base.join("certs.d");
        std::fs::create_dir_all(hosts_dir.join("registry.k8s.io"))?;
        std::fs::write(
            hosts_dir.join("registry.k8s.io/hosts.toml"),
            format!(
                "server = \"https://registry.k8s.io\"\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;

        let busybox = format!("{registry}/test/busybox:latest");
        images::build_and_push(&base, &images::busybox(), &busybox, None)?;
        images::build_and_push(
            &base,
            &images::busybox(),
            &format!("{registry}/pause:3.9"),
            None,
        )?;
        std::fs::create_dir_all(hosts_dir.join(&tls_registry))?;
        std::fs::write(
            hosts_dir.join(&tls_registry).join("hosts.toml"),
            format!(
                "server = \"https://{tls_registry}\"\nca = \"{}\"\n",
                ca.display()
            ),
        )?;
        images::build_and_push(
            &base,
            &images::busybox(),
            &format!("{tls_registry}/secure/busybox:latest"),
            None,
        )?;
        let (cni_conf_dir, pod_subnet) = write_cni_config(&base)?;
        let configured = format!("{registry}/test/configured:1.0");
        images::build_and_push(&base, &images::configured(), &configured, None)?;
        images::build_and_push(
            &base,
            &images::busybox(),
            &format!("{auth_registry}/private/busybox:latest"),
            Some((AUTH_USER, AUTH_PASSWORD)),
        )?;
        Ok(Env {
            base,
            containerd_sock,
            namespace: format!("imacri-it-{}", std::process::id()),
            registry,
            auth_registry,
            tls_registry,
            hosts_dir,
            busybox,
            configured,
            cni_conf_dir,
            pod_subnet,
        })
    }

    /// A containerd connection (to check for leftovers).
    pub async fn containerd(&self) -> Result<Channel> {
        Ok(containerd_client::connect(&self.containerd_sock).await?)
    }

    fn in_ns<T>(ns: &str, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", ns.parse().expect("namespace"));
        r
    }

    /// Everything in `namespace` but images and their committed layers:
    /// containers, tasks, active snapshots, leases.
    pub async fn all_objects(&self, namespace: &str) -> Result<Vec<String>> {
        self.all_objects_at(&self.containerd_sock, namespace).await
    }

    /// As `all_objects`, on another containerd.
    pub async fn all_objects_at(&self, sock: &Path, namespace: &str) -> Result<Vec<String>> {
        use containerd_client::services::v1::{
            containers_client::ContainersClient, leases_client::LeasesClient,
            snapshots::snapshots_client::SnapshotsClient, snapshots::ListSnapshotsRequest,
            tasks_client::TasksClient, ListContainersRequest, ListRequest, ListTasksRequest,
        };
        let ch = containerd_client::connect(sock).await?;
        let mut found = Vec::new();
        for c in ContainersClient::new(ch.clone())
            .list(Self::in_ns(
                namespace,
                ListContainersRequest { filters: vec![] },
            ))
            .await?
            .into_inner()
            .containers
        {
            found.push(format!("container {}", c.id));
        }
        for t in TasksClient::new(ch.clone())
            .list(Self::in_ns(
                namespace,
                ListTasksRequest {
                    filter: String::new(),
                },
            ))
            .await?
            .into_inner()
            .tasks
        {
            found.push(format!("task {}", t.id));
        }
        let mut s = SnapshotsClient::new(ch.clone())
            .list(Self::in_ns(
                namespace,
                ListSnapshotsRequest {
                    snapshotter: "overlayfs".into(),
                    filters: vec![],
                },
            ))
            .await?
            .into_inner();
        while let Some(m) = s.message().await? {
            // Kind 3 = committed (image layers).
            found.extend(
                m.info
                    .into_iter()
                    .filter(|i| i.kind != 3)
                    .map(|i| format!("snapshot {}", i.name)),
            );
        }
        for l in LeasesClient::new(ch)
            .list(Self::in_ns(namespace, ListRequest { filters: vec![] }))
            .await?
            .into_inner()
            .leases
        {
            found.push(format!("lease {}", l.id));
        }
        Ok(found)
    }

    /// containerd containers, tasks, snapshots and leases that mention any
    /// of `ids` (by ID or key).
    pub async fn leftovers(&self, ids: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .all_objects(&self.namespace)
            .await?
            .into_iter()
            .filter(|f| ids.iter().any(|id| f.contains(id)))
            .collect())
    }
}

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
    pub root: PathBuf,
    pub state: PathBuf,
    args: Vec<String>,
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
        let dir = tempfile::Builder::new()
            .prefix("imacri-")
            .tempdir_in(&env.base)?;
        let socket = dir.path().join("imacri.sock");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--config".into(),
            dir.path().join("none.toml").to_string_lossy().into(),
            "--socket".into(),
            socket.to_string_lossy().into(),
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
        std::fs::write(dir.path().join("none.toml"), "")?;
        let mut me = Imacri {
            namespace: namespace.to_string(),
            child: None,
            dir,
            socket,
            root,
            state,
            args,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// Starts (again) the daemon with the same directories.
    pub async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("imacri.log"))?;
        let child = Command::new(imacri_bin())
            .args(&self.args)
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("imacri.log")).unwrap_or_default()
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
    }
}

/// A unique pod config for tests running in parallel.
pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    let uid = format!("{name}-{:08x}", rand::random::<u32>());
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: std::env::temp_dir()
            .join("imacri-it-logs")
            .join(&uid)
            .to_string_lossy()
            .into(),
        labels: [("app".to_string(), name.to_string())].into(),
        annotations: [("test".to_string(), "yes".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("container".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// swtpm as the tests run it: TCP server on `port`, control on
/// `port + 1`, state in `dir`, started up (cleared) without a TPM2_Startup.
fn swtpm_command(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("swtpm");
    cmd.args(["socket", "--tpm2", "--server"])
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// A TPM 2.0 simulator (swtpm) of a test's own, on loopback TCP.
pub struct Swtpm {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Swtpm {
    pub fn start(env: &Env) -> Result<Swtpm> {
        let dir = tempfile::Builder::new()
            .prefix("swtpm-")
            .tempdir_in(&env.base)?;
        for _ in 0..20 {
            // Two adjacent free ports (server, control), from a range other
            // tests' ephemeral ports are unlikely to use.
            let port = 20000 + (rand::random::<u16>() % 20000) * 2;
            if TcpListener::bind(("127.0.0.1", port)).is_err()
                || TcpListener::bind(("127.0.0.1", port + 1)).is_err()
            {
                continue;
            }
            let mut child = swtpm_command(port, dir.path())
                .spawn()
                .context("spawning swtpm (apt-get install swtpm swtpm-tools)")?;
            let up = wait_for("swtpm", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })
            .and_then(|()| {
                // Connected to our swtpm, not to someone else's on that port.
                std::thread::sleep(Duration::from_millis(100));
                match child.try_wait() {
                    Ok(None) => Ok(()),
                    _ => Err(anyhow!("swtpm exited")),
                }
            });
            match up {
                Ok(()) => return Ok(Swtpm { child, port, dir }),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        bail!("could not start swtpm on a free port")
    }

    /// Kills the simulator and starts it again on its state and port: the
    /// TPM starts up cleared (a TPM reset, as at a node's reboot).
    pub fn reboot(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let mut cmd = swtpm_command(port, self.dir.path());
        // The old listener may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = cmd.spawn().context("spawning swtpm")?;
            let up = wait_for("swtpm", Duration::from_secs(2), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            std::thread::sleep(Duration::from_millis(100));
            if up.is_ok() && matches!(child.try_wait(), Ok(None)) {
                self.child = child;
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                bail!("swtpm did not restart on port {port}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `imacri attest --socket <d> ARGS`; returns (exit code, stdout, stderr).
pub fn attest(d: &Imacri, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(imacri_bin())
        .arg("attest")
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("running imacri attest");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Builds `integration/go/spdyexec` (a client on moby/spdystream, the SPDY
/// library kubelet's remotecommand uses) with Debian's Go 1.19 in GOPATH
/// mode against Debian's packaged spdystream; returns the binary.
pub fn go_spdyexec(env: &Env) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = env.base.join("spdyexec");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/spdyexec");
            let r = Command::new("/usr/lib/go-1.19/bin/go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", env.base.join("gocache"))
                .output()
                .map_err(|e| {
                    format!("running go (apt-get install golang-1.19-go golang-github-docker-spdystream-dev): {e}")
                })?;
            if !r.status.success() {
                return Err(format!(
                    "building spdyexec: {}",
                    String::from_utf8_lossy(&r.stderr)
                ));
            }
            Ok(out)
        })
        .clone()
        .map_err(|e| anyhow!(e))
}
