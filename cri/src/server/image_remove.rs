//! RemoveImage: by ID, tag or digest; every name of the image goes.

use imacri_api::cri;
use imacri_runtime::Result;

use super::CriServer;

impl CriServer {
    pub(crate) async fn remove_image(
        &self,
        req: cri::RemoveImageRequest,
    ) -> Result<cri::RemoveImageResponse> {
        // No image named is one not found, as in containerd: nothing to do.
        let name = req.image.as_ref().map_or("", |i| i.image.as_str());
        if !name.is_empty() {
            self.images.remove(name).await?;
        }
        Ok(cri::RemoveImageResponse {})
    }
}
