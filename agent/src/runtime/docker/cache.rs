//! The Docker runtime's local blob store: a directory of digest-verified blobs.
//!
//! dockerd has no API to receive one blob at a time, so blobs wait here until an import
//! streams them to it. Owns the directory layout and the rule that a blob becomes visible
//! only once verified: an upload is written (and hashed as it goes) to `ingest/sha256/<hex>`,
//! synced, and renamed to `blobs/sha256/<hex>` only when its size and digest match; an
//! interrupted upload stays in `ingest/` so the next one resumes where it stopped, as
//! containerd's ingests do. It does not know images, sessions or dockerd.
//!
//! Paths are built only from digests that are `sha256:` and 64 lowercase hex digits, checked
//! here whatever the caller did, so no digest can name a path outside the cache. The
//! directories are 0700 and the files 0600: blobs of private images stay root's.
//!
//! File work and hashing run on blocking threads, never on the async workers.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::error::Error;
use crate::runtime::KeyedLocks;
use lade_oci as oci;

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
    /// One writer per digest at a time.
    writers: KeyedLocks,
}

impl BlobCache {
    /// A cache rooted at `root`; directories are made on first write, so an agent that never
    /// serves Docker leaves no trace.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            writers: KeyedLocks::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the verified blob `digest` lives (whether or not it is there); an error for a
    /// digest that is not `sha256:<64 lowercase hex>`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn ingest_path(&self, digest: &str) -> Result<PathBuf, Error> {
        Ok(self.root.join("ingest/sha256").join(hex_of(digest)?))
    }

    /// Whether the verified blob is stored.
    pub async fn contains(&self, digest: &str) -> Result<bool, Error> {
        let path = self.blob_path(digest)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(Error::cache(&path, "stat"))
    }

    /// Bytes an interrupted upload of `digest` left, 0 if none.
    pub async fn partial(&self, digest: &str) -> Result<u64, Error> {
        let path = self.ingest_path(digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::cache(&path, "stat")(e)),
        }
    }

    /// Reads a stored manifest or config whole; `image` names the image in errors.
    pub async fn read_small(&self, image: &str, desc: &oci::Descriptor) -> Result<Vec<u8>, Error> {
        oci::check_metadata_size(desc)?;
        let path = self.blob_path(&desc.digest)?;
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

    /// A verified blob's bytes from `offset` (none past its end), by
    /// [`file_chunks`](crate::runtime::file_chunks).
    pub async fn read_from(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes, Error>>, Error> {
        use tokio::io::AsyncSeekExt;
        let path = self.blob_path(digest)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::NotHeld {
                    digest: digest.to_string(),
                })
            }
            Err(e) => return Err(Error::cache(&path, "open")(e)),
        };
        let size = file
            .metadata()
            .await
            .map_err(Error::cache(&path, "stat"))?
            .len();
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(Error::cache(&path, "seek"))?;
        let fail = move |e| Error::cache(&path, "read")(e);
        Ok(crate::runtime::file_chunks(
            file.into_std().await,
            size.saturating_sub(offset),
            fail,
        ))
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
        let (ingest, blob) = (self.ingest_path(digest)?, self.blob_path(digest)?);
        let write = async {
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
                root: self.root.clone(),
                ingest: ingest.clone(),
                blob,
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
                path: ingest.display().to_string(),
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
        };
        self.writers.exclusive(digest, write).await
    }

    /// Deletes stored blobs; ones already gone are fine.
    pub async fn remove(&self, digests: Vec<String>) {
        let paths: Vec<PathBuf> = digests
            .iter()
            .filter_map(|d| self.blob_path(d).ok())
            .collect();
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

/// The hex part of `digest`, which must be `sha256:` and 64 lowercase hex digits: the only
/// text that becomes a file name in the cache.
fn hex_of(digest: &str) -> Result<&str, Error> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(Error::InvalidDigest {
            digest: digest.escape_debug().to_string(),
        }),
    }
}

/// Makes `dir` (beneath `root`) and every directory between them, all mode 0700, tightening
/// ones an older agent made with the default mode.
fn private_dir(root: &Path, dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::cache(dir, "create"))?;
    for d in dir.ancestors().take_while(|d| d.starts_with(root)) {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))
            .map_err(Error::cache(d, "chmod"))?;
    }
    Ok(())
}

/// One upload, run on a blocking thread.
struct Ingest {
    digest: String,
    size: u64,
    offset: u64,
    /// The cache's root: every directory from it down is made private.
    root: PathBuf,
    ingest: PathBuf,
    blob: PathBuf,
}

