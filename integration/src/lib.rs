//! Test environment for end-to-end tests: a private containerd (CRI plugin
//! disabled), Debian's docker-registry on free loopback ports (one anonymous,
//! one with htpasswd auth), test images built from busybox-static and pushed
//! with skopeo, and imacri daemons started per test. Nothing here is a mock.

pub mod attesting;
pub mod cleanup;
pub mod client;
mod containerd;
pub mod critest;
pub mod cuts;
mod daemon;
pub mod escapes;
mod fixtures;
pub mod images;
pub mod kubelet;
pub mod peers;
pub mod poll;
pub mod registry;
pub mod runner;
mod swtpm;
pub mod token_service;

pub use containerd::{restart_containerd, start_containerd, start_containerd_pid};
pub use daemon::{
    at_open_file_limit, attest, attest_at, golden_from_registry, imacri_bin, keeper_pids_of,
    kill_keeper_of, Imacri,
};
pub use fixtures::{
    container_config, kubelet_tmpfs_volume, kubelet_volume, own_pids, pod_config, pod_userns,
    security_context,
};
pub use peers::go_spdyexec;
pub use swtpm::{EkCa, Swtpm};

use anyhow::{anyhow, Result};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::Channel;

use registry::{make_certs, start_registry, start_registry_tls};

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
pub(crate) fn spawn_service(mut cmd: Command) -> Result<u32> {
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

pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    poll::eventually_blocking(what, timeout, || ready().then_some(()))
}

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("integration tests need root (containerd, runc, mounts): run them as root, e.g. via `make test`");
    }
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
