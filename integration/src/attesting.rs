//! Helpers shared by the attestation tests: an anchored node (swtpm, the
//! daemon, busybox and its golden policy), ima pods, and `imacri attest`
//! runs whose JSON reports they read.

use crate::{attest, container_config, cri, pod_config, Env, Imacri, Swtpm};
use std::path::Path;

pub fn ima_pod(name: &str, policy: Option<&str>) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    if let Some(p) = policy {
        cfg.annotations
            .insert("imacri.dev/ima-policy".into(), p.into());
    }
    cfg
}

pub fn sleeper(env: &Env) -> cri::ContainerConfig {
    container_config("app", &env.busybox, &["sleep", "1000"])
}

pub fn verify(
    d: &Imacri,
    pod: &str,
    policy: &Path,
    ak: &Path,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "verify",
        "--pod",
        pod,
        "--policy",
        policy.to_str().unwrap(),
        "--ak",
        ak.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = attest(d, &args);
    let report = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, report, err)
}

pub fn log_lines(d: &Imacri, pod: &str) -> Vec<String> {
    let (code, out, err) = attest(d, &["log", pod]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_string).collect()
}

/// Setup shared by the tests: swtpm, a daemon anchored in it (with `extra`
/// flags), busybox pulled, the node's AK and busybox's golden policy.
pub async fn anchored_node(env: &Env, extra: &[&str]) -> (Swtpm, Imacri, tempfile::TempDir) {
    let tpm = Swtpm::start(env).unwrap();
    let tcti = tpm.tcti();
    let mut args = vec!["--tpm-tcti", tcti.as_str()];
    args.extend_from_slice(extra);
    let d = Imacri::start_with(env, &args).await.unwrap();
    d.pull(&env.busybox).await;
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let ak = work.path().join("ak.pem");
    let (code, _, err) = attest(&d, &["ak", "--out", ak.to_str().unwrap()]);
    assert_eq!(code, 0, "attest ak: {err}\n{}", d.log());
    assert!(std::fs::read_to_string(&ak)
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    // Reference values from the registry, as a verifier host makes them
    // (no containerd involved), equal to what the node computes.
    let golden = work.path().join("golden.json");
    crate::golden_from_registry(&d, env, &env.busybox, &golden);
    let node = work.path().join("golden-node.json");
    let (code, _, err) = attest(
        &d,
        &[
            "golden",
            &env.busybox,
            "--from-node",
            "--out",
            node.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "attest golden --from-node: {err}");
    assert_eq!(
        std::fs::read_to_string(&golden).unwrap(),
        std::fs::read_to_string(&node).unwrap(),
        "off-node and node golden policies differ"
    );
    (tpm, d, work)
}

/// `imacri attest quote POD --nonce NONCE --out OUT`, which must succeed.
pub fn save_quote(d: &Imacri, pod: &str, nonce: &str, out: &Path) {
    let out = out.to_str().unwrap();
    let (code, _, err) = attest(d, &["quote", pod, "--nonce", nonce, "--out", out]);
    assert_eq!(code, 0, "attest quote: {err}");
}

/// `py/attest_client.py` on Python grpcio (C-core's gRPC, another stack
/// than ours) against the verifier socket: whether it succeeded, and what
/// it printed (stdout, then stderr).
pub fn grpcio_attest(socket: &Path, args: &[&str]) -> (bool, String) {
    let cache = crate::critest::tools().expect("test tools");
    let py = crate::peers::grpcio_python(&cache);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/attest_client.py");
    let o = std::process::Command::new(&py)
        .arg(&script)
        .arg(socket)
        .args(args)
        .output()
        .expect("running attest_client.py");
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), t)
}
