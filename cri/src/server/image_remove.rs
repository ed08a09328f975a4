//! RemoveImage: by ID, tag or digest; every name of the image goes.

use imacri_api::cri;
use imacri_runtime::Result;

use super::validate::{non_empty, require};
use super::CriServer;

impl CriServer {
    pub(crate) async fn remove_image(
        &self,
        req: cri::RemoveImageRequest,
    ) -> Result<cri::RemoveImageResponse> {
        let spec = require("image", req.image.as_ref())?;
        non_empty("image.image", &spec.image)?;
        self.images.remove(&spec.image).await?;
        Ok(cri::RemoveImageResponse {})
    }
}
