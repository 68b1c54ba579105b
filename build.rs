fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("engram_descriptor.bin")).compile_protos(
        &[
            "proto/engram/v1/types.proto",
            "proto/engram/v1/memory.proto",
            "proto/engram/v1/admin.proto",
            "proto/engram/v1/auth.proto",
            "proto/engram/v1/raft.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
