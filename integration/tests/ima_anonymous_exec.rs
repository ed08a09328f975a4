//! A policy with `anonymous_exec = "deny"` (SELinux's execmem/execmod for
//! an ima pod): executable memory that no file backs is refused, however
//! it is made. The attacker's ways: anonymous memory mapped executable, or
//! written and then made executable; a file's private copy written and
//! made executable, or made executable while writable (another process
//! could write it between imacri's look and the call); a file mapped writable and executable at once; the
//! stack the kernel maps executable for a program asking for it
//! (`PT_GNU_STACK` with PF_X); the
//! pages of an executable mapping of a sealed memfd filled by userfaultfd
//! (user-mode faults only, open to anyone); a child's code rewritten with
//! ptrace's pokes; a file mapped executable rewritten in place. Each runs in an ima pod whose policy allows it (the
//! control: IMA does not measure anonymous memory either), and is refused
//! with EPERM under `deny`, without a seccomp profile and with
//! RuntimeDefault, while ordinary programs (static and dynamic) run.
//! `/proc/self/mem` writes to one's own code (FOLL_FORCE, which no system
//! call filter sees) are refused by imacri's init: under `deny` no process
//! of the pod opens a file beneath procfs for writing (Landlock), its own
//! `mem` included, in the container's command and in every exec; writes
//! elsewhere work. A volume that would bring another procfs is refused.

use imacri_integration::client::{create_container, exec_sh, sh_ok, start_container};
use imacri_integration::escapes::*;
use imacri_integration::{attest, container_config, cri, Env, Imacri};

/// Violations `imacri attest verify --require-anonymous-exec-denied` finds
/// for `pod` because a container's policy allowed anonymous executable
/// memory (its start entry does not say otherwise).
fn allowing_anonymous_exec(d: &Imacri, pod: &str, golden: &std::path::Path) -> usize {
    let (_, out, err) = attest(
        d,
        &[
            "verify",
            "--pod",
            pod,
            "--policy",
            golden.to_str().unwrap(),
            "--allow-unanchored",
            "--require-anonymous-exec-denied",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["reason"]
                .as_str()
                .unwrap()
                .contains("anonymous_exec = \"allow\"")
        })
        .count()
}

/// A container given the node's userfaultfd device (which hands out what
/// the refused system call would).
fn with_userfaultfd(name: &str, image: &str) -> cri::ContainerConfig {
    let mut c = container_config(name, image, &["sleep", "1000"]);
    c.devices.push(cri::Device {
        container_path: "/dev/userfaultfd".into(),
        host_path: "/dev/userfaultfd".into(),
        permissions: "rw".into(),
    });
    c
}

/// 40 files written, closed, mapped executable and deleted at once (a
/// library unpacked, loaded and removed), while another process floods the
/// queue with closes after writing.
const FLOODED_MAPPINGS: &str = "(while :; do : > /tmp/flood; done) & \
     for i in $(seq 40); do escape mmap-unlink /tmp/lib$i.so || exit 1; done | grep -c RAN; \
     kill $!";

const WAYS: [&str; 8] = [
    "execstack",
    "anon-exec",
    "anon-mprotect",
    "cow-mprotect",
    "rw-mprotect",
    "wx-mmap",
    "uffd-exec",
    "poke-exec",
];

