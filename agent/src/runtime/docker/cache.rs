//! The Docker runtime's local blob store: a directory of digest-verified blobs.
//!
//! dockerd has no API to receive one blob at a time, so blobs wait here until an import
//! streams them to it. Owns the directory layout and the rule that a blob becomes visible
//! only once verified: an upload is written (and hashed as it goes) to `ingest/sha256/<hex>`,
//! synced, and renamed to `blobs/sha256/<hex>` only when its size and digest match; an
//! interrupted upload stays in `ingest/` so the next one resumes where it stopped, as
//! containerd's ingests do. It does not know images, sessions or dockerd.
//!
//! File work and hashing run on blocking threads, never on the async workers.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::error::Error;
use crate::oci;

/// Chunks queued between the network and the writer thread: a few MiB at most.
const WRITE_QUEUE: usize = 4;
/// Buffer for reading back the kept part of an interrupted upload.
const READ_BUFFER: usize = 1 << 20;

/// What a write did.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    /// Bytes taken from this call's chunks.
    pub received: u64,
    /// The blob was already stored; nothing was written.
    pub already_present: bool,
}

/// A blob directory; see the module documentation for its layout.
pub struct BlobCache {
    root: PathBuf,
    /// One writer per digest at a time: two uploads of one blob would interleave in one
    /// ingest file. The second waits, then finds the blob stored.
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl BlobCache {
    /// A cache rooted at `root`; directories are made on first write, so an agent that never
    /// serves Docker leaves no trace.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            writers: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the verified blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex_of(digest))
    }

    fn ingest_path(&self, digest: &str) -> PathBuf {
        self.root.join("ingest/sha256").join(hex_of(digest))
    }

    /// Whether the verified blob is stored.
    pub async fn contains(&self, digest: &str) -> Result<bool, Error> {
        let path = self.blob_path(digest);
        tokio::fs::try_exists(&path)
            .await
            .map_err(Error::cache(&path, "stat"))
    }

