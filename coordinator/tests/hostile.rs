//! Hostile and broken bundles, one test per case, at the reader: each ends in a named
//! `BundleError` variant whose message names the member and, where it is known, the image.
//! Nothing is contacted here, so no image name can appear anywhere; `tests/hostile.rs` at the
//! workspace root runs the cases where the node's side matters against real containerd.
//!
//! A layer whose *stored* bytes were altered is refused while it streams:
//! `bundle_formats.rs::altered_layer_bytes_are_refused_naming_member_and_image` (reader) and
//! `tests/load.rs::altered_layer_is_refused_by_name_and_no_image_appears` (nodes).

use std::path::{Path, PathBuf};

use lade::bundle::{Bundle, BundleError, LayerLimits};
use lade_testkit::fixtures::{
    blob_digest, image_config, sample_images_from_bytes, write_bundle_from_reader, ArchiveFormat,
    Compression, ImageFixture, APP_IMAGE, MEDIA_TYPE_OCI_CONFIG,
};
use lade_testkit::hostile::{
    escaping_layer, gzip_bomb, gzip_image, nested_json, oci_layout, raw_tar, Member, OciImage,
    MEDIA_TYPE_OCI_LAYER,
};
use tempfile::TempDir;

const IMAGE: &str = "x.io/hostile/app:1";

/// Writes `bytes` as `<dir>/images.tar` and opens it; the dir must outlive the bundle.
fn open(bytes: &[u8]) -> (TempDir, PathBuf, Result<Bundle, BundleError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.tar");
    std::fs::write(&path, bytes).unwrap();
    let opened = Bundle::open(&path);
    (dir, path, opened)
}

fn open_err(bytes: &[u8]) -> BundleError {
    match open(bytes).2 {
        Ok(b) => panic!("opened a hostile archive: {:?}", b.images),
        Err(e) => e,
    }
}

fn tiny_images() -> Vec<ImageFixture> {
    sample_images_from_bytes(b"\x7fELF tiny".to_vec())
}

fn archive(format: ArchiveFormat, compression: Compression, images: &[ImageFixture]) -> Vec<u8> {
    let mut out = Vec::new();
    format.write(images, compression, &mut out).unwrap();
    out
}

/// A `docker save`-style archive of one image whose single layer is `layer` (a member named
/// `abc/layer.tar`, or anything else), plus `extra` members.
fn docker_archive(layer: Option<Member>, extra: Vec<Member>) -> Vec<u8> {
    let diff_id = blob_digest(b"some layer");
    let config = image_config(&[diff_id], &["/bin/sh"]);
    let manifest = serde_json::json!([{
        "Config": "cfg.json", "RepoTags": [IMAGE], "Layers": ["abc/layer.tar"],
    }]);
    let mut members = vec![Member::file("cfg.json", config)];
    members.extend(layer);
    members.extend(extra);
    members.push(Member::file("manifest.json", manifest.to_string()));
    raw_tar(&members)
}

/// Bytes of the member whose data starts at `offset`, as tests then cut or alter it.
fn member_offset(path: &Path, member_suffix: &str) -> (u64, u64) {
    let len = std::fs::metadata(path).unwrap().len();
    let index = lade::bundle::tarindex::TarIndex::build(path, "t", 0, len).unwrap();
    let m = index
        .members()
        .find(|m| m.name.ends_with(member_suffix))
        .unwrap_or_else(|| panic!("no member *{member_suffix}"));
    (m.offset, m.size)
}

