//! PullImage.

use imacri_api::cri;
use imacri_runtime::image::Credentials;
use imacri_runtime::Result;

use super::validate::{non_empty, require};
use super::CriServer;

impl CriServer {
    pub(crate) async fn pull_image(
        &self,
        req: cri::PullImageRequest,
    ) -> Result<cri::PullImageResponse> {
        let spec = require("image", req.image.as_ref())?;
        non_empty("image.image", &spec.image)?;
        let creds = req
            .auth
            .map(|a| Credentials {
                username: a.username,
                password: a.password,
                auth: a.auth,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            })
            .unwrap_or_default();
        let rec = self.images.pull(&spec.image, &creds).await?;
        tracing::info!(image = %spec.image, image_id = %rec.id, "pulled");
        Ok(cri::PullImageResponse { image_ref: rec.id })
    }
}
