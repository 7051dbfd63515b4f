//! Reads an offline bundle (or a bare images archive) without extracting it.
//!
//! Owns the bundle's *index*: which images it holds, which content-addressed blobs make them
//! up, and the byte range of the file each blob is stored at. Blobs are read straight from
//! those ranges ([`Bundle::read_blob`]) and their digests verified while they stream; what a
//! layer unpacks to (diffID, size, entry paths) is checked on demand by
//! [`Bundle::check_layers`]. Image naming policy (normalising, retagging) is not here: see
//! [`crate::reference`].
//!
//! A bundle comes from outside the cluster, so every size, name and link in it is checked
//! against the archive before it is used, and every refusal is a [`BundleError`] variant
//! naming the member and, once known, the image.
//!
//! Accepted layouts of the image archive, detected from its members, not its name:
//! - docker-archive as go-containerregistry writes it (`sha256:<hex>` configs, `<hex>.tar.gz`
//!   layers, `manifest.json` last) and as `docker save`/skopeo write it (`<id>/layer.tar`,
//!   symlinked shared layers, `repositories`): see [`docker`];
//! - OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`), which includes
//!   `docker save` of Docker 25 and later: see [`oci`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lade_oci::{Platform, MAX_METADATA_BYTES};

mod docker;
pub mod identity;
mod layer;
pub(crate) mod oci;
mod read;
pub mod tarindex;

pub use identity::{Identity, IdentitySource};
pub use layer::LayerLimits;
pub use read::BlobReader;
use tarindex::TarIndex;

/// Everything that can be wrong with a bundle, naming the file, member, image or blob.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("{archive}: {reason}")]
    BadArchive { archive: String, reason: String },
    #[error("{archive}: image {image}: {reason}")]
    BadImage {
        archive: String,
        image: String,
        reason: String,
    },
    #[error(
        "{archive}: member {member} ({role}) has digest {actual}, but the archive says {expected}; the bundle is corrupt or was altered"
    )]
    DigestMismatch {
        archive: String,
        member: String,
        role: String,
        expected: String,
        actual: String,
    },
    /// A member name or link that reaches outside the archive (`..`, an absolute path).
    #[error("{archive}: member {member:?} {reason}; members must stay inside the archive")]
    UnsafeMember {
        archive: String,
        member: String,
        reason: String,
    },
    /// A member the archive's own index (a manifest, a link) refers to is not there.
    #[error("{archive}: member {member} is referenced{} but missing", needed_by(.image))]
    MissingMember {
        archive: String,
        member: String,
        /// The image that needs it, once the format parser knows it.
        image: Option<String>,
    },
    /// Two members with the same (normalised) name: which one a reader sees would depend on
    /// the reader.
    #[error("{archive}: member {member} appears more than once")]
    DuplicateMember { archive: String, member: String },
    /// A member's header claims more bytes than the archive holds after it.
    #[error(
        "{archive}: member {member} claims {claimed} bytes but only {available} follow its header; the archive is truncated or corrupt"
    )]
    Truncated {
        archive: String,
        member: String,
        claimed: u64,
        available: u64,
    },
    /// A descriptor whose media type is not what its place in the image requires.
    #[error(
        "{archive}: image {image}: {descriptor} has media type {media_type:?}; expected {expected}"
    )]
    MediaType {
        archive: String,
        image: String,
        /// Which descriptor, and its digest: `layer 1 sha256:…`.
        descriptor: String,
        media_type: String,
        expected: &'static str,
    },
    /// A layer whose uncompressed stream grows past [`LayerLimits`]: stopped there.
    #[error(
        "{archive}: {layer} unpacks to more than {limit} bytes from {compressed} stored bytes; refused as a decompression bomb"
    )]
    LayerTooLarge {
        archive: String,
        /// The member and what it is: `member <name> (layer 2 of <image>)`.
        layer: String,
        compressed: u64,
        limit: u64,
    },
    /// A layer whose uncompressed bytes do not hash to the diffID its image config lists.
    #[error(
        "{archive}: {layer} unpacks to diffID {actual}, but the image config says {expected}; the bundle is corrupt or was altered"
    )]
    DiffIdMismatch {
        archive: String,
        layer: String,
        expected: String,
        actual: String,
    },
    /// A layer tar entry that would land outside the root it is unpacked into.
    #[error("{archive}: {layer}: entry {entry:?} {reason}")]
    LayerEntryEscapes {
        archive: String,
        layer: String,
        entry: String,
        reason: String,
    },
    /// A layer that cannot be decompressed or is not a tar.
    #[error("{archive}: {layer} is not a readable layer: {reason}")]
    BadLayer {
        archive: String,
        layer: String,
        reason: String,
    },
}

