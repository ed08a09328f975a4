// NRI's api.proto compiled to prost messages plus ttrpc client/server
// bindings (async), the transport NRI plugins speak.
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/nri.proto");
    ttrpc_codegen_prost::Codegen::new()
        .input("proto/nri.proto")
        .include("proto")
        .prost()
        .customize(ttrpc_codegen_prost::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
}
