//! Who may ask for evidence: the verifier's socket runs no pods, a pod's evidence
//! hides others' entries, the TCP endpoint wants a verifier certificate.

use super::*;

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
