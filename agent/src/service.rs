//! The `lade.agent.v1.Agent` gRPC service: decodes requests, checks what every runtime
//! relies on (session ids, digests, the PutBlob header), calls the [`Runtime`], encodes
//! answers, and counts what it saw in the [`Metrics`]. Owns no runtime logic; errors become
//! statuses through `From<Error> for Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, EndSessionRequest, EndSessionResponse,
    FetchProgress, FetchRequest, HaveRequest, HaveResponse, HoldRequest, HoldResponse,
    HoldsRequest, HoldsResponse, ImportEvent, ImportPhase, ImportRequest, InfoRequest,
    InfoResponse, KeepRequest, KeepResponse, ListRequest, ListResponse, PutBlobRequest,
    PutBlobResponse, ReadBlobChunk, ReadBlobRequest, ReleaseRequest, ReleaseResponse, UnpackHint,
    VerifyRequest, VerifyResponse,
};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::error::Error;
use crate::fetch::{self, Fetcher};
use crate::holds;
use crate::keep::{KeepConfig, Keeper};
use crate::metrics::Metrics;
use crate::relay::Peers;
use crate::runtime::Runtime;

/// Uploads (PutBlob calls) one agent takes at a time, over all connections; more are
/// refused with RESOURCE_EXHAUSTED. The coordinator sends a node a few at a time.
pub const MAX_UPLOADS: usize = 64;

/// Blob reads (ReadBlob calls) peers may have open on one agent at a time.
pub const MAX_SERVES: usize = 64;

/// How long an upload may go without a message before it is dropped, by default.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves one runtime over gRPC.
pub struct AgentService<R> {
    runtime: Arc<R>,
    metrics: Metrics,
    peers: Arc<Peers>,
    uploads: Arc<Semaphore>,
    serves: Arc<Semaphore>,
    stall_timeout: Duration,
    keep: KeepConfig,
    /// Made on first use, from the settings above.
    keeper: std::sync::OnceLock<Arc<Keeper<R>>>,
}

impl<R: Runtime> AgentService<R> {
    pub fn new(runtime: Arc<R>, metrics: Metrics) -> Self {
        Self {
            runtime,
            metrics,
            peers: Arc::new(Peers::default()),
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS)),
            serves: Arc::new(Semaphore::new(MAX_SERVES)),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            keep: KeepConfig::default(),
            keeper: std::sync::OnceLock::new(),
        }
    }

    /// Drops an upload that sends no message for `timeout`.
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self.keeper = std::sync::OnceLock::new();
        self
    }

    /// How this agent reaches the agents it relays blobs to (and fetches from).
    pub fn with_peers(mut self, peers: Peers) -> Self {
        self.peers = Arc::new(peers);
        self.keeper = std::sync::OnceLock::new();
        self
    }

    /// Where the keep-present pass finds peers besides each record's.
    pub fn with_keep(mut self, keep: KeepConfig) -> Self {
        self.keep = keep;
        self.keeper = std::sync::OnceLock::new();
        self
    }

    /// The keep-present passes' runner, which the Keep call and the loop share.
    pub fn keeper(&self) -> Arc<Keeper<R>> {
        self.keeper
            .get_or_init(|| {
                let fetcher = Fetcher {
                    runtime: self.runtime.clone(),
                    peers: self.peers.clone(),
                    metrics: self.metrics.clone(),
                    stall: self.stall_timeout,
                };
                Arc::new(Keeper::new(fetcher, self.keep.clone()))
            })
            .clone()
    }

    /// Counts a failed call, then hands its status on.
    fn fail(&self, e: impl Into<Status>) -> Status {
        let status = e.into();
        self.metrics.failed(&status);
        status
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ImportEvent, Status>> + Send>>;

/// Unpacks a layer just stored while the next blobs stream, timing it when it did.
fn unpack_ahead<R: Runtime>(
    runtime: Arc<R>,
    metrics: Metrics,
    session: String,
    blob: Descriptor,
    hint: UnpackHint,
) {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        if runtime.unpack_ahead(session, blob, hint).await {
            metrics
                .layer_unpack_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    });
}

