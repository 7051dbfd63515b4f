//! Multi-platform images of an OCI archive: `index.json` entries that are image indexes (or
//! Docker manifest lists).
//!
//! The bundle's index resolves each of them to the manifest of the coordinator's platform,
//! which is what a node loads. A registry serves every platform, so here the archive's
//! `index.json` is read again and, for each such entry, the index itself, every manifest it
//! lists and their configs and layers are located in the archive (byte ranges, nothing
//! extracted). Every manifest and index is read whole and its digest checked, as the bundle
//! does for the chosen platform; configs and layers are verified while they stream.

use std::collections::HashMap;

use lade_oci::{is_index, Index, Manifest, MAX_METADATA_BYTES, MEDIA_TYPE_OCI_INDEX};

use crate::bundle::oci::Layout;
use crate::bundle::tarindex::TarIndex;
use crate::bundle::{Blob, Bundle, BundleError, BundleKind};

/// One multi-platform image: its index and every manifest the index lists.
#[derive(Clone, Debug)]
pub struct PlatformIndex {
    pub index: Blob,
    pub index_bytes: Vec<u8>,
    pub manifests: Vec<PlatformManifest>,
}

/// One platform's manifest, with the blobs (config, then layers) it names.
#[derive(Clone, Debug)]
pub struct PlatformManifest {
    pub manifest: Blob,
    pub bytes: Vec<u8>,
    pub blobs: Vec<Blob>,
}

/// The multi-platform images of `bundle`, keyed by the manifest digest the bundle chose from
/// each (an [`crate::bundle::Image::manifest`]). Empty for docker-archives, which hold one
/// platform per image.
pub fn read(bundle: &Bundle) -> Result<HashMap<String, PlatformIndex>, BundleError> {
    if bundle.format != crate::bundle::ArchiveFormat::OciLayout {
        return Ok(HashMap::new());
    }
    let archive = open_archive(bundle)?;
    let layout = Layout { archive: &archive };
    let top: Index = parse(
        &archive.read_small("index.json", MAX_METADATA_BYTES)?,
        &archive,
        "index.json",
    )?;
    let mut found = HashMap::new();
    for entry in top.manifests.iter().filter(|d| is_index(&d.media_type)) {
        let role = format!("index {}", entry.digest);
        let (index, index_bytes) = layout.read_verified(&entry.descriptor(), &role)?;
        let nested: Index = parse(&index_bytes, &archive, &role)?;
        let mut manifests = Vec::with_capacity(nested.manifests.len());
        for child in &nested.manifests {
            if is_index(&child.media_type) {
                return Err(bad(
                    &archive,
                    format!(
                        "{role} lists another index ({}); nested indexes are not supported",
                        child.digest
                    ),
                ));
            }
            let role = format!("manifest {} of {role}", child.digest);
            let (mut manifest, bytes) = layout.read_verified(&child.descriptor(), &role)?;
            let parsed: Manifest = parse(&bytes, &archive, &role)?;
            if manifest.media_type.is_empty() {
                manifest.media_type = parsed.media_type.clone();
            }
            let mut blobs = vec![layout.blob(&parsed.config, &format!("config of {role}"))?];
            for (i, layer) in parsed.layers.iter().enumerate() {
                blobs.push(layout.blob(layer, &format!("layer {} of {role}", i + 1))?);
            }
            manifests.push(PlatformManifest {
                manifest,
                bytes,
                blobs,
            });
        }
        let mut index = index;
        if index.media_type.is_empty() {
            index.media_type = match nested.media_type.as_str() {
                "" => MEDIA_TYPE_OCI_INDEX.to_string(),
                media_type => media_type.to_string(),
            };
        }
        let platform_index = PlatformIndex {
            index,
            index_bytes,
            manifests,
        };
        for manifest in &platform_index.manifests {
            found
                .entry(manifest.manifest.digest.clone())
                .or_insert_with(|| platform_index.clone());
        }
    }
    Ok(found)
}

/// The image archive's own index: the bundle's `images.tar` member (at the top or one folder
/// down, as the bundle finds it), or the whole file for a bare archive.
fn open_archive(bundle: &Bundle) -> Result<TarIndex, BundleError> {
    let len = std::fs::metadata(&bundle.path)
        .map_err(|e| BundleError::Io {
            path: bundle.path.clone(),
            what: "opening the bundle".into(),
            source: e,
        })?
        .len();
    let label = bundle.path.display().to_string();
    let outer = TarIndex::build(&bundle.path, &label, 0, len)?;
    if bundle.kind == BundleKind::ImageArchive {
        return Ok(outer);
    }
    let name = outer
        .members()
        .map(|m| m.name.as_str())
        .find(|name| {
            *name == "images.tar"
                || name.split_once('/').map(|(_, rest)| rest) == Some("images.tar")
        })
        .map(str::to_string)
        .ok_or_else(|| bad(&outer, "no images.tar member".into()))?;
    let member = outer.resolve(&name)?;
    TarIndex::build(
        &bundle.path,
        &bundle.archive_label,
        member.offset,
        member.size,
    )
}

fn bad(archive: &TarIndex, reason: String) -> BundleError {
    BundleError::BadArchive {
        archive: archive.label.clone(),
        reason,
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    archive: &TarIndex,
    role: &str,
) -> Result<T, BundleError> {
    serde_json::from_slice(bytes).map_err(|e| bad(archive, format!("{role} cannot be read: {e}")))
}
