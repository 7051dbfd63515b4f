//! A docker-archive (the `docker save` layout `docker load` reads) synthesised from cached
//! blobs and streamed, for one image.
//!
//! Owns the archive's shape: the config, the layers dockerd does not hold yet, and a
//! `manifest.json` without `RepoTags` (the image is loaded by ID only and named afterwards,
//! so a failed load leaves no name). Layers dockerd already holds are listed in the manifest
//! but left out of the archive: `docker load` skips a layer whose chain ID it has without
//! opening its file. The archive is never written anywhere nor held whole: tar headers are
//! built here and file contents follow in chunks, read on a blocking thread into a small
//! bounded queue.
//!
//! Gzip and plain layers go in as stored (dockerd decompresses gzip). zstd layers are
//! decompressed on the way, because Docker before 23 cannot read them: a first pass counts
//! (the tar header needs the size) and checks the diffID, a second pass streams.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::Error;

/// Archive chunks queued for dockerd: memory stays a few chunks whatever the image size.
const QUEUE: usize = 4;
const BLOCK: usize = 512;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// One layer of the image, in order.
#[derive(Debug)]
pub struct Layer {
    /// Layer blob digest.
    pub digest: String,
    /// The layer's diffID, from the config.
    pub diff_id: String,
    /// The cached blob to send, or `None` when dockerd already holds the layer's chain.
    pub file: Option<PathBuf>,
}

/// The docker-archive of one image.
#[derive(Debug)]
pub struct Archive {
    /// Names the image in errors.
    pub image: String,
    pub config_digest: String,
    pub config: Vec<u8>,
    pub layers: Vec<Layer>,
}

/// The archive's bytes, as a body for dockerd's load endpoint.
pub type Body = ReceiverStream<Result<Bytes, io::Error>>;

impl Archive {
    /// Starts producing the archive. The stream ends early with an error if a file cannot be
    /// read, so dockerd never mistakes a truncated archive for a whole one; the handle says
    /// what went wrong (and ends quietly if the consumer hangs up first).
    pub fn stream(self) -> (Body, JoinHandle<Result<(), Error>>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let producer = tokio::task::spawn_blocking(move || {
            let mut out = Out { tx: &tx };
            match self.write(&mut out) {
                Ok(()) | Err(Stop::Hangup) => Ok(()),
                Err(Stop::Failed(e)) => {
                    let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                    Err(e)
                }
            }
        });
        (ReceiverStream::new(rx), producer)
    }

    fn write(&self, out: &mut Out) -> Result<(), Stop> {
        let config_member = format!("{}.json", hex_of(&self.config_digest));
        out.member(&config_member, &self.config)?;
        for layer in &self.layers {
            if let Some(path) = &layer.file {
                self.write_layer(out, layer, path)?;
            }
        }
        let manifest = serde_json::json!([{
            "Config": config_member,
            "RepoTags": [],
            "Layers": self.layers.iter().map(layer_member).collect::<Vec<_>>(),
        }]);
        out.member("manifest.json", manifest.to_string().as_bytes())?;
        // The end of a tar: two zero blocks.
        out.send(Bytes::from_static(&[0u8; 2 * BLOCK]))
    }

    fn write_layer(&self, out: &mut Out, layer: &Layer, path: &Path) -> Result<(), Stop> {
        let open = || File::open(path).map_err(Error::cache(path, "open"));
        let mut magic = [0u8; 4];
        let n = read_full(&mut open()?, &mut magic).map_err(Error::cache(path, "read"))?;
        let member = layer_member(layer);
        if n == magic.len() && magic == ZSTD_MAGIC {
            let size = self.check_zstd(layer, path)?;
            out.header(&member, size)?;
            let decoder = crate::apply::zstd_reader(std::io::BufReader::new(open()?))
                .map_err(Error::cache(path, "read"))?;
            out.copy(decoder, size, path)?;
            out.pad(size)
        } else {
            let file = open()?;
            let size = file.metadata().map_err(Error::cache(path, "stat"))?.len();
            out.header(&member, size)?;
            out.copy(file, size, path)?;
            out.pad(size)
        }
    }

