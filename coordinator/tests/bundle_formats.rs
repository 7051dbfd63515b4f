//! The bundle reader against every archive form and compression the testkit generates:
//! images, names and digests found from the index alone, blobs streamed back byte-exact and
//! verified, corruption refused with the member and image named. No daemons needed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use lade::bundle::{BlobSource, Bundle, BundleError, BundleKind};
use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images_from_bytes, write_bundle, ArchiveFormat, Compression,
    ImageFixture, WrittenArchive,
};

/// Stand-in bytes for the busybox binary: the reader never looks inside layers.
fn fixtures() -> Vec<ImageFixture> {
    sample_images_from_bytes(b"\x7fELF not really busybox".repeat(100))
}

fn write_archive(
    dir: &Path,
    images: &[ImageFixture],
    format: ArchiveFormat,
    compression: Compression,
) -> (PathBuf, WrittenArchive) {
    let path = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&path).unwrap());
    let written = format.write(images, compression, &mut out).unwrap();
    out.flush().unwrap();
    (path, written)
}

fn read_whole(bundle: &Bundle, digest: &str, from: u64) -> Result<Vec<u8>, BundleError> {
    drain(bundle.read_blob(digest, from)?)
}

/// Everything `reader` yields, in chunks of 4096 bytes.
fn drain(mut reader: lade::bundle::BlobReader) -> Result<Vec<u8>, BundleError> {
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk(4096)? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// (format, compression) pairs to read. `docker save` writes plain layers; its gzip case
/// stands for hand-made archives whose `<id>/layer.tar` names claim no digest, so the
/// reader must hash them while indexing.
fn cases() -> Vec<(ArchiveFormat, Compression)> {
    let mut v = vec![
        (ArchiveFormat::DockerSave, Compression::None),
        (ArchiveFormat::DockerSave, Compression::Gzip),
    ];
    for f in [
        ArchiveFormat::Gcr,
        ArchiveFormat::Oci,
        ArchiveFormat::Docker25,
    ] {
        for c in Compression::ALL {
            v.push((f, c));
        }
    }
    v
}

#[test]
fn every_form_indexes_to_the_written_images() {
    for (format, compression) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let images = fixtures();
        let (path, written) = write_archive(dir.path(), &images, format, compression);
        let bundle =
            Bundle::open(&path).unwrap_or_else(|e| panic!("{format:?}/{compression:?}: {e}"));
        assert_eq!(bundle.kind, BundleKind::ImageArchive);
        assert_eq!(bundle.images.len(), 3, "{format:?}");
        for (image, w) in bundle.images.iter().zip(&written.images) {
            assert_eq!(image.config, w.config_digest, "{format:?}/{compression:?}");
            let layer_digests: Vec<_> = w.layers.iter().map(|d| d.digest.clone()).collect();
            assert_eq!(image.layers, layer_digests, "{format:?}/{compression:?}");
            assert_eq!(image.diff_ids, w.diff_ids);
            if let Some(m) = &w.manifest_digest {
                assert_eq!(&image.manifest, m, "OCI manifests are used as they are");
            }
            // Compression is detected from the bytes, whatever the member is called.
            for d in &w.layers {
                let media = &bundle.blobs[&d.digest].media_type;
                let want = match compression {
                    Compression::None => ".tar",
                    Compression::Gzip => "gzip",
                    Compression::Zstd => "zstd",
                };
                assert!(media.ends_with(want), "{format:?}/{compression:?}: {media}");
            }
        }
        // The shared base layer is one blob.
        assert_eq!(
            bundle.images[0].layers[0], bundle.images[2].layers[0],
            "{format:?}: base layer shared"
        );
        // Every blob streams back byte-exact, also from an offset (resume).
        for blob in bundle.blobs.values() {
            let bytes = read_whole(&bundle, &blob.digest, 0).unwrap();
            assert_eq!(bytes.len() as u64, blob.size);
            assert_eq!(lade_testkit::fixtures::blob_digest(&bytes), blob.digest);
            let tail = read_whole(&bundle, &blob.digest, blob.size / 2).unwrap();
            assert_eq!(tail, bytes[(blob.size / 2) as usize..]);
        }
    }
}

