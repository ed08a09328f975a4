//! A measured pod attested against the registry's golden policy, changes caught,
//! and enforce mode denying what the policy lacks.

use super::*;

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
    // unmeasured meanwhile; with the keeper they wait, see ima_escapes/):
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
