//! Deterministic test data: generated container images and every archive form lade reads.
//!
//! This module owns
//! - building images ([`ImageFixture`]): layer tars from explicit [`Entry`] lists or from a
//!   seeded generator ([`random_layer`]), image configs, and the shared sample set
//!   ([`sample_images`]);
//! - writing those images as image archives ([`write_gcr_archive`], [`write_docker_save`],
//!   [`write_oci_layout`], [`write_docker25_save`], or [`ArchiveFormat::write`]), each reporting
//!   what it stored ([`WrittenArchive`]) so tests can assert against it;
//! - wrapping an image archive into a DaoCloud-style offline bundle ([`write_bundle`]) with a
//!   sample chart and hints.
//!
//! Everything is byte-for-byte reproducible: tar headers carry mtime 0, uid/gid 0 and fixed
//! modes, gzip headers carry no name and mtime 0, JSON is produced from `serde_json` values, and
//! members are written in an order fixed by the input. That lets tests compare digests across
//! runs and lets the benchmark regenerate the same data instead of storing it.
//!
//! Writers stream members straight to the given `out` (wrap a file in a `BufWriter`); beyond the
//! fixtures themselves they hold at most one compressed layer in memory at a time.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Timestamp written into every image config and history entry, so configs are reproducible.
pub const CREATED: &str = "2024-01-01T00:00:00Z";

/// `PATH` every generated image config declares (the usual Docker default).
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Name of sample image A (a registry-qualified name).
pub const APP_IMAGE: &str = "release.daocloud.io/demo/app:v1";
/// Name of sample image B.
pub const SIDECAR_IMAGE: &str = "release.daocloud.io/demo/sidecar:v1";
/// Name of sample image C: a bare Docker Hub short name, to exercise name normalisation.
pub const BUSYBOX_IMAGE: &str = "busybox";
/// Content of `/app/hello.txt` in [`APP_IMAGE`].
pub const APP_HELLO: &[u8] = b"hello from app v1\n";
/// Content of `/sidecar/conf.yaml` in [`SIDECAR_IMAGE`] (also reachable via the hardlink
/// `/sidecar/link-to-conf.yaml`).
pub const SIDECAR_CONF: &[u8] = b"listen: 0.0.0.0:9000\nupstream: app\n";

/// OCI media type of an image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI media type of an image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI media type of an image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

// ---------------------------------------------------------------------------------------------
// Digests

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// OCI digest string of `bytes`: `sha256:<hex>`.
pub fn blob_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Path of a blob in an OCI image layout: `blobs/sha256/<hex>`.
fn oci_blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest_hex(digest))
}

/// The hex part of a `sha256:<hex>` digest (the input unchanged if it has no algorithm prefix).
fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// ---------------------------------------------------------------------------------------------
// Layers and images

/// One member of a layer tar. Paths are relative (no leading `/`); parents are not implied, so
/// list the directories you want explicitly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory with the given permission bits (e.g. `0o755`, `0o1777`).
    Dir { path: String, mode: u32 },
    /// A regular file.
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A symbolic link; `target` is stored verbatim (relative or absolute).
    Symlink { path: String, target: String },
    /// A hard link; `target` is the archive path of an entry written *earlier* in the same tar.
    Hardlink { path: String, target: String },
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: &str, mode: u32) -> Self {
        Entry::Dir {
            path: path.into(),
            mode,
        }
    }
    /// A regular-file entry.
    pub fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        Entry::File {
            path: path.into(),
            mode,
            data: data.into(),
        }
    }
    /// A symlink entry.
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    /// A hardlink entry.
    pub fn hardlink(path: &str, target: &str) -> Self {
        Entry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

/// Builds an uncompressed layer tar holding `entries` in the given order (GNU headers, mtime 0,
/// uid/gid 0). The order is kept rather than sorted because a hardlink must follow its target;
/// list parents before children (the sample fixtures list entries sorted by path).
///
/// # Panics
/// If an entry path is invalid for a tar (absolute, contains `..`, empty).
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut tar = TarOut::new(Vec::new());
    for entry in entries {
        tar.entry(entry).expect("invalid layer entry");
    }
    tar.finish().expect("writing to a Vec cannot fail")
}

/// An OCI/Docker image config (JSON bytes) for a linux/amd64 image whose rootfs consists of
/// `diff_ids` (each `sha256:<hex>` of an uncompressed layer), running `cmd`.
pub fn image_config(diff_ids: &[String], cmd: &[&str]) -> Vec<u8> {
    image_config_for("amd64", diff_ids, cmd)
}

/// [`image_config`] for a linux image of CPU architecture `architecture` (`arm64`, …).
pub fn image_config_for(architecture: &str, diff_ids: &[String], cmd: &[&str]) -> Vec<u8> {
    let history: Vec<_> = (0..diff_ids.len())
        .map(|i| json!({"created": CREATED, "created_by": format!("lade-testkit layer {i}")}))
        .collect();
    let config = json!({
        "architecture": architecture,
        "os": "linux",
        "created": CREATED,
        "config": {"Env": [DEFAULT_PATH_ENV], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    serde_json::to_vec(&config).expect("a JSON value always serialises")
}

/// A generated image: a name, its uncompressed layers (bottom first) and its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFixture {
    /// Reference as a user would type it, e.g. `release.daocloud.io/demo/app:v1` or `busybox`.
    pub name: String,
    /// UNCOMPRESSED layer tars, bottom first. Writers compress them as asked.
    pub layers: Vec<Vec<u8>>,
    /// Image config JSON bytes; its `rootfs.diff_ids` must match `layers`.
    pub config: Vec<u8>,
}

impl ImageFixture {
    /// An image of `layers` with a config from [`image_config`] running `cmd`.
    pub fn new(name: &str, layers: Vec<Vec<u8>>, cmd: &[&str]) -> Self {
        let diff_ids: Vec<String> = layers.iter().map(|l| blob_digest(l)).collect();
        let config = image_config(&diff_ids, cmd);
        ImageFixture {
            name: name.into(),
            layers,
            config,
        }
    }

    /// `sha256:<hex>` of the config bytes, i.e. the image id.
    pub fn config_digest(&self) -> String {
        blob_digest(&self.config)
    }

    /// `sha256:<hex>` of each uncompressed layer, bottom first (hashes every layer: cache the
    /// result for big layers).
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| blob_digest(l)).collect()
    }

    /// The fully qualified reference a loader should register, see [`normalize_ref`].
    pub fn reference(&self) -> String {
        normalize_ref(&self.name)
    }
}

/// Entries of the base layer shared by all sample images, around the given busybox binary.
fn base_entries(busybox: Vec<u8>) -> Vec<Entry> {
    vec![
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", 0o755, busybox),
        Entry::symlink("bin/echo", "busybox"),
        Entry::symlink("bin/sh", "busybox"),
        Entry::dir("etc", 0o755),
        Entry::file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::dir("tmp", 0o1777),
    ]
}

