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

use lade_oci::Manifest;

use super::read_whole;
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
            let mut manifest = bundle.blob(&variant.manifest)?.clone();
            let bytes = read_whole(bundle, &manifest)?;
            if manifest.media_type.is_empty() {
                manifest.media_type = Manifest::parse(&variant.manifest, &bytes)
                    .map(|m| m.media_type)
                    .unwrap_or_default();
            }
            let mut blobs = vec![bundle.blob(&variant.config)?.clone()];
            for layer in &variant.layers {
                blobs.push(bundle.blob(layer)?.clone());
            }
            manifests.push(PlatformManifest {
                manifest,
                bytes,
                blobs,
            });
        }
        let index = bundle.blob(index_digest)?.clone();
        let platform_index = PlatformIndex {
            index_bytes: read_whole(bundle, &index)?,
            index,
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
