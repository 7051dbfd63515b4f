//! Media types of image content, and which kind of document or blob each names.

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Whether `media_type` names a multi-platform index (OCI, or a Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_INDEX || media_type == MEDIA_TYPE_DOCKER_LIST
}

/// Whether `media_type` names an image manifest (OCI, or Docker schema 2).
pub fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_MANIFEST || media_type == MEDIA_TYPE_DOCKER_MANIFEST
}

/// Whether `media_type` names an image config (OCI, or Docker's).
pub fn is_config(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_CONFIG || media_type == MEDIA_TYPE_DOCKER_CONFIG
}

/// Whether `media_type` is a layer's that containerd's differ applies (its `DiffCompression`):
/// OCI or Docker schema 2; plain, gzip or zstd; non-distributable included. Anything else
/// must not become a layer: containerd's applier sniffs the bytes and would unpack anything.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types_are_the_ones_containerd_applies() {
        for ok in [
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
        ] {
            assert!(is_layer_media_type(ok), "{ok}");
        }
        for bad in [
            MEDIA_TYPE_OCI_CONFIG,
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/vnd.docker.image.rootfs.diff.tar+gzip",
            "",
        ] {
            assert!(!is_layer_media_type(bad), "{bad}");
        }
        assert!(is_index(MEDIA_TYPE_DOCKER_LIST) && !is_index(MEDIA_TYPE_OCI_MANIFEST));
        assert!(is_manifest(MEDIA_TYPE_DOCKER_MANIFEST) && !is_manifest(MEDIA_TYPE_OCI_INDEX));
        assert!(is_config(MEDIA_TYPE_DOCKER_CONFIG) && !is_config(MEDIA_TYPE_OCI_MANIFEST));
    }
}
