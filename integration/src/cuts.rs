//! For tests that cut calls short at each of their steps (`crash_points.rs`,
//! `containerd_restarts.rs`): what one imacri has made on this machine,
//! taken before and after (what is left once the test has removed what it
//! made must be what was there before), and the pods they cut.

use crate::client::{exec_sh, Rt};
use crate::{container_config, cri, own_pids, pod_config, Env, Imacri};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// What one imacri has made on this machine: containerd objects of its
/// namespace, mounts of its directories or namespace, the files under its
/// state and root (but logs that only grow), shims of its namespace.
#[derive(Debug, Default, PartialEq)]
pub struct Made {
    pub objects: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub files: BTreeSet<String>,
    pub shims: usize,
    /// Open files of its fd keeper (what it holds for running containers).
    pub keeper_fds: usize,
}

/// Files that are there for the daemon, not for a pod: its logs, journal,
/// sockets and keys, made once and kept.
fn daemon_file(rel: &str) -> bool {
    let Some((_, under)) = rel.split_once('/') else {
        return false;
    };
    let first = under.split('/').next().unwrap_or_default();
    [
        "integrity",
        "remap",
        "golden",
        "instance",
        "bin",
        "fdkeeper.sock",
        "mapguard.sock",
        "images",
    ]
    .contains(&first)
}

fn files_under(root: &Path, base: &Path, out: &mut BTreeSet<String>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        if daemon_file(&rel) {
            continue;
        }
        // Not into mounts (a pod's rootfs or netns): they are listed as mounts.
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        // The daemon's own directories (`state/io`) come with their first use.
        let top = p.parent() == Some(root) && root != base && root.parent() == Some(base);
        if !(is_dir && top) {
            out.insert(rel);
        }
        if is_dir && !is_mount_point(&p) {
            files_under(&p, base, out);
        }
    }
}

pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

pub fn is_mount_point(p: &Path) -> bool {
    let p = p.to_string_lossy();
    mount_points().iter().any(|m| *m == p)
}

pub fn shims_of(namespace: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        if shim
            && args
                .windows(2)
                .any(|w| w[0] == b"-namespace" && w[1] == namespace.as_bytes())
        {
            n += 1;
        }
    }
    n
}

pub async fn made(d: &Imacri) -> Made {
    let dir = d.dir.path().to_string_lossy().into_owned();
    let mut m = Made {
        objects: Env::get()
            .all_objects_at(&d.containerd(), &d.namespace)
            .await
            .unwrap()
            .into_iter()
            .collect(),
        mounts: mount_points()
            .into_iter()
            .filter(|p| p.starts_with(&dir) || p.contains(&format!("/{}/", d.namespace)))
            .collect(),
        shims: shims_of(&d.namespace),
        keeper_fds: d
            .keeper_pids()
            .iter()
            .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |r| r.count()))
            .sum(),
        ..Default::default()
    };
    for base in [&d.state, &d.root] {
        files_under(base, d.dir.path(), &mut m.files);
    }
    m
}

/// What is in `now` and not in `before`, and what went.
pub fn changes(before: &Made, now: &Made) -> String {
    let mut out = String::new();
    for (what, b, n) in [
        ("object", &before.objects, &now.objects),
        ("mount", &before.mounts, &now.mounts),
        ("file", &before.files, &now.files),
    ] {
        for x in n.difference(b) {
            out += &format!("new {what} {x}\n");
        }
        for x in b.difference(n) {
            out += &format!("gone {what} {x}\n");
        }
    }
    if before.shims != now.shims {
        out += &format!("shims {} -> {}\n", before.shims, now.shims);
    }
    if before.keeper_fds != now.keeper_fds {
        out += &format!(
            "fd keeper's files {} -> {}\n",
            before.keeper_fds, now.keeper_fds
        );
    }
    out
}

/// Waits (a removal's containerd deletions go after its response) until
/// nothing of `before` is missing and nothing was added.
pub async fn back_to(d: &Imacri, before: &Made, what: &str) {
    let mut last = String::new();
    for _ in 0..100 {
        last = changes(before, &made(d).await);
        if last.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not as before:\n{last}\n{}", d.log());
}

/// Pod IDs the test CNI's IPAM holds an address for.
pub fn addressed(env: &Env) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let dir = env.base.join("cni-ipam");
    for net in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(net.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(s) = std::fs::read_to_string(f.path()) {
                if let Some(id) = s.lines().next() {
                    ids.insert(id.trim().to_string());
                }
            }
        }
    }
    ids
}

/// Sandbox records (their directories' names) of `d`.
pub fn sandbox_ids(d: &Imacri) -> BTreeSet<String> {
    std::fs::read_dir(d.root.join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64)
        .collect()
}

