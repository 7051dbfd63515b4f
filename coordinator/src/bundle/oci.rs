//! OCI image layout: `index.json` points at manifests (or at indexes of per-platform
//! manifests) stored as `blobs/sha256/<hex>`. `docker save` of Docker 25+ writes this layout
//! plus a docker-archive `manifest.json`, which is used only to find names.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::tarindex::TarIndex;
use super::{
    config_diff_ids, sha256_digest, ArchiveFormat, Blob, BlobSource, BundleError, Image, Parsed,
    MAX_METADATA_BYTES, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

/// The platform this coordinator picks from multi-platform indexes. Nodes of another
/// platform are the subject of per-node selection (not done here).
fn default_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

struct Layout<'a> {
    archive: &'a TarIndex,
}

impl Layout<'_> {
    fn member_name(&self, digest: &str) -> Result<String, BundleError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if super::is_hex64(hex) => Ok(format!("blobs/sha256/{hex}")),
            _ => Err(BundleError::BadArchive {
                archive: self.archive.label.clone(),
                reason: format!("descriptor digest {digest:?} is not sha256:<64 hex>"),
            }),
        }
    }

    /// A blob's member, checked to exist with the size its descriptor says.
    fn blob(&self, d: &Descriptor, role: &str) -> Result<Blob, BundleError> {
        let name = self.member_name(&d.digest)?;
        let member = self.archive.resolve(&name)?;
        if member.size != d.size {
            return Err(BundleError::BadArchive {
                archive: self.archive.label.clone(),
                reason: format!(
                    "{role}: member {name} has {} bytes, its descriptor says {}",
                    member.size, d.size
                ),
            });
        }
        Ok(Blob {
            digest: d.digest.clone(),
            size: d.size,
            media_type: d.media_type.clone(),
            source: BlobSource::Member {
                member: member.name.clone(),
                offset: member.offset,
            },
            role: role.to_string(),
        })
    }

    /// Reads a small blob and checks its digest (cheap, and everything after relies on it).
    fn read_verified(&self, d: &Descriptor, role: &str) -> Result<(Blob, Vec<u8>), BundleError> {
        let blob = self.blob(d, role)?;
        let bytes = self
            .archive
            .read_small(&self.member_name(&d.digest)?, MAX_METADATA_BYTES)?;
        let actual = sha256_digest(&bytes);
        if actual != d.digest {
            let BlobSource::Member { member, .. } = &blob.source else {
                unreachable!("layout blobs are members")
            };
            return Err(BundleError::DigestMismatch {
                archive: self.archive.label.clone(),
                member: member.clone(),
                role: role.to_string(),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok((blob, bytes))
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_INDEX || media_type == MEDIA_TYPE_DOCKER_LIST
}

fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_MANIFEST || media_type == MEDIA_TYPE_DOCKER_MANIFEST
}

fn is_config(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    )
}

/// The layer media types containerd's differ applies (its `DiffCompression`), with the
/// compressions it can undo. Anything else would reach the node and fail there, after the
/// upload, with a message naming neither the image nor the bundle.
fn is_layer(media_type: &str) -> bool {
    let (base, compression) = match media_type.split_once('+') {
        Some((base, ext)) => (base, Some(ext)),
        None => (media_type, None),
    };
    match base {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            matches!(compression, None | Some("gzip") | Some("zstd"))
        }
        "application/vnd.docker.image.rootfs.diff.tar" => compression.is_none(),
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => compression.is_none(),
        _ => false,
    }
}

