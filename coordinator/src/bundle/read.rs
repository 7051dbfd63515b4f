//! Streams one blob out of the bundle file, verifying its digest as it goes.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::tarindex::Section;
use super::{Blob, BlobSource, BundleError};

enum Source {
    File(Section),
    Inline { bytes: Arc<Vec<u8>>, pos: usize },
}

/// Reads a blob from a start offset. A verifying reader's final [`BlobReader::next_chunk`]
/// call, the one that reaches the end, fails if the bytes do not hash to the blob's digest;
/// the bytes before the start offset are hashed too (they are not returned), so a resumed
/// upload is verified whole. A reader for a receiver that checks the digest itself (every
/// agent does, before it commits a blob) skips the hashing and seeks to the offset.
pub struct BlobReader {
    source: Source,
    hasher: Option<Sha256>,
    left: u64,
    expected: String,
    member: String,
    role: String,
    archive: String,
    path: PathBuf,
}

impl BlobReader {
    pub(crate) fn open(
        path: &Path,
        archive: &str,
        blob: &Blob,
        from: u64,
        verify: bool,
    ) -> Result<BlobReader, BundleError> {
        let io_err = |what: String| {
            let path = path.to_path_buf();
            move |e| BundleError::Io {
                path,
                what,
                source: e,
            }
        };
        let (source, member) = match &blob.source {
            BlobSource::Member { member, offset } => {
                let section = Section::open(path, *offset, blob.size)
                    .map_err(io_err(format!("opening {member} in {archive}")))?;
                (Source::File(section), member.clone())
            }
            BlobSource::Inline(bytes) => (
                Source::Inline {
                    bytes: bytes.clone(),
                    pos: 0,
                },
                format!("(generated {})", blob.role),
            ),
        };
        let mut reader = BlobReader {
            source,
            hasher: verify.then(Sha256::new),
            left: blob.size,
            expected: blob.digest.clone(),
            member,
            role: blob.role.clone(),
            archive: archive.to_string(),
            path: path.to_path_buf(),
        };
        let mut skip = from.min(blob.size);
        if !verify {
            match &mut reader.source {
                Source::File(section) => {
                    section
                        .seek(SeekFrom::Start(skip))
                        .map_err(io_err(format!("seeking in {} in {archive}", reader.member)))?;
                }
                Source::Inline { pos, .. } => *pos = skip as usize,
            }
            reader.left -= skip;
            skip = 0;
        }
        let mut buf = vec![0u8; (1 << 20).min(skip as usize)];
        while skip > 0 {
            let n = (skip as usize).min(buf.len());
            reader.fill(&mut buf[..n])?;
            skip -= n as u64;
        }
        Ok(reader)
    }

    /// Bytes not yet returned.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// Fills `buf` completely from the source (it never asks past the blob's end) and hashes it.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), BundleError> {
        let res = match &mut self.source {
            Source::File(section) => section.read_exact(buf),
            Source::Inline { bytes, pos } => {
                buf.copy_from_slice(&bytes[*pos..*pos + buf.len()]);
                *pos += buf.len();
                Ok(())
            }
        };
        res.map_err(|e: io::Error| BundleError::Io {
            path: self.path.clone(),
            what: format!(
                "reading {} ({}) in {}",
                self.member, self.role, self.archive
            ),
            source: e,
        })?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..]);
        }
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// The next chunk of at most `max` bytes, or `None` at the end. The call that reads the
    /// last bytes returns the digest error instead of them if the blob is corrupt, so corrupt
    /// content never completes an upload.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, BundleError> {
        if self.left == 0 {
            return Ok(None);
        }
        let n = (self.left as usize).min(max);
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        if let (0, Some(hasher)) = (self.left, &self.hasher) {
            let actual = format!("sha256:{}", hex::encode(hasher.clone().finalize()));
            if actual != self.expected {
                return Err(BundleError::DigestMismatch {
                    archive: self.archive.clone(),
                    member: self.member.clone(),
                    role: self.role.clone(),
                    expected: self.expected.clone(),
                    actual,
                });
            }
        }
        Ok(Some(buf))
    }
}

/// sha256 digest (`sha256:<hex>`) of everything `reader` yields.
pub(crate) fn sha256_of(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
    }
}
