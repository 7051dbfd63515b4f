//! Generates the client of CRI's RuntimeService.Status (`proto/cri_runtime.proto`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri_runtime.proto"], &["proto"])?;
    Ok(())
}
