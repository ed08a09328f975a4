//! A container that runs a program whenever the host asks it to, through
//! a file in its `/tmp`: what drives an ima container's executions while
//! imacri is down (no CRI exec then) in the restart tests.

use crate::client::{sh_ok, start_container};
use crate::{container_config, cri, Imacri};

/// A container of `pod` whose shell runs `prog` whenever `/tmp/go`
/// appears and writes "ran" or "refused <status>" (with the shell's error)
/// to `/tmp/out`; `setup` runs in it first. Returns it and its `/tmp` as
/// the host sees it (to drive it while imacri is down).
pub async fn runner(
    rt: &mut crate::client::Rt,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
    prog: &str,
    setup: &str,
) -> (String, std::path::PathBuf) {
    let script = format!(
        "while true; do if [ -f /tmp/go ]; then rm -f /tmp/go; \
         if {prog}; then echo ran; else echo refused $?; fi > /tmp/out.new 2>&1; \
         mv /tmp/out.new /tmp/out; fi; sleep 0.05; done"
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

/// The runner's next output (taken away), waiting up to 20 s.
pub fn next_out(tmp: &std::path::Path, what: &str, d: &Imacri) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(o) = std::fs::read_to_string(tmp.join("out")) {
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
    std::fs::write(tmp.join("go"), "").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !tmp.join("out").exists(),
        "{what}: an execution did not wait for imacri: {:?}",
        std::fs::read_to_string(tmp.join("out"))
    );
}
