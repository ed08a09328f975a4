//! Which TPM life the log belongs to: an epoch begins with the TPM's
//! reset (a reboot), and a log of an earlier epoch is archived, never
//! replayed against the new PCR.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::super::tpm::Tpm;
use super::{io, JResult};

/// Which TPM life the log belongs to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Epoch {
    /// The TPM's reset count when the epoch began (None: no TPM).
    pub reset_count: Option<u32>,
    pub restart_count: Option<u32>,
    /// Unix seconds.
    pub started_at: i64,
    /// Set when the PCR holds a value the log cannot replay to (something
    /// else extended it): evidence is unverifiable until the next TPM reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

/// The epoch a start resumes (or begins) and what the TPM says of it.
pub(super) struct Resumed {
    pub(super) epoch: Epoch,
    /// What `epoch.json` held (None: first start, or unreadable).
    pub(super) saved: Option<Epoch>,
    /// The PCR's value now, to read the log back against (None: no TPM, or
    /// an epoch already known to be broken).
    pub(super) pcr_now: Option<[u8; 32]>,
}

impl Epoch {
    /// The epoch saved in `dir`, or a new one where the TPM was reset
    /// since (the log at `log_path` of the old one archived first).
    pub(super) fn resume(dir: &Path, log_path: &Path, tpm: Option<&Tpm>) -> JResult<Resumed> {
        let saved: Option<Epoch> = std::fs::read(path(dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut epoch = saved.clone().unwrap_or(Epoch {
            started_at: now_secs(),
            ..Default::default()
        });
        // The TPM first: the log is read back against the PCR it holds.
        let mut pcr_now = None;
        if let Some(tpm) = tpm {
            let q = tpm.quote_blocking(rand::random::<[u8; 32]>().to_vec())?;
            let rebooted = saved.as_ref().is_none_or(|s| {
                s.reset_count != Some(q.reset_count)
                    || (s.restart_count != Some(q.restart_count) && q.pcr_value == [0; 32])
            });
            if rebooted {
                let logged = std::fs::metadata(log_path).is_ok_and(|m| m.len() > 0);
                if logged {
                    archive(dir, log_path, &epoch, "epoch")?;
                    tracing::info!(
                        "the TPM was reset: archived the previous epoch's measurement log"
                    );
                }
                epoch = Epoch {
                    reset_count: Some(q.reset_count),
                    restart_count: Some(q.restart_count),
                    started_at: now_secs(),
                    broken: None,
                };
            }
            epoch.restart_count = Some(q.restart_count);
            if epoch.broken.is_none() {
                pcr_now = Some(q.pcr_value);
            }
        } else if saved.as_ref().is_some_and(|s| s.reset_count.is_some()) {
            // Was anchored, now is not: keep the log, say so in evidence.
            tracing::warn!("no TPM configured: measurements continue unanchored");
        }
        Ok(Resumed {
            epoch,
            saved,
            pcr_now,
        })
    }

    /// Writes the epoch where [`resume`](Self::resume) finds it.
    pub(super) fn save(&self, dir: &Path) -> JResult<()> {
        let p = path(dir);
        std::fs::write(&p, serde_json::to_vec_pretty(self).unwrap_or_default())
            .map_err(io("writing", &p))
    }
}

fn path(dir: &Path) -> std::path::PathBuf {
    dir.join("epoch.json")
}

pub(super) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Moves the log aside into `archive/`, named by `why` and the epoch.
pub(super) fn archive(dir: &Path, log_path: &Path, epoch: &Epoch, why: &str) -> JResult<()> {
    let adir = dir.join("archive");
    std::fs::create_dir_all(&adir).map_err(io("creating", &adir))?;
    let name = format!(
        "measurements-{why}-{}-{}-{}.log",
        epoch
            .reset_count
            .map(|r| r.to_string())
            .unwrap_or("none".into()),
        epoch.started_at,
        now_secs()
    );
    std::fs::rename(log_path, adir.join(name)).map_err(io("archiving", log_path))
}
