//! Which imacri made a containerd object: every container and lease it
//! makes carries its instance label, an ID kept in its state directory, so
//! a start-up sweep takes only its own debris, whoever else uses the
//! namespace (another imacri, a test's, `ctr`).

use containerd_client::services::v1::{DeleteRequest, ListContainersRequest, ListRequest};
use std::path::Path;

use super::Containerd;
use crate::error::IgnoreNotFound;
use crate::{Error, Result};

/// The label naming the imacri (its state directory) an object belongs to.
pub const LABEL_INSTANCE: &str = "imacri.dev/instance";

/// This state directory's instance ID, made on its first start.
pub fn instance_id(state: &Path) -> Result<String> {
    let path = state.join("instance");
    match std::fs::read_to_string(&path) {
        Ok(s) if valid(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("reading", &path, e)),
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let tmp = state.join("instance.tmp");
    std::fs::write(&tmp, &id).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming", &path, e))?;
    Ok(id)
}

/// An ID a label filter takes as it is.
fn valid(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Containerd {
    /// This connection labels what it creates with `id` (see `instance_id`).
    pub fn with_instance(mut self, id: String) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// The label to put on an object this imacri creates.
    pub(super) fn instance_label(&self) -> Option<(String, String)> {
        self.instance
            .as_ref()
            .map(|i| (LABEL_INSTANCE.to_string(), i.to_string()))
    }

    fn own_filter(&self) -> Result<String> {
        self.instance
            .as_ref()
            .map(|i| format!("labels.{LABEL_INSTANCE:?}=={i}"))
            .ok_or_else(|| Error::Internal("no instance ID to tell our objects by".into()))
    }

    /// The IDs of the containers this imacri made.
    pub async fn own_containers(&self) -> Result<Vec<String>> {
        Ok(self
            .containers()
            .list(self.req(ListContainersRequest {
                filters: vec![self.own_filter()?],
            }))
            .await
            .map_err(|e| Error::containerd("listing our containers", e))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    /// Deletes every lease this imacri made (at start, none is in use:
    /// what is left was cut short by a crash); returns how many.
    pub async fn delete_own_leases(&self) -> Result<usize> {
        let leases = self
            .leases()
            .list(self.req(ListRequest {
                filters: vec![self.own_filter()?],
            }))
            .await
            .map_err(|e| Error::containerd("listing our leases", e))?
            .into_inner()
            .leases;
        let n = leases.len();
        for (i, l) in leases.iter().enumerate() {
            self.leases()
                .delete(self.req(DeleteRequest {
                    id: l.id.clone(),
                    // The last one waits for containerd's garbage collection,
                    // so what the leases held (a snapshot prepared for a
                    // creation) is gone when the sweep ends, not whenever
                    // containerd next collects.
                    sync: i + 1 == n,
                }))
                .await
                .map_err(|e| Error::containerd(format!("deleting lease {}", l.id), e))
                // One whose own deletion (after a response) came first.
                .ignore_not_found()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = instance_id(d.path()).unwrap();
        assert!(valid(&a), "{a}");
        assert_eq!(instance_id(d.path()).unwrap(), a);
        // A damaged file is replaced, not put in a filter.
        std::fs::write(d.path().join("instance"), "x\"y").unwrap();
        let b = instance_id(d.path()).unwrap();
        assert!(valid(&b) && b != a);
    }
}
