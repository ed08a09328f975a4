//! containerd leases: everything created under a lease is kept from GC until
//! the lease is deleted; deleting it after a failure lets GC take the debris.

use containerd_client::services::v1::{CreateRequest, DeleteRequest};
use std::collections::HashMap;

use super::Containerd;
use crate::{Error, Result};

/// A lease that imacri deletes explicitly; the expiry label is a backstop for
/// leases orphaned by a crash.
pub struct Lease {
    id: String,
}

impl Lease {
    pub(super) async fn create(c: &Containerd, purpose: &str) -> Result<Lease> {
        let id = format!("imacri-{purpose}-{}", &crate::ids::new_id()[..16]);
        let expire = chrono::Utc::now() + chrono::Duration::hours(1);
        let mut labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )]);
        labels.extend(c.instance_label());
        c.leases()
            .create(c.req(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|e| Error::containerd("creating lease", e))?;
        Ok(Lease { id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Protects a snapshot from GC for as long as the lease lives. Leasing
    /// before checking that it exists closes the race with a GC that an
    /// image removal just started: once leased, what exists stays.
    pub async fn add_snapshot(&self, c: &Containerd, snapshotter: &str, key: &str) -> Result<()> {
        self.add_resource(c, key, format!("snapshots/{snapshotter}"))
            .await
    }

    /// Protects a content blob from GC (see `add_snapshot`).
    pub async fn add_content(&self, c: &Containerd, digest: &str) -> Result<()> {
        self.add_resource(c, digest, "content".to_string()).await
    }

    async fn add_resource(&self, c: &Containerd, id: &str, kind: String) -> Result<()> {
        use containerd_client::services::v1::{AddResourceRequest, Resource};
        c.leases()
            .add_resource(c.req(AddResourceRequest {
                id: self.id.clone(),
                resource: Some(Resource {
                    id: id.to_string(),
                    r#type: kind.clone(),
                }),
            }))
            .await
            .map_err(|e| Error::containerd(format!("leasing {kind} {id}"), e))?;
        Ok(())
    }

    /// Deletes the lease. `sync` waits for GC, so the caller can assert that
    /// nothing leaked.
    pub async fn delete(&self, c: &Containerd, sync: bool) -> Result<()> {
        c.leases()
            .delete(c.req(DeleteRequest {
                id: self.id.clone(),
                sync,
            }))
            .await
            .map_err(|e| Error::containerd(format!("deleting lease {}", self.id), e))?;
        Ok(())
    }
}
