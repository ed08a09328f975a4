//! The node's limits on fanotify groups and marks. Marks: imacri's groups
//! do not count against them (`FAN_UNLIMITED_MARKS`); the sysctl is read
//! for groups an older imacri opened (`MARKS_SYSCTL`). Groups: the backend
//! opens one or two groups per measured container that runs (the pause
//! container included; the second for closes after writing, `closes.rs`),
//! and the
//! kernel counts them against `fs.fanotify.max_user_groups` of imacri's
//! user, root: 128 by default, so the 129th measured container of a node
//! failed to start. imacri raises the limit at start to what its config
//! asks (`ima.fanotify_groups`), never lowers it, and names the sysctl when
//! groups run out anyway.

use std::path::Path;

/// The sysctl's file.
pub const SYSCTL: &str = "/proc/sys/fs/fanotify/max_user_groups";

/// The node's limit on fanotify marks (root's). imacri's groups are opened
/// with `FAN_UNLIMITED_MARKS` and do not count against it (each
/// container's marks are bounded by `ima.max_watched_files`); groups an
/// imacri from before 2026-12-06 opened, handed over by the fd keeper, do.
pub const MARKS_SYSCTL: &str = "/proc/sys/fs/fanotify/max_user_marks";

/// What the limit was and is: `(before, now)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub now: u64,
}

/// The limit in `file` (the sysctl's, or a test's stand-in).
pub fn limit(file: &Path) -> std::io::Result<u64> {
    std::fs::read_to_string(file)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Raises the limit in `file` to `want` if it is lower. `want == 0` leaves
/// it as it is.
pub fn raise(file: &Path, want: u64) -> std::io::Result<Raised> {
    let before = limit(file)?;
    if want == 0 || before >= want {
        return Ok(Raised {
            before,
            now: before,
        });
    }
    std::fs::write(file, want.to_string())?;
    Ok(Raised {
        before,
        now: limit(file)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_raised_never_lowered() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("max_user_groups");
        std::fs::write(&f, "128\n").unwrap();
        let r = raise(&f, 8192).unwrap();
        assert_eq!((r.before, r.now), (128, 8192));
        assert_eq!(limit(&f).unwrap(), 8192);
        let r = raise(&f, 1024).unwrap();
        assert_eq!((r.before, r.now), (8192, 8192), "never lowered");
        let r = raise(&f, 0).unwrap();
        assert_eq!(r.now, 8192);
        std::fs::write(&f, "junk").unwrap();
        assert!(raise(&f, 10).is_err());
        assert!(raise(&d.path().join("missing"), 10).is_err());
    }
}
