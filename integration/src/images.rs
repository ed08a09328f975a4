//! Test images built from busybox-static: an OCI layout written here, pushed
//! to the test registry with skopeo.

use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

#[derive(Clone, Default)]
pub struct ImageDef {
    pub config: serde_json::Value,
    /// (path, content, mode incl. setuid bits); owned by root.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Symlinks (path, target).
    pub links: Vec<(String, String)>,
    /// Hard links (path, path of a file above).
    pub hardlinks: Vec<(String, String)>,
    pub dirs: Vec<String>,
}

const APPLETS: [&str; 35] = [
    "sh",
    "echo",
    "cat",
    "sleep",
    "ls",
    "id",
    "printf",
    "head",
    "true",
    "false",
    "env",
    "wc",
    "cp",
    "chmod",
    "grep",
    "seq",
    "kill",
    "ps",
    "hostname",
    "mkdir",
    "touch",
    "stat",
    "readlink",
    "pwd",
    "yes",
    "dd",
    "mount",
    "sha256sum",
    "ping",
    "ip",
    "httpd",
    "wget",
    "nc",
    "tr",
    "unshare",
];

fn base() -> ImageDef {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static (apt-get install busybox-static)");
    ImageDef {
        config: serde_json::json!({}),
        files: vec![
            ("bin/busybox".into(), busybox, 0o755),
            (
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n".to_vec(),
                0o644,
            ),
            ("etc/group".into(), b"root:x:0:\nalice:x:1000:\nwheel:x:10:alice\nnogroup:x:65534:\n".to_vec(), 0o644),
        ],
        links: APPLETS.iter().map(|a| (format!("bin/{a}"), "busybox".to_string())).collect(),
        hardlinks: vec![],
        dirs: vec!["tmp".into(), "root".into(), "home/alice".into(), "proc".into(), "sys".into(), "dev".into(), "etc".into()],
    }
}

pub fn busybox() -> ImageDef {
    let mut d = base();
    d.config = serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]});
    d
}

/// busybox plus `files` files of pseudo-random (incompressible) data,
/// `total` bytes in all: for pod-start cost against image size.
pub fn big(total: usize, files: usize) -> ImageDef {
    let mut d = busybox();
    let each = total / files.max(1);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..files {
        let mut data = vec![0u8; each];
        for chunk in data.chunks_mut(8) {
            // xorshift64: cheap, and gzip cannot shrink it.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        d.files.push((format!("data/{}/f{i}", i % 64), data, 0o644));
    }
    d.dirs.push("data".into());
    d.dirs
        .extend((0..64.min(files)).map(|n| format!("data/{n}")));
    d
}

pub fn configured() -> ImageDef {
    let mut d = base();
    d.config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo from-image; id; pwd; echo $GREETING"],
        "Env": ["PATH=/bin", "GREETING=hello-image"],
        "User": "alice",
        "WorkingDir": "/home/alice",
        "StopSignal": "SIGQUIT"
    });
    d
}

fn layer(def: &ImageDef) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs: Vec<&String> = def.dirs.iter().collect();
    dirs.sort();
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if d == "tmp" { 0o1777 } else { 0o755 });
        h.set_uid(if d == "home/alice" { 1000 } else { 0 });
        h.set_gid(if d == "home/alice" { 1000 } else { 0 });
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    for (path, data, mode) in &def.files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, data.as_slice())?;
    }
    for (path, target) in &def.links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_link(&mut h, path, target)?;
    }
    for (path, target) in &def.hardlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        tar.append_link(&mut h, path, target)?;
    }
    Ok(tar.into_inner()?)
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let d = sha(data);
    let hex = d.trim_start_matches("sha256:");
    std::fs::write(layout.join("blobs/sha256").join(hex), data)?;
    Ok(d)
}

/// Writes the image as an OCI layout and pushes it to `dest` (plain HTTP).
pub fn build_and_push(
    base: &Path,
    def: &ImageDef,
    dest: &str,
    creds: Option<(&str, &str)>,
) -> Result<()> {
    let layout = tempfile::tempdir_in(base)?;
    let lp = layout.path();
    std::fs::create_dir_all(lp.join("blobs/sha256"))?;
    std::fs::write(lp.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let tar = layer(def)?;
    let diff_id = sha(&tar);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar)?;
    let gz = gz.finish()?;
    let layer_digest = put_blob(lp, &gz)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": def.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "imacri integration harness"}]
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = put_blob(lp, &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": gz.len()}]
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = put_blob(lp, &manifest)?;
    // Pushed as an image index, so pulls exercise platform resolution.
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"}
        }]
    });
    let nested = serde_json::to_vec(&nested)?;
    let nested_digest = put_blob(lp, &nested)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": nested_digest, "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"}
        }]
    });
    std::fs::write(lp.join("index.json"), serde_json::to_vec(&index)?)?;
    // One push at a time: the registry fails concurrent pushes of one
    // repository ("manifest blob unknown") when tests push the same image.
    static PUSHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = PUSHES.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
    if let Some((u, p)) = creds {
        cmd.arg(format!("--dest-creds={u}:{p}"));
    }
    let out = cmd
        .arg(format!("oci:{}:latest", lp.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .context("running skopeo (apt-get install skopeo)")?;
    if !out.status.success() {
        bail!(
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Compiles a static C program into `dir` and returns the binary (gcc and
/// libc6-dev come from install-deps).
pub fn compile_c(dir: &Path, name: &str, source: &str, defines: &[String]) -> Result<Vec<u8>> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source)?;
    let bin = dir.join(name);
    let out = Command::new("cc")
        .args(["-static", "-O2"])
        .args(defines)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .context("cc (apt-get install gcc libc6-dev)")?;
    if !out.status.success() {
        bail!("compiling {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read(bin)?)
}

/// busybox with one static C program of a test's at `bin/<name>`, pushed
/// as `<registry>/test/<name>:1`; returns the image name.
pub fn busybox_with_c(base: &Path, registry: &str, name: &str, source: &str) -> Result<String> {
    let mut def = busybox();
    def.files.push((
        format!("bin/{name}"),
        compile_c(base, name, source, &[])?,
        0o755,
    ));
    let image = format!("{registry}/test/{name}:1");
    build_and_push(base, &def, &image, None)?;
    Ok(image)
}