#[tokio::test(flavor = "multi_thread")]
async fn executable_memory_no_file_backs_is_refused_under_deny() {
    let env = Env::get();
    // A CDI device whose mount brings the host's /proc (a vendor's spec
    // could): nothing ID-maps CDI mounts, imacri's own check refuses it.
    let cdi = tempfile::tempdir_in(&env.base).unwrap();
    std::fs::write(
        cdi.path().join("proc.json"),
        r#"{"cdiVersion":"0.6.0","kind":"imacri.test/proc","devices":[{"name":"host","containerEdits":{"mounts":[{"hostPath":"/proc","containerPath":"/hostproc","options":["rbind","ro"]}]}}]}"#,
    )
    .unwrap();
    let (d, image, work) = node_args(
        env,
        "\n[ima.policies.nojit]\nanonymous_exec = \"deny\"\n[ima.policies.nojit-strict]\nmode = \"enforce\"\nanonymous_exec = \"deny\"\nallowlist = [\"{golden}\"]",
        &["--cdi-spec-dir", cdi.path().to_str().unwrap()],
    )
    .await;
    let mut rt = d.runtime().await.unwrap();

    // The control: a policy that allows it (the default). Without a
    // seccomp profile every way runs; RuntimeDefault has neither
    // userfaultfd nor ptrace.
    let (pod, a, _b) = two_containers(&d, &mut rt, "anon-control", "measure", &image).await;
    for m in WAYS {
        let (_, out, err) = exec_sh(&mut rt, &a, &format!("escape {m}")).await;
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}{err}");
    }
    let uffd = create_container(
        &mut rt,
        &pod,
        &ima("anon-control", "measure"),
        with_userfaultfd("u", &image),
    )
    .await;
    assert!(uffd.is_ok(), "the device in a pod that allows it: {uffd:?}");
    // A file mapped executable, then rewritten in place: in measure mode
    // the mapping runs what was written (a `tomtou` violation).
    let (_, out, err) = exec_sh(&mut rt, &a, "escape tomtou /tmp/t.bin").await;
    assert!(out.contains("RAN tomtou 43"), "control tomtou: {out}{err}");
    // /proc/self/mem rewrites one's own code unless the node boots with
    // proc_mem.force_override=never; procfs is writable as usual.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !cmdline.contains("proc_mem.force_override=never") {
        let (_, out, err) = exec_sh(&mut rt, &a, "escape procmem-exec").await;
        assert!(
            out.contains("RAN procmem-exec"),
            "control procmem: {out}{err}"
        );
    }
    sh_ok(
        &mut rt,
        &a,
        "cat /proc/self/oom_score_adj > /proc/self/oom_score_adj",
    )
    .await;
    // Files written, closed and mapped at once, while closes flood the
    // queue: no `tomtou` violation in measure mode either (see the deny pod).
    let out = sh_ok(&mut rt, &a, FLOODED_MAPPINGS).await;
    assert_eq!(out, "40");
    let log = d.log();
    let stale = log
        .lines()
        .find(|l| l.contains("tomtou") && l.contains("/tmp/lib"));
    assert!(stale.is_none(), "{stale:?}");
    // A verifier requiring it sees that both containers' policy allowed it.
    let golden = work.path().join("golden.json");
    assert_eq!(allowing_anonymous_exec(&d, &pod, &golden), 2);
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "anon-deny", "nojit", &image).await;
    // The container's own command goes through the init's rules too (not
    // only execs): it tries /proc/self/mem at its start.
    let cfg = ima("anon-deny", "nojit");
    let main = container_config(
        "main",
        &image,
        &[
            "sh",
            "-c",
            "escape procmem-exec > /tmp/main.out 2>&1; sleep 1000",
        ],
    );
    let main = start_container(&mut rt, &pod, &cfg, main).await;
    // A mount that brings another procfs along (its `mem` files are
    // beneath a top-level entry, where writes are allowed): refused. A
    // hostPath volume is ID-mapped for the pod's user namespace, which
    // procfs refuses; a CDI mount is not, imacri's check refuses it.
    for host in ["/proc", "/"] {
        let mut c = container_config("hostproc", &image, &["sleep", "1000"]);
        c.mounts.push(cri::Mount {
            container_path: "/host".into(),
            host_path: host.into(),
            readonly: true,
            ..Default::default()
        });
        let e = create_container(&mut rt, &pod, &cfg, c).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{host}: {e:?}");
    }
    let mut c = container_config("cdiproc", &image, &["sleep", "1000"]);
    c.cdi_devices = vec![cri::CdiDevice {
        name: "imacri.test/proc=host".into(),
    }];
    let e = create_container(&mut rt, &pod, &cfg, c).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("/hostproc binds /proc") && e.message().contains("procfs"),
        "{e:?}"
    );
    let uffd = create_container(
        &mut rt,
        &pod,
        &ima("anon-deny", "nojit"),
        with_userfaultfd("u", &image),
    )
    .await
    .unwrap_err();
    assert_eq!(uffd.code(), tonic::Code::InvalidArgument, "{uffd:?}");
    assert!(uffd.message().contains("userfaultfd device"), "{uffd:?}");
    for c in [&a, &b] {
        for m in WAYS {
            let (code, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert!(!out.contains("RAN"), "{m} ran under deny: {out}{err}");
            assert_ne!(code, 0, "{m}: {out}");
            // Under RuntimeDefault ptrace and userfaultfd fail before (its
            // own denial); without a profile each is imacri's EPERM.
            if c == &a {
                assert!(
                    out.contains(&format!("{m}: Operation not permitted")),
                    "{m}: {out}{err}\n{}",
                    d.log()
                );
            }
        }
        // A mapped file cannot be rewritten under its mapping, in measure
        // mode too: the write's open is refused (a `deny` entry).
        let (_, out, err) = exec_sh(&mut rt, c, "escape tomtou /tmp/t.bin").await;
        assert!(
            !out.contains("RAN") && out.contains("tomtou: Operation not permitted"),
            "tomtou under deny: {out}{err}"
        );
        // Once nothing maps it, it is written as any file (until
        // 2026-12-04 it stayed unwritable for the container's life); while
        // a process maps it, it is not.
        assert_eq!(
            sh_ok(&mut rt, c, "echo x > /tmp/t.bin && cat /tmp/t.bin").await,
            "x"
        );
        let held = sh_ok(
            &mut rt,
            c,
            "escape map-hold /tmp/h.bin 60 > /tmp/h.out 2>&1 & echo $! > /tmp/h.pid; \
             for i in $(seq 50); do grep -q MAPPED /tmp/h.out && break; sleep 0.1; done; \
             cat /tmp/h.out",
        )
        .await;
        assert_eq!(held, "MAPPED map-hold");
        let (code, out, err) = exec_sh(&mut rt, c, "echo x > /tmp/h.bin").await;
        assert_ne!(code, 0, "written under a mapping: {out}{err}");
        assert!(err.contains("Operation not permitted"), "{out}{err}");
        let out = sh_ok(
            &mut rt,
            c,
            "kill $(cat /tmp/h.pid); sleep 0.5; echo y > /tmp/h.bin; echo rc=$?",
        )
        .await;
        assert_eq!(out, "rc=0", "the mapping is gone");
        // A busy process (on a CPU at every look, its call unreadable) that
        // mapped nothing of it does not make it look mapped: only the calls
        // that mapped the file are waited for (until 2026-12-05 any task on
        // a CPU counted, and the write was refused).
        let out = sh_ok(
            &mut rt,
            c,
            "escape file-mmap /tmp/b.bin > /dev/null; \
             (while :; do :; done) & busy=$!; sleep 0.3; \
             echo z > /tmp/b.bin; rc=$?; kill $busy; echo rc=$rc",
        )
        .await;
        assert_eq!(out, "rc=0", "written while a busy process ran");
        // Cut by path (truncate(2): no open, the watch's lease breaks):
        // once nothing maps it, no violation (until 2026-12-04 a `tomtou`
        // that killed the container).
        let out = sh_ok(
            &mut rt,
            c,
            "escape file-mmap /tmp/c.bin > /dev/null; escape cut /tmp/c.bin",
        )
        .await;
        assert_eq!(out, "CUT cut");
        assert_running(&mut rt, c, &d.log()).await;
        // Ordinary programs: a static one, a dynamic one (its loader and
        // libc mapped executable from their files), a shell.
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        assert_eq!(sh_ok(&mut rt, c, "echo ok").await, "ok");
        let (_, out, _) = exec_sh(&mut rt, c, "escape file-mmap").await;
        assert!(out.contains("RAN file-mmap"), "a file's own code: {out}");
        // A file written, closed and mapped at once (a library unpacked to
        // /tmp and loaded): the close's notification is read after the
        // mapping was decided and watched (the more so while other closes
        // queue before it: the flood), and is no write under it. Until
        // 2026-12-04 it killed the container now and then (a `tomtou`);
        // until 2026-12-06 also when the file was deleted before the
        // close was read (its change time moved).
        let out = sh_ok(&mut rt, c, FLOODED_MAPPINGS).await;
        assert_eq!(out, "40");
        assert_eq!(sh_ok(&mut rt, c, "echo alive").await, "alive");
        // /proc/self/mem, by either name: not opened for writing.
        for target in ["", "/proc/thread-self/mem"] {
            let cmd = format!("escape procmem-exec {target}");
            let (_, out, err) = exec_sh(&mut rt, c, &cmd).await;
            assert!(
                !out.contains("RAN") && out.contains("procmem-exec: Permission denied"),
                "{cmd} under deny: {out}{err}"
            );
        }
        // Writes elsewhere work, to files and devices; beneath /proc they
        // are refused (the documented cost), and the init's word is not in
        // the command's environment.
        let out = sh_ok(
            &mut rt,
            c,
            "echo w > /tmp/w && cat /tmp/w && echo s > /dev/shm/s && cat /dev/shm/s \
             && echo n > /dev/null && echo t > /dev/termination-log && env | grep -c IMACRI_ || true",
        )
        .await;
        assert_eq!(out, "w\ns\n0", "{c}");
        let (code, _, err) = exec_sh(
            &mut rt,
            c,
            "cat /proc/self/oom_score_adj > /proc/self/oom_score_adj",
        )
        .await;
        assert!(
            code != 0 && err.contains("Permission denied"),
            "{code} {err}"
        );
        // A top-level directory made after a process started is outside
        // its rules; the next exec's rules take it in.
        let (code, _, _) = exec_sh(&mut rt, c, "mkdir /top && echo x > /top/x").await;
        assert_ne!(code, 0);
        assert_eq!(
            sh_ok(&mut rt, c, "echo y > /top/y && cat /top/y").await,
            "y"
        );
    }
    let out = sh_ok(&mut rt, &main, "cat /tmp/main.out").await;
    assert_eq!(
        out, "procmem-exec: Permission denied",
        "the container's command"
    );
    // Each start entry says the policy denied it.
    assert_eq!(allowing_anonymous_exec(&d, &pod, &golden), 0);
    stop_pod(&mut rt, &pod).await;

    // Enforce mode with the image's golden policy: the same.
    let (pod, a, b) = two_containers(&d, &mut rt, "anon-strict", "nojit-strict", &image).await;
    for c in [&a, &b] {
        for m in WAYS {
            let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert!(!out.contains("RAN"), "enforce {m}: {out}{err}");
            if c == &a {
                assert!(
                    out.contains(&format!("{m}: Operation not permitted")),
                    "enforce {m}: {out}{err}"
                );
            }
        }
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
    }
    stop_pod(&mut rt, &pod).await;

    // `imacri check` says what is left open on this node.
    let out = std::process::Command::new(imacri_integration::imacri_bin())
        .arg("check")
        .arg("--config")
        .arg(work.path().join("config.toml"))
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&out.stdout).to_string();
    let line = check
        .lines()
        .find(|l| l.starts_with("ima-anonymous-exec"))
        .unwrap_or_else(|| panic!("{check}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        line.contains("nojit") && line.contains("/proc/<pid>/mem"),
        "{line}"
    );
}
