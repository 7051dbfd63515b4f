//! Image metadata the agent reads from blobs it already stored: manifests, configs, chain IDs
//! and the media types both runtimes must agree on.
//!
//! Owns parsing and validation of those documents; it does not fetch or store anything.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::Error;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Most manifests an index may list: real multi-platform images list a dozen at most.
pub const MAX_INDEX_ENTRIES: usize = 256;

/// Whether a descriptor's media type names a multi-platform index.
pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_INDEX || media_type == MEDIA_TYPE_DOCKER_LIST
}

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

/// A platform as an index entry names it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let (os, architecture) = (parts.next()?, parts.next()?);
        let variant = parts.next().map(str::to_string);
        if os.is_empty() || architecture.is_empty() || parts.next().is_some() {
            return None;
        }
        Some(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant,
        })
    }

    /// Whether an image of this platform is the one for a node of platform `node`: same os
    /// and architecture, and the same variant once the implied ones are filled in (`arm64`
    /// is `arm64/v8`, `arm` is `arm/v7`). The coordinator chose the manifests; this only
    /// picks which one of an index the node unpacks.
    pub fn is_for(&self, node: &Platform) -> bool {
        let variant = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", None | Some("") | Some("v8")) => Some("v8".to_string()),
            ("arm", None | Some("")) => Some("v7".to_string()),
            (_, Some("")) => None,
            (_, v) => v.map(str::to_string),
        };
        self.os == node.os
            && self.architecture == node.architecture
            && variant(self) == variant(node)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match self.variant.as_deref() {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

/// One entry of an image index.
#[derive(Clone, Debug, Deserialize)]
pub struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl IndexEntry {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
        }
    }
}

/// A multi-platform image index (OCI, or a Docker manifest list).
#[derive(Clone, Debug, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    pub manifests: Vec<IndexEntry>,
}

impl Index {
    /// Parses and checks an index blob named `digest`: only image manifests, each with a
    /// platform and a valid digest.
    pub fn parse(digest: &str, bytes: &[u8]) -> Result<Index, Error> {
        let bad = |reason: String| Error::BadManifest {
            digest: digest.to_string(),
            reason,
        };
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not an image index: {e}")))?;
        if index.schema_version != 2 {
            return Err(bad(format!(
                "schemaVersion {} is not supported (want 2)",
                index.schema_version
            )));
        }
        if index.manifests.is_empty() || index.manifests.len() > MAX_INDEX_ENTRIES {
            return Err(bad(format!(
                "lists {} manifests (1 to {MAX_INDEX_ENTRIES} accepted)",
                index.manifests.len()
            )));
        }
        for m in &index.manifests {
            validate_digest(&m.digest).map_err(|r| bad(format!("{}: {r}", m.digest)))?;
            if m.media_type != MEDIA_TYPE_OCI_MANIFEST && m.media_type != MEDIA_TYPE_DOCKER_MANIFEST
            {
                return Err(bad(format!(
                    "entry {} has media type {:?}, not an image manifest",
                    m.digest, m.media_type
                )));
            }
            if m.platform.is_none() {
                return Err(bad(format!("entry {} has no platform", m.digest)));
            }
        }
        Ok(index)
    }

    /// The entry for a node of platform `node`, if the index has one.
    pub fn entry_for(&self, node: &Platform) -> Option<&IndexEntry> {
        self.manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.is_for(node)))
    }
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
    fn an_index_entry_is_found_for_its_node_with_implied_variants() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": d('a'), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": d('b'), "size": 1,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ]
        }))
        .unwrap();
        let index = Index::parse("sha256:idx", &bytes).unwrap();
        let node = |s: &str| Platform::parse(s).unwrap();
        assert_eq!(
            index.entry_for(&node("linux/amd64")).unwrap().digest,
            d('a')
        );
        assert_eq!(
            index.entry_for(&node("linux/arm64")).unwrap().digest,
            d('b')
        );
        assert!(index.entry_for(&node("linux/s390x")).is_none());
        assert!(index.entry_for(&node("linux/arm/v7")).is_none());
    }

    #[test]
    fn an_index_listing_another_index_or_no_platform_is_refused() {
        let d = format!("sha256:{}", "a".repeat(64));
        let nested = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": MEDIA_TYPE_OCI_INDEX, "digest": d, "size": 1,
                           "platform": {"os": "linux", "architecture": "amd64"}}]
        }))
        .unwrap();
        let err = Index::parse("sha256:idx", &nested).unwrap_err().to_string();
        assert!(err.contains("not an image manifest"), "{err}");
        let bare = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": d, "size": 1}]
        }))
        .unwrap();
        let err = Index::parse("sha256:idx", &bare).unwrap_err().to_string();
        assert!(err.contains("no platform"), "{err}");
    }

    #[test]
    fn digest_validation() {
        assert!(validate_digest(A).is_ok());
        assert!(validate_digest("sha512:00").is_err());
        assert!(validate_digest(&A.to_uppercase()).is_err());
        assert!(validate_digest(&A[..70]).is_err());
    }
}
