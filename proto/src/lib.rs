//! The gRPC contract between the `lade` coordinator and `lade-agent` (package `lade.agent.v1`).
//!
//! This crate owns the generated tonic/prost code and the few helpers both halves need around
//! it (dialing an agent, relay hop arithmetic, the wording of transport errors); the other
//! crates use the re-exports below and never name prost internals. The `.proto` file documents the semantics.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("lade.agent.v1");
}

pub use generated::*;

/// The subset of the Kubernetes CRI API (`runtime.v1`) lade calls on containerd's CRI plugin:
/// RuntimeService.Status and ImageService.ImageFsInfo (the agent), ImageService.ListImages and
/// ImageStatus (the tests). Clients only; `proto/cri/runtime/v1/api.proto` says why each.
#[allow(clippy::all, missing_docs)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

mod client;
pub use client::{AgentConn, BearerAuth, ClientConfig, DialError, InvalidToken, KeepAlive};

/// Client stub for the agent service.
pub use generated::agent_client::AgentClient;
/// Server trait and wrapper for the agent service.
pub use generated::agent_server::{Agent, AgentServer};

/// The encoded `FileDescriptorSet` of `agent.proto` (every service and method it defines).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agent_descriptor.bin"));

/// An error and its sources as one line, skipping a source whose text its parent already
/// says (transport errors repeat themselves).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Size of the data chunks PutBlob streams carry.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Size of the chunks an agent reads from its store for a peer's `ReadBlob`. Every chunk is
/// held about three times on its way out (the serving queue, tonic's encoding buffer, h2's
/// send buffer) for each of the peers a node serves at once, so a node that serves peers
/// would hold some 16 MiB more than one that only loads with 1 MiB chunks; a quarter of that
/// keeps its peak memory within a few MiB of a node's that serves nobody.
pub const SERVE_CHUNK_SIZE: usize = 256 << 10;

/// The largest HTTP/2 frame agents and their clients accept (HTTP/2's default is 16 KiB): a
/// chunk crosses in four DATA frames instead of 64, which cut the agent's CPU per load by a
/// sixth (`scripts/bench-docker`). h2 holds a whole frame before passing it on, so larger
/// frames cost memory per connection (1 MiB raised the agent's peak RSS by 8 MiB).
pub const MAX_FRAME_SIZE: u32 = 256 << 10;

impl RelayHop {
    /// First byte anyone in this hop's subtree still needs: where the stream to this hop
    /// must start. `None` when nobody below (this hop included) stores the blob.
    pub fn stream_start(&self) -> Option<u64> {
        let own = self.store.then_some(self.offset);
        self.forward
            .iter()
            .filter_map(RelayHop::stream_start)
            .chain(own)
            .min()
    }

    /// Every agent address of this hop's subtree, this hop first.
    pub fn addresses(&self) -> Vec<String> {
        let mut out = vec![self.address.clone()];
        for child in &self.forward {
            out.extend(child.addresses());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::RelayHop;

    fn hop(address: &str, store: bool, offset: u64, forward: Vec<RelayHop>) -> RelayHop {
        RelayHop {
            address: address.into(),
            store,
            offset,
            forward,
        }
    }

    #[test]
    fn stream_starts_at_the_earliest_byte_the_subtree_needs() {
        let leaf = hop("c", true, 300, vec![]);
        assert_eq!(leaf.stream_start(), Some(300));
        let passing = hop("b", false, 0, vec![leaf.clone()]);
        assert_eq!(passing.stream_start(), Some(300));
        let root = hop(
            "a",
            true,
            500,
            vec![passing.clone(), hop("d", true, 0, vec![])],
        );
        assert_eq!(root.stream_start(), Some(0));
        assert_eq!(hop("e", false, 0, vec![]).stream_start(), None);
        assert_eq!(root.addresses(), ["a", "b", "c", "d"]);
    }
}
