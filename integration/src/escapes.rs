//! What the attacker tests of ima pods share (`tests/ima_escapes/`,
//! `ima_crashes.rs`, `ima_writes/`, `ima_floods/`): the attacker image
//! (busybox, `escape` from `c/escape.c`, a dynamic `hello` and a lazily
//! bound `lazy` with the host's loader and libc, `sleeper`), a node whose policies measure and enforce that image's
//! golden policy, and readers of a pod's measurement log.

use crate::client::{run_pod, start_container};
use crate::images::{build_and_push, busybox, compile_c};
use crate::runner::runner;
use crate::{attest, container_config, cri, pod_config, Env, Imacri};
use sha2::{Digest, Sha256};
use std::process::Command;

/// `escape MODE [PATH]`: tries one way to run code and prints `RAN MODE`
/// (exit 0) or `MODE: <error>` (exit 1); see `c/escape.c`.
pub const ESCAPE_C: &str = include_str!("../c/escape.c");

/// A dynamically linked program (run through ld.so and libc).
pub const HELLO_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) { printf("hello %s\n", argc > 1 ? argv[1] : "dynamic"); return 0; }
"#;

/// A dynamically linked, lazily bound program that sleeps before its
/// first call of `puts`, which its loader resolves then (`escape
/// loader-rewrite`): 0 and "lazy" unless the loader changed meanwhile.
pub const LAZY_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) { sleep(argc > 1 ? atoi(argv[1]) : 2); puts("lazy"); return 0; }
"#;

/// Where `escape write-sleeper`'s program keeps the code it exits with:
/// after the ELF header (64 bytes), its one program header (56) and 22
/// bytes of code (`SLEEPER_CODE` in `c/escape.c`).
pub const SLEEPER_CODE: usize = 64 + 56 + 22;

pub const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";
pub const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// busybox, the attacker program and a dynamic `hello` with its loader and
/// libc from the host.
pub fn attacker_image(env: &Env) -> String {
    // Built once per test binary (its tests run side by side).
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| build_attacker_image(env)).clone()
}

fn build_attacker_image(env: &Env) -> String {
    let mut def = busybox();
    let escape = compile_c(&env.base, "escape", ESCAPE_C, &[]).unwrap();
    def.files.push(("bin/escape".into(), escape, 0o755));
    // A program the golden policy allows that sleeps, then exits with a
    // byte of its own (`escape shared-exec`).
    let sleeper = env.base.join("sleeper");
    let out = Command::new(env.base.join("escape"))
        .arg("write-sleeper")
        .arg(&sleeper)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    def.files.push((
        "bin/sleeper".into(),
        std::fs::read(&sleeper).unwrap(),
        0o755,
    ));
    // Dynamically linked against the host's loader and libc (below).
    for (name, src, flags) in [("hello", HELLO_C, ""), ("lazy", LAZY_C, "-Wl,-z,lazy")] {
        let c = env.base.join(format!("{name}.c"));
        std::fs::write(&c, src).unwrap();
        let bin = env.base.join(format!("{name}-dyn"));
        let out = Command::new("cc")
            .args(["-O2", flags, "-o"].into_iter().filter(|a| !a.is_empty()))
            .arg(&bin)
            .arg(&c)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        def.files
            .push((format!("bin/{name}"), std::fs::read(&bin).unwrap(), 0o755));
    }
    for lib in [LOADER, LIBC] {
        let bytes = std::fs::read(lib).unwrap_or_else(|e| panic!("{lib}: {e}"));
        def.files
            .push((lib.trim_start_matches('/').into(), bytes, 0o755));
    }
    let name = format!("{}/test/escapes:1", env.registry);
    build_and_push(&env.base, &def, &name, None).unwrap();
    name
}

/// Open fds and threads of a process.
pub fn held_by(pid: i32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    (fds, threads)
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The memfd/shm payload as mapped: the code, then zeros to a page.
pub fn page_digest() -> String {
    let mut page = vec![0u8; 4096];
    page[..6].copy_from_slice(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    sha256_hex(&page)
}

pub fn log_lines(d: &Imacri, pod: &str) -> Vec<String> {
    let (code, out, err) = attest(d, &["log", pod]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_string).collect()
}

/// An entry of the pod's log whose path contains `path`, with `digest` (if
/// given) and event `ev`.
pub fn logged(lines: &[String], path: &str, digest: Option<&str>, ev: &str) -> bool {
    lines.iter().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() == 8
            && f[4].contains(path)
            && digest.is_none_or(|d| f[3] == format!("sha256:{d}"))
            && f[7] == ev
    })
}

/// Runs `busybox` (a copy of busybox) on the host as `true` and checks the
/// pod's log did not grow: the host's executions of a file a container of
/// the pod reaches through a volume are none of the pod's.
pub fn host_run_not_logged(d: &Imacri, pod: &str, busybox: &std::path::Path) {
    use std::os::unix::process::CommandExt;
    let before = log_lines(d, pod).len();
    let st = std::process::Command::new(busybox)
        .arg0("true")
        .status()
        .unwrap();
    assert!(st.success(), "{}: {st}", busybox.display());
    assert_eq!(log_lines(d, pod).len(), before, "the host's run was logged");
}

/// The entries of one container among a pod's.
pub fn entries_of(lines: &[String], container: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(container))
        .cloned()
        .collect()
}

