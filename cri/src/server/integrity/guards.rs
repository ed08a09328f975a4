//! What an ima pod's processes are kept from before its workload runs:
//! the guards of each pid namespace and the pod's user namespace, and the
//! `noexec` seal of pause's rootfs that its containers' starts wait for.

use imacri_runtime::integrity::guard;
use imacri_runtime::pod::SandboxState;
use imacri_runtime::{Error, Result};
use std::sync::Arc;

use super::super::CriServer;

impl CriServer {
    /// Forbids what measurement cannot see (memfd execution, nested user
    /// namespaces, the node's pre-opened binfmt_misc interpreters) in the
    /// pid namespace of `pid` and the pod's user namespace, before `pid`
    /// runs anything of the workload. Nothing to do outside ima pods; a
    /// failure fails the start (closed, never open).
    pub(crate) async fn guard_process(
        &self,
        st: &SandboxState,
        id: &str,
        pid: u32,
        scope: guard::Scope,
    ) -> Result<()> {
        let (Some(_), Some(u)) = (&st.ima, &st.userns) else {
            return Ok(());
        };
        if st.pid != 0 && st.pid != pid && guard::same_pid_namespace(st.pid, pid) {
            // pid POD: pause's namespace, guarded when the pod started (and
            // the user namespace's setting is the pod's).
            return Ok(());
        }
        let userns = u.path.clone();
        tokio::task::spawn_blocking(move || guard::apply(pid, &userns, scope))
            .await
            .map_err(|e| Error::Internal(format!("guard task: {e}")))??;
        tracing::debug!(
            id,
            pid,
            ?scope,
            "ima guards set: vm.memfd_noexec=2, user.max_user_namespaces=0 (and for the pod its own binfmt_misc)"
        );
        Ok(())
    }

    /// In an ima pod, the task imacri was given (init `pid`) must be the
    /// container's own, its root the overlay prepared for it, before its
    /// guards are set or its filesystem marked: a runtime reporting another
    /// process as the task (a VM's, a sandbox's) would have the guards
    /// written into a host namespace and a host filesystem marked, the
    /// container's own left unwatched. RunPodSandbox refuses the handlers
    /// known to (`sysinfo::ima_runtime`); this is the check of what each
    /// task is.
    pub(crate) async fn own_task(&self, st: &SandboxState, ctr: &str, pid: u32) -> Result<()> {
        if st.ima.is_none() {
            return Ok(());
        }
        let (ns, id) = (self.cfg.containerd.namespace.clone(), ctr.to_string());
        // mountinfo is read whole: off the async threads, whatever its size.
        tokio::task::spawn_blocking(move || {
            imacri_runtime::integrity::overlay::is_containers_root(pid, &ns, &id)
        })
        .await
        .map_err(|e| Error::Internal(format!("task check: {e}")))?
        .map_err(|why| {
            Error::FailedPrecondition(format!(
                "container {ctr} cannot be measured: its task's root is not the rootfs imacri prepared for it ({why}); its runtime does not run it as runc does"
            ))
        })
    }

    /// In an ima pod, pause's rootfs becomes `noexec` once pause runs:
    /// nothing may execute from it through `/proc/1/root` unmeasured.
    async fn seal_pause(&self, st: &SandboxState, id: &str, pid: u32) -> Result<()> {
        if st.ima.is_none() {
            return Ok(());
        }
        if imacri_runtime::crash::hook("IMACRI_TEST_SEAL_FAIL").is_some() {
            // Test only: the seal's failure path (it needs a broken kernel).
            return Err(Error::Internal("IMACRI_TEST_SEAL_FAIL is set".into()));
        }
        tokio::task::spawn_blocking(move || guard::seal_root_noexec(pid))
            .await
            .map_err(|e| Error::Internal(format!("seal task: {e}")))??;
        tracing::debug!(pod_sandbox_id = %id, "pause rootfs sealed noexec");
        Ok(())
    }

    /// As [`seal_pause`], in the background: it waits for pause to settle
    /// (a millisecond or two) while kubelet creates the pod's containers;
    /// [`sealed`] holds their starts until it is done.
    pub(crate) fn seal_pause_later(self: &Arc<Self>, st: &SandboxState, id: &str, pid: u32) {
        if st.ima.is_none() {
            return;
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        if let Ok(mut m) = self.integrity.seals.lock() {
            m.insert(id.to_string(), rx);
        }
        let (me, st, id) = (self.clone(), st.clone(), id.to_string());
        tokio::spawn(async move {
            let res = me.seal_pause(&st, &id, pid).await;
            if let Err(e) = &res {
                tracing::error!(pod_sandbox_id = %id, error = %e, "sealing the pause rootfs failed: the pod's containers will not start");
            }
            let _ = tx.send(Some(res.map_err(|e| e.to_string())));
        });
    }

    /// Waits for the pod's pause rootfs seal, if one was started by this
    /// imacri (recovery seals synchronously); its failure refuses the start.
    pub(crate) async fn sealed(&self, pod: &str) -> Result<()> {
        let rx = self
            .integrity
            .seals
            .lock()
            .ok()
            .and_then(|m| m.get(pod).cloned());
        let Some(mut rx) = rx else { return Ok(()) };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.clone())
            .map_err(|_| Error::Internal("the pause rootfs seal task ended".into()))?;
        match outcome {
            Some(Err(e)) => Err(Error::FailedPrecondition(format!(
                "the pause rootfs of ima pod {pod} could not be made noexec, so its containers cannot start: {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// Forgets what imacri keeps for a pod that is removed (or whose start
    /// failed): its seal and its journal bookkeeping (its entries stay in
    /// the log, found where they lie while it is still quotable); and
    /// where the entries of pods no longer quotable lie.
    pub(crate) fn forget_pod(&self, pod: &str) {
        if let Ok(mut m) = self.integrity.seals.lock() {
            m.remove(pod);
        }
        let (journal, retained) = (&self.integrity.journal, &self.integrity.retained);
        let now = imacri_runtime::ids::now_nanos() / 1_000_000_000;
        match retained.get(pod, now) {
            Some(_) => journal.retire(pod),
            None => journal.forget(pod),
        }
        for gone in retained.take_expired() {
            journal.forget(&gone);
        }
    }
}
