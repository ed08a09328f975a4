//! critest (cri-tools' CRI validation suite) against imacri: stand-ins for
//! every image it pulls, built from Debian's dynamically linked busybox and
//! pushed to the test registry, with hosts.toml mirrors for the registries it
//! names, and the critest/crictl binaries that `scripts/test-tools.sh` builds
//! from the Go module proxy.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::images::{build_and_push, compile_c, ImageDef};
use crate::Env;

/// The version `scripts/test-tools.sh` builds.
pub const CRI_TOOLS_VERSION: &str = "v1.37.0";

/// Builds (or finds cached) crictl and critest and the unpacked dynamic
/// busybox; returns the cache directory.
pub fn tools() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CRI_TOOLS_VERSION", CRI_TOOLS_VERSION)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

pub fn crictl(cache: &Path) -> PathBuf {
    cache.join(format!("cri-tools-{CRI_TOOLS_VERSION}/crictl"))
}

pub fn critest(cache: &Path) -> PathBuf {
    cache.join(format!("cri-tools-{CRI_TOOLS_VERSION}/critest"))
}

/// Shared libraries `bin` needs, as (path in the image, host file).
fn libraries(bin: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd").arg(bin).output().context("ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push((p.trim_start_matches('/').to_string(), PathBuf::from(p)));
        }
    }
    Ok(libs)
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
www-data:x:33:33:www-data:/var/www:/bin/sh\n\
default-user:x:1000:1000::/home/default-user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nwww-data:x:33:\nusers:x:100:\n\
default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\nnogroup:x:65534:\n";

/// busybox 1.35 (dynamic, every applet a hard link, so each command is a
/// real exec as in the upstream images), plus the host's pgrep and ipcs that
/// critest calls and Debian's busybox lacks, with their libraries.
fn base(cache: &Path) -> Result<ImageDef> {
    let bb = cache.join("busybox-deb/bin/busybox");
    let list = Command::new(&bb)
        .arg("--list-full")
        .output()
        .with_context(|| format!("{} --list-full", bb.display()))?;
    let mut d = ImageDef {
        config: serde_json::json!({
            "Cmd": ["sh"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        }),
        ..Default::default()
    };
    d.files
        .push(("bin/busybox".into(), std::fs::read(&bb)?, 0o755));
    let extra = ["/usr/bin/pgrep", "/usr/bin/ipcs"];
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if applet.is_empty() || extra.iter().any(|e| e.ends_with(&format!("/{name}"))) {
            continue;
        }
        d.hardlinks.push((applet.to_string(), "bin/busybox".into()));
    }
    let mut libs = libraries(&bb)?;
    for e in extra {
        d.files.push((e[1..].to_string(), std::fs::read(e)?, 0o755));
        libs.extend(libraries(Path::new(e))?);
    }
    libs.sort();
    libs.dedup();
    for (inside, host) in libs {
        d.files.push((inside, std::fs::read(&host)?, 0o755));
    }
    d.files.push(("etc/passwd".into(), PASSWD.into(), 0o644));
    d.files.push(("etc/group".into(), GROUP.into(), 0o644));
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "usr/local",
        "usr/local/bin",
        "lib",
        "lib64",
        "lib/x86_64-linux-gnu",
        "etc",
        "tmp",
        "root",
        "proc",
        "sys",
        "dev",
        "var",
        "var/run",
        "var/www",
        "home",
        "home/default-user",
    ] {
        d.dirs.push(dir.into());
    }
    Ok(d)
}

fn with_user(mut d: ImageDef, user: &str) -> ImageDef {
    d.config["User"] = user.into();
    d
}

fn with_marker(mut d: ImageDef, marker: &str) -> ImageDef {
    d.files
        .push(("marker".into(), marker.as_bytes().to_vec(), 0o644));
    d
}

/// A web server standing in for nginx and httpd: its process is named
/// `name` (critest runs `pidof nginx`), its command line reads like nginx's
/// master (critest greps /proc/1/cmdline for "master process"), it writes
/// /var/run/<name>.pid, prints "<name> started" and serves HTTP on `port`
/// through busybox httpd until SIGTERM.
const WEB_SERVER_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t child;
static void stop(int sig) { (void)sig; if (child > 0) kill(child, SIGTERM); _exit(0); }

