//! docker-archive: `manifest.json` lists each image's config member and layer members.
//!
//! Written by go-containerregistry (configs `sha256:<hex>`, layers `<hex>.tar.gz` named by
//! the digest of their stored bytes, `manifest.json` last) and by `docker save` / skopeo
//! (`<id>/layer.tar` uncompressed, shared layers as symlinks, `repositories`). Such an archive
//! has no image manifests, so one is made per image, as `ctr images import` does: Docker
//! schema 2, or OCI when a layer is zstd (Docker's media types have no zstd).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use super::tarindex::TarIndex;
use super::{
    layer_media_type, ArchiveFormat, Blob, BlobSource, BundleError, Compression, Image, Parsed,
};
use lade_oci::{
    is_hex64, sha256_digest, ImageConfig, MAX_METADATA_BYTES, MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST,
};

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a member's name claims for its bytes: `<hex>.tar.gz`, `<hex>.tar`, `<hex>`,
/// `sha256:<hex>`, `blobs/sha256/<hex>`, `<hex>.json`. None for names like `<id>/layer.tar`.
fn claimed_digest(member: &str) -> Option<String> {
    let base = member.rsplit('/').next().unwrap_or(member);
    let base = base.strip_prefix("sha256:").unwrap_or(base);
    let stem = [".tar.gz", ".tgz", ".tar.zst", ".tar", ".json"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base);
    is_hex64(stem).then(|| format!("sha256:{stem}"))
}

pub(super) fn parse(archive: &TarIndex) -> Result<Parsed, BundleError> {
    let bad = |reason: String| BundleError::BadArchive {
        archive: archive.label.clone(),
        reason,
    };
    let text = archive.read_small("manifest.json", MAX_METADATA_BYTES)?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "manifest.json is not a docker-archive manifest: {e}"
        ))
    })?;
    if entries.is_empty() {
        return Err(bad("manifest.json lists no images".into()));
    }

    let mut blobs = BTreeMap::new();
    let mut images = Vec::with_capacity(entries.len());
    for entry in entries {
        let names = entry.repo_tags.unwrap_or_default();
        let label = names
            .first()
            .cloned()
            .unwrap_or_else(|| entry.config.clone());
        let bad_image = |reason: String| BundleError::BadImage {
            archive: archive.label.clone(),
            image: label.clone(),
            reason,
        };
        if names.is_empty() {
            return Err(bad_image(
                "has no RepoTags in manifest.json, so it could not be named on the nodes".into(),
            ));
        }

        let config_bytes = archive
            .read_small(&entry.config, MAX_METADATA_BYTES)
            .map_err(|e| e.needed_by(&label))?;
        let config_digest = sha256_digest(&config_bytes);
        let config_member = archive.resolve(&entry.config)?;
        if let Some(claimed) = claimed_digest(&config_member.name) {
            if claimed != config_digest {
                return Err(BundleError::DigestMismatch {
                    archive: archive.label.clone(),
                    member: config_member.name.clone(),
                    role: format!("config of {label}"),
                    expected: claimed,
                    actual: config_digest,
                });
            }
        }
        let config = ImageConfig::read(&config_bytes).map_err(|e| {
            bad_image(format!(
                "config {} is not an image config: {e}",
                entry.config
            ))
        })?;
        let (diff_ids, config_platform) = (config.layer_diff_ids().to_vec(), config.platform());
        if diff_ids.len() != entry.layers.len() {
            return Err(bad_image(format!(
                "manifest.json lists {} layers but its config lists {} diffIDs",
                entry.layers.len(),
                diff_ids.len()
            )));
        }

        let mut layers = Vec::with_capacity(entry.layers.len());
        for (i, path) in entry.layers.iter().enumerate() {
            let member = archive.resolve(path).map_err(|e| e.needed_by(&label))?;
            let head = archive.head(member, 8)?;
            let compression = Compression::sniff(&head);
            let digest = match claimed_digest(&member.name) {
                Some(d) => d,
                // An uncompressed layer's stored digest is its diffID.
                None if compression == Compression::None => diff_ids[i].clone(),
                None => hash_member(archive, &member.name, member.size)?,
            };
            layers.push((digest, member.clone(), compression, head));
        }

        // OCI media types only when Docker's cannot express the layers.
        let oci = layers.iter().any(|l| l.2 == Compression::Zstd);
        let (manifest_type, config_type) = if oci {
            (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_CONFIG)
        } else {
            (MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_CONFIG)
        };
        let layer_docs: Vec<_> = layers
            .iter()
            .map(|(digest, member, _, head)| {
                json!({"mediaType": layer_media_type(head, oci), "size": member.size, "digest": digest})
            })
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": config_bytes.len(), "digest": config_digest},
            "layers": layer_docs,
        }))
        .expect("serialising a JSON value cannot fail");
        let manifest_digest = sha256_digest(&manifest);

        blobs.entry(config_digest.clone()).or_insert_with(|| Blob {
            digest: config_digest.clone(),
            size: config_bytes.len() as u64,
            media_type: config_type.to_string(),
            source: BlobSource::Member {
                member: config_member.name.clone(),
                offset: config_member.offset,
            },
            role: format!("config of {label}"),
        });
        for (i, (digest, member, _, head)) in layers.iter().enumerate() {
            blobs.entry(digest.clone()).or_insert_with(|| Blob {
                digest: digest.clone(),
                size: member.size,
                media_type: layer_media_type(head, oci).to_string(),
                source: BlobSource::Member {
                    member: member.name.clone(),
                    offset: member.offset,
                },
                role: format!("layer {} of {label}", i + 1),
            });
        }
        blobs
            .entry(manifest_digest.clone())
            .or_insert_with(|| Blob {
                digest: manifest_digest.clone(),
                size: manifest.len() as u64,
                media_type: manifest_type.to_string(),
                source: BlobSource::Inline(Arc::new(manifest)),
                role: format!("manifest of {label}"),
            });
        images.push(Image {
            names,
            manifest: manifest_digest,
            config: config_digest,
            layers: layers.into_iter().map(|l| l.0).collect(),
            diff_ids,
            config_platform,
            platforms: Vec::new(),
            skipped_platforms: Vec::new(),
            index: None,
        });
    }
    Ok(Parsed {
        format: ArchiveFormat::DockerArchive,
        images,
        blobs,
    })
}

/// Hashes a member whose name claims no digest (compressed `<id>/layer.tar`, rare).
fn hash_member(archive: &TarIndex, name: &str, size: u64) -> Result<String, BundleError> {
    let member = archive.resolve(name)?;
    super::tarindex::Section::open(&archive.file, member.offset, size)
        .and_then(super::read::sha256_of)
        .map_err(|e| BundleError::Io {
            path: archive.file.clone(),
            what: format!("reading {name} in {}", archive.label),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::claimed_digest;

    #[test]
    fn digests_claimed_by_member_names() {
        let hex = "a".repeat(64);
        for name in [
            format!("{hex}.tar.gz"),
            format!("sha256:{hex}"),
            format!("blobs/sha256/{hex}"),
            format!("{hex}.json"),
            format!("{hex}/../{hex}.tar"),
        ] {
            assert_eq!(
                claimed_digest(&name),
                Some(format!("sha256:{hex}")),
                "{name}"
            );
        }
        assert_eq!(claimed_digest(&format!("{hex}/layer.tar")), None);
        assert_eq!(claimed_digest("abc.tar.gz"), None);
    }
}