/// The three sample images, sharing one base layer built around the static busybox binary at
/// `busybox` (so containers started from them can actually run `/bin/sh`):
/// [`APP_IMAGE`] (base + `app/hello.txt`), [`SIDECAR_IMAGE`] (base + `sidecar/conf.yaml` and a
/// hardlink to it) and [`BUSYBOX_IMAGE`] (base only). All run `["/bin/sh"]`.
pub fn sample_images(busybox: &Path) -> Result<Vec<ImageFixture>> {
    let binary = std::fs::read(busybox)
        .with_context(|| format!("reading busybox binary {}", busybox.display()))?;
    Ok(sample_images_from_bytes(binary))
}

/// [`sample_images`] with the busybox binary given as bytes (any bytes will do for tests that
/// never run a container).
pub fn sample_images_from_bytes(busybox: Vec<u8>) -> Vec<ImageFixture> {
    let base = layer_tar(&base_entries(busybox));
    let app = layer_tar(&[
        Entry::dir("app", 0o755),
        Entry::file("app/hello.txt", 0o644, APP_HELLO),
    ]);
    let sidecar = layer_tar(&[
        Entry::dir("sidecar", 0o755),
        Entry::file("sidecar/conf.yaml", 0o644, SIDECAR_CONF),
        Entry::hardlink("sidecar/link-to-conf.yaml", "sidecar/conf.yaml"),
    ]);
    let cmd = ["/bin/sh"];
    vec![
        ImageFixture::new(APP_IMAGE, vec![base.clone(), app], &cmd),
        ImageFixture::new(SIDECAR_IMAGE, vec![base.clone(), sidecar], &cmd),
        ImageFixture::new(BUSYBOX_IMAGE, vec![base], &cmd),
    ]
}

/// splitmix64: tiny, fast and good enough to make incompressible bytes reproducibly.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Log-like text from a small vocabulary: compresses several-fold, like real config and
    /// script files do, without being trivially repetitive.
    fn text(&mut self, len: usize, out: &mut Vec<u8>) {
        const WORDS: [&str; 32] = [
            "container",
            "image",
            "layer",
            "node",
            "load",
            "digest",
            "manifest",
            "config",
            "snapshot",
            "content",
            "registry",
            "release",
            "daocloud",
            "bundle",
            "archive",
            "stream",
            "offline",
            "cluster",
            "kubelet",
            "runtime",
            "pull",
            "push",
            "tag",
            "blob",
            "index",
            "gzip",
            "zstd",
            "tar",
            "sha256",
            "error",
            "info",
            "debug",
        ];
        let end = out.len() + len;
        while out.len() < end {
            let r = self.next_u64();
            out.extend_from_slice(WORDS[(r % 32) as usize].as_bytes());
            // Roughly one line per dozen words.
            let sep = if (r >> 8).is_multiple_of(12) {
                b'\n'
            } else {
                b' '
            };
            out.push(sep);
        }
        out.truncate(end);
    }
}

/// Size of each file in [`random_layer`]: big enough that tar headers are noise, small enough
/// that generating one file at a time stays cheap.
const RANDOM_FILE_SIZE: usize = 1 << 20;

/// A layer tar under `data/` whose files total `size` bytes (plus tar overhead), generated from
/// `seed`. In every file the first `compressible_fraction` (clamped to 0..=1) is text-like and
/// the rest pseudo-random, so the layer compresses roughly in proportion. Meant for benchmarks:
/// different seeds give different layers, the same seed the same bytes.
pub fn random_layer(seed: u64, size: usize, compressible_fraction: f64) -> Vec<u8> {
    let fraction = compressible_fraction.clamp(0.0, 1.0);
    let mut rng = SplitMix64(seed);
    let mut tar = TarOut::new(Vec::with_capacity(size + size / 512 + 4096));
    let mut data = Vec::with_capacity(size.min(RANDOM_FILE_SIZE));
    let result = (|| {
        tar.dir("data", 0o755)?;
        let mut remaining = size;
        let mut index = 0;
        while remaining > 0 {
            let len = remaining.min(RANDOM_FILE_SIZE);
            let text_len = ((len as f64) * fraction).round() as usize;
            data.clear();
            rng.text(text_len, &mut data);
            data.resize(len, 0);
            rng.fill(&mut data[text_len..]);
            tar.file(&format!("data/file-{index:06}.bin"), 0o644, &data)?;
            remaining -= len;
            index += 1;
        }
        tar.finish()
    })();
    result.expect("writing to a Vec cannot fail")
}

/// Like [`random_layer`], but the bytes spread over files the way a real image spreads
/// them: sizes drawn log-uniformly between 256 B and 256 KiB (most files small, most bytes in
/// the larger ones, about 38 KiB on average), 64 files to a directory.
pub fn random_tree_layer(seed: u64, size: usize, compressible_fraction: f64) -> Vec<u8> {
    const SMALLEST: f64 = 256.0;
    const LARGEST: f64 = (256 << 10) as f64;
    let fraction = compressible_fraction.clamp(0.0, 1.0);
    let mut rng = SplitMix64(seed);
    let mut tar = TarOut::new(Vec::with_capacity(size + size / 64 + 4096));
    let mut data = Vec::new();
    let result = (|| {
        let mut remaining = size;
        let mut index = 0;
        while remaining > 0 {
            if index % 64 == 0 {
                tar.dir(&format!("tree/d{:05}", index / 64), 0o755)?;
            }
            let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let drawn = (SMALLEST * (LARGEST / SMALLEST).powf(unit)) as usize;
            let len = remaining.min(drawn.max(1));
            let text_len = ((len as f64) * fraction).round() as usize;
            data.clear();
            rng.text(text_len, &mut data);
            data.resize(len, 0);
            rng.fill(&mut data[text_len..]);
            let path = format!("tree/d{:05}/f{index:07}", index / 64);
            tar.file(&path, 0o644, &data)?;
            remaining -= len;
            index += 1;
        }
        tar.finish()
    })();
    result.expect("writing to a Vec cannot fail")
}

// ---------------------------------------------------------------------------------------------
// Compression

/// How layer blobs are stored inside an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (level 6, no file name, mtime 0).
    Gzip,
    /// zstd (level 3).
    Zstd,
}

impl Compression {
    /// Every variant, for table-driven tests.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

