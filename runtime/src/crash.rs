//! Test only: the moments of a call where tests break things.
//! `IMACRI_TEST_CRASH_AT=<what>:<step>` (`RunPodSandbox:task`,
//! `PullImage:fetched`) ends the process there as a crash would: SIGKILL,
//! no clean-up of any kind. `IMACRI_TEST_HOLD_AT=<what>:<step>` holds the
//! first call to reach that step there while the file
//! `IMACRI_TEST_HOLD_FILE` exists (it is made when the step is reached), so
//! that a test can do something at that very moment (restart containerd)
//! and then let the call go on; later calls pass. The
//! integration tests do both at every step of the calls that make things
//! and check what is left (`integration/tests/crash_points.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Hooks {
    crash: Option<(String, String)>,
    hold: Option<(String, String, String)>,
}

fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    HOOKS.get_or_init(|| {
        let point = |var: &str| {
            let v = std::env::var(var).ok()?;
            let (w, s) = v.split_once(':')?;
            Some((w.to_string(), s.to_string()))
        };
        Hooks {
            crash: point("IMACRI_TEST_CRASH_AT"),
            hold: point("IMACRI_TEST_HOLD_AT")
                .and_then(|(w, s)| Some((w, s, std::env::var("IMACRI_TEST_HOLD_FILE").ok()?))),
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
        // A blocking wait on purpose: the call stands still at this step
        // (the test's one call; other calls run on other threads).
        if std::fs::write(file, format!("{what}:{step}")).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(120);
            while std::path::Path::new(file).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
