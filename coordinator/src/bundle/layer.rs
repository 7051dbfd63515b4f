//! Checks what a layer blob unpacks to, by streaming it through its decompressor and tar
//! reader in memory (nothing is written anywhere).
//!
//! Owns three checks that digests alone cannot make, because a blob's digest covers its
//! compressed bytes only: the uncompressed stream hashes to the diffID the image config
//! lists; it stays under [`LayerLimits`] (a gzip or zstd bomb is stopped as soon as it passes
//! the limit, not after); and no tar entry names a path outside the root it is unpacked into.
//! Does not own when the checks run: they cost a decompression of every layer, so the caller
//! decides (once per load, not once per node).

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

use lade_oci::tarframe::Framed;
use sha2::{Digest as _, Sha256};

use super::tarindex::{normalize, HeaderReader, Section};
use super::{BlobSource, Bundle, BundleError, Compression, Image};

/// How far a layer may expand when decompressed: `max(floor, max_ratio × stored size)`.
///
/// Image configs do not record uncompressed layer sizes, so the stored size is the only
/// measure there is. Ordinary layers expand 2–5×, text-heavy ones up to about 20×; the floor
/// lets small layers holding a preallocated or zero-filled file through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLimits {
    pub max_ratio: u64,
    pub floor: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_ratio: 100,
            floor: 256 << 20,
        }
    }
}

impl LayerLimits {
    /// Most uncompressed bytes a layer of `stored` bytes may unpack to.
    pub fn limit(&self, stored: u64) -> u64 {
        stored.saturating_mul(self.max_ratio).max(self.floor)
    }
}

/// The largest zstd window a layer may ask for, as a power of two (32 MiB): the agent's
/// applier (`lade_agent::apply::ZSTD_WINDOW_LOG_MAX`) refuses larger ones, so a layer it would
/// refuse is refused here first, before it is sent anywhere.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;

/// The uncompressed stream: hashed and counted as it is read, failing past `limit`.
struct Counted<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    over: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never ask the decompressor for more than one byte past the limit: that byte is
        // enough to know the limit is passed, so a bomb costs at most `limit` bytes of work.
        let room = self.limit.saturating_sub(self.count).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.count += n as u64;
        if self.count > self.limit {
            self.over = true;
            return Err(io::Error::other("decompression limit passed"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A stream that seeks forward by reading (and so hashing) what it skips: the tar reader
/// then seeks over file data and reads only headers, which [`HeaderReader`] bounds, as it
/// does for the bundle itself.
struct ForwardOnly<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for ForwardOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> Seek for ForwardOnly<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let skip = match to {
            SeekFrom::Current(n) if n >= 0 => n as u64,
            SeekFrom::Start(n) if n >= self.pos => n - self.pos,
            _ => return Err(io::Error::other("a layer stream only seeks forward")),
        };
        let skipped = io::copy(&mut (&mut *self).take(skip), &mut io::sink())?;
        if skipped < skip {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer ends inside an entry's data",
            ));
        }
        Ok(self.pos)
    }
}

impl Bundle {
    /// Checks every layer of `image` (see the module documentation); the first failure is
    /// returned, naming the member, the layer and the image.
    pub fn check_layers(&self, image: &Image, limits: &LayerLimits) -> Result<(), BundleError> {
        for (digest, diff_id) in image.layers.iter().zip(&image.diff_ids) {
            self.check_layer(digest, diff_id, limits)?;
        }
        Ok(())
    }

    /// Checks every layer of every image once (a layer shared by several images, with the
    /// same diffID in each, is decompressed once): what a load runs before contacting nodes.
    pub fn check_all_layers(&self, limits: &LayerLimits) -> Result<(), BundleError> {
        let mut checked = std::collections::HashSet::new();
        for image in &self.images {
            for (digest, diff_id) in image.layers.iter().zip(&image.diff_ids) {
                if checked.insert((digest, diff_id)) {
                    self.check_layer(digest, diff_id, limits)?;
                }
            }
        }
        Ok(())
    }

    /// About how many bytes layer blob `digest` unpacks to, from its header and trailer alone
    /// (no decompression): the stored size of a plain tar; gzip's trailer (ISIZE, the size
    /// modulo 4 GiB of the last member); zstd's frame header when it records the size. Never
    /// less than the stored size. An estimate for a space check, not a bound: a hostile layer
    /// may lie here, and the layer check and the node's disk catch that.
    pub fn unpacked_size_hint(&self, digest: &str) -> u64 {
        use std::os::unix::fs::FileExt;
        let Some(blob) = self.blobs.get(digest) else {
            return 0;
        };
        let BlobSource::Member { offset, .. } = &blob.source else {
            return blob.size;
        };
        let Ok(file) = std::fs::File::open(&self.path) else {
            return blob.size;
        };
        let mut head = [0u8; 18];
        let n = (blob.size as usize).min(head.len());
        if file.read_exact_at(&mut head[..n], *offset).is_err() {
            return blob.size;
        }
        let hint = match Compression::sniff(&head[..n]) {
            Compression::None => blob.size,
            Compression::Gzip if blob.size >= 18 => {
                let mut tail = [0u8; 4];
                match file.read_exact_at(&mut tail, offset + blob.size - 4) {
                    Ok(()) => u64::from(u32::from_le_bytes(tail)),
                    Err(_) => 0,
                }
            }
            Compression::Gzip => 0,
            Compression::Zstd => zstd::zstd_safe::get_frame_content_size(&head[..n])
                .ok()
                .flatten()
                .unwrap_or(0),
        };
        hint.max(blob.size)
    }

