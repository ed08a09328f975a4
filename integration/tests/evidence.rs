//! Evidence a verifier keeps checking: the TPM counters it saw (an older
//! quote is a replay), its checkpoint of the node's log (later evidence
//! carries only what follows) and its appraisal of each pod's entries (left
//! out of later evidence; a history too long for one Quote is appraised from
//! pages of it), on a real daemon, real containers and swtpm.

use imacri_integration::attesting::{
    anchored_node, grpcio_attest, ima_pod, log_lines, save_quote, sleeper, verify,
};
use imacri_integration::client::{exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::{attest, Env, Imacri};
use std::time::Duration;

/// A verifier remembers the newest TPM counters it saw: evidence quoted
/// before that (a replay of a saved quote with its own nonce) is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_quote_older_than_one_seen_is_refused() {
    let env = Env::get();
    let (_tpm, d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    let counters = work.path().join("counters.json");
    let c = counters.to_str().unwrap();
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("counters", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    let old = work.path().join("old.json");
    let nonce = "00112233445566778899aabbccddeeff";
    save_quote(&d, &pod, nonce, &old);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (code, report, err) = verify(&d, &pod, &golden, &ak, &["--counters", c]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    let book: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    let seen = book.as_object().unwrap().values().next().unwrap().clone();
    assert!(seen["clock"].as_u64().unwrap() > 0, "{book}");
    // The saved evidence answers its own nonce, but it is older.
    let replay = ["--evidence", old.to_str().unwrap(), "--nonce", nonce];
    let (code, _, err) = verify(&d, &pod, &golden, &ak, &replay);
    assert_eq!(code, 0, "without counters the replay passes: {err}");
    let mut with = replay.to_vec();
    with.extend(["--counters", c]);
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &with);
    assert_eq!(code, 2, "{report:#}");
    assert!(
        report["errors"].to_string().contains("backwards"),
        "{report:#}"
    );
}

/// A verifier builds its checkpoint from the log's pages (GetLogPage,
/// every entry redacted), proven by the quote from there; keeping it
/// (`--counters`) it is sent only the log after the entries it checked:
/// the tail replays from the PCR value it kept to the new quote, the pod's
/// earlier entries are still appraised, and the node cannot rewrite them
/// once checked (it no longer sends the whole log, so nothing else would
/// catch it).
#[tokio::test(flavor = "multi_thread")]
async fn incremental_evidence_carries_only_what_follows_the_checkpoint() {
    use imacri_runtime::integrity::log::{Entry, Event};
    let env = Env::get();
    let (_tpm, d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    let golden = work.path().join("golden.json");
    let counters = work.path().join("counters.json");
    let keep = ["--counters", counters.to_str().unwrap()];
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("incremental", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    // A violation before the checkpoint: an executable dropped in and run.
    sh_ok(
        &mut rt,
        &c,
        "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true && /tmp/new/true",
    )
    .await;
    let logged = |d: &Imacri, pod: &str, what: &'static str| {
        let lines = log_lines(d, pod);
        async move { lines.iter().any(|l| l.contains(what)).then_some(()) }
    };
    imacri_integration::poll::eventually(
        "the dropped-in file's entry",
        Duration::from_secs(10),
        || logged(&d, &pod, " /tmp/new/true "),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", log_lines(&d, &pod)));
    // Pages of 2 entries: several calls.
    let mut paged = keep.to_vec();
    paged.extend(["--page-entries", "2"]);
    let (code, first, err) = verify(&d, &pod, &golden, &ak, &paged);
    assert_eq!(code, 1, "{first:#}\n{err}");
    let checked = first["log_entries"].as_u64().unwrap();
    assert!(checked >= 4, "{first:#}");
    assert!(first["log_start"].as_u64().unwrap() > 0, "{first:#}");
    let book: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    let seen = book.as_object().unwrap().values().next().unwrap().clone();
    assert_eq!(seen["checkpoint"]["entries"], checked, "{book:#}");
    // Its entries with the start entries.
    let kept = seen["checkpoint"]["pods"][&pod]["entries"]
        .as_u64()
        .unwrap();
    assert!(kept > first["pod_entries"].as_u64().unwrap(), "{book:#}");
    // And what it concluded of them (the violation among it).
    let appraisal = &seen["checkpoint"]["pods"][&pod]["appraisal"];
    assert_eq!(appraisal["entries"], kept, "{book:#}");
    assert_eq!(appraisal["violations"], first["violations"], "{book:#}");

    // Another pod's entries follow.
    let other_cfg = ima_pod("incremental-other", None);
    let other = run_pod(&mut rt, &other_cfg).await.unwrap();
    start_container(&mut rt, &other, &other_cfg, sleeper(env)).await;
    imacri_integration::poll::eventually(
        "the other pod's entrypoint",
        Duration::from_secs(10),
        || logged(&d, &other, " /bin/busybox "),
    )
    .await
    .unwrap();
    let (code, next, err) = verify(&d, &pod, &golden, &ak, &keep);
    assert_eq!(code, 1, "{next:#}\n{err}\n{}", d.log());
    assert_eq!(next["log_start"], checked, "only what follows: {next:#}");
    assert!(next["log_entries"].as_u64().unwrap() > checked, "{next:#}");
    assert_eq!(next["violations"], first["violations"], "{next:#}");
    // The pod's entries it appraised were not sent again.
    assert_eq!(next["pod_log_start"], kept, "{next:#}");
    // The other pod, whose earlier entries this verifier saw redacted.
    let (code, theirs, err) = verify(&d, &other, &golden, &ak, &keep);
    assert_eq!(code, 0, "{theirs:#}\n{err}");
    assert_eq!(theirs["log_start"], next["log_entries"], "{theirs:#}");

    // The node rewrites the pod's checked violation into an allowed,
    // self-consistent entry: a verifier that kept its appraisal still
    // reports the violation (those entries are no longer sent); one
    // appraising under other options gets them whole and finds them
    // changed (the pod's kept hash); full evidence fails its replay.
    let log_path = d.root.join("integrity/measurements.log");
    let original = std::fs::read_to_string(&log_path).unwrap();
    let bad = original
        .lines()
        .find(|l| l.contains(" /tmp/new/true ") && l.contains(&pod))
        .unwrap();
    let e = Entry::parse(bad).unwrap();
    let clean = Entry::new(
        e.pcr,
        e.digest,
        "/bin/busybox",
        &e.pod,
        &e.container,
        Event::Exec,
    );
    // Until then evidence was read where imacri's index says entries lie.
    assert!(!d.log().contains("changed outside imacri"), "{}", d.log());
    std::fs::write(&log_path, original.replacen(bad, &clean.to_string(), 1)).unwrap();
    let (code, report, err) = verify(&d, &pod, &golden, &ak, &keep);
    // Its length is not what imacri wrote: the index is no longer trusted.
    assert!(d.log().contains("changed outside imacri"), "{}", d.log());
    assert_eq!(code, 1, "{report:#}\n{err}");
    assert_eq!(report["violations"], first["violations"], "{report:#}");
    let mut other_options = keep.to_vec();
    other_options.push("--allow-gaps");
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &other_options);
    assert_eq!(report["pod_log_start"], 0, "{report:#}");
    assert_eq!(code, 2, "{report:#}");
    assert!(
        report["errors"]
            .to_string()
            .contains("not those this verifier checked"),
        "{report:#}"
    );
    let (code, report, _) = verify(&d, &pod, &golden, &ak, &[]);
    assert_eq!(code, 2, "{report:#}");
    assert!(
        report["errors"].to_string().contains("replay"),
        "{report:#}"
    );
    // Invalid evidence moved no checkpoint: the log restored verifies.
    std::fs::write(&log_path, &original).unwrap();
    let (code, report, err) = verify(&d, &pod, &golden, &ak, &keep);
    assert_eq!(code, 1, "{report:#}\n{err}");
    assert_eq!(report["log_start"], theirs["log_entries"], "{report:#}");

    // Saved evidence from a checkpoint (`attest quote --from-entry`), as a
    // verifier that fetches and checks apart does it; then also without the
    // pod's entries that verifier appraised (`--pod-from-entry`, its
    // checkpoint's `appraisal.entries`).
    let saved = work.path().join("since.json");
    for (nonce, skip) in [
        ("0102030405060708090a0b0c0d0e0f10", false),
        ("1102030405060708090a0b0c0d0e0f10", true),
    ] {
        let book: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
        let cp = &book.as_object().unwrap().values().next().unwrap()["checkpoint"];
        let appraised = match skip {
            true => cp["pods"][&other]["appraisal"]["entries"].to_string(),
            false => "0".to_string(),
        };
        assert!(!skip || appraised != "0", "{book:#}");
        let (from, epoch) = (
            cp["entries"].to_string(),
            cp["epoch_started_at"].to_string(),
        );
        let mut args = vec!["quote", &other, "--nonce", nonce, "--from-entry", &from];
        args.extend(["--from-epoch", &epoch, "--out", saved.to_str().unwrap()]);
        if skip {
            args.extend(["--pod-from-entry", &appraised]);
        }
        let (code, _, err) = attest(&d, &args);
        assert_eq!(code, 0, "{err}");
        let ev: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        assert_eq!(ev["log_start"], cp["entries"], "{ev:#}");
        assert_eq!(ev["pod_log_start"].to_string(), appraised, "{ev:#}");
        let mut with = keep.to_vec();
        with.extend(["--evidence", saved.to_str().unwrap(), "--nonce", nonce]);
        let (code, report, err) = verify(&d, &other, &golden, &ak, &with);
        assert_eq!(code, 0, "{report:#}\n{err}");
        assert_eq!(report["log_start"], cp["entries"], "{report:#}");
        assert_eq!(report["pod_log_start"].to_string(), appraised, "{report:#}");
    }
}

/// A pod whose own entries pass what one Quote carries (64 MiB; here
/// executions of 5 000 links from 3.6 KB deep in directories named by
/// spaces, which the log escapes to 4 bytes each: ~14 KB an entry) cannot
/// be sent whole; a verifier without its appraisal (new, or under other
/// options) appraises the history from pages of the pod's entries
/// (GetLogPage for the pod) and asks the Quote to leave them out. The pages
/// must fold to the log's hash of the pod's entries: a node that rewrites
/// one is caught.
#[tokio::test(flavor = "multi_thread")]
async fn a_history_longer_than_a_quote_is_appraised_from_pages() {
    let env = Env::get();
    let (_tpm, d, work) = anchored_node(env, &[]).await;
    let ak = work.path().join("ak.pem");
    // Busybox allowed at any path (golden's digest): the links are no
    // violations, so the reports stay small.
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("golden.json")).unwrap())
            .unwrap();
    let mut anywhere = golden.clone();
    anywhere["digests"] = golden["files"]["/bin/busybox"].clone();
    let policy = work.path().join("anywhere.json");
    std::fs::write(&policy, anywhere.to_string()).unwrap();
    let counters = work.path().join("counters.json");
    let keep = ["--counters", counters.to_str().unwrap()];
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("long-history", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let script = "s=$(printf '%240s' ''); d=/tmp; i=0; \
        while [ $i -lt 15 ]; do d=\"$d/$s\"; i=$((i+1)); done; \
        mkdir -p \"$d\" && cd \"$d\" && cp /bin/busybox b || exit 1; i=0; \
        while [ $i -lt 5000 ]; do ln b $i; ./$i 2>/dev/null; i=$((i+1)); done; \
        echo done > /tmp/done; exec sleep 1000";
    let app = imacri_integration::container_config("app", &env.busybox, &["sh", "-c", script]);
    let c = start_container(&mut rt, &pod, &cfg, app).await;
    let t0 = std::time::Instant::now();
    imacri_integration::poll::eventually("5000 links run", Duration::from_secs(240), || {
        let (mut rt, c) = (rt.clone(), c.clone());
        async move {
            let (code, _, _) = exec_sh(&mut rt, &c, "cat /tmp/done").await;
            (code == 0).then_some(())
        }
    })
    .await
    .unwrap();
    eprintln!("5000 long-path executions in {:?}", t0.elapsed());

    // Whole, its evidence would pass what a message carries.
    let (code, _, err) = attest(&d, &["quote", &pod, "--out", "/dev/null"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("ResourceExhausted") && err.contains("own log entries"),
        "{err}"
    );
    // So is it for a verifier that would not page the pod's entries.
    let (code, _, err) = verify(&d, &pod, &policy, &ak, &["--pod-pages-after", "100000"]);
    assert_eq!(code, 2);
    assert!(err.contains("ResourceExhausted"), "{err}");
    // A verifier that keeps nothing builds its checkpoint and appraisal
    // from pages.
    let t0 = std::time::Instant::now();
    let (code, report, err) = verify(&d, &pod, &policy, &ak, &[]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    eprintln!("verified from pages in {:?}", t0.elapsed());
    let paged = report["pod_log_start"].as_u64().unwrap();
    assert!(paged > 5000, "{report:#}");
    assert!(report["pod_entries"].as_u64().unwrap() > 5000, "{report:#}");
    // One that keeps them: the next evidence leaves them out without pages.
    let (code, first, err) = verify(&d, &pod, &policy, &ak, &keep);
    assert_eq!(code, 0, "{first:#}\n{err}");
    let book: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    let cp = &book.as_object().unwrap().values().next().unwrap()["checkpoint"];
    let kept = cp["pods"][&pod]["appraisal"]["entries"].as_u64().unwrap();
    assert_eq!(first["pod_log_start"], kept, "{first:#}\n{book:#}");
    let (code, next, err) = verify(&d, &pod, &policy, &ak, &keep);
    assert_eq!(code, 0, "{next:#}\n{err}");
    assert_eq!(next["pod_log_start"], kept, "{next:#}");
    assert_eq!(next["log_start"], first["log_entries"], "{next:#}");
    // Under other options the kept appraisal does not count: the pod's
    // entries are paged again, against the kept checkpoint.
    let mut gaps = keep.to_vec();
    gaps.push("--allow-gaps");
    let (code, report, err) = verify(&d, &pod, &policy, &ak, &gaps);
    assert_eq!(code, 0, "{report:#}\n{err}");
    assert_eq!(report["pod_log_start"], kept, "{report:#}");

    // Under the image's own policy each link is a violation, with its
    // 14 KB path: the report lists the first ones and counts the rest, and
    // the verifier's counters file stays small (it held all of them).
    let golden_path = work.path().join("golden.json");
    let strict_book = work.path().join("strict.json");
    let strict = ["--counters", strict_book.to_str().unwrap()];
    let (code, report, err) = verify(&d, &pod, &golden_path, &ak, &strict);
    assert_eq!(code, 1, "{err}");
    let listed = report["violations"].as_array().unwrap().len();
    let unlisted = report["violations_unlisted"].as_u64().unwrap();
    assert_eq!(listed, imacri_runtime::integrity::verify::LISTED_VIOLATIONS);
    assert!(listed as u64 + unlisted >= 5000, "{unlisted}");
    let size = std::fs::metadata(&strict_book).unwrap().len();
    assert!(size < 4 << 20, "counters file of {size} bytes");
    eprintln!("counters file after {listed} + {unlisted} violations: {size} bytes");

    // The node rewrites one of the pod's entries (self-consistent, the
    // exec of another path): pages under yet other options no longer fold
    // to the hash the checked log holds.
    use imacri_runtime::integrity::log::Entry;
    let log_path = d.root.join("integrity/measurements.log");
    let original = std::fs::read_to_string(&log_path).unwrap();
    let line = original
        .lines()
        .find(|l| l.contains(&pod) && l.contains("/4321 "))
        .unwrap();
    let e = Entry::parse(line).unwrap();
    let other = Entry::new(
        e.pcr,
        e.digest,
        "/bin/busybox",
        &e.pod,
        &e.container,
        e.event,
    );
    std::fs::write(&log_path, original.replacen(line, &other.to_string(), 1)).unwrap();
    let mut stricter = gaps.clone();
    stricter.push("--require-anonymous-exec-denied");
    let (code, report, _) = verify(&d, &pod, &policy, &ak, &stricter);
    assert_eq!(code, 2, "{report:#}");
    assert!(
        report["errors"].to_string().contains("do not fold"),
        "{report:#}"
    );
    std::fs::write(&log_path, &original).unwrap();
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// imacri's peak resident memory so far, KiB.
fn peak_kib(d: &Imacri) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", d.pid().unwrap())).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Evidence from the first entry of a long epoch's log (~60 MB here: a
/// node without a TPM, or a client that asks without a checkpoint) takes
/// the node about twice that while it is built and sent. Many such
/// requests at once share one memory budget: they wait their turn rather
/// than grow imacri by that much each.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_whole_log_quotes_share_a_memory_budget() {
    let env = Env::get();
    let mut d = Imacri::start(env).await.unwrap();
    seed_long_log(&mut d).await;
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("whole-log", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    let before = peak_kib(&d);
    let socket = d.attest_socket.clone();
    let quotes: Vec<_> = (0..6)
        .map(|_| {
            let (socket, pod) = (socket.clone(), pod.clone());
            std::thread::spawn(move || {
                imacri_integration::attest_at(&socket, &["quote", &pod, "--out", "/dev/null"])
            })
        })
        .collect();
    for q in quotes {
        let (code, _, err) = q.join().unwrap();
        assert_eq!(code, 0, "{err}");
    }
    let grown = (peak_kib(&d) - before) / 1024;
    eprintln!(
        "6 whole-log quotes at once: imacri's peak +{grown} MiB (from {} MiB)",
        before / 1024
    );
    // Each takes ~147 MiB at its peak: +880 MiB when they all ran at once.
    assert!(grown < 320, "+{grown} MiB");
    // Another gRPC stack (Python grpcio, C-core's h2) reads responses sent
    // in slices whole: the log's pages (~3 MB each) and a whole-log Quote.
    let (ok, t) = grpcio_attest(&socket, &["--pages", &pod]);
    assert!(ok, "{t}");
    let entries = |what: &str| -> u64 {
        let l = t.lines().find(|l| l.starts_with(what)).unwrap_or_default();
        l.split(' ')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // The seeded entries and the pod's own (start, executions).
    eprintln!("{t}");
    assert!(entries("pages ") > 190_000, "{t}");
    assert_eq!(entries("quote "), entries("pages "), "{t}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// Restarts `d` on a log of 190 000 entries of pods long gone (~62 MB), so
/// that a new pod's whole-log evidence takes ~147 MiB of imacri's 160 MiB
/// evidence budget.
async fn seed_long_log(d: &mut Imacri) {
    use imacri_runtime::integrity::log::{Entry, Event};
    use std::io::Write;
    d.stop();
    let log_path = d.root.join("integrity/measurements.log");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&log_path).unwrap());
    for i in 0..190_000u32 {
        let pod = format!("{:064x}", i / 40);
        let path = format!("/usr/lib/x86_64-linux-gnu/lib{i}.so.1");
        let e = Entry::new(15, [(i % 251) as u8; 32], &path, &pod, &pod, Event::Mmap);
        writeln!(f, "{e}").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    d.spawn().await.unwrap();
}

/// A verifier that asks for evidence and then reads none of it (an h2
/// client that never opens its window) loses the response after
/// `attestation.unread_secs`: its share of the evidence budget goes back,
/// so another verifier's whole-log quote, which waited for it, is served,
/// and the stalled client's stream is reset when it reads at last. Before,
/// the stalled client held the budget until its connection closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_evidence_response_left_unread_is_dropped() {
    use prost::Message;
    let env = Env::get();
    let config = "[attestation]\nunread_secs = 3\n";
    let mut d = Imacri::start_configured(env, &env.namespace, &[], config)
        .await
        .unwrap();
    seed_long_log(&mut d).await;
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("unread", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    // The stalled verifier: a Quote of the whole log, its stream's window
    // 1 KiB and never opened.
    let io = tokio::net::UnixStream::connect(&d.attest_socket)
        .await
        .unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 10)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri("http://localhost/imacri.attestation.v1.Attestation/Quote")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let msg = imacri_api::attestation::QuoteRequest {
        pod_sandbox_id: pod.clone(),
        nonce: vec![7; 16],
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let (answer, mut send) = client.send_request(req, false).unwrap();
    send.send_data(framed.into(), true).unwrap();
    let stalled = answer.await.unwrap();
    assert_eq!(stalled.status(), 200);
    // Another verifier's whole-log quote waits for the budget it holds.
    let started = std::time::Instant::now();
    let (socket, p) = (d.attest_socket.clone(), pod.clone());
    let other = std::thread::spawn(move || {
        imacri_integration::attest_at(&socket, &["quote", &p, "--out", "/dev/null"])
    });
    let deadline = started + Duration::from_secs(90);
    while !other.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        other.is_finished(),
        "another verifier still waits for the stalled one's budget:\n{}",
        d.log()
    );
    let (code, _, err) = other.join().unwrap();
    assert_eq!(code, 0, "{err}");
    eprintln!("the other verifier's quote took {:?}", started.elapsed());
    assert!(d.log().contains("evidence response dropped"), "{}", d.log());
    // The stalled client reads at last: what h2 held, then a reset.
    let mut body = stalled.into_body();
    let mut got = 0usize;
    let end = loop {
        match body.data().await {
            Some(Ok(b)) => {
                got += b.len();
                let _ = body.flow_control().release_capacity(b.len());
            }
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(end.is_some(), "the whole response arrived ({got} bytes)");
    assert!(got < 2 << 20, "{got} bytes before the reset");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// Pods whose entries the journal's index locates (verbose Status).
async fn located(d: &Imacri) -> u64 {
    let mut rt = d.runtime().await.unwrap();
    let v = imacri_integration::client::integrity_stats(&mut rt).await;
    v["journalLocated"].as_u64().unwrap()
}

/// A removed ima pod stays quotable for `attestation.retention_secs`: its
/// entries stay located by the journal's index (its quotes read only its
/// lines, as a living pod's do; before, they read the whole log), across a
/// restart too, and once its retention ends imacri forgets where they lie.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_pod_stays_located_while_it_is_quotable() {
    let env = Env::get();
    let config = "[attestation]\nretention_secs = 6\n";
    let mut d = Imacri::start_configured(env, &env.namespace, &[], config)
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let read_whole = |d: &Imacri, pod: &str| {
        d.log()
            .lines()
            .any(|l| l.contains("evidence read from the whole log") && l.contains(pod))
    };
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("retained", None);
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    start_container(&mut rt, &pod, &cfg, sleeper(env)).await;
    assert_eq!(located(&d).await, 1);
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
    assert_eq!(located(&d).await, 1, "removed, still quotable");
    let quote = |d: &Imacri, pod: &str| attest(d, &["quote", pod, "--out", "/dev/null"]).0;
    assert_eq!(quote(&d, &pod), 0);
    assert!(!read_whole(&d, &pod), "{}", d.log());
    // Across a restart.
    d.stop();
    d.spawn().await.unwrap();
    assert_eq!(located(&d).await, 1, "read back");
    assert_eq!(quote(&d, &pod), 0);
    assert!(!read_whole(&d, &pod), "{}", d.log());
    // Its retention over, the next removal forgets where its entries lie.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut rt = d.runtime().await.unwrap();
    let cfg2 = ima_pod("retained-next", None);
    let next = run_pod(&mut rt, &cfg2).await.unwrap();
    start_container(&mut rt, &next, &cfg2, sleeper(env)).await;
    assert_eq!(located(&d).await, 2);
    imacri_integration::client::remove_pod(&mut rt, &next).await;
    assert_eq!(located(&d).await, 1, "only the pod removed last");
    assert_ne!(quote(&d, &pod), 0, "no longer quotable");
    // Its entries are still in the log: GetLog counts them in the whole log
    // and reserves that much (it reserved the whole evidence budget).
    let (code, out, err) = attest(&d, &["log", &pod]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains(&pod) && l.ends_with(" start")),
        "{out}"
    );
    assert!(
        d.log()
            .contains("its entries were counted in the whole log first"),
        "{}",
        d.log()
    );
    // Where the index cannot help (the log changed outside imacri), the
    // quote reads the whole log, and says so.
    let log_path = d.root.join("integrity/measurements.log");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"\n").unwrap();
    assert!(!read_whole(&d, &next));
    assert_eq!(quote(&d, &next), 0);
    assert!(read_whole(&d, &next), "{}", d.log());
}
