//! The events each CRI call sends plugins, in index order. CreateContainer
//! is the one with consequences: every plugin's adjustment is screened by
//! the lockdown and the ima guards, then merged.

use super::plugin::CallError;
use super::{api, merge, policy, Created, Nri, NriError};

impl Nri {
    pub async fn run_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), NriError> {
        let req = api::RunPodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.each(api::Event::RunPodSandbox, |c, ctx| {
            let req = req.clone();
            async move { c.run_pod_sandbox(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn stop_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), NriError> {
        let req = api::StopPodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.each(api::Event::StopPodSandbox, |c, ctx| {
            let req = req.clone();
            async move { c.stop_pod_sandbox(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn remove_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), NriError> {
        let req = api::RemovePodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.each(api::Event::RemovePodSandbox, |c, ctx| {
            let req = req.clone();
            async move { c.remove_pod_sandbox(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn update_pod_sandbox(
        &self,
        pod: &api::PodSandbox,
        resources: Option<api::LinuxResources>,
    ) -> Result<(), NriError> {
        let req = api::UpdatePodSandboxRequest {
            pod: Some(pod.clone()),
            overhead_linux_resources: None,
            linux_resources: resources,
        };
        self.each(api::Event::UpdatePodSandbox, |c, ctx| {
            let req = req.clone();
            async move { c.update_pod_sandbox(ctx, &req).await }
        })
        .await?;
        let req = api::PostUpdatePodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.each(api::Event::PostUpdatePodSandbox, |c, ctx| {
            let req = req.clone();
            async move { c.post_update_pod_sandbox(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    /// Asks every plugin for its adjustment in index order; each passes the
    /// lockdown and the ima guards, then joins the merge.
    pub async fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
        ima: bool,
    ) -> Result<Created, NriError> {
        let _sync = self.inner.sync.read().await;
        let mut view = container.clone();
        let mut merged = merge::Merge::default();
        let mut out = Created::default();
        for p in self.live().await {
            if !p.subscribed(api::Event::CreateContainer) {
                continue;
            }
            let req = api::CreateContainerRequest {
                pod: Some(pod.clone()),
                container: Some(view.clone()),
            };
            let rsp = match p
                .call(|c, ctx| async move { c.create_container(ctx, &req).await })
                .await
            {
                Ok(r) => r,
                Err(CallError::Failed(m)) => {
                    return Err(NriError::Plugin(format!(
                        "NRI plugin {} failed CreateContainer: {m}",
                        p.name()
                    )))
                }
                Err(CallError::Fatal(m)) => {
                    tracing::warn!(plugin = %p.name(), container_id = %container.id, error = %m, "NRI plugin dropped");
                    if p.fail_request() {
                        return Err(NriError::Plugin(format!(
                            "NRI plugin {} failed CreateContainer: {m}",
                            p.name()
                        )));
                    }
                    continue;
                }
            };
            let name = p.name();
            let rule = self.inner.cfg.rule_for(&name, p.uid);
            if let Some(mut adj) = rsp.adjust {
                let ctx = policy::Ctx {
                    plugin: &name,
                    rule,
                    ima,
                    container: &view,
                };
                match policy::screen(&mut adj, &ctx) {
                    Ok(dropped) => {
                        for d in &dropped {
                            tracing::warn!(plugin = %name, container_id = %container.id, field = %d.field, rule = %d.rule, "NRI adjustment dropped");
                        }
                        out.dropped.extend(dropped);
                    }
                    Err(r) => {
                        tracing::warn!(plugin = %name, container_id = %container.id, field = %r.field, rule = %r.rule, "NRI adjustment refused");
                        return Err(NriError::Refused(r.to_string()));
                    }
                }
                merged.add(&name, adj, &mut view)?;
            }
            if !rsp.update.is_empty() {
                self.inner.check_updates(&name, p.uid, &rsp.update)?;
                out.updates.extend(rsp.update);
            }
            if !rsp.evict.is_empty() {
                self.inner.check_updates(&name, p.uid, &[])?;
                out.evictions.extend(rsp.evict);
            }
        }
        // Validator plugins see the whole result, its owners and who was
        // asked, and may reject it; upstream's last word, after ours.
        let plugins = self.live().await;
        let consulted: Vec<api::PluginInstance> = plugins
            .iter()
            .filter(|p| p.subscribed(api::Event::CreateContainer))
            .map(|p| api::PluginInstance {
                name: p.base.clone(),
                index: p.idx.clone(),
            })
            .collect();
        let validators: Vec<_> = plugins
            .iter()
            .filter(|p| p.subscribed(api::Event::ValidateContainerAdjustment))
            .collect();
        if !validators.is_empty() {
            let req = api::ValidateContainerAdjustmentRequest {
                pod: Some(pod.clone()),
                container: Some(container.clone()),
                adjust: Some(merged.adjust.clone()),
                update: out.updates.clone(),
                owners: Some(api::OwningPlugins {
                    owners: [(container.id.clone(), merged.owners())].into(),
                }),
                plugins: consulted,
            };
            for v in validators {
                let req = req.clone();
                let rsp = v
                    .call(|c, ctx| async move { c.validate_container_adjustment(ctx, &req).await })
                    .await;
                match rsp {
                    Ok(r) if !r.reject => {}
                    Ok(r) => {
                        tracing::warn!(plugin = %v.name(), container_id = %container.id, reason = %r.reason, "NRI validator rejected the adjustments");
                        return Err(NriError::Refused(format!(
                            "NRI validator {} rejected the container's adjustments: {}",
                            v.name(),
                            r.reason
                        )));
                    }
                    // A validator that cannot answer fails the request, as
                    // upstream: its policy cannot be skipped by crashing it.
                    Err(CallError::Failed(m)) | Err(CallError::Fatal(m)) => {
                        return Err(NriError::Plugin(format!(
                            "NRI validator {} failed: {m}",
                            v.name()
                        )))
                    }
                }
            }
        }
        out.adjust = merged.adjust;
        Ok(out)
    }

    pub async fn post_create_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::PostCreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.each(api::Event::PostCreateContainer, |cl, ctx| {
            let req = req.clone();
            async move { cl.post_create_container(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn start_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::StartContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.each(api::Event::StartContainer, |cl, ctx| {
            let req = req.clone();
            async move { cl.start_container(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn post_start_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::PostStartContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.each(api::Event::PostStartContainer, |cl, ctx| {
            let req = req.clone();
            async move { cl.post_start_container(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    /// UpdateContainerResources: plugins may change the requested resources
    /// (their updates for this container are merged in) and other containers'.
    pub async fn update_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
        resources: api::LinuxResources,
    ) -> Result<Vec<api::ContainerUpdate>, NriError> {
        let req = api::UpdateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
            linux_resources: Some(resources),
        };
        let rsps = self
            .each(api::Event::UpdateContainer, |cl, ctx| {
                let req = req.clone();
                async move { cl.update_container(ctx, &req).await }
            })
            .await?;
        let mut updates = Vec::new();
        for (p, r) in rsps {
            if !r.update.is_empty() {
                self.inner.check_updates(&p.name(), p.uid, &r.update)?;
                updates.extend(r.update);
            }
        }
        Ok(updates)
    }

    pub async fn post_update_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::PostUpdateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.each(api::Event::PostUpdateContainer, |cl, ctx| {
            let req = req.clone();
            async move { cl.post_update_container(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn stop_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<Vec<api::ContainerUpdate>, NriError> {
        let req = api::StopContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        let rsps = self
            .each(api::Event::StopContainer, |cl, ctx| {
                let req = req.clone();
                async move { cl.stop_container(ctx, &req).await }
            })
            .await?;
        let mut updates = Vec::new();
        for (p, r) in rsps {
            if !r.update.is_empty()
                && self
                    .inner
                    .check_updates(&p.name(), p.uid, &r.update)
                    .is_ok()
            {
                updates.extend(r.update);
            }
        }
        Ok(updates)
    }

    pub async fn remove_container(
        &self,
        pod: &api::PodSandbox,
        c: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::RemoveContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.each(api::Event::RemoveContainer, |cl, ctx| {
            let req = req.clone();
            async move { cl.remove_container(ctx, &req).await }
        })
        .await
        .map(|_| ())
    }
}