fn needed_by(image: &Option<String>) -> String {
    match image {
        Some(image) => format!(" by image {image}"),
        None => String::new(),
    }
}

impl BundleError {
    /// Names the image a missing member was needed for; other errors pass unchanged.
    pub(crate) fn needed_by(self, label: &str) -> BundleError {
        match self {
            BundleError::MissingMember {
                archive,
                member,
                image: None,
            } => BundleError::MissingMember {
                archive,
                member,
                image: Some(label.to_string()),
            },
            other => other,
        }
    }
}

/// Which kind of file was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BundleKind {
    /// A bundle tar holding `images.tar`, `hints.yaml` and `original-chart/`.
    Bundle,
    /// A bare image archive.
    ImageArchive,
}

/// Layout of the image archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveFormat {
    DockerArchive,
    OciLayout,
}

/// Where a blob's bytes come from.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// A byte range of the bundle file: the data of member `member`.
    Member { member: String, offset: u64 },
    /// Bytes lade made (the manifest of a docker-archive image, which has none of its own).
    Inline(Arc<Vec<u8>>),
}

/// One content-addressed blob of the bundle.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub source: BlobSource,
    /// What the blob is, for messages: `layer 2 of release.daocloud.io/x:v1`.
    pub role: String,
}

/// One image of the bundle.
///
/// For a multi-platform image (an OCI index), `manifest`, `config`, `layers` and `diff_ids`
/// are those of its default platform (the coordinator's own when the archive carries it,
/// else the first it carries), and `platforms` lists every platform it carries.
#[derive(Clone, Debug)]
pub struct Image {
    /// Names as the archive gives them (not normalised).
    pub names: Vec<String>,
    /// Digest of the image manifest.
    pub manifest: String,
    pub config: String,
    /// Layer blob digests, base first.
    pub layers: Vec<String>,
    /// Uncompressed layer digests from the config, base first.
    pub diff_ids: Vec<String>,
    /// The platform the config of `manifest` names, if it names one.
    pub config_platform: Option<Platform>,
    /// Every platform of a multi-platform image whose blobs the archive carries, in the
    /// index's order. Empty for a single-platform image.
    pub platforms: Vec<Variant>,
    /// Platforms the image's index lists but whose blobs the archive does not carry (what
    /// `ctr export` writes for an image pulled for one platform): never sent, said.
    pub skipped_platforms: Vec<String>,
    /// The index a name points at when every platform is loaded: the archive's own, or,
    /// when it lists platforms it does not carry, one lade writes listing only those it does
    /// (an inline blob; its digest then differs from the registry's).
    pub index: Option<String>,
}

/// One platform of a multi-platform image.
#[derive(Clone, Debug)]
pub struct Variant {
    pub platform: Platform,
    pub manifest: String,
    pub config: String,
    pub layers: Vec<String>,
    pub diff_ids: Vec<String>,
}

impl Image {
    /// How messages name the image.
    pub fn label(&self) -> &str {
        self.names
            .first()
            .map(String::as_str)
            .unwrap_or(self.manifest.as_str())
    }
}

/// An indexed bundle.
#[derive(Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub kind: BundleKind,
    pub format: ArchiveFormat,
    /// Text of `hints.yaml`, if the bundle has one.
    pub hints: Option<String>,
    /// Files under `original-chart/` (names relative to it).
    pub chart_files: Vec<String>,
    /// The bundle's name and version (see [`identity`]), when its chart or file name gives
    /// them.
    pub identity: Option<Identity>,
    pub images: Vec<Image>,
    /// Every blob by digest (manifests, configs, layers), each once.
    pub blobs: BTreeMap<String, Blob>,
    /// Label of the image archive, for messages.
    pub archive_label: String,
}

/// What a format parser hands back.
pub(crate) struct Parsed {
    pub format: ArchiveFormat,
    pub images: Vec<Image>,
    pub blobs: BTreeMap<String, Blob>,
}

/// Where `name` sits inside the bundle part `part` (a file or folder name): `Some("")` for the
/// part itself, `Some(rest)` for a file under it. Parts are found at the top or one folder
/// down, since bundles are sometimes packed with a leading folder.
fn within_part<'a>(name: &'a str, part: &str) -> Option<&'a str> {
    let at = |n: &'a str| {
        if n == part {
            Some("")
        } else {
            n.strip_prefix(part).and_then(|r| r.strip_prefix('/'))
        }
    };
    at(name).or_else(|| at(name.split_once('/')?.1))
}

fn find_part<'a>(index: &'a TarIndex, name: &str) -> Option<&'a tarindex::Member> {
    index
        .members()
        .find(|m| within_part(&m.name, name) == Some(""))
}

