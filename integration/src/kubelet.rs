//! A standalone kubelet (no API server) on imacri: static pods from a
//! manifest directory, the cgroupfs driver, its API on loopback with
//! anonymous access. Built from k8s.io/kubernetes by `scripts/test-tools.sh`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, Env, Imacri};

pub use crate::poll::eventually_blocking as eventually;

pub const KUBELET_VERSION: &str = "v1.37.2";

pub fn kubelet_bin(cache: &Path) -> PathBuf {
    cache.join(format!("kubelet-{KUBELET_VERSION}/kubelet"))
}

pub struct Kubelet {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub manifests: PathBuf,
    /// HTTPS API (self-signed certificate), anonymous, AlwaysAllow.
    pub port: u16,
    /// Plain-HTTP read-only API (/pods).
    pub read_only_port: u16,
    args: Vec<String>,
    bin: PathBuf,
}

/// The kubelet configuration for this machine: cgroup v1 allowed, no QoS
/// cgroups or allocatable enforcement (the test must not reshape the host's
/// cgroup tree), no swap check, fast manifest and sync loops, image GC and
/// disk eviction out of the way of the shared test images.
fn config(d: &Imacri, dir: &Path, port: u16, ro: u16, healthz: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: {ro}
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
staticPodPath: {manifests}
fileCheckFrequency: 1s
syncFrequency: 5s
containerRuntimeEndpoint: unix://{sock}
imageServiceEndpoint: unix://{sock}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
podLogsDir: {logs}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
serializeImagePulls: false
resolvConf: /etc/resolv.conf
"#,
        manifests = dir.join("manifests").display(),
        sock = d.socket.display(),
        logs = dir.join("pod-logs").display(),
    )
}

impl Kubelet {
    pub fn start(env: &Env, d: &Imacri, cache: &Path) -> Result<Kubelet> {
        let dir = tempfile::Builder::new()
            .prefix("kubelet-")
            .tempdir_in(&env.base)?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests)?;
        std::fs::create_dir_all(dir.path().join("pod-logs"))?;
        let (port, ro, healthz) = (free_port(), free_port(), free_port());
        let cfg = dir.path().join("kubelet.yaml");
        std::fs::write(&cfg, config(d, dir.path(), port, ro, healthz))?;
        let args = vec![
            format!("--config={}", cfg.display()),
            format!("--root-dir={}", dir.path().join("root").display()),
            format!("--cert-dir={}", dir.path().join("pki").display()),
            "--hostname-override=imacri-test-node".to_string(),
            "--v=2".to_string(),
        ];
        let mut k = Kubelet {
            child: None,
            dir,
            manifests,
            port,
            read_only_port: ro,
            args,
            bin: kubelet_bin(cache),
        };
        k.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if k.get_ro("/healthz").is_ok() {
                return Ok(k);
            }
            if let Some(c) = k.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("kubelet exited with {st}: {}", k.log_tail(4000));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("kubelet not healthy after 60s: {}", k.log_tail(4000))
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kubelet.log"))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default();
        s[s.len().saturating_sub(n)..].to_string()
    }

    /// GET on the read-only port.
    pub fn get_ro(&self, path: &str) -> Result<String> {
        curl(&format!("http://127.0.0.1:{}{path}", self.read_only_port))
    }

    /// GET on the authenticated (here: anonymous) HTTPS API.
    pub fn get(&self, path: &str) -> Result<String> {
        curl(&format!("https://127.0.0.1:{}{path}", self.port))
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The pods kubelet runs, as its /pods API lists them.
    pub fn pods(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get_ro("/pods")?)?)
    }

    /// The status of static pod `name` (namespace default), if kubelet has it.
    pub fn pod(&self, name: &str) -> Option<serde_json::Value> {
        let pods = self.pods().ok()?;
        pods["items"]
            .as_array()?
            .iter()
            .find(|p| {
                p["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n == format!("{name}-imacri-test-node"))
            })
            .cloned()
    }

    pub fn add_manifest(&self, name: &str, yaml: &str) -> Result<()> {
        // Written aside and renamed: kubelet never reads half a file.
        let tmp = self.dir.path().join(format!(".{name}.yaml"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(format!("{name}.yaml")))?;
        Ok(())
    }

    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.manifests.join(format!("{name}.yaml")))?;
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
        crate::cleanup::unmount_under(self.dir.path());
        // kubelet's canary chains (it watches them to notice iptables flushes).
        for table in ["mangle", "nat", "filter"] {
            let _ = Command::new("iptables")
                .args(["-t", table, "-X", "KUBE-KUBELET-CANARY"])
                .output();
        }
        let _ = Command::new("ip6tables")
            .args(["-t", "mangle", "-X", "KUBE-KUBELET-CANARY"])
            .output();
    }
}

fn curl(url: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sSk", "--max-time", "20", "--fail-with-body", url])
        .output()
        .context("curl")?;
    if !out.status.success() {
        bail!(
            "GET {url}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
