//! Measurement and attestation end to end, on this kernel's real fanotify,
//! real containers and a real TPM simulator (swtpm): executions are logged
//! and cached, a golden policy verifies, a dropped-in executable is caught
//! (and, under enforce, denied with EPERM), tampered logs, stale quotes and
//! foreign keys are rejected, and a restart keeps log and PCR in agreement.

use imacri_integration::attesting::{
    anchored_node, ima_pod, log_lines, save_quote, sleeper, verify,
};
use imacri_integration::client::{exec_sh, pod_info, run_pod, sh_ok, start_container};
use imacri_integration::{attest, container_config, cri, Env, Imacri};
use std::path::Path;
use std::time::{Duration, Instant};

/// Off-node golden equals node golden for an image with users, links and
/// a working directory too; an image the registry lacks is an error.
#[tokio::test(flavor = "multi_thread")]
async fn golden_from_the_registry_equals_the_nodes() {
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    d.pull(&env.configured).await;
    let hosts = env.hosts_dir.to_str().unwrap();
    let (code, off, err) = attest(
        &d,
        &["golden", &env.configured, "--registry-config-path", hosts],
    );
    assert_eq!(code, 0, "{err}");
    let (code, on, err) = attest(&d, &["golden", &env.configured, "--from-node"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(off, on);
    assert!(off.contains("\"/bin/busybox\""), "{off}");
    let missing = format!("{}/test/no-such-image:1", env.registry);
    let (code, _, err) = attest(&d, &["golden", &missing, "--registry-config-path", hosts]);
    assert_ne!(code, 0);
    assert!(err.contains("no-such-image"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn measured_pod_is_attested_and_changes_are_caught() {
    let env = Env::get();
    let (_tpm, mut d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
    assert!(g["files"]["/bin/busybox"][0]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("attest", None);
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["ima"]["backend"], "fanotify", "{info}");
    let c = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;

    // The entrypoint's execution is measured (StartContainer returns
    // before the entrypoint's execve, so wait for it).
    let entries = imacri_integration::poll::eventually(
        "the entrypoint's entry",
        Duration::from_secs(10),
        || {
            let e = log_lines(&d, &pod);
            let exec = e
                .iter()
                .any(|l| l.contains(" /bin/busybox ") && l.ends_with(" exec"));
            async move { exec.then_some(e) }
        },
    )
    .await
    .unwrap_or_default();
    assert!(
        entries
            .iter()
            .any(|l| l.contains(" /bin/busybox ") && l.ends_with(" exec")),
        "{entries:?}\n{}",
        d.log()
    );
    // Every measured exec of the (symlinked) applets is busybox itself: one
    // entry per container and file, however often it runs; later runs hit
    // the cache and hash nothing.
    sh_ok(&mut rt, &c, "ls / >/dev/null").await;
    let before = imacri_integration::client::integrity_stats(&mut rt).await;
    let n = log_lines(&d, &pod).len();
    for _ in 0..3 {
        sh_ok(&mut rt, &c, "ls / >/dev/null").await;
    }
    let after = imacri_integration::client::integrity_stats(&mut rt).await;
    assert_eq!(
        log_lines(&d, &pod).len(),
        n,
        "no new entries for cached files"
    );
    assert!(
        after["fanotify"]["cacheHits"].as_u64() > before["fanotify"]["cacheHits"].as_u64(),
        "{before} -> {after}"
    );
    assert_eq!(
        after["fanotify"]["hashedFiles"], before["fanotify"]["hashedFiles"],
        "cached executions are not hashed again"
    );

    let (code, report, err) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    assert_eq!(report["verdict"], "trusted");
    assert!(report["pod_entries"].as_u64().unwrap() >= 1);

    // A quote saved now is stale later: a fresh nonce rejects it; with the
    // nonce it answered, the saved evidence itself still verifies.
    let saved = work.path().join("evidence.json");
    let nonce = "00112233445566778899aabbccddeeff";
    save_quote(&d, &pod, nonce, &saved);
    let saved_s = saved.to_str().unwrap();
    let (code, report, _) = verify(
        &d,
        &pod,
        &golden,
        &ak,
        &["--evidence", saved_s, "--nonce", nonce],
    );
    assert_eq!(code, 0, "{report:#}");
    let (code, report, _) = verify(
        &d,
        &pod,
        &golden,
        &ak,
        &[
            "--evidence",
            saved_s,
            "--nonce",
            "ffeeddccbbaa99887766554433221100",
        ],
    );
    assert_eq!(code, 2, "stale quote: {report:#}");
    assert!(report["errors"].to_string().contains("nonce"), "{report:#}");

    // Another key than the registered one: invalid.
    let other = work.path().join("other.pem");
    let key = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out {} 2>/dev/null",
            other.display()
        ))
        .status()
        .unwrap();
    assert!(key.success());
    let (code, report, _) = verify(&d, &pod, &golden, &other, &[]);
    assert_eq!(code, 2, "foreign AK: {report:#}");
    assert!(
        report["errors"].to_string().contains("attestation key"),
        "{report:#}"
    );

    // Tampering with the persisted log: one digest changed.
    let log_path = d.root.join("integrity/measurements.log");
    let original = std::fs::read_to_string(&log_path).unwrap();
    let first = original.lines().next().unwrap();
    let digest = first.split(' ').nth(3).unwrap();
    let forged = format!("sha256:{}", "ab".repeat(32));
    std::fs::write(&log_path, original.replacen(digest, &forged, 1)).unwrap();
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 2, "tampered log: {report:#}");
    assert!(
        report["errors"].to_string().contains("modified"),
        "{report:#}"
    );
    // Dropping an entry (keeping each line self-consistent) breaks the replay.
    let dropped: String = original.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log_path, dropped).unwrap();
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 2, "truncated log: {report:#}");
    assert!(
        report["errors"].to_string().contains("replay"),
        "{report:#}"
    );
    std::fs::write(&log_path, &original).unwrap();
    assert_eq!(verify(&d, &pod, &golden, &ak, &[]).0, 0);

    // Restart (kill -9) with the fd keeper lost too (executions ran on
    // unmeasured meanwhile; with the keeper they wait, see ima_escapes.rs):
    // log and PCR still agree, the container is measured again, and the
    // gap is reported.
    d.kill_all();
    d.spawn().await.unwrap();
    // The gap alone makes the pod untrusted: it ran unmeasured meanwhile.
    let (code, report, err) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 1, "after restart: {report:#}\n{err}\n{}", d.log());
    assert_eq!(report["gaps"], 1, "{report:#}");
    assert_eq!(report["violations"][0]["event"], "gap", "{report:#}");
    // A verifier that accepts gaps trusts it.
    let (code, report, err) = verify(&d, &pod, &golden, &ak, &["--allow-gaps"]);
    assert_eq!(code, 0, "with --allow-gaps: {report:#}\n{err}");

    // An entry written but never extended (imacri died between the two;
    // here it is appended while imacri is down) is extended at the next
    // start and followed by a gap: the TPM did not vouch for it in time.
    {
        use imacri_runtime::integrity::log::{Entry, Event};
        d.kill();
        let now = std::fs::read_to_string(&log_path).unwrap();
        let first = Entry::parse(now.lines().find(|l| l.contains(&pod)).unwrap()).unwrap();
        let late = Entry::new(
            first.pcr,
            first.digest,
            &first.path,
            &first.pod,
            &first.container,
            first.event,
        );
        std::fs::write(&log_path, format!("{now}{late}\n")).unwrap();
        d.spawn().await.unwrap();
        let after = std::fs::read_to_string(&log_path).unwrap();
        let lines: Vec<&str> = after.lines().collect();
        let at = lines.iter().rposition(|l| *l == late.to_string()).unwrap();
        let next = Entry::parse(lines[at + 1]).unwrap();
        assert_eq!(
            (next.event, next.container.as_str()),
            (Event::Gap, first.container.as_str()),
            "{after}"
        );
        // Still replays (it was extended), still untrusted without --allow-gaps.
        let (code, report, err) = verify(&d, &pod, &golden, &ak, &[]);
        assert_eq!(code, 1, "{report:#}\n{err}");
        let (code, report, err) = verify(&d, &pod, &golden, &ak, &["--allow-gaps"]);
        assert_eq!(code, 0, "{report:#}\n{err}");
    }
    let mut rt = d.runtime().await.unwrap();

    // A new executable dropped into the running container and run.
    sh_ok(
        &mut rt,
        &c,
        // Named like an applet, so busybox runs it.
        "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true && chmod +x /tmp/new/true && /tmp/new/true",
    )
    .await;
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &["--allow-gaps"]);
    assert_eq!(code, 1, "{report:#}");
    let v = &report["violations"][0];
    assert_eq!(v["path"], "/tmp/new/true", "{report:#}");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
    let info = pod_info(&mut rt, &pod).await;
    assert!(
        info["ima"]["lastViolation"]
            .as_str()
            .is_none_or(|s| s.is_empty()),
        "measure mode without an allowlist on the node: the verifier decides ({info})"
    );

    // watch reports it once (its second round continues the checkpoint of
    // the first, which it writes once a round).
    let counters = work.path().join("watch-counters.json");
    let (code, out, err) = attest(
        &d,
        &[
            "watch",
            "--policy",
            golden.to_str().unwrap(),
            "--ak",
            ak.to_str().unwrap(),
            "--interval",
            "100ms",
            "--count",
            "2",
            "--counters",
            counters.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let alerts: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("/tmp/new/true"))
        .collect();
    assert_eq!(alerts.len(), 1, "{out}");
    assert!(alerts[0].starts_with("ALERT pod="), "{out}");
    let book: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    let seen = book.as_object().unwrap().values().next().unwrap();
    assert!(
        seen["checkpoint"]["pods"][&pod]["entries"].as_u64() > Some(0),
        "{book:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enforce_mode_denies_unknown_executables() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let golden = work.path().join("golden.json");
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[ima.policies.default]\n[ima.policies.strict]\nrules = [\"measure func=BPRM_CHECK mask=MAY_EXEC\"]\nmode = \"enforce\"\nallowlist = [\"{}\"]\n",
            golden.display()
        ),
    )
    .unwrap();
    let (_tpm, d, node) = anchored_node(env, &["--config", config.to_str().unwrap()]).await;
    std::fs::copy(node.path().join("golden.json"), &golden).unwrap();
    let ak = node.path().join("ak.pem");

    let mut rt = d.runtime().await.unwrap();
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let cfg = ima_pod("enforce", Some("strict"));
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let vol = work.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::copy("/bin/busybox", vol.join("tool")).unwrap();
    let mut cc = sleeper(env);
    cc.mounts.push(cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.to_string_lossy().into(),
        ..Default::default()
    });
    let c = start_container(&mut rt, &pod, &cfg, cc).await;
    // Allowed content runs.
    assert_eq!(sh_ok(&mut rt, &c, "echo ok").await, "ok");

    let (code, out, err) = exec_sh(
        &mut rt,
        &c,
        "cp /bin/busybox /tmp/dropped && chmod +x /tmp/dropped && /tmp/dropped true; echo rc=$?",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rc=126") || out.contains("rc=1"), "{out}{err}");
    assert!(
        err.to_lowercase().contains("not permitted"),
        "EPERM expected: {out}{err}"
    );
    // Volumes are noexec in a measured pod: no unmeasured executions.
    let (_, out, err) = exec_sh(&mut rt, &c, "/vol/tool true; echo rc=$?").await;
    assert!(!out.contains("rc=0"), "{out}{err}");
    assert!(err.contains("Permission denied"), "{out}{err}");

    let entries = log_lines(&d, &pod);
    assert!(
        entries
            .iter()
            .any(|l| l.contains(" /tmp/dropped ") && l.ends_with(" deny")),
        "{entries:?}"
    );
    let info = pod_info(&mut rt, &pod).await;
    assert!(
        info["ima"]["lastViolation"]
            .as_str()
            .unwrap_or_default()
            .contains("/tmp/dropped"),
        "{info}"
    );
    d.log_with(&["ima violation"]).await;
    // A CRI event names the container.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        match tokio::time::timeout(Duration::from_secs(5), events.message()).await {
            Ok(Ok(Some(e))) => {
                seen = e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                    && e.container_id == c
            }
            _ => break,
        }
    }
    assert!(seen, "IMA_VIOLATION_EVENT for {c}");

    let (code, report, err) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 1, "{report:#}\n{err}");
    assert_eq!(report["violations"][0]["event"], "deny", "{report:#}");
}

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

