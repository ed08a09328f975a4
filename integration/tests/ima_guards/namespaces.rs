//! memfd execution and nested namespaces, the pause container's mounts, a root
//! that cannot be sealed or executed from.

use super::*;

/// Copies /bin/busybox into a memfd and executes it (as `echo`), first with
/// MFD_EXEC, then with no flags; prints what stopped it.
const MEMFD_EXEC_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>
#ifndef MFD_EXEC
#define MFD_EXEC 0x10U
#endif
int main(void) {
    unsigned flags[] = {MFD_EXEC, 0};
    for (int i = 0; i < 2; i++) {
        int fd = memfd_create("payload", flags[i]);
        if (fd < 0) { printf("memfd_create(%u): %s\n", flags[i], strerror(errno)); continue; }
        int src = open("/bin/busybox", O_RDONLY);
        struct stat st;
        fstat(src, &st);
        sendfile(fd, src, NULL, st.st_size);
        char *argv[] = {"echo", "memfd-exec-ran", NULL};
        char *envp[] = {NULL};
        fexecve(fd, argv, envp);
        printf("fexecve(%u): %s\n", flags[i], strerror(errno));
    }
    return 1;
}
"#;

async fn attacker_image(env: &Env) -> String {
    // Built once for the tests of this file, which run side by side.
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            busybox_with_c(&env.base, &env.registry, "memfdexec", MEMFD_EXEC_C).unwrap()
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn memfd_and_nested_namespaces_fail_closed_in_ima_pods() {
    let env = Env::get();
    let image = attacker_image(env).await;
    let d = Imacri::start(env).await.unwrap();
    d.pull(&image).await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);

    // The control: in a plain pod both escapes work on this kernel.
    let plain = pod_config("guard-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    let (_, out, _) = exec_sh(&mut rt, &c, "memfdexec").await;
    assert!(
        out.contains("memfd-exec-ran"),
        "control: memfd exec works: {out}"
    );
    assert_eq!(
        sh_ok(&mut rt, &c, "cat /proc/sys/vm/memfd_noexec").await,
        "0"
    );
    let (code, _, err) = exec_sh(&mut rt, &c, "unshare -U -r true").await;
    assert_eq!(code, 0, "control: nested user namespaces work: {err}");
    // A capability spelt in lowercase is granted as any other.
    let mut admin = sleeper("admin");
    admin
        .linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: vec!["cap_sys_admin".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let admin = start_container(&mut rt, &pod, &plain, admin).await;
    let eff = sh_ok(&mut rt, &admin, "grep CapEff /proc/self/status | cut -f2").await;
    let eff = u64::from_str_radix(eff.trim(), 16).unwrap();
    assert_ne!(
        eff & (1 << 21),
        0,
        "control: cap_sys_admin is CAP_SYS_ADMIN"
    );

    // In an ima pod: every pid namespace forbids executable memfds, the
    // pod's user namespace allows no nested one.
    for (cfg, pause) in ima_shapes("guard-ima") {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert_pause(&mut rt, &pod, pause).await;
        let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
        let b = start_container(&mut rt, &pod, &cfg, sleeper("b")).await;
        for c in [&a, &b] {
            assert_eq!(
                sh_ok(&mut rt, c, "cat /proc/sys/vm/memfd_noexec").await,
                "2"
            );
            let (code, out, _) = exec_sh(&mut rt, c, "memfdexec").await;
            assert_ne!(code, 0, "{out}");
            assert!(!out.contains("memfd-exec-ran"), "memfd payload ran: {out}");
            assert!(out.contains("Permission denied"), "{out}");
            assert_eq!(
                sh_ok(&mut rt, c, "cat /proc/sys/user/max_user_namespaces").await,
                "0"
            );
            let (code, _, err) = exec_sh(
            &mut rt,
            c,
            "unshare -U -r -m sh -c 'mount -t tmpfs t /mnt && cp /bin/busybox /mnt/true && /mnt/true'",
        )
        .await;
            assert_ne!(code, 0, "nested user namespace + fresh tmpfs ran");
            assert!(err.contains("No space left on device"), "{err}");
            // Raising the limit back needs CAP_SYS_RESOURCE, which is refused.
            let (code, _, _) =
                exec_sh(&mut rt, c, "echo 1 > /proc/sys/user/max_user_namespaces").await;
            assert_ne!(code, 0);
        }

        // Capabilities that would undo the guards are refused, naming the
        // field, however they are spelt: the spec takes any case, with or
        // without `CAP_` (a lowercase `cap_sys_admin` was granted, and let
        // the pod mount an unmarked tmpfs, until 2026-12-04).
        for cap in [
            "SYS_ADMIN",
            "CAP_SYS_RESOURCE",
            "ALL",
            "SYS_PTRACE",
            "cap_sys_admin",
            "Cap_Sys_Resource",
            "all",
        ] {
            let mut c = sleeper("caps");
            c.linux
                .get_or_insert_with(Default::default)
                .security_context = Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec![cap.into()],
                    ..Default::default()
                }),
                ..Default::default()
            });
            let e = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(c),
                    sandbox_config: Some(cfg.clone()),
                })
                .await
                .expect_err(cap);
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(
                e.message().contains("capabilities.add_capabilities") && e.message().contains(cap),
                "{e}"
            );
        }
        for p in [&pod] {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: p.to_string(),
            })
            .await
            .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pause_containers_mounts_are_noexec_in_ima_pods() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    // pid POD: pause is /proc/1 of the container, its mounts reachable
    // through /proc/1/root.
    let pod_ns = || cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let mut cfg = ima(pod_config("guard-pause"));
    cfg.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(pod_ns()),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let mut c = container_config("c", &env.busybox, &["sleep", "1000"]);
    c.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxContainerSecurityContext {
        namespace_options: Some(pod_ns()),
        ..Default::default()
    });
    let c = start_container(&mut rt, &pod, &cfg, c).await;
    // Pause's pid namespace got the guard when the pod started; the
    // container joins it rather than getting a helper of its own.
    assert_eq!(
        sh_ok(&mut rt, &c, "cat /proc/sys/vm/memfd_noexec").await,
        "2"
    );
    let pause = sh_ok(&mut rt, &c, "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(pause.contains("pause"), "/proc/1 is pause: {pause}");
    let mounts = sh_ok(&mut rt, &c, "cat /proc/1/mountinfo").await;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (point, opts) = (f[4], f[5]);
        let sep = f.iter().position(|x| *x == "-").unwrap();
        let (root, fstype) = (f[3], f[sep + 1]);
        // runc's device nodes (and the masks over /proc files), bound one
        // file each from the host's /dev: execve needs a regular file, so a
        // device node cannot be executed whatever its mount says.
        let device = fstype == "devtmpfs"
            && ["/null", "/zero", "/full", "/random", "/urandom", "/tty"].contains(&root);
        // runc's masks over /proc and /sys directories: empty read-only tmpfs.
        let mask = fstype == "tmpfs"
            && (point.starts_with("/proc/") || point.starts_with("/sys/"))
            && opts.split(',').any(|o| o == "ro");
        // "/" too: pause's rootfs is sealed noexec once pause runs.
        if device || mask {
            continue;
        }
        assert!(
            opts.split(',').any(|o| o == "noexec"),
            "pause mount {point} allows exec: {l}"
        );
    }
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// The pause seal runs after RunPodSandbox returns; if it fails, no
/// container of the pod may start (fail closed), and the pod still goes away
/// cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn containers_of_a_pod_whose_pause_is_not_sealed_do_not_start() {
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    d.kill();
    d.vars = vec![("IMACRI_TEST_SEAL_FAIL".into(), "1".into())];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima(pod_config("guard-unsealed"));
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = imacri_integration::client::create_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("c", &env.busybox, &["sleep", "1000"]),
    )
    .await
    .unwrap();
    let e = rt
        .start_container(cri::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .expect_err("a container of an unsealed ima pod started");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("noexec"), "{e}");
    let st = imacri_integration::client::container_status(&mut rt, &c).await;
    assert_ne!(st.state, cri::ContainerState::ContainerRunning as i32);
    // RemovePodSandbox stops what is left.
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// imacri's container init is bind-mounted from imacri's root directory,
/// and a bind mount keeps its source's noexec: on a node whose root is on a
/// noexec filesystem, containers of fanotify-measured pods are refused with
/// a reason a person can act on (and `imacri check` says so), instead of
/// each failing to exec its init. Plain pods are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn a_noexec_root_refuses_measured_containers_clearly() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let root = work.path().join("noexec-root");
    std::fs::create_dir_all(&root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOEXEC,
        Some("size=64m"),
    )
    .unwrap();
    // Unmounted however the test ends (after the daemon, declared later,
    // is dropped).
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(root.clone());
    let root_arg = root.to_string_lossy().to_string();
    let d = Imacri::start_with(env, &["--root", &root_arg])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);
    let plain = pod_config("noexec-plain");
    let plain_pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &plain_pod, &plain, sleeper("c")).await;
    assert_eq!(sh_ok(&mut rt, &c, "echo plain").await, "plain");
    let cfg = ima(pod_config("noexec-ima"));
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let e = imacri_integration::client::create_container(&mut rt, &pod, &cfg, sleeper("m"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("noexec"), "{e:?}");
    let out = std::process::Command::new(imacri_integration::imacri_bin())
        .args(["check", "--root", &root_arg])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with("ima-landlock"));
    assert!(
        line.is_some_and(|l| l.contains("missing") && l.contains("noexec")),
        "{text}"
    );
    for p in [plain_pod, pod] {
        imacri_integration::client::remove_pod(&mut rt, &p).await;
    }
}