impl Ingest {
    /// Writes the chunks from `rx` after the kept prefix; returns the bytes taken from `rx`.
    fn run(self, mut rx: mpsc::Receiver<Bytes>) -> Result<u64, Error> {
        let dir = self.ingest.parent().expect("ingest path has a parent");
        private_dir(&self.root, dir)?;
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
        private_dir(&self.root, blobs)?;
        fs::rename(&self.ingest, &self.blob).map_err(Error::cache(&self.blob, "rename"))?;
        File::open(blobs)
            .and_then(|d| d.sync_all())
            .map_err(Error::cache(blobs, "sync"))?;
        Ok(received)
    }

    /// Opens the ingest file for writing at `self.offset`, feeding the kept prefix to `hasher`.
    fn open(&self, hasher: &mut Sha256) -> Result<File, Error> {
        if self.offset == 0 {
            return OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.ingest)
                .map_err(Error::cache(&self.ingest, "create"));
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
    use crate::runtime::test_chunks as chunks;

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
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
        assert_eq!(fs::read(cache.blob_path(&digest).unwrap()).unwrap(), data);
        let again = cache
            .write(&digest, data.len() as u64, 0, chunks(&[data]))
            .await
            .unwrap();
        assert!(again.already_present);
    }

    #[tokio::test]
    async fn a_peer_reads_a_stored_blob_from_any_offset_and_nothing_else() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().to_path_buf());
        let data: Vec<u8> = (0..lade_proto::SERVE_CHUNK_SIZE * 2 + 9)
            .map(|i| (i % 251) as u8)
            .collect();
        let digest = digest_of(&data);
        cache
            .write(&digest, data.len() as u64, 0, chunks(&[&data]))
            .await
            .unwrap();
        let read = |offset: u64| {
            let cache = &cache;
            let digest = &digest;
            async move {
                let mut out = Vec::new();
                let mut stream = cache.read_from(digest, offset).await?;
                while let Some(chunk) = stream.next().await {
                    out.extend_from_slice(&chunk?);
                }
                Ok::<_, Error>(out)
            }
        };
        assert!(read(0).await.unwrap() == data);
        let from = lade_proto::SERVE_CHUNK_SIZE + 3;
        assert!(read(from as u64).await.unwrap() == data[from..]);
        assert!(read(data.len() as u64).await.unwrap().is_empty());
        assert!(read(data.len() as u64 + 1).await.unwrap().is_empty());
        let absent = digest_of(b"never stored");
        assert!(matches!(
            cache.read_from(&absent, 0).await,
            Err(Error::NotHeld { .. })
        ));
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
        assert_eq!(fs::read(cache.blob_path(&digest).unwrap()).unwrap(), data);
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

    #[tokio::test]
    async fn hostile_digests_name_no_path_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let cache = BlobCache::new(root.clone());
        let data = b"layer";
        let hex = &digest_of(data)["sha256:".len()..];
        let hostile = [
            "sha256:../../outside".to_string(),
            format!("sha256:../{}", &hex[3..]),
            format!("sha256:{}/x", &hex[2..]),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha512:{hex}"),
            hex.to_string(),
            format!("sha256:{hex}\0"),
            "/etc/passwd".to_string(),
            String::new(),
        ];
        for digest in &hostile {
            let err = cache
                .write(digest, data.len() as u64, 0, chunks(&[data]))
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidDigest { .. }),
                "{digest:?}: {err}"
            );
            assert!(matches!(
                cache.contains(digest).await,
                Err(Error::InvalidDigest { .. })
            ));
            assert!(matches!(
                cache.partial(digest).await,
                Err(Error::InvalidDigest { .. })
            ));
            assert!(cache.blob_path(digest).is_err());
        }
        cache.remove(hostile.to_vec()).await;
        assert!(!root.exists(), "a hostile digest made the cache directory");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn blobs_are_private_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        // An older agent's directory, made with the default mode.
        fs::create_dir_all(root.join("blobs")).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let cache = BlobCache::new(root.clone());
        let (done, partial) = (b"whole blob".as_slice(), b"cut".as_slice());
        cache
            .write(&digest_of(done), done.len() as u64, 0, chunks(&[done]))
            .await
            .unwrap();
        cache
            .write(&digest_of(partial), 10, 0, chunks(&[partial]))
            .await
            .unwrap_err();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        for d in ["", "blobs", "blobs/sha256", "ingest", "ingest/sha256"] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&cache.blob_path(&digest_of(done)).unwrap()), 0o600);
        assert_eq!(
            mode(&cache.ingest_path(&digest_of(partial)).unwrap()),
            0o600
        );
    }
}
