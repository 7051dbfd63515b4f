//! Hostile and broken image archives, for the tests that prove lade refuses them by name and
//! for the fuzz seeds.
//!
//! This module owns what the well-behaved writers of [`crate::fixtures`] cannot produce: tars
//! written header by header ([`raw_tar`]: any name, `..` or absolute, duplicates, links to
//! anywhere), minimal OCI layouts whose descriptors may lie ([`oci_layout`]), layers whose
//! entries climb out of the root ([`escaping_layer`]) and gzip bombs built in milliseconds from
//! repeated gzip members ([`gzip_bomb`]). Like the fixtures, everything is deterministic.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::fixtures::{
    blob_digest, gnu_header, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};

/// OCI media type of a gzip layer.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of an uncompressed layer.
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// One member of a [`raw_tar`].
#[derive(Clone, Debug)]
pub struct Member {
    /// Stored verbatim in the header (at most 100 bytes).
    pub name: String,
    pub kind: tar::EntryType,
    pub data: Vec<u8>,
    /// Link target for symlinks and hard links, verbatim.
    pub link: String,
    /// Permission bits; 0755 for directories and 0644 otherwise when `None`.
    pub mode: Option<u32>,
}

impl Member {
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> Member {
        Member {
            name: name.into(),
            kind: tar::EntryType::Regular,
            data: data.into(),
            link: String::new(),
            mode: None,
        }
    }

    pub fn dir(name: &str) -> Member {
        Member {
            name: name.into(),
            kind: tar::EntryType::Directory,
            data: Vec::new(),
            link: String::new(),
            mode: None,
        }
    }

    pub fn symlink(name: &str, target: &str) -> Member {
        Member {
            name: name.into(),
            kind: tar::EntryType::Symlink,
            data: Vec::new(),
            link: target.into(),
            mode: None,
        }
    }

    /// The same member with permission bits `mode` (setuid and the like included).
    pub fn with_mode(self, mode: u32) -> Member {
        Member {
            mode: Some(mode),
            ..self
        }
    }

    pub fn hardlink(name: &str, target: &str) -> Member {
        Member {
            name: name.into(),
            kind: tar::EntryType::Link,
            data: Vec::new(),
            link: target.into(),
            mode: None,
        }
    }
}

