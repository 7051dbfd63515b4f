//! Image metadata the agent reads from blobs it already stored: manifests, configs, chain IDs
//! and the media types both runtimes must agree on.
//!
//! Owns parsing and validation of those documents; it does not fetch or store anything.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::Error;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or config the agent will read into memory. Real ones are a few KiB; the
/// bound keeps a hostile blob from driving an allocation.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

/// A content descriptor as it appears inside manifests.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// The parts of an image manifest (OCI or Docker schema 2) the agent needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Clone, Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The parts of an image config the agent needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageConfig {
    rootfs: RootFs,
}

impl Manifest {
    /// Parses and checks a manifest blob named `digest`.
    pub fn parse(digest: &str, bytes: &[u8]) -> Result<Self, Error> {
        let bad = |reason: String| Error::BadManifest {
            digest: digest.to_string(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not an image manifest: {e}")))?;
        if manifest.schema_version != 2 {
            return Err(bad(format!(
                "schemaVersion {} is not supported (want 2)",
                manifest.schema_version
            )));
        }
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            validate_digest(&d.digest).map_err(|reason| bad(reason.to_string()))?;
        }
        // containerd's applier sniffs the bytes and would unpack anything; a blob the
        // manifest does not call a layer must not become one.
        for (i, layer) in manifest.layers.iter().enumerate() {
            if !is_layer_media_type(&layer.media_type) {
                return Err(bad(format!(
                    "layer {} ({}) has media type {:?}, which is not a layer type",
                    i + 1,
                    layer.digest,
                    layer.media_type
                )));
            }
        }
        Ok(manifest)
    }
}

impl Manifest {
    /// The diffIDs of this manifest's layers, from its config blob: parses the config and checks
    /// it lists exactly one diffID per layer. `manifest_digest` names this manifest in errors.
    pub fn layer_diff_ids(
        &self,
        manifest_digest: &str,
        config: &[u8],
    ) -> Result<Vec<String>, Error> {
        let diff_ids = ImageConfig::diff_ids(&self.config.digest, config)?;
        if diff_ids.len() != self.layers.len() {
            return Err(Error::BadManifest {
                digest: manifest_digest.to_string(),
                reason: format!(
                    "{} layers but its config {} lists {} diffIDs",
                    self.layers.len(),
                    self.config.digest,
                    diff_ids.len()
                ),
            });
        }
        Ok(diff_ids)
    }
}

/// Refuses to read a manifest or config larger than [`MAX_METADATA_BYTES`] into memory.
pub fn check_metadata_size(desc: &Descriptor) -> Result<(), Error> {
    if desc.size > MAX_METADATA_BYTES {
        return Err(Error::BadManifest {
            digest: desc.digest.clone(),
            reason: format!(
                "{} bytes is more than the {MAX_METADATA_BYTES} a manifest or config may have",
                desc.size
            ),
        });
    }
    Ok(())
}

impl ImageConfig {
    /// Parses a config blob named `digest` and returns its layer diffIDs.
    pub fn diff_ids(digest: &str, bytes: &[u8]) -> Result<Vec<String>, Error> {
        let config: ImageConfig = serde_json::from_slice(bytes).map_err(|e| Error::BadConfig {
            digest: digest.to_string(),
            reason: format!("not an image config: {e}"),
        })?;
        for d in &config.rootfs.diff_ids {
            validate_digest(d).map_err(|reason| Error::BadConfig {
                digest: digest.to_string(),
                reason: reason.to_string(),
            })?;
        }
        Ok(config.rootfs.diff_ids)
    }
}

/// Whether `media_type` is a layer's (OCI or Docker schema 2; plain, gzip or zstd;
/// non-distributable included).
pub fn is_layer_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits, the only form lade
/// accepts (it is also what every runtime it talks to accepts).
pub fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or("digest does not start with sha256:")?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err("digest is not 64 lowercase hex digits after sha256:")
    }
}

/// Chain IDs of a layer stack, as the OCI image spec defines them: the first is the first
/// diffID, each next one is `sha256(previous + " " + diffID)`. Snapshots are named by them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let sum = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(sum))
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
    const B: &str = "sha256:8f1b1ad7d0e5a7d5f3e7c8b5a53b1e58b1c6a7f4a4b2e3f0c9d8e7f6a5b4c3d2";

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(chain_ids(&[A.to_string()]), vec![A.to_string()]);
    }

    #[test]
    fn chain_id_hashes_parent_space_diff_id() {
        let ids = chain_ids(&[A.to_string(), B.to_string()]);
        let expect = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{A} {B}").as_bytes()))
        );
        assert_eq!(ids[1], expect);
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn manifest_with_bad_layer_digest_is_refused_with_its_name() {
        let doc = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{A}","size":1}},
               "layers":[{{"mediaType":"y","digest":"sha256:XYZ","size":2}}]}}"#
        );
        let err = Manifest::parse("sha256:m", doc.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("sha256:m"), "{err}");
    }

    #[test]
    fn config_diff_ids_are_read() {
        let doc = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}}}}"#);
        assert_eq!(
            ImageConfig::diff_ids("c", doc.as_bytes()).unwrap(),
            vec![A, B]
        );
    }

    #[test]
    fn a_layer_with_a_non_layer_media_type_is_refused_naming_it() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{A}","size":1}},
               "layers":[{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{B}","size":2}}]}}"#
        );
        let err = Manifest::parse("sha256:m", manifest.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sha256:m") && err.contains(B) && err.contains("not a layer type"),
            "{err}"
        );
        assert!(is_layer_media_type(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+zstd"
        ));
    }

    #[test]
    fn a_config_with_another_number_of_layers_is_refused_naming_the_manifest() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{A}","size":1}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{B}","size":2}}]}}"#
        );
        let manifest = Manifest::parse("sha256:m", manifest.as_bytes()).unwrap();
        let one = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{A}"]}}}}"#);
        assert_eq!(
            manifest.layer_diff_ids("sha256:m", one.as_bytes()).unwrap(),
            vec![A]
        );
        let two = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}}}}"#);
        let err = manifest
            .layer_diff_ids("sha256:m", two.as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("sha256:m"), "{err}");
    }

    #[test]
    fn digest_validation() {
        assert!(validate_digest(A).is_ok());
        assert!(validate_digest("sha512:00").is_err());
        assert!(validate_digest(&A.to_uppercase()).is_err());
        assert!(validate_digest(&A[..70]).is_err());
    }
}
