//! Image metadata documents: descriptors, manifests, indexes and image configs, parsed and
//! checked the same way on both sides, and the bound on how much of them is read into memory.
//!
//! Owns parsing and validation of those documents; it does not fetch or store anything.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::validate_digest;
use crate::media::{is_layer_media_type, is_manifest};
use crate::platform::Platform;

/// Most manifests an index may list: real multi-platform images list a dozen at most.
pub const MAX_INDEX_ENTRIES: usize = 256;

/// Largest manifest, config or index read into memory. Real ones are a few KiB; the bound
/// keeps a hostile blob or archive from driving an allocation by a size field.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

/// What is wrong with a manifest, index or config, naming it by digest. Each side maps it to
/// its own error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A manifest or index that cannot be used (an index is named a manifest here, as the
    /// runtimes name it).
    #[error("manifest {digest}: {reason}")]
    BadManifest { digest: String, reason: String },
    #[error("config {digest}: {reason}")]
    BadConfig { digest: String, reason: String },
}

/// A content descriptor as it appears inside manifests.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// One entry of an image index (or of an OCI layout's `index.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
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

/// A multi-platform image index (OCI, or a Docker manifest list), or an OCI layout's
/// `index.json`. Read with serde as written; [`Index::parse`] checks an image's index.
#[derive(Clone, Debug, Deserialize)]
pub struct Index {
    /// 0 where the document has none.
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    /// Empty where the document has none.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub manifests: Vec<IndexEntry>,
}

impl Index {
    /// Parses and checks an index blob named `digest`: schema version 2, 1 to
    /// [`MAX_INDEX_ENTRIES`] entries, only image manifests, each with a platform and a valid
    /// digest.
    pub fn parse(digest: &str, bytes: &[u8]) -> Result<Index, Error> {
        let bad = bad_manifest(digest);
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not an image index: {e}")))?;
        check_schema_version(index.schema_version).map_err(&bad)?;
        if index.manifests.is_empty() || index.manifests.len() > MAX_INDEX_ENTRIES {
            return Err(bad(format!(
                "lists {} manifests (1 to {MAX_INDEX_ENTRIES} accepted)",
                index.manifests.len()
            )));
        }
        for m in &index.manifests {
            validate_digest(&m.digest).map_err(|r| bad(format!("{}: {r}", m.digest)))?;
            if !is_manifest(&m.media_type) {
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

    /// The entry for a node of platform `node`, if the index has one: the same platform once
    /// both are normalised. The coordinator chose the manifests; this only picks which one of
    /// an index the node unpacks.
    pub fn entry_for(&self, node: &Platform) -> Option<&IndexEntry> {
        self.manifests
            .iter()
            .find(|m| m.platform.as_ref() == Some(node))
    }
}

/// The parts of an image manifest (OCI or Docker schema 2) lade needs. Read with serde as
/// written; [`Manifest::parse`] checks it.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    /// 0 where the document has none.
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    /// Empty where the document has none.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// Parses and checks a manifest blob named `digest`: schema version 2, valid digests, and
    /// only layer media types for layers.
    pub fn parse(digest: &str, bytes: &[u8]) -> Result<Self, Error> {
        let bad = bad_manifest(digest);
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not an image manifest: {e}")))?;
        check_schema_version(manifest.schema_version).map_err(&bad)?;
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

/// An [`Error::BadManifest`] naming `digest`, for each reason it is given.
fn bad_manifest(digest: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::BadManifest {
        digest: digest.to_string(),
        reason,
    }
}

/// Manifests and indexes of schema version 2 are the only ones lade reads.
fn check_schema_version(version: u32) -> Result<(), String> {
    match version {
        2 => Ok(()),
        other => Err(format!("schemaVersion {other} is not supported (want 2)")),
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

#[derive(Clone, Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The parts of an image config lade reads: the diffIDs it lists (`rootfs.diff_ids`), base
/// layer first, and the platform it names (`os`, `architecture`, `variant`).
#[derive(Clone, Debug, Deserialize)]
pub struct ImageConfig {
    rootfs: RootFs,
    #[serde(flatten)]
    platform: crate::platform::PlatformFields,
}

impl ImageConfig {
    /// Reads a config as written: `rootfs` is required, nothing is checked.
    pub fn read(bytes: &[u8]) -> Result<ImageConfig, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Parses a config blob named `digest` and returns its layer diffIDs, each checked to be
    /// a valid digest.
    pub fn diff_ids(digest: &str, bytes: &[u8]) -> Result<Vec<String>, Error> {
        let config = ImageConfig::read(bytes).map_err(|e| Error::BadConfig {
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

    /// The diffIDs as written, base layer first.
    pub fn layer_diff_ids(&self) -> &[String] {
        &self.rootfs.diff_ids
    }

    /// The platform the config names, if it names one (an `os` and an `architecture`).
    pub fn platform(&self) -> Option<Platform> {
        let named = !self.platform.os.is_empty() && !self.platform.architecture.is_empty();
        named.then(|| Platform::from(self.platform.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::tests::{A, B};
    use crate::media::{MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};

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
    fn a_config_names_its_platform_when_it_has_os_and_architecture() {
        let read = |json: &str| ImageConfig::read(json.as_bytes()).unwrap();
        let config = read(
            r#"{"os":"linux","architecture":"arm","variant":"v7","rootfs":{"diff_ids":["sha256:a"]}}"#,
        );
        assert_eq!(config.layer_diff_ids(), ["sha256:a".to_string()]);
        assert_eq!(config.platform().unwrap().to_string(), "linux/arm/v7");
        assert_eq!(read(r#"{"os":"linux","rootfs":{}}"#).platform(), None);
        assert!(
            ImageConfig::read(br#"{"os":"linux"}"#).is_err(),
            "rootfs is required"
        );
        let err = ImageConfig::diff_ids("sha256:c", br#"{"rootfs":{"diff_ids":["sha256:a"]}}"#)
            .unwrap_err();
        assert!(matches!(err, Error::BadConfig { .. }), "{err}");
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
    fn a_manifest_without_schema_version_2_is_refused() {
        let doc =
            format!(r#"{{"config":{{"mediaType":"x","digest":"{A}","size":1}},"layers":[]}}"#);
        let err = Manifest::parse("sha256:m", doc.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("want 2"), "{err}");
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
        let node = |s: &str| s.parse::<Platform>().unwrap();
        assert_eq!(
            index.entry_for(&node("linux/amd64")).unwrap().digest,
            d('a')
        );
        assert_eq!(
            index.entry_for(&node("linux/arm64")).unwrap().digest,
            d('b')
        );
        assert_eq!(
            index.entry_for(&node("linux/aarch64")).unwrap().digest,
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
}
