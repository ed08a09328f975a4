//! What RunPodSandbox decides before it creates anything: the pod's user
//! namespace (kubelet's mappings or an allocation from imacri's pool) and its
//! `ima` setting (backend, policy). Every rejection names the field.

use imacri_api::cri;
use imacri_runtime::integrity::setting as ima;
use imacri_runtime::pod::ImaState;
use imacri_runtime::userns::{IdMap, Mappings};
use imacri_runtime::{Error, Result};

use super::CriServer;

const NS_FIELD: &str = "linux.security_context.namespace_options";

pub(crate) struct PodPlan {
    /// Mappings from kubelet (Some(false)) or to allocate (None + ima).
    pub userns: Option<Mappings>,
    pub allocate: bool,
    pub ima: Option<ImaState>,
}

fn maps(v: &[cri::IdMapping]) -> Vec<IdMap> {
    v.iter()
        .map(|m| IdMap {
            container_id: m.container_id,
            host_id: m.host_id,
            size: m.length,
        })
        .collect()
}

/// The pod's user namespace request: None = host (NODE or unset).
pub(crate) fn requested_userns(ns: Option<&cri::NamespaceOption>) -> Result<Option<Mappings>> {
    let Some(u) = ns.and_then(|n| n.userns_options.as_ref()) else {
        return Ok(None);
    };
    match cri::NamespaceMode::try_from(u.mode) {
        Ok(cri::NamespaceMode::Node) => Ok(None),
        Ok(cri::NamespaceMode::Pod) => {
            let m = Mappings {
                uids: maps(&u.uids),
                gids: maps(&u.gids),
            };
            m.validate(&format!("{NS_FIELD}.userns_options"))?;
            Ok(Some(m))
        }
        _ => Err(Error::InvalidArgument(format!(
            "{NS_FIELD}.userns_options.mode must be POD or NODE"
        ))),
    }
}

impl CriServer {
    pub(crate) fn plan_pod(&self, config: &cri::PodSandboxConfig) -> Result<PodPlan> {
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        let nso = sc.namespace_options.as_ref();
        let userns = requested_userns(nso)?;
        let wants_ima = ima::requested(sc.ima, &config.annotations)?;
        // The node's rule for the pod's namespace decides what annotations
        // cannot: whether it must be an ima pod, and which policies it may
        // have.
        let ns = config
            .metadata
            .as_ref()
            .map_or("", |m| m.namespace.as_str());
        let rule = self.cfg.ima.namespace_rule(ns);
        if let Some((name, _)) = rule.filter(|(_, r)| r.require && !wants_ima) {
            return Err(Error::PermissionDenied(format!(
                "pods of namespace {ns:?} must be ima pods (imacri's config: \
                 [ima.namespaces.{name:?}] require = true): set the annotation {}: \"true\"",
                ima::ANNOTATION
            )));
        }
        let node = cri::NamespaceMode::Node as i32;
        let (net, pid, ipc) = nso.map_or((0, 0, 0), |n| (n.network, n.pid, n.ipc));
        if userns.is_some() && net == node {
            return Err(Error::InvalidArgument(format!(
                "{NS_FIELD}.network=NODE cannot be combined with a pod user namespace"
            )));
        }
        if !wants_ima {
            return Ok(PodPlan {
                userns,
                allocate: false,
                ima: None,
            });
        }
        for (field, mode) in [("network", net), ("pid", pid), ("ipc", ipc)] {
            if mode == node {
                return Err(Error::InvalidArgument(format!(
                    "{NS_FIELD}.{field}=NODE is not allowed in an ima pod: it would step outside the pod's measurement"
                )));
            }
        }
        if sc.privileged {
            return Err(Error::InvalidArgument(
                "linux.security_context.privileged is not allowed in an ima pod".into(),
            ));
        }
        // userns_options.mode NODE is what kubelet sends for every pod
        // without `hostUsers: false`, so it cannot mean "insist on the host's
        // user namespace": an ima pod then gets one from imacri's pool.
        let allowed = rule.map_or(&[][..], |(_, r)| r.policies.as_slice());
        let policy = config
            .annotations
            .get(ima::POLICY_ANNOTATION)
            .or(allowed.first())
            .cloned()
            .unwrap_or_else(|| self.cfg.ima.default_policy.clone());
        if let Some((name, _)) = rule.filter(|_| !allowed.is_empty() && !allowed.contains(&policy))
        {
            return Err(Error::PermissionDenied(format!(
                "annotation {}={policy:?}: pods of namespace {ns:?} may have only the policies \
                 {allowed:?} (imacri's config: [ima.namespaces.{name:?}] policies)",
                ima::POLICY_ANNOTATION
            )));
        }
        let Some(p) = self.cfg.ima.policies.get(&policy) else {
            return Err(Error::InvalidArgument(format!(
                "annotation {}={policy:?}: no such policy in the config (have: {})",
                ima::POLICY_ANNOTATION,
                self.cfg
                    .ima
                    .policies
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        // Fails (FailedPrecondition) before anything is created.
        let backend = ima::resolve_backend(self.cfg.ima.backend, &self.ima_node)?;
        if backend == ima::Backend::Fanotify {
            // A missing or malformed allowlist fails the pod now, not its containers.
            self.load_allowlist(&policy)?;
        }
        Ok(PodPlan {
            allocate: userns.is_none(),
            userns,
            ima: Some(ImaState {
                backend: backend.to_string(),
                policy,
                mode: p.mode,
            }),
        })
    }

    /// The lowest free 65536-ID range of the pool. Call with `userns_lock`
    /// held until the pod's record is stored.
    pub(crate) fn allocate_userns(&self) -> Result<Mappings> {
        let pool = self.cfg.ima.userns_pool;
        let used: std::collections::HashSet<u32> = self
            .sandboxes
            .all()
            .iter()
            .filter_map(|s| s.state().userns.filter(|u| u.allocated))
            .filter_map(|u| u.mappings.uids.first().map(|m| m.host_id))
            .collect();
        (0..pool.count)
            .map(|i| pool.start + i * 65536)
            .find(|start| !used.contains(start))
            .map(|start| Mappings::range(start, 65536))
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "the user-namespace pool ({} ranges from {}) is exhausted; raise ima.userns_pool.count",
                    pool.count, pool.start
                ))
            })
    }
}