impl Bundle {
    /// Indexes the file at `path`: a bundle tar or a bare image archive.
    pub fn open(path: &Path) -> Result<Bundle, BundleError> {
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let len = std::fs::metadata(path)
            .map_err(|e| BundleError::Io {
                path: path.to_path_buf(),
                what: "opening the bundle".into(),
                source: e,
            })?
            .len();
        let outer = TarIndex::build(path, &label, 0, len).map_err(|e| match e {
            BundleError::BadArchive { archive, reason } => BundleError::BadArchive {
                archive,
                reason: format!(
                    "{reason} (a bundle must be an uncompressed tar; decompress .tar.gz first)"
                ),
            },
            e => e,
        })?;

        let inner = match find_part(&outer, "images.tar") {
            Some(m) => {
                let m = outer.resolve(&m.name)?;
                let inner_label = format!("{label}:{}", m.name);
                Some(TarIndex::build(path, &inner_label, m.offset, m.size)?)
            }
            None => None,
        };
        let kind = match inner {
            Some(_) => BundleKind::Bundle,
            None => BundleKind::ImageArchive,
        };
        let archive = inner.as_ref().unwrap_or(&outer);

        let parsed = if archive.get("index.json").is_some() {
            oci::parse(archive)?
        } else if archive.get("manifest.json").is_some() {
            docker::parse(archive)?
        } else {
            return Err(BundleError::BadArchive {
                archive: archive.label.clone(),
                reason: "neither a bundle (no images.tar member) nor an image archive (no manifest.json or index.json)".into(),
            });
        };

        let (hints, chart_files, chart_id) = match kind {
            BundleKind::Bundle => {
                let hints = match find_part(&outer, "hints.yaml") {
                    Some(m) => {
                        let bytes = outer.read_small(&m.name, MAX_METADATA_BYTES)?;
                        Some(
                            String::from_utf8(bytes).map_err(|_| BundleError::BadArchive {
                                archive: label.clone(),
                                reason: "hints.yaml is not UTF-8 text".into(),
                            })?,
                        )
                    }
                    None => None,
                };
                let chart = outer
                    .members()
                    .filter_map(|m| within_part(&m.name, "original-chart"))
                    .filter(|rest| !rest.is_empty())
                    .map(str::to_string)
                    .collect();
                let chart_id = match outer
                    .members()
                    .find(|m| within_part(&m.name, "original-chart") == Some("Chart.yaml"))
                {
                    Some(m) => {
                        let bytes = outer.read_small(&m.name, MAX_METADATA_BYTES)?;
                        identity::from_chart_yaml(&String::from_utf8_lossy(&bytes))
                    }
                    None => None,
                };
                (hints, chart, chart_id)
            }
            BundleKind::ImageArchive => (None, Vec::new(), None),
        };
        let identity = chart_id
            .map(|id| (id, IdentitySource::Chart))
            .or_else(|| identity::from_file_name(&label).map(|id| (id, IdentitySource::FileName)))
            .map(|((name, version), from)| Identity {
                name,
                version,
                from,
            });

        Ok(Bundle {
            path: path.to_path_buf(),
            kind,
            format: parsed.format,
            hints,
            chart_files,
            identity,
            images: parsed.images,
            blobs: parsed.blobs,
            archive_label: archive.label.clone(),
        })
    }

    /// Opens a reader over blob `digest` from byte `from`, which verifies the whole blob's
    /// digest (hashing the skipped prefix too) before it reports the end.
    pub fn read_blob(&self, digest: &str, from: u64) -> Result<BlobReader, BundleError> {
        BlobReader::open(
            &self.path,
            &self.archive_label,
            self.blob(digest)?,
            from,
            true,
        )
    }

    /// Opens a reader over blob `digest` from byte `from` for a receiver that checks the
    /// digest itself before it keeps the blob (an agent): the bytes are not hashed here. When
    /// the receiver refuses them, [`Bundle::check_blob`] tells whether the bundle is at fault.
    pub fn send_blob(&self, digest: &str, from: u64) -> Result<BlobReader, BundleError> {
        BlobReader::open(
            &self.path,
            &self.archive_label,
            self.blob(digest)?,
            from,
            false,
        )
    }

    /// Reads blob `digest` whole and checks its digest: the error names the member and the
    /// images using it when the bundle's bytes are not what its index says.
    pub fn check_blob(&self, digest: &str) -> Result<(), BundleError> {
        let mut reader = self.read_blob(digest, 0)?;
        while reader.next_chunk(1 << 20)?.is_some() {}
        Ok(())
    }

