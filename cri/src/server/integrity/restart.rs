//! After a restart: what the last imacri left with the fd keeper taken
//! back, running containers measured again (or their gap logged).

use imacri_runtime::integrity::fanotify::{self, Watch};
use imacri_runtime::integrity::kept::Kept;
use imacri_runtime::integrity::log::Event;
use imacri_runtime::integrity::mapguard;
use std::collections::HashMap;

use super::super::CriServer;
use super::is_fanotify;

impl CriServer {
    /// After recovery: answer the map-guard listeners the last imacri left
    /// with the fd keeper.
    pub(crate) fn adopt_kept_listeners(&self, kept: Vec<mapguard::KeptListener>) {
        if let (Some(m), Some(e)) = (&self.integrity.mapguard, &self.integrity.engine) {
            let n = m.adopt(e, kept);
            if n > 0 {
                tracing::info!(listeners = n, "map guard: kept listeners adopted");
            }
        }
    }

    /// What the last imacri left with the fd keeper: its fanotify groups by
    /// container, and its seccomp listeners by key.
    pub(crate) fn kept_fds(&self) -> Kept {
        let Some(k) = self.integrity.keeper() else {
            return Kept::default();
        };
        match k.all() {
            Ok(all) => {
                let kept = Kept::sort(all);
                for (ctr, g) in &kept.groups {
                    k.remember(&Kept::group_key(ctr), std::os::fd::AsFd::as_fd(&g.group));
                }
                kept
            }
            Err(e) => {
                tracing::error!(error = %e, "the fd keeper did not answer: running ima containers get a gap");
                Kept::default()
            }
        }
    }

    /// After recovery: groups of containers that are gone are let go.
    pub(crate) fn release_groups(&self, left: HashMap<String, fanotify::KeptGroup>) {
        if let Some(k) = self.integrity.keeper() {
            for ctr in left.keys() {
                let _ = k.drop_key(&Kept::group_key(ctr));
            }
        }
    }

    /// After a restart: measure running containers again. With the group
    /// the keeper kept, nothing ran unmeasured (its executions waited):
    /// `(watch, true)`. Otherwise the container is marked anew and the gap
    /// is logged: `(watch, false)`.
    pub(crate) async fn remeasure_after_restart(
        &self,
        pod: &str,
        ctr: &str,
        pid: u32,
        kept: &mut HashMap<String, fanotify::KeptGroup>,
    ) -> (Option<Watch>, bool) {
        if let Some(fd) = kept.remove(ctr) {
            match self.measure_with(pod, ctr, pid, Some(fd), false).await {
                Ok(w) => return (w, true),
                Err(e) => {
                    tracing::error!(pod_sandbox_id = %pod, container_id = %ctr, error = %e, "cannot take back the kept fanotify group; marking anew");
                    if let Some(k) = self.integrity.keeper() {
                        let _ = k.drop_key(&Kept::group_key(ctr));
                    }
                }
            }
        }
        let measured = async {
            self.own_task(&self.sandbox(pod)?.state(), ctr, pid).await?;
            self.measure_container(pod, ctr, pid).await
        }
        .await;
        match measured {
            Ok(Some(w)) => {
                if let Err(e) =
                    self.integrity
                        .journal
                        .record(pod, ctr, "-", [0; 32], Event::Gap, false)
                {
                    tracing::error!(container_id = %ctr, error = %e, "recording the measurement gap");
                }
                (Some(w), false)
            }
            Ok(None) => (None, false),
            Err(e) => {
                tracing::error!(pod_sandbox_id = %pod, container_id = %ctr, error = %e, "cannot measure a running ima container after restart");
                (None, false)
            }
        }
    }

    /// With `ima.fail_mode = "closed"`, containers of fanotify-measured pods
    /// found running at start are killed.
    pub(crate) fn must_kill_unmeasured(&self, pod: &str) -> bool {
        self.cfg.ima.fail_mode == imacri_runtime::config::FailMode::Closed
            && self
                .sandboxes
                .get(pod)
                .is_some_and(|sb| is_fanotify(&sb.state()))
    }
}