pub fn ima(name: &str, policy: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg.annotations
        .insert("imacri.dev/ima-policy".into(), policy.into());
    cfg
}

pub fn runtime_default(mut c: cri::ContainerConfig) -> cri::ContainerConfig {
    c.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxContainerSecurityContext {
        seccomp: Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// A daemon whose `measure` policy only measures and whose `strict` policy
/// enforces the attacker image's golden policy. `extra_ima` goes under
/// `[ima]`, `{golden}` in it replaced by the golden policy's path.
pub async fn node(env: &Env, extra_ima: &str) -> (Imacri, String, tempfile::TempDir) {
    node_args(env, extra_ima, &[]).await
}

/// `node` with more arguments for imacri.
pub async fn node_args(
    env: &Env,
    extra_ima: &str,
    args: &[&str],
) -> (Imacri, String, tempfile::TempDir) {
    let image = attacker_image(env);
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let golden = work.path().join("golden.json");
    let extra_ima = extra_ima.replace("{golden}", &golden.display().to_string());
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[ima]\n{extra_ima}\n[ima.policies.default]\n[ima.policies.measure]\n[ima.policies.strict]\nmode = \"enforce\"\nallowlist = [\"{}\"]\n",
            golden.display()
        ),
    )
    .unwrap();
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let d = Imacri::start_with(env, &all).await.unwrap();
    d.pull(&image).await;
    let (code, _, err) = attest(&d, &["golden", &image, "--out", golden.to_str().unwrap()]);
    assert_eq!(code, 0, "attest golden: {err}");
    (d, image, work)
}

/// `node`, restarted with a test hook's variable set.
pub async fn node_with(env: &Env, var: &str, value: &str) -> (Imacri, String, tempfile::TempDir) {
    let (mut d, image, work) = node(env, "").await;
    d.kill();
    d.vars = vec![(var.into(), value.into())];
    d.spawn().await.unwrap();
    (d, image, work)
}

/// A pod of `cfg` with one sleeping container `c`: (pod, container).
pub async fn sleeping_pod(
    rt: &mut crate::client::Rt,
    d: &Imacri,
    cfg: &cri::PodSandboxConfig,
    image: &str,
) -> (String, String) {
    let pod = run_pod(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = start_container(
        rt,
        &pod,
        cfg,
        container_config("c", image, &["sleep", "1000"]),
    )
    .await;
    // Returned once `sleep` runs: a test that kills imacri next would
    // otherwise catch the container's own execution in flight, which the
    // crash refuses (as it must), and find the container exited.
    let pid = crate::client::container_info(rt, &c).await["pid"]
        .as_u64()
        .unwrap_or_default();
    crate::poll::eventually(
        "the container's sleep",
        std::time::Duration::from_secs(10),
        || async {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.starts_with(b"sleep\0").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    (pod, c)
}

pub async fn stop_pod(rt: &mut crate::client::Rt, pod: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
}

/// Asserts that container `c` still runs (`what`: said when it does not).
pub async fn assert_running(rt: &mut crate::client::Rt, c: &str, what: &str) {
    let st = crate::client::container_status(rt, c).await;
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{what}: {st:?}"
    );
}

/// An ima pod with `policy` and two sleeping containers: `a` without a
/// seccomp profile (kubelet's default), `b` with RuntimeDefault.
pub async fn two_containers(
    d: &Imacri,
    rt: &mut crate::client::Rt,
    name: &str,
    policy: &str,
    image: &str,
) -> (String, String, String) {
    let cfg = ima(name, policy);
    let pod = run_pod(rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let sleeper = |n: &str| container_config(n, image, &["sleep", "1000"]);
    let a = start_container(rt, &pod, &cfg, sleeper("a")).await;
    let b = start_container(rt, &pod, &cfg, runtime_default(sleeper("b"))).await;
    (pod, a, b)
}

/// A measure-mode ima pod whose runner maps `path` executable (after
/// writing code to it) each time it is told to; returns the pod and the
/// runner's `/tmp` as the host sees it.
pub async fn mapping_runner(
    d: &Imacri,
    image: &str,
    name: &str,
    path: &str,
) -> (String, std::path::PathBuf) {
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima(name, "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let prog = format!("escape file-mmap {path}");
    let (_c, tmp) = runner(&mut rt, &pod, &cfg, image, &prog, "true").await;
    (pod, tmp)
}

/// A file mapped shared and writable by the test itself (as a host daemon,
/// or a helper the pod passed an fd to, would map a container's file), its
/// fd closed: only the mapping is left. Unmapped when dropped.
pub struct SharedMap {
    at: usize,
    len: usize,
}

impl SharedMap {
    /// Opens `path` for writing, maps it whole and closes the fd.
    pub fn new(path: &str) -> SharedMap {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a new shared mapping of an open file, unmapped on drop.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED, "{path}");
        SharedMap {
            at: at as usize,
            len,
        }
    }

    /// Writes `byte` at `offset` of the file through the mapping.
    pub fn poke(&self, offset: usize, byte: u8) {
        assert!(offset < self.len);
        // SAFETY: within the mapping, which lives as long as self.
        unsafe { *((self.at + offset) as *mut u8) = byte };
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.at as *mut libc::c_void, self.len) };
    }
}
