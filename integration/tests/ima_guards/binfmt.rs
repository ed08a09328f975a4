//! The node's binfmt_misc interpreters run nothing in ima pods.

use super::*;

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
