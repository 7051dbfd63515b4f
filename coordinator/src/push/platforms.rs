//! Multi-platform images of the bundle, as a registry serves them: each one's index and,
//! for every platform whose blobs the archive carries, its manifest with the config and
//! layers it names.
//!
//! A node loads one platform; a registry serves them all. Everything comes from what the
//! bundle indexed once (`Image::index`, `Image::platforms`, the blobs' byte ranges): indexes
//! and manifests are read whole through the bundle's verified reader; configs and layers are
//! verified while they stream. An index listing platforms the archive does not carry is
//! pushed as the bundle rewrote it, listing only those it carries.

use std::collections::HashMap;

use lade_oci::{Manifest, MAX_METADATA_BYTES};

use crate::bundle::{Blob, Bundle, BundleError};

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

/// The multi-platform images of `bundle`, keyed by the digest of each manifest they list
/// (the one the bundle chose for an image among them). Empty for docker-archives, which hold
/// one platform per image.
pub fn read(bundle: &Bundle) -> Result<HashMap<String, PlatformIndex>, BundleError> {
    let mut found = HashMap::new();
    for image in &bundle.images {
        let Some(index_digest) = &image.index else {
            continue;
        };
        let mut manifests = Vec::with_capacity(image.platforms.len());
        for variant in &image.platforms {
            let mut manifest = blob(bundle, &variant.manifest)?;
            let bytes = whole(bundle, &variant.manifest)?;
            if manifest.media_type.is_empty() {
                manifest.media_type = Manifest::parse(&variant.manifest, &bytes)
                    .map(|m| m.media_type)
                    .unwrap_or_default();
            }
            let mut blobs = vec![blob(bundle, &variant.config)?];
            for layer in &variant.layers {
                blobs.push(blob(bundle, layer)?);
            }
            manifests.push(PlatformManifest {
                manifest,
                bytes,
                blobs,
            });
        }
        let platform_index = PlatformIndex {
            index: blob(bundle, index_digest)?,
            index_bytes: whole(bundle, index_digest)?,
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

/// The bundle's blob `digest` (every blob an image names is indexed).
fn blob(bundle: &Bundle, digest: &str) -> Result<Blob, BundleError> {
    bundle
        .blobs
        .get(digest)
        .cloned()
        .ok_or_else(|| BundleError::BadArchive {
            archive: bundle.archive_label.clone(),
            reason: format!("blob {digest} is named by an image but not in the archive"),
        })
}

/// Blob `digest` read whole (an index or manifest), its digest verified by the reader.
fn whole(bundle: &Bundle, digest: &str) -> Result<Vec<u8>, BundleError> {
    let mut reader = bundle.read_blob(digest, 0)?;
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk(lade_proto::CHUNK_SIZE)? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > MAX_METADATA_BYTES {
            return Err(BundleError::BadArchive {
                archive: bundle.archive_label.clone(),
                reason: format!("{digest} is larger than {MAX_METADATA_BYTES} bytes"),
            });
        }
    }
    Ok(out)
}