    /// OCI media type of a layer stored with this compression.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// `data` compressed as asked (a copy for [`Compression::None`]). Deterministic.
pub fn compress(data: &[u8], c: Compression) -> Vec<u8> {
    compress_cow(data, c).into_owned()
}

/// Like [`compress`] but borrows for [`Compression::None`], so big plain layers aren't copied.
fn compress_cow(data: &[u8], c: Compression) -> Cow<'_, [u8]> {
    match c {
        Compression::None => Cow::Borrowed(data),
        Compression::Gzip => {
            // GzBuilder::new() leaves name/comment unset and mtime 0; pin the OS byte too so
            // output doesn't depend on flate2's default.
            let mut enc = flate2::GzBuilder::new()
                .operating_system(255)
                .write(Vec::new(), flate2::Compression::new(6));
            enc.write_all(data).expect("writing to a Vec cannot fail");
            Cow::Owned(enc.finish().expect("writing to a Vec cannot fail"))
        }
        Compression::Zstd => {
            Cow::Owned(zstd::stream::encode_all(data, 3).expect("writing to a Vec cannot fail"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// References

/// Splits a reference into (repository, tag), the tag defaulting to `latest`. Digest references
/// (`name@sha256:...`) are not supported: fixtures are always named by tag.
pub fn split_ref(name: &str) -> (&str, &str) {
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
        None => (name, "latest"),
    }
}

/// Minimal Docker reference normalisation: a first path component without `.` or `:` (and not
/// `localhost`) is not a registry, so `docker.io/` is prefixed, plus `library/` for a
/// single-component Docker Hub name; `:latest` is appended when there is no tag.
/// `busybox` -> `docker.io/library/busybox:latest`.
pub fn normalize_ref(name: &str) -> String {
    let (repo, tag) = split_ref(name);
    let (domain, path) = match repo.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => ("docker.io", repo),
    };
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    format!("{domain}/{path}:{tag}")
}

/// The name with an explicit tag, as `docker save` records it in `RepoTags` (`busybox:latest`).
fn familiar_tagged(name: &str) -> String {
    let (repo, tag) = split_ref(name);
    format!("{repo}:{tag}")
}

// ---------------------------------------------------------------------------------------------
// Tar output shared by layers, archives and bundles

/// A tar being written to `W`, with the fixed header fields every member of every generated tar
/// shares (GNU format, mtime 0, uid/gid 0, no user names).
struct TarOut<W: Write> {
    builder: tar::Builder<W>,
}

/// A GNU tar header of an entry of `kind`, `mode` and `size` bytes, owned by root, mtime 0
/// (deterministic); name, link and checksum are the caller's.
pub fn gnu_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

impl<W: Write> TarOut<W> {
    fn new(out: W) -> Self {
        TarOut {
            builder: tar::Builder::new(out),
        }
    }

    /// A regular file of `size` bytes read from `data`; the tar crate copies it through in
    /// blocks, so big members (an inner images.tar) stream.
    fn file_from(&mut self, path: &str, mode: u32, size: u64, data: impl Read) -> io::Result<()> {
        let mut h = gnu_header(tar::EntryType::Regular, mode, size);
        self.builder.append_data(&mut h, path, data)
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.file_from(path, mode, data.len() as u64, data)
    }

    /// Starts an OCI image layout: `oci-layout` and the `blobs/`, `blobs/sha256/` dirs.
    fn oci_layout(out: W) -> io::Result<Self> {
        let mut tar = TarOut::new(out);
        tar.json("oci-layout", &json!({"imageLayoutVersion": "1.0.0"}))?;
        tar.dir("blobs", 0o755)?;
        tar.dir("blobs/sha256", 0o755)?;
        Ok(tar)
    }

    /// Stores the layers of `image` (whose diff IDs are `diff_ids`) that `layers` has not
    /// stored yet under `blobs/sha256/`; returns the bytes of an OCI manifest of them around
    /// `config` (not written) and the layers' descriptors.
    fn oci_manifest(
        &mut self,
        layers: &mut LayerBlobs,
        image: &ImageFixture,
        diff_ids: &[String],
        config: &[u8],
    ) -> io::Result<(Vec<u8>, Vec<Descriptor>)> {
        let mut descs = Vec::new();
        for (layer, diff_id) in image.layers.iter().zip(diff_ids) {
            let (desc, _) = layers.get_or_store(diff_id, layer, |blob, d| {
                self.file(&oci_blob_path(&d.digest), 0o644, blob)
            })?;
            descs.push(desc);
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": Descriptor::of(MEDIA_TYPE_OCI_CONFIG, config),
            "layers": descs,
        }))?;
        Ok((manifest, descs))
    }

    /// An archive metadata file (`manifest.json`, `index.json`, ...), mode 0644.
    fn json(&mut self, path: &str, value: &serde_json::Value) -> io::Result<()> {
        self.file(path, 0o644, &serde_json::to_vec(value)?)
    }

    /// A directory member, named with a trailing `/` as `tar`/`docker save` write them.
    fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let mut h = gnu_header(tar::EntryType::Directory, mode, 0);
        let named = format!("{}/", path.trim_end_matches('/'));
        // Header::set_path drops the trailing slash, so write the name field directly when it
        // fits; longer names go through the tar crate's GNU long-name support without it.
        if named.len() < h.as_old().name.len() && !named.starts_with('/') {
            h.as_old_mut().name[..named.len()].copy_from_slice(named.as_bytes());
            h.set_cksum();
            self.builder.append(&h, io::empty())
        } else {
            self.builder.append_data(&mut h, path, io::empty())
        }
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mut h = gnu_header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut h, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mut h = gnu_header(tar::EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut h, path, target)
    }

    fn entry(&mut self, entry: &Entry) -> io::Result<()> {
        match entry {
            Entry::Dir { path, mode } => self.dir(path, *mode),
            Entry::File { path, mode, data } => self.file(path, *mode, data),
            Entry::Symlink { path, target } => self.symlink(path, target),
            Entry::Hardlink { path, target } => self.hardlink(path, target),
        }
    }

    /// Writes the end-of-archive blocks and hands back the writer.
    fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}

// ---------------------------------------------------------------------------------------------
// Image archives

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Descriptor {
    /// OCI media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>` of the stored bytes.
    pub digest: String,
    /// Length of the stored bytes.
    pub size: u64,
}

impl Descriptor {
    fn of(media_type: &str, bytes: &[u8]) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest: blob_digest(bytes),
            size: bytes.len() as u64,
        }
    }
}

/// What a writer stored for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenImage {
    /// Fully qualified reference a loader should register ([`normalize_ref`] of the name).
    pub reference: String,
    /// `sha256:<hex>` of the config, i.e. the image id.
    pub config_digest: String,
    /// `sha256:<hex>` of the image's OCI manifest blob, for the formats that store one
    /// ([`write_oci_layout`], [`write_docker25_save`]); `None` otherwise.
    pub manifest_digest: Option<String>,
    /// `sha256:<hex>` of each uncompressed layer, bottom first.
    pub diff_ids: Vec<String>,
    /// The layer blobs as stored (compressed as asked), bottom first. A layer shared between
    /// images has the same descriptor in each.
    pub layers: Vec<Descriptor>,
}