#[test]
fn docker_archives_get_a_manifest_like_ctr_import_makes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, written) = write_archive(
        dir.path(),
        &fixtures(),
        ArchiveFormat::Gcr,
        Compression::Gzip,
    );
    let bundle = Bundle::open(&path).unwrap();
    let image = &bundle.images[0];
    let manifest_blob = &bundle.blobs[&image.manifest];
    assert!(matches!(manifest_blob.source, BlobSource::Inline(_)));
    let bytes = read_whole(&bundle, &image.manifest, 0).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["schemaVersion"], 2);
    assert_eq!(
        doc["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(doc["config"]["digest"], written.images[0].config_digest);
    assert_eq!(
        doc["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(doc["layers"][1]["size"], written.images[0].layers[1].size);

    // zstd cannot be said in Docker media types: the manifest becomes OCI.
    let (path, _) = write_archive(
        dir.path(),
        &fixtures(),
        ArchiveFormat::Gcr,
        Compression::Zstd,
    );
    let bundle = Bundle::open(&path).unwrap();
    let bytes = read_whole(&bundle, &bundle.images[0].manifest, 0).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        doc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        doc["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
}

#[test]
fn bundle_parts_are_found_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let (images_tar, _) = write_archive(
        dir.path(),
        &fixtures(),
        ArchiveFormat::Gcr,
        Compression::Gzip,
    );
    let path = dir.path().join("demo.bundle.tar");
    let mut out = BufWriter::new(File::create(&path).unwrap());
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out).unwrap();
    out.flush().unwrap();
    drop(out);
    let bundle = Bundle::open(&path).unwrap();
    assert_eq!(bundle.kind, BundleKind::Bundle);
    assert_eq!(bundle.images.len(), 3);
    assert_eq!(bundle.hints.as_deref(), Some(sample_hints().as_str()));
    let mut chart = bundle.chart_files.clone();
    chart.sort();
    assert_eq!(chart, ["Chart.yaml", "values.yaml"]);
    // Blobs are read from inside the nested images.tar, in place.
    for blob in bundle.blobs.values() {
        let bytes = read_whole(&bundle, &blob.digest, 0).unwrap();
        assert_eq!(lade_testkit::fixtures::blob_digest(&bytes), blob.digest);
    }
}

/// Flips one byte in the middle of blob `digest` in the archive at `path`, as a damaged copy
/// would; returns the member that holds it.
fn damage(path: &std::path::Path, digest: &str) -> String {
    let bundle = Bundle::open(path).unwrap();
    let blob = &bundle.blobs[digest];
    let BlobSource::Member { member, offset } = blob.source.clone() else {
        panic!("layers are members")
    };
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(offset + blob.size / 2) as usize] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
    member
}

#[test]
fn altered_layer_bytes_are_refused_naming_member_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let (path, written) = write_archive(
        dir.path(),
        &fixtures(),
        ArchiveFormat::Gcr,
        Compression::Gzip,
    );
    let layer = &written.images[0].layers[1];
    let member = damage(&path, &layer.digest);

    let bundle = Bundle::open(&path).unwrap();
    let err = read_whole(&bundle, &layer.digest, 0).unwrap_err();
    assert!(matches!(err, BundleError::DigestMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&member), "{text}");
    assert!(
        text.contains("layer 2 of release.daocloud.io/demo/app:v1"),
        "{text}"
    );
}

/// What `lade load` streams to agents (`send_blob`, not hashed: the agent checks the digest)
/// is the blob's bytes from the offset asked; the altered copy streams as it is, and
/// `check_blob`, which the coordinator runs when an agent refuses it, names the member.
#[test]
fn blobs_sent_unhashed_resume_at_the_offset_and_a_refusal_is_traced_to_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let (path, written) = write_archive(
        dir.path(),
        &fixtures(),
        ArchiveFormat::Gcr,
        Compression::Gzip,
    );
    let layer = &written.images[0].layers[1];
    let read_sent =
        |bundle: &Bundle, from: u64| drain(bundle.send_blob(&layer.digest, from).unwrap()).unwrap();
    let bundle = Bundle::open(&path).unwrap();
    let whole = read_whole(&bundle, &layer.digest, 0).unwrap();
    let from = layer.size / 3;
    assert_eq!(read_sent(&bundle, 0), whole);
    assert_eq!(read_sent(&bundle, from), whole[from as usize..]);
    bundle.check_blob(&layer.digest).unwrap();

    let member = damage(&path, &layer.digest);
    let bundle = Bundle::open(&path).unwrap();
    let sent = read_sent(&bundle, 0);
    assert_eq!(sent.len(), whole.len());
    assert_ne!(sent, whole);
    let err = bundle.check_blob(&layer.digest).unwrap_err();
    assert!(matches!(err, BundleError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&member), "{err}");
}

