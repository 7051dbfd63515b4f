//! `lade-agent`: the per-node half of lade.
//!
//! A gRPC server ([`service`]) in front of the node's container runtime ([`runtime`]). It
//! receives content-addressed blobs, verifies them, stores them in the runtime's own store,
//! unpacks them and names images. It takes blobs only from the coordinator and, when the
//! coordinator says so, from peer agents ([`fetch`]); it never pulls from a registry and never
//! runs containers.
//! [`server::run`] owns the accept loop and graceful shutdown; `main.rs` only wires config.

pub mod auth;
pub mod error;
pub mod fetch;
pub mod holds;
pub mod http;
pub mod keep;
pub mod metrics;
pub mod relay;
pub mod runtime;
pub mod server;
pub mod service;
pub mod storage;

pub use error::Error;
/// The agent's own layer applier, which the containerd runtime uses; here too at its old
/// path, which the fuzz target, the tar-bomb example and the applier tests name.
pub use runtime::containerd::apply;