    /// Bytes an interrupted upload of `digest` left, 0 if none.
    pub async fn partial(&self, digest: &str) -> Result<u64, Error> {
        let path = self.ingest_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::cache(&path, "stat")(e)),
        }
    }

    /// Reads a stored manifest or config whole; `image` names the image in errors.
    pub async fn read_small(&self, image: &str, desc: &oci::Descriptor) -> Result<Vec<u8>, Error> {
        oci::check_metadata_size(desc)?;
        let path = self.blob_path(&desc.digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::MissingBlob {
                    image: image.to_string(),
                    digest: desc.digest.clone(),
                })
            }
            Err(e) => return Err(Error::cache(&path, "read")(e)),
        };
        if bytes.len() as u64 != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                received: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Stores blob `digest` of `size` bytes from `chunks`, which start at `offset` (0, or
    /// the length of the interrupted upload [`BlobCache::partial`] reports). The blob becomes
    /// visible only if its size and digest match; on a mismatch the bytes are dropped, so a
    /// retry starts clean. A stream that ends early keeps what it brought, for a resume.
    pub async fn write(
        &self,
        digest: &str,
        size: u64,
        offset: u64,
        mut chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<Written, Error> {
        let lock = self
            .writers
            .lock()
            .expect("writer map lock")
            .entry(digest.to_string())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let result = async {
            if self.contains(digest).await? {
                return Ok(Written {
                    received: 0,
                    already_present: true,
                });
            }
            let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
            let job = Ingest {
                digest: digest.to_string(),
                size,
                offset,
                ingest: self.ingest_path(digest),
                blob: self.blob_path(digest),
            };
            let writer = tokio::task::spawn_blocking(move || job.run(rx));
            // A failed stream stops the upload; its error says more than the short blob would.
            let mut failed = None;
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(c) => {
                        if tx.send(c).await.is_err() {
                            break; // The writer stopped; its result says why.
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            drop(tx);
            let written = writer.await.map_err(|e| Error::Cache {
                path: self.ingest_path(digest).display().to_string(),
                op: "write",
                source: std::io::Error::other(e),
            })?;
            match failed {
                Some(e) => Err(e),
                None => written.map(|received| Written {
                    received,
                    already_present: false,
                }),
            }
        }
        .await;
        drop(guard);
        let mut writers = self.writers.lock().expect("writer map lock");
        // Forget the lock unless another upload of the same blob is waiting on it.
        if Arc::strong_count(&lock) == 2 {
            writers.remove(digest);
        }
        result
    }

    /// Deletes stored blobs; ones already gone are fine.
    pub async fn remove(&self, digests: Vec<String>) {
        let paths: Vec<PathBuf> = digests.iter().map(|d| self.blob_path(d)).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for path in paths {
                match fs::remove_file(&path) {
                    Ok(()) => debug!(path = %path.display(), "removed cached blob"),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove cached blob")
                    }
                }
            }
        })
        .await;
    }

    /// Deletes interrupted uploads untouched for longer than `age`: their load was abandoned.
    pub async fn remove_stale_ingests(&self, age: Duration) {
        let dir = self.root.join("ingest/sha256");
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(entries) = fs::read_dir(&dir) else {
                return;
            };
            let cutoff = SystemTime::now().checked_sub(age);
            for entry in entries.flatten() {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                if let (Some(modified), Some(cutoff)) = (modified, cutoff) {
                    if modified < cutoff {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        })
        .await;
    }
}

/// The hex part of a validated `sha256:<hex>` digest (callers validate; this never panics).
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// One upload, run on a blocking thread.
struct Ingest {
    digest: String,
    size: u64,
    offset: u64,
    ingest: PathBuf,
    blob: PathBuf,
}

impl Ingest {
    /// Writes the chunks from `rx` after the kept prefix; returns the bytes taken from `rx`.
    fn run(self, mut rx: mpsc::Receiver<Bytes>) -> Result<u64, Error> {
        let dir = self.ingest.parent().expect("ingest path has a parent");
        fs::create_dir_all(dir).map_err(Error::cache(dir, "create"))?;
        let mut hasher = Sha256::new();
        let mut file = self.open(&mut hasher)?;
        let mut written = self.offset;
        let mut received = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            let end = written + chunk.len() as u64;
            if end > self.size {
                // More bytes than the descriptor says: these are not the blob's bytes.
                drop(file);
                let _ = fs::remove_file(&self.ingest);
                return Err(Error::SizeMismatch {
                    digest: self.digest,
                    expected: self.size,
                    received: end,
                });
            }
            file.write_all(&chunk)
                .map_err(Error::cache(&self.ingest, "write"))?;
            hasher.update(&chunk);
            written = end;
            received += chunk.len() as u64;
        }
        if written < self.size {
            // Keep what arrived for a resume; it is only useful if it survives a crash.
            file.sync_data()
                .map_err(Error::cache(&self.ingest, "sync"))?;
            return Err(Error::SizeMismatch {
                digest: self.digest,
                expected: self.size,
                received: written,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != self.digest {
            drop(file);
            let _ = fs::remove_file(&self.ingest);
            return Err(Error::DigestMismatch {
                digest: self.digest,
                detail: format!("received bytes hash to {actual}"),
            });
        }
        // Data first, then the name: a crash never leaves a visible blob with missing bytes.
        file.sync_all()
            .map_err(Error::cache(&self.ingest, "sync"))?;
        let blobs = self.blob.parent().expect("blob path has a parent");
        fs::create_dir_all(blobs).map_err(Error::cache(blobs, "create"))?;
        fs::rename(&self.ingest, &self.blob).map_err(Error::cache(&self.blob, "rename"))?;
        File::open(blobs)
            .and_then(|d| d.sync_all())
            .map_err(Error::cache(blobs, "sync"))?;
        Ok(received)
    }

    /// Opens the ingest file for writing at `self.offset`, feeding the kept prefix to `hasher`.
    fn open(&self, hasher: &mut Sha256) -> Result<File, Error> {
        if self.offset == 0 {
            return File::create(&self.ingest).map_err(Error::cache(&self.ingest, "create"));
        }
        let held = match fs::metadata(&self.ingest) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::cache(&self.ingest, "stat")(e)),
        };
        if held != self.offset {
            return Err(Error::ResumeOffset {
                digest: self.digest.clone(),
                requested: self.offset,
                held,
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.ingest)
            .map_err(Error::cache(&self.ingest, "open"))?;
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(Error::cache(&self.ingest, "read"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn chunks(parts: &[&[u8]]) -> BoxStream<'static, Result<Bytes, Error>> {
        let parts: Vec<Result<Bytes, Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures::stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn a_verified_blob_becomes_visible_and_is_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().to_path_buf());
        let data = b"hello blob";
        let digest = digest_of(data);
        assert!(!cache.contains(&digest).await.unwrap());
        let w = cache
            .write(&digest, data.len() as u64, 0, chunks(&[b"hello", b" blob"]))
            .await
            .unwrap();
        assert_eq!(w.received, data.len() as u64);
        assert!(cache.contains(&digest).await.unwrap());
        assert_eq!(fs::read(cache.blob_path(&digest)).unwrap(), data);
        let again = cache
            .write(&digest, data.len() as u64, 0, chunks(&[data]))
            .await
            .unwrap();
        assert!(again.already_present);
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_and_a_wrong_offset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().to_path_buf());
        let data = b"0123456789";
        let digest = digest_of(data);
        let err = cache
            .write(&digest, 10, 0, chunks(&[b"0123"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::SizeMismatch { received: 4, .. }),
            "{err}"
        );
        assert_eq!(cache.partial(&digest).await.unwrap(), 4);
        let err = cache
            .write(&digest, 10, 3, chunks(&[b"3456789"]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ResumeOffset { held: 4, .. }), "{err}");
        let w = cache
            .write(&digest, 10, 4, chunks(&[b"456789"]))
            .await
            .unwrap();
        assert_eq!(w.received, 6);
        assert_eq!(fs::read(cache.blob_path(&digest)).unwrap(), data);
        assert_eq!(cache.partial(&digest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn wrong_bytes_are_dropped_and_never_visible() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().to_path_buf());
        let digest = digest_of(b"right");
        let err = cache
            .write(&digest, 5, 0, chunks(&[b"wrong"]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!cache.contains(&digest).await.unwrap());
        assert_eq!(cache.partial(&digest).await.unwrap(), 0);
        let err = cache
            .write(&digest, 5, 0, chunks(&[b"right", b"!"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::SizeMismatch { received: 6, .. }),
            "{err}"
        );
        assert_eq!(cache.partial(&digest).await.unwrap(), 0);
    }
}
