//! Generates the CRI ImageService client used by `src/cri.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // Client only: tests talk to containerd's CRI plugin, they never serve CRI themselves.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri_image.proto"], &["proto"])?;
    Ok(())
}
