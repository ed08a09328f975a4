//! The node's fanotify limits. Groups: the backend opens one per measured
//! container that runs, and the kernel counts them against the node's
//! `fs.fanotify.max_user_groups` (root's; 128 by default). Until 2026-12-05
//! the 129th measured container of a node failed to start with "fanotify_init:
//! EMFILE". Marks: one per file a container holds mapped executable or runs
//! as a script, which counted against `fs.fanotify.max_user_marks` until
//! 2026-12-06 (imacri's groups now do not). Alone in their binary,
//! one at a time: each lowers a node-wide limit, which no other test may
//! meet, and puts it back when it ends.

use imacri_integration::client::{run_pod, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{container_config, cri, Env};
use imacri_runtime::integrity::fanotify::groups;
use std::path::Path;
use tonic::Code;

/// One test at a time: each lowers a limit the other's pods need.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A node-wide limit (a sysctl's file), put back as it was when the test
/// ends.
struct Restore(&'static str, u64);

impl Restore {
    fn of(file: &'static str) -> Restore {
        Restore(file, groups::limit(Path::new(file)).unwrap())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        set(self.0, self.1);
    }
}

fn set(file: &str, n: u64) {
    std::fs::write(file, n.to_string()).unwrap();
}

/// How many more marks root may place now: files of a temp dir marked in
/// a group of ours until ENOSPC (at most `most`), then let go.
fn free_marks(most: usize) -> usize {
    use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
    let dir = tempfile::tempdir().unwrap();
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )
    .unwrap();
    for i in 0..most {
        let f = dir.path().join(i.to_string());
        std::fs::write(&f, b"").unwrap();
        match fan.mark(
            MarkFlags::FAN_MARK_ADD,
            MaskFlags::FAN_MODIFY,
            None,
            Some(&f),
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOSPC) => return i,
            Err(e) => panic!("fanotify_mark: {e}"),
        }
    }
    panic!("more than {most} marks free");
}

/// A pod's watches do not use up the node's marks. Each file a container
/// maps executable is watched for writers through an inode mark; until
/// 2026-12-06 those counted against root's `fs.fanotify.max_user_marks`,
/// which all measured containers (and the node's other fanotify users)
/// shared: pods that filled it had every other pod's new mappings refused
/// (in every mode: unwatched, a mapping could be rewritten unseen). Now
/// imacri's groups are opened with `FAN_UNLIMITED_MARKS` and each
/// container's own limit (`ima.max_watched_files`, `ima_floods/`)
/// bounds its marks: with the node's limit 3 above what others hold, a
/// pod maps 30 new files, the node's free marks stay as they were, and
/// another pod then starts and maps its own. (Before: 5 mapped, 25
/// refused, the violation naming the sysctl.)
#[tokio::test(flavor = "multi_thread")]
async fn one_pods_marks_do_not_use_up_the_nodes() {
    let _alone = ALONE.lock().await;
    let env = Env::get();
    let _restore = Restore::of(groups::MARKS_SYSCTL);
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("marks", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    // What others hold: the limit less what is free.
    set(groups::MARKS_SYSCTL, 20_000);
    let in_use = 20_000 - free_marks(20_001) as u64;
    set(groups::MARKS_SYSCTL, in_use + 3);
    // The files stay mapped (one process holds them all) until it ends.
    assert_eq!(
        sh_ok(&mut rt, &c, "escape map-flood /tmp/m 30").await,
        "MAPPED 30 REFUSED 0",
        "{}",
        d.log()
    );
    assert!(
        free_marks(100) >= 3,
        "the pod's marks counted against the node's"
    );
    let other = ima("marks2", "measure");
    let (pod2, c2) = sleeping_pod(&mut rt, &d, &other, &image).await;
    assert_eq!(
        sh_ok(&mut rt, &c2, "escape map-flood /tmp/m 10").await,
        "MAPPED 10 REFUSED 0",
        "{}",
        d.log()
    );
    assert!(
        !d.log().contains("fs.fanotify.max_user_marks"),
        "{}",
        d.log()
    );
    stop_pod(&mut rt, &pod2).await;
    stop_pod(&mut rt, &pod).await;
}

/// The kernel's slab memory (kB), from `/proc/meminfo`.
fn slab_kb() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits up to `secs` for `path` to exist.
fn wait_for(path: &Path, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never came",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A pod's closes of files opened for writing do not grow the kernel's
/// memory. Each used to be a FAN_CLOSE_WRITE notification in the
/// container's group, whose queue has no bound (its permission events
/// must never be dropped), read by a reader that shares the pod's CPU, or
/// by nobody while imacri is down: a pod closing files faster than that
/// grew the kernel's memory without bound. On filesystems with multigrain
/// timestamps the groups no longer ask for them (`fanotify/closes.rs`):
/// with imacri stopped (SIGSTOP: nothing reads the groups), a measure
/// pod's two processes open and close 100 000 files of its root for 3 s
/// while the kernel's slab grows by less than 16 MiB (before: +50 MB and
/// more).
#[tokio::test(flavor = "multi_thread")]
async fn a_pods_closes_do_not_grow_the_kernels_memory() {
    let _alone = ALONE.lock().await;
    if !imacri_runtime::integrity::fanotify::closes::kernel_multigrain() {
        eprintln!("coarse timestamps: closes are still asked for (imacri check says so)");
        return;
    }
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("closes", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    sh_ok(
        &mut rt,
        &c,
        "(escape close-flood /tmp/cf 100000 3 > /tmp/cf.out 2>&1 &) ; echo started",
    )
    .await;
    let pid = imacri_integration::client::container_info(&mut rt, &c).await["pid"]
        .as_u64()
        .unwrap();
    let dir = std::path::PathBuf::from(format!("/proc/{pid}/root/tmp/cf"));
    wait_for(&dir.join("ready"), 60);
    let imacri = nix::unistd::Pid::from_raw(d.pid().unwrap() as i32);
    let before = slab_kb();
    nix::sys::signal::kill(imacri, nix::sys::signal::SIGSTOP).unwrap();
    std::fs::write(dir.join("go"), b"").unwrap();
    let done = std::panic::catch_unwind(|| wait_for(&dir.join("done"), 30));
    let grown = slab_kb() - before;
    nix::sys::signal::kill(imacri, nix::sys::signal::SIGCONT).unwrap();
    done.unwrap();
    eprintln!("the kernel's slab grew by {grown} kB");
    assert!(grown < 16 * 1024, "the kernel's slab grew by {grown} kB");
    stop_pod(&mut rt, &pod).await;
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
    let _alone = ALONE.lock().await;
    let env = Env::get();
    let sysctl = Path::new(groups::SYSCTL);
    let _restore = Restore::of(groups::SYSCTL);
    // What others hold (none of this test's): the limit less what is free.
    set(groups::SYSCTL, 64);
    let in_use = 64 - free_groups();
    let (mut d, image, work) = node(env, "fanotify_groups = 0").await;
    let tight = in_use + 3;
    set(groups::SYSCTL, tight);
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
