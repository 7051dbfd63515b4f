//! Peer fetch: a node takes a blob from a peer agent that holds it, at its own pace.
//!
//! Relay fan-out sends each blob from the coordinator to one node; the others get it with a
//! `Fetch` call from the coordinator naming a peer that holds it. The fetching agent reads
//! the blob with `ReadBlob` from that peer's runtime (its verified, committed copy) and
//! stores it through its own runtime's `put_blob`, which verifies size and digest again. A
//! slow node therefore slows only its own reads, never the stream of anyone else, and a
//! reader that stops taking bytes only holds one small queue on the serving side, dropped
//! after the stall timeout.
//!
//! What goes wrong is told apart: a source that cannot be dialed, refuses, stalls, breaks
//! off or serves bytes that fail verification ends the Fetch with `source_error` (what
//! arrived is kept for a resume, and the coordinator picks another source); a failure of
//! this node's own store ends it with an error status.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lade_proto::{BlobHeader, FetchProgress, FetchRequest, ReadBlobChunk, ReadBlobRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tonic::Status;
use tracing::{debug, info};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::relay::Peers;
use crate::runtime::Runtime;

/// Chunks queued for one reader of `ReadBlob`; a reader that takes none for the stall
/// timeout is dropped.
const SERVE_DEPTH: usize = 1;

/// Progress is reported each time this many more bytes are held.
const PROGRESS_STEP: u64 = 1 << 20;

