//! Clients other than our own, built or installed from their registries:
//! a grpc-go CRI client (Go module proxy), Python grpcio (PyPI) and crictl
//! (cri-tools). See `scripts/test-tools.sh` for the cached parts.

use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::Env;

/// The Go toolchain from the machine (Go 1.26 with the module proxy).
pub const GO: &str = "/usr/local/go/bin/go";

/// Builds the Go module `integration/go/<name>` (module mode, pinned in its
/// go.mod/go.sum) into the environment's directory.
pub fn go_module(env: &Env, name: &str) -> Result<PathBuf> {
    go_build(name, ".", &env.base.join(name))
}

/// Builds package `pkg` with the module `integration/go/<module>`'s pinned
/// requirements into `out`.
fn go_build(module: &str, pkg: &str, out: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("go")
        .join(module);
    let r = Command::new(GO)
        .args(["build", "-trimpath", "-o"])
        .arg(out)
        .arg(pkg)
        .current_dir(&src)
        .env("GOFLAGS", "-buildvcs=false -mod=readonly")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .map_err(|e| anyhow!("running {GO}: {e}"))?;
    if !r.status.success() {
        return Err(anyhow!(
            "building {pkg} in {module}: {}",
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(out.to_path_buf())
}

/// `integration/go/criclient`, built once per test process.
pub fn criclient(env: &Env) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| go_module(env, "criclient").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// `integration/go/nriplugin`: an NRI plugin on upstream's stub
/// (github.com/containerd/nri v0.12.5), built once per test process.
pub fn nriplugin(env: &Env) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| go_module(env, "nriplugin").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Upstream's sample NRI plugin `github.com/containerd/nri/plugins/<name>`
/// at the version `integration/go/nrisamples/go.mod` pins.
pub fn nri_sample(env: &Env, name: &str) -> Result<PathBuf> {
    go_build(
        "nrisamples",
        &format!("github.com/containerd/nri/plugins/{name}"),
        &env.base.join(format!("nri-sample-{name}")),
    )
}

/// The Python of the cached grpcio virtualenv.
pub fn grpcio_python(cache: &Path) -> PathBuf {
    let v = std::env::var("GRPCIO_VERSION").unwrap_or_else(|_| "1.85.1".into());
    cache.join(format!("grpcio-{v}/bin/python3"))
}

pub fn py_client() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/cri_client.py")
}

/// `integration/go/kubeletclient` (client-go exec and port-forward against
/// kubelet's API), built once per test process.
pub fn kubeletclient(env: &Env) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| go_module(env, "kubeletclient").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Builds `integration/go/spdyexec` (a client on moby/spdystream, the SPDY
/// library kubelet's remotecommand uses) with Debian's Go 1.19 in GOPATH
/// mode against Debian's packaged spdystream; returns the binary.
pub fn go_spdyexec(env: &Env) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = env.base.join("spdyexec");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/spdyexec");
            let r = Command::new("/usr/lib/go-1.19/bin/go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", env.base.join("gocache"))
                .output()
                .map_err(|e| {
                    format!("running go (apt-get install golang-1.19-go golang-github-docker-spdystream-dev): {e}")
                })?;
            if !r.status.success() {
                return Err(format!(
                    "building spdyexec: {}",
                    String::from_utf8_lossy(&r.stderr)
                ));
            }
            Ok(out)
        })
        .clone()
        .map_err(|e| anyhow!(e))
}
