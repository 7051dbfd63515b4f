//! OCI image layout: `index.json` points at manifests (or at indexes of per-platform
//! manifests) stored as `blobs/sha256/<hex>`. `docker save` of Docker 25+ writes this layout
//! plus a docker-archive `manifest.json`, which is used only to find names.

use std::collections::{BTreeMap, HashMap};

use lade_oci::{
    is_config, is_index, is_layer_media_type, is_manifest, sha256_digest, validate_digest,
    Descriptor, ImageConfig, Index, Manifest, Platform, MAX_METADATA_BYTES, MEDIA_TYPE_OCI_INDEX,
};
use serde::Deserialize;

use super::tarindex::TarIndex;
use super::{ArchiveFormat, Blob, BlobSource, BundleError, Image, Parsed, Variant};

const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// What BuildKit sets on the attestation entries it adds to an image's index.
const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

/// Blobs of an OCI image layout, found by digest under `blobs/sha256/`.
pub(crate) struct Layout<'a> {
    pub archive: &'a TarIndex,
}

impl Layout<'_> {
    fn member_name(&self, digest: &str) -> Result<String, BundleError> {
        match validate_digest(digest) {
            Ok(()) => Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..])),
            Err(_) => Err(BundleError::BadArchive {
                archive: self.archive.label.clone(),
                reason: format!("descriptor digest {digest:?} is not sha256:<64 hex>"),
            }),
        }
    }

    /// A blob's member, checked to exist with the size its descriptor says.
    pub(crate) fn blob(&self, d: &Descriptor, role: &str) -> Result<Blob, BundleError> {
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
    pub(crate) fn read_verified(
        &self,
        d: &Descriptor,
        role: &str,
    ) -> Result<(Blob, Vec<u8>), BundleError> {
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

        let mut platforms: Vec<(Platform, ImageParts)> = Vec::new();
        let mut skipped = Vec::new();
        let mut index = None;
        let parts = if is_index(&top.media_type) {
            let (iblob, bytes) = layout
                .read_verified(&top.descriptor(), &format!("index of {label}"))
                .map_err(|e| e.needed_by(&label))?;
            let nested: Index = serde_json::from_slice(&bytes).map_err(|e| {
                bad(format!(
                    "index {} of {label} is not an image index: {e}",
                    top.digest
                ))
            })?;
            for child in &nested.manifests {
                // Build attestations and other non-image entries run on no node.
                if child
                    .annotations
                    .get(ANNOTATION_REFERENCE_TYPE)
                    .is_some_and(|t| t == "attestation-manifest")
                    || child.platform.as_ref().is_some_and(|p| p.os == "unknown")
                {
                    continue;
                }
                let platform = match &child.platform {
                    Some(p) => p.clone(),
                    None => {
                        return Err(BundleError::BadImage {
                            archive: archive.label.clone(),
                            image: label.clone(),
                            reason: format!(
                                "index {} lists manifest {} without a platform",
                                top.digest, child.digest
                            ),
                        })
                    }
                };
                if is_index(&child.media_type) {
                    return Err(BundleError::BadImage {
                        archive: archive.label.clone(),
                        image: label.clone(),
                        reason: format!(
                            "index {} lists another index ({}); nested indexes are not supported",
                            top.digest, child.digest
                        ),
                    });
                }
                // What `ctr export` of an image pulled for one platform writes: the index
                // lists every platform, the archive carries one. Skipped, and said.
                match read_image(&layout, archive, &child.descriptor(), &label) {
                    Ok(parts) => platforms.push((platform, parts)),
                    Err(BundleError::MissingMember { member, .. }) => {
                        skipped.push((platform, member));
                    }
                    Err(e) => return Err(e),
                }
            }
            if platforms.is_empty() {
                let listed: Vec<String> = skipped
                    .iter()
                    .map(|(p, member)| format!("{p} (member {member} missing)"))
                    .collect();
                return Err(BundleError::BadImage {
                    archive: archive.label.clone(),
                    image: label.clone(),
                    reason: format!(
                        "its index lists {} but the archive carries none of them",
                        if listed.is_empty() {
                            "no platform".to_string()
                        } else {
                            listed.join(", ")
                        }
                    ),
                });
            }
            let mut iblob = iblob;
            if iblob.media_type.is_empty() {
                iblob.media_type = MEDIA_TYPE_OCI_INDEX.to_string();
            }
            index = Some(if skipped.is_empty() {
                iblob
            } else {
                let carried: Vec<&str> = platforms
                    .iter()
                    .map(|(_, parts)| parts.manifest.digest.as_str())
                    .collect();
                carried_index(&bytes, &carried, &iblob, &label)
                    .map_err(|reason| bad(format!("index {} of {label}: {reason}", top.digest)))?
            });
            // The coordinator's own platform is the default, else the first carried.
            let local = Platform::local();
            let best = platforms
                .iter()
                .enumerate()
                .filter_map(|(i, (p, _))| p.rank_for(&local).map(|r| (r, i)))
                .min()
                .map(|(_, i)| i)
                .unwrap_or(0);
            platforms[best].1.clone()
        } else {
            read_image(&layout, archive, &top.descriptor(), &label)?
        };

        if names.is_empty() {
            names = std::iter::once(&parts)
                .chain(platforms.iter().map(|(_, p)| p))
                .find_map(|p| docker_names.get(&p.config.digest).cloned())
                .unwrap_or_default();
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
        let mut variants = Vec::with_capacity(platforms.len());
        for (platform, parts) in platforms {
            parts.store(&mut blobs, &format!("{} ({platform})", names[0]));
            variants.push(parts.variant(platform));
        }
        parts.store(&mut blobs, &names[0]);
        if let Some(index) = &index {
            blobs.entry(index.digest.clone()).or_insert(index.clone());
        }
        images.push(Image {
            names,
            manifest: parts.manifest.digest,
            config: parts.config.digest,
            layers: parts.layers.into_iter().map(|l| l.digest).collect(),
            diff_ids: parts.diff_ids,
            config_platform: parts.config_platform,
            platforms: variants,
            skipped_platforms: skipped.iter().map(|(p, _)| p.to_string()).collect(),
            index: index.map(|i| i.digest),
        });
    }
    Ok(Parsed {
        format: ArchiveFormat::OciLayout,
        images,
        blobs,
    })
}

/// One manifest of an image with its config and layers, each checked against the archive.
#[derive(Clone)]
struct ImageParts {
    manifest: Blob,
    config: Blob,
    layers: Vec<Blob>,
    diff_ids: Vec<String>,
    /// The platform the config names, if it names one.
    config_platform: Option<Platform>,
}

impl ImageParts {
    fn variant(&self, platform: Platform) -> Variant {
        Variant {
            platform,
            manifest: self.manifest.digest.clone(),
            config: self.config.digest.clone(),
            layers: self.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids: self.diff_ids.clone(),
        }
    }

    /// Adds the blobs to `blobs`, each once; roles name the image by `name`.
    fn store(&self, blobs: &mut BTreeMap<String, Blob>, name: &str) {
        let layers = self.layers.iter().enumerate().map(|(i, l)| {
            let mut l = l.clone();
            l.role = format!("layer {} of {name}", i + 1);
            l
        });
        for blob in [self.manifest.clone(), self.config.clone()]
            .into_iter()
            .chain(layers)
        {
            blobs.entry(blob.digest.clone()).or_insert(blob);
        }
    }
}

/// Reads manifest `mdesc` of image `label` and locates its config and layers, checking
/// media types, digests of what is read whole, sizes, and that the config lists one diffID
/// per layer.
fn read_image(
    layout: &Layout<'_>,
    archive: &TarIndex,
    mdesc: &Descriptor,
    label: &str,
) -> Result<ImageParts, BundleError> {
    let media_type_error =
        |role: &str, d: &Descriptor, expected: &'static str| BundleError::MediaType {
            archive: archive.label.clone(),
            image: label.to_string(),
            descriptor: format!("{role} {}", d.digest),
            media_type: d.media_type.clone(),
            expected,
        };
    // An empty type is left to the manifest's own mediaType field, checked below.
    if !mdesc.media_type.is_empty() && !is_manifest(&mdesc.media_type) {
        return Err(media_type_error(
            "manifest",
            mdesc,
            "an OCI or Docker image manifest",
        ));
    }
    let (mut mblob, mbytes) = layout
        .read_verified(mdesc, &format!("manifest of {label}"))
        .map_err(|e| e.needed_by(label))?;
    let manifest: Manifest =
        serde_json::from_slice(&mbytes).map_err(|e| BundleError::BadImage {
            archive: archive.label.clone(),
            image: label.to_string(),
            reason: format!("manifest {} is not an image manifest: {e}", mdesc.digest),
        })?;
    if !manifest.media_type.is_empty() && !is_manifest(&manifest.media_type) {
        return Err(BundleError::MediaType {
            archive: archive.label.clone(),
            image: label.to_string(),
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
        if !is_layer_media_type(&l.media_type) {
            return Err(media_type_error(
                &format!("layer {}", i + 1),
                l,
                "a layer type containerd applies (a tar, plain, gzip or zstd)",
            ));
        }
    }
    let (cblob, cbytes) = layout
        .read_verified(&manifest.config, &format!("config of {label}"))
        .map_err(|e| e.needed_by(label))?;
    let config = ImageConfig::read(&cbytes).map_err(|e| BundleError::BadImage {
        archive: archive.label.clone(),
        image: label.to_string(),
        reason: format!(
            "config {} is not an image config: {e}",
            manifest.config.digest
        ),
    })?;
    let (diff_ids, config_platform) = (config.layer_diff_ids().to_vec(), config.platform());
    if diff_ids.len() != manifest.layers.len() {
        return Err(BundleError::BadImage {
            archive: archive.label.clone(),
            image: label.to_string(),
            reason: format!(
                "manifest lists {} layers but its config lists {} diffIDs",
                manifest.layers.len(),
                diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, l) in manifest.layers.iter().enumerate() {
        layers.push(
            layout
                .blob(l, &format!("layer {} of {label}", i + 1))
                .map_err(|e| e.needed_by(label))?,
        );
    }
    if mblob.media_type.is_empty() {
        mblob.media_type = manifest.media_type.clone();
    }
    Ok(ImageParts {
        manifest: mblob,
        config: cblob,
        layers,
        diff_ids,
        config_platform,
    })
}

/// An index like `original` (bytes) listing only the manifests in `carried`: written when
/// an archive's index lists platforms it does not carry, so that a name pointing at an index
/// never points at missing content.
fn carried_index(
    original: &[u8],
    carried: &[&str],
    like: &Blob,
    label: &str,
) -> Result<Blob, String> {
    let mut index: serde_json::Value =
        serde_json::from_slice(original).map_err(|e| e.to_string())?;
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or("no manifests list")?;
    manifests.retain(|m| {
        m.get("digest")
            .and_then(|d| d.as_str())
            .is_some_and(|d| carried.contains(&d))
    });
    let bytes = serde_json::to_vec(&index).map_err(|e| e.to_string())?;
    Ok(Blob {
        digest: sha256_digest(&bytes),
        size: bytes.len() as u64,
        media_type: like.media_type.clone(),
        source: BlobSource::Inline(std::sync::Arc::new(bytes)),
        role: format!("index of {label} (the platforms the archive carries)"),
    })
}