/// Decrements the in-flight gauge however the upload ends.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl<R: Runtime> lade_proto::Agent for AgentService<R> {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let mut info = self.runtime.info().await.map_err(|e| self.fail(e))?;
        info.fetches_from_peers = true;
        Ok(Response::new(info))
    }

    #[instrument(skip_all, fields(session = %req.get_ref().session, blobs = req.get_ref().blobs.len()))]
    async fn have(&self, req: Request<HaveRequest>) -> Result<Response<HaveResponse>, Status> {
        let req = req.into_inner();
        validate_session(&req.session).map_err(|e| self.fail(e))?;
        for blob in &req.blobs {
            validate_digest(&blob.digest).map_err(|e| self.fail(e))?;
        }
        let blobs = self
            .runtime
            .have(&req.session, &req.blobs)
            .await
            .map_err(|e| self.fail(e))?;
        let present = blobs.iter().filter(|b| b.present).count();
        self.metrics.blobs_present.inc_by(present as u64);
        Ok(Response::new(HaveResponse { blobs }))
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<PutBlobRequest>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        let _upload = self
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.fail(Error::TooManyUploads { limit: MAX_UPLOADS }))?;
        self.metrics.inflight_uploads.inc();
        let _inflight = InFlight(self.metrics.inflight_uploads.clone());
        let stall = self.stall_timeout;
        let mut stream = req.into_inner();
        let first = tokio::time::timeout(stall, stream.message())
            .await
            .map_err(|_| {
                self.fail(Error::Stalled {
                    digest: "(no header yet)".into(),
                    timeout: stall,
                })
            })?;
        let header = match first? {
            Some(PutBlobRequest {
                msg: Some(Msg::Header(h)),
            }) => h,
            _ => {
                return Err(self.fail(Error::InvalidRequest(
                    "PutBlob must start with a header".into(),
                )))
            }
        };
        // Stored here or only relayed, a blob is refused before any byte of it moves.
        check_header(&header).map_err(|e| self.fail(e))?;
        let digest = header
            .blob
            .as_ref()
            .map(|b| b.digest.clone())
            .unwrap_or_default();
        let received = self.metrics.received_bytes.clone();
        // Each message must come within the stall timeout; after one that does not, the
        // stream ends with the error (and the upload is dropped uncommitted).
        let timed = futures::stream::unfold(Some(stream), move |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout(stall, stream.next()).await {
                Ok(Some(m)) => Some((Some(m), Some(stream))),
                Ok(None) => None,
                Err(_) => Some((None, None)),
            }
        });
        let chunks = timed
            .map(move |m| match m {
                Some(Ok(PutBlobRequest {
                    msg: Some(Msg::Chunk(c)),
                })) => {
                    received.inc_by(c.len() as u64);
                    Ok(c)
                }
                Some(Ok(_)) => Err(Error::InvalidRequest(format!(
                    "blob {digest}: only data chunks may follow the header"
                ))),
                Some(Err(_)) => Err(Error::Cancelled {
                    digest: digest.clone(),
                }),
                None => Err(Error::Stalled {
                    digest: digest.clone(),
                    timeout: stall,
                }),
            })
            .boxed();
        let ahead = match (&header.unpack, &header.blob) {
            (Some(hint), Some(blob)) => Some((header.session.clone(), blob.clone(), hint.clone())),
            _ => None,
        };
        let relay = !header.forward.is_empty() || header.pass_through;
        let stores = !header.pass_through;
        let response = if relay {
            crate::relay::put_blob(
                self.runtime.clone(),
                self.peers.clone(),
                self.metrics.clone(),
                header,
                chunks,
            )
            .await
        } else {
            self.runtime.put_blob(header, chunks).await
        }
        .map_err(|e| self.fail(e))?;
        let ahead = ahead.filter(|_| stores && response.local_error.is_empty());
        if let Some((session, blob, hint)) = ahead {
            unpack_ahead(
                self.runtime.clone(),
                self.metrics.clone(),
                session,
                blob,
                hint,
            );
        }
        if relay {
            // The relay counted this node's own outcome.
            return Ok(Response::new(response));
        }
        if response.already_present {
            self.metrics.blobs_present.inc();
        } else {
            self.metrics.blobs_committed.inc();
        }
        Ok(Response::new(response))
    }

    type ImportStream = EventStream;

    #[instrument(skip_all, fields(session = %req.get_ref().session, images = req.get_ref().images.len()))]
    async fn import(
        &self,
        req: Request<ImportRequest>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        let req = req.into_inner();
        validate_session(&req.session).map_err(|e| self.fail(e))?;
        foreign_digest_name(&req.images).map_err(|e| self.fail(e))?;
        let (tx, rx) = mpsc::channel::<ImportEvent>(64);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let runtime = self.runtime.clone();
        // The import goes on even if the caller disconnects: stopping half-way would only
        // waste what was unpacked, and every step is idempotent.
        tokio::spawn(async move {
            let result = runtime.import(&req.session, req.images, tx).await;
            let _ = done_tx.send(result);
        });
        let metrics = self.metrics.clone();
        let events = ReceiverStream::new(rx).map(move |event| {
            observe(&metrics, &event);
            Ok(event)
        });
        let metrics = self.metrics.clone();
        let tail = futures::stream::once(async move {
            match done_rx.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => {
                    let status = Status::from(e);
                    metrics.failed(&status);
                    Some(Err(status))
                }
                Err(_) => Some(Err(Status::internal("import task ended without a result"))),
            }
        })
        .filter_map(|x| async move { x });
        Ok(Response::new(Box::pin(events.chain(tail))))
    }

    async fn end_session(
        &self,
        req: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        let session = req.into_inner().session;
        validate_session(&session).map_err(|e| self.fail(e))?;
        self.runtime
            .end_session(&session)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(EndSessionResponse {}))
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let refs = self
            .runtime
            .verify(&req.into_inner().refs)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(VerifyResponse { refs }))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let images = self.runtime.list().await.map_err(|e| self.fail(e))?;
        Ok(Response::new(ListResponse { images }))
    }

    type FetchStream = ReceiverStream<Result<FetchProgress, Status>>;

    #[instrument(skip_all, fields(source = %req.get_ref().source))]
    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = req.into_inner();
        validate_session(&req.session).map_err(|e| self.fail(e))?;
        let blob = req
            .blob
            .as_ref()
            .ok_or_else(|| self.fail(Error::InvalidRequest("Fetch has no descriptor".into())))?;
        validate_digest(&blob.digest).map_err(|e| self.fail(e))?;
        let ahead = req
            .unpack
            .clone()
            .map(|hint| (req.session.clone(), blob.clone(), hint));
        let upload = self
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.fail(Error::TooManyUploads { limit: MAX_UPLOADS }))?;
        let stall = match req.stall_seconds {
            0 => self.stall_timeout,
            s => Duration::from_secs(s.into()),
        };
        let fetcher = Fetcher {
            runtime: self.runtime.clone(),
            peers: self.peers.clone(),
            metrics: self.metrics.clone(),
            stall,
        };
        self.metrics.inflight_uploads.inc();
        let inflight = InFlight(self.metrics.inflight_uploads.clone());
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let (_upload, _inflight) = (upload, inflight);
            let outcome = tokio::select! {
                outcome = fetcher.run(req, &tx) => outcome,
                // The caller went away: stop reading; what arrived stays for a resume.
                () = tx.closed() => return,
            };
            let last = match outcome {
                Ok(progress) => {
                    if progress.done && !progress.already_present {
                        if let Some((session, blob, hint)) = ahead {
                            unpack_ahead(
                                fetcher.runtime.clone(),
                                fetcher.metrics.clone(),
                                session,
                                blob,
                                hint,
                            );
                        }
                    }
                    Ok(progress)
                }
                Err(e) => {
                    let status = Status::from(e);
                    fetcher.metrics.failed(&status);
                    Err(status)
                }
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReadBlobStream = ReceiverStream<Result<ReadBlobChunk, Status>>;

    async fn read_blob(
        &self,
        req: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let req = req.into_inner();
        validate_digest(&req.digest).map_err(|e| self.fail(e))?;
        let permit = self
            .serves
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.fail(Error::TooManyReads { limit: MAX_SERVES }))?;
        let rx = fetch::serve(
            &*self.runtime,
            &self.metrics,
            req,
            self.stall_timeout,
            permit,
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn hold(&self, req: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        let held = req
            .into_inner()
            .held
            .ok_or_else(|| self.fail(Error::InvalidRequest("hold: no record".into())))?;
        holds::validate(&held).map_err(|e| self.fail(e))?;
        self.runtime.hold(held).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(HoldResponse {}))
    }

    async fn holds(&self, _: Request<HoldsRequest>) -> Result<Response<HoldsResponse>, Status> {
        let versions = holds::versions(&*self.runtime)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(HoldsResponse { versions }))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let req = req.into_inner();
        let answer = self
            .keeper()
            .without_pass(holds::release(&*self.runtime, &req))
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(answer))
    }

    async fn keep(&self, _: Request<KeepRequest>) -> Result<Response<KeepResponse>, Status> {
        let done = self.keeper().pass().await.map_err(|s| self.fail(s))?;
        Ok(Response::new(done))
    }
}

