//! RunPodSandbox: netns, /etc files, shm, and the pause container. A failure
//! at any step tears down everything made so far.

use imacri_api::cri;
use imacri_runtime::containerd::NewContainer;
use imacri_runtime::ids::{new_id, now_nanos};
use imacri_runtime::pod::{SandboxPhase, SandboxState};
use imacri_runtime::{spec, Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::lifecycle::Kind;
use super::validate::{handler, sandbox_metadata, sandbox_name};
use super::{CriServer, LABEL_KIND, LABEL_SANDBOX_ID};

/// /dev/shm size of a pod (as containerd's default).
const SHM_SIZE: u64 = 64 * 1024 * 1024;

fn write(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).map_err(|e| Error::io("writing", path, e))
}

fn resolv_conf(dns: Option<&cri::DnsConfig>) -> Result<String> {
    match dns {
        Some(d) if !d.servers.is_empty() || !d.searches.is_empty() || !d.options.is_empty() => {
            let mut s = String::new();
            if !d.searches.is_empty() {
                s += &format!("search {}\n", d.searches.join(" "));
            }
            for n in &d.servers {
                s += &format!("nameserver {n}\n");
            }
            if !d.options.is_empty() {
                s += &format!("options {}\n", d.options.join(" "));
            }
            Ok(s)
        }
        // No DNS config: the node's, as containerd does.
        _ => std::fs::read_to_string("/etc/resolv.conf")
            .or_else(|_| Ok::<_, std::io::Error>(String::new()))
            .map_err(|e| Error::io("reading", "/etc/resolv.conf", e)),
    }
}

fn hosts_file(hostname: &str) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        s += &format!("127.0.1.1\t{hostname}\n");
    }
    s
}

impl CriServer {
    pub(crate) async fn run_pod_sandbox(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<cri::RunPodSandboxResponse> {
        let config = req
            .config
            .ok_or_else(|| Error::InvalidArgument("config is required".into()))?;
        sandbox_metadata(&config)?;
        handler(&req.runtime_handler)?;
        let linux = config.linux.clone().unwrap_or_default();
        let sc = linux.security_context.clone().unwrap_or_default();
        if sc
            .namespace_options
            .as_ref()
            .and_then(|n| n.userns_options.as_ref())
            .is_some_and(|u| u.mode == cri::NamespaceMode::Pod as i32)
        {
            return Err(Error::FailedPrecondition(
                "linux.security_context.namespace_options.userns_options mode POD: user namespaces are not supported by this imacri version".into(),
            ));
        }
        if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "config.log_directory {:?} must be absolute",
                config.log_directory
            )));
        }
        let (net_mode, _, ipc_mode) = spec::ns_mode(sc.namespace_options.as_ref());
        let host_net = net_mode == cri::NamespaceMode::Node as i32;
        let host_ipc = ipc_mode == cri::NamespaceMode::Node as i32;
        if !host_net && config.hostname.is_empty() {
            return Err(Error::InvalidArgument(
                "config.hostname is required unless the pod uses the host network".into(),
            ));
        }
        let image = self.images.get(&self.sandbox_image).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "sandbox image {} is not present; pull it first",
                self.sandbox_image
            ))
        })?;

        let id = new_id();
        let name = sandbox_name(&config);
        self.sandboxes.reserve(&name, &id)?;
        let dir = self.cfg.state.join("sandboxes").join(&id);
        let netns_path = (!host_net).then(|| self.cfg.netns_dir().join(&id));
        let entry = self.sandboxes.insert(
            &id,
            &name,
            config.clone(),
            SandboxState {
                phase: SandboxPhase::Creating,
                created_at: now_nanos(),
                runtime_handler: req.runtime_handler.clone(),
                pid: 0,
                netns: netns_path.clone(),
                image_id: image.id.clone(),
                image_name: self.sandbox_image.clone(),
                dir: dir.clone(),
                shm: !host_ipc,
            },
        );
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                self.sandboxes.release(&name, &id);
                return Err(e);
            }
        };
        let _op = entry.op.lock().await;
        let res = self
            .start_sandbox(&id, &config, &image, &dir, host_net, host_ipc)
            .await;
        match res {
            Ok(pid) => {
                entry.update(|s| {
                    s.phase = SandboxPhase::Ready;
                    s.pid = pid;
                })?;
                tracing::info!(pod_sandbox_id = %id, name = %name, pid, "sandbox ready");
                Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
            }
            Err(e) => {
                if let Err(te) = self
                    .teardown_sandbox(&id, &dir, netns_path.as_deref())
                    .await
                {
                    tracing::error!(pod_sandbox_id = %id, error = %te, "rollback failed");
                }
                let _ = self.sandboxes.remove(&id);
                Err(e)
            }
        }
    }

    async fn start_sandbox(
        self: &Arc<Self>,
        id: &str,
        config: &cri::PodSandboxConfig,
        image: &imacri_runtime::image::ImageRecord,
        dir: &Path,
        host_net: bool,
        host_ipc: bool,
    ) -> Result<u32> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let netns: Option<PathBuf> = if host_net {
            None
        } else {
            Some(imacri_runtime::netns::create(&self.cfg.netns_dir(), id)?)
        };
        let hostname = if host_net {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            config.hostname.clone()
        };
        write(&dir.join("hostname"), &format!("{hostname}\n"))?;
        let hosts = if host_net {
            std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| hosts_file(&hostname))
        } else {
            hosts_file(&hostname)
        };
        write(&dir.join("hosts"), &hosts)?;
        write(
            &dir.join("resolv.conf"),
            &resolv_conf(config.dns_config.as_ref())?,
        )?;
        if !host_ipc {
            imacri_runtime::mount::mount_shm(&dir.join("shm"), SHM_SIZE)?;
        }

        let spec = spec::sandbox_spec(id, config, &image.config, netns.as_deref(), self.limits)?;
        let snapshotter = self.cfg.containerd.snapshotter.clone();
        let lease = self.c.lease("sandbox").await?;
        let created = async {
            let mounts = self
                .c
                .prepare_snapshot(&snapshotter, id, &image.chain_id, &lease)
                .await?;
            let mut labels: HashMap<String, String> = config.labels.clone();
            labels.insert(LABEL_KIND.into(), "sandbox".into());
            labels.insert(LABEL_SANDBOX_ID.into(), id.into());
            self.c
                .create_container(
                    NewContainer {
                        id,
                        image: &self.sandbox_image,
                        labels,
                        spec: &spec,
                        snapshotter: &snapshotter,
                        runtime: &self.cfg.containerd.runtime,
                    },
                    &lease,
                )
                .await?;
            Ok::<_, Error>(mounts)
        }
        .await;
        // The container record holds the snapshot now; the lease can go.
        let _ = lease.delete(&self.c, false).await;
        let mounts = created?;
        let stdio = imacri_runtime::io::StdioPaths::default();
        self.c.create_task(id, mounts, &stdio).await?;
        self.watch_exit(id, Kind::Sandbox);
        self.c.start_task(id, "").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let d = cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d)).unwrap(),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_has_localhost_and_hostname() {
        let h = hosts_file("pod-a");
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("127.0.1.1\tpod-a\n"));
    }
}
