//! What an attacker inside an ima pod would try against the fanotify
//! backend, which sees only the filesystems it marks: executing from a
//! memfd (the kernel's internal shm mount), a nested user namespace with
//! a fresh tmpfs, and a node interpreter binfmt_misc opened in advance.
//! Each works in a plain pod (the control) and fails closed in an ima pod;
//! capabilities that would undo the guards are refused.

use imacri_integration::client::{create_container, exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::images::busybox_with_c;
use imacri_integration::{container_config, cri, pod_config, Env, Imacri};
use tonic::Code;

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

fn ima(mut cfg: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg
}

/// Both shapes of an ima pod: sharing a pid namespace (pause is its init,
/// guarded through it) and as kubelet sends most pods, pid CONTAINER (no
/// pause: the user namespace is guarded by itself, each container's pid
/// namespace on its own).
fn ima_shapes(name: &str) -> [(cri::PodSandboxConfig, bool); 2] {
    let mut own = ima(pod_config(&format!("{name}-nopause")));
    imacri_integration::own_pids(&mut own);
    [(ima(pod_config(name)), true), (own, false)]
}

/// The pod's verbose info says whether it runs a pause process.
async fn assert_pause(rt: &mut imacri_integration::client::Rt, pod: &str, pause: bool) {
    let info = imacri_integration::client::pod_info(rt, pod).await;
    assert_eq!(info["infraContainer"], pause, "{info}");
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

/// A static program standing for an interpreter a node admin registered
/// with binfmt_misc (qemu-user-static, say): it says it ran and on what.
const HOST_INTERPRETER_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    printf("HOST-INTERPRETER-RAN %s\n", argc > 1 ? argv[1] : "");
    return 0;
}
"#;

/// A binfmt_misc entry of the node's, removed (and binfmt_misc unmounted if
/// the test mounted it) however the test ends.
struct NodeBinfmt {
    entry: std::path::PathBuf,
    mounted: bool,
}

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

impl NodeBinfmt {
    /// Registers `interpreter` with the `F` flag (opened now, in the node's
    /// mount namespace) for files starting with `magic`.
    fn register(name: &str, magic: &str, interpreter: &std::path::Path) -> NodeBinfmt {
        let register = std::path::Path::new(BINFMT).join("register");
        let mounted = !register.exists();
        if mounted {
            nix::mount::mount(
                Some("binfmt_misc"),
                BINFMT,
                Some("binfmt_misc"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
        }
        let guard = NodeBinfmt {
            entry: std::path::Path::new(BINFMT).join(name),
            mounted,
        };
        std::fs::write(
            &register,
            format!(":{name}:M::{magic}::{}:F", interpreter.display()),
        )
        .unwrap();
        guard
    }
}

impl Drop for NodeBinfmt {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.entry, "-1");
        if self.mounted {
            let _ = nix::mount::umount2(BINFMT, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// An interpreter the node registered with binfmt_misc's `F` flag was
/// opened when it was registered: executing a file that matches it runs
/// that node file, which no fanotify mark of the pod covers and Landlock
/// does not judge (the open happened with the registrant's credentials).
/// Each ima pod's user namespace gets its own, empty binfmt_misc instance
/// before anything of the pod runs, so the node's entries do not apply
/// there; plain pods (and the node) keep them.
#[tokio::test(flavor = "multi_thread")]
async fn node_binfmt_interpreters_do_not_run_in_ima_pods() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let interpreter = work.path().join("hostinterp");
    // compile_c leaves the binary at `<dir>/<name>`.
    imacri_integration::images::compile_c(work.path(), "hostinterp", HOST_INTERPRETER_C, &[])
        .unwrap();
    std::fs::set_permissions(
        &interpreter,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let unique = format!("{:08x}", std::process::id() ^ rand_u32());
    let magic = format!("IMACRIBINFMT{unique}");
    let _entry = NodeBinfmt::register(&format!("imacri-test-{unique}"), &magic, &interpreter);
    let run =
        format!("printf '{magic}\\n' > /tmp/foreign && chmod +x /tmp/foreign && /tmp/foreign");
    let check = std::process::Command::new(imacri_integration::imacri_bin())
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with("ima-binfmt"));
    assert!(
        line.is_some_and(|l| l.contains(" ok ") && !l.contains("(0 opened")),
        "{text}"
    );

    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);

    // The control: in a plain pod the node's interpreter runs.
    let plain = pod_config("binfmt-plain");
    let plain_pod = run_pod(&mut rt, &plain).await.unwrap();
    let p = start_container(&mut rt, &plain_pod, &plain, sleeper("c")).await;
    let (_, out, err) = exec_sh(&mut rt, &p, &run).await;
    assert!(
        out.contains("HOST-INTERPRETER-RAN /tmp/foreign"),
        "control: the node's interpreter runs in a plain pod: {out} {err}"
    );

    // In an ima pod (both containers, and an exec) it does not: the file is
    // no format the pod's binfmt_misc knows, and busybox's shell falls back
    // to reading it as a script.
    for (cfg, pause) in ima_shapes("binfmt-ima") {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert_pause(&mut rt, &pod, pause).await;
        let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
        let b = start_container(
            &mut rt,
            &pod,
            &cfg,
            container_config(
                "b",
                &env.busybox,
                &["sh", "-c", &format!("{run}; sleep 1000")],
            ),
        )
        .await;
        for c in [&a, &b] {
            let (code, out, err) = exec_sh(&mut rt, c, &run).await;
            assert!(
                !out.contains("HOST-INTERPRETER-RAN"),
                "the node's interpreter ran in an ima pod: {out}"
            );
            assert_ne!(code, 0, "{out} {err}");
            assert!(err.contains(&magic) && err.contains("not found"), "{err}");
            // Nor can the pod give its own binfmt_misc an entry: reaching its
            // register file needs a mount of it (CAP_SYS_ADMIN).
            let (code, _, err) = exec_sh(
                &mut rt,
                c,
                "mkdir -p /tmp/bm && mount -t binfmt_misc binfmt_misc /tmp/bm",
            )
            .await;
            assert_ne!(code, 0, "an ima container mounted binfmt_misc");
            assert!(
                err.contains("ermission denied") || err.contains("not permitted"),
                "{err}"
            );
        }
        // b's own command tried the same before the execs above.
        let logs = imacri_integration::client::container_status(&mut rt, &b)
            .await
            .log_path;
        let logged = std::fs::read_to_string(&logs).unwrap();
        assert!(logged.contains(&magic), "b's command did not run: {logged}");
        assert!(!logged.contains("HOST-INTERPRETER-RAN"), "{logged}");
        imacri_integration::client::remove_pod(&mut rt, &pod).await;
    }

    // The node's entry is untouched: plain pods still use it.
    let (_, out, _) = exec_sh(&mut rt, &p, &run).await;
    assert!(out.contains("HOST-INTERPRETER-RAN"), "{out}");
    imacri_integration::client::remove_pod(&mut rt, &plain_pod).await;
}

/// Enough to keep two runs of this test on one node apart.
fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// A pod of `cfg` running container `c`: (pod, container).
async fn pod_with(
    rt: &mut imacri_integration::client::Rt,
    d: &Imacri,
    cfg: &cri::PodSandboxConfig,
    c: cri::ContainerConfig,
) -> (String, String) {
    let pod = run_pod(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = start_container(rt, &pod, cfg, c).await;
    (pod, c)
}

/// Mounts made by this test on the host, taken down (deepest first) when
/// it ends, also when it fails.
struct HostMounts(Vec<std::path::PathBuf>);

impl HostMounts {
    fn mount(&mut self, args: &[&str], at: &std::path::Path) {
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount {args:?} {}", at.display());
        self.0.push(at.to_path_buf());
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-R")
                .arg(p)
                .status();
        }
    }
}

/// A volume brings the mounts beneath its host path along (a bind is
/// recursive), each with its own flags: a hostPath of a directory holding a
/// tmpfs (`/run`, `/dev`, kubelet's pods) held an executable filesystem no
/// mark of the pod watches, beneath the container's root where its
/// Landlock rule allows executions; and a volume with HostToContainer
/// propagation takes the host's later mounts, executable, too. Until
/// 2026-12-04 a program on either ran unmeasured in measure and enforce
/// mode. Now every mount of a volume's tree is noexec (a tmpfs volume with
/// a mount beneath it is not measured, all of it noexec), and propagation
/// from the host is refused. Under `volumes = "measure"` a volume with a
/// mount beneath it stays noexec, all of it.
#[tokio::test(flavor = "multi_thread")]
async fn mounts_beneath_a_volume_do_not_run() {
    use imacri_integration::escapes::{ima as ima_policy, node, stop_pod};
    let env = Env::get();
    let (d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    let mut rt = d.runtime().await.unwrap();
    let mut mounts = HostMounts(Vec::new());
    let policies =
        ["measure", "strict", "vols"].map(|p| (p, ima_policy(&format!("beneath-{p}"), p)));
    // dir/sub: a tmpfs beneath a plain directory; mem: a tmpfs of its own
    // (a measurable volume, the `vols` pod's emptyDir) with another beneath
    // it; later: a shared mount the host mounts beneath after the start.
    let (dir, mem, later) = (
        work.path().join("dir"),
        imacri_integration::kubelet_volume(work.path(), &policies[2].1, "mem"),
        work.path().join("later"),
    );
    for p in [&dir.join("sub"), &later] {
        std::fs::create_dir_all(p).unwrap();
    }
    mounts.mount(&["-t", "tmpfs", "sub"], &dir.join("sub"));
    mounts.mount(&["-t", "tmpfs", "mem"], &mem);
    std::fs::create_dir_all(mem.join("sub")).unwrap();
    mounts.mount(&["-t", "tmpfs", "memsub"], &mem.join("sub"));
    mounts.mount(&["--bind", later.to_str().unwrap()], &later);
    mounts.mount(&["--make-rshared"], &later);
    for p in [dir.join("sub/busybox"), mem.join("sub/busybox")] {
        std::fs::copy("/bin/busybox", p).unwrap();
    }
    let vol = |dest: &str, host: &std::path::Path, p: cri::MountPropagation| cri::Mount {
        container_path: dest.into(),
        host_path: host.to_string_lossy().into(),
        propagation: p as i32,
        ..Default::default()
    };
    let private = cri::MountPropagation::PropagationPrivate;
    let h2c = cri::MountPropagation::PropagationHostToContainer;
    let with = |n: &str, ms: Vec<cri::Mount>| {
        let mut c = container_config(n, &image, &["sleep", "1000"]);
        c.mounts = ms;
        c
    };
    let run = "/d/sub/busybox true; echo rc=$?; /m/sub/busybox true; echo rc=$?";
    let later_mount = |mounts: &mut HostMounts, n: &str| {
        let at = later.join(n);
        std::fs::create_dir_all(&at).unwrap();
        mounts.mount(&["-t", "tmpfs", n], &at);
        std::fs::copy("/bin/busybox", at.join("busybox")).unwrap();
    };

    // The control: a plain pod runs all three.
    let ms = vec![
        vol("/d", &dir, private),
        vol("/m", &mem, private),
        vol("/l", &later, h2c),
    ];
    let (pod, c) = pod_with(&mut rt, &d, &pod_config("beneath-plain"), with("c", ms)).await;
    assert_eq!(sh_ok(&mut rt, &c, run).await, "rc=0\nrc=0");
    later_mount(&mut mounts, "plain");
    assert_eq!(
        sh_ok(&mut rt, &c, "/l/plain/busybox true; echo rc=$?").await,
        "rc=0"
    );
    stop_pod(&mut rt, &pod).await;

    for (policy, cfg) in policies {
        let ms = vec![vol("/d", &dir, private), vol("/m", &mem, private)];
        let (pod, c) = pod_with(&mut rt, &d, &cfg, with("c", ms)).await;
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        assert_eq!(out.trim_end(), "rc=126\nrc=126", "{policy}: {out}{err}");
        assert_eq!(
            err.matches("Permission denied").count(),
            2,
            "{policy}: {err}"
        );
        // Nothing of the host's mounts later comes in.
        let e = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(with("l", vec![vol("/l", &later, h2c)])),
                sandbox_config: Some(cfg.clone()),
            })
            .await
            .expect_err("HostToContainer in an ima pod");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message()
                .contains("mounts[0].propagation=PROPAGATION_HOST_TO_CONTAINER"),
            "{e}"
        );
        stop_pod(&mut rt, &pod).await;
    }
    // The pod's own tmpfs volume without a mount beneath it still runs,
    // measured (its filesystem marked); one that is not the pod's (another
    // pod's emptyDir: others execute there too) runs measured through the
    // container's mount (noexec until 2026-12-05).
    let cfg = ima_policy("beneath-own", "vols");
    let own = imacri_integration::kubelet_volume(work.path(), &cfg, "own");
    let theirs = imacri_integration::kubelet_volume(work.path(), &pod_config("other"), "own");
    for p in [&own, &theirs] {
        mounts.mount(&["-t", "tmpfs", "own"], p);
        std::fs::create_dir_all(p.join("sub")).unwrap();
        std::fs::copy("/bin/busybox", p.join("busybox")).unwrap();
        std::fs::copy("/bin/busybox", p.join("sub/busybox")).unwrap();
    }
    // subPaths as kubelet binds them: of the pod's own volume, and one
    // claiming that volume's name whose filesystem is another's.
    let subpaths = own
        .ancestors()
        .nth(3)
        .unwrap()
        .join("volume-subpaths/own/c");
    let (own_sub, their_sub) = (subpaths.join("0"), subpaths.join("1"));
    for (at, from) in [(&own_sub, &own), (&their_sub, &theirs)] {
        std::fs::create_dir_all(at).unwrap();
        mounts.mount(&["--bind", from.join("sub").to_str().unwrap()], at);
    }
    let ms = vec![
        vol("/o", &own, private),
        vol("/t", &theirs, private),
        vol("/os", &own_sub, private),
        vol("/ts", &their_sub, private),
    ];
    let (pod, c) = pod_with(&mut rt, &d, &cfg, with("c", ms)).await;
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "for p in /o /t /os /ts; do $p/busybox true; echo rc=$?; done",
    )
    .await;
    assert_eq!(out.trim_end(), "rc=0\nrc=0\nrc=0\nrc=0", "{out}{err}");
    let log = imacri_integration::escapes::log_lines(&d, &pod);
    for p in ["/o/busybox", "/t/busybox", "/os/busybox", "/ts/busybox"] {
        assert!(
            imacri_integration::escapes::logged(&log, p, None, "exec"),
            "{p}: {log:#?}"
        );
    }
    stop_pod(&mut rt, &pod).await;
    drop(mounts);
}

