//! containerd's gRPC API through `containerd-client`: one connection, every
//! request tagged with the configured namespace (and a lease where objects are
//! being created, so containerd's GC cannot collect them half-made).

mod content;
pub mod events;
mod instance;
mod lease;
mod task;

pub use content::{ContentStore, WriteOptions};
pub use instance::{instance_id, LABEL_INSTANCE};
pub use lease::Lease;
pub use task::{NewContainer, TaskInfo, TaskStatus};

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, introspection_client::IntrospectionClient,
    leases_client::LeasesClient, snapshots::snapshots_client::SnapshotsClient,
    tasks_client::TasksClient, version_client::VersionClient, PluginsRequest,
};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Request;

use crate::{Error, Result};

/// Metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Metadata key containerd reads the lease from.
const LEASE_HEADER: &str = "containerd-lease";

#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    namespace_value: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    /// Put on every container and lease this imacri creates (`instance.rs`).
    instance: Option<std::sync::Arc<str>>,
}

/// What `version` reports, for Status and `imacri check`.
#[derive(Debug, Clone)]
pub struct ServerVersion {
    pub version: String,
    pub revision: String,
}

impl Containerd {
    /// Connects to `address`, retrying until `timeout` while containerd starts.
    pub async fn connect(address: &Path, namespace: &str, timeout: Duration) -> Result<Self> {
        let namespace_value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            namespace.parse().map_err(|_| {
                Error::InvalidArgument(format!("containerd namespace {namespace:?} is not valid"))
            })?;
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            match Self::try_connect(address).await {
                Ok(channel) => {
                    let c = Containerd {
                        channel,
                        namespace: namespace.to_string(),
                        namespace_value: namespace_value.clone(),
                        instance: None,
                    };
                    match c.version().await {
                        Ok(_) => return Ok(c),
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "containerd at {} is not reachable after {}s: {last_err}; is containerd running?",
                    address.display(),
                    timeout.as_secs()
                )));
            }
            tracing::info!(address = %address.display(), error = %last_err, "waiting for containerd");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn try_connect(address: &Path) -> std::result::Result<Channel, String> {
        if !address.exists() {
            return Err(format!("socket {} does not exist", address.display()));
        }
        containerd_client::connect(address)
            .await
            .map_err(|e| format!("{e:?}"))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A request in our namespace.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_value.clone());
        r
    }

    /// A request in our namespace, holding `lease`.
    pub fn leased<T>(&self, msg: T, lease: &Lease) -> Request<T> {
        let mut r = self.req(msg);
        if let Ok(v) = lease.id().parse() {
            r.metadata_mut().insert(LEASE_HEADER, v);
        }
        r
    }

    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentStore {
        ContentStore::new(self.clone(), ContentClient::new(self.channel.clone()))
    }

    pub async fn version(&self) -> Result<ServerVersion> {
        let v = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(|e| Error::containerd("version", e))?
            .into_inner();
        Ok(ServerVersion {
            version: v.version,
            revision: v.revision,
        })
    }

    /// True when containerd's own CRI plugin loaded (it would manage pods in
    /// the same namespace and fight us over them).
    pub async fn cri_plugin_loaded(&self) -> Result<bool> {
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(PluginsRequest {
                filters: vec!["type==io.containerd.grpc.v1,id==cri".into()],
            })
            .await
            .map_err(|e| Error::containerd("introspection", e))?
            .into_inner()
            .plugins;
        Ok(plugins.iter().any(|p| p.init_err.is_none()))
    }

    /// Where a snapshotter keeps its data (for ImageFsInfo).
    pub async fn snapshotter_root(&self, snapshotter: &str) -> Result<String> {
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(PluginsRequest {
                filters: vec![format!(
                    "type==io.containerd.snapshotter.v1,id=={snapshotter}"
                )],
            })
            .await
            .map_err(|e| Error::containerd("introspection", e))?
            .into_inner()
            .plugins;
        Ok(plugins
            .into_iter()
            .find_map(|p| p.exports.get("root").cloned())
            .unwrap_or_default())
    }

    /// Creates a lease that expires by itself if imacri dies mid-operation.
    pub async fn lease(&self, purpose: &str) -> Result<Lease> {
        Lease::create(self, purpose).await
    }
}

/// Wraps a typed message as the `Any` containerd expects. containerd matches
/// type URLs without the `type.googleapis.com/` prefix.
pub fn any_json(type_url: &str, value: &impl serde::Serialize) -> Result<prost_types::Any> {
    Ok(prost_types::Any {
        type_url: type_url.to_string(),
        value: serde_json::to_vec(value)
            .map_err(|e| Error::Internal(format!("encoding {type_url}: {e}")))?,
    })
}

/// Type URL of an OCI runtime spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Type URL of an OCI process (exec).
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
