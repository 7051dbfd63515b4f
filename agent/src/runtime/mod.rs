//! The seam between the gRPC service and a node's container runtime.
//!
//! [`Runtime`] is what every runtime implementation offers: the service only calls this
//! trait, so the wire protocol and the runtime API never meet. The containerd
//! implementation lives in [`containerd`].

use std::future::Future;

use bytes::Bytes;
use futures::stream::BoxStream;
use lade_proto::{
    BlobHeader, BlobState, Descriptor, ImageRecord, ImageSpec, ImportEvent, InfoResponse,
    PutBlobResponse, RefStatus,
};
use tokio::sync::mpsc;

use crate::error::Error;

pub mod containerd;

/// A node's container runtime, as the agent uses it. All methods are idempotent.
pub trait Runtime: Send + Sync + 'static {
    /// Node and runtime identity.
    fn info(&self) -> impl Future<Output = Result<InfoResponse, Error>> + Send;

    /// Whether the runtime answers; the readiness probe.
    fn ready(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// For each blob: present, or how many bytes of an interrupted upload are held. Present
    /// blobs are held for `session` until it imports them.
    fn have(
        &self,
        session: &str,
        blobs: &[Descriptor],
    ) -> impl Future<Output = Result<Vec<BlobState>, Error>> + Send;

    /// Stores one blob from `chunks` (starting at `header.offset`); it counts only once its
    /// size and digest are verified.
    fn put_blob(
        &self,
        header: BlobHeader,
        chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> impl Future<Output = Result<PutBlobResponse, Error>> + Send;

    /// Unpacks and names `images`, reporting progress on `events`. An image whose import
    /// fails gets no new name; the others go on.
    fn import(
        &self,
        session: &str,
        images: Vec<ImageSpec>,
        events: mpsc::Sender<ImportEvent>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// What kubelet would find for each reference.
    fn verify(&self, refs: &[String])
        -> impl Future<Output = Result<Vec<RefStatus>, Error>> + Send;

    /// Every image record in the agent's namespace.
    fn list(&self) -> impl Future<Output = Result<Vec<ImageRecord>, Error>> + Send;
}

/// The node's platform in OCI terms (`linux/amd64`), from the architecture this agent was built for.
pub fn node_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// Session ids become part of lease names; keep them to a safe alphabet.
pub fn validate_session(session: &str) -> Result<(), Error> {
    let ok = !session.is_empty()
        && session.len() <= 64
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "session id {session:?} must be 1-64 characters of [A-Za-z0-9._-]"
        )))
    }
}
