//! Knowledge of image content that the agent and the coordinator share, so it is written
//! once:
//! - [`media`]: the media types of manifests, indexes, configs and layers, and which is which;
//! - [`digest`]: the one digest form lade accepts, sha256 digests of bytes, and chain IDs;
//! - [`manifest`]: descriptors, manifests, indexes and image configs as both sides parse them,
//!   and the bound on how much of such metadata is read into memory;
//! - [`platform`]: platforms normalised as containerd does, and which one a node runs;
//! - [`tarframe`]: the tar framing reader that bounds a layer's meta headers before the tar
//!   crate reads them; both the agent's applier and the coordinator's layer check read layers
//!   through it.
//!
//! The items both sides use are re-exported here. Errors are this crate's own ([`Error`]); each side maps them to its own at its edge.

pub mod digest;
pub mod manifest;
pub mod media;
pub mod platform;
pub mod tarframe;

pub use digest::{chain_id, chain_ids, is_hex64, sha256_digest, validate_digest};
pub use manifest::{
    check_metadata_size, Descriptor, Error, ImageConfig, Index, IndexEntry, Manifest,
    MAX_INDEX_ENTRIES, MAX_METADATA_BYTES,
};
pub use media::{
    is_config, is_index, is_layer_media_type, is_manifest, MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
pub use platform::Platform;
