//! Test only: `IMACRI_TEST_CRASH_AT=<what>:<step>` (`RunPodSandbox:task`,
//! `PullImage:fetched`) ends the process at that step as a crash would:
//! SIGKILL, no clean-up of any kind. The integration tests kill imacri at
//! every step of the calls that make things and check what the next one
//! leaves (`integration/tests/crash_points.rs`).

use std::sync::OnceLock;

/// Ends the process if the test asked for a crash at `what:step`. One
/// environment read per process; a comparison after that.
pub fn at(what: &str, step: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("IMACRI_TEST_CRASH_AT").ok());
    if let Some((w, s)) = at.as_deref().and_then(|a| a.split_once(':')) {
        if w == what && s == step {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}