/// A GNU header for `m`, name and link written as bytes (the tar crate's setters refuse `..`
/// and absolute names, which is the point here).
fn header(m: &Member) -> tar::Header {
    let mode = m.mode.unwrap_or(if m.kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    let mut h = gnu_header(m.kind, mode, m.data.len() as u64);
    let old = h.as_old_mut();
    assert!(m.name.len() <= old.name.len() && m.link.len() <= old.linkname.len());
    old.name[..m.name.len()].copy_from_slice(m.name.as_bytes());
    old.linkname[..m.link.len()].copy_from_slice(m.link.as_bytes());
    h.set_cksum();
    h
}

/// A tar of `members` exactly as given, in order, with the end-of-archive blocks.
pub fn raw_tar(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        out.extend_from_slice(header(m).as_bytes());
        out.extend_from_slice(&m.data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// One image of an [`oci_layout`]: descriptors are made from the blobs, with the media types
/// given here, so a test can make them lie.
#[derive(Clone, Debug)]
pub struct OciImage {
    /// `io.containerd.image.name` annotation.
    pub name: String,
    pub config: Vec<u8>,
    pub config_media_type: String,
    /// (media type, stored blob), base first.
    pub layers: Vec<(String, Vec<u8>)>,
}

impl OciImage {
    /// An image of plain (uncompressed) layers with a config listing their true diffIDs.
    pub fn plain(name: &str, layers: Vec<Vec<u8>>) -> OciImage {
        let diff_ids: Vec<String> = layers.iter().map(|l| blob_digest(l)).collect();
        OciImage {
            name: name.into(),
            config: crate::fixtures::image_config(&diff_ids, &["/bin/sh"]),
            config_media_type: MEDIA_TYPE_OCI_CONFIG.into(),
            layers: layers
                .into_iter()
                .map(|l| (MEDIA_TYPE_OCI_LAYER.to_string(), l))
                .collect(),
        }
    }
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": blob_digest(bytes), "size": bytes.len()})
}

/// An OCI image layout tar (`oci-layout`, `blobs/sha256/*`, `index.json`) of `images`, each
/// blob stored once.
pub fn oci_layout(images: &[OciImage]) -> Vec<u8> {
    let mut members = vec![Member::file(
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut stored = std::collections::HashSet::new();
    let mut store = |members: &mut Vec<Member>, bytes: &[u8]| {
        let digest = blob_digest(bytes);
        if stored.insert(digest.clone()) {
            let hex = digest.trim_start_matches("sha256:");
            members.push(Member::file(&format!("blobs/sha256/{hex}"), bytes.to_vec()));
        }
    };
    let mut index = Vec::new();
    for image in images {
        store(&mut members, &image.config);
        for (_, blob) in &image.layers {
            store(&mut members, blob);
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": descriptor(&image.config_media_type, &image.config),
            "layers": image.layers.iter().map(|(t, b)| descriptor(t, b)).collect::<Vec<_>>(),
        }))
        .expect("a JSON value always serialises");
        store(&mut members, &manifest);
        let mut entry = descriptor(MEDIA_TYPE_OCI_MANIFEST, &manifest);
        entry["annotations"] = json!({"io.containerd.image.name": image.name});
        index.push(entry);
    }
    let index = json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": index});
    members.push(Member::file("index.json", index.to_string()));
    raw_tar(&members)
}

/// An uncompressed layer whose entries try to leave the root they are unpacked into, aiming
/// at the host directory `target` (absolute): a file climbing out with `..`, and a symlink
/// to `target` followed by a file written through it.
pub fn escaping_layer(target: &str) -> Vec<u8> {
    let climb = format!("{}{}", "../".repeat(12), target.trim_start_matches('/'));
    raw_tar(&[
        Member::file(&format!("{climb}/climbed"), b"escaped with ..\n".to_vec()),
        Member::symlink("esc", target),
        Member::file(
            "esc/through-symlink",
            b"escaped through a symlink\n".to_vec(),
        ),
    ])
}

/// A gzip layer holding one file of `mib` MiB of zeros, and its diffID. The blob is a chain of
/// gzip members (one per MiB, each a few hundred bytes), which decompressors read as one
/// stream, so a multi-GiB bomb costs kilobytes and milliseconds to build. Hashing for the
/// diffID still reads every uncompressed byte.
pub fn gzip_bomb(mib: u64) -> (Vec<u8>, String) {
    const MIB: usize = 1 << 20;
    let gz = |bytes: &[u8]| {
        let mut enc = flate2::GzBuilder::new()
            .operating_system(255)
            .write(Vec::new(), flate2::Compression::best());
        enc.write_all(bytes).expect("writing to a Vec cannot fail");
        enc.finish().expect("writing to a Vec cannot fail")
    };
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").expect("a valid name");
    h.set_size(mib * MIB as u64);
    h.set_mode(0o644);
    h.set_cksum();
    // A MiB is a whole number of blocks, so the file needs no padding: two zero blocks end it.
    let trailer = [0u8; 1024];
    let zeros = vec![0u8; MIB];
    let zeros_gz = gz(&zeros);

    let mut blob = gz(h.as_bytes());
    let mut hasher = Sha256::new();
    hasher.update(h.as_bytes());
    for _ in 0..mib {
        blob.extend_from_slice(&zeros_gz);
        hasher.update(&zeros);
    }
    blob.extend_from_slice(&gz(&trailer));
    hasher.update(trailer);
    (blob, format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// An OCI image whose single layer is `blob` (gzip) with diffID `diff_id`.
pub fn gzip_image(name: &str, blob: Vec<u8>, diff_id: &str) -> OciImage {
    OciImage {
        name: name.into(),
        config: crate::fixtures::image_config(&[diff_id.to_string()], &["/bin/sh"]),
        config_media_type: MEDIA_TYPE_OCI_CONFIG.into(),
        layers: vec![(MEDIA_TYPE_OCI_LAYER_GZIP.into(), blob)],
    }
}

/// `depth` nested JSON arrays: `[[[…]]]`.
pub fn nested_json(depth: usize) -> Vec<u8> {
    let mut out = vec![b'['; depth];
    out.extend(std::iter::repeat_n(b']', depth));
    out
}

/// The GNU sparse header of file `name` holding `stored` bytes of data, mode 0644 ([`gnu_header`]);
/// its regions, real size and checksum are the caller's.
fn sparse_header(name: &str, stored: u64) -> tar::Header {
    let mut h = gnu_header(tar::EntryType::GNUSparse, 0o644, stored);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    h
}

/// A tar holding one GNU sparse file `name` that expands to `real_size` bytes: all hole but
/// its last 512 bytes, which hold `tail` (padded). The tar is a few KiB whatever `real_size`.
pub fn sparse_tar(name: &str, real_size: u64, tail: &[u8]) -> Vec<u8> {
    assert!(real_size >= 512 && tail.len() <= 512);
    let mut h = sparse_header(name, 512);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    gnu.set_real_size(real_size);
    gnu.sparse[0].set_offset(real_size - 512);
    gnu.sparse[0].set_length(512);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let mut data = tail.to_vec();
    data.resize(512, 0);
    out.extend_from_slice(&data);
    out.resize(out.len() + 1024, 0);
    out
}

/// A layer whose one file has a GNU long name (`L` entry) of `len` bytes: what the tar crate
/// reads whole into memory and quotes in its errors.
pub fn long_name_tar(len: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
    h.set_mode(0o644);
    h.set_size(len as u64 + 1);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.resize(out.len() + len, b'n');
    out.push(0);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend(raw_tar(&[Member::file("short", "x")]));
    out
}

/// A GNU sparse entry `name` whose region map runs on for `extensions` extension blocks of
/// 21 regions each, 512 bytes of data every 2 KiB (the tar crate wants whole blocks): a tar
/// of 512 bytes per region that the tar crate would walk in time quadratic in their number.
pub fn sparse_map_tar(name: &str, extensions: usize) -> Vec<u8> {
    const STRIDE: u64 = 2048;
    let regions = 4 + 21 * extensions as u64;
    let mut h = sparse_header(name, regions * 512);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    // The file ends where its last region does.
    gnu.set_real_size((regions - 1) * STRIDE + 512);
    for (i, region) in gnu.sparse.iter_mut().enumerate() {
        region.set_offset(i as u64 * STRIDE);
        region.set_length(512);
    }
    gnu.isextended[0] = u8::from(extensions > 0);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for block in 0..extensions {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (i, region) in ext.sparse.iter_mut().enumerate() {
            region.set_offset((4 + 21 * block as u64 + i as u64) * STRIDE);
            region.set_length(512);
        }
        ext.isextended[0] = u8::from(block + 1 < extensions);
        out.extend_from_slice(ext.as_bytes());
    }
    out.resize(out.len() + regions as usize * 512, b'x');
    out.resize(out.len() + 1024, 0);
    out
}

/// Where fuzz target `target`'s committed corpus lives: `fuzz/corpus/<target>/`.
pub fn fuzz_corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `run` over every file of `target`'s fuzz corpus, in name order; fails if the corpus
/// is missing or empty, so a moved directory cannot turn a replay into a test of nothing.
pub fn replay_fuzz_corpus(target: &str, run: impl Fn(&[u8])) {
    let dir = fuzz_corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for file in files {
        // Printed before the run, so a panic's output names the input that caused it.
        println!("{target}: {}", file.display());
        run(&std::fs::read(&file).unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn raw_tar_keeps_names_verbatim() {
        let bytes = raw_tar(&[
            Member::file("../up", b"x".to_vec()),
            Member::symlink("/abs", "../../etc"),
        ]);
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<(Vec<u8>, Option<Vec<u8>>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path_bytes().into_owned(),
                    e.link_name_bytes().map(|l| l.into_owned()),
                )
            })
            .collect();
        assert_eq!(names[0].0, b"../up");
        assert_eq!(names[1], (b"/abs".to_vec(), Some(b"../../etc".to_vec())));
    }

    #[test]
    fn gzip_bomb_is_one_stream_with_the_stated_diff_id() {
        let (blob, diff_id) = gzip_bomb(3);
        assert!(blob.len() < 64 << 10, "{} bytes", blob.len());
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain.len(), 512 + (3 << 20) + 1024);
        assert_eq!(blob_digest(&plain), diff_id);
    }
}