    /// Blob `digest` as indexed, or an error naming it when the archive has no such blob.
    pub fn blob(&self, digest: &str) -> Result<&Blob, BundleError> {
        self.blobs
            .get(digest)
            .ok_or_else(|| BundleError::BadArchive {
                archive: self.archive_label.clone(),
                reason: format!("no blob {digest} in the archive"),
            })
    }

    /// Total bytes of all unique blobs.
    pub fn total_bytes(&self) -> u64 {
        self.blobs.values().map(|b| b.size).sum()
    }

    /// Copies the files of `original-chart/` to `dest` (which must exist), keeping their paths
    /// relative to `original-chart/`, and returns how many were written.
    ///
    /// The one exception to "never extract": helm reads a chart only from disk. A chart is a
    /// few small text files, copied from their byte ranges; images are never extracted.
    pub fn extract_chart(&self, dest: &Path) -> Result<usize, BundleError> {
        if self.chart_files.is_empty() {
            return Err(BundleError::BadArchive {
                archive: self.path.display().to_string(),
                reason: "the bundle has no original-chart/ to install".into(),
            });
        }
        // Only the outer headers are read again: a handful of members, images.tar being one.
        let label = self.path.display().to_string();
        let len = std::fs::metadata(&self.path)
            .map_err(|e| BundleError::Io {
                path: self.path.clone(),
                what: "opening the bundle".into(),
                source: e,
            })?
            .len();
        let outer = TarIndex::build(&self.path, &label, 0, len)?;
        let mut written = 0;
        for member in outer.members() {
            let Some(rest) = within_part(&member.name, "original-chart").filter(|r| !r.is_empty())
            else {
                continue;
            };
            // Member names are normalised by the index (no `..`, not absolute), so `target`
            // stays under `dest`; links are resolved inside the archive, never on disk.
            let source = outer.resolve(&member.name)?;
            let target = dest.join(rest);
            let io_err = |what: String| {
                let target = target.clone();
                move |e| BundleError::Io {
                    path: target,
                    what,
                    source: e,
                }
            };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err("creating the chart directory".into()))?;
            }
            let mut reader = tarindex::Section::open(&self.path, source.offset, source.size)
                .map_err(|e| BundleError::Io {
                    path: self.path.clone(),
                    what: format!("reading {}", member.name),
                    source: e,
                })?;
            let mut file = std::fs::File::create(&target)
                .map_err(io_err(format!("writing chart file {rest}")))?;
            std::io::copy(&mut reader, &mut file)
                .map_err(io_err(format!("writing chart file {rest}")))?;
            written += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use lade_testkit::fixtures::{sample_chart, write_bundle_from_reader};

    fn bundle_with_chart(dir: &Path, chart: &[(String, Vec<u8>)]) -> Bundle {
        let images = b"not read by extract_chart";
        let path = dir.join("b.tar");
        let mut out = Vec::new();
        write_bundle_from_reader(&images[..], images.len() as u64, "", chart, &mut out).unwrap();
        std::fs::write(&path, out).unwrap();
        // The images.tar above is no archive, so index the chart by hand as open() would.
        Bundle {
            path,
            kind: BundleKind::Bundle,
            format: ArchiveFormat::DockerArchive,
            hints: None,
            chart_files: chart.iter().map(|(p, _)| p.clone()).collect(),
            identity: None,
            images: Vec::new(),
            blobs: BTreeMap::new(),
            archive_label: "b.tar".into(),
        }
    }

    #[test]
    fn extract_chart_writes_the_chart_files_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut chart = sample_chart();
        chart.push(("charts/sub/values.yaml".into(), b"tag: v2\n".to_vec()));
        let bundle = bundle_with_chart(dir.path(), &chart);
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        assert_eq!(bundle.extract_chart(&dest).unwrap(), 3);
        for (path, data) in &chart {
            assert_eq!(&std::fs::read(dest.join(path)).unwrap(), data, "{path}");
        }
        assert!(!dest.join("images.tar").exists() && !dest.join("hints.yaml").exists());
    }

    #[test]
    fn extract_chart_refuses_a_bundle_without_a_chart() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = bundle_with_chart(dir.path(), &[]);
        let err = bundle.extract_chart(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no original-chart/"), "{err}");
    }
}

/// Media type for a layer whose stored bytes start with `head`: compression is detected by
/// magic bytes, never by member name. `oci` picks OCI media types over Docker's.
pub(crate) fn layer_media_type(head: &[u8], oci: bool) -> &'static str {
    match (Compression::sniff(head), oci) {
        (Compression::Gzip, false) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        (Compression::None, false) => "application/vnd.docker.image.rootfs.diff.tar",
        (Compression::Gzip, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (Compression::Zstd, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (Compression::None, true) => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// How a layer's bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}