impl WrittenImage {
    /// What a format that stores no manifest (`docker save`, go-containerregistry's
    /// tarball) wrote for `image`.
    fn unmanifested(
        image: &ImageFixture,
        config_digest: String,
        diff_ids: Vec<String>,
        layers: Vec<Descriptor>,
    ) -> WrittenImage {
        WrittenImage {
            reference: image.reference(),
            config_digest,
            manifest_digest: None,
            diff_ids,
            layers,
        }
    }
}

/// What a writer stored, one [`WrittenImage`] per input image in input order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenArchive {
    /// Per input image, same order as the input.
    pub images: Vec<WrittenImage>,
}

impl WrittenArchive {
    /// Distinct layer blobs across all images, in first-use order (each is stored once).
    pub fn unique_layers(&self) -> Vec<&Descriptor> {
        let mut seen = HashSet::new();
        self.images
            .iter()
            .flat_map(|i| &i.layers)
            .filter(|d| seen.insert(&d.digest))
            .collect()
    }
}

/// Layer blobs already stored in one archive, keyed by diff_id, so a layer shared between images
/// is compressed and stored once.
struct LayerBlobs {
    compression: Compression,
    stored: HashMap<String, Descriptor>,
}

impl LayerBlobs {
    fn new(compression: Compression) -> Self {
        LayerBlobs {
            compression,
            stored: HashMap::new(),
        }
    }

    /// The stored descriptor of `layer`; the first time a diff_id is seen, compresses the layer
    /// and calls `store` with the blob bytes and descriptor so the writer can add the member.
    /// Returns whether `store` was called.
    fn get_or_store(
        &mut self,
        diff_id: &str,
        layer: &[u8],
        store: impl FnOnce(&[u8], &Descriptor) -> io::Result<()>,
    ) -> io::Result<(Descriptor, bool)> {
        if let Some(d) = self.stored.get(diff_id) {
            return Ok((d.clone(), false));
        }
        let blob = compress_cow(layer, self.compression);
        let desc = Descriptor::of(self.compression.layer_media_type(), &blob);
        store(&blob, &desc)?;
        self.stored.insert(diff_id.to_string(), desc.clone());
        Ok((desc, true))
    }
}

/// Writes each distinct config once via `store`, keyed by digest.
fn store_config_once(
    seen: &mut HashSet<String>,
    image: &ImageFixture,
    store: impl FnOnce(&str) -> io::Result<()>,
) -> io::Result<String> {
    let digest = image.config_digest();
    if seen.insert(digest.clone()) {
        store(&digest)?;
    }
    Ok(digest)
}

/// The archive forms lade reads, for table-driven tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArchiveFormat {
    /// go-containerregistry `tarball.MultiWrite` (crane / DaoCloud bundles), see
    /// [`write_gcr_archive`].
    Gcr,
    /// Classic `docker save` (Docker < 25), see [`write_docker_save`].
    DockerSave,
    /// OCI image layout, see [`write_oci_layout`].
    Oci,
    /// `docker save` of Docker 25+ (OCI layout plus legacy files), see [`write_docker25_save`].
    Docker25,
}

impl ArchiveFormat {
    /// Every variant.
    pub const ALL: [ArchiveFormat; 4] = [
        ArchiveFormat::Gcr,
        ArchiveFormat::DockerSave,
        ArchiveFormat::Oci,
        ArchiveFormat::Docker25,
    ];

    /// Writes `images` in this format, see the individual writers.
    pub fn write(
        self,
        images: &[ImageFixture],
        compression: Compression,
        out: &mut impl Write,
    ) -> Result<WrittenArchive> {
        match self {
            ArchiveFormat::Gcr => write_gcr_archive(images, compression, out),
            ArchiveFormat::DockerSave => write_docker_save(images, compression, out),
            ArchiveFormat::Oci => write_oci_layout(images, compression, out),
            ArchiveFormat::Docker25 => write_docker25_save(images, compression, out),
        }
    }
}

