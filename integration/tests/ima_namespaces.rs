//! The node's word on what a pod's annotations choose: `[ima.namespaces]`
//! makes ima required for a Kubernetes namespace's pods and limits the
//! policies they may pick (the first being the default), with `"*"` for
//! every other namespace. A pod that does not comply is refused with
//! PermissionDenied naming the setting, and nothing of it is left; checked
//! with our client and with crictl.

use imacri_integration::client::{pod_info, run_pod};
use imacri_integration::escapes::stop_pod;
use imacri_integration::{cri, critest, pod_config, Env, Imacri};

fn in_namespace(name: &str, ns: &str, ima: Option<&str>) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    if let Some(m) = cfg.metadata.as_mut() {
        m.namespace = ns.into();
    }
    if let Some(policy) = ima {
        cfg.annotations
            .insert("imacri.dev/ima".into(), "true".into());
        if !policy.is_empty() {
            cfg.annotations
                .insert("imacri.dev/ima-policy".into(), policy.into());
        }
    }
    cfg
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_require_ima_and_limit_policies() {
    let env = Env::get();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[ima.policies.default]\n[ima.policies.measure]\n[ima.policies.nojit]\nanonymous_exec = \"deny\"\n\
         [ima.namespaces.payments]\nrequire = true\npolicies = [\"nojit\"]\n\
         [ima.namespaces.\"*\"]\npolicies = [\"measure\", \"default\"]\n",
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    let mut rt = d.runtime().await.unwrap();
    let pods = |rt: &mut imacri_integration::client::Rt| {
        let mut rt = rt.clone();
        async move {
            rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
                .unwrap()
                .into_inner()
                .items
                .len()
        }
    };
    let before = pods(&mut rt).await;

    // Required: a pod of the namespace that does not ask for ima.
    let e = run_pod(&mut rt, &in_namespace("plain", "payments", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("\"payments\"") && e.message().contains("require = true"),
        "{e:?}"
    );
    // A policy outside the namespace's list.
    let e = run_pod(&mut rt, &in_namespace("weak", "payments", Some("measure")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("[\"nojit\"]"), "{e:?}");
    // Another namespace: the "*" rule's list.
    let e = run_pod(&mut rt, &in_namespace("odd", "dev", Some("nojit")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"*\""), "{e:?}");
    assert_eq!(pods(&mut rt).await, before, "a refused pod left something");

    // What complies runs: no policy named gets the list's first.
    let pay = run_pod(&mut rt, &in_namespace("pay", "payments", Some("")))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    assert_eq!(pod_info(&mut rt, &pay).await["ima"]["policy"], "nojit");
    let dev = run_pod(&mut rt, &in_namespace("dev", "dev", Some("")))
        .await
        .unwrap();
    assert_eq!(pod_info(&mut rt, &dev).await["ima"]["policy"], "measure");
    let named = run_pod(&mut rt, &in_namespace("named", "dev", Some("default")))
        .await
        .unwrap();
    assert_eq!(pod_info(&mut rt, &named).await["ima"]["policy"], "default");
    let plain = run_pod(&mut rt, &in_namespace("plain", "dev", None))
        .await
        .unwrap();
    assert_eq!(pod_info(&mut rt, &plain).await["ima"]["enabled"], false);
    for p in [&pay, &dev, &named, &plain] {
        stop_pod(&mut rt, p).await;
    }

    // crictl (grpc-go) sees the same refusal and the same default.
    let cache = critest::tools().unwrap();
    let crictl = critest::crictl(&cache);
    let ep = format!("unix://{}", d.socket.display());
    let ctl = |args: &[&str]| {
        std::process::Command::new(&crictl)
            .args(["--runtime-endpoint", &ep, "--timeout=60s"])
            .args(args)
            .output()
            .unwrap()
    };
    let pod_json = |ima: bool| {
        let mut v = serde_json::json!({
            "metadata": {"name": "crictl-pay", "namespace": "payments", "attempt": 0,
                         "uid": format!("crictl-pay-{}-{ima}", std::process::id())},
            "linux": {}
        });
        if ima {
            v["annotations"] = serde_json::json!({"imacri.dev/ima": "true"});
        }
        let p = work.path().join(format!("pod-{ima}.json"));
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let o = ctl(&["runp", pod_json(false).to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("PermissionDenied") && err.contains("must be ima pods"),
        "{err}"
    );
    let o = ctl(&["runp", pod_json(true).to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = ctl(&["inspectp", "-o", "json", &id]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["info"]["ima"]["policy"], "nojit", "{v}");
    assert!(ctl(&["stopp", &id]).status.success());
    assert!(ctl(&["rmp", &id]).status.success());

    // `imacri check` shows the rules.
    let out = std::process::Command::new(imacri_integration::imacri_bin())
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&out.stdout);
    let line = check
        .lines()
        .find(|l| l.starts_with("ima-ns-rules"))
        .unwrap_or_else(|| panic!("{check}"));
    assert!(
        line.contains("\"payments\": ima required, policies [\"nojit\"]")
            && line.contains("\"*\": ima optional, policies [\"measure\", \"default\"]"),
        "{line}"
    );
}
