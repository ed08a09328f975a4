//! Paths and refusals past the log's quota.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_new_paths_hits_the_quota() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "max_entries_per_pod = 20").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("quota", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    // Copies of one file: a new path (and entry) each.
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "i=0; while [ $i -lt 40 ]; do mkdir /tmp/d$i && cp /bin/busybox /tmp/d$i/true && /tmp/d$i/true || echo refused-$i; i=$((i+1)); done",
    )
    .await;
    assert!(
        out.contains("refused-"),
        "no refusal after the quota: {out}{err}"
    );
    assert!(!out.contains("refused-0\n"), "{out}");
    let lines = log_lines(&d, &pod);
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" quota")).count(),
        1,
        "{lines:#?}"
    );
    assert!(lines.len() <= 21, "{} entries: {lines:#?}", lines.len());
    // Known measurements still run; the pod is reported as violating.
    assert_eq!(sh_ok(&mut rt, &c, "echo still").await, "still");
    let info = imacri_integration::client::pod_info(&mut rt, &pod).await;
    assert!(
        info["ima"]["lastViolation"]
            .as_str()
            .unwrap_or_default()
            .contains("quota"),
        "{info}"
    );
    stop_pod(&mut rt, &pod).await;
}

/// Accesses imacri refuses unmeasured (a file past `ima.max_file_size`, one
/// that cannot be hashed or keeps changing) are `gap` entries: an attacker
/// repeating one, or under new names, must not grow the node log (and the
/// TPM's extends) past the pod's quota, which each used to bypass.
#[tokio::test(flavor = "multi_thread")]
async fn refused_accesses_cannot_grow_the_log_past_the_quota() {
    let _timing = TIMING.read().await;
    let env = Env::get();
    let (d, image, _work) = node(env, "max_entries_per_pod = 20").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("gaps", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    // One over-limit file executed 50 times: one gap.
    let t0 = std::time::Instant::now();
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "truncate -s 5G /tmp/over && chmod +x /tmp/over && i=0; while [ $i -lt 50 ]; do /tmp/over 2>/dev/null && echo RAN; i=$((i+1)); done; echo done",
    )
    .await;
    assert!(out.contains("done") && !out.contains("RAN"), "{out}{err}");
    let lines = log_lines(&d, &pod);
    assert_eq!(
        lines
            .iter()
            .filter(|l| logged(&[l.to_string()], "/tmp/over", None, "gap"))
            .count(),
        1,
        "{lines:#?}"
    );
    // Under 40 new names: bounded by the quota, one quota entry, and every
    // one still refused.
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "i=0; while [ $i -lt 40 ]; do ln /tmp/over /tmp/over$i && /tmp/over$i 2>/dev/null && echo RAN; i=$((i+1)); done; echo done",
    )
    .await;
    assert!(out.contains("done") && !out.contains("RAN"), "{out}{err}");
    let lines = log_lines(&d, &pod);
    assert!(lines.len() <= 21, "{} entries: {lines:#?}", lines.len());
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" quota")).count(),
        1,
        "{lines:#?}"
    );
    // Nor imacri's own log, nor kubelet's events: a warning per logged
    // gap, and violations reported at most 20 at once and one a second
    // after (the last saying how many it left out).
    let secs = t0.elapsed().as_secs() as usize + 1;
    let log = d.log_with(&["unreported="]).await;
    let mine = |what: &str| {
        log.lines()
            .filter(|l| l.contains(&c) && l.contains(what))
            .count()
    };
    assert!(
        (1..=21).contains(&mine("max_file_size: refused unhashed")),
        "{log}"
    );
    assert!(
        (20..=20 + secs).contains(&mine("ima violation")),
        "{} in {secs} s:\n{log}",
        mine("ima violation")
    );
    let mut violations = 0;
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), events.message())
            .await
            .map(|m| m.transpose())
    {
        violations += usize::from(
            e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                && e.container_id == c,
        );
    }
    assert!((20..=20 + secs).contains(&violations), "{violations}");
    stop_pod(&mut rt, &pod).await;
    // Warnings a pod causes per call are held to 10 a second: 2000
    // mappings of a bad fd, each refused by the map guard (a pod of its
    // own: the first one's quota is used up).
    let (pod, c) = sleeping_pod(&mut rt, &d, &ima("badfd", "measure"), &image).await;
    let t0 = std::time::Instant::now();
    let out = sh_ok(&mut rt, &c, "escape badfd-mmap 2000").await;
    assert_eq!(out, "REFUSED 2000");
    let secs = t0.elapsed().as_secs() as usize + 1;
    let log = d.log_with(&["cannot resolve the mapped file"]).await;
    let warned = log
        .lines()
        .filter(|l| l.contains(&c) && l.contains("cannot resolve the mapped file"))
        .count();
    assert!(
        (1..=10 * (secs + 1)).contains(&warned),
        "{warned} in {secs} s"
    );
    stop_pod(&mut rt, &pod).await;
}
