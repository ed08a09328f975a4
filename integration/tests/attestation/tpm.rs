//! The TPM's part: no TPM, a TPM reset, and fail_mode = "closed".

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn without_a_tpm_evidence_is_unanchored() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("unanchored", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    sh_ok(&mut rt, &c, "true").await;
    let (code, _, err) = attest(&d, &["ak"]);
    assert_ne!(code, 0);
    assert!(err.contains("no TPM"), "{err}");
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let golden = work.path().join("golden.json");
    assert_eq!(
        attest(
            &d,
            &["golden", &env.busybox, "--out", golden.to_str().unwrap()]
        )
        .0,
        0
    );
    let args = [
        "verify",
        "--pod",
        &pod,
        "--policy",
        golden.to_str().unwrap(),
    ];
    let (code, out, _) = attest(&d, &args);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unanchored"), "{out}");
    let mut lax = args.to_vec();
    lax.push("--allow-unanchored");
    let (code, out, _) = attest(&d, &lax);
    assert_eq!(code, 0, "{out}");
    // A node whose key was registered never downgrades to unanchored.
    let ak = work.path().join("registered.pem");
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out {} 2>/dev/null",
            ak.display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    let mut pinned = lax.clone();
    pinned.extend(["--ak", ak.to_str().unwrap()]);
    let (code, out, _) = attest(&d, &pinned);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("registered"), "{out}");
    // Bad requests are clear.
    let (code, _, err) = attest(&d, &["log", "no-such-pod"]);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tpm_reset_starts_a_new_epoch() {
    let env = Env::get();
    let (mut tpm, mut d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("epoch", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    sh_ok(&mut rt, &c, "ls / >/dev/null").await;
    let (code, before, _) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 0, "{before:#}");

    // Node "reboot" of the TPM (PCRs cleared, reset count up) with imacri
    // (and its fd keeper) restarted against it; the container keeps running.
    d.kill_all();
    tpm.reboot().unwrap();
    d.spawn().await.unwrap();
    let (code, after, err) = verify(&d, &pod, &golden, &ak, &["--allow-gaps"]);
    assert_eq!(code, 0, "{after:#}\n{err}\n{}", d.log());
    assert_ne!(
        after["reset_count"], before["reset_count"],
        "{before:#}\n{after:#}"
    );
    // Only the new epoch's entries: the restart gap, nothing replayed.
    assert_eq!(after["gaps"], 1, "{after:#}");
    assert_eq!(after["pod_entries"], 0, "{after:#}");
    let archived = std::fs::read_dir(d.root.join("integrity/archive"))
        .unwrap()
        .count();
    assert_eq!(archived, 1);
    // The AK survived (same TPM seed): the registered key still verifies,
    // and new executions land in the new epoch.
    let mut rt = d.runtime().await.unwrap();
    sh_ok(&mut rt, &c, "ls / >/dev/null").await;
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &["--allow-gaps"]);
    assert_eq!(code, 0, "{report:#}");
    assert!(report["pod_entries"].as_u64().unwrap() >= 1, "{report:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_closed_kills_what_ran_unmeasured() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(&config, "[ima]\nfail_mode = \"closed\"\n").unwrap();
    let mut d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("failclosed", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    // The entrypoint's exec measured; then imacri and its fd keeper die, so
    // the container's executions run on unmeasured until the restart.
    imacri_integration::poll::eventually("the entrypoint's entry", Duration::from_secs(10), || {
        let e = log_lines(&d, &pod);
        let ran = e
            .iter()
            .any(|l| l.contains(" /bin/busybox ") && l.ends_with(" exec"));
        async move { ran.then_some(()) }
    })
    .await
    .unwrap();
    d.kill_all();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = imacri_integration::client::wait_exited(&mut rt, &c).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}");
    assert!(st.message.contains("unmeasured"), "{st:?}");
    // The pod itself stays; kubelet would start the container again.
    let log = log_lines(&d, &pod);
    assert!(log.iter().any(|l| l.ends_with(" gap")), "{log:?}");
}
