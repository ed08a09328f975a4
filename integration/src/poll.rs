//! The one way tests wait: poll until a condition yields a value, failing
//! with what was awaited after a timeout.

use anyhow::{bail, Result};
use std::future::Future;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_millis(100);

/// Polls `f` until it returns Some (async conditions).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}");
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// As `eventually`, for conditions that block (HTTP clients, processes)
/// and for code outside a runtime.
pub fn eventually_blocking<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}");
        }
        std::thread::sleep(EVERY);
    }
}