    /// Decompresses a zstd layer once to learn its size and check its diffID.
    fn check_zstd(&self, layer: &Layer, path: &Path) -> Result<u64, Error> {
        let file = File::open(path).map_err(Error::cache(path, "open"))?;
        let mut decoder = crate::apply::zstd_reader(std::io::BufReader::new(file))
            .map_err(Error::cache(path, "read"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; lade_proto::CHUNK_SIZE];
        let mut size = 0u64;
        loop {
            let n = decoder.read(&mut buf).map_err(|e| Error::DiffIdMismatch {
                image: self.image.clone(),
                layer: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual: format!("undecodable zstd ({e})"),
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != layer.diff_id {
            return Err(Error::DiffIdMismatch {
                image: self.image.clone(),
                layer: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual,
            });
        }
        Ok(size)
    }
}

/// Name of a layer's member; also for layers left out, since the manifest lists every layer.
fn layer_member(layer: &Layer) -> String {
    format!("{}.tar", hex_of(&layer.digest))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// Why writing stopped early.
enum Stop {
    /// The consumer went away (dockerd answered, or the call was dropped).
    Hangup,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// The sending end of the archive stream.
struct Out<'a> {
    tx: &'a mpsc::Sender<Result<Bytes, io::Error>>,
}

impl Out<'_> {
    fn send(&mut self, bytes: Bytes) -> Result<(), Stop> {
        self.tx.blocking_send(Ok(bytes)).map_err(|_| Stop::Hangup)
    }

    fn header(&mut self, name: &str, size: u64) -> Result<(), Stop> {
        let mut header = tar::Header::new_gnu();
        header
            .set_path(name)
            .map_err(|e| Error::InvalidRequest(format!("archive member {name}: {e}")))?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.send(Bytes::copy_from_slice(header.as_bytes()))
    }

    /// Zeros after a member's data up to the next block boundary.
    fn pad(&mut self, size: u64) -> Result<(), Stop> {
        let rem = (size % BLOCK as u64) as usize;
        if rem == 0 {
            return Ok(());
        }
        self.send(Bytes::from(vec![0u8; BLOCK - rem]))
    }

    fn member(&mut self, name: &str, data: &[u8]) -> Result<(), Stop> {
        self.header(name, data.len() as u64)?;
        self.send(Bytes::copy_from_slice(data))?;
        self.pad(data.len() as u64)
    }

    /// Sends exactly `size` bytes of `reader` (a file that changed size under us is an error,
    /// not a short member).
    fn copy(&mut self, mut reader: impl Read, size: u64, path: &Path) -> Result<(), Stop> {
        let mut left = size;
        while left > 0 {
            let mut buf = vec![0u8; lade_proto::CHUNK_SIZE.min(left as usize)];
            let n = read_full(&mut reader, &mut buf).map_err(Error::cache(path, "read"))?;
            if n == 0 {
                return Err(Error::cache(path, "read")(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{left} bytes short"),
                ))
                .into());
            }
            buf.truncate(n);
            left -= n as u64;
            self.send(Bytes::from(buf))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn layer_tar(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    fn digest(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    async fn collect(archive: Archive) -> (Vec<u8>, Result<(), Error>) {
        let (mut body, producer) = archive.stream();
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => break,
            }
        }
        (out, producer.await.unwrap())
    }

    #[tokio::test]
    async fn archive_holds_config_missing_layers_and_a_nameless_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let plain = layer_tar("a.txt", b"plain layer");
        let zstd_src = layer_tar("b.txt", &vec![7u8; 5000]);
        let zstd = zstd::encode_all(&zstd_src[..], 3).unwrap();
        let (plain_path, zstd_path) = (dir.path().join("p"), dir.path().join("z"));
        std::fs::write(&plain_path, &plain).unwrap();
        std::fs::write(&zstd_path, &zstd).unwrap();
        let held = Layer {
            digest: digest(b"held"),
            diff_id: digest(b"held"),
            file: None,
        };
        let archive = Archive {
            image: "x".into(),
            config_digest: digest(b"{}"),
            config: b"{}".to_vec(),
            layers: vec![
                held,
                Layer {
                    digest: digest(&plain),
                    diff_id: digest(&plain),
                    file: Some(plain_path),
                },
                Layer {
                    digest: digest(&zstd),
                    diff_id: digest(&zstd_src),
                    file: Some(zstd_path),
                },
            ],
        };
        let (bytes, result) = collect(archive).await;
        result.unwrap();
        let mut members = std::collections::HashMap::new();
        for entry in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            members.insert(name, data);
        }
        assert_eq!(members.len(), 4, "{:?}", members.keys());
        assert_eq!(members[&layer_member_of(&plain)], plain);
        // zstd went in decompressed, as Docker 20.10 needs it.
        assert_eq!(members[&layer_member_of(&zstd)], zstd_src);
        let manifest: serde_json::Value =
            serde_json::from_slice(&members["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"], serde_json::json!([]));
        assert_eq!(manifest[0]["Layers"].as_array().unwrap().len(), 3);
        let config = manifest[0]["Config"].as_str().unwrap();
        assert_eq!(members[config], b"{}");
    }

    fn layer_member_of(blob: &[u8]) -> String {
        format!("{}.tar", hex_of(&digest(blob)))
    }

    #[tokio::test]
    async fn a_zstd_layer_with_the_wrong_diff_id_aborts_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let zstd = zstd::encode_all(&layer_tar("c", b"c")[..], 3).unwrap();
        let path = dir.path().join("z");
        std::fs::write(&path, &zstd).unwrap();
        let archive = Archive {
            image: "img".into(),
            config_digest: digest(b"{}"),
            config: b"{}".to_vec(),
            layers: vec![Layer {
                digest: digest(&zstd),
                diff_id: digest(b"something else"),
                file: Some(path),
            }],
        };
        let (mut body, producer) = archive.stream();
        let mut saw_error = false;
        while let Some(chunk) = body.next().await {
            saw_error |= chunk.is_err();
        }
        assert!(
            saw_error,
            "the body must end in an error, not look complete"
        );
        let err = producer.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err}");
    }
}
