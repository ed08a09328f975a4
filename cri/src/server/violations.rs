//! What the measurement engine notices (violations, a container whose
//! measurement stopped) becomes log warnings and CRI events
//! (`IMA_VIOLATION_EVENT`), and a container that must not run on is killed.
//!
//! A pod can make violations as fast as it can make system calls (a loop
//! of refused executions): each is in the measurement log only once (it is
//! deduplicated and held to the pod's quota there), and here each
//! container gets a budget of [`BURST`] warnings and events, refilled at
//! [`PER_SECOND`]; what is over it is counted and said with the next one
//! that is reported (`unreported`), so a flood neither buries the node's
//! log nor floods kubelet's event stream, and nothing goes unsaid.

use imacri_api::cri;
use imacri_runtime::integrity::engine::Notice;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::CriServer;

/// Violations of one container reported at once before the rate applies.
pub(crate) const BURST: f64 = 20.0;
/// Violations of one container reported per second past the burst.
pub(crate) const PER_SECOND: f64 = 1.0;
/// Budgets untouched this long are forgotten (full again anyway).
const FORGET_AFTER: Duration = Duration::from_secs(60);

struct Budget {
    tokens: f64,
    at: Instant,
    unreported: u64,
}

/// Per-container budgets of reported violations (a token bucket each).
#[derive(Default)]
pub(crate) struct Budgets {
    by_container: HashMap<String, Budget>,
    swept: Option<Instant>,
}

impl Budgets {
    /// Whether a violation of `container` at `now` is reported, with how
    /// many before it were not; None when it is over the budget (counted).
    pub(crate) fn take(&mut self, container: &str, now: Instant) -> Option<u64> {
        self.sweep(now);
        let b = self
            .by_container
            .entry(container.to_string())
            .or_insert(Budget {
                tokens: BURST,
                at: now,
                unreported: 0,
            });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * PER_SECOND).min(BURST);
        b.at = now;
        if b.tokens < 1.0 {
            b.unreported += 1;
            return None;
        }
        b.tokens -= 1.0;
        Some(std::mem::take(&mut b.unreported))
    }

    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < FORGET_AFTER)
        {
            return;
        }
        self.swept = Some(now);
        // A budget with violations unreported stays until one is reported.
        self.by_container
            .retain(|_, b| b.unreported > 0 || now.saturating_duration_since(b.at) < FORGET_AFTER);
    }
}

impl CriServer {
    /// Turns violation notices into log warnings and CRI events, and kills
    /// a container whose measurement stopped.
    pub(crate) fn start_notice_consumer(
        self: &Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    ) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut budgets = Budgets::default();
            while let Some(n) = rx.recv().await {
                let Some(s) = weak.upgrade() else { return };
                if n.stopped {
                    // A violation that kills (a tomtou under enforce) is
                    // also reported as one (once: the container is killed);
                    // a reader that stopped is not.
                    if n.denied {
                        tracing::warn!(pod_sandbox_id = %n.pod, container_id = %n.container, path = %n.path, reason = %n.reason, "ima violation: the container is killed");
                        s.emit(cri::ContainerEventType::ImaViolationEvent, &n.container);
                    }
                    s.kill_unmeasured(&n.container, &n.reason).await;
                    continue;
                }
                let Some(unreported) = budgets.take(&n.container, Instant::now()) else {
                    continue;
                };
                tracing::warn!(
                    pod_sandbox_id = %n.pod,
                    container_id = %n.container,
                    path = %n.path,
                    digest = %n.digest,
                    denied = n.denied,
                    reason = %n.reason,
                    unreported,
                    "ima violation"
                );
                s.emit(cri::ContainerEventType::ImaViolationEvent, &n.container);
            }
        });
    }
}

impl CriServer {
    /// Kills a container whose measurement stopped (reason ImaUnmeasured):
    /// it never runs on unmeasured.
    async fn kill_unmeasured(&self, ctr: &str, why: &str) {
        let Some(c) = self.containers.get(ctr) else {
            return;
        };
        let _ = c.update(|s| {
            s.reason = "ImaUnmeasured".into();
            s.message = format!("killed: its measurement stopped ({why})");
        });
        if let Err(e) = self.c.kill_task(ctr, "", super::lifecycle::SIGKILL).await {
            tracing::error!(container_id = %ctr, error = %e, "killing an unmeasured container");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_reported_at_the_rate_and_says_what_it_left_out() {
        let mut b = Budgets::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for _ in 0..BURST as usize {
            assert_eq!(b.take("a", t0), Some(0));
        }
        for _ in 0..50 {
            assert_eq!(b.take("a", t0), None);
        }
        // Another container has its own budget.
        assert_eq!(b.take("b", t0), Some(0));
        // Half a token back: still over.
        assert_eq!(b.take("a", at(500)), None);
        // A token back: reported, with the 51 left out.
        assert_eq!(b.take("a", at(1000)), Some(51));
        assert_eq!(b.take("a", at(1000)), None);
        // Quiet for long enough: the burst again, and nothing left unsaid.
        let later = at(1000) + FORGET_AFTER;
        assert_eq!(b.take("a", later), Some(1));
        for _ in 1..BURST as usize {
            assert_eq!(b.take("a", later), Some(0));
        }
        // Budgets of quiet containers are forgotten.
        assert!(!b.by_container.contains_key("b"));
    }
}
