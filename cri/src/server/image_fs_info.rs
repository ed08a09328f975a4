//! ImageFsInfo: usage of the snapshotter's filesystem, from containerd's
//! snapshot usage of image layers.

use imacri_api::cri;
use imacri_runtime::ids::now_nanos;
use imacri_runtime::Result;

use super::CriServer;

impl CriServer {
    pub(crate) async fn image_fs_info(&self) -> Result<cri::ImageFsInfoResponse> {
        let (bytes, inodes) = self
            .c
            .committed_snapshot_usage(&self.cfg.containerd.snapshotter)
            .await?;
        let mountpoint = self.snapshotter_root().await.unwrap_or_default();
        Ok(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: now_nanos(),
                fs_id: Some(cri::FilesystemIdentifier { mountpoint }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }],
            container_filesystems: vec![],
        })
    }
}
