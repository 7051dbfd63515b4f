//! The agent's error type, and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in the agent, carrying the blob, image or runtime call at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{runtime} call {op} failed: {status}")]
    Runtime {
        runtime: &'static str,
        op: String,
        status: Status,
    },
    #[error("cannot connect to {runtime} at {socket}: {reason}")]
    Connect {
        runtime: &'static str,
        socket: String,
        reason: String,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("blob {digest}: received {received} bytes, descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        received: u64,
    },
    #[error("blob {digest}: content does not match its digest ({detail})")]
    DigestMismatch { digest: String, detail: String },
    #[error("blob {digest}: resume offset {requested} but the node holds {held} bytes of it")]
    ResumeOffset {
        digest: String,
        requested: u64,
        held: u64,
    },
    #[error("image {image}: blob {digest} is not on this node; upload it first")]
    MissingBlob { image: String, digest: String },
    #[error("manifest {digest}: {reason}")]
    BadManifest { digest: String, reason: String },
    #[error("config {digest}: {reason}")]
    BadConfig { digest: String, reason: String },
    #[error(
        "image {image}: layer {layer} unpacked to {actual}, but the config says its diffID is {expected}"
    )]
    DiffIdMismatch {
        image: String,
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("upload of {digest} was cancelled by the sender")]
    Cancelled { digest: String },
}

impl Error {
    /// Wraps a runtime call's status, naming the call.
    pub fn runtime(runtime: &'static str, op: impl Into<String>) -> impl FnOnce(Status) -> Error {
        let op = op.into();
        move |status| Error::Runtime {
            runtime,
            op,
            status,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::Runtime { status, .. } => match status.code() {
                // Keep codes the caller can act on; everything else is the node's fault.
                c @ (Code::NotFound
                | Code::AlreadyExists
                | Code::ResourceExhausted
                | Code::Unavailable
                | Code::DeadlineExceeded) => c,
                _ => Code::Internal,
            },
            Error::Connect { .. } => Code::Unavailable,
            Error::InvalidRequest(_) | Error::BadManifest { .. } | Error::BadConfig { .. } => {
                Code::InvalidArgument
            }
            Error::SizeMismatch { .. }
            | Error::DigestMismatch { .. }
            | Error::DiffIdMismatch { .. } => Code::DataLoss,
            Error::ResumeOffset { .. } | Error::MissingBlob { .. } => Code::FailedPrecondition,
            Error::Cancelled { .. } => Code::Cancelled,
        };
        Status::new(code, e.to_string())
    }
}