/// Blobs, active ingests and committed snapshots (layers) of `ns`.
pub async fn content_of(d: &Imacri) -> BTreeSet<String> {
    let ns = d.namespace.as_str();
    use containerd_client::services::v1::snapshots::{
        snapshots_client::SnapshotsClient, ListSnapshotsRequest,
    };
    use containerd_client::services::v1::{
        content_client::ContentClient, ListContentRequest, ListStatusesRequest,
    };
    fn in_ns<T>(ns: &str, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut()
            .insert("containerd-namespace", ns.parse().unwrap());
        r
    }
    let req = |m| in_ns(ns, m);
    let ch = containerd_client::connect(d.containerd()).await.unwrap();
    let mut found = BTreeSet::new();
    let mut blobs = ContentClient::new(ch.clone())
        .list(req(ListContentRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = blobs.message().await.unwrap() {
        found.extend(m.info.into_iter().map(|i| format!("blob {}", i.digest)));
    }
    for s in ContentClient::new(ch.clone())
        .list_statuses(in_ns(ns, ListStatusesRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner()
        .statuses
    {
        found.insert(format!("ingest {}", s.r#ref));
    }
    let mut snaps = SnapshotsClient::new(ch)
        .list(in_ns(
            ns,
            ListSnapshotsRequest {
                snapshotter: "overlayfs".into(),
                filters: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = snaps.message().await.unwrap() {
        found.extend(m.info.into_iter().map(|i| format!("snapshot {}", i.name)));
    }
    found
}

pub fn ima(mut cfg: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg
}

/// The pod shapes: with and without pause, plain and ima; the steps of
/// RunPodSandbox each goes through.
pub fn shapes(name: &str) -> Vec<(cri::PodSandboxConfig, &'static [&'static str])> {
    const PAUSE: &[&str] = &[
        "recorded",
        "namespaces+prepare",
        "task",
        "guards+start",
        "cni-wait",
        "ready",
    ];
    const INFRA_LESS: &[&str] = &["recorded", "namespaces", "guards", "cni", "ready"];
    let pauseless = |mut c: cri::PodSandboxConfig| {
        own_pids(&mut c);
        c
    };
    vec![
        (pod_config(&format!("{name}-p")), PAUSE),
        (pauseless(pod_config(&format!("{name}-n"))), INFRA_LESS),
        (ima(pod_config(&format!("{name}-ip"))), PAUSE),
        (
            ima(pauseless(pod_config(&format!("{name}-in")))),
            INFRA_LESS,
        ),
    ]
}

pub async fn sleeper_runs(rt: &mut Rt, pod: &str, cfg: &cri::PodSandboxConfig) -> String {
    let env = Env::get();
    let c = crate::client::start_container(
        rt,
        pod,
        cfg,
        container_config("c", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    let (code, out, err) = exec_sh(rt, &c, "echo ran").await;
    assert_eq!((code, out.trim()), (0, "ran"), "{err}");
    c
}

/// The container IDs of `pod`.
pub async fn containers_of(rt: &mut Rt, pod: &str) -> Vec<cri::Container> {
    rt.list_containers(cri::ListContainersRequest {
        filter: Some(cri::ContainerFilter {
            pod_sandbox_id: pod.into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap()
    .into_inner()
    .containers
}

/// The pod's measurement log (`attest log`).
pub fn pod_log(d: &Imacri, pod: &str) -> String {
    let (code, log, err) = crate::attest(d, &["log", pod]);
    assert_eq!(code, 0, "{err}");
    log
}

/// A container command that executes a new file every 100 ms for as long as
/// it runs: each execution is measured, or ran unmeasured.
pub const EXECUTES_NEW_FILES: &str = "i=0; while :; do i=$((i+1)); mkdir -p /tmp/l/$i; cp /bin/busybox /tmp/l/$i/true; /tmp/l/$i/true; sleep 0.1; done";

/// The steps of CreateContainer, then those of StartContainer.
pub fn container_steps() -> Vec<String> {
    let create = [
        "lease",
        "snapshot",
        "user",
        "volumes+spec",
        "nri+rules",
        "containerd",
        "record",
        "lease-end",
    ]
    .map(|s| format!("CreateContainer:{s}"));
    let start =
        ["io+mounts", "task", "guards+measure", "start"].map(|s| format!("StartContainer:{s}"));
    create.into_iter().chain(start).collect()
}

/// `container_steps` but the last of CreateContainer, which comes after
/// its answer is settled: those a call can still fail at.
pub fn failing_container_steps() -> Vec<String> {
    container_steps()
        .into_iter()
        .filter(|p| p != "CreateContainer:lease-end")
        .collect()
}

/// An imacri of its own (busybox pulled) running a pause-less ima pod
/// `name`, and a host directory for `with_volumes`: where the container
/// matrices cut their calls.
pub async fn ima_pod_node(
    name: &str,
) -> (Imacri, tempfile::TempDir, cri::PodSandboxConfig, String) {
    let env = Env::get();
    let d = Imacri::start_isolated(env).await.unwrap();
    d.pull(&env.busybox).await;
    let vol = tempfile::tempdir_in(&env.base).unwrap();
    let mut cfg = ima(pod_config(name));
    own_pids(&mut cfg);
    let mut rt = d.runtime().await.unwrap();
    let pod = crate::client::run_pod(&mut rt, &cfg).await.unwrap();
    (d, vol, cfg, pod)
}

/// A container `name` executing new files (`EXECUTES_NEW_FILES`), with
/// both kinds of volumes (`with_volumes`).
pub fn executing_with_volumes(name: &str, host: &Path) -> cri::ContainerConfig {
    let c = container_config(name, &Env::get().busybox, &["sh", "-c", EXECUTES_NEW_FILES]);
    with_volumes(c, host)
}

/// `c` with a host volume at /v (`host`; ID-mapped binds in a user
/// namespace pod) and the busybox image as a volume at /i.
pub fn with_volumes(mut c: cri::ContainerConfig, host: &Path) -> cri::ContainerConfig {
    c.mounts.push(cri::Mount {
        container_path: "/v".into(),
        host_path: host.to_string_lossy().into(),
        ..Default::default()
    });
    c.mounts.push(cri::Mount {
        container_path: "/i".into(),
        image: crate::client::image(&Env::get().busybox),
        readonly: true,
        ..Default::default()
    });
    c
}

/// The call a container step is in: StartContainer of `started` (from
/// `created_for`), else CreateContainer of `c`; the container's ID.
pub async fn create_or_start(
    rt: &mut Rt,
    started: Option<String>,
    (pod, cfg): (&str, &cri::PodSandboxConfig),
    c: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    match started {
        Some(id) => rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map(|_| id),
        None => crate::client::create_container(rt, pod, cfg, c).await,
    }
}

/// A pod (`pod`, gone now) whose creation was cut short left what was there
/// `before` and gave its address back; kubelet's retry of its config runs
/// a container and is removed to what was there.
pub async fn rolled_back_then_retried(
    d: &Imacri,
    rt: &mut Rt,
    (pod, cfg): (&str, &cri::PodSandboxConfig),
    before: &Made,
    case: &str,
) {
    back_to(d, before, case).await;
    assert!(
        !addressed(Env::get()).contains(pod),
        "{case}: its address was not given back"
    );
    let retry = crate::client::run_pod(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("{case}: the retry: {e}\n{}", d.log()));
    sleeper_runs(rt, &retry, cfg).await;
    crate::client::remove_pod(rt, &retry).await;
    back_to(d, before, &format!("{case}, after the retry's removal")).await;
}

/// StopPodSandbox, then RemovePodSandbox, of `pod`: the first error.
pub async fn stop_and_remove(rt: &mut Rt, pod: &str) -> Result<(), tonic::Status> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    Ok(())
}

/// kubelet's next stop and removal of `pod`, after one was cut short:
/// they work, and leave what was there `before`, its address given back.
pub async fn finished_by_the_next_call(
    d: &Imacri,
    rt: &mut Rt,
    pod: &str,
    before: &Made,
    case: &str,
) {
    stop_and_remove(rt, pod)
        .await
        .unwrap_or_else(|e| panic!("{case}: the next stop and removal: {e}\n{}", d.log()));
    back_to(d, before, case).await;
    assert!(
        !addressed(Env::get()).contains(pod),
        "{case}: its address was kept"
    );
}

/// Steps of the calls that unmake a pod (StopPodSandbox, RemovePodSandbox)
/// and a container (RemoveContainer, and the teardown both use).
pub const UNMAKE_STEPS: [&str; 7] = [
    "StopPodSandbox:containers",
    "StopPodSandbox:released",
    "RemovePodSandbox:containers",
    "RemovePodSandbox:teardown",
    "teardown:task",
    "teardown:containerd",
    "RemoveContainer:teardown",
];

/// For a StartContainer step, the container to start (created now, before
/// the call is cut); none for a CreateContainer step.
pub async fn created_for(
    point: &str,
    rt: &mut Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> Option<String> {
    if !point.starts_with("StartContainer:") {
        return None;
    }
    Some(
        crate::client::create_container(rt, pod, cfg, c)
            .await
            .unwrap_or_else(|e| panic!("{point}: creating the container to start: {e}")),
    )
}