#[test]
fn member_names_climbing_out_or_absolute_are_refused() {
    for name in [
        "../escape.json",
        "blobs/../../escape.json",
        "/etc/cron.d/lade",
    ] {
        let bytes = docker_archive(
            Some(Member::file("abc/layer.tar", b"layer".to_vec())),
            vec![Member::file(name, b"{}".to_vec())],
        );
        let err = open_err(&bytes);
        assert!(
            matches!(&err, BundleError::UnsafeMember { member, .. } if member == name),
            "{name}: {err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(name) && text.contains("images.tar"), "{text}");
    }
}

#[test]
fn member_names_climbing_out_of_a_nested_images_tar_are_refused() {
    let inner = docker_archive(None, vec![Member::file("../../x", b"x".to_vec())]);
    let mut bundle = Vec::new();
    write_bundle_from_reader(&inner[..], inner.len() as u64, "", &[], &mut bundle).unwrap();
    let err = open_err(&bundle);
    assert!(
        matches!(&err, BundleError::UnsafeMember { archive, member, .. }
            if archive.ends_with("images.tar:images.tar") && member == "../../x"),
        "{err:?}"
    );
}

#[test]
fn symlinked_layers_pointing_outside_the_archive_are_refused() {
    for target in ["../../../etc/shadow", "/etc/shadow", "../../abc/../../x"] {
        let bytes = docker_archive(Some(Member::symlink("abc/layer.tar", target)), vec![]);
        let err = open_err(&bytes);
        assert!(
            matches!(&err, BundleError::UnsafeMember { member, .. } if member == "abc/layer.tar"),
            "{target}: {err:?}"
        );
        assert!(err.to_string().contains(target), "{err}");
    }
    // A hard link is followed the same way.
    let bytes = docker_archive(
        Some(Member::hardlink("abc/layer.tar", "../outside.tar")),
        vec![],
    );
    let err = open_err(&bytes);
    assert!(matches!(&err, BundleError::UnsafeMember { .. }), "{err:?}");
}

#[test]
fn a_manifest_naming_a_missing_member_is_refused_naming_member_and_image() {
    let err = open_err(&docker_archive(None, vec![]));
    assert!(
        matches!(&err, BundleError::MissingMember { member, image: Some(image), .. }
            if member == "abc/layer.tar" && image == IMAGE),
        "{err:?}"
    );
    assert!(err.to_string().contains("abc/layer.tar"), "{err}");

    // OCI: the manifest lists a layer whose blob is not in the layout.
    let layer = b"a layer left out".to_vec();
    let member = format!(
        "blobs/sha256/{}",
        blob_digest(&layer).trim_start_matches("sha256:")
    );
    let layout = oci_layout(&[OciImage::plain(IMAGE, vec![layer])]);
    let without = rewrite(&layout, |name, data| {
        (name != member).then_some((name, data))
    });
    let err = open_err(&without);
    assert!(
        matches!(&err, BundleError::MissingMember { member: m, image: Some(image), .. }
            if m == &member && image == IMAGE),
        "{err:?}"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The tar `bytes` with every file member passed through `f` (which may rename, change or
/// drop it), written again with [`raw_tar`].
fn rewrite(
    bytes: &[u8],
    mut f: impl FnMut(String, Vec<u8>) -> Option<(String, Vec<u8>)>,
) -> Vec<u8> {
    let mut members = Vec::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if let Some((name, data)) = f(name, data) {
            members.push(Member::file(&name, data));
        }
    }
    raw_tar(&members)
}

#[test]
fn duplicate_members_with_different_content_are_refused() {
    let bytes = docker_archive(
        Some(Member::file("abc/layer.tar", b"first".to_vec())),
        vec![Member::file("./abc/layer.tar", b"second".to_vec())],
    );
    let err = open_err(&bytes);
    assert!(
        matches!(&err, BundleError::DuplicateMember { member, .. } if member == "abc/layer.tar"),
        "{err:?}"
    );
}

#[test]
fn a_config_whose_bytes_do_not_match_its_digest_is_refused() {
    // Layers altered in the archive are refused while they stream (see the module docs);
    // configs and manifests are read whole when the bundle is opened, so they fail there.
    let images = tiny_images();
    let bytes = archive(ArchiveFormat::Gcr, Compression::Gzip, &images);
    let (dir, path, _) = open(&bytes);
    let config_name = images[0].config_digest();
    let (offset, size) = member_offset(&path, &config_name);
    let mut bytes = std::fs::read(&path).unwrap();
    // Same length, other text: `"amd64"` -> `"amd65"`.
    let config = &mut bytes[offset as usize..(offset + size) as usize];
    let at = find(config, b"amd64").unwrap();
    config[at + 4] = b'5';
    drop(dir);
    let err = open_err(&bytes);
    assert!(
        matches!(&err, BundleError::DigestMismatch { member, role, .. }
            if member == &config_name && role == &format!("config of {APP_IMAGE}")),
        "{err:?}"
    );
}

#[test]
fn a_layer_that_unpacks_to_another_diff_id_is_refused_naming_layer_and_image() {
    // The config claims the app layer's diffID is the base layer's: every digest of the
    // archive is right, only unpacking shows the lie.
    let mut images = tiny_images();
    let mut diff_ids = images[0].diff_ids();
    diff_ids[1] = diff_ids[0].clone();
    images[0].config = image_config(&diff_ids, &["/bin/sh"]);
    for format in [ArchiveFormat::Gcr, ArchiveFormat::Oci] {
        let (_dir, _, opened) = open(&archive(format, Compression::Gzip, &images));
        let bundle = opened.unwrap();
        let image = &bundle.images[0];
        let err = bundle
            .check_layers(image, &LayerLimits::default())
            .unwrap_err();
        assert!(
            matches!(&err, BundleError::DiffIdMismatch { layer, expected, actual, .. }
                if layer.ends_with(&format!("(layer 2 of {APP_IMAGE})"))
                    && expected == &diff_ids[0]
                    && actual == &images[0].diff_ids()[1]),
            "{format:?}: {err:?}"
        );
        // The other images of the bundle are intact; the whole-bundle check finds the one.
        for other in &bundle.images[1..] {
            bundle.check_layers(other, &LayerLimits::default()).unwrap();
        }
        let all = bundle.check_all_layers(&LayerLimits::default());
        assert!(
            matches!(all, Err(BundleError::DiffIdMismatch { .. })),
            "{all:?}"
        );
    }
}

#[test]
fn an_archive_cut_mid_member_is_refused_naming_the_member() {
    let images = tiny_images();
    let bytes = archive(ArchiveFormat::Gcr, Compression::Gzip, &images);
    let (_dir, path, _) = open(&bytes);
    let (offset, size) = member_offset(&path, ".tar.gz");
    let cut = &bytes[..(offset + size / 2) as usize];
    let err = open_err(cut);
    assert!(
        matches!(&err, BundleError::Truncated { member, claimed, available, .. }
            if member.ends_with(".tar.gz") && *claimed == size && *available == size / 2),
        "{err:?}"
    );

    // The same for a bundle cut inside its images.tar.
    let mut bundle = Vec::new();
    write_bundle_from_reader(&bytes[..], bytes.len() as u64, "", &[], &mut bundle).unwrap();
    let err = open_err(&bundle[..bundle.len() / 2]);
    assert!(
        matches!(&err, BundleError::Truncated { member, .. } if member == "images.tar"),
        "{err:?}"
    );
}

#[test]
fn a_gzip_bomb_is_stopped_at_the_limit_naming_layer_and_image() {
    // 64 MiB of zeros stored in about 70 KiB, with its true diffID: a valid image that only
    // the expansion limit refuses.
    let (blob, diff_id) = gzip_bomb(64);
    let stored = blob.len() as u64;
    let (_dir, _, opened) = open(&oci_layout(&[gzip_image(IMAGE, blob, &diff_id)]));
    let bundle = opened.unwrap();
    let image = &bundle.images[0];
    let limits = LayerLimits {
        max_ratio: 100,
        floor: 8 << 20,
    };
    let err = bundle.check_layers(image, &limits).unwrap_err();
    assert!(
        matches!(&err, BundleError::LayerTooLarge { layer, compressed, limit, .. }
            if layer.ends_with(&format!("(layer 1 of {IMAGE})")) && *compressed == stored && *limit == 8 << 20),
        "{err:?}"
    );
    assert!(err.to_string().contains("decompression bomb"), "{err}");
    // With room enough it is just a big layer: the refusal above is the limit's alone.
    let roomy = LayerLimits {
        max_ratio: 1,
        floor: 1 << 30,
    };
    let size = bundle
        .check_layer(&image.layers[0], &diff_id, &roomy)
        .unwrap();
    assert_eq!(size, 512 + (64 << 20) + 1024);
}

#[test]
fn wrong_media_types_are_refused_naming_image_and_descriptor() {
    let layer = escaping_layer("/x");
    let cases: [(&str, &str, &str); 3] = [
        ("layer 1", MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_CONFIG),
        (
            "layer 1",
            "application/vnd.example.unknown",
            MEDIA_TYPE_OCI_CONFIG,
        ),
        ("config", MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER),
    ];
    for (role, layer_type, config_type) in cases {
        let mut image = OciImage::plain(IMAGE, vec![layer.clone()]);
        image.layers[0].0 = layer_type.into();
        image.config_media_type = config_type.into();
        let err = open_err(&oci_layout(&[image]));
        let wrong = if role == "config" {
            config_type
        } else {
            layer_type
        };
        assert!(
            matches!(&err, BundleError::MediaType { image, descriptor, media_type, .. }
                if image == IMAGE && descriptor.starts_with(role) && media_type == wrong),
            "{role} {wrong}: {err:?}"
        );
    }
}

#[test]
fn deeply_nested_json_is_a_named_error_not_a_stack_overflow() {
    // 200 000 levels: recursing once per level would overflow a test thread's 2 MiB stack.
    let deep = String::from_utf8(nested_json(200_000)).unwrap();
    // Where a typed field is expected, the first level is already the wrong type.
    let err = open_err(&raw_tar(&[Member::file("manifest.json", deep.clone())]));
    assert!(
        matches!(&err, BundleError::BadArchive { reason, .. }
            if reason.starts_with("manifest.json is not a docker-archive manifest")),
        "{err:?}"
    );
    let err = open_err(&raw_tar(&[Member::file("index.json", deep.clone())]));
    assert!(
        matches!(&err, BundleError::BadArchive { reason, .. }
            if reason.starts_with("index.json is not an OCI image index")),
        "{err:?}"
    );
    // Under a field nothing reads, serde_json skips the value without recursing, so the
    // manifest parses and the next check (the config member) names what is wrong.
    let manifest =
        format!(r#"[{{"Config":"c.json","RepoTags":["{IMAGE}"],"Layers":[],"x":{deep}}}]"#);
    let err = open_err(&raw_tar(&[Member::file("manifest.json", manifest)]));
    assert!(
        matches!(&err, BundleError::MissingMember { member, .. } if member == "c.json"),
        "{err:?}"
    );
    // An image config inside a valid layout whose diff_ids are the deep value.
    let mut image = OciImage::plain(IMAGE, vec![b"layer".to_vec()]);
    image.config = format!(r#"{{"rootfs":{{"diff_ids":{deep}}}}}"#).into_bytes();
    let err = open_err(&oci_layout(&[image]));
    assert!(
        matches!(&err, BundleError::BadImage { image, reason, .. }
            if image == IMAGE && reason.contains("is not an image config")),
        "{err:?}"
    );
}

#[test]
fn layer_entries_escaping_the_root_are_refused_naming_the_entry() {
    let (_dir, _, opened) = open(&oci_layout(&[OciImage::plain(
        IMAGE,
        vec![escaping_layer("/tmp/lade-target")],
    )]));
    let bundle = opened.unwrap();
    let err = bundle
        .check_layers(&bundle.images[0], &LayerLimits::default())
        .unwrap_err();
    assert!(
        matches!(&err, BundleError::LayerEntryEscapes { entry, layer, .. }
            if entry.starts_with("../") && layer.ends_with(&format!("(layer 1 of {IMAGE})"))),
        "{err:?}"
    );

    let hardlink = raw_tar(&[Member::hardlink("etc/shadow", "../../../etc/shadow")]);
    let (_dir, _, opened) = open(&oci_layout(&[OciImage::plain(IMAGE, vec![hardlink])]));
    let bundle = opened.unwrap();
    let err = bundle
        .check_layers(&bundle.images[0], &LayerLimits::default())
        .unwrap_err();
    assert!(
        matches!(&err, BundleError::LayerEntryEscapes { entry, reason, .. }
            if entry == "etc/shadow" && reason.contains("hard link")),
        "{err:?}"
    );
}

#[test]
fn size_fields_are_checked_against_the_archive_before_use() {
    // A descriptor claiming a 1 TB layer: compared with the member, never allocated.
    let layout = oci_layout(&[OciImage::plain(IMAGE, vec![b"small".to_vec()])]);
    let manifest = find_manifest(&layout);
    let claimed = manifest.replacen("\"size\":5}", "\"size\":1000000000000}", 1);
    assert_ne!(claimed, manifest, "the layer descriptor says 5 bytes");
    let err = open_err(&layout_with_manifest(&layout, &claimed));
    assert!(
        matches!(&err, BundleError::BadArchive { reason, .. }
            if reason.contains("1000000000000") && reason.contains("layer 1")),
        "{err:?}"
    );

    // A tar header claiming 2^60 bytes.
    let mut tar = raw_tar(&[Member::file("manifest.json", b"[]".to_vec())]);
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&tar[..512]);
    h.set_size(1 << 60);
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    let err = open_err(&tar);
    assert!(
        matches!(&err, BundleError::Truncated { claimed, .. } if *claimed == 1 << 60),
        "{err:?}"
    );

    // The same inside a nested images.tar, sized so that the member's absolute offset plus
    // its size passes 2^64 (once a debug panic, and in release a wrapped sum that let the
    // member through).
    let huge = u64::MAX - 1100;
    let mut inner = raw_tar(&[Member::file("manifest.json", b"[]".to_vec())]);
    let mut h = tar::Header::new_gnu();
    h.as_mut_bytes().copy_from_slice(&inner[..512]);
    h.set_size(huge);
    h.set_cksum();
    inner[..512].copy_from_slice(h.as_bytes());
    let mut bundle = Vec::new();
    write_bundle_from_reader(&inner[..], inner.len() as u64, "", &[], &mut bundle).unwrap();
    let err = open_err(&bundle);
    assert!(
        matches!(&err, BundleError::Truncated { member, claimed, .. }
            if member == "manifest.json" && *claimed == huge),
        "{err:?}"
    );

    // A PAX header that claims more than the archive holds (once a panic: reading on after
    // a seek past the end), and one that really holds 2 MiB (once read whole into memory).
    for (claimed, data) in [
        (1u64 << 40, vec![b'a'; 100]),
        (2 << 20, vec![b'a'; 2 << 20]),
    ] {
        let mut pax = Member::file("pax", data);
        pax.kind = tar::EntryType::XHeader;
        let mut tar = raw_tar(&[pax, Member::file("manifest.json", b"[]".to_vec())]);
        let mut h = tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(&tar[..512]);
        h.set_size(claimed);
        h.set_cksum();
        tar[..512].copy_from_slice(h.as_bytes());
        let err = open_err(&tar);
        assert!(
            matches!(&err, BundleError::BadArchive { reason, .. } if reason.contains("corrupt tar header")),
            "{claimed}: {err:?}"
        );
    }
}

/// The text of the (only) image manifest in an OCI layout made by `oci_layout`.
fn find_manifest(layout: &[u8]) -> String {
    let mut archive = tar::Archive::new(layout);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut text = String::new();
        if std::io::Read::read_to_string(&mut entry, &mut text).is_ok()
            && text.contains("\"schemaVersion\"")
            && text.contains("\"layers\"")
        {
            return text;
        }
    }
    panic!("no manifest in the layout")
}

/// The layout with its manifest replaced by `manifest` (stored and indexed under its own
/// digest, so only the edited field is wrong).
fn layout_with_manifest(layout: &[u8], manifest: &str) -> Vec<u8> {
    let old = find_manifest(layout);
    let old_digest = blob_digest(old.as_bytes());
    let new_digest = blob_digest(manifest.as_bytes());
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    rewrite(layout, |name, data| {
        if name.ends_with(&hex(&old_digest)) {
            Some((
                format!("blobs/sha256/{}", hex(&new_digest)),
                manifest.as_bytes().to_vec(),
            ))
        } else if name == "index.json" {
            let text = String::from_utf8(data).unwrap();
            let text = text.replace(&old_digest, &new_digest).replace(
                &format!("\"size\":{}", old.len()),
                &format!("\"size\":{}", manifest.len()),
            );
            Some((name, text.into_bytes()))
        } else {
            Some((name, data))
        }
    })
}

#[test]
fn layer_headers_are_read_within_bounds_and_long_names_still_work() {
    // A PAX record of 2 MiB inside a layer: refused at its header (1 MiB) rather than held
    // whole.
    let mut pax = Member::file("pax", vec![b'a'; 2 << 20]);
    pax.kind = tar::EntryType::XHeader;
    let layer = raw_tar(&[pax, Member::file("f", b"x".to_vec())]);
    let (_dir, _, opened) = open(&oci_layout(&[OciImage::plain(IMAGE, vec![layer])]));
    let bundle = opened.unwrap();
    let err = bundle
        .check_layers(&bundle.images[0], &LayerLimits::default())
        .unwrap_err();
    assert!(
        matches!(&err, BundleError::BadLayer { reason, .. }
            if reason.contains("PAX header size 2097152 is over the limit of 1048576")),
        "{err:?}"
    );

    // Long names (GNU `L` members) and data the reader seeks over are fine.
    let long = format!("{}/file", "d".repeat(150));
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(70_000);
    h.set_mode(0o644);
    builder
        .append_data(&mut h, &long, &vec![7u8; 70_000][..])
        .unwrap();
    let layer = builder.into_inner().unwrap();
    let (_dir, _, opened) = open(&oci_layout(&[OciImage::plain(IMAGE, vec![layer.clone()])]));
    let bundle = opened.unwrap();
    let size = bundle
        .check_layer(
            &bundle.images[0].layers[0],
            &blob_digest(&layer),
            &LayerLimits::default(),
        )
        .unwrap();
    assert_eq!(size, layer.len() as u64);
}
