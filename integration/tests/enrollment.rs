//! Enrollment end to end: swtpm manufactured with an EK certificate from a
//! test CA (`swtpm_setup --create-ek-cert`), imacri on it, and the verifier
//! (`imacri attest enroll`) checking the EK chain and proving the AK with a
//! credential only that TPM can activate. Then the attacks: a software key
//! presented as AK, an AK from another TPM, a non-restricted key, a wrong
//! EK chain, a wrong pin and a replayed credential answer are each refused,
//! and `verify --node` trusts the enrolled AK only.

use imacri_api::attestation as pb;
use imacri_api::attestation::attestation_client::AttestationClient;
use imacri_api::attestation::attestation_server::{Attestation, AttestationServer};
use imacri_integration::client::{run_pod, sh_ok, start_container};
use imacri_integration::{
    attest, attest_at, container_config, pod_config, EkCa, Env, Imacri, Swtpm,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

fn ima_pod(name: &str) -> imacri_integration::cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg
}

/// `imacri check`'s tpm line for `tcti`.
fn check_tpm_line(env: &Env, tcti: &str) -> String {
    let out = std::process::Command::new(imacri_integration::imacri_bin())
        .args(["check", "--tpm-tcti", tcti, "--containerd-address"])
        .arg(&env.containerd_sock)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("tpm "))
        .unwrap_or_default()
        .to_string()
}

fn enroll_at(socket: &Path, out: &Path, trust: &[&str]) -> (i32, String) {
    let mut args = vec!["enroll", "--out", out.to_str().unwrap()];
    args.extend_from_slice(trust);
    let (code, _, err) = attest_at(socket, &args);
    (code, err)
}

fn verify_node(
    d: &Imacri,
    pod: &str,
    policy: &Path,
    node: &Path,
) -> (i32, serde_json::Value, String) {
    let (code, out, err) = attest(
        d,
        &[
            "verify",
            "--pod",
            pod,
            "--policy",
            policy.to_str().unwrap(),
            "--node",
            node.to_str().unwrap(),
        ],
    );
    (code, serde_json::from_str(&out).unwrap_or_default(), err)
}

/// What the man in the middle (or a node compromised before enrollment)
/// does to the enrollment conversation.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Forgery {
    /// The real AK's attributes around a software key's point.
    SoftwareAk,
    /// Another TPM's (real) AK.
    OtherAk,
    /// The real AK with `restricted` cleared (it could sign anything).
    Unrestricted,
    /// The first answer, recorded, returned to every later challenge.
    ReplayAnswer,
}

