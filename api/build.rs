// Upstream's api.proto uses the `debug_redact` field option, which Debian's
// protoc 3.21 rejects; protox (pure Rust) compiles it unmodified.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/api.proto", "proto/attestation.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