/// Streams the blob `digest` from `offset` out of `runtime` to a peer. The bytes go through
/// a queue of [`SERVE_DEPTH`] chunks, and a chunk is read only when the queue has room for
/// it; when the reader takes nothing for `stall`, the stream ends early (the reader's
/// verification then refuses the short blob) and the runtime's read is released.
pub async fn serve<R: Runtime>(
    runtime: &R,
    metrics: &Metrics,
    req: ReadBlobRequest,
    stall: Duration,
    permit: OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<Result<ReadBlobChunk, Status>>, Error> {
    let mut bytes = runtime.read_blob(&req.digest, req.offset).await?;
    let (tx, rx) = mpsc::channel(SERVE_DEPTH);
    let served = metrics.served_bytes.clone();
    let digest = req.digest;
    tokio::spawn(async move {
        let _permit = permit;
        loop {
            // Room in the queue first, then the next chunk: a reader that is behind holds
            // no chunk read for it beyond the one queued.
            let Ok(Ok(slot)) = tokio::time::timeout(stall, tx.reserve()).await else {
                debug!(%digest, "peer stopped reading a blob; dropped");
                return;
            };
            let Some(item) = bytes.next().await else {
                return;
            };
            match item {
                Ok(data) => {
                    served.inc_by(data.len() as u64);
                    slot.send(Ok(ReadBlobChunk { data }));
                }
                Err(e) => {
                    slot.send(Err(Status::from(e)));
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// What a Fetch is given besides its request.
pub struct Fetcher<R> {
    pub runtime: Arc<R>,
    pub peers: Arc<Peers>,
    pub metrics: Metrics,
    /// How long the source may send nothing before it counts as stalled.
    pub stall: Duration,
}

impl<R: Runtime> Fetcher<R> {
    /// Fetches `req.blob` from `req.source` into this node's runtime, sending progress on
    /// `events` as bytes arrive. Returns the last message: done, or the source's failure;
    /// an error is this node's own failure.
    pub async fn run(
        &self,
        req: FetchRequest,
        events: &mpsc::Sender<Result<FetchProgress, Status>>,
    ) -> Result<FetchProgress, Error> {
        let blob = req
            .blob
            .ok_or_else(|| Error::InvalidRequest("Fetch has no descriptor".into()))?;
        let (digest, size, source) = (blob.digest.clone(), blob.size, req.source);
        let state = self
            .runtime
            .have(&req.session, std::slice::from_ref(&blob))
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        if state.present {
            self.metrics.blobs_present.inc();
            return Ok(FetchProgress {
                held: size,
                done: true,
                already_present: true,
                ..Default::default()
            });
        }
        let offset = state.offset.min(size);
        let source_failed = |why: String| {
            info!(%digest, %source, error = %why, "fetch from a peer failed");
            self.metrics
                .failures
                .with_label_values(&["peer_source"])
                .inc();
            Ok(FetchProgress {
                held: offset,
                source_error: why,
                ..Default::default()
            })
        };
        if let Err(e) = self.peers.admit(&source) {
            return source_failed(e.to_string());
        }
        let mut client = match self.peers.client(&source).await {
            Ok(c) => c,
            Err(why) => return source_failed(why),
        };
        let read = tokio::time::timeout(
            self.stall,
            client.read_blob(ReadBlobRequest {
                digest: digest.clone(),
                offset,
            }),
        )
        .await;
        let stream = match read {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.peers.forget_after(&source, &status);
                return source_failed(format!(
                    "agent {source}: ReadBlob {digest}: {} ({:?})",
                    status.message(),
                    status.code()
                ));
            }
            Err(_) => {
                self.peers.forget(&source);
                return source_failed(format!(
                    "agent {source} did not answer ReadBlob {digest} within {:?}",
                    self.stall
                ));
            }
        };

        // The source's bytes, each message within the stall timeout; why the source failed
        // is noted aside, so that it is not taken for this node's own failure.
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let (stall, noted) = (self.stall, failure.clone());
        let note = move |why: String| {
            noted.lock().expect("fetch failure lock").get_or_insert(why);
        };
        let (fetched, progress) = (self.metrics.fetched_bytes.clone(), events.clone());
        let mut held = offset;
        let mut reported = offset;
        let stream_digest = digest.clone();
        let src = source.clone();
        let chunks = futures::stream::unfold(Some(stream), move |stream| {
            let (note, src, digest) = (note.clone(), src.clone(), stream_digest.clone());
            async move {
                let mut stream = stream?;
                match tokio::time::timeout(stall, stream.next()).await {
                    Ok(Some(Ok(chunk))) => Some((Ok(chunk.data), Some(stream))),
                    Ok(None) => None,
                    Ok(Some(Err(status))) => {
                        note(format!(
                            "agent {src} broke off sending {digest}: {} ({:?})",
                            status.message(),
                            status.code()
                        ));
                        Some((Err(Error::Cancelled { digest }), None))
                    }
                    Err(_) => {
                        note(format!(
                            "agent {src} sent nothing of {digest} for {stall:?}"
                        ));
                        Some((
                            Err(Error::Stalled {
                                digest,
                                timeout: stall,
                            }),
                            None,
                        ))
                    }
                }
            }
        })
        .inspect(move |c| {
            if let Ok(c) = c {
                fetched.inc_by(c.len() as u64);
                held += c.len() as u64;
                if held >= reported + PROGRESS_STEP {
                    reported = held;
                    // Progress is cumulative: a report dropped on a full queue is not lost.
                    let _ = progress.try_send(Ok(FetchProgress {
                        held,
                        ..Default::default()
                    }));
                }
            }
        })
        .boxed();
        let header = BlobHeader {
            session: req.session.clone(),
            blob: Some(blob),
            offset,
            ..Default::default()
        };
        match self.runtime.put_blob(header, chunks).await {
            Ok(resp) => {
                if resp.already_present {
                    self.metrics.blobs_present.inc();
                } else {
                    self.metrics.blobs_committed.inc();
                }
                Ok(FetchProgress {
                    held: size,
                    done: true,
                    received: resp.received,
                    already_present: resp.already_present,
                    ..Default::default()
                })
            }
            Err(e) => {
                let noted = failure.lock().expect("fetch failure lock").take();
                match (noted, &e) {
                    (Some(why), _) => source_failed(why),
                    (None, Error::SizeMismatch { .. } | Error::DigestMismatch { .. }) => {
                        source_failed(format!("agent {source} served {digest} wrongly: {e}"))
                    }
                    _ => Err(e),
                }
            }
        }
    }
}
