//! An ima pod runs only where imacri can measure it: on a RuntimeClass
//! handler of containerd's runc v2 shim with runc, and only if the task it
//! is given is the container's own. Another runtime does what the guards
//! rely on differently, or not at all: a VM's or a sandbox's shim (kata,
//! gVisor) reports a host process as the task, whose root is no
//! container's, so the marks would watch a host filesystem (every node
//! execution in the pod's log, each refused under `enforce`) and leave the
//! container's own unwatched, while its `start` entry told the verifier it
//! was measured. Neither runtime is on this machine; stand-ins show each
//! case: a shim type that is not runc's, a runtime that says it is not
//! runc (it runs runc underneath, so a plain pod runs on it), and one that
//! passes for runc but reports a host process as the created task.

use imacri_integration::client::{run_pod, sh_ok, start_container};
use imacri_integration::escapes::{ima, node, stop_pod};
use imacri_integration::{container_config, cri, pod_config, Env};
use tonic::Code;

/// runc, except that `create` reports a host process (a sleeper, its pid
/// noted beside the script) as the container's init.
const LIAR: &str = r#"#!/bin/sh
pidfile=""
prev=""
for a in "$@"; do
  [ "$prev" = "--pid-file" ] && pidfile="$a"
  prev="$a"
done
runc "$@" || exit $?
case " $* " in
  *" create "*)
    if [ -n "$pidfile" ]; then
      sleep 60 </dev/null >/dev/null 2>&1 &
      echo $! >> "$(dirname "$0")/host-pids"
      printf %s $! > "$pidfile"
    fi ;;
esac
"#;

/// runc under another name.
const OTHER: &str = r#"#!/bin/sh
if [ "$1" = --version ]; then echo "crun version 1.8.1"; exit 0; fi
exec runc "$@"
"#;

async fn run_on(
    rt: &mut imacri_integration::client::Rt,
    cfg: &cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(cfg.clone()),
        runtime_handler: handler.into(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn ima_pods_run_only_where_they_can_be_measured() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::get();
    let bin = tempfile::tempdir_in(&env.base).unwrap();
    for (name, text) in [("liar", LIAR), ("other", OTHER)] {
        let p = bin.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let runtimes = format!(
        "\n[runtimes.runc]\n[runtimes.vm]\nruntime_type = \"io.containerd.kata.v2\"\n\
         [runtimes.other]\nbinary_name = \"{}\"\n[runtimes.liar]\nbinary_name = \"{}\"\n",
        bin.path().join("other").display(),
        bin.path().join("liar").display()
    );
    let (d, image, _work) = node(env, &runtimes).await;
    let mut rt = d.runtime().await.unwrap();

    // The control: a plain pod runs on the runtime that is not runc.
    let plain = pod_config("rt-plain");
    let pod = run_on(&mut rt, &plain, "other").await.unwrap();
    let c = start_container(
        &mut rt,
        &pod,
        &plain,
        container_config("c", &image, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(sh_ok(&mut rt, &c, "echo ran").await, "ran");
    stop_pod(&mut rt, &pod).await;

    // Refused up front, naming the field and why; nothing is made.
    for (handler, why) in [
        ("vm", "its shim is io.containerd.kata.v2"),
        ("other", "is not runc (\"crun version 1.8.1\")"),
    ] {
        let err = run_on(&mut rt, &ima(&format!("rt-{handler}"), "measure"), handler)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{handler}: {err:?}");
        assert!(
            err.message()
                .contains(&format!("runtime_handler {handler:?}"))
                && err.message().contains(why),
            "{handler}: {}",
            err.message()
        );
    }

    // Passing for runc, but its task is a host process: not marked (its
    // root is the node's filesystem), the pod refused and rolled back.
    let err = run_on(&mut rt, &ima("rt-liar", "measure"), "liar")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("is not the rootfs imacri prepared for it"),
        "{}",
        err.message()
    );
    let pods = imacri_integration::client::pods(&mut rt).await;
    assert!(pods.is_empty(), "{pods:#?}");
    // imacri's log says why.
    assert!(d.log().contains("cannot be measured"), "{}", d.log());

    // On the default handler an ima pod runs.
    let cfg = ima("rt-runc", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("c", &image, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(sh_ok(&mut rt, &c, "echo ran").await, "ran");
    stop_pod(&mut rt, &pod).await;

    if let Ok(pids) = std::fs::read_to_string(bin.path().join("host-pids")) {
        for p in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
