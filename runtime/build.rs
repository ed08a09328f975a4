//! Builds imacri's two in-container programs as static executables and puts
//! them in OUT_DIR, from where they are embedded: the pause program
//! (pause/pause.rs, `image::builtin`) and the init of fanotify-measured ima
//! containers (init/init.rs, `integrity::init`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    build_static(
        "pause",
        "pause/pause.rs",
        &["-C", "target-feature=+crt-static"],
    );
    // Freestanding (no libc, its own _start): see init/init.rs.
    build_static(
        "imacri-init",
        "init/init.rs",
        &[
            "-C",
            "relocation-model=static",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-no-pie",
        ],
    );
}

fn build_static(name: &str, src: &str, extra: &[&str]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    println!("cargo:rerun-if-changed={src}");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            &format!("--crate-name={}", name.replace('-', "_")),
            "--target",
            &target,
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(extra)
        .arg("-o")
        .arg(out.join(name))
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {name}: {e}"));
    assert!(status.success(), "building {name} failed");
}
