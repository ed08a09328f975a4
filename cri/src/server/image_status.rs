//! ImageStatus: a missing image (or none named) is not an error, just no
//! image.

use imacri_api::cri;
use imacri_runtime::Result;
use std::collections::HashMap;

use super::image_list::to_cri;
use super::CriServer;

impl CriServer {
    pub(crate) async fn image_status(
        &self,
        req: cri::ImageStatusRequest,
    ) -> Result<cri::ImageStatusResponse> {
        // No image named is one not found, as in containerd: no image.
        let name = req.image.as_ref().map_or("", |i| i.image.as_str());
        let Some(rec) = (!name.is_empty()).then(|| self.images.get(name)).flatten() else {
            return Ok(cri::ImageStatusResponse::default());
        };
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "chainID": rec.chain_id,
                "target": {"mediaType": rec.target.media_type, "digest": rec.target.digest, "size": rec.target.size},
                "imageSpec": rec.config,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::ImageStatusResponse {
            image: Some(to_cri(&rec)),
            info,
        })
    }
}