pub(super) fn parse(archive: &TarIndex) -> Result<Parsed, BundleError> {
    let bad = |reason: String| BundleError::BadArchive {
        archive: archive.label.clone(),
        reason,
    };
    let layout = Layout { archive };
    let index: Index =
        serde_json::from_slice(&archive.read_small("index.json", MAX_METADATA_BYTES)?)
            .map_err(|e| bad(format!("index.json is not an OCI image index: {e}")))?;
    if index.manifests.is_empty() {
        return Err(bad("index.json lists no images".into()));
    }
    // Docker 25+ saves also carry a docker-archive manifest.json: names by config digest.
    let docker_names: HashMap<String, Vec<String>> = match archive.get("manifest.json") {
        Some(_) => {
            let entries: Vec<DockerEntry> =
                serde_json::from_slice(&archive.read_small("manifest.json", MAX_METADATA_BYTES)?)
                    .map_err(|e| {
                    bad(format!(
                        "manifest.json is not a docker-archive manifest: {e}"
                    ))
                })?;
            entries
                .into_iter()
                .filter_map(|e| {
                    let hex = e.config.rsplit('/').next()?.to_string();
                    Some((format!("sha256:{hex}"), e.repo_tags.unwrap_or_default()))
                })
                .collect()
        }
        None => HashMap::new(),
    };

    let mut blobs = BTreeMap::new();
    let mut images = Vec::new();
    for top in &index.manifests {
        let mut names: Vec<String> = Vec::new();
        if let Some(n) = top.annotations.get(ANNOTATION_CONTAINERD_NAME) {
            names.push(n.clone());
        } else if let Some(n) = top.annotations.get(ANNOTATION_REF_NAME) {
            // A bare tag ("v1") names nothing by itself; a full reference does.
            if n.contains('/') || n.contains('.') && n.contains(':') {
                names.push(n.clone());
            }
        }
        let label = names.first().cloned().unwrap_or_else(|| top.digest.clone());

        let media_type_error =
            |role: &str, d: &Descriptor, expected: &'static str| BundleError::MediaType {
                archive: archive.label.clone(),
                image: label.clone(),
                descriptor: format!("{role} {}", d.digest),
                media_type: d.media_type.clone(),
                expected,
            };
        let mdesc = if is_index(&top.media_type) {
            // Only the chosen platform's manifest goes to the nodes, not the index.
            let (_, bytes) = layout
                .read_verified(top, &format!("index of {label}"))
                .map_err(|e| e.needed_by(&label))?;
            let nested: Index = serde_json::from_slice(&bytes).map_err(|e| {
                bad(format!(
                    "index {} of {label} is not an image index: {e}",
                    top.digest
                ))
            })?;
            pick_platform(&nested.manifests)
                .cloned()
                .ok_or_else(|| BundleError::BadImage {
                    archive: archive.label.clone(),
                    image: label.clone(),
                    reason: format!(
                        "no manifest for {}/{} among its platforms ({})",
                        default_platform().0,
                        default_platform().1,
                        platforms(&nested.manifests)
                    ),
                })?
        } else {
            top.clone()
        };
        // An empty type is left to the manifest's own mediaType field, checked below.
        if !mdesc.media_type.is_empty() && !is_manifest(&mdesc.media_type) {
            return Err(media_type_error(
                "manifest",
                &mdesc,
                "an OCI or Docker image manifest",
            ));
        }

        let (mblob, mbytes) = layout
            .read_verified(&mdesc, &format!("manifest of {label}"))
            .map_err(|e| e.needed_by(&label))?;
        let manifest: Manifest =
            serde_json::from_slice(&mbytes).map_err(|e| BundleError::BadImage {
                archive: archive.label.clone(),
                image: label.clone(),
                reason: format!("manifest {} is not an image manifest: {e}", mdesc.digest),
            })?;
        if !manifest.media_type.is_empty() && !is_manifest(&manifest.media_type) {
            return Err(BundleError::MediaType {
                archive: archive.label.clone(),
                image: label.clone(),
                descriptor: format!("manifest {}", mdesc.digest),
                media_type: manifest.media_type.clone(),
                expected: "an OCI or Docker image manifest",
            });
        }
        if !is_config(&manifest.config.media_type) {
            return Err(media_type_error(
                "config",
                &manifest.config,
                "an OCI or Docker image config",
            ));
        }
        for (i, l) in manifest.layers.iter().enumerate() {
            if !is_layer(&l.media_type) {
                return Err(media_type_error(
                    &format!("layer {}", i + 1),
                    l,
                    "a layer type containerd applies (a tar, plain, gzip or zstd)",
                ));
            }
        }
        let (cblob, cbytes) = layout
            .read_verified(&manifest.config, &format!("config of {label}"))
            .map_err(|e| e.needed_by(&label))?;
        let diff_ids = config_diff_ids(&cbytes).map_err(|e| BundleError::BadImage {
            archive: archive.label.clone(),
            image: label.clone(),
            reason: format!(
                "config {} is not an image config: {e}",
                manifest.config.digest
            ),
        })?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(BundleError::BadImage {
                archive: archive.label.clone(),
                image: label,
                reason: format!(
                    "manifest lists {} layers but its config lists {} diffIDs",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        if names.is_empty() {
            names = docker_names.get(&cblob.digest).cloned().unwrap_or_default();
        }
        if names.is_empty() {
            return Err(BundleError::BadImage {
                archive: archive.label.clone(),
                image: label,
                reason: format!(
                    "has no {ANNOTATION_CONTAINERD_NAME} annotation or full {ANNOTATION_REF_NAME} in index.json, so it could not be named on the nodes"
                ),
            });
        }
        let label = names[0].clone();
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (i, l) in manifest.layers.iter().enumerate() {
            let blob = layout
                .blob(l, &format!("layer {} of {label}", i + 1))
                .map_err(|e| e.needed_by(&label))?;
            layers.push(blob.digest.clone());
            blobs.entry(blob.digest.clone()).or_insert(blob);
        }
        let mut mblob = mblob;
        if mblob.media_type.is_empty() {
            mblob.media_type = manifest.media_type.clone();
        }
        images.push(Image {
            names,
            manifest: mblob.digest.clone(),
            config: cblob.digest.clone(),
            layers,
            diff_ids,
        });
        blobs.entry(mblob.digest.clone()).or_insert(mblob);
        blobs.entry(cblob.digest.clone()).or_insert(cblob);
    }
    Ok(Parsed {
        format: ArchiveFormat::OciLayout,
        images,
        blobs,
    })
}

fn pick_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let (os, arch) = default_platform();
    manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == arch)
    })
}

fn platforms(manifests: &[Descriptor]) -> String {
    manifests
        .iter()
        .filter_map(|m| m.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