/// Writes `images` as go-containerregistry's `tarball.MultiWrite` does (the layout of DaoCloud
/// bundles' `images.tar`): per image the config as member `sha256:<hex>` and each layer blob as
/// `<blob hex>.tar.gz` (named `.tar.gz` whatever `compression` is, as ggcr does, so readers must
/// sniff the magic bytes), shared layers and configs once; then `manifest.json` as the LAST
/// member, `RepoTags` holding the names exactly as given. No `repositories` file.
pub fn write_gcr_archive(
    images: &[ImageFixture],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenArchive> {
    let mut tar = TarOut::new(out);
    let mut configs = HashSet::new();
    let mut layers = LayerBlobs::new(compression);
    let mut written = WrittenArchive::default();
    let mut manifest = Vec::new();
    for image in images {
        let config_digest =
            store_config_once(&mut configs, image, |d| tar.file(d, 0o644, &image.config))?;
        let diff_ids = image.diff_ids();
        let mut descs = Vec::new();
        for (layer, diff_id) in image.layers.iter().zip(&diff_ids) {
            let (desc, _) = layers.get_or_store(diff_id, layer, |blob, d| {
                tar.file(&format!("{}.tar.gz", digest_hex(&d.digest)), 0o644, blob)
            })?;
            descs.push(desc);
        }
        let members: Vec<String> = descs
            .iter()
            .map(|d| format!("{}.tar.gz", digest_hex(&d.digest)))
            .collect();
        manifest
            .push(json!({"Config": config_digest, "RepoTags": [image.name], "Layers": members}));
        written.images.push(WrittenImage::unmanifested(
            image,
            config_digest,
            diff_ids,
            descs,
        ));
    }
    tar.json("manifest.json", &json!(manifest))?;
    tar.finish()?;
    Ok(written)
}

/// Writes `images` as classic `docker save` (Docker < 25) does: `manifest.json` and
/// `repositories` FIRST, then per image `<config hex>.json` and per layer a directory `<id>/`
/// with `VERSION`, a legacy `json` and `layer.tar`. Layer ids are derived from the image's
/// config digest and the layer's position, so images sharing a layer get distinct ids and, as
/// Docker does, every occurrence after the first is a symlink `<id>/layer.tar ->
/// ../<first id>/layer.tar`. `layer.tar` is compressed as asked: real Docker always writes
/// [`Compression::None`], but `docker load` accepts compressed ones too. `RepoTags` carry an
/// explicit tag (`busybox:latest`) as Docker writes them.
pub fn write_docker_save(
    images: &[ImageFixture],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenArchive> {
    // Ids depend only on configs and diff_ids, so the metadata can be written before any blob.
    let plans: Vec<(String, Vec<String>, Vec<String>)> = images
        .iter()
        .map(|image| {
            let config_digest = image.config_digest();
            let diff_ids = image.diff_ids();
            let mut parent = String::new();
            let ids = diff_ids
                .iter()
                .map(|diff_id| {
                    parent = sha256_hex(format!("{config_digest}\n{parent}\n{diff_id}").as_bytes());
                    parent.clone()
                })
                .collect();
            (config_digest, diff_ids, ids)
        })
        .collect();

    let mut tar = TarOut::new(out);
    let mut manifest = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (image, (config_digest, _, ids)) in images.iter().zip(&plans) {
        let layers: Vec<String> = ids.iter().map(|id| format!("{id}/layer.tar")).collect();
        manifest.push(json!({
            "Config": format!("{}.json", digest_hex(config_digest)),
            "RepoTags": [familiar_tagged(&image.name)],
            "Layers": layers,
        }));
        let (repo, tag) = split_ref(&image.name);
        let top = ids.last().cloned().unwrap_or_default();
        repositories
            .entry(repo.into())
            .or_default()
            .insert(tag.into(), top);
    }
    tar.json("manifest.json", &json!(manifest))?;
    tar.json("repositories", &json!(repositories))?;

    let mut configs = HashSet::new();
    let mut layers = LayerBlobs::new(compression);
    let mut first_path: HashMap<String, String> = HashMap::new();
    let mut written_ids = HashSet::new();
    let mut written = WrittenArchive::default();
    for (image, (config_digest, diff_ids, ids)) in images.iter().zip(plans) {
        store_config_once(&mut configs, image, |d| {
            tar.file(&format!("{}.json", digest_hex(d)), 0o644, &image.config)
        })?;
        let mut descs = Vec::new();
        let mut parent: Option<&str> = None;
        for ((layer, diff_id), id) in image.layers.iter().zip(&diff_ids).zip(&ids) {
            let path = format!("{id}/layer.tar");
            // The same image listed twice has the same ids: its directories exist already.
            let new_dir = written_ids.insert(id.clone());
            if new_dir {
                tar.dir(id, 0o755)?;
                tar.file(&format!("{id}/VERSION"), 0o644, b"1.0")?;
                let mut legacy = json!({"id": id, "created": CREATED});
                if let Some(p) = parent {
                    legacy["parent"] = json!(p);
                }
                tar.json(&format!("{id}/json"), &legacy)?;
            }
            let (desc, stored) =
                layers.get_or_store(diff_id, layer, |blob, _| tar.file(&path, 0o644, blob))?;
            if stored {
                first_path.insert(diff_id.clone(), id.clone());
            } else if new_dir {
                tar.symlink(&path, &format!("../{}/layer.tar", first_path[diff_id]))?;
            }
            descs.push(desc);
            parent = Some(id);
        }
        written.images.push(WrittenImage::unmanifested(
            image,
            config_digest,
            diff_ids,
            descs,
        ));
    }
    tar.finish()?;
    Ok(written)
}

/// Writes `images` as an OCI image layout: `oci-layout`, the `blobs/` and `blobs/sha256/`
/// directories, every layer (compressed as asked, with the matching OCI media type), config and
/// OCI manifest under `blobs/sha256/<hex>` (each distinct blob once), and `index.json` last with
/// one manifest descriptor per image annotated with `io.containerd.image.name` (the
/// [`normalize_ref`] name) and `org.opencontainers.image.ref.name` (the tag).
pub fn write_oci_layout(
    images: &[ImageFixture],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenArchive> {
    write_oci(images, compression, false, out)
}

/// Writes `images` as `docker save` of Docker 25+ does: the OCI layout of [`write_oci_layout`]
/// plus Docker's legacy `manifest.json` (`Config`/`Layers` as `blobs/sha256/<hex>` paths,
/// `RepoTags` with explicit tags) and `repositories` (tag -> hex of the top layer blob).
/// Real Docker stores layers uncompressed; other compressions are allowed for reader tests.
pub fn write_docker25_save(
    images: &[ImageFixture],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenArchive> {
    write_oci(images, compression, true, out)
}

fn write_oci(
    images: &[ImageFixture],
    compression: Compression,
    docker25: bool,
    out: &mut impl Write,
) -> Result<WrittenArchive> {
    let blob_path = oci_blob_path;
    let mut tar = TarOut::oci_layout(out)?;

    let mut configs = HashSet::new();
    let mut manifests = HashSet::new();
    let mut layers = LayerBlobs::new(compression);
    let mut written = WrittenArchive::default();
    let mut index = Vec::new();
    let mut docker_manifest = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for image in images {
        let config_digest = store_config_once(&mut configs, image, |d| {
            tar.file(&blob_path(d), 0o644, &image.config)
        })?;
        let diff_ids = image.diff_ids();
        let (manifest, descs) = tar.oci_manifest(&mut layers, image, &diff_ids, &image.config)?;
        let manifest_desc = Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, &manifest);
        if manifests.insert(manifest_desc.digest.clone()) {
            tar.file(&blob_path(&manifest_desc.digest), 0o644, &manifest)?;
        }

        let reference = image.reference();
        let (repo, tag) = split_ref(&image.name);
        let mut entry = json!(manifest_desc);
        entry["annotations"] = json!({
            "io.containerd.image.name": reference,
            "org.opencontainers.image.ref.name": tag,
        });
        index.push(entry);
        if docker25 {
            let layer_paths: Vec<String> = descs.iter().map(|d| blob_path(&d.digest)).collect();
            docker_manifest.push(json!({
                "Config": blob_path(&config_digest),
                "RepoTags": [familiar_tagged(&image.name)],
                "Layers": layer_paths,
            }));
            let top = descs
                .last()
                .map(|d| digest_hex(&d.digest).to_string())
                .unwrap_or_default();
            repositories
                .entry(repo.into())
                .or_default()
                .insert(tag.into(), top);
        }
        written.images.push(WrittenImage {
            reference,
            config_digest,
            manifest_digest: Some(manifest_desc.digest),
            diff_ids,
            layers: descs,
        });
    }
    tar.json(
        "index.json",
        &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": index}),
    )?;
    if docker25 {
        tar.json("manifest.json", &json!(docker_manifest))?;
        tar.json("repositories", &json!(repositories))?;
    }
    tar.finish()?;
    Ok(written)
}

/// What [`write_oci_multiplatform`] stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenIndex {
    /// `sha256:<hex>` of the image index `index.json` points at.
    pub index_digest: String,
    /// Per platform, in input order: (architecture, manifest digest).
    pub manifests: Vec<(String, String)>,
}

/// Writes one multi-platform image `name` as an OCI image layout: `index.json` lists a single
/// OCI image index (annotated with the [`normalize_ref`] name, as containerd exports one),
/// which lists one manifest per `(architecture, image)` of `platforms` with its `linux/<arch>`
/// platform. Each image's config is rewritten for its architecture; layers shared between
/// platforms are stored once.
pub fn write_oci_multiplatform(
    name: &str,
    platforms: &[(&str, ImageFixture)],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenIndex> {
    write_oci_partial_multiplatform(name, platforms, &[], compression, out)
}

/// As [`write_oci_multiplatform`], but the index also lists a manifest for each architecture
/// of `listed_only` whose blobs the archive does not carry, as `ctr export` writes an image
/// pulled for one platform.
pub fn write_oci_partial_multiplatform(
    name: &str,
    platforms: &[(&str, ImageFixture)],
    listed_only: &[&str],
    compression: Compression,
    out: &mut impl Write,
) -> Result<WrittenIndex> {
    let blob_path = oci_blob_path;
    let mut tar = TarOut::oci_layout(out)?;
    let mut layers = LayerBlobs::new(compression);
    let mut entries = Vec::new();
    let mut manifests = Vec::new();
    for (architecture, image) in platforms {
        let diff_ids = image.diff_ids();
        let config = image_config_for(architecture, &diff_ids, &["/bin/sh"]);
        tar.file(&blob_path(&blob_digest(&config)), 0o644, &config)?;
        let (manifest, _) = tar.oci_manifest(&mut layers, image, &diff_ids, &config)?;
        let desc = Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, &manifest);
        tar.file(&blob_path(&desc.digest), 0o644, &manifest)?;
        let mut entry = json!(desc);
        entry["platform"] = json!({"os": "linux", "architecture": architecture});
        entries.push(entry);
        manifests.push((architecture.to_string(), desc.digest));
    }
    for architecture in listed_only {
        // A manifest's descriptor only: its bytes (and so its blobs) are not in the archive.
        let absent = format!("{{\"absent\":\"{architecture}\"}}");
        let mut entry = json!(Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, absent.as_bytes()));
        entry["platform"] = json!({"os": "linux", "architecture": architecture});
        entries.push(entry);
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}),
    )?;
    let index_desc = Descriptor::of(MEDIA_TYPE_OCI_INDEX, &index);
    tar.file(&blob_path(&index_desc.digest), 0o644, &index)?;
    let (_, tag) = split_ref(name);
    let mut top = json!(index_desc);
    top["annotations"] = json!({
        "io.containerd.image.name": normalize_ref(name),
        "org.opencontainers.image.ref.name": tag,
    });
    tar.json(
        "index.json",
        &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [top]}),
    )?;
    tar.finish()?;
    Ok(WrittenIndex {
        index_digest: index_desc.digest,
        manifests,
    })
}

