//! The gRPC contract between the `lade` coordinator and `lade-agent` (package `lade.agent.v1`).
//!
//! This crate owns the generated tonic/prost code and nothing else; the other crates use the
//! re-exports below and never name prost internals. The `.proto` file documents the semantics.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("lade.agent.v1");
}

pub use generated::*;

/// Client stub for the agent service.
pub use generated::agent_client::AgentClient;
/// Server trait and wrapper for the agent service.
pub use generated::agent_server::{Agent, AgentServer};

/// Size of the data chunks PutBlob streams carry.
pub const CHUNK_SIZE: usize = 1 << 20;
