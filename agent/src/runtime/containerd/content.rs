//! Content and leases: the session's lease, what Have finds in the content store, PutBlob's
//! resumable writes through containerd's ingest, and reading and labelling blobs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient, AbortRequest,
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, Info as ContentInfo,
    InfoRequest as ContentInfoRequest, ReadContentRequest, StatusRequest,
    UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use futures::stream::{BoxStream, StreamExt};
use lade_proto::{BlobHeader, BlobState, Descriptor, PutBlobResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use tracing::{debug, info, instrument, warn};

use super::unpack::LocalStore;
use super::{Containerd, RUNTIME};
use crate::error::Error;
use crate::runtime::file_chunks;
use lade_oci::{self as oci, MAX_METADATA_BYTES};

/// Lease label after which containerd's GC drops the lease and what only it held.
const LABEL_EXPIRE: &str = "containerd.io/gc.expire";

/// How long a PutBlob waits for containerd to release the ingest of a previous upload of the
/// same blob, polling every [`REF_LOCKED_POLL`]; a lock held longer is another writer's.
const REF_LOCKED_WAIT: Duration = Duration::from_secs(2);

const REF_LOCKED_POLL: Duration = Duration::from_millis(20);

/// Whether containerd refused a write because another stream holds the ingest ref
/// (`ref <ref> locked for <duration> (since <time>): unavailable`).
fn ref_locked(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable && status.message().contains(" locked for ")
}

/// Ingest ref under which lade writes a blob: stable per digest, so an interrupted upload
/// can be resumed by the next attempt.
fn ingest_ref(digest: &str) -> String {
    format!("lade-{digest}")
}

impl Containerd {
    pub(super) fn content(&self) -> ContentClient<Channel> {
        // Blobs up to the chunk size plus framing pass in one message.
        ContentClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    pub(super) fn lease_id(session: &str) -> String {
        format!("lade-{session}")
    }

    /// Creates the session's lease if it does not exist yet; returns its id. The service
    /// checked `session` (it becomes part of the lease's name).
    pub(super) async fn ensure_lease(&self, session: &str) -> Result<String, Error> {
        let id = Self::lease_id(session);
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + self.cfg.lease_ttl);
        let labels = HashMap::from([(LABEL_EXPIRE.to_string(), expire.to_string())]);
        let res = LeasesClient::new(self.channel.clone())
            .create(self.req(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await;
        match res {
            Ok(_) => Ok(id),
            Err(s) if s.code() == Code::AlreadyExists => Ok(id),
            Err(s) => Err(Error::runtime(RUNTIME, "Leases.Create")(s)),
        }
    }

    pub(super) async fn content_info(&self, digest: &str) -> Result<Option<ContentInfo>, Error> {
        match self
            .content()
            .info(self.req(
                ContentInfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Info {digest}"))(s)),
        }
    }

    /// Holds an existing blob for the session, so GC cannot take it before import.
    pub(super) async fn hold(&self, lease: &str, digest: &str) -> Result<(), Error> {
        self.add_resource(lease, "content", digest).await
    }

    /// Bytes of an interrupted upload of `digest` still held in containerd's ingest area.
    pub(super) async fn partial_offset(&self, digest: &str) -> Result<u64, Error> {
        match self
            .content()
            .status(self.req(
                StatusRequest {
                    r#ref: ingest_ref(digest),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .status
                .map(|s| s.offset.max(0) as u64)
                .unwrap_or(0)),
            Err(s) if s.code() == Code::NotFound => Ok(0),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Status {digest}"))(
                s,
            )),
        }
    }

    /// Reads a small metadata blob (manifest or config) whole.
    pub(super) async fn read_small(
        &self,
        image: &str,
        desc: &oci::Descriptor,
    ) -> Result<Vec<u8>, Error> {
        oci::check_metadata_size(desc)?;
        let mut stream = match self
            .content()
            .read(self.req(
                ReadContentRequest {
                    digest: desc.digest.clone(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(Error::MissingBlob {
                    image: image.to_string(),
                    digest: desc.digest.clone(),
                })
            }
            Err(s) => {
                return Err(Error::runtime(
                    RUNTIME,
                    format!("Content.Read {}", desc.digest),
                )(s))
            }
        };
        let mut out = Vec::with_capacity(desc.size as usize);
        while let Some(msg) = stream.message().await.map_err(Error::runtime(
            RUNTIME,
            format!("Content.Read {}", desc.digest),
        ))? {
            out.extend_from_slice(&msg.data);
            if out.len() as u64 > MAX_METADATA_BYTES {
                break;
            }
        }
        if out.len() as u64 != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                received: out.len() as u64,
            });
        }
        Ok(out)
    }

    /// A committed blob's bytes from `offset`, as containerd's content store streams them.
    pub(super) async fn read_from(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        let op = format!("Content.Read {digest}");
        let stream = match self
            .content()
            .read(self.req(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: offset as i64,
                    size: 0,
                },
                None,
            ))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(Error::NotHeld {
                    digest: digest.to_string(),
                })
            }
            Err(s) => return Err(Error::runtime(RUNTIME, op)(s)),
        };
        Ok(stream
            .map(move |m| {
                m.map(|r| Bytes::from(r.data))
                    .map_err(|s| Error::runtime(RUNTIME, op.clone())(s))
            })
            .boxed())
    }

    /// A committed blob's bytes from `offset`, read from containerd's blob file when this agent
    /// sees the content store (`store`), by [`file_chunks`]: no stream through containerd's
    /// gRPC server, and at most the chunk being read is held here. Presence is still asked of
    /// containerd, so only blobs committed in this namespace are served. `None` when the file
    /// is not there as containerd describes it (then containerd streams it).
    pub(super) async fn read_stored(
        &self,
        store: &LocalStore,
        digest: &str,
        offset: u64,
    ) -> Result<Option<BoxStream<'static, Result<Bytes, Error>>>, Error> {
        let Some(info) = self.content_info(digest).await? else {
            return Err(Error::NotHeld {
                digest: digest.to_string(),
            });
        };
        let size = info.size.max(0) as u64;
        if offset > size {
            return Err(Error::InvalidRequest(format!(
                "blob {digest} has {size} bytes; offset {offset} is past its end"
            )));
        }
        let Some(path) = store.blob_path(digest) else {
            return Ok(None);
        };
        let name = path.display().to_string();
        let opened = tokio::task::spawn_blocking(move || open_blob(&path, size, offset)).await;
        let Ok(Ok(file)) = opened else {
            debug!(%digest, "blob file not readable here; containerd streams it");
            return Ok(None);
        };
        let fail = move |source| Error::StoredBlob {
            path: name.clone(),
            source,
        };
        Ok(Some(file_chunks(file, size - offset, fail)))
    }

    /// Sets labels on a blob, touching only the named keys.
    pub(super) async fn set_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(
                ContentUpdateRequest {
                    info: Some(ContentInfo {
                        digest: digest.to_string(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(Error::runtime(RUNTIME, format!("Content.Update {digest}")))?;
        Ok(())
    }

    /// Deletes blob `digest` from the content store (logged, not failed, when it cannot).
    pub(super) async fn discard(&self, digest: &str) {
        let deleted = self
            .content()
            .delete(self.req(
                containerd_client::services::v1::DeleteContentRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await;
        match deleted {
            Ok(_) => info!(%digest, "deleted a blob that cannot be unpacked"),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => warn!(%digest, error = %s, "could not delete a blob that cannot be unpacked"),
        }
    }

    pub(super) async fn blob_state(&self, lease: &str, d: &Descriptor) -> Result<BlobState, Error> {
        let present = self.content_info(&d.digest).await?.is_some();
        let offset = if present {
            self.hold(lease, &d.digest).await?;
            0
        } else {
            self.partial_offset(&d.digest).await?
        };
        Ok(BlobState {
            digest: d.digest.clone(),
            present,
            offset,
        })
    }

    /// For each blob: present (and held for the session), or how much of it is ingested.
    pub(super) async fn have_blobs(
        &self,
        session: &str,
        blobs: &[Descriptor],
    ) -> Result<Vec<BlobState>, Error> {
        let lease = self.ensure_lease(session).await?;
        let mut out = Vec::with_capacity(blobs.len());
        // Small concurrent batches: each answer is a local round trip to containerd.
        for batch in blobs.chunks(16) {
            let states =
                futures::future::try_join_all(batch.iter().map(|d| self.blob_state(&lease, d)))
                    .await?;
            out.extend(states);
        }
        Ok(out)
    }

    #[instrument(skip_all, fields(digest = header.blob.as_ref().map(|b| b.digest.as_str()).unwrap_or("")))]
    /// Writes one blob into the content store under the session's lease, resuming an
    /// interrupted ingest; containerd commits it only on a size and digest match.
    pub(super) async fn write_blob(
        &self,
        header: BlobHeader,
        mut chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<PutBlobResponse, Error> {
        let blob = header.blob.unwrap_or_default();
        let digest = blob.digest.clone();
        let lease = self.ensure_lease(&header.session).await?;
        let present = |received| PutBlobResponse {
            digest: digest.clone(),
            received,
            already_present: true,
            ..Default::default()
        };
        if self.content_info(&digest).await?.is_some() {
            self.hold(&lease, &digest).await?;
            return Ok(present(0));
        }

        let ref_ = ingest_ref(&digest);
        let mut waited = Duration::ZERO;
        let (tx, mut responses, held) = loop {
            let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
            // containerd answers the first message before the stream's response headers, so
            // it must be queued before the call is awaited.
            tx.send(WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: ref_.clone(),
                total: blob.size as i64,
                expected: digest.clone(),
                ..Default::default()
            })
            .await
            .map_err(|_| Error::InvalidRequest("write stream closed".into()))?;
            let opened = match self
                .content()
                .write(self.req(ReceiverStream::new(rx), Some(&lease)))
                .await
            {
                Ok(r) => {
                    let mut responses = r.into_inner();
                    match responses.message().await {
                        Ok(stat) => Ok((responses, stat)),
                        Err(s) => Err(s),
                    }
                }
                Err(s) => Err(s),
            };
            match opened {
                Ok((responses, stat)) => {
                    break (tx, responses, stat.map_or(0, |s| s.offset.max(0) as u64))
                }
                Err(s) if s.code() == Code::AlreadyExists => return Ok(present(0)),
                // The ingest of an upload that just ended (refused, cut off) stays locked until
                // containerd has finished with its stream, which 2.x does a few milliseconds
                // after the client has gone.
                Err(s) if ref_locked(&s) && waited < REF_LOCKED_WAIT => {
                    debug!(%digest, "ingest still locked by the previous upload; waiting");
                    tokio::time::sleep(REF_LOCKED_POLL).await;
                    waited += REF_LOCKED_POLL;
                }
                Err(s) => {
                    return Err(Error::runtime(RUNTIME, format!("Content.Write {digest}"))(
                        s,
                    ))
                }
            }
        };
        // containerd can restart an ingest from zero or continue where it stopped, nothing else.
        let mut offset = match header.offset {
            0 => 0,
            o if o == held => o,
            requested => {
                return Err(Error::ResumeOffset {
                    digest,
                    requested,
                    held,
                })
            }
        };
        debug!(held, offset, "writing blob");

        // containerd answers every message; read the answers as they come so its sends never
        // stall on flow control while we are still sending data.
        let drain = tokio::spawn(async move {
            let mut last = None;
            while let Some(msg) = responses.message().await? {
                last = Some(msg);
            }
            Ok::<_, tonic::Status>(last)
        });

        let mut received = 0u64;
        let mut failed = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if offset + chunk.len() as u64 > blob.size {
                failed = Some(Error::SizeMismatch {
                    digest: digest.clone(),
                    expected: blob.size,
                    received: offset + chunk.len() as u64,
                });
                break;
            }
            let len = chunk.len() as u64;
            let sent = tx
                .send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    // containerd truncates a write at offset 0 and rejects any other offset
                    // than its own, so every message carries the running offset.
                    offset: offset as i64,
                    data: chunk.to_vec(),
                    ..Default::default()
                })
                .await;
            if sent.is_err() {
                break; // containerd ended the stream; its status comes from `drain`.
            }
            offset += len;
            received += len;
        }
        if failed.is_none() && offset == blob.size {
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    offset: offset as i64,
                    total: blob.size as i64,
                    expected: digest.clone(),
                    ..Default::default()
                })
                .await;
        }
        drop(tx);
        let outcome = drain
            .await
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        if let Some(e) = failed {
            return Err(e);
        }
        match outcome {
            Ok(Some(last)) if last.action == WriteAction::Commit as i32 => {
                if last.digest != digest {
                    return Err(Error::DigestMismatch {
                        digest,
                        detail: format!("containerd committed {}", last.digest),
                    });
                }
                info!(bytes = received, "blob committed");
                Ok(PutBlobResponse {
                    digest,
                    received,
                    already_present: false,
                    ..Default::default()
                })
            }
            Ok(_) => Err(Error::SizeMismatch {
                digest,
                expected: blob.size,
                received: offset,
            }),
            Err(s) if s.code() == Code::AlreadyExists => Ok(present(received)),
            Err(s) if s.code() == Code::FailedPrecondition => {
                // A commit refused for size or digest: the bytes were wrong. Drop them so a
                // retry starts clean instead of resuming corrupt data.
                let _ = self
                    .content()
                    .abort(self.req(AbortRequest { r#ref: ref_ }, None))
                    .await;
                Err(Error::DigestMismatch {
                    digest,
                    detail: s.message().to_string(),
                })
            }
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Write {digest}"))(
                s,
            )),
        }
    }

    /// Deletes the session's lease.
    pub(super) async fn end_lease(&self, session: &str) -> Result<(), Error> {
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(
                DeleteLeaseRequest {
                    id: Self::lease_id(session),
                    sync: false,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(Error::runtime(RUNTIME, "Leases.Delete")(s)),
        }
    }
}

/// Opens containerd's file of a blob (never through a symlink), checks it has the size
/// containerd records, and positions it at `offset`.
fn open_blob(path: &std::path::Path, size: u64, offset: u64) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not the blob containerd records",
        ));
    }
    file.seek(SeekFrom::Start(offset))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_blob_file_is_opened_at_the_offset_only_as_itself_and_at_its_recorded_size() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"0123456789").unwrap();

        let mut rest = String::new();
        open_blob(&blob, 10, 4)
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        assert_eq!(rest, "456789");

        // A size other than containerd's record: not the blob containerd committed.
        let err = open_blob(&blob, 11, 0).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

        // A symlink in the blob's place is not followed, whatever it points at.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        let err = open_blob(&link, 10, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");

        // Nor is a directory read as a blob.
        let err = open_blob(dir.path(), 0, 0).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