#[derive(Clone)]
struct Mitm {
    upstream: PathBuf,
    forgery: Forgery,
    other_ak: Vec<u8>,
    recorded: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Mitm {
    async fn up(&self) -> Result<AttestationClient<tonic::transport::Channel>, Status> {
        containerd_client::connect(&self.upstream)
            .await
            .map(AttestationClient::new)
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

#[tonic::async_trait]
impl Attestation for Mitm {
    async fn get_enrollment(
        &self,
        r: Request<pb::GetEnrollmentRequest>,
    ) -> Result<Response<pb::GetEnrollmentResponse>, Status> {
        let mut e = self
            .up()
            .await?
            .get_enrollment(r.into_inner())
            .await?
            .into_inner();
        let n = e.ak_public.len();
        match self.forgery {
            Forgery::SoftwareAk => {
                // TPMT_PUBLIC of an ECC key ends with the point: two
                // TPM2B coordinates of 32 bytes.
                let sk = p256::SecretKey::random(&mut rand::thread_rng());
                let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
                    &sk.public_key(),
                    false,
                );
                let mut tail = vec![0, 32];
                tail.extend_from_slice(point.x().unwrap());
                tail.extend_from_slice(&[0, 32]);
                tail.extend_from_slice(point.y().unwrap());
                e.ak_public.splice(n - 68.., tail);
            }
            Forgery::OtherAk => e.ak_public = self.other_ak.clone(),
            // type (2), nameAlg (2), then objectAttributes (4, big endian):
            // restricted is bit 16.
            Forgery::Unrestricted => e.ak_public[5] &= !0x01,
            Forgery::ReplayAnswer => {}
        }
        Ok(Response::new(e))
    }

    async fn activate_credential(
        &self,
        r: Request<pb::ActivateCredentialRequest>,
    ) -> Result<Response<pb::ActivateCredentialResponse>, Status> {
        if self.forgery == Forgery::ReplayAnswer {
            if let Some(secret) = self.recorded.lock().unwrap().clone() {
                return Ok(Response::new(pb::ActivateCredentialResponse { secret }));
            }
        }
        let a = self
            .up()
            .await?
            .activate_credential(r.into_inner())
            .await?
            .into_inner();
        *self.recorded.lock().unwrap() = Some(a.secret.clone());
        Ok(Response::new(a))
    }

    async fn quote(
        &self,
        _: Request<pb::QuoteRequest>,
    ) -> Result<Response<pb::QuoteResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
    async fn list_pods(
        &self,
        _: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
    async fn get_log(
        &self,
        _: Request<pb::GetLogRequest>,
    ) -> Result<Response<pb::GetLogResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
    async fn get_log_page(
        &self,
        _: Request<pb::GetLogPageRequest>,
    ) -> Result<Response<pb::GetLogPageResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
    async fn get_attestation_key(
        &self,
        _: Request<pb::GetAttestationKeyRequest>,
    ) -> Result<Response<pb::GetAttestationKeyResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
    async fn golden_policy(
        &self,
        _: Request<pb::GoldenPolicyRequest>,
    ) -> Result<Response<pb::GoldenPolicyResponse>, Status> {
        Err(Status::unimplemented("mitm"))
    }
}

/// Serves `m` on a unix socket in `dir`; the server stops with the runtime.
fn serve_mitm(m: Mitm, dir: &Path) -> PathBuf {
    let sock = dir.join(format!("mitm-{:?}.sock", m.forgery));
    let l = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AttestationServer::new(m))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
    );
    sock
}

async fn ak_public_of(socket: &Path) -> Vec<u8> {
    let ch = containerd_client::connect(socket).await.unwrap();
    AttestationClient::new(ch)
        .get_enrollment(pb::GetEnrollmentRequest {})
        .await
        .unwrap()
        .into_inner()
        .ak_public
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_proves_the_ak_lives_in_the_certified_tpm() {
    let env = Env::get();
    let ca = EkCa::new(env).unwrap();
    let tpm = Swtpm::start_manufactured(env, &ca).unwrap();
    let bundle = ca.bundle().unwrap();
    let tcti = tpm.tcti();
    let line = check_tpm_line(env, &tcti);
    assert!(line.contains("RSA EK certificate present"), "{line}");
    let d = Imacri::start_with(env, &["--tpm-tcti", &tcti])
        .await
        .unwrap();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let node = work.path().join("node.json");

    let (code, err) = enroll_at(
        &d.attest_socket,
        &node,
        &["--ek-ca", bundle.to_str().unwrap()],
    );
    assert_eq!(code, 0, "enroll: {err}\n{}", d.log());
    assert!(err.contains("certificate serial"), "{err}");
    let n: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&node).unwrap()).unwrap();
    let (_, ak_pem, _) = attest(&d, &["ak"]);
    assert_eq!(
        n["ak"]["public_key_pem"].as_str().unwrap().trim(),
        ak_pem.trim(),
        "{n:#}"
    );
    assert!(n["ek"]["certificate_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    // Enrolling again challenges with a fresh secret and gives the same node.
    let again = work.path().join("again.json");
    assert_eq!(
        enroll_at(
            &d.attest_socket,
            &again,
            &["--ek-ca", bundle.to_str().unwrap()]
        )
        .0,
        0
    );

    // Pinning instead of a certificate: the EK as `attest ek` reads it.
    let ek = work.path().join("ek.pem");
    let (code, _, err) = attest(&d, &["ek", "--out", ek.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let pinned = work.path().join("pinned.json");
    let (code, err) = enroll_at(
        &d.attest_socket,
        &pinned,
        &["--ek-pubkey", ek.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");

    // Another CA's chain (another vendor) does not vouch for this EK.
    let rogue = EkCa::new(env).unwrap();
    let other_tpm = Swtpm::start_manufactured(env, &rogue).unwrap();
    let rogue_bundle = rogue.bundle().unwrap();
    let (code, err) = enroll_at(
        &d.attest_socket,
        &work.path().join("x.json"),
        &["--ek-ca", rogue_bundle.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("EK certificate refused") && err.contains("no trusted CA"),
        "{err}"
    );
    // Only the intermediate, without its root: not anchored.
    let issuer_only = work.path().join("issuer-only.pem");
    let b = std::fs::read_to_string(&bundle).unwrap();
    let second = b
        .match_indices("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .unwrap()
        .0;
    std::fs::write(&issuer_only, &b[second..]).unwrap();
    let (code, err) = enroll_at(
        &d.attest_socket,
        &work.path().join("x.json"),
        &["--ek-ca", issuer_only.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("EK certificate refused"), "{err}");

    // A second node on the other TPM (no imacri state shared).
    let other_tcti = other_tpm.tcti();
    let ns = format!("enroll-{}", rand::random::<u32>());
    let other = Imacri::start_full(env, &ns, &["--tpm-tcti", &other_tcti])
        .await
        .unwrap();
    // A pin of this node's EK does not fit the other node.
    let (code, err) = enroll_at(
        &other.attest_socket,
        &work.path().join("x.json"),
        &["--ek-pubkey", ek.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("endorsement key refused"), "{err}");
    let other_ak = ak_public_of(&other.attest_socket).await;

    // The attacks between verifier and node, each refused.
    for forgery in [
        Forgery::SoftwareAk,
        Forgery::OtherAk,
        Forgery::Unrestricted,
        Forgery::ReplayAnswer,
    ] {
        let sock = serve_mitm(
            Mitm {
                upstream: d.attest_socket.clone(),
                forgery,
                other_ak: other_ak.clone(),
                recorded: Default::default(),
            },
            work.path(),
        );
        if forgery == Forgery::ReplayAnswer {
            // The first enrollment through it is honest (and recorded).
            let (code, err) = enroll_at(
                &sock,
                &work.path().join("x.json"),
                &["--ek-ca", bundle.to_str().unwrap()],
            );
            assert_eq!(code, 0, "{err}");
        }
        let out = work.path().join(format!("{forgery:?}.json"));
        let (code, err) = enroll_at(&sock, &out, &["--ek-ca", bundle.to_str().unwrap()]);
        assert_ne!(code, 0, "{forgery:?} was enrolled");
        eprintln!("{forgery:?}: {err}");
        assert!(
            err.contains("attestation key refused"),
            "{forgery:?}: {err}"
        );
        assert!(!out.exists(), "{forgery:?}: a node file was written");
        match forgery {
            Forgery::Unrestricted => assert!(err.contains("restricted is not set"), "{err}"),
            Forgery::ReplayAnswer => assert!(err.contains("replayed"), "{err}"),
            _ => assert!(err.contains("could not activate"), "{forgery:?}: {err}"),
        }
    }

    // Verification against the enrolled node: trusted, then the changed
    // binary is caught; the other node's quotes are refused.
    d.pull(&env.busybox).await;
    other.pull(&env.busybox).await;
    let golden = work.path().join("golden.json");
    imacri_integration::golden_from_registry(&d, env, &env.busybox, &golden);
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima_pod("enrolled");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("app", &env.busybox, &["sleep", "1000"]),
    )
    .await;
    sh_ok(&mut rt, &c, "ls / >/dev/null").await;
    let (code, report, err) = verify_node(&d, &pod, &golden, &node);
    assert_eq!(code, 0, "{report:#}\n{err}");
    sh_ok(&mut rt, &c, "mkdir -p /tmp/changed && cp /bin/busybox /tmp/changed/true && echo x >> /tmp/changed/true && /tmp/changed/true").await;
    let (code, report, err) = verify_node(&d, &pod, &golden, &node);
    assert_eq!(code, 1, "{report:#}\n{err}");
    assert_eq!(
        report["violations"][0]["path"], "/tmp/changed/true",
        "{report:#}"
    );

    let mut ort = other.runtime().await.unwrap();
    let ocfg = ima_pod("other-node");
    let opod = run_pod(&mut ort, &ocfg).await.unwrap();
    let (code, report, err) = verify_node(&other, &opod, &golden, &node);
    assert_eq!(code, 2, "{report:#}\n{err}");
    assert!(
        report.to_string().contains("not the registered"),
        "{report:#}"
    );
    // A hand-edited node file (another key, same public area) is refused.
    let mut edited = n.clone();
    edited["ak"]["public_key_pem"] = serde_json::Value::String(attest(&other, &["ak"]).1);
    let edited_path = work.path().join("edited.json");
    std::fs::write(&edited_path, edited.to_string()).unwrap();
    let (code, _, err) = verify_node(&other, &opod, &golden, &edited_path);
    assert_eq!(code, 2);
    assert!(err.contains("does not match its public area"), "{err}");
    imacri_integration::client::remove_pod(&mut ort, &opod).await;
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// A TPM without an EK certificate: enrollment needs a pin; a node without
/// a TPM has nothing to enroll; and `--node` refuses unanchored evidence
/// whatever `--allow-unanchored` says.
#[tokio::test(flavor = "multi_thread")]
async fn enrollment_without_certificate_or_tpm() {
    let env = Env::get();
    let ca = EkCa::new(env).unwrap();
    // Manufacture once so the CA exists (its bundle is what the verifier has).
    let _manufactured = Swtpm::start_manufactured(env, &ca).unwrap();
    let bundle = ca.bundle().unwrap();
    let tpm = Swtpm::start(env).unwrap();
    let tcti = tpm.tcti();
    let line = check_tpm_line(env, &tcti);
    assert!(line.contains("must pin the EK"), "{line}");
    let d = Imacri::start_with(env, &["--tpm-tcti", &tcti])
        .await
        .unwrap();
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let node = work.path().join("node.json");
    let (code, err) = enroll_at(
        &d.attest_socket,
        &node,
        &["--ek-ca", bundle.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("holds no EK certificate") && err.contains("--ek-pubkey"),
        "{err}"
    );
    let ek = work.path().join("ek.pem");
    assert_eq!(attest(&d, &["ek", "--out", ek.to_str().unwrap()]).0, 0);
    let (code, err) = enroll_at(
        &d.attest_socket,
        &node,
        &["--ek-pubkey", ek.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = enroll_at(&d.attest_socket, &node, &[]);
    assert_ne!(code, 0, "{err}");

    let ns = format!("enroll-{}", rand::random::<u32>());
    let bare = Imacri::start_full(env, &ns, &[]).await.unwrap();
    let (code, err) = enroll_at(
        &bare.attest_socket,
        &work.path().join("x.json"),
        &["--ek-pubkey", ek.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("FailedPrecondition") && err.contains("no TPM"),
        "{err}"
    );
    bare.pull(&env.busybox).await;
    let mut rt = bare.runtime().await.unwrap();
    let cfg = ima_pod("unanchored");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let golden = work.path().join("golden.json");
    let (code, _, err) = attest(
        &bare,
        &[
            "golden",
            &env.busybox,
            "--from-node",
            "--out",
            golden.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = attest(
        &bare,
        &[
            "verify",
            "--pod",
            &pod,
            "--policy",
            golden.to_str().unwrap(),
            "--node",
            node.to_str().unwrap(),
            "--allow-unanchored",
        ],
    );
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(out.contains("unanchored"), "{out}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}

/// The enrollment RPCs from another gRPC stack (Python grpcio, C-core):
/// the EK certificate and public areas arrive, a credential not made for
/// the TPM is refused with InvalidArgument, CRI is not served there, and
/// a Quote from a checkpoint carries only the log after it.
#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_reads_enrollment_data() {
    let env = Env::get();
    let ca = EkCa::new(env).unwrap();
    let tpm = Swtpm::start_manufactured(env, &ca).unwrap();
    let tcti = tpm.tcti();
    let d = Imacri::start_with(env, &["--tpm-tcti", &tcti])
        .await
        .unwrap();
    d.pull(&env.busybox).await;
    let mut rt = d.runtime().await.unwrap();
    let mut cfg = imacri_integration::pod_config("grpcio-quote");
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    let pod = imacri_integration::client::run_pod(&mut rt, &cfg)
        .await
        .unwrap();
    let app = imacri_integration::container_config("app", &env.busybox, &["sleep", "1000"]);
    imacri_integration::client::start_container(&mut rt, &pod, &cfg, app).await;
    let (ok, t) = imacri_integration::attesting::grpcio_attest(&d.attest_socket, &[&pod]);
    assert!(ok, "{t}\n{}", d.log());
    assert!(
        t.contains("ActivateCredential INVALID_ARGUMENT the TPM refused"),
        "{t}"
    );
    assert!(t.lines().any(|l| l.starts_with("incremental ")), "{t}");
    assert!(t.lines().any(|l| l == "pod page 2"), "{t}");
    assert!(t.lines().any(|l| l == "log True"), "{t}");
    assert!(t.lines().any(|l| l == "ok"), "{t}");
    imacri_integration::client::remove_pod(&mut rt, &pod).await;
}