/// In a user namespace runc binds the host's file *at a device's container
/// path*, not the device's host path: a device mapped elsewhere (by a
/// device plugin, a CDI spec or any CRI client) brought that host file into
/// the container, executable and on a filesystem no mark watches, and it
/// ran unmeasured even under `enforce` (until 2026-12-04). Now such a
/// device is refused in every user-namespace pod, naming it; a device at
/// its own path works, and a pod without a user namespace (where runc makes
/// the node) still takes any path, as containerd.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_mapped_elsewhere_brings_no_host_file() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let host_file = work.path().join(format!("host-program-{}", rand_u32()));
    std::fs::copy("/bin/busybox", &host_file).unwrap();
    let host_file = host_file.to_string_lossy().into_owned();
    let with_device = |host: &str, at: &str| {
        let mut c = container_config("c", &env.busybox, &["sleep", "1000"]);
        c.devices.push(cri::Device {
            host_path: host.into(),
            container_path: at.into(),
            permissions: "rw".into(),
        });
        c
    };

    // Without a user namespace runc makes the node: a null device there.
    let plain = pod_config("device-plain");
    let (pod, c) = pod_with(&mut rt, &d, &plain, with_device("/dev/null", &host_file)).await;
    assert_eq!(
        sh_ok(&mut rt, &c, &format!("test -c {host_file} && echo node")).await,
        "node"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;

    let mut userns = pod_config("device-userns");
    imacri_integration::pod_userns(&mut userns, 3_200_000);
    for cfg in [ima(pod_config("device-ima")), userns] {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let e = create_container(&mut rt, &pod, &cfg, with_device("/dev/null", &host_file))
            .await
            .expect_err("a device whose container path names a host file");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(&host_file), "{e}");
        // A device at its own path is bound as itself.
        let c = start_container(&mut rt, &pod, &cfg, with_device("/dev/kmsg", "/dev/kmsg")).await;
        assert_eq!(
            sh_ok(&mut rt, &c, "test -c /dev/kmsg && echo node").await,
            "node"
        );
        imacri_integration::client::remove_pod(&mut rt, &pod).await;
    }
}

