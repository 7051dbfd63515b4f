fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("agent_descriptor.bin");
    tonic_prost_build::configure()
        // The encoded descriptor lets tests enumerate every RPC of the service.
        .file_descriptor_set_path(descriptors)
        // Chunks are handed between network and runtime without copies.
        .bytes(".lade.agent.v1.PutBlobRequest.chunk")
        .bytes(".lade.agent.v1.ReadBlobChunk.data")
        .compile_protos(&["proto/lade/agent/v1/agent.proto"], &["proto"])?;
    // The CRI calls lade makes on containerd's CRI plugin: a client only, lade serves no CRI.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
