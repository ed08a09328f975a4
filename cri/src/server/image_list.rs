//! ListImages and StreamImages.

use imacri_api::cri;
use imacri_runtime::image::ImageRecord;

use super::CriServer;

pub(crate) fn to_cri(rec: &ImageRecord) -> cri::Image {
    let user = rec
        .config
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let user = user.split(':').next().unwrap_or("").to_string();
    let (uid, username) = match user.parse::<i64>() {
        Ok(n) => (Some(cri::Int64Value { value: n }), String::new()),
        Err(_) if user.is_empty() => (Some(cri::Int64Value { value: 0 }), String::new()),
        Err(_) => (None, user),
    };
    cri::Image {
        id: rec.id.clone(),
        repo_tags: rec.repo_tags(),
        repo_digests: rec.repo_digests(),
        size: rec.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: rec.id.clone(),
            ..Default::default()
        }),
        pinned: rec.pinned,
    }
}

impl CriServer {
    pub(crate) fn list_images(&self, filter: Option<&cri::ImageFilter>) -> Vec<cri::Image> {
        let wanted = filter
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str())
            .filter(|s| !s.is_empty());
        match wanted {
            Some(spec) => self.images.get(spec).iter().map(to_cri).collect(),
            None => self.images.list().iter().map(to_cri).collect(),
        }
    }
}