/// Under `volumes = "measure"`, a volume whose host path runs through a
/// directory the pod controls (in a disk volume of its own) could name the
/// host's tmpfs when CreateContainer bound it and the pod's own memory
/// volume when it checked it (and when StartContainer marked it): the pod
/// swaps that directory for links. The host's tmpfs was then executable in
/// the container and unmarked, and a program there ran unmeasured (until
/// 2026-12-04). Now what is bound is compared with what was checked (device
/// and inode), and what is marked is what is bound: the host's tmpfs,
/// through the container's mount (since 2026-12-05 every volume on a local
/// filesystem runs, measured). The moments between the
/// steps are widened here (IMACRI_TEST_VOLUME_CHECK_WINDOW) and the links
/// swapped in them.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_swapped_under_its_check_does_not_run() {
    use imacri_integration::escapes::{ima as ima_policy, log_lines, logged, node, stop_pod};
    let env = Env::get();
    let (mut d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    d.kill();
    d.vars = vec![("IMACRI_TEST_VOLUME_CHECK_WINDOW".into(), "1500".into())];
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let mut mounts = HostMounts(Vec::new());
    let cfg = ima_policy("swap-vol", "vols");
    let own = imacri_integration::kubelet_volume(work.path(), &cfg, "mem");
    let host = work.path().join("host-shm");
    std::fs::create_dir_all(&host).unwrap();
    for (p, whose) in [(&own, "pod's"), (&host, "host's")] {
        mounts.mount(&["-t", "tmpfs", "swap"], p);
        std::fs::copy("/bin/busybox", p.join("busybox")).unwrap();
        std::fs::write(p.join("whose"), whose).unwrap();
    }
    // A directory in a volume of the pod's own (a disk emptyDir), which the
    // pod turns into links at will.
    let disk = work.path().join("disk");
    let dir = disk.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let point = |to: Option<&std::path::Path>| {
        let _ = std::fs::remove_file(&dir);
        let _ = std::fs::remove_dir(&dir);
        match to {
            Some(to) => std::os::unix::fs::symlink(to, &dir).unwrap(),
            None => std::fs::create_dir(&dir).unwrap(),
        }
    };
    let with = |n: &str| {
        let mut c = container_config(n, &image, &["sleep", "1000"]);
        c.mounts = vec![cri::Mount {
            container_path: "/v".into(),
            host_path: dir.to_string_lossy().into(),
            ..Default::default()
        }];
        c
    };
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));

    // The control: it names the pod's own volume all along, which runs,
    // measured.
    point(Some(&own));
    let c = start_container(&mut rt, &pod, &cfg, with("own")).await;
    assert_eq!(
        sh_ok(&mut rt, &c, "/v/busybox true; echo rc=$?").await,
        "rc=0"
    );
    assert!(
        logged(&log_lines(&d, &pod), "/v/busybox", None, "exec"),
        "{}",
        d.log()
    );

    // A plain directory when CreateContainer resolves the path, the host's
    // tmpfs when it binds it, the pod's own volume when it checks it (each
    // step 1.5 s apart here).
    point(None);
    let mut rt2 = d.runtime().await.unwrap();
    let (p2, c2, swapped) = (pod.clone(), cfg.clone(), with("swapped"));
    let create = tokio::spawn(async move {
        rt2.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: p2,
            config: Some(swapped),
            sandbox_config: Some(c2),
        })
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(750)).await;
    point(Some(&host));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    point(Some(&own));
    let id = create.await.unwrap().unwrap().into_inner().container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    // The host's tmpfs is what the container has, and what was marked: it
    // runs measured through the container's mount (until 2026-12-05 the
    // host's tmpfs was noexec; marked as the pod's own, its filesystem, it
    // would have put the host's executions there into the pod's log).
    assert_eq!(sh_ok(&mut rt, &id, "cat /v/whose").await, "host's");
    assert_eq!(
        sh_ok(&mut rt, &id, "/v/busybox true; echo rc=$?").await,
        "rc=0"
    );
    let log = log_lines(&d, &pod);
    let swapped = imacri_integration::escapes::entries_of(&log, &id);
    assert!(logged(&swapped, "/v/busybox", None, "exec"), "{log:#?}");
    // The host's own execution there is none of the pod's.
    imacri_integration::escapes::host_run_not_logged(&d, &pod, &host.join("busybox"));
    stop_pod(&mut rt, &pod).await;
    drop(mounts);
}
