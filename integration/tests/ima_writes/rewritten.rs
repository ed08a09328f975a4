//! Files rewritten under what runs them: a mapped file in place (ToMToU), a script
//! under its interpreter, a loader under its program.

use super::*;

/// A shell line's start that keeps the image's libc mapped for 2 s (the
/// dynamic `lazy` sleeping in the background).
const HELD_LIBC: &str = "lazy > /dev/null & sleep 0.5;";

/// ToMToU: a file mapped executable and then rewritten in place runs what
/// was written (the mapping reads the page cache), not what was measured.
/// In a plain pod the rewritten code runs; in an ima pod the write is a
/// `tomtou` entry (a violation the verifier reports) in measure mode, and
/// kills the container in enforce mode, where the file was one the policy
/// allows (the image's libc, first copied up so that it can be written in
/// place).
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_file_rewritten_in_place_is_a_violation() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);

    let plain = pod_config("tomtou-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    let (_, out, err) = exec_sh(&mut rt, &c, "escape tomtou /tmp/t.bin").await;
    assert!(out.contains("RAN tomtou 43"), "control: {out}{err}");
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-measure", "measure", &image).await;
    for c in [&a, &b] {
        let (_, out, err) = exec_sh(&mut rt, c, "escape tomtou /tmp/t.bin").await;
        assert!(out.contains("RAN tomtou 43"), "{out}{err}");
        let lines = log_lines(&d, &pod);
        let mine = entries_of(&lines, c);
        assert!(
            logged(&mine, "/tmp/t.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/t.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
        // Mapping it again measures it again (what it holds now); reading
        // a watched file is no violation.
        let before = entries_of(&log_lines(&d, &pod), c).len();
        sh_ok(
            &mut rt,
            c,
            "escape threaded-mmap /tmp/t.bin; cat /tmp/t.bin > /dev/null",
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        let c43 = sha256_hex(&[0xb8, 0x2b, 0, 0, 0, 0xc3]);
        assert!(logged(&mine, "/tmp/t.bin", Some(&c43), "mmap"), "{mine:#?}");
        let new: Vec<_> = mine[before..]
            .iter()
            .filter(|l| l.ends_with(" tomtou"))
            .collect();
        assert!(new.is_empty(), "{new:#?}");
        // truncate(2) opens nothing and sends fanotify no event: the read
        // lease sees it, and the `tomtou` is logged before the cut lands.
        let out = sh_ok(
            &mut rt,
            c,
            "cp /tmp/t.bin /tmp/cut.bin && escape truncate /tmp/cut.bin",
        )
        .await;
        assert!(out.contains("CUT truncate 0"), "{out}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(
            logged(&mine, "/tmp/cut.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
    }
    assert_running(&mut rt, &a, "the container").await;
    stop_pod(&mut rt, &pod).await;

    // Enforce, with a file the policy allows that the pod can write in
    // place: the image's libc, copied up (same digest). While it is mapped,
    // an open for writing is refused before a byte is written; the
    // container runs on with what was measured. Once nothing maps it (the
    // container's shells are static busybox), it is written as any file.
    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-enforce", "strict", &image).await;
    let refused = |out: &str| out.contains("Operation not permitted");
    for c in [&a, &b] {
        sh_ok(
            &mut rt,
            c,
            &format!("cp {LIBC} /tmp/l && cat /tmp/l > {LIBC}"),
        )
        .await;
        let (code, out, err) = exec_sh(&mut rt, c, &format!("escape tomtou {LIBC} keep")).await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(!out.contains("WROTE"), "{out}{err}");
        assert!(refused(&out), "{out}{err}\n{}", d.log());
        let out = sh_ok(
            &mut rt,
            c,
            &format!("{HELD_LIBC} cat /tmp/l > {LIBC}; echo rc=$?; wait"),
        )
        .await;
        assert!(out.ends_with("rc=1"), "{out}");
        let out = sh_ok(&mut rt, c, &format!("cat /tmp/l > {LIBC}; echo rc=$?")).await;
        assert!(out.ends_with("rc=0"), "nothing maps it: {out}");
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        assert_running(&mut rt, c, "the container").await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LIBC, None, "mmap"), "{mine:#?}");
        assert!(logged(&mine, LIBC, None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, LIBC, None, "tomtou"), "{mine:#?}");
    }
    // A truncate cannot be refused like an open: the truncater waits on
    // the lease while the container is killed, so it never cuts.
    let truncated = |d: &Imacri, c: &str| {
        let mine = entries_of(&log_lines(d, &pod), c);
        logged(&mine, LIBC, None, "tomtou")
    };
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (_, out, err) = exec_sh(&mut rt, &a, &format!("escape truncate {LIBC}")).await;
    assert!(out.contains("MAPPED") && !out.contains("CUT"), "{out}{err}");
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert_eq!(stats["fanotify"]["unleasedFiles"], 0, "{stats}");
    let st = imacri_integration::client::wait_exited(&mut rt, &a).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}");
    assert!(
        st.message.contains("truncated (its read lease broke)"),
        "{st:?}"
    );
    let violation = async {
        while let Ok(Some(e)) = events.message().await {
            if e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                && e.container_id == a
            {
                return true;
            }
        }
        false
    };
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), violation).await;
    assert_eq!(seen, Ok(true), "IMA_VIOLATION_EVENT for {a}");
    drop(events);
    assert!(truncated(&d, &a), "{}", d.log());
    // The watches are the group's and the leases the keeper's: a restarted
    // imacri reads them back and still refuses (not only notices after).
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (_, out, err) = exec_sh(
        &mut rt,
        &b,
        &format!("{HELD_LIBC} cat /tmp/l > {LIBC}; echo rc=$?; wait"),
    )
    .await;
    assert!(out.trim_end().ends_with("rc=1"), "{out}{err}\n{}", d.log());
    assert!(refused(&err), "{out}{err}");
    assert_running(&mut rt, &b, &d.log()).await;
    // A truncate while imacri is down waits on the kept lease; the next
    // imacri finds it breaking and kills the container.
    sh_ok(
        &mut rt,
        &b,
        &format!("escape truncate {LIBC} 2 > /tmp/cut.out 2>&1 &"),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    d.kill();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = imacri_integration::client::wait_exited(&mut rt, &b).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}\n{}", d.log());
    assert!(st.message.contains("while imacri was down"), "{st:?}");
    assert!(truncated(&d, &b), "{}", d.log());
    stop_pod(&mut rt, &pod).await;
}