/// A FILE_CHECK rule with uid=0 measures files read by in-pod root (the
/// rule's uid is the in-pod one, mapped to the host uid the kernel reports),
/// not reads by other users.
#[tokio::test(flavor = "multi_thread")]
async fn reads_by_in_pod_root_are_measured() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[ima.policies.default]\n[ima.policies.reads]\nrules = [\"measure func=BPRM_CHECK mask=MAY_EXEC\", \"measure func=FILE_CHECK mask=^MAY_READ uid=0\"]\n",
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let reader = thread_reader_image(env);
    d.pull(&reader).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("reads", Some("reads"));
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let root = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    let mut user = container_config("user", &env.busybox, &["sleep", "1000"]);
    user.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let user = start_container(&mut rt, &pod, &cfg, user).await;
    // (runc itself reads /etc/passwd and /etc/group as in-pod root for every
    // exec, so the files here are ones only the workload touches.)
    sh_ok(
        &mut rt,
        &root,
        "echo secret > /tmp/by-root; cat /tmp/by-root >/dev/null",
    )
    .await;
    sh_ok(
        &mut rt,
        &user,
        "echo mine > /tmp/by-user; cat /tmp/by-user >/dev/null",
    )
    .await;
    // A process whose leader dropped to uid 1000 with a raw setresuid (its
    // own credentials only) while a second thread stayed root: the root
    // thread's read is measured, the leader's is not.
    let mixed = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("mixed", &reader, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(
        sh_ok(
            &mut rt,
            &mixed,
            "echo by-thread > /tmp/by-thread; echo by-leader > /tmp/by-leader; echo by-euid > /tmp/by-euid; threadread /tmp/by-thread /tmp/by-leader /tmp/by-euid"
        )
        .await,
        "READ"
    );
    let log = log_lines(&d, &pod);
    let thread_digest = format!("sha256:{}", hex_sha256(b"by-thread\n"));
    assert!(
        log.iter().any(|l| l.contains(" /tmp/by-thread ")
            && l.contains(&thread_digest)
            && l.ends_with(" read")),
        "a root thread's read in a process whose leader is uid 1000: {log:?}"
    );
    // `uid=0` is the real uid, as IMA's: a read with effective uid 1000 by
    // a task whose real uid is 0 is measured.
    let euid_digest = format!("sha256:{}", hex_sha256(b"by-euid\n"));
    assert!(
        log.iter()
            .any(|l| l.contains(" /tmp/by-euid ") && l.contains(&euid_digest)),
        "a real-uid-0 read with effective uid 1000: {log:?}"
    );
    // (Only the root shell's open that wrote it, empty then, is.)
    let leader_digest = format!("sha256:{}", hex_sha256(b"by-leader\n"));
    assert!(
        !log.iter().any(|l| l.contains(&leader_digest)),
        "the uid-1000 leader's read is not measured: {log:?}"
    );
    let root_file_digest = format!("sha256:{}", hex_sha256(b"secret\n"));
    assert!(
        log.iter().any(|l| l.contains(" /tmp/by-root ")
            && l.contains(&root_file_digest)
            && l.contains(&root)
            && l.ends_with(" read")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains(" /tmp/by-user ")),
        "opens by uid 1000 are not measured: {log:?}"
    );
}

/// `threadread ROOT_FILE LEADER_FILE EUID_FILE`: a second thread is
/// started as root, the leader drops to uid 1000 with a raw `setresuid`
/// (its own credentials only; glibc's would change every thread's) and
/// reads LEADER_FILE, then the root thread reads ROOT_FILE, takes effective
/// uid 1000 (real uid still 0) and reads EUID_FILE. Prints READ.
const THREAD_READ_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
static int go[2];
static char *third;
static void *reader(void *path) {
    char c, b[64];
    if (read(go[0], &c, 1) != 1) return (void *)1;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("thread read"); return (void *)1; }
    /* Real uid 0, effective 1000: IMA's uid= is the real uid. */
    if (syscall(SYS_setresuid, 0, 1000, 0)) { perror("setresuid"); return (void *)1; }
    fd = open(third, O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("euid read"); return (void *)1; }
    return 0;
}
int main(int argc, char **argv) {
    pthread_t t;
    void *r;
    char b[64];
    if (argc < 4 || pipe(go)) return 2;
    third = argv[3];
    if (pthread_create(&t, 0, reader, argv[1])) return 2;
    if (syscall(SYS_setresuid, 1000, 1000, 1000)) { perror("setresuid"); return 1; }
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) < 0) { perror("leader read"); return 1; }
    if (write(go[1], "x", 1) != 1 || pthread_join(t, &r) || r) return 1;
    printf("READ\n");
    return 0;
}
"#;

