//! tonic glue: each RPC goes through [`instrument`] to its handler.

use futures::stream::{self, BoxStream, StreamExt};
use imacri_api::cri;
use imacri_api::cri::image_service_server::{ImageService, ImageServiceServer};
use imacri_api::cri::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use std::sync::Arc;
use tonic::{Request, Response, Status};

use super::{instrument, CriServer};

type Res<T> = Result<Response<T>, Status>;
type Stream<T> = BoxStream<'static, Result<T, Status>>;

/// Items per message of the Stream* list RPCs.
const BATCH: usize = 500;

#[derive(Clone)]
pub struct Cri(pub Arc<CriServer>);

/// Both CRI services for one server.
pub fn services(server: Arc<CriServer>) -> (RuntimeServiceServer<Cri>, ImageServiceServer<Cri>) {
    let max = 16 * 1024 * 1024;
    (
        RuntimeServiceServer::new(Cri(server.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        ImageServiceServer::new(Cri(server))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// Sends `items` in batches, at least one message when empty is not needed.
fn batched<T, R>(items: Vec<T>, wrap: fn(Vec<T>) -> R) -> Stream<R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let mut chunks = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(wrap(it.by_ref().take(BATCH).collect()));
    }
    stream::iter(chunks.into_iter().map(Ok)).boxed()
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, r: Request<cri::VersionRequest>) -> Res<cri::VersionResponse> {
        let s = &self.0;
        instrument("Version", "", async { Ok(s.version(r.into_inner())) }).await
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Res<cri::RunPodSandboxResponse> {
        let r = r.into_inner();
        let name = r
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        instrument(
            "RunPodSandbox",
            &name,
            self.0.nri_held(Box::pin(self.0.run_pod_sandbox(r))),
        )
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Res<cri::StopPodSandboxResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        // Synchronization first, then the pod: the order CreateContainer
        // and StartContainer take them in (the pod's stop waits for them).
        instrument(
            "StopPodSandbox",
            &id,
            self.0.nri_held(Box::pin(self.0.stop_pod_sandbox(r))),
        )
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Res<cri::RemovePodSandboxResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        instrument(
            "RemovePodSandbox",
            &id,
            self.0.nri_held(Box::pin(self.0.remove_pod_sandbox(r))),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> Res<cri::PodSandboxStatusResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        instrument("PodSandboxStatus", &id, self.0.pod_sandbox_status(r)).await
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> Res<cri::ListPodSandboxResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ListPodSandbox", "", async {
            Ok(cri::ListPodSandboxResponse {
                items: s.list_pod_sandboxes(r.filter.as_ref()),
            })
        })
        .await
    }

    type StreamPodSandboxesStream = Stream<cri::StreamPodSandboxesResponse>;
    async fn stream_pod_sandboxes(
        &self,
        r: Request<cri::StreamPodSandboxesRequest>,
    ) -> Res<Self::StreamPodSandboxesStream> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("StreamPodSandboxes", "", async {
            Ok(batched(
                s.list_pod_sandboxes(r.filter.as_ref()),
                |pod_sandboxes| cri::StreamPodSandboxesResponse { pod_sandboxes },
            ))
        })
        .await
    }

    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> Res<cri::CreateContainerResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        instrument(
            "CreateContainer",
            &id,
            self.0.nri_held(Box::pin(self.0.create_container(r))),
        )
        .await
    }

    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> Res<cri::StartContainerResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument(
            "StartContainer",
            &id,
            self.0.nri_held(Box::pin(self.0.start_container(r))),
        )
        .await
    }

    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Res<cri::StopContainerResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("StopContainer", &id, self.0.stop_container(r)).await
    }

    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Res<cri::RemoveContainerResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument(
            "RemoveContainer",
            &id,
            self.0.nri_held(Box::pin(self.0.remove_container(r))),
        )
        .await
    }

    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> Res<cri::ListContainersResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ListContainers", "", async {
            Ok(cri::ListContainersResponse {
                containers: s.list_containers(r.filter.as_ref()),
            })
        })
        .await
    }

    type StreamContainersStream = Stream<cri::StreamContainersResponse>;
    async fn stream_containers(
        &self,
        r: Request<cri::StreamContainersRequest>,
    ) -> Res<Self::StreamContainersStream> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("StreamContainers", "", async {
            Ok(batched(
                s.list_containers(r.filter.as_ref()),
                |containers| cri::StreamContainersResponse { containers },
            ))
        })
        .await
    }

    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> Res<cri::ContainerStatusResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("ContainerStatus", &id, self.0.container_status(r)).await
    }

    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Res<cri::UpdateContainerResourcesResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument(
            "UpdateContainerResources",
            &id,
            self.0
                .nri_held(Box::pin(self.0.update_container_resources(r))),
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> Res<cri::ReopenContainerLogResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("ReopenContainerLog", &id, self.0.reopen_container_log(r)).await
    }

    async fn exec_sync(&self, r: Request<cri::ExecSyncRequest>) -> Res<cri::ExecSyncResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("ExecSync", &id, self.0.exec_sync(r)).await
    }

    async fn exec(&self, r: Request<cri::ExecRequest>) -> Res<cri::ExecResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("Exec", &id, self.0.exec(r)).await
    }

    async fn attach(&self, r: Request<cri::AttachRequest>) -> Res<cri::AttachResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("Attach", &id, self.0.attach(r)).await
    }

    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> Res<cri::PortForwardResponse> {
        let r = r.into_inner();
        let id = r.pod_sandbox_id.clone();
        instrument("PortForward", &id, self.0.port_forward(r)).await
    }

    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> Res<cri::ContainerStatsResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ContainerStats", &r.container_id.clone(), async move {
            let c = s.container(&r.container_id)?;
            Ok(cri::ContainerStatsResponse {
                stats: Some(s.container_stats_of(&c).await),
            })
        })
        .await
    }

    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> Res<cri::ListContainerStatsResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ListContainerStats", "", async move {
            Ok(cri::ListContainerStatsResponse {
                stats: s.list_container_stats(r.filter.as_ref()).await,
            })
        })
        .await
    }

    type StreamContainerStatsStream = Stream<cri::StreamContainerStatsResponse>;
    async fn stream_container_stats(
        &self,
        r: Request<cri::StreamContainerStatsRequest>,
    ) -> Res<Self::StreamContainerStatsStream> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("StreamContainerStats", "", async move {
            Ok(batched(
                s.list_container_stats(r.filter.as_ref()).await,
                |container_stats| cri::StreamContainerStatsResponse { container_stats },
            ))
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> Res<cri::PodSandboxStatsResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("PodSandboxStats", &r.pod_sandbox_id.clone(), async move {
            let sb = s.sandbox(&r.pod_sandbox_id)?;
            Ok(cri::PodSandboxStatsResponse {
                stats: Some(s.pod_stats_of(&sb).await),
            })
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Res<cri::ListPodSandboxStatsResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ListPodSandboxStats", "", async move {
            Ok(cri::ListPodSandboxStatsResponse {
                stats: s.list_pod_stats(r.filter.as_ref()).await,
            })
        })
        .await
    }

    type StreamPodSandboxStatsStream = Stream<cri::StreamPodSandboxStatsResponse>;
    async fn stream_pod_sandbox_stats(
        &self,
        r: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Res<Self::StreamPodSandboxStatsStream> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("StreamPodSandboxStats", "", async move {
            Ok(batched(
                s.list_pod_stats(r.filter.as_ref()).await,
                |pod_sandbox_stats| cri::StreamPodSandboxStatsResponse { pod_sandbox_stats },
            ))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Res<cri::UpdateRuntimeConfigResponse> {
        let cidr = r
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        instrument("UpdateRuntimeConfig", "", async move {
            // The pod CIDR matters once CNI networking lands; record it.
            tracing::info!(pod_cidr = %cidr, "runtime config updated");
            Ok(cri::UpdateRuntimeConfigResponse {})
        })
        .await
    }

    async fn status(&self, r: Request<cri::StatusRequest>) -> Res<cri::StatusResponse> {
        instrument("Status", "", self.0.status(r.into_inner())).await
    }

    async fn checkpoint_container(
        &self,
        r: Request<cri::CheckpointContainerRequest>,
    ) -> Res<cri::CheckpointContainerResponse> {
        let r = r.into_inner();
        let id = r.container_id.clone();
        instrument("CheckpointContainer", &id, self.0.checkpoint_container(r)).await
    }

    type GetContainerEventsStream = Stream<cri::ContainerEventResponse>;
    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Res<Self::GetContainerEventsStream> {
        let rx = self.0.events.subscribe();
        instrument("GetContainerEvents", "", async move {
            // A subscriber that falls behind skips what it missed (kubelet's
            // evented PLEG relists periodically anyway).
            let s = tokio_stream::wrappers::BroadcastStream::new(rx)
                .filter_map(|r| async move { r.ok().map(Ok) })
                .boxed();
            Ok(s)
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Res<cri::ListMetricDescriptorsResponse> {
        instrument("ListMetricDescriptors", "", async {
            Ok(cri::ListMetricDescriptorsResponse {
                descriptors: super::metrics::descriptors(),
            })
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Res<cri::ListPodSandboxMetricsResponse> {
        let s = &self.0;
        instrument("ListPodSandboxMetrics", "", async move {
            Ok(cri::ListPodSandboxMetricsResponse {
                pod_metrics: s.pod_metrics().await,
            })
        })
        .await
    }

    type StreamPodSandboxMetricsStream = Stream<cri::StreamPodSandboxMetricsResponse>;
    async fn stream_pod_sandbox_metrics(
        &self,
        _r: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> Res<Self::StreamPodSandboxMetricsStream> {
        let s = &self.0;
        instrument("StreamPodSandboxMetrics", "", async move {
            Ok(batched(s.pod_metrics().await, |pod_sandbox_metrics| {
                cri::StreamPodSandboxMetricsResponse {
                    pod_sandbox_metrics,
                }
            }))
        })
        .await
    }

    async fn runtime_config(
        &self,
        _r: Request<cri::RuntimeConfigRequest>,
    ) -> Res<cri::RuntimeConfigResponse> {
        let s = &self.0;
        instrument("RuntimeConfig", "", async { Ok(s.runtime_config()) }).await
    }

    async fn update_pod_sandbox_resources(
        &self,
        r: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Res<cri::UpdatePodSandboxResourcesResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument(
            "UpdatePodSandboxResources",
            &r.pod_sandbox_id.clone(),
            async move {
                // kubelet has already resized the pod cgroup; nothing below it
                // needs changing, but the pod must exist. NRI plugins hear of it.
                let sb = s.sandbox(&r.pod_sandbox_id)?;
                s.nri_held(s.nri_update_pod(&sb, r.resources.as_ref()))
                    .await?;
                Ok(cri::UpdatePodSandboxResourcesResponse {})
            },
        )
        .await
    }
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> Res<cri::ListImagesResponse> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("ListImages", "", async {
            Ok(cri::ListImagesResponse {
                images: s.list_images(r.filter.as_ref()),
            })
        })
        .await
    }

    type StreamImagesStream = Stream<cri::StreamImagesResponse>;
    async fn stream_images(
        &self,
        r: Request<cri::StreamImagesRequest>,
    ) -> Res<Self::StreamImagesStream> {
        let r = r.into_inner();
        let s = &self.0;
        instrument("StreamImages", "", async {
            Ok(batched(s.list_images(r.filter.as_ref()), |images| {
                cri::StreamImagesResponse { images }
            }))
        })
        .await
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Res<cri::ImageStatusResponse> {
        let r = r.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        instrument("ImageStatus", &id, self.0.image_status(r)).await
    }

    async fn pull_image(&self, r: Request<cri::PullImageRequest>) -> Res<cri::PullImageResponse> {
        let r = r.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        instrument("PullImage", &id, self.0.pull_image(r)).await
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Res<cri::RemoveImageResponse> {
        let r = r.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        instrument("RemoveImage", &id, self.0.remove_image(r)).await
    }

    async fn image_fs_info(
        &self,
        _r: Request<cri::ImageFsInfoRequest>,
    ) -> Res<cri::ImageFsInfoResponse> {
        instrument("ImageFsInfo", "", self.0.image_fs_info()).await
    }
}
