//! Test only: the moments of a call where tests break things.
//! `IMACRI_TEST_CRASH_AT=<what>:<step>` (`RunPodSandbox:task`,
//! `PullImage:fetched`) ends the process there as a crash would: SIGKILL,
//! no clean-up of any kind. `IMACRI_TEST_HOLD_AT=<what>:<step>` holds the
//! first call to reach that step there while the file
//! `IMACRI_TEST_HOLD_FILE` exists (it is made when the step is reached), so
//! that a test can do something at that very moment (restart containerd)
//! and then let the call go on; later calls pass.
//! `IMACRI_TEST_FAIL_AT=<what>:<step>` makes the first call to reach that
//! step fail there (after a hold there), as if what the step did had
//! failed after doing its work: the call's own rollback must undo it.
//! The integration tests do each at every step of the calls that make and
//! unmake things and check what is left (`integration/tests/crash_points.rs`,
//! `containerd_restarts.rs`, `failure_points.rs`).
//!
//! Every `IMACRI_TEST_*` setting of the daemon is read through [`hook`]:
//! a release build reads none, so a production imacri cannot be made to
//! hold, fail, crash, slow down or stall its measurement by its
//! environment, and the hooks' branches are compiled out. The tests run
//! the debug build (`make test`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Hooks {
    crash: Option<(String, String)>,
    hold: Option<(String, String, String)>,
    fail: Option<(String, String)>,
}

/// A test hook's setting: the environment variable `name` in a debug
/// build, never in a release build.
pub fn hook(name: &str) -> Option<String> {
    match cfg!(debug_assertions) {
        true => std::env::var(name).ok(),
        false => None,
    }
}

/// A test hook's setting in milliseconds.
pub fn hook_ms(name: &str) -> Option<Duration> {
    hook(name)?.parse().ok().map(Duration::from_millis)
}

fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    HOOKS.get_or_init(|| {
        let point = |var: &str| {
            let v = hook(var)?;
            let (w, s) = v.split_once(':')?;
            Some((w.to_string(), s.to_string()))
        };
        Hooks {
            crash: point("IMACRI_TEST_CRASH_AT"),
            hold: point("IMACRI_TEST_HOLD_AT")
                .and_then(|(w, s)| Some((w, s, hook("IMACRI_TEST_HOLD_FILE")?))),
            fail: point("IMACRI_TEST_FAIL_AT"),
        }
    })
}

/// Ends the process, or holds the calling thread, if a test asked for it
/// at `what:step`. One environment read per process; comparisons after.
pub fn at(what: &str, step: &str) {
    let h = hooks();
    if h.crash
        .as_ref()
        .is_some_and(|(w, s)| w == what && s == step)
    {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    static HELD: AtomicBool = AtomicBool::new(false);
    let hold = h.hold.as_ref().filter(|(w, s, _)| w == what && s == step);
    if let Some((_, _, file)) = hold.filter(|_| !HELD.swap(true, Ordering::SeqCst)) {
        // A blocking wait on purpose (the steps are reached in sync code):
        // the call stands still at this step. Its runtime thread hands its
        // other tasks over first, so that other calls run meanwhile as they
        // would while this one waited for containerd (a test races them).
        if std::fs::write(file, format!("{what}:{step}")).is_ok() {
            let wait = || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while std::path::Path::new(file).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            match multi_thread {
                true => tokio::task::block_in_place(wait),
                false => wait(),
            }
        }
    }
}

/// `at`, then the failure a test asked for at `what:step` (the first call
/// to get there only; later calls pass, as kubelet's retry would).
pub fn step(what: &str, step: &str) -> crate::Result<()> {
    at(what, step);
    static FAILED: AtomicBool = AtomicBool::new(false);
    let fail = hooks()
        .fail
        .as_ref()
        .is_some_and(|(w, s)| w == what && s == step);
    if fail && !FAILED.swap(true, Ordering::SeqCst) {
        return Err(crate::Error::Internal(format!(
            "{what} made to fail at its step {step} (IMACRI_TEST_FAIL_AT)"
        )));
    }
    Ok(())
}