// ---------------------------------------------------------------------------------------------
// Bundles

/// Writes a DaoCloud-style offline bundle (an uncompressed tar) around the image archive at
/// `images_tar`, streaming it: see [`write_bundle_from_reader`].
pub fn write_bundle(
    images_tar: &Path,
    hints: &str,
    chart: &[(String, Vec<u8>)],
    out: &mut impl Write,
) -> Result<()> {
    let file = std::fs::File::open(images_tar)
        .with_context(|| format!("opening {}", images_tar.display()))?;
    let len = file.metadata()?.len();
    write_bundle_from_reader(io::BufReader::new(file), len, hints, chart, out)
}

/// Writes a DaoCloud-style offline bundle: `hints.yaml`, then the image archive as the single
/// member `images.tar` (`len` bytes read from `images_tar`), then `original-chart/` and each
/// chart file as `original-chart/<path>` (`chart` paths are relative to the chart directory,
/// as [`sample_chart`] returns them). `images.tar` sits in the middle on purpose, so readers
/// can't rely on member order.
pub fn write_bundle_from_reader(
    images_tar: impl Read,
    len: u64,
    hints: &str,
    chart: &[(String, Vec<u8>)],
    out: &mut impl Write,
) -> Result<()> {
    let mut tar = TarOut::new(out);
    tar.file("hints.yaml", 0o644, hints.as_bytes())?;
    tar.file_from("images.tar", 0o644, len, images_tar)?;
    tar.dir("original-chart", 0o755)?;
    for (path, data) in chart {
        tar.file(&format!("original-chart/{path}"), 0o644, data)?;
    }
    tar.finish()?;
    Ok(())
}

/// A minimal Helm chart `demo` 0.1.0 referencing [`APP_IMAGE`] and [`SIDECAR_IMAGE`] through
/// values (`app.image.*` and `sidecar-agent.image.*`: the dash mimics a subchart key), as
/// (path relative to the chart directory, content) pairs.
pub fn sample_chart() -> Vec<(String, Vec<u8>)> {
    let chart = "apiVersion: v2\nname: demo\nversion: 0.1.0\nappVersion: v1\n";
    let values = "\
global:
  imageRegistry: release.daocloud.io
app:
  image:
    registry: release.daocloud.io
    repository: demo/app
    tag: v1
sidecar-agent:
  image:
    registry: release.daocloud.io
    repository: demo/sidecar
    tag: v1
";
    vec![
        ("Chart.yaml".into(), chart.into()),
        ("values.yaml".into(), values.into()),
    ]
}

