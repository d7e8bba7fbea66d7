//! Compiles `proto/` with protox (pure Rust), so no `protoc` install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/pitboss/v1/bridge.proto",
        "proto/pitboss/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("pitboss_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Payloads as `Bytes`: handed to the pool without a copy.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
