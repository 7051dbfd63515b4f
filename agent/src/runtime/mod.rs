//! The seam between the gRPC service and a node's container runtime.
//!
//! [`Runtime`] is what every runtime implementation offers: the service only calls this
//! trait, so the wire protocol and the runtime API never meet. The implementations live in
//! the submodules; what they all need (image spec checks, the per-image outcome event, the node's
//! platform, full image names) lives here once. Requests reach a runtime checked: the
//! service has refused bad session ids and digests before it calls one. Which one serves is the binary's
//! choice, not this module's.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use lade_proto::{
    BlobHeader, BlobState, Descriptor, Held, ImageRecord, ImageSpec, ImportEvent, ImportPhase,
    InfoResponse, PutBlobResponse, RefStatus, UnpackHint,
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::error::Error;
use lade_oci as oci;

pub mod containerd;
pub mod docker;
pub mod memory;

/// A node's container runtime, as the agent uses it. All methods are idempotent. Their
/// arguments come checked by the service: every session id is 1-64 characters of
/// `[A-Za-z0-9._-]`, every blob digest `sha256:<hex>`, and a PutBlob header has a descriptor.
pub trait Runtime: Send + Sync + 'static {
    /// `containerd` or `docker`, as Info reports it.
    const NAME: &'static str;

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

    /// Releases what `session` held: every image it loaded is named now.
    fn end_session(&self, session: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// What kubelet would find for each reference.
    fn verify(&self, refs: &[String])
        -> impl Future<Output = Result<Vec<RefStatus>, Error>> + Send;

    /// Every image record in the agent's namespace.
    fn list(&self) -> impl Future<Output = Result<Vec<ImageRecord>, Error>> + Send;

    /// The bytes of a blob the node holds, verified and committed, from `offset`: what a peer
    /// fetching it reads. [`Error::NotHeld`] when the node does not hold the bytes.
    fn read_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<Bytes, Error>>, Error>> + Send;

    /// Records `held` (see the Hold RPC) in the runtime itself, so that it outlives the agent:
    /// replaces a record of the same bundle and version, and holds the version's blobs (and,
    /// where the runtime unpacks, its layers' snapshots) against the runtime's garbage
    /// collection until [`Runtime::drop_hold`].
    fn hold(&self, held: Held) -> impl Future<Output = Result<(), Error>> + Send;

    /// Every record [`Runtime::hold`] made on this node and no [`Runtime::drop_hold`] ended,
    /// in no particular order.
    fn holds(&self) -> impl Future<Output = Result<Vec<Held>, Error>> + Send;

    /// Drops the record of `bundle` `version` and its hold on content. Content that no name
    /// and no other hold references is collected before this returns, where the runtime
    /// collects on request (containerd); otherwise when the runtime next collects.
    fn drop_hold(
        &self,
        bundle: &str,
        version: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Which of `blobs` the node has committed, in order. Unlike Have it holds nothing.
    fn present(
        &self,
        blobs: &[Descriptor],
    ) -> impl Future<Output = Result<Vec<bool>, Error>> + Send;

    /// The containers, running or stopped, that use an image `names` point at, by name;
    /// names no container uses are left out. Released versions keep these names.
    fn containers_using(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Vec<String>>, Error>> + Send;

    /// Removes these image names (absent ones are fine); their content is left to the
    /// runtime's garbage collection and to the holds that keep it.
    fn remove_names(&self, names: &[String]) -> impl Future<Output = Result<(), Error>> + Send;

    /// Signals that what the runtime holds may have changed under the agent: the runtime came
    /// back after it went away (a restart may have lost what was not committed, and a pass
    /// of the keep-present loop should look at once), or an image name was removed. The
    /// stream reconnects by itself and never ends while the runtime can be watched. Default:
    /// no signal ever (the loop then relies on its interval).
    fn changes(&self) -> BoxStream<'static, Change> {
        futures::stream::pending().boxed()
    }

    /// Unpacks a layer blob just stored, ahead of the Import that will need it, when its
    /// parent is unpacked; returns whether it did. Best effort: any failure is left for
    /// Import to meet and report. Runtimes that load whole images (Docker) do nothing.
    fn unpack_ahead(
        self: Arc<Self>,
        session: String,
        layer: Descriptor,
        hint: UnpackHint,
    ) -> impl Future<Output = bool> + Send {
        let _ = (session, layer, hint);
        async { false }
    }
}

/// What [`Runtime::changes`] signals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The runtime answers again after it went away (restarted, or the agent reconnected).
    Restarted,
    /// This image name was removed (normalised, as the runtime names it).
    ImageRemoved(String),
    /// Content was removed from the runtime's store.
    ContentRemoved,
}