int main(int argc, char **argv) {
    char title[128];
    snprintf(title, sizeof title, "%s: master process %s -g daemon off;", NAME, NAME);
    if (argc < 1 || strcmp(argv[0], title) != 0) {
        char *args[] = {title, NULL};
        execv("/proc/self/exe", args);
        return 127;
    }
    char pidfile[64];
    snprintf(pidfile, sizeof pidfile, "/var/run/%s.pid", NAME);
    FILE *f = fopen(pidfile, "w");
    if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
    mkdir("/var/www", 0755);
    mkdir("/var/www/html", 0755);
    f = fopen("/var/www/html/index.html", "w");
    if (f) { fprintf(f, "<html><body>%s</body></html>\n", NAME); fclose(f); }
    printf("%s started\n", NAME);
    fflush(stdout);
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    child = fork();
    if (child == 0) {
        execl("/bin/busybox", "httpd", "httpd", "-f", "-p", PORT, "-h", "/var/www/html", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0) {}
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
"#;

/// Prints the effective uid; installed setuid root (critest's NoNewPrivs
/// specs expect uid 0 without no_new_privs and the caller's uid with it).
const NONEWPRIVS_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", geteuid()); return 0; }
"#;

fn web_server(mut d: ImageDef, dir: &Path, name: &str, path: &str, port: u16) -> Result<ImageDef> {
    let bin = compile_c(
        dir,
        &format!("{name}-{port}"),
        WEB_SERVER_C,
        &[format!("-DNAME=\"{name}\""), format!("-DPORT=\"{port}\"")],
    )?;
    d.files.push((path.to_string(), bin, 0o755));
    d.config["Entrypoint"] = serde_json::json!([format!("/{path}")]);
    d.config["Cmd"] = serde_json::Value::Null;
    Ok(d)
}

/// Every image critest pulls, as (reference below the mirror, image).
/// `gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700...` is left
/// out: a fixed upstream digest no local build can reproduce.
pub fn stand_ins(env: &Env, cache: &Path) -> Result<Vec<(String, ImageDef)>> {
    let b = base(cache)?;
    let e2e = "e2e-test-images";
    let cri = "k8s-staging-cri-tools";
    let dir = &env.base;
    let mut nnp = b.clone();
    nnp.files.push((
        "usr/local/bin/nnp".into(),
        compile_c(dir, "nnp", NONEWPRIVS_C, &[])?,
        0o4755,
    ));
    nnp.config["Entrypoint"] = serde_json::json!(["/usr/local/bin/nnp"]);
    nnp.config["Cmd"] = serde_json::Value::Null;
    let nginx = "usr/sbin/nginx";
    let mut v = vec![
        (format!("{e2e}/busybox:1.29-2"), b.clone()),
        (
            format!("{e2e}/nginx:1.14-2"),
            web_server(b.clone(), dir, "nginx", nginx, 80)?,
        ),
        (
            format!("{e2e}/httpd:2.4.39-4"),
            web_server(
                b.clone(),
                dir,
                "httpd",
                "usr/local/bin/httpd-foreground",
                80,
            )?,
        ),
        (format!("{e2e}/nonewprivs:1.3"), nnp),
        (
            format!("{cri}/hostnet-nginx-amd64:latest"),
            web_server(b.clone(), dir, "nginx", nginx, 12003)?,
        ),
        ("pause:3.9".into(), with_marker(b.clone(), "pause")),
        (
            format!("{cri}/test-image-user-uid:latest"),
            with_user(b.clone(), "1002"),
        ),
        (
            format!("{cri}/test-image-user-username:latest"),
            with_user(b.clone(), "www-data"),
        ),
        (
            format!("{cri}/test-image-user-uid-group:latest"),
            with_user(b.clone(), "1003:users"),
        ),
        (
            format!("{cri}/test-image-user-username-group:latest"),
            with_user(b.clone(), "www-data:users"),
        ),
        (
            format!("{cri}/test-image-predefined-group:latest"),
            with_user(b.clone(), "1000"),
        ),
        (
            format!("{cri}/test-image-latest:latest"),
            with_marker(b.clone(), "latest"),
        ),
        (
            format!("{cri}/test-image-tag:test"),
            with_marker(b.clone(), "tag"),
        ),
        (
            format!("{cri}/test-image-tag:all"),
            with_marker(b.clone(), "all"),
        ),
    ];
    for i in 1..=3 {
        v.push((
            format!("{cri}/test-image-{i}:latest"),
            with_marker(b.clone(), &format!("image {i}")),
        ));
        v.push((
            format!("{cri}/test-image-tags:{i}"),
            with_marker(b.clone(), "tags"),
        ));
    }
    Ok(v)
}

/// The registries critest names, mirrored to the test registry.
pub const MIRRORED: [&str; 4] = ["registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io"];

/// Pushes the stand-ins and writes the mirrors into the environment's
/// hosts.toml directory.
pub fn prepare(env: &Env, cache: &Path) -> Result<()> {
    for host in MIRRORED {
        let dir = env.hosts_dir.join(host);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                env.registry
            ),
        )?;
    }
    for (name, def) in stand_ins(env, cache)? {
        build_and_push(&env.base, &def, &format!("{}/{name}", env.registry), None)
            .with_context(|| format!("stand-in {name}"))?;
    }
    Ok(())
}
