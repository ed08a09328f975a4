//! Debian's docker-registry on free loopback ports (anonymous, htpasswd,
//! TLS with a test CA).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, spawn_service, wait_for};

/// A test CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key).
pub(crate) fn make_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=imacri-test-ca",
        "-days",
        "2",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "reg.key",
        "-out",
        "reg.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "reg.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "reg.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])?;
    Ok((dir.join("ca.crt"), dir.join("reg.crt"), dir.join("reg.key")))
}

pub(crate) fn start_registry(base: &Path, name: &str, htpasswd: Option<&Path>) -> Result<String> {
    start_registry_tls(base, name, htpasswd, None)
}

pub(crate) fn start_registry_tls(
    base: &Path,
    name: &str,
    htpasswd: Option<&Path>,
    tls: Option<(&Path, &Path)>,
) -> Result<String> {
    let port = free_port();
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: imacri-test\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let tls = tls
        .map(|(c, k)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            )
        })
        .unwrap_or_default();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
        dir.join("data").display()
    );
    serve_registry(&dir, &cfg, port)
}

/// Runs docker-registry with `cfg` in `dir` and waits for `port`.
fn serve_registry(dir: &Path, cfg: &str, port: u16) -> Result<String> {
    std::fs::write(dir.join("config.yml"), cfg)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(log.try_clone()?)
        .stderr(log);
    spawn_service(cmd).context("starting docker-registry (apt-get install docker-registry)")?;
    wait_for("docker-registry", Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(format!("127.0.0.1:{port}"))
}

/// A registry using token auth (distribution's `auth: token`): it serves
/// the anonymous registry's storage (`storage_of`), so what was pushed there
/// can be pulled here, but only with a token `realm` signed by the key of
/// `cert`. Returns "127.0.0.1:PORT".
pub fn start_token_registry(
    base: &Path,
    name: &str,
    storage_of: &str,
    realm: &str,
    cert: &Path,
) -> Result<String> {
    let port = free_port();
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n\
         auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
        base.join(storage_of).join("data").display(),
        cert.display()
    );
    serve_registry(&dir, &cfg, port)
}

pub const TOKEN_SERVICE: &str = "imacri-test-registry";
pub const TOKEN_ISSUER: &str = "imacri-test-token-service";
