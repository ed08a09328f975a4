//! ImageService against real registries: anonymous, basic auth, a mirror
//! from hosts.toml; list, status, remove; nothing left after a failed pull.

use imacri_integration::client::image;
use imacri_integration::{cri, Env, Imacri, AUTH_PASSWORD, AUTH_USER};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn pull_list_status_remove() {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut im = d.images().await.unwrap();

    // The built-in pause image is there, pinned.
    let all = im
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    let pause = all
        .iter()
        .find(|i| {
            i.repo_tags
                .iter()
                .any(|t| t.starts_with("imacri.dev/pause:"))
        })
        .expect("pause image");
    assert!(pause.pinned);

    let id = im
        .pull_image(cri::PullImageRequest {
            image: image(&env.busybox),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    // Pulling again is a no-op with the same ID.
    let again = im
        .pull_image(cri::PullImageRequest {
            image: image(&env.busybox),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    assert_eq!(id, again);

    let st = im
        .image_status(cri::ImageStatusRequest {
            image: image(&env.busybox),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let img = st.image.expect("image");
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec![env.busybox.clone()]);
    assert_eq!(img.repo_digests.len(), 1);
    assert!(img.repo_digests[0].starts_with(&format!("{}/test/busybox@sha256:", env.registry)));
    assert!(img.size > 1_000_000, "size {}", img.size);
    assert_eq!(img.uid, Some(cri::Int64Value { value: 0 }));
    assert!(!img.pinned);
    assert!(st.info["info"].contains("chainID"));

    // By ID, by digest, by short ID form.
    for spec in [
        id.clone(),
        img.repo_digests[0].clone(),
        id.trim_start_matches("sha256:").to_string(),
    ] {
        let st = im
            .image_status(cri::ImageStatusRequest {
                image: image(&spec),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.image.map(|i| i.id), Some(id.clone()), "lookup by {spec}");
    }
    let filtered = im
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: image(&env.busybox),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);

    // Image with a user name and config.
    let cid = im
        .pull_image(cri::PullImageRequest {
            image: image(&env.configured),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    let c = im
        .image_status(cri::ImageStatusRequest {
            image: image(&cid),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(c.username, "alice");
    assert_eq!(c.uid, None);

    let fs = im
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert!(usage.used_bytes.as_ref().unwrap().value > 1_000_000);
    assert!(usage
        .fs_id
        .as_ref()
        .unwrap()
        .mountpoint
        .contains("overlayfs"));

    im.remove_image(cri::RemoveImageRequest {
        image: image(&env.busybox),
    })
    .await
    .unwrap();
    im.remove_image(cri::RemoveImageRequest {
        image: image(&env.busybox),
    })
    .await
    .unwrap();
    let st = im
        .image_status(cri::ImageStatusRequest {
            image: image(&id),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.image.is_none(), "all names of the image are gone");
    im.remove_image(cri::RemoveImageRequest { image: image(&cid) })
        .await
        .unwrap();
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());

    // Restart: the image store is rebuilt from containerd.
    let mut d = d;
    im.pull_image(cri::PullImageRequest {
        image: image(&env.busybox),
        ..Default::default()
    })
    .await
    .unwrap();
    d.kill();
    d.spawn().await.unwrap();
    let mut im = d.images().await.unwrap();
    let st = im
        .image_status(cri::ImageStatusRequest {
            image: image(&env.busybox),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.image.map(|i| i.id), Some(id));
}

fn wrong_auth() -> cri::AuthConfig {
    cri::AuthConfig {
        username: AUTH_USER.into(),
        password: "wrong".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_auth_and_mirrors() {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut im = d.images().await.unwrap();
    let private = format!("{}/private/busybox:latest", env.auth_registry);

    let e = im
        .pull_image(cri::PullImageRequest {
            image: image(&private),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("credentials") || e.message().contains("auth"),
        "{e}"
    );
    let wrong = wrong_auth();
    let e = im
        .pull_image(cri::PullImageRequest {
            image: image(&private),
            auth: Some(wrong),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // A failed pull leaves no lease or half-written content.
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());

    let good = cri::AuthConfig {
        username: AUTH_USER.into(),
        password: AUTH_PASSWORD.into(),
        ..Default::default()
    };
    im.pull_image(cri::PullImageRequest {
        image: image(&private),
        auth: Some(good),
        ..Default::default()
    })
    .await
    .unwrap();
    // The `auth` field form (base64 user:password), as kubelet sends from secrets.
    use base64::Engine;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{AUTH_USER}:{AUTH_PASSWORD}"));
    let by_auth = cri::AuthConfig {
        auth: encoded,
        ..Default::default()
    };
    im.pull_image(cri::PullImageRequest {
        image: image(&private),
        auth: Some(by_auth),
        ..Default::default()
    })
    .await
    .unwrap();
    // What those pulls bought is theirs: without credentials, or with wrong
    // ones, the same image is still refused right after (registry clients
    // are kept between pulls, never across credentials).
    for auth in [None, Some(wrong_auth())] {
        let e = im
            .pull_image(cri::PullImageRequest {
                image: image(&private),
                auth,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    }

    // HTTPS with a private CA from hosts.toml; without it the pull fails.
    let secure = format!("{}/secure/busybox:latest", env.tls_registry);
    im.pull_image(cri::PullImageRequest {
        image: image(&secure),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    // The same host over HTTPS without the CA: certificate verification fails.
    let untrusted = tempfile::tempdir_in(&env.base).unwrap();
    std::fs::create_dir_all(untrusted.path().join(&env.tls_registry)).unwrap();
    std::fs::write(
        untrusted.path().join(&env.tls_registry).join("hosts.toml"),
        format!("server = \"https://{}\"\n", env.tls_registry),
    )
    .unwrap();
    let d2 = Imacri::start_full(
        env,
        &d.namespace,
        &["--registry-config-path", untrusted.path().to_str().unwrap()],
    )
    .await
    .unwrap();
    let e = d2
        .images()
        .await
        .unwrap()
        .pull_image(cri::PullImageRequest {
            image: image(&secure),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    drop(d2);

    // hosts.toml: registry.k8s.io is served by the local registry.
    let pause = im
        .pull_image(cri::PullImageRequest {
            image: image("registry.k8s.io/pause:3.9"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
        .into_inner()
        .image_ref;
    let st = im
        .image_status(cri::ImageStatusRequest {
            image: image("registry.k8s.io/pause:3.9"),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let img = st.image.unwrap();
    assert_eq!(img.id, pause);
    assert!(
        img.repo_tags
            .contains(&"registry.k8s.io/pause:3.9".to_string()),
        "{:?}",
        img.repo_tags
    );
}

/// A configured sandbox image is pinned once pulled, and stays pinned
/// after imacri restarts (kubelet's image GC must never take it).
#[tokio::test(flavor = "multi_thread")]
async fn configured_sandbox_image_is_pinned() {
    let env = Env::get();
    let pause = format!("{}/pause:3.9", env.registry);
    let mut d = Imacri::start_with(env, &["--sandbox-image", &pause])
        .await
        .unwrap();
    let mut im = d.images().await.unwrap();
    // (The test pause image is busybox's copy; `configured` is another image.)
    for name in [&pause, &env.configured] {
        im.pull_image(cri::PullImageRequest {
            image: image(name),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let pinned = |im: cri::ImageStatusResponse| im.image.unwrap().pinned;
    let status = |name: &str| cri::ImageStatusRequest {
        image: image(name),
        verbose: false,
    };
    assert!(pinned(
        im.image_status(status(&pause)).await.unwrap().into_inner()
    ));
    assert!(!pinned(
        im.image_status(status(&env.configured))
            .await
            .unwrap()
            .into_inner()
    ));
    d.stop();
    d.spawn().await.unwrap();
    let mut im = d.images().await.unwrap();
    assert!(pinned(
        im.image_status(status(&pause)).await.unwrap().into_inner()
    ));
}

/// `auth.identity_token` (an OAuth2 refresh token) against a token-auth
/// registry: traded at the realm the registry names, then used to pull.
#[tokio::test(flavor = "multi_thread")]
async fn identity_token_is_traded_for_an_access_token() {
    use imacri_integration::registry::start_token_registry;
    use imacri_integration::token_service::TokenService;
    let env = Env::get();
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let svc = TokenService::start(dir.path(), "refresh-me").await.unwrap();
    let name = format!("token-registry-{}", std::process::id());
    let host = start_token_registry(&env.base, &name, "registry", &svc.realm, &svc.cert).unwrap();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut im = d.images().await.unwrap();
    let img = format!("{host}/test/busybox:latest");
    let pull = |auth: Option<cri::AuthConfig>| cri::PullImageRequest {
        image: image(&img),
        auth,
        ..Default::default()
    };
    // Without credentials, and with a wrong refresh token: refused.
    let e = im.pull_image(pull(None)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    let wrong = cri::AuthConfig {
        identity_token: "stolen".into(),
        ..Default::default()
    };
    let e = im.pull_image(pull(Some(wrong))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("identity_token"), "{e:?}");
    assert_eq!(svc.issued.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The right one pulls.
    let good = cri::AuthConfig {
        identity_token: "refresh-me".into(),
        ..Default::default()
    };
    let id = im
        .pull_image(pull(Some(good)))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()))
        .into_inner()
        .image_ref;
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(svc.issued.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// Pulling an image right after removing it races containerd's GC over the
/// blobs the removal left behind (critest's "simultaneous RemoveImage" spec
/// caught a NotFound from it): every re-pull succeeds and leaves the image
/// whole.
#[tokio::test(flavor = "multi_thread")]
async fn repull_right_after_remove_races_no_gc() {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    let mut im = d.images().await.unwrap();
    for round in 0..25 {
        im.pull_image(cri::PullImageRequest {
            image: image(&env.busybox),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", d.log()));
        // Two removals at once, as the critest spec does, then pull again.
        let (mut i1, mut i2) = (im.clone(), im.clone());
        let (a, b) = tokio::join!(
            i1.remove_image(cri::RemoveImageRequest {
                image: image(&env.busybox),
            }),
            i2.remove_image(cri::RemoveImageRequest {
                image: image(&env.busybox),
            })
        );
        a.unwrap();
        b.unwrap();
    }
    assert!(env.all_objects(&d.namespace).await.unwrap().is_empty());
}
