//! Reads the policy measures: by in-pod root's threads, on tmpfs volumes.

use super::*;

/// A FILE_CHECK rule with uid=0 measures files read by in-pod root (the
/// rule's uid is the in-pod one, mapped to the host uid the kernel reports),
/// not reads by other users.
#[tokio::test(flavor = "multi_thread")]
async fn reads_by_in_pod_root_are_measured() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[ima.policies.default]\n[ima.policies.reads]\nrules = [\"measure func=BPRM_CHECK mask=MAY_EXEC\", \"measure func=FILE_CHECK mask=^MAY_READ uid=0\"]\n",
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let reader = thread_reader_image(env);
    d.pull(&reader).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("reads", Some("reads"));
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let root = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    let mut user = container_config("user", &env.busybox, &["sleep", "1000"]);
    user.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let user = start_container(&mut rt, &pod, &cfg, user).await;
    // (runc itself reads /etc/passwd and /etc/group as in-pod root for every
    // exec, so the files here are ones only the workload touches.)
    sh_ok(
        &mut rt,
        &root,
        "echo secret > /tmp/by-root; cat /tmp/by-root >/dev/null",
    )
    .await;
    sh_ok(
        &mut rt,
        &user,
        "echo mine > /tmp/by-user; cat /tmp/by-user >/dev/null",
    )
    .await;
    // A process whose leader dropped to uid 1000 with a raw setresuid (its
    // own credentials only) while a second thread stayed root: the root
    // thread's read is measured, the leader's is not.
    let mixed = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("mixed", &reader, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &mixed,
            "echo by-thread > /tmp/by-thread; echo by-leader > /tmp/by-leader; echo by-euid > /tmp/by-euid; threadread /tmp/by-thread /tmp/by-leader /tmp/by-euid"
        )
        .await,
        "READ"
    );
    let log = log_lines(&d, &pod);
    let thread_digest = format!("sha256:{}", hex_sha256(b"by-thread\n"));
    assert!(
        log.iter().any(|l| l.contains(" /tmp/by-thread ")
            && l.contains(&thread_digest)
            && l.ends_with(" read")),
        "a root thread's read in a process whose leader is uid 1000: {log:?}"
    );
    // `uid=0` is the real uid, as IMA's: a read with effective uid 1000 by
    // a task whose real uid is 0 is measured.
    let euid_digest = format!("sha256:{}", hex_sha256(b"by-euid\n"));
    assert!(
        log.iter()
            .any(|l| l.contains(" /tmp/by-euid ") && l.contains(&euid_digest)),
        "a real-uid-0 read with effective uid 1000: {log:?}"
    );
    // (Only the root shell's open that wrote it, empty then, is.)
    let leader_digest = format!("sha256:{}", hex_sha256(b"by-leader\n"));
    assert!(
        !log.iter().any(|l| l.contains(&leader_digest)),
        "the uid-1000 leader's read is not measured: {log:?}"
    );
    let root_file_digest = format!("sha256:{}", hex_sha256(b"secret\n"));
    assert!(
        log.iter().any(|l| l.contains(" /tmp/by-root ")
            && l.contains(&root_file_digest)
            && l.contains(&root)
            && l.ends_with(" read")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains(" /tmp/by-user ")),
        "opens by uid 1000 are not measured: {log:?}"
    );
}

