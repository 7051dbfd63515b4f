fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Chunks are handed between network and runtime without copies.
        .bytes(".lade.agent.v1.PutBlobRequest.chunk")
        .compile_protos(&["proto/lade/agent/v1/agent.proto"], &["proto"])?;
    Ok(())
}