/// A script is read by its interpreter after its execution was measured,
/// a buffer at a time: rewritten in place while the interpreter sleeps, it
/// runs what was written (the control, in a plain pod). In an ima pod the
/// rewrite is seen as IMA's ToMToU sees it (the file is open by a reader
/// of the pod): in `measure` mode a `tomtou` violation, under `enforce`
/// the open for writing is refused (a `deny` entry) and what was measured
/// runs. Once the script is done, rewriting it is no violation. Under
/// `enforce` imacri is restarted while the script runs: the watch is the
/// group's, read back by the next imacri.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_rewritten_while_it_runs_is_seen() {
    let env = Env::get();
    let (mut d, image, work) = node(env, "").await;
    // Longer than ash's read buffer, so that the last line is read after
    // the sleep.
    let pad = "# padding padding padding padding padding padding padding";
    let mut text = String::from("#!/bin/sh\nsleep 6\n");
    for _ in 0..200 {
        text.push_str(pad);
        text.push('\n');
    }
    let off = text.len() + "echo ".len();
    text.push_str("echo SAFE\n");
    // The strict policy allows this script (by digest, anywhere).
    let golden = work.path().join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
    g["digests"] = serde_json::json!([format!("sha256:{}", sha256_hex(text.as_bytes()))]);
    std::fs::write(&golden, serde_json::to_vec(&g).unwrap()).unwrap();
    let make = format!(
        "printf '#!/bin/sh\\nsleep 6\\n' > /tmp/s.sh && for i in $(seq 200); do echo '{pad}' >> /tmp/s.sh; done && echo 'echo SAFE' >> /tmp/s.sh && chmod +x /tmp/s.sh"
    );
    let rewrite =
        format!("printf EVIL | dd of=/tmp/s.sh bs=1 seek={off} conv=notrunc 2>&1; echo dd=$?");
    let mut rt = d.runtime().await.unwrap();
    for (cfg, ev) in [
        (pod_config("script-plain"), None),
        (ima("script-measure", "measure"), Some("tomtou")),
        (ima("script-strict", "strict"), Some("deny")),
    ] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
        let (code, out, err) = exec_sh(
            &mut rt,
            &c,
            &format!("{make} && (/tmp/s.sh > /tmp/out 2>&1 &)"),
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if ev == Some("deny") {
            d.kill();
            d.spawn().await.unwrap();
            rt = d.runtime().await.unwrap();
        }
        let run = format!("{rewrite}; while [ ! -s /tmp/out ]; do sleep 0.2; done; cat /tmp/out");
        let (_, out, err) = exec_sh(&mut rt, &c, &run).await;
        match ev {
            Some("deny") => {
                assert!(out.contains("Operation not permitted"), "{out}{err}");
                assert!(out.contains("SAFE") && !out.contains("EVIL"), "{out}{err}");
            }
            _ => {
                assert!(out.contains("dd=0"), "{out}{err}");
                assert!(out.contains("EVIL"), "the rewrite ran: {out}{err}");
            }
        }
        if let Some(ev) = ev {
            let lines = log_lines(&d, &pod);
            assert!(logged(&lines, "/tmp/s.sh", None, ev), "{lines:#?}");
            let violations = lines.len();
            // Done running: a rewrite is fine (and what runs next is
            // measured again).
            let (_, out, err) = exec_sh(&mut rt, &c, &rewrite).await;
            assert!(out.contains("dd=0"), "{out}{err}");
            assert_eq!(log_lines(&d, &pod).len(), violations, "{}", d.log());
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// The kernel maps a dynamically linked program's interpreter (ld.so)
/// itself, with no `mmap` call the map guard could see, and then lets it be
/// opened for writing (the program itself is ETXTBSY while it runs). A
/// loader rewritten in place under a running program runs what was
/// written the next time the program calls into it (here: resolving a
/// lazily bound `puts`). In a plain pod the written code runs. In an ima
/// pod the loader is watched as a mapped library is: the write is a
/// `tomtou` entry in measure mode, and refused under enforce (the image's
/// own loader, copied up: a file the policy allows), where dynamic
/// programs then run on with what was measured. Until 2026-12-04 the
/// rewrite ran unlogged in both modes.
#[tokio::test(flavor = "multi_thread")]
async fn a_loader_rewritten_under_its_program_is_a_violation() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let attack = format!("escape loader-rewrite /bin/lazy {LOADER}");

    // The same, the task's first execution of the program having failed on
    // its interpreter (the loader renamed away and back in between).
    let hidden = format!("{attack} hide");

    let plain = pod_config("loader-plain");
    let (pod, c) = sleeping_pod(&mut rt, &d, &plain, &image).await;
    for a in [&attack, &hidden] {
        let (_, out, err) = exec_sh(&mut rt, &c, a).await;
        assert!(out.contains("RAN loader-rewrite 42"), "control: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "loader-measure", "measure", &image).await;
    for c in [&a, &b] {
        let (_, out, err) = exec_sh(&mut rt, c, &attack).await;
        // Measure mode lets the write through, logged before it lands.
        assert!(out.contains("RAN loader-rewrite 42"), "{out}{err}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, "/bin/lazy", None, "exec"), "{mine:#?}");
        assert!(
            logged(&mine, LOADER, None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
    }
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "loader-enforce", "strict", &image).await;
    for c in [&a, &b] {
        let (code, out, err) = exec_sh(&mut rt, c, &attack).await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            out.contains("loader-rewrite: Operation not permitted"),
            "{out}{err}\n{}",
            d.log()
        );
        assert_eq!(sh_ok(&mut rt, c, "lazy").await, "lazy");
        assert_running(&mut rt, c, "the container").await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LOADER, None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, LOADER, None, "tomtou"), "{mine:#?}");
    }
    stop_pod(&mut rt, &pod).await;

    // A task whose execution failed on the program's interpreter executes
    // the program again: that event is the program's, and the loader that
    // follows is watched all the same. Until 2026-12-04 the program was
    // taken for the awaited loader and the real loader went unwatched: its
    // rewrite ran unlogged in measure mode and was let through under
    // enforce.
    for (name, policy) in [
        ("loader-hidden-measure", "measure"),
        ("loader-hidden-enforce", "strict"),
    ] {
        let cfg = ima(name, policy);
        let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
        let (code, out, err) = exec_sh(&mut rt, &c, &hidden).await;
        let mine = entries_of(&log_lines(&d, &pod), &c);
        if policy == "measure" {
            assert!(out.contains("RAN loader-rewrite 42"), "{out}{err}");
            assert!(
                logged(&mine, LOADER, None, "tomtou"),
                "{mine:#?}\n{}",
                d.log()
            );
        } else {
            assert_ne!(code, 0, "{out}{err}");
            assert!(
                out.contains("loader-rewrite: Operation not permitted"),
                "{out}{err}\n{}",
                d.log()
            );
            assert!(logged(&mine, LOADER, None, "deny"), "{mine:#?}");
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// A program's interpreter, which the kernel maps itself, is watched as a
/// mapped file, and the kernel's own writers check of it comes after
/// imacri answers its loading. `escape interp-swap` runs a program whose
/// `PT_INTERP` names a copy of the loader nothing else maps, starves the
/// execution on a busy CPU once that answer is given, and opens the loader
/// for writing then (40 tries): under `deny` every such open is refused,
/// the execution being counted as mapping the loader until it is out of
/// `execve`.
#[tokio::test(flavor = "multi_thread")]
async fn a_loader_is_not_written_while_an_execution_loads_it() {
    let env = Env::get();
    let (d, image, _work) = node(env, "\n[ima.policies.nojit]\nanonymous_exec = \"deny\"").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, _b) = two_containers(&d, &mut rt, "interp-swap", "nojit", &image).await;
    // "INTERP tries loaded refused busy after": no execution loaded the
    // loader as a writer left it, in any round; and the race was run in
    // one (writers refused, or let through once the execution failed its
    // own writers check). Under the full suite's load the 40 tries of a
    // round once all landed after the loading (`INTERP 40 0 0 0 2`): a
    // round that ran no race is run again, up to 3.
    let (mut rounds, mut ran) = (Vec::new(), false);
    while !ran && rounds.len() < 3 {
        let (_, out, err) = exec_sh_within(&mut rt, &a, "escape interp-swap /tmp/h 40", 120).await;
        let n: Vec<u32> = out
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        assert!(
            out.starts_with("INTERP") && n.len() == 5 && n[1] == 0,
            "{out}{err}\n{}",
            d.log()
        );
        ran = n[2] + n[3] > 0;
        rounds.push(out);
    }
    assert!(ran, "no round ran the race: {rounds:?}");
    stop_pod(&mut rt, &pod).await;
}