/// `hints.yaml` for [`sample_chart`]: a YAML list of image templates over the chart values,
/// one per image (`sidecar-agent` written with the dash as-is).
pub fn sample_hints() -> String {
    ["app", "sidecar-agent"]
        .iter()
        .map(|key| {
            format!("- \"{{{{ .{key}.image.registry }}}}/{{{{ .{key}.image.repository }}}}:{{{{ .{key}.image.tag }}}}\"\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, entry type, link target, data) of every member of a tar.
    type Member = (String, tar::EntryType, Option<String>, Vec<u8>);

    fn members(tar_bytes: &[u8]) -> Vec<Member> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, kind, link, data)
            })
            .collect()
    }

    fn member<'a>(ms: &'a [Member], path: &str) -> &'a Member {
        ms.iter()
            .find(|m| m.0 == path)
            .unwrap_or_else(|| panic!("no member {path}"))
    }

    fn json_of(ms: &[Member], path: &str) -> serde_json::Value {
        serde_json::from_slice(&member(ms, path).3).unwrap()
    }

    fn decompress(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if blob.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            out = zstd::stream::decode_all(blob).unwrap();
        } else {
            out = blob.to_vec();
        }
        out
    }

    fn images() -> Vec<ImageFixture> {
        sample_images_from_bytes(b"not really busybox".to_vec())
    }

    fn write(format: ArchiveFormat, c: Compression) -> (Vec<u8>, WrittenArchive) {
        let mut out = Vec::new();
        let written = format.write(&images(), c, &mut out).unwrap();
        (out, written)
    }

    #[test]
    fn sample_images_share_the_base_layer() {
        let images = sample_images(Path::new("/bin/busybox")).unwrap();
        assert_eq!(images.len(), 3);
        let names: Vec<_> = images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, [APP_IMAGE, SIDECAR_IMAGE, BUSYBOX_IMAGE]);
        let base = images[0].diff_ids()[0].clone();
        for image in &images {
            assert_eq!(image.diff_ids()[0], base);
            let config: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
            assert_eq!(config["rootfs"]["diff_ids"], json!(image.diff_ids()));
            assert_eq!(config["config"]["Cmd"], json!(["/bin/sh"]));
            assert_eq!(
                config["history"].as_array().unwrap().len(),
                image.layers.len()
            );
        }
        let distinct: HashSet<_> = images.iter().map(|i| i.config_digest()).collect();
        assert_eq!(distinct.len(), 3);

        let ms = members(&images[0].layers[0]);
        let busybox = member(&ms, "bin/busybox");
        assert_eq!(busybox.3, std::fs::read("/bin/busybox").unwrap());
        let sh = member(&ms, "bin/sh");
        assert_eq!(
            (sh.1, sh.2.as_deref()),
            (tar::EntryType::Symlink, Some("busybox"))
        );
        let mut archive = tar::Archive::new(&images[0].layers[0][..]);
        let tmp = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .last()
            .unwrap();
        assert_eq!(tmp.header().mode().unwrap(), 0o1777);
        assert!(tmp.header().entry_type().is_dir());
        assert_eq!(&tmp.header().as_old().name[..4], b"tmp/");

        let ms = members(&images[0].layers[1]);
        assert_eq!(member(&ms, "app/hello.txt").3, APP_HELLO);
        let ms = members(&images[1].layers[1]);
        let link = member(&ms, "sidecar/link-to-conf.yaml");
        assert_eq!(
            (link.1, link.2.as_deref()),
            (tar::EntryType::Link, Some("sidecar/conf.yaml"))
        );
    }

    #[test]
    fn compress_writes_expected_magic_and_round_trips() {
        let data = random_layer(7, 100_000, 0.5);
        let gz = compress(&data, Compression::Gzip);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        // No FNAME flag, mtime 0: nothing about the run leaks into the header.
        assert_eq!(gz[3], 0);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        let zst = compress(&data, Compression::Zstd);
        assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(compress(&data, Compression::None), data);
        assert_eq!(decompress(&gz), data);
        assert_eq!(decompress(&zst), data);
    }

    #[test]
    fn random_layer_is_deterministic_and_sized() {
        let a = random_layer(1, 3 * RANDOM_FILE_SIZE + 123, 0.3);
        assert_eq!(a, random_layer(1, 3 * RANDOM_FILE_SIZE + 123, 0.3));
        assert_ne!(a, random_layer(2, 3 * RANDOM_FILE_SIZE + 123, 0.3));
        let ms = members(&a);
        assert_eq!(ms.len(), 5);
        let total: usize = ms.iter().map(|m| m.3.len()).sum();
        assert_eq!(total, 3 * RANDOM_FILE_SIZE + 123);
        // The compressible fraction shows in the compression ratio.
        let text = random_layer(3, 1 << 20, 1.0);
        let noise = random_layer(3, 1 << 20, 0.0);
        assert!(compress(&text, Compression::Gzip).len() < text.len() / 2);
        assert!(compress(&noise, Compression::Gzip).len() > noise.len() * 99 / 100);
    }

    #[test]
    fn tree_layers_are_deterministic_sized_and_mostly_small_files() {
        let size = 8 << 20;
        let a = random_tree_layer(1, size, 0.5);
        assert_eq!(a, random_tree_layer(1, size, 0.5));
        assert_ne!(a, random_tree_layer(2, size, 0.5));
        let ms = members(&a);
        let files: Vec<usize> = ms
            .iter()
            .filter(|m| m.0.contains("/f"))
            .map(|m| m.3.len())
            .collect();
        assert_eq!(files.iter().sum::<usize>(), size);
        assert!(files.iter().all(|&n| n <= 256 << 10));
        // Log-uniform: the median file is a few KiB, the mean tens of KiB.
        let mut sorted = files.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!((2 << 10..=16 << 10).contains(&median), "median {median}");
        assert!(files.len() > 100, "{} files", files.len());
    }

    #[test]
    fn writers_are_deterministic() {
        for format in ArchiveFormat::ALL {
            for c in Compression::ALL {
                assert_eq!(write(format, c).0, write(format, c).0, "{format:?} {c:?}");
            }
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        for out in [&mut a, &mut b] {
            write_bundle_from_reader(&b"inner"[..], 5, &sample_hints(), &sample_chart(), out)
                .unwrap();
        }
        assert_eq!(a, b);
    }

    #[test]
    fn gcr_archive_layout() {
        for c in Compression::ALL {
            let (bytes, written) = write(ArchiveFormat::Gcr, c);
            let ms = members(&bytes);
            assert_eq!(ms.last().unwrap().0, "manifest.json");
            assert!(!ms.iter().any(|m| m.0 == "repositories"));
            // 3 configs + base + app + sidecar layers + manifest: the base is stored once.
            assert_eq!(ms.len(), 7);
            for m in ms.iter().filter(|m| m.0.ends_with(".tar.gz")) {
                assert_eq!(m.0, format!("{}.tar.gz", sha256_hex(&m.3)));
            }
            let manifest = json_of(&ms, "manifest.json");
            let images = images();
            for ((entry, image), w) in manifest
                .as_array()
                .unwrap()
                .iter()
                .zip(&images)
                .zip(&written.images)
            {
                assert_eq!(entry["RepoTags"], json!([image.name]));
                let config = entry["Config"].as_str().unwrap();
                assert_eq!(config, image.config_digest());
                assert_eq!(member(&ms, config).3, image.config);
                for ((layer, desc), diff_id) in entry["Layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(&w.layers)
                    .zip(&w.diff_ids)
                {
                    let blob = &member(&ms, layer.as_str().unwrap()).3;
                    assert_eq!(blob_digest(blob), desc.digest);
                    assert_eq!(&blob_digest(&decompress(blob)), diff_id);
                }
            }
            assert_eq!(written.unique_layers().len(), 3);
        }
    }

    #[test]
    fn docker_save_links_shared_layers() {
        let (bytes, written) = write(ArchiveFormat::DockerSave, Compression::None);
        let ms = members(&bytes);
        assert_eq!(ms[0].0, "manifest.json");
        assert_eq!(ms[1].0, "repositories");
        let manifest = json_of(&ms, "manifest.json");
        let manifest = manifest.as_array().unwrap();
        assert_eq!(manifest[2]["RepoTags"], json!(["busybox:latest"]));
        assert_eq!(manifest[0]["RepoTags"], json!([APP_IMAGE]));

        let base_paths: Vec<&str> = manifest
            .iter()
            .map(|m| m["Layers"][0].as_str().unwrap())
            .collect();
        let first = member(&ms, base_paths[0]);
        assert_eq!(first.1, tar::EntryType::Regular);
        assert_eq!(blob_digest(&first.3), written.images[0].diff_ids[0]);
        for later in &base_paths[1..] {
            assert_ne!(*later, base_paths[0]);
            let m = member(&ms, later);
            assert_eq!(m.1, tar::EntryType::Symlink);
            assert_eq!(
                m.2.as_deref(),
                Some(format!("../{}", base_paths[0]).as_str())
            );
        }
        for (entry, w) in manifest.iter().zip(&written.images) {
            let config = entry["Config"].as_str().unwrap();
            assert_eq!(
                format!("sha256:{}", config.trim_end_matches(".json")),
                w.config_digest
            );
            let layers = entry["Layers"].as_array().unwrap();
            let top = layers.last().unwrap().as_str().unwrap();
            let top_id = top.trim_end_matches("/layer.tar");
            assert_eq!(member(&ms, &format!("{top_id}/VERSION")).3, b"1.0");
            let legacy = json_of(&ms, &format!("{top_id}/json"));
            assert_eq!(legacy["id"], json!(top_id));
            if layers.len() > 1 {
                let parent = layers[layers.len() - 2].as_str().unwrap();
                assert_eq!(
                    legacy["parent"],
                    json!(parent.trim_end_matches("/layer.tar"))
                );
            }
        }
        let repos = json_of(&ms, "repositories");
        let busybox_top = manifest[2]["Layers"][0]
            .as_str()
            .unwrap()
            .trim_end_matches("/layer.tar");
        assert_eq!(repos["busybox"]["latest"], json!(busybox_top));
        assert!(repos["release.daocloud.io/demo/app"]["v1"].is_string());
    }

    #[test]
    fn oci_layout_descriptors_match_blobs() {
        for format in [ArchiveFormat::Oci, ArchiveFormat::Docker25] {
            for c in Compression::ALL {
                let (bytes, written) = write(format, c);
                let ms = members(&bytes);
                assert_eq!(ms[0].0, "oci-layout");
                assert_eq!(
                    json_of(&ms, "oci-layout"),
                    json!({"imageLayoutVersion": "1.0.0"})
                );
                let blob = |d: &serde_json::Value| {
                    let digest = d["digest"].as_str().unwrap();
                    let data = &member(&ms, &format!("blobs/sha256/{}", digest_hex(digest))).3;
                    assert_eq!(blob_digest(data), digest);
                    assert_eq!(data.len() as u64, d["size"].as_u64().unwrap());
                    data.clone()
                };
                let index = json_of(&ms, "index.json");
                let descs = index["manifests"].as_array().unwrap();
                assert_eq!(descs.len(), 3);
                for (desc, w) in descs.iter().zip(&written.images) {
                    assert_eq!(desc["mediaType"], MEDIA_TYPE_OCI_MANIFEST);
                    assert_eq!(desc["digest"], json!(w.manifest_digest.as_deref().unwrap()));
                    let ann = &desc["annotations"];
                    assert_eq!(ann["io.containerd.image.name"], json!(w.reference));
                    let manifest: serde_json::Value = serde_json::from_slice(&blob(desc)).unwrap();
                    assert_eq!(manifest["schemaVersion"], 2);
                    assert_eq!(manifest["config"]["mediaType"], MEDIA_TYPE_OCI_CONFIG);
                    assert_eq!(manifest["config"]["digest"], json!(w.config_digest));
                    blob(&manifest["config"]);
                    for (layer, diff_id) in manifest["layers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .zip(&w.diff_ids)
                    {
                        assert_eq!(layer["mediaType"], c.layer_media_type());
                        assert_eq!(&blob_digest(&decompress(&blob(layer))), diff_id);
                    }
                }
                let busybox = &descs[2]["annotations"];
                assert_eq!(
                    busybox["io.containerd.image.name"],
                    "docker.io/library/busybox:latest"
                );
                assert_eq!(busybox["org.opencontainers.image.ref.name"], "latest");
                assert_eq!(
                    descs[0]["annotations"]["org.opencontainers.image.ref.name"],
                    "v1"
                );
                // The shared base layer is stored once: 3 layers + 3 configs + 3 manifests.
                let blobs = ms
                    .iter()
                    .filter(|m| m.0.starts_with("blobs/sha256/"))
                    .count();
                assert_eq!(blobs, 1 + 9);

                let has_legacy = ms.iter().any(|m| m.0 == "manifest.json");
                assert_eq!(has_legacy, format == ArchiveFormat::Docker25);
                if has_legacy {
                    let manifest = json_of(&ms, "manifest.json");
                    let entry = &manifest[2];
                    assert_eq!(entry["RepoTags"], json!(["busybox:latest"]));
                    let config = entry["Config"].as_str().unwrap();
                    assert_eq!(member(&ms, config).3, images()[2].config);
                    let layer = entry["Layers"][0].as_str().unwrap();
                    assert_eq!(
                        blob_digest(&decompress(&member(&ms, layer).3)),
                        written.images[2].diff_ids[0]
                    );
                    let repos = json_of(&ms, "repositories");
                    assert_eq!(
                        repos["busybox"]["latest"],
                        json!(digest_hex(&written.images[2].layers[0].digest))
                    );
                }
            }
        }
    }

    #[test]
    fn bundle_puts_images_tar_in_the_middle() {
        let (inner, _) = write(ArchiveFormat::Gcr, Compression::Gzip);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.tar");
        std::fs::write(&path, &inner).unwrap();
        let mut out = Vec::new();
        write_bundle(&path, &sample_hints(), &sample_chart(), &mut out).unwrap();
        let ms = members(&out);
        let names: Vec<&str> = ms.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "hints.yaml",
                "images.tar",
                "original-chart/",
                "original-chart/Chart.yaml",
                "original-chart/values.yaml"
            ]
        );
        assert_eq!(member(&ms, "images.tar").3, inner);
        let hints = String::from_utf8(member(&ms, "hints.yaml").3.clone()).unwrap();
        assert_eq!(
            hints.lines().next().unwrap(),
            r#"- "{{ .app.image.registry }}/{{ .app.image.repository }}:{{ .app.image.tag }}""#
        );
        assert!(hints.contains("{{ .sidecar-agent.image.repository }}"));
        let values =
            String::from_utf8(member(&ms, "original-chart/values.yaml").3.clone()).unwrap();
        assert!(values.contains("sidecar-agent:\n  image:\n    registry: release.daocloud.io\n"));
    }

    #[test]
    fn references_normalise() {
        assert_eq!(normalize_ref("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize_ref("library/busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            normalize_ref("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize_ref(APP_IMAGE), APP_IMAGE);
        assert_eq!(normalize_ref("localhost/x"), "localhost/x:latest");
        assert_eq!(
            normalize_ref("localhost:5000/a/b"),
            "localhost:5000/a/b:latest"
        );
        assert_eq!(split_ref("localhost:5000/a:v2"), ("localhost:5000/a", "v2"));
    }
}