/// Session ids become part of lease names; keep them to a safe alphabet.
fn validate_session(session: &str) -> Result<(), Error> {
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

/// A blob digest as every runtime keys its store by: `sha256:<64 lowercase hex>`.
fn validate_digest(digest: &str) -> Result<(), Error> {
    lade_oci::validate_digest(digest).map_err(|r| Error::InvalidRequest(format!("{digest}: {r}")))
}

/// A PutBlob header names a blob by a valid digest, for a valid session.
fn check_header(header: &BlobHeader) -> Result<(), Error> {
    let blob = header
        .blob
        .as_ref()
        .ok_or_else(|| Error::InvalidRequest("PutBlob header has no descriptor".into()))?;
    validate_digest(&blob.digest)?;
    validate_session(&header.session)
}

/// Records an import event's timing; a failed image counts as a failure.
fn observe(metrics: &Metrics, event: &ImportEvent) {
    let seconds = event
        .duration_ms
        .map(|ms| Duration::from_millis(ms).as_secs_f64());
    match ImportPhase::try_from(event.phase) {
        Ok(ImportPhase::LayerUnpacked) => {
            if let Some(s) = seconds {
                metrics.layer_unpack_seconds.observe(s);
            }
        }
        Ok(ImportPhase::ImageDone) => {
            if let Some(s) = seconds {
                metrics.image_import_seconds.observe(s);
            }
        }
        Ok(ImportPhase::ImageFailed) => {
            metrics.failures.with_label_values(&["image_import"]).inc();
        }
        _ => {}
    }
}

/// Refuses a request that would give an image a digest reference (`repo@sha256:…`) naming
/// any digest but the image's own: such a name claims to be content the node does not hold
/// (say the real `nginx@sha256:…` a pod pins), and kubelet would run this image in its place.
fn foreign_digest_name(images: &[lade_proto::ImageSpec]) -> Result<(), Error> {
    for image in images {
        let own = image
            .manifest
            .as_ref()
            .map(|m| m.digest.as_str())
            .unwrap_or("");
        for name in &image.names {
            if let Some((_, digest)) = name.split_once('@') {
                if digest != own {
                    return Err(Error::InvalidRequest(format!(
                        "image {}: name {name} names digest {digest}, but the image is {own}; \
                         a digest reference may only name the image's own digest",
                        image.source
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_blob_header_needs_a_descriptor_a_digest_and_a_session() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let header = |session: &str, digest: Option<&str>| BlobHeader {
            session: session.to_string(),
            blob: digest.map(|d| lade_proto::Descriptor {
                digest: d.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_header(&header("load-1", Some(&digest))).is_ok());
        for bad in [
            header("load-1", None),
            header("load-1", Some("sha256:../../etc")),
            header("", Some(&digest)),
            header("../x", Some(&digest)),
            header(&"s".repeat(65), Some(&digest)),
        ] {
            let refused = check_header(&bad);
            assert!(
                matches!(refused, Err(Error::InvalidRequest(_))),
                "{bad:?}: {refused:?}"
            );
        }
    }
}
