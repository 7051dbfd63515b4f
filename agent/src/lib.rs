//! `lade-agent`: the per-node half of lade.
//!
//! A gRPC server ([`service`]) in front of the node's container runtime ([`runtime`]). It
//! receives content-addressed blobs, verifies them, stores them in the runtime's own store,
//! unpacks them and names images. It never pulls from anywhere and never runs containers.
//! [`server::run`] owns the accept loop and graceful shutdown; `main.rs` only wires config.

pub mod apply;
pub mod auth;
pub mod error;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod runtime;
pub mod server;
pub mod service;
pub mod storage;

pub use error::Error;
