//! Step timings of one RPC, logged at debug level when it ends: where a pod
//! start's time goes, on a real node (`--log-level imacri_cri=debug`). The
//! steps are also where tests crash the process or hold the call
//! (`imacri_runtime::crash`).

use std::fmt::Write;
use std::time::Instant;

pub(crate) struct Laps {
    what: &'static str,
    id: String,
    start: Instant,
    last: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Laps {
    pub(crate) fn new(what: &'static str, id: &str) -> Laps {
        let now = Instant::now();
        Laps {
            what,
            id: id.to_string(),
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    /// Ends the step `name`, started where the last one ended.
    pub(crate) fn lap(&mut self, name: &'static str) {
        self.time(name);
        imacri_runtime::crash::at(self.what, name);
    }

    /// `lap` for a step after which the call can still fail (and so roll
    /// back): where a test can make it fail.
    pub(crate) fn step(&mut self, name: &'static str) -> imacri_runtime::Result<()> {
        self.time(name);
        imacri_runtime::crash::step(self.what, name)
    }

    fn time(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps
            .push((name, (now - self.last).as_secs_f64() * 1000.0));
        self.last = now;
    }
}

impl Drop for Laps {
    fn drop(&mut self) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let mut steps = String::new();
        for (name, ms) in &self.laps {
            let _ = write!(steps, "{name}={ms:.2} ");
        }
        let total = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(id = %self.id, total = format!("{total:.2}"), steps = steps.trim_end(), "laps {}", self.what);
    }
}
