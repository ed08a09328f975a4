//! What plugins may change: the lockdown rules, validators, refused parts dropped.

use super::*;

fn runtime_default() -> Option<cri::LinuxContainerConfig> {
    security_context(|s| {
        s.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn lockdown_confine_only_refuses_all_allows_and_ima_pods_stay_measured() {
    let env = Env::get();
    let mut nri = Nri::new(env);
    let relax = json!({"linux": {"seccomp_policy": {"default_action": "SCMP_ACT_ALLOW"}}});
    let hook = json!({"hooks": {"prestart": [{"path": "/bin/true"}]}});
    let by_name = json!({
        "relax": relax,
        "hook": hook,
        "stricter": {"linux": {"seccomp_policy": {"default_action": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "exit", "exit_group", "rt_sigreturn", "nanosleep",
                                     "clock_nanosleep", "futex", "execve", "brk", "mmap", "arch_prctl",
                                     "set_tid_address", "getpid", "close", "fstat", "newfstatat"],
                           "action": "SCMP_ACT_ALLOW"}]}}},
        "unuser": {"linux": {"namespaces": [{"type": "-user"}]}},
        "execmount": {"mounts": [{"destination": "/x", "type": "tmpfs", "source": "tmpfs", "options": ["rw"]}]},
        "env": {"env": [{"key": "OK", "value": "1"}]},
        "hookin": {"hooks": {"start_container": [{"path": "/bin/sh", "args": ["sh", "-c", "true"]}]}},
        "pidns": {"linux": {"namespaces": [{"type": "pid"}]}},
        "memfd": {"linux": {"sysctl": {"vm.memfd_noexec": "0"}}},
        "imaoff": {"annotations": {"imacri.dev/ima": "false"}},
    });
    let rules = r#"
[nri.plugins."40-trusted"]
security = "all"
[nri.plugins."50-impostor"]
security = "all"
uids = [4242]
"#;
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(rules))
        .await
        .unwrap();
    nri.connect(
        env,
        "30",
        "plain",
        &json!({"events_file": nri.events("plain"), "adjust_by_name": by_name}),
    );
    let (mut rt, pod, cfg) = d.busybox_pod(env, "nri-lockdown").await;
    let ctr = |name: &str| {
        let mut c = container_config(name, &env.busybox, &["sleep", "1000"]);
        c.linux = runtime_default();
        c
    };
    // Default rule (confine-only): relaxing seccomp or adding a hook is
    // refused with the plugin, the field and the rule named.
    for (name, field) in [("relax", "linux.seccomp_policy"), ("hook", "hooks")] {
        let e = match create_container(&mut rt, &pod, &cfg, ctr(name)).await {
            Ok(id) => panic!(
                "{name} created: {}\n{}",
                runtime_spec(&mut rt, &id).await,
                std::fs::read_to_string(nri.dir.path().join("30-plain.log")).unwrap_or_default()
            ),
            Err(e) => e,
        };
        assert_eq!(e.code(), Code::FailedPrecondition, "{name}: {e:?}");
        for part in ["30-plain", field, "confine-only"] {
            assert!(e.message().contains(part), "{name}: {part} not in {e:?}");
        }
    }
    // Nothing was left of the refused containers.
    let left = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        left.containers.iter().all(|c| c.pod_sandbox_id != pod),
        "{left:?}"
    );
    // A stricter policy is allowed under confine-only.
    let s = create_container(&mut rt, &pod, &cfg, ctr("stricter"))
        .await
        .unwrap();
    assert_eq!(
        runtime_spec(&mut rt, &s).await["linux"]["seccomp"]["defaultAction"],
        "SCMP_ACT_ERRNO"
    );
    nri.stop_last();

    // The same adjustment from a plugin the admin trusts ("all") is applied.
    nri.connect(
        env,
        "40",
        "trusted",
        &json!({"events_file": nri.events("trusted"), "adjust_by_name": by_name}),
    );
    let r = start_container(&mut rt, &pod, &cfg, ctr("relax")).await;
    assert_eq!(
        runtime_spec(&mut rt, &r).await["linux"]["seccomp"]["defaultAction"],
        "SCMP_ACT_ALLOW"
    );
    // A plugin claiming a trusted name from another uid gets the default rule.
    nri.connect(
        env,
        "50",
        "impostor",
        &json!({"events_file": nri.events("impostor"), "adjust_by_name": by_name}),
    );
    let e = create_container(&mut rt, &pod, &cfg, ctr("hook"))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("50-impostor") && e.message().contains("confine-only"),
        "{e:?}"
    );
    nri.stop_last();
    // Without the impostor the trusted plugin's hook is applied and runs.
    let h = start_container(&mut rt, &pod, &cfg, ctr("hook")).await;
    assert_eq!(
        runtime_spec(&mut rt, &h).await["hooks"]["prestart"][0]["path"],
        "/bin/true"
    );

    // In an ima pod no rule lets a plugin take the user or pid namespace
    // away, add an executable mount or a hook inside the container, weaken
    // seccomp, lower vm.memfd_noexec or touch imacri's annotations; harmless
    // adjustments still apply.
    let mut icfg = pod_config("nri-ima");
    icfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    let ipod = imacri_integration::client::run_pod(&mut rt, &icfg)
        .await
        .unwrap();
    for name in [
        "unuser",
        "execmount",
        "relax",
        "hookin",
        "pidns",
        "memfd",
        "imaoff",
    ] {
        let e = create_container(&mut rt, &ipod, &icfg, ctr(name))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{name}: {e:?}");
        assert!(e.message().contains("ima pod"), "{name}: {e:?}");
    }
    let ok = start_container(&mut rt, &ipod, &icfg, ctr("env")).await;
    assert_eq!(sh_ok(&mut rt, &ok, "echo $OK").await, "1");
    assert_eq!(
        container_status(&mut rt, &ok).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    imacri_integration::client::remove_pod(&mut rt, &ipod).await;
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// Validator plugins (NRI's ValidateContainerAdjustment) see the merged
/// adjustments, who owns each field and which plugins were asked, and can
/// reject the container.
#[tokio::test(flavor = "multi_thread")]
async fn validator_plugins_see_owners_and_can_reject() {
    let env = Env::get();
    let mut nri = Nri::new(env);
    let rules = "[nri.plugins.\"10-adder\"]\nsecurity = \"all\"\n";
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(rules))
        .await
        .unwrap();
    nri.connect(
        env,
        "10",
        "adder",
        &json!({"events_file": nri.events("adder"), "adjust_by_name": {
            "hooked": {"hooks": {"prestart": [{"path": "/bin/true"}]},
                       "env": [{"key": "A", "value": "1"}]},
            "plain": {"env": [{"key": "A", "value": "1"}]}}}),
    );
    let validator = nri.events("validator");
    nri.connect(
        env,
        "90",
        "validator",
        &json!({"events_file": validator, "validate_reject_hooks": true}),
    );
    let (mut rt, pod, cfg) = d.busybox_pod(env, "nri-validate").await;
    let c = |n: &str| container_config(n, &env.busybox, &["sleep", "1000"]);
    let e = create_container(&mut rt, &pod, &cfg, c("hooked"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for part in ["90-validator", "hooks are not allowed", "10-adder"] {
        assert!(e.message().contains(part), "{part}: {e:?}");
    }
    let ok = start_container(&mut rt, &pod, &cfg, c("plain")).await;
    assert_eq!(sh_ok(&mut rt, &ok, "echo $A").await, "1");
    let l = lines(&validator);
    assert!(
        l.iter()
            .any(|x| x == "Validate plain/env=A:10-adder hooks= consulted=10-adder,90-validator"),
        "{l:?}"
    );
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// `on_refused = "drop"`: the refused part of an adjustment is left out and
/// logged, the rest is applied and the container runs.
#[tokio::test(flavor = "multi_thread")]
async fn refused_parts_can_be_dropped_instead() {
    let env = Env::get();
    let mut nri = Nri::new(env);
    let rules = "[nri.plugins.\"10-lenient\"]\non_refused = \"drop\"\n";
    let d = Imacri::start_configured(env, &env.namespace, &[], &nri.config(rules))
        .await
        .unwrap();
    nri.connect(
        env,
        "10",
        "lenient",
        &json!({"events_file": nri.events("lenient"),
                "adjust": {"hooks": {"prestart": [{"path": "/bin/true"}]},
                           "env": [{"key": "KEPT", "value": "yes"}]}}),
    );
    let (mut rt, pod, cfg) = d.busybox_pod(env, "nri-drop").await;
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("app", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    assert_eq!(sh_ok(&mut rt, &c, "echo $KEPT").await, "yes");
    let spec = runtime_spec(&mut rt, &c).await;
    assert!(
        spec["hooks"]["prestart"]
            .as_array()
            .is_none_or(|h| h.is_empty()),
        "{spec}"
    );
    d.log_with(&["NRI adjustment dropped", "10-lenient"]).await;
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
