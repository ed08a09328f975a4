//! fanotify groups: the backend opens one per measured container that runs,
//! and the kernel counts them against the node's
//! `fs.fanotify.max_user_groups` (root's; 128 by default). Until 2026-12-05
//! the 129th measured container of a node failed to start with "fanotify_init:
//! EMFILE". Alone in its binary: it lowers that node-wide limit, which no
//! other test may meet, and puts it back when it ends.

use imacri_integration::client::{run_pod, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, Env};
use imacri_runtime::integrity::fanotify::groups;
use std::path::Path;
use tonic::Code;

/// The node's limit, put back as it was when the test ends.
struct Limit(u64);

impl Limit {
    fn set(n: u64) {
        std::fs::write(groups::SYSCTL, n.to_string()).unwrap();
    }
}

impl Drop for Limit {
    fn drop(&mut self) {
        Limit::set(self.0);
    }
}

/// How many more groups root may open now: opened until EMFILE, then
/// closed.
fn free_groups() -> u64 {
    let mut fds = Vec::new();
    loop {
        // SAFETY: plain syscall; the fd is closed below.
        let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
            break;
        }
        fds.push(fd);
    }
    for fd in &fds {
        // SAFETY: an fd opened above.
        unsafe { libc::close(*fd) };
    }
    fds.len() as u64
}

/// With the limit left as it is (`fanotify_groups = 0`), the measured
/// container past it fails to start with ResourceExhausted naming the
/// sysctl and the setting, and it does not run; with
/// `fanotify_groups` above it, imacri raises the limit when it starts and
/// the next container starts.
#[tokio::test(flavor = "multi_thread")]
async fn measured_containers_past_the_kernels_group_limit_start() {
    let env = Env::get();
    let sysctl = Path::new(groups::SYSCTL);
    let _restore = Limit(groups::limit(sysctl).unwrap());
    // What others hold (none of this test's): the limit less what is free.
    Limit::set(64);
    let in_use = 64 - free_groups();
    let (mut d, image, work) = node(env, "fanotify_groups = 0").await;
    let tight = in_use + 3;
    Limit::set(tight);
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("groups", "measure");
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let mut started = Vec::new();
    let refused = loop {
        let c = container_config(&format!("c{}", started.len()), &image, &["sleep", "1000"]);
        let id = imacri_integration::client::create_container(&mut rt, &pod, &cfg, c)
            .await
            .unwrap();
        match rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            Ok(_) => started.push(id),
            Err(e) => break (id, e),
        }
        // Bounded: groups others close meanwhile make room for a few more.
        assert!(started.len() <= 10, "past the limit of {tight}");
    };
    let (id, e) = refused;
    assert!(!started.is_empty(), "{e}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    for part in [
        format!("fs.fanotify.max_user_groups = {tight}"),
        "ima.fanotify_groups".into(),
    ] {
        assert!(e.message().contains(&part), "{part}: {e}");
    }
    let st = imacri_integration::client::container_status(&mut rt, &id).await;
    assert_ne!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );

    // Raised at start to what the config asks.
    let config = work.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "fanotify_groups = 0",
        &format!("fanotify_groups = {}", in_use + 40),
    );
    std::fs::write(&config, text).unwrap();
    d.kill();
    d.spawn().await.unwrap();
    assert_eq!(groups::limit(sysctl).unwrap(), in_use + 40, "{}", d.log());
    assert!(
        d.log().contains("raised fs.fanotify.max_user_groups"),
        "{}",
        d.log()
    );
    let mut rt = d.runtime().await.unwrap();
    let more = container_config("more", &image, &["sleep", "1000"]);
    start_container(&mut rt, &pod, &cfg, more).await;
    stop_pod(&mut rt, &pod).await;
}
