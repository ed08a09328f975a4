//! Builds the pause program (pause/pause.rs) as a static executable and puts
//! it in OUT_DIR, from where `image::builtin` embeds it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    println!("cargo:rerun-if-changed=pause/pause.rs");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=pause",
            "--target",
            &target,
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(out.join("pause"))
        .arg("pause/pause.rs")
        .status()
        .expect("running rustc for pause");
    assert!(status.success(), "building pause failed");
}
