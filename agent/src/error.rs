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
    #[error("blob digest \"{digest}\" is not sha256: and 64 lowercase hex digits")]
    InvalidDigest { digest: String },
    #[error("this agent already takes {limit} uploads at a time; retry later")]
    TooManyUploads { limit: usize },
    #[error("this agent already serves {limit} blob reads to peers at a time; retry later")]
    TooManyReads { limit: usize },
    #[error("upload of {digest} sent nothing for {timeout:?}; dropped")]
    Stalled {
        digest: String,
        timeout: std::time::Duration,
    },
    #[error("relay target {address} refused: {reason}")]
    RelayTargetRefused { address: String, reason: String },
    #[error("invalid request: relay tree has more than {limit} {what}")]
    RelayTreeTooLarge { what: &'static str, limit: usize },
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
    #[error("blob {digest} is not stored on this node")]
    NotHeld { digest: String },
    #[error("image {image}: blob {digest} is not on this node; upload it first")]
    MissingBlob { image: String, digest: String },
    #[error(
        "image {image}: Docker holds layer {digest} only on another base, so it was not sent; \
         load again: the node now asks for it"
    )]
    LayerOnOtherBase { image: String, digest: String },
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
    #[error("image {image}: layer {layer} cannot be unpacked: {source}")]
    BadLayer {
        image: String,
        layer: String,
        #[source]
        source: crate::runtime::containerd::apply::ApplyError,
    },
    #[error("upload of {digest} was cancelled by the sender")]
    Cancelled { digest: String },
    #[error("node {node}: dockerd call {op} failed: {source}")]
    Docker {
        node: String,
        op: String,
        #[source]
        source: Box<bollard::errors::Error>,
    },
    #[error("image {image} on node {node}: dockerd refused {op}: {source}")]
    DockerImage {
        image: String,
        node: String,
        op: String,
        #[source]
        source: Box<bollard::errors::Error>,
    },
    #[error(
        "image {image}: name {name} already points at {existing} on this node, not at {wanted}; nothing was renamed (lade load --allow-overwrite moves it)"
    )]
    NameTaken {
        image: String,
        name: String,
        existing: String,
        wanted: String,
    },
    #[error(
        "image {image}: name {name} is the CRI pod sandbox image and points at {existing} on this node, not at {wanted}; lade never moves it (not even with --allow-overwrite)"
    )]
    SandboxImage {
        image: String,
        name: String,
        existing: String,
        wanted: String,
    },
    #[error(
        "image {image} on node {node}: dockerd loaded image {actual}, but the config digest is {expected}"
    )]
    LoadedOtherImage {
        image: String,
        node: String,
        expected: String,
        actual: String,
    },
    #[error("blob cache {path}: {op} failed: {source}")]
    Cache {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd's blob file {path}: {source}")]
    StoredBlob {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hold record {record}: {reason}")]
    BadHoldRecord { record: String, reason: String },
    #[error("no container runtime answers: containerd at {containerd}: {containerd_error}; docker at {docker}: {docker_error}")]
    NoRuntime {
        containerd: String,
        containerd_error: String,
        docker: String,
        docker_error: String,
    },
}

impl Error {
    /// Wraps a blob cache file operation's failure, naming the file.
    pub fn cache(path: &std::path::Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.display().to_string();
        move |source| Error::Cache { path, op, source }
    }

    /// Wraps a runtime call's status, naming the call.
    pub fn runtime(runtime: &'static str, op: impl Into<String>) -> impl FnOnce(Status) -> Error {
        let op = op.into();
        move |status| Error::Runtime {
            runtime,
            op,
            status,
        }
    }

    /// Whether the blob itself is at fault, whatever image uses it: it does not decompress,
    /// expands past its limit, exceeds one of the applier's bounds or has an entry escaping its
    /// snapshot.
    pub fn blob_is_bad(&self) -> bool {
        matches!(
            self,
            Error::BadLayer {
                source: crate::runtime::containerd::apply::ApplyError::Escape { .. }
                    | crate::runtime::containerd::apply::ApplyError::TooLarge { .. }
                    | crate::runtime::containerd::apply::ApplyError::Limit { .. }
                    | crate::runtime::containerd::apply::ApplyError::Stream(_),
                ..
            }
        )
    }
}

impl From<lade_oci::Error> for Error {
    fn from(e: lade_oci::Error) -> Error {
        match e {
            lade_oci::Error::BadManifest { digest, reason } => {
                Error::BadManifest { digest, reason }
            }
            lade_oci::Error::BadConfig { digest, reason } => Error::BadConfig { digest, reason },
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
            Error::NotHeld { .. } => Code::NotFound,
            Error::InvalidRequest(_)
            | Error::InvalidDigest { .. }
            | Error::RelayTargetRefused { .. }
            | Error::RelayTreeTooLarge { .. }
            | Error::BadManifest { .. }
            | Error::BadConfig { .. } => Code::InvalidArgument,
            Error::SizeMismatch { .. }
            | Error::DigestMismatch { .. }
            | Error::DiffIdMismatch { .. } => Code::DataLoss,
            Error::ResumeOffset { .. }
            | Error::MissingBlob { .. }
            | Error::LayerOnOtherBase { .. }
            | Error::NameTaken { .. }
            | Error::SandboxImage { .. } => Code::FailedPrecondition,
            Error::BadLayer { source, .. } => match source {
                crate::runtime::containerd::apply::ApplyError::Entry { source, .. } => {
                    match source.kind() {
                        std::io::ErrorKind::StorageFull => Code::ResourceExhausted,
                        _ => Code::Internal,
                    }
                }
                _ => Code::DataLoss,
            },
            Error::Cancelled { .. } => Code::Cancelled,
            Error::TooManyUploads { .. } | Error::TooManyReads { .. } => Code::ResourceExhausted,
            Error::Stalled { .. } => Code::DeadlineExceeded,
            Error::Docker { source, .. } | Error::DockerImage { source, .. } => docker_code(source),
            Error::LoadedOtherImage { .. }
            | Error::BadHoldRecord { .. }
            | Error::StoredBlob { .. } => Code::Internal,
            Error::Cache { source, .. } => match source.kind() {
                std::io::ErrorKind::StorageFull => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            Error::NoRuntime { .. } => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// The gRPC code for a failed dockerd call: what the caller can act on, as for containerd.
fn docker_code(e: &bollard::errors::Error) -> Code {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { status_code, .. } => match status_code {
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            400 => Code::InvalidArgument,
            _ => Code::Internal,
        },
        E::RequestTimeoutError => Code::DeadlineExceeded,
        // The daemon is down or went away mid-call.
        E::SocketNotFoundError(_)
        | E::IOError { .. }
        | E::HyperResponseError { .. }
        | E::HyperLegacyError { .. } => Code::Unavailable,
        _ => Code::Internal,
    }
}
