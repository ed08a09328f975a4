//! NRI plugins against imacri, each built on upstream's plugin stub
//! (github.com/containerd/nri v0.12.5, `integration/go/nriplugin`): plugins
//! imacri starts and plugins that connect, events in order, adjustments seen
//! inside the container, plugins that crash or hang, unsolicited updates,
//! and the lockdown: what `confine-only` refuses, `all` allows, and what no
//! rule allows in an ima pod.

use imacri_integration::client::{container_status, create_container, sh_ok, start_container};
use imacri_integration::{container_config, cri, peers, pod_config, security_context, Env, Imacri};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tonic::Code;

mod events;
mod failing;
mod policy;

struct Nri {
    dir: tempfile::TempDir,
    socket: PathBuf,
    plugins: Vec<Child>,
}

impl Drop for Nri {
    fn drop(&mut self) {
        for p in &mut self.plugins {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Nri {
    fn new(env: &Env) -> Nri {
        let dir = tempfile::Builder::new()
            .prefix("nri-")
            .tempdir_in(&env.base)
            .unwrap();
        for d in ["plugins", "conf.d"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let socket = dir.path().join("nri.sock");
        Nri {
            dir,
            socket,
            plugins: Vec::new(),
        }
    }

    fn events(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.events"))
    }

    /// The `[nri]` section; `rules` adds `[nri.plugins."..."]` tables.
    fn config(&self, rules: &str) -> String {
        format!(
            "[nri]\nenable = true\nsocket_path = {:?}\nplugin_path = {:?}\nplugin_config_path = {:?}\nplugin_request_timeout_ms = 1500\nplugin_registration_timeout_ms = 1000\n{rules}",
            self.socket,
            self.dir.path().join("plugins"),
            self.dir.path().join("conf.d"),
        )
    }

    /// A plugin imacri starts itself, configured from conf.d.
    fn install(&self, env: &Env, name: &str, config: &Value) {
        let bin = peers::nriplugin(env).unwrap();
        std::fs::copy(&bin, self.dir.path().join("plugins").join(name)).unwrap();
        std::fs::write(
            self.dir.path().join("conf.d").join(format!("{name}.conf")),
            config.to_string(),
        )
        .unwrap();
    }

    fn stop_last(&mut self) {
        if let Some(mut p) = self.plugins.pop() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// A plugin that connects to the socket on its own.
    fn connect(&mut self, env: &Env, idx: &str, name: &str, config: &Value) {
        let bin = peers::nriplugin(env).unwrap();
        let log = std::fs::File::create(self.dir.path().join(format!("{idx}-{name}.log"))).unwrap();
        let child = Command::new(bin)
            .args(["-idx", idx, "-name", name, "-socket"])
            .arg(&self.socket)
            .arg("-config")
            .arg(config.to_string())
            .stderr(log)
            .spawn()
            .unwrap();
        self.plugins.push(child);
        wait_for(&self.events(name), "Synchronize");
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn wait_for(p: &Path, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = lines(p);
        if l.iter().any(|x| x.starts_with(what)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never came in {}: {l:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn runtime_spec(rt: &mut imacri_integration::client::Rt, id: &str) -> Value {
    imacri_integration::client::container_info(rt, id).await["runtimeSpec"].clone()
}
