//! swtpm, the TPM 2.0 simulator, one per test that needs a TPM.

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{wait_for, Env};
use std::net::TcpListener;

/// swtpm as the tests run it: TCP server on `port`, control on
/// `port + 1`, state in `dir`, started up (cleared) without a TPM2_Startup.
fn swtpm_command(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("swtpm");
    cmd.args(["socket", "--tpm2", "--server"])
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// A TPM 2.0 simulator (swtpm) of a test's own, on loopback TCP.
pub struct Swtpm {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// A test CA for EK certificates: `swtpm_localca` creates its root and
/// signing (intermediate) certificates in `dir` on first use, as a TPM
/// vendor's CA would have.
pub struct EkCa {
    dir: tempfile::TempDir,
}

impl EkCa {
    pub fn new(env: &Env) -> Result<EkCa> {
        let dir = tempfile::Builder::new()
            .prefix("ekca-")
            .tempdir_in(&env.base)?;
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("swtpm-localca.conf"),
            format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n"
            ),
        )?;
        std::fs::write(dir.path().join("swtpm-localca.options"), "")?;
        std::fs::write(
            dir.path().join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {d}/swtpm-localca.conf\ncreate_certs_tool_options = {d}/swtpm-localca.options\nactive_pcr_banks = sha256\n"
            ),
        )?;
        Ok(EkCa { dir })
    }

    /// The CA's certificates (root and intermediate) as one PEM file, as a
    /// verifier is given them; exists once a TPM was manufactured.
    pub fn bundle(&self) -> Result<std::path::PathBuf> {
        let mut pem =
            std::fs::read_to_string(self.dir.path().join("swtpm-localca-rootca-cert.pem"))
                .context("the CA has no root yet: manufacture a TPM first")?;
        pem.push_str(&std::fs::read_to_string(
            self.dir.path().join("issuercert.pem"),
        )?);
        let out = self.dir.path().join("ek-ca-bundle.pem");
        std::fs::write(&out, pem)?;
        Ok(out)
    }
}

impl Swtpm {
    pub fn start(env: &Env) -> Result<Swtpm> {
        let dir = tempfile::Builder::new()
            .prefix("swtpm-")
            .tempdir_in(&env.base)?;
        Self::start_in(dir)
    }

    /// A TPM as a manufacturer ships it: `swtpm_setup` creates its EKs and
    /// stores EK certificates from `ca` in NV (RSA 2048 at 0x01c00002).
    pub fn start_manufactured(env: &Env, ca: &EkCa) -> Result<Swtpm> {
        let dir = tempfile::Builder::new()
            .prefix("swtpm-")
            .tempdir_in(&env.base)?;
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--config"])
            .arg(ca.dir.path().join("swtpm_setup.conf"))
            .arg("--tpmstate")
            .arg(dir.path())
            .output()
            .context("running swtpm_setup (apt-get install swtpm-tools)")?;
        if !out.status.success() {
            bail!(
                "swtpm_setup: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self::start_in(dir)
    }

    fn start_in(dir: tempfile::TempDir) -> Result<Swtpm> {
        for _ in 0..20 {
            // Two adjacent free ports (server, control), from a range other
            // tests' ephemeral ports are unlikely to use.
            let port = 20000 + (rand::random::<u16>() % 20000) * 2;
            if TcpListener::bind(("127.0.0.1", port)).is_err()
                || TcpListener::bind(("127.0.0.1", port + 1)).is_err()
            {
                continue;
            }
            let mut child = swtpm_command(port, dir.path())
                .spawn()
                .context("spawning swtpm (apt-get install swtpm swtpm-tools)")?;
            let up = wait_for("swtpm", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })
            .and_then(|()| {
                // Connected to our swtpm, not to someone else's on that port.
                std::thread::sleep(Duration::from_millis(100));
                match child.try_wait() {
                    Ok(None) => Ok(()),
                    _ => Err(anyhow!("swtpm exited")),
                }
            });
            match up {
                Ok(()) => return Ok(Swtpm { child, port, dir }),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        bail!("could not start swtpm on a free port")
    }

    /// Kills the simulator and starts it again on its state and port: the
    /// TPM starts up cleared (a TPM reset, as at a node's reboot).
    pub fn reboot(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let mut cmd = swtpm_command(port, self.dir.path());
        // The old listener may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = cmd.spawn().context("spawning swtpm")?;
            let up = wait_for("swtpm", Duration::from_secs(2), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            std::thread::sleep(Duration::from_millis(100));
            if up.is_ok() && matches!(child.try_wait(), Ok(None)) {
                self.child = child;
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                bail!("swtpm did not restart on port {port}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
