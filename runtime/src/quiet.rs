//! Memory a pod's thread freed, given back once the thread is quiet.
//!
//! imacri's allocator (chosen by the binary: mimalloc) gives each thread
//! pages of its own, so no thread waits on a lock another thread holds: a
//! pod's threads run in the pod's CPU cgroup and are stopped wherever they
//! are when it reaches its limit. The price is that a page holds on to what
//! was freed into it, by its own thread or by others, until its thread
//! allocates again, and a pod's reader or listener may then sit in `poll`
//! for hours with a dozen partly used pages (~80 KiB a thread, measured).
//! So a thread that worked and then had nothing to do for [`QUIET`] asks
//! the allocator to collect its pages (the binary's hook; nothing without
//! one, as in tests). Once per quiet spell, not per event.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a thread waits without events before it gives memory back.
pub const QUIET: Duration = Duration::from_secs(1);

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets what collecting the calling thread's freed memory is (once, at
/// start).
pub fn set_collect(f: fn()) {
    let _ = HOOK.set(f);
}

/// A polling thread's record of when it last worked.
#[derive(Debug, Default)]
pub struct Quiet {
    /// When the thread last worked, if it has since it last collected.
    worked: Option<Instant>,
}

impl Quiet {
    /// The thread handled something.
    pub fn worked(&mut self) {
        self.worked = Some(Instant::now());
    }

    /// How long the thread may wait for its next event: `wanted` (None:
    /// for ever), shortened to when it will have been quiet long enough.
    pub fn wait(&self, wanted: Option<Duration>) -> Option<Duration> {
        let Some(at) = self.worked else {
            return wanted;
        };
        let left = QUIET.saturating_sub(at.elapsed());
        Some(wanted.map_or(left, |w| w.min(left)))
    }

    /// [`Self::wait`] as `poll`'s timeout (rounded up to milliseconds).
    pub fn poll_timeout(&self, wanted: Option<Duration>) -> nix::poll::PollTimeout {
        match self.wait(wanted) {
            None => nix::poll::PollTimeout::NONE,
            Some(d) => {
                let ms = d.as_micros().div_ceil(1000).min(u128::from(u16::MAX));
                nix::poll::PollTimeout::from(ms as u16)
            }
        }
    }

    /// After a wait: collects if the thread has been quiet long enough.
    /// True when it did.
    pub fn collect_if_quiet(&mut self) -> bool {
        match self.worked {
            Some(at) if at.elapsed() >= QUIET => {
                self.worked = None;
                if let Some(f) = HOOK.get() {
                    f();
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_collects_once_per_quiet_spell() {
        let mut q = Quiet::default();
        // Never worked: waits as it wants, collects nothing.
        assert_eq!(q.wait(None), None);
        assert_eq!(
            q.wait(Some(Duration::from_millis(10))),
            Some(Duration::from_millis(10))
        );
        assert!(!q.collect_if_quiet());
        q.worked();
        // Worked: wakes up by the end of the quiet spell at the latest.
        assert!(q.wait(None).is_some_and(|w| w <= QUIET));
        assert_eq!(
            q.wait(Some(Duration::from_millis(10))),
            Some(Duration::from_millis(10))
        );
        assert!(!q.collect_if_quiet(), "not quiet long enough yet");
        q.worked = Some(Instant::now() - QUIET);
        assert_eq!(q.wait(None), Some(Duration::ZERO));
        assert!(q.collect_if_quiet());
        // Once: then it waits for ever again.
        assert!(!q.collect_if_quiet());
        assert_eq!(q.wait(None), None);
    }
}