/// One holder per key at a time: one writer per blob (two uploads of one blob would
/// interleave in one ingest; the second waits, then finds the blob stored), one unpack per
/// chain. The map holds only keys in use.
#[derive(Default)]
pub(crate) struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    /// Runs `work` as the only holder of `key`, after whoever holds it now.
    pub(crate) async fn exclusive<T>(&self, key: &str, work: impl Future<Output = T>) -> T {
        let lock = self
            .0
            .lock()
            .expect("lock map lock")
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let result = work.await;
        drop(guard);
        let mut locks = self.0.lock().expect("lock map lock");
        // Forget the lock unless another holder waits on it (two references: the map's and
        // this one).
        if Arc::strong_count(&lock) == 2 {
            locks.remove(key);
        }
        result
    }
}

/// The next `left` bytes of a blob file as a peer reads them (`Runtime::read_blob`): one
/// chunk of [`lade_proto::SERVE_CHUNK_SIZE`] per poll, read on a blocking thread only when
/// the stream is polled, into memory that is not zeroed first. A file that ends early is an
/// error, made by `fail` like any failed read.
pub(crate) fn file_chunks<F>(
    file: std::fs::File,
    left: u64,
    fail: F,
) -> BoxStream<'static, Result<Bytes, Error>>
where
    F: Fn(std::io::Error) -> Error + Clone + Send + Sync + 'static,
{
    futures::stream::try_unfold((file, left), move |(file, left)| {
        let fail = fail.clone();
        async move {
            if left == 0 {
                return Ok(None);
            }
            let want = left.min(lade_proto::SERVE_CHUNK_SIZE as u64);
            let (file, chunk) = tokio::task::spawn_blocking(move || {
                let mut chunk = Vec::with_capacity(want as usize);
                // `take` + `read_to_end` fill the spare capacity without zeroing it.
                let got =
                    std::io::Read::read_to_end(&mut std::io::Read::take(&file, want), &mut chunk);
                (file, got.map(|_| chunk))
            })
            .await
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
            let chunk = chunk.map_err(fail.clone())?;
            if chunk.len() as u64 != want {
                return Err(fail(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ended before the blob's size",
                )));
            }
            Ok(Some((Bytes::from(chunk), (file, left - want))))
        }
    })
    .boxed()
}

/// A PutBlob body of `parts`, for the stores' unit tests.
#[cfg(test)]
pub(crate) fn test_chunks(parts: &[&[u8]]) -> BoxStream<'static, Result<Bytes, Error>> {
    let parts: Vec<Result<Bytes, Error>> = parts
        .iter()
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    futures::stream::iter(parts).boxed()
}

/// For each of `names`, the containers whose image is that name or another name of the same
/// target. `targets` maps image names to their target digests; `containers` are (image,
/// user-facing name) pairs.
pub(crate) fn users_of(
    names: &[String],
    targets: &HashMap<String, String>,
    containers: &[(String, String)],
) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for name in names {
        let target = targets.get(name);
        let mut users: Vec<String> = containers
            .iter()
            .filter(|(image, _)| {
                image == name || (target.is_some() && targets.get(image) == target)
            })
            .map(|(_, who)| who.clone())
            .collect();
        users.sort();
        users.dedup();
        if !users.is_empty() {
            out.insert(name.clone(), users);
        }
    }
    out
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

/// The manifest descriptor of an import request's image, checked: present, a valid digest, and
/// at least one name to give the image (a nameless image would only be garbage).
pub fn manifest_descriptor(spec: &ImageSpec) -> Result<oci::Descriptor, Error> {
    let image = spec.source.as_str();
    let mdesc = spec
        .manifest
        .as_ref()
        .ok_or_else(|| Error::InvalidRequest(format!("image {image}: no manifest descriptor")))?;
    oci::validate_digest(&mdesc.digest).map_err(|r| Error::BadManifest {
        digest: mdesc.digest.clone(),
        reason: r.to_string(),
    })?;
    if spec.names.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "image {image}: no names to create"
        )));
    }
    Ok(oci::Descriptor {
        media_type: mdesc.media_type.clone(),
        digest: mdesc.digest.clone(),
        size: mdesc.size,
    })
}

/// What one image's import named: `names`, all pointing at `digest` (see
/// `ImportEvent.digest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub names: Vec<String>,
    pub digest: String,
}

/// The final event of one image's import: done with its names, or failed with the reason.
pub fn finished_event(
    spec: &ImageSpec,
    started: std::time::Instant,
    outcome: Result<Named, Error>,
) -> ImportEvent {
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(Named { names, digest }) => ImportEvent {
            image: spec.source.clone(),
            phase: ImportPhase::ImageDone as i32,
            names,
            digest,
            duration_ms: Some(duration_ms),
            ..Default::default()
        },
        Err(e) => {
            warn!(image = %spec.source, error = %e, "import failed");
            ImportEvent {
                image: spec.source.clone(),
                phase: ImportPhase::ImageFailed as i32,
                message: e.to_string(),
                duration_ms: Some(duration_ms),
                ..Default::default()
            }
        }
    }
}

/// The full name of a short image name (`busybox:latest` -> `docker.io/library/busybox:latest`),
/// the form containerd and the coordinator use: Docker shows tags short, and CRI's
/// configured sandbox image may be written short.
pub(crate) fn canonical_name(name: &str) -> String {
    let has_host = name.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    });
    if has_host {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    }
}