/// `threadread ROOT_FILE LEADER_FILE EUID_FILE`: a second thread is
/// started as root, the leader drops to uid 1000 with a raw `setresuid`
/// (its own credentials only; glibc's would change every thread's) and
/// reads LEADER_FILE, then the root thread reads ROOT_FILE, takes effective
/// uid 1000 (real uid still 0) and reads EUID_FILE. Prints READ.
const THREAD_READ_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
static int go[2];
static char *third;
static void *reader(void *path) {
    char c, b[64];
    if (read(go[0], &c, 1) != 1) return (void *)1;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("thread read"); return (void *)1; }
    /* Real uid 0, effective 1000: IMA's uid= is the real uid. */
    if (syscall(SYS_setresuid, 0, 1000, 0)) { perror("setresuid"); return (void *)1; }
    fd = open(third, O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("euid read"); return (void *)1; }
    return 0;
}
int main(int argc, char **argv) {
    pthread_t t;
    void *r;
    char b[64];
    if (argc < 4 || pipe(go)) return 2;
    third = argv[3];
    if (pthread_create(&t, 0, reader, argv[1])) return 2;
    if (syscall(SYS_setresuid, 1000, 1000, 1000)) { perror("setresuid"); return 1; }
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("leader read"); return 1; }
    if (write(go[1], "x", 1) != 1 || pthread_join(t, &r) || r) return 1;
    printf("READ\n");
    return 0;
}
"#;

fn thread_reader_image(env: &Env) -> String {
    imacri_integration::images::busybox_with_c(
        &env.base,
        &env.registry,
        "threadread",
        THREAD_READ_C,
    )
    .unwrap()
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// `volumes = "measure"`: a volume that is a tmpfs of its own is marked and
/// its executions are measured (path as the container sees it); so is a
/// volume on the host's disk, through the container's mount (noexec until
/// 2026-12-05).
#[tokio::test(flavor = "multi_thread")]
async fn tmpfs_volumes_are_measured_when_the_policy_says_so() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[ima.policies.default]\n[ima.policies.vols]\nvolumes = \"measure\"\n",
    )
    .unwrap();
    // Where kubelet keeps the pod's memory-backed emptyDir: only there is
    // a tmpfs the pod's own.
    let cfg = ima_pod("vols", Some("vols"));
    let tv = imacri_integration::kubelet_tmpfs_volume(work.path(), &cfg, "tv");
    let dv = work.path().join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    for d in [&tv, &dv] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy("/bin/busybox", d.join("true")).unwrap();
    }
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let mut cc = sleeper(env);
    for (dest, src) in [("/tv", &tv), ("/dv", &dv)] {
        cc.mounts.push(cri::Mount {
            container_path: dest.into(),
            host_path: src.to_string_lossy().into(),
            ..Default::default()
        });
    }
    let c = start_container(&mut rt, &pod, &cfg, cc).await;
    let (_, out, err) = exec_sh(&mut rt, &c, "/tv/true; echo rc=$?").await;
    assert!(out.contains("rc=0"), "{out}{err}\n{}", d.log());
    let (_, out, err) = exec_sh(&mut rt, &c, "/dv/true; echo rc=$?").await;
    assert!(out.contains("rc=0"), "{out}{err}");
    let log = log_lines(&d, &pod);
    for p in [" /tv/true ", " /dv/true "] {
        assert!(
            log.iter().any(|l| l.contains(p) && l.ends_with(" exec")),
            "{p}: {log:?}"
        );
    }
    // A measured volume unmounted on the host between create and start: the
    // container binds what CreateContainer checked (imacri's staged view of
    // that tmpfs), and that is what is marked, not whatever the host path
    // names at the start (the disk below it; until 2026-12-04 the host path
    // was looked at again, and the start refused).
    let mut late = container_config("late", &env.busybox, &["sleep", "1000"]);
    late.mounts.push(cri::Mount {
        container_path: "/tv".into(),
        host_path: tv.to_string_lossy().into(),
        ..Default::default()
    });
    let late = imacri_integration::client::create_container(&mut rt, &pod, &cfg, late)
        .await
        .unwrap();
    nix::mount::umount2(&tv, nix::mount::MntFlags::MNT_DETACH).unwrap();
    std::fs::write(tv.join("below"), "disk").unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: late.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let (_, out, err) = exec_sh(&mut rt, &late, "ls /tv; /tv/true; echo rc=$?").await;
    assert!(out.contains("rc=0") && !out.contains("below"), "{out}{err}");
    let log = log_lines(&d, &pod);
    assert!(
        log.iter()
            .any(|l| l.contains(&late) && l.contains(" /tv/true ") && l.ends_with(" exec")),
        "{log:?}"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}
