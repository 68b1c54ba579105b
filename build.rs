fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // Named explicitly: the shim's rerun-if-changed below would otherwise leave a proto edit
    // unnoticed by incremental builds.
    println!("cargo:rerun-if-changed=proto");
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
    hnsw_shim();
    Ok(())
}

/// The C++ half of src/vector/faiss.rs's HNSW support (see src/vector/hnsw_shim.cpp), built
/// against the headers of the FAISS that faiss-sys built (`DEP_FAISS_C_ROOT`, set by its cmake
/// build with the `static` feature) or, when FAISS is a system library, the system's. Without
/// any headers (`cargo check` of the GPU code on a machine with no FAISS) it is skipped: a
/// check needs no object code, and a link would fail on the missing FAISS anyway.
fn hnsw_shim() {
    println!("cargo:rerun-if-changed=src/vector/hnsw_shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_FAISS_C_ROOT");
    let include = match std::env::var("DEP_FAISS_C_ROOT") {
        Ok(root) => std::path::Path::new(&root).join("include"),
        Err(_) => match ["/usr/local/include", "/usr/include"]
            .iter()
            .map(std::path::Path::new)
            .find(|p| p.join("faiss/IndexHNSW.h").exists())
        {
            Some(p) => p.to_path_buf(),
            None => {
                println!("cargo:warning=no FAISS headers found: the HNSW shim is not built (linking will fail)");
                return;
            }
        },
    };
    let mut build = cc::Build::new();
    build.cpp(true).std("c++17").file("src/vector/hnsw_shim.cpp").warnings(true);
    // A system include: FAISS's own headers are not ours to warn about.
    build.flag("-isystem").flag(include.to_string_lossy().as_ref());
    build.compile("engram_hnsw_shim");
}