#[test]
fn not_an_archive_says_what_it_expected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "README", &b"hi"[..]).unwrap();
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    let err = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("notes.tar") && err.contains("images.tar"),
        "{err}"
    );

    let gz = dir.path().join("bundle.tar.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3].repeat(60)).unwrap();
    let err = Bundle::open(&gz).unwrap_err().to_string();
    assert!(
        err.contains("bundle.tar.gz") && err.contains("uncompressed"),
        "{err}"
    );
}

#[test]
fn manifest_naming_a_missing_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.tar");
    let mut b = tar::Builder::new(Vec::new());
    let manifest = br#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["nope/layer.tar"]}]"#;
    let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
    for (name, data) in [("cfg.json", &config[..]), ("manifest.json", &manifest[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    let err = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("nope/layer.tar") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn every_form_s_layers_unpack_to_their_diff_ids() {
    for (format, compression) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_archive(dir.path(), &fixtures(), format, compression);
        let bundle = Bundle::open(&path).unwrap();
        bundle
            .check_all_layers(&lade::bundle::LayerLimits::default())
            .unwrap_or_else(|e| panic!("{format:?}/{compression:?}: {e}"));
    }
}

#[test]
fn unpacked_size_hints_read_the_stored_size_of_gzip_and_plain_layers() {
    // The space check estimates what a layer unpacks to from its header and trailer only.
    let dir = tempfile::tempdir().unwrap();
    let images = fixtures();
    for compression in [Compression::None, Compression::Gzip] {
        let (path, written) = write_archive(dir.path(), &images, ArchiveFormat::Gcr, compression);
        let bundle = Bundle::open(&path).unwrap();
        for (image, fixture) in written.images.iter().zip(&images) {
            for (layer, tar) in image.layers.iter().zip(&fixture.layers) {
                assert_eq!(
                    bundle.unpacked_size_hint(&layer.digest),
                    tar.len() as u64,
                    "{compression:?} {}",
                    layer.digest
                );
            }
        }
    }
}

#[test]
fn space_needed_counts_stored_and_unpacked_bytes_per_filesystem() {
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let images = fixtures();
    let (path, written) = write_archive(dir.path(), &images, ArchiveFormat::Gcr, Compression::Gzip);
    let bundle = Bundle::open(&path).unwrap();
    let layer = &written.images[0].layers[1];
    let config = &written.images[0].config_digest;
    // The layer's upload got 10 bytes in before; the config is missing whole.
    let missing = HashMap::from([(layer.digest.clone(), 10u64), (config.clone(), 0)]);
    let sizes = HashMap::from([(layer.digest.clone(), 5000u64)]);
    let storage = |holds: &[&str], path: &str, free: u64| lade_proto::Storage {
        holds: holds.iter().map(|h| h.to_string()).collect(),
        path: path.into(),
        free_bytes: free,
        total_bytes: free * 2,
    };
    let stored = layer.size - 10 + bundle.blobs[config].size;
    let one_fs = lade::load::space_needed(
        &[storage(
            &["content", "snapshots"],
            "/var/lib/containerd",
            99,
        )],
        &missing,
        &bundle,
        &sizes,
    );
    assert_eq!(one_fs.len(), 1);
    assert_eq!(one_fs[0].needed, stored + 5000);
    assert_eq!(one_fs[0].what, "blobs and unpacked layers");
    assert_eq!(one_fs[0].free, 99);
    let two_fs = lade::load::space_needed(
        &[
            storage(&["cache"], "/var/lib/lade", 1),
            storage(&["images"], "/var/lib/docker", 2),
        ],
        &missing,
        &bundle,
        &sizes,
    );
    assert_eq!(
        two_fs.iter().map(|n| n.needed).collect::<Vec<_>>(),
        vec![stored, 5000]
    );
    assert_eq!(two_fs[1].what, "unpacked layers");
}