    /// Streams layer blob `digest` through its decompressor and a tar reader; returns its
    /// uncompressed size once it is known to hash to `diff_id`, stay under `limits` and keep
    /// every entry inside the root.
    pub fn check_layer(
        &self,
        digest: &str,
        diff_id: &str,
        limits: &LayerLimits,
    ) -> Result<u64, BundleError> {
        let blob = self.blob(digest)?;
        let member = match &blob.source {
            BlobSource::Member { member, .. } => member.clone(),
            BlobSource::Inline(_) => format!("(generated {})", blob.role),
        };
        let layer = format!("member {member} ({})", blob.role);
        let bad = |reason: String| BundleError::BadLayer {
            archive: self.archive_label.clone(),
            layer: layer.clone(),
            reason,
        };
        let stored: Box<dyn Read> = match &blob.source {
            BlobSource::Member { offset, .. } => {
                Box::new(Section::open(&self.path, *offset, blob.size).map_err(|e| {
                    BundleError::Io {
                        path: self.path.clone(),
                        what: format!("reading {member} in {}", self.archive_label),
                        source: e,
                    }
                })?)
            }
            BlobSource::Inline(bytes) => Box::new(io::Cursor::new(bytes.to_vec())),
        };
        let mut stored = BufReader::with_capacity(1 << 20, stored);
        let head = stored
            .fill_buf()
            .map_err(|e| bad(format!("unreadable: {e}")))?;
        // Sniffed, not taken from the media type: containerd's applier sniffs too, and the
        // diffID must be computed over what it will unpack.
        let plain: Box<dyn Read> = match Compression::sniff(head) {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stored)),
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)
                    .map_err(|e| bad(format!("not a zstd stream: {e}")))?;
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| bad(format!("zstd window limit: {e}")))?;
                Box::new(decoder)
            }
            Compression::None => Box::new(stored),
        };
        let limit = limits.limit(blob.size);
        let mut counted = Counted {
            inner: plain,
            hasher: Sha256::new(),
            count: 0,
            limit,
            over: false,
        };
        let walked = walk_entries(&mut counted).and_then(|escape| {
            // The diffID covers the whole stream, the padding after the tar's end too.
            io::copy(&mut counted, &mut io::sink())?;
            Ok(escape)
        });
        if counted.over {
            return Err(BundleError::LayerTooLarge {
                archive: self.archive_label.clone(),
                layer,
                compressed: blob.size,
                limit,
            });
        }
        match walked {
            Err(e) => Err(bad(e.to_string())),
            Ok(Some((entry, reason))) => Err(BundleError::LayerEntryEscapes {
                archive: self.archive_label.clone(),
                layer,
                entry,
                reason,
            }),
            Ok(None) => {
                let actual = format!("sha256:{}", hex::encode(counted.hasher.finalize()));
                if actual != diff_id {
                    return Err(BundleError::DiffIdMismatch {
                        archive: self.archive_label.clone(),
                        layer,
                        expected: diff_id.to_string(),
                        actual,
                    });
                }
                Ok(counted.count)
            }
        }
    }
}

/// Reads every entry header of a layer tar; returns the first entry (and why) whose name or
/// hard-link target would leave the unpack root. Symbolic links may point anywhere: the
/// runtime resolves them inside the root, as a container does.
fn walk_entries(plain: &mut impl Read) -> io::Result<Option<(String, String)>> {
    // The framing bounds (long names, PAX headers, sparse maps) come first, as in the agent.
    let mut archive = tar::Archive::new(HeaderReader::new(ForwardOnly {
        inner: Framed::new(plain),
        pos: 0,
    }));
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if normalize(&name).is_none() {
            return Ok(Some((name, "climbs out of the root with '..'".into())));
        }
        if entry.header().entry_type() == tar::EntryType::Link {
            if let Some(target) = entry.link_name_bytes() {
                let target = String::from_utf8_lossy(&target).into_owned();
                if normalize(&target).is_none() {
                    return Ok(Some((
                        name,
                        format!("is a hard link to {target}, outside the root"),
                    )));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GNU tar header block with a valid checksum.
    fn gnu_header(name: &[u8], kind: u8, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..name.len()].copy_from_slice(name);
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[156] = kind;
        b[257..265].copy_from_slice(b"ustar  \0");
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        b
    }

    #[test]
    fn a_long_name_past_the_framing_bound_is_refused_before_the_tar_crate_reads_it() {
        // 10 kB: under the header-run bound of the bundle reader, over the long-name bound
        // the agent's applier also holds to.
        let mut tar = gnu_header(b"././@LongLink", b'L', 10_000);
        tar.extend(vec![b'a'; 10_240]);
        tar.extend(gnu_header(b"short", b'0', 0));
        tar.extend(vec![0u8; 1024]);
        let err = walk_entries(&mut tar.as_slice()).unwrap_err();
        assert!(err.to_string().contains("is over the limit of"), "{err}");

        let mut fine = gnu_header(b"././@LongLink", b'L', 300);
        fine.extend(vec![b'a'; 512]);
        fine.extend(gnu_header(b"short", b'0', 0));
        fine.extend(vec![0u8; 1024]);
        assert_eq!(walk_entries(&mut fine.as_slice()).unwrap(), None);
    }

    #[test]
    fn an_endless_stream_is_cut_one_byte_past_the_limit() {
        let mut counted = Counted {
            inner: io::repeat(0),
            hasher: Sha256::new(),
            count: 0,
            limit: 10_000,
            over: false,
        };
        let err = io::copy(&mut counted, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(counted.over);
        assert_eq!(counted.count, 10_001);
    }

    #[test]
    fn the_limit_is_the_larger_of_floor_and_ratio() {
        let limits = LayerLimits {
            max_ratio: 100,
            floor: 1000,
        };
        assert_eq!(limits.limit(3), 1000);
        assert_eq!(limits.limit(50), 5000);
        assert_eq!(limits.limit(u64::MAX), u64::MAX);
    }
}