fn thread_reader_image(env: &Env) -> String {
    imacri_integration::images::busybox_with_c(
        &env.base,
        &env.registry,
        "threadread",
        THREAD_READ_C,
    )
    .unwrap()
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// `volumes = "measure"`: a volume that is a tmpfs of its own is marked and
/// its executions are measured (path as the container sees it); so is a
/// volume on the host's disk, through the container's mount (noexec until
/// 2026-12-05).
#[tokio::test(flavor = "multi_thread")]
async fn tmpfs_volumes_are_measured_when_the_policy_says_so() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[ima.policies.default]\n[ima.policies.vols]\nvolumes = \"measure\"\n",
    )
    .unwrap();
    // Where kubelet keeps the pod's memory-backed emptyDir: only there is
    // a tmpfs the pod's own.
    let cfg = ima_pod("vols", Some("vols"));
    let tv = imacri_integration::kubelet_tmpfs_volume(work.path(), &cfg, "tv");
    let dv = work.path().join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    for d in [&tv, &dv] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy("/bin/busybox", d.join("true")).unwrap();
    }
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let mut cc = sleeper(env);
    for (dest, src) in [("/tv", &tv), ("/dv", &dv)] {
        cc.mounts.push(cri::Mount {
            container_path: dest.into(),
            host_path: src.to_string_lossy().into(),
            ..Default::default()
        });
    }
    let c = start_container(&mut rt, &pod, &cfg, cc).await;
    let (_, out, err) = exec_sh(&mut rt, &c, "/tv/true; echo rc=$?").await;
    assert!(out.contains("rc=0"), "{out}{err}\n{}", d.log());
    let (_, out, err) = exec_sh(&mut rt, &c, "/dv/true; echo rc=$?").await;
    assert!(out.contains("rc=0"), "{out}{err}");
    let log = log_lines(&d, &pod);
    for p in [" /tv/true ", " /dv/true "] {
        assert!(
            log.iter().any(|l| l.contains(p) && l.ends_with(" exec")),
            "{p}: {log:?}"
        );
    }
    // A measured volume unmounted on the host between create and start: the
    // container binds what CreateContainer checked (imacri's staged view of
    // that tmpfs), and that is what is marked, not whatever the host path
    // names at the start (the disk below it; until 2026-12-04 the host path
    // was looked at again, and the start refused).
    let mut late = container_config("late", &env.busybox, &["sleep", "1000"]);
    late.mounts.push(cri::Mount {
        container_path: "/tv".into(),
        host_path: tv.to_string_lossy().into(),
        ..Default::default()
    });
    let late = imacri_integration::client::create_container(&mut rt, &pod, &cfg, late)
        .await
        .unwrap();
    nix::mount::umount2(&tv, nix::mount::MntFlags::MNT_DETACH).unwrap();
    std::fs::write(tv.join("below"), "disk").unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: late.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let (_, out, err) = exec_sh(&mut rt, &late, "ls /tv; /tv/true; echo rc=$?").await;
    assert!(out.contains("rc=0") && !out.contains("below"), "{out}{err}");
    let log = log_lines(&d, &pod);
    assert!(
        log.iter()
            .any(|l| l.contains(&late) && l.contains(" /tv/true ") && l.ends_with(" exec")),
        "{log:?}"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// The verifier socket serves the attestation service and nothing that can
/// change the node: a verifier never needs the CRI socket.
#[tokio::test(flavor = "multi_thread")]
async fn verifier_socket_cannot_run_pods() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = Env::get();
    let d = Imacri::start(env).await.unwrap();
    let meta = std::fs::metadata(&d.attest_socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let ch = containerd_client::connect(&d.attest_socket).await.unwrap();
    let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(ch.clone());
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(imacri_integration::pod_config("intruder")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    let mut im = cri::image_service_client::ImageServiceClient::new(ch.clone());
    let e = im
        .pull_image(cri::PullImageRequest {
            image: imacri_integration::client::image(&env.busybox),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    // What it is for works.
    let mut att = imacri_api::attestation::attestation_client::AttestationClient::new(ch);
    att.list_pods(imacri_api::attestation::ListPodsRequest {})
        .await
        .unwrap();
    let (code, _, err) = attest(&d, &["log", "no-such-pod"]);
    assert_ne!(code, 0);
    assert!(err.contains("no-such-pod"), "{err}");
    assert!(rt.version(cri::VersionRequest::default()).await.is_err());
}

/// One tenant's evidence never shows another's paths or digests: pod A's
/// quote carries pod B's entries redacted (the replay still needs them),
/// and still verifies.
#[tokio::test(flavor = "multi_thread")]
async fn evidence_hides_other_pods_entries() {
    let env = Env::get();
    let (_tpm, d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    let mut rt = d.runtime().await.unwrap();
    let (cfg_a, cfg_b) = (ima_pod("tenant-a", None), ima_pod("tenant-b", None));
    let a = run_pod(&mut rt, &cfg_a).await.unwrap();
    let b = run_pod(&mut rt, &cfg_b).await.unwrap();
    start_container(&mut rt, &a, &cfg_a, sleeper(env)).await;
    let cb = start_container(&mut rt, &b, &cfg_b, sleeper(env)).await;
    sh_ok(
        &mut rt,
        &cb,
        "mkdir -p /tmp/tenant-b-secret && cp /bin/busybox /tmp/tenant-b-secret/true && /tmp/tenant-b-secret/true",
    )
    .await;
    let b_log = attest(&d, &["log", &b]).1;
    assert!(b_log.contains("tenant-b-secret"), "{b_log}");
    let ev = work.path().join("a.json");
    let (code, _, err) = attest(&d, &["quote", &a, "--out", ev.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&ev).unwrap();
    assert!(
        !text.contains("tenant-b-secret"),
        "B's path leaked into A's evidence"
    );
    assert!(text.contains("imacri-ng2-redacted"), "{text}");
    assert!(text.contains(&b), "B's entries are there, redacted");
    let (code, report, err) = verify(&d, &a, &golden, &ak, &[]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    // B itself is caught as before.
    let (code, report, _) = verify(&d, &b, &golden, &ak, &[]);
    assert_eq!(code, 1, "{report:#}");
    // ... and still after kubelet removed it (attestation.retention_secs),
    // by its full ID.
    imacri_integration::client::remove_pod(&mut rt, &b).await;
    let (code, report, err) = verify(&d, &b, &golden, &ak, &[]);
    assert_eq!(code, 1, "removed pod: {report:#}\n{err}");
    assert_eq!(
        report["violations"][0]["path"], "/tmp/tenant-b-secret/true",
        "{report:#}"
    );
    let (code, _, err) = attest(&d, &["quote", &b[..12]]);
    assert_ne!(code, 0);
    assert!(err.contains("full ID"), "{err}");
}

/// Test PKI for the TCP endpoint: a CA, the node's certificate for
/// 127.0.0.1, a verifier's client certificate, and a client certificate
/// from another CA.
fn mtls_certs(dir: &Path) {
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for ca in ["ca", "rogue-ca"] {
        sh(&format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {ca}.key -out {ca}.crt -subj /CN={ca} -days 2"
        ));
    }
    for (name, ca, ext) in [
        (
            "node",
            "ca",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("verifier", "ca", "extendedKeyUsage=clientAuth"),
        ("rogue", "rogue-ca", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        sh(&format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             openssl x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial \
             -out {name}.crt -days 2 -extfile {name}.ext"
        ));
    }
}

/// Verifiers off the node reach attestation over TCP only with a client
/// certificate from the configured CA; the endpoint never runs without one.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_endpoint_requires_a_verifier_certificate() {
    let env = Env::get();
    let pki = tempfile::tempdir_in(&env.base).unwrap();
    mtls_certs(pki.path());
    let p = |f: &str| pki.path().join(f).to_string_lossy().into_owned();
    let port = imacri_integration::free_port();
    let addr = format!("127.0.0.1:{port}");
    // No client CA: refuses to start rather than serve without client auth.
    let e = Imacri::start_with(
        env,
        &[
            "--attest-tcp",
            &addr,
            "--attest-tls-cert",
            &p("node.crt"),
            "--attest-tls-key",
            &p("node.key"),
        ],
    )
    .await
    .err()
    .expect("must not start");
    assert!(e.to_string().contains("client_ca"), "{e}");
    let d = Imacri::start_with(
        env,
        &[
            "--attest-tcp",
            &addr,
            "--attest-tls-cert",
            &p("node.crt"),
            "--attest-tls-key",
            &p("node.key"),
            "--attest-client-ca",
            &p("ca.crt"),
        ],
    )
    .await
    .unwrap();
    d.pull(&env.busybox).await;
    let url = format!("https://{addr}");
    let over_tls = |who: &str| {
        std::process::Command::new(imacri_integration::imacri_bin())
            .args(["attest", "--endpoint", &url, "--tls-ca", &p("ca.crt")])
            .args([
                "--tls-cert",
                &p(&format!("{who}.crt")),
                "--tls-key",
                &p(&format!("{who}.key")),
            ])
            .args(["golden", &env.busybox, "--from-node"])
            .output()
            .unwrap()
    };
    let ok = over_tls("verifier");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("/bin/busybox"));
    let rogue = over_tls("rogue");
    assert!(
        !rogue.status.success(),
        "a certificate from another CA was accepted"
    );
    // curl as another client: no certificate, no service.
    let curl = |extra: &[String]| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "-o",
                "/dev/null",
                "--cacert",
                &p("ca.crt"),
            ])
            .args(extra)
            .arg(format!("{url}/imacri.attestation.v1.Attestation/ListPods"))
            .output()
            .unwrap()
    };
    let none = curl(&[]);
    assert!(
        !none.status.success(),
        "served without a client certificate"
    );
    let with = curl(&[
        "--cert".into(),
        p("verifier.crt"),
        "--key".into(),
        p("verifier.key"),
    ]);
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
}
