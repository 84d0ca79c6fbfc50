//! Compiles the kubelet API's proto files with protox (a protobuf compiler in Rust, so no
//! `protoc` is needed) and tonic-build (messages with prost, clients and servers).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/deviceplugin.proto", "proto/podresources.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
