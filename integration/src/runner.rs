//! A container that runs a program whenever the host asks it to, through
//! a fifo in its `/tmp`: what drives an ima container's executions while
//! imacri is down (no CRI exec then) in the restart tests.

use crate::client::{sh_ok, start_container};
use crate::{container_config, cri, pod_config, Imacri};
use std::path::Path;

/// The line the runner's output ends with once its program is done.
const DONE: &str = "--\n";

/// A container of `pod` whose shell runs `prog` whenever a line arrives
/// on its fifo `/tmp/.go` (`go`; the line is `$x` in `prog`) and writes
/// "ran" or "refused <status>" (with the shell's error) to `/tmp/out`;
/// `setup` runs in it first. Returns it and its `/tmp` as the host sees it
/// (to drive it while imacri is down).
///
/// Between runs the shell waits in its own `read` (a builtin): it executes
/// nothing but `prog` (no `sleep` or `rm` every turn), so the first access
/// a test holds imacri at after the runner started is the program's.
pub async fn runner(
    rt: &mut crate::client::Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
    prog: &str,
    setup: &str,
) -> (String, std::path::PathBuf) {
    let script = format!(
        "mkfifo /tmp/.go && exec 3<>/tmp/.go && \
         while read x <&3; do \
         {{ if {prog}; then echo ran; else echo refused $?; fi; echo {}; }} > /tmp/out 2>&1; \
         done",
        DONE.trim_end()
    );
    let c = start_container(
        rt,
        pod,
        cfg,
        container_config("loop", image, &["sh", "-c", &script]),
    )
    .await;
    sh_ok(rt, &c, setup).await;
    let info = crate::client::container_info(rt, &c).await;
    let pid = info["pid"].as_u64().unwrap();
    (c, format!("/proc/{pid}/root/tmp").into())
}

/// Asks the runner working in `tmp` to run its program once, with `arg`
/// as `$x`.
pub fn go(tmp: &std::path::Path, arg: &str) {
    // The runner holds its fifo open for reading and writing: this open
    // does not wait for a reader.
    std::fs::write(tmp.join(".go"), format!("{arg}\n")).unwrap();
}

/// The runner's finished output, if its program is done.
fn finished(tmp: &std::path::Path) -> Option<String> {
    let o = std::fs::read_to_string(tmp.join("out")).ok()?;
    o.strip_suffix(DONE).map(str::to_string)
}

/// The runner's next output (taken away), waiting up to 20 s.
pub fn next_out(tmp: &std::path::Path, what: &str, d: &Imacri) -> String {
    next_out_within(tmp, what, d, std::time::Duration::from_secs(20))
}

/// [`next_out`], waiting up to `wait`.
pub fn next_out_within(
    tmp: &std::path::Path,
    what: &str,
    d: &Imacri,
    wait: std::time::Duration,
) -> String {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(o) = finished(tmp) {
            let _ = std::fs::remove_file(tmp.join("out"));
            return o;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no output {what}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Starts the runner's program while imacri is down and checks it waits.
pub fn go_while_down(tmp: &std::path::Path, what: &str) {
    go_while_down_with(tmp, "", what)
}

/// `go_while_down` with `arg` as the program's `$x`.
pub fn go_while_down_with(tmp: &std::path::Path, arg: &str, what: &str) {
    go(tmp, arg);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        finished(tmp).is_none(),
        "{what}: an execution did not wait for imacri: {:?}",
        std::fs::read_to_string(tmp.join("out"))
    );
}

/// Runs the runner's program once with imacri held at `point` (an fd just
/// handed to the fd keeper, `Imacri::holding_at`), kills the keeper there
/// (imacri starts another, given what it remembers), then kills imacri and
/// starts it again: the program's output, once the next imacri answered.
pub async fn run_across_keeper_and_imacri_deaths(
    d: &mut Imacri,
    tmp: &std::path::Path,
    arg: &str,
    point: &str,
) -> String {
    let hold = d.holding_at(point).await;
    go(tmp, arg);
    d.until_held(&hold).await;
    d.keeper_replaced().await;
    d.kill();
    std::fs::remove_file(&hold).unwrap();
    d.respawn(&[]).await;
    next_out(tmp, "after the restart", d)
}

/// An ima pod (by annotation) named `name` on `d`, and its config.
pub async fn run_ima_pod(
    d: &Imacri,
    rt: &mut crate::client::Rt,
    name: &str,
) -> (String, cri::PodSandboxConfig) {
    let mut cfg = pod_config(name);
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    let pod = crate::client::run_pod(rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    (pod, cfg)
}

/// Whether the pod log `log` (`attest log`) has an entry of `container`
/// with `ev`, for `path` (any path when empty).
pub fn entry_logged(log: &str, container: &str, path: &str, ev: &str) -> bool {
    log.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() == 8 && l.contains(container) && (path.is_empty() || f[4] == path) && f[7] == ev
    })
}

/// Whether the pod log `log` has a `gap` entry.
pub fn has_gap(log: &str) -> bool {
    log.lines().any(|l| l.split(' ').nth(7) == Some("gap"))
}

/// imacri crashes (the keeper kept everything): an execution of the runner
/// `c` (`runner`, working in `tmp`, its program `/tmp/new/true`) waits for
/// the next imacri, which measures it, with no gap; then the pod goes.
pub async fn crash_waits_measured(d: &mut Imacri, (pod, c, tmp): (&str, &str, &Path), what: &str) {
    d.kill();
    go_while_down(tmp, what);
    d.respawn(&[]).await;
    let out = next_out(tmp, "after the restart", d);
    assert_eq!(out.trim(), "ran", "{what}: {out}");
    let log = crate::cuts::pod_log(d, pod);
    assert!(
        entry_logged(&log, c, "/tmp/new/true", "exec"),
        "{what}: {log}"
    );
    assert!(!has_gap(&log), "{what}: {log}");
    let mut rt = d.runtime().await.unwrap();
    crate::client::remove_pod(&mut rt, pod).await;
}
