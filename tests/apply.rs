//! The agent's own layer applier against containerd's, on the real containerd the harness
//! runs (the machine's, or the one `LADE_CONTAINERD` names; scripts/test-matrix runs 1.7 and
//! 2.1): the same tricky layers are unpacked by each (one node with `--unpack containerd`,
//! one with `--unpack agent`) and every snapshot directory is compared file by file; hostile layers
//! are refused by the agent and kept inside the snapshot by containerd.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use lade_agent::apply::{lget_xattr, xattr_names};
use lade_testkit::fixtures::{blob_digest, gnu_header, image_config, MEDIA_TYPE_OCI_CONFIG};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::hostile::{
    oci_layout, OciImage, MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP,
};
use lade_testkit::nodes::Node;
use lade_tests::{layer_dirs, load_json};
use sha2::{Digest, Sha256};

const T: u64 = 1_600_000_000;

/// A tar entry with everything a layer can say about it.
struct E {
    /// Bytes, not text: names need not be UTF-8.
    name: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    data: Vec<u8>,
    link: &'static str,
    dev: (u32, u32),
    pax: Vec<(&'static str, Vec<u8>)>,
}

fn e(kind: tar::EntryType, name: impl AsRef<[u8]>, mode: u32) -> E {
    E {
        name: name.as_ref().to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        data: Vec::new(),
        link: "",
        dev: (0, 0),
        pax: Vec::new(),
    }
}
fn dir(name: impl AsRef<[u8]>, mode: u32) -> E {
    e(tar::EntryType::Directory, name, mode)
}
fn file(name: impl AsRef<[u8]>, mode: u32, data: &[u8]) -> E {
    E {
        data: data.to_vec(),
        ..e(tar::EntryType::Regular, name, mode)
    }
}
fn symlink(name: &'static str, target: &'static str) -> E {
    E {
        link: target,
        ..e(tar::EntryType::Symlink, name, 0o777)
    }
}
fn hardlink(name: &'static str, target: &'static str) -> E {
    E {
        link: target,
        ..e(tar::EntryType::Link, name, 0o644)
    }
}
fn device(kind: tar::EntryType, name: &'static str, mode: u32, dev: (u32, u32)) -> E {
    E {
        dev,
        ..e(kind, name, mode)
    }
}
fn owned(mut entry: E, uid: u64, gid: u64) -> E {
    entry.uid = uid;
    entry.gid = gid;
    entry
}
fn with_pax(mut entry: E, key: &'static str, value: &[u8]) -> E {
    entry.pax.push((key, value.to_vec()));
    entry
}

/// A tar stream of `entries`, in order, written header by header (names verbatim).
fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for en in entries {
        if !en.pax.is_empty() {
            b.append_pax_extensions(en.pax.iter().map(|(k, v)| (*k, v.as_slice())))
                .unwrap();
        }
        let mut h = gnu_header(en.kind, en.mode, en.data.len() as u64);
        h.set_uid(en.uid);
        h.set_gid(en.gid);
        h.set_mtime(T);
        if !en.link.is_empty() {
            h.set_link_name(en.link).unwrap();
        }
        if matches!(en.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(en.dev.0).unwrap();
            h.set_device_minor(en.dev.1).unwrap();
        }
        let name = &en.name[..];
        if name.len() <= 100 {
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &en.data[..]).unwrap();
        } else {
            // A long name goes in a GNU long-name entry, as GNU tar writes it.
            let path = Path::new(std::ffi::OsStr::from_bytes(name));
            b.append_data(&mut h, path, &en.data[..]).unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Three layers with most of what a layer tar can hold, and the ways later layers change
/// earlier ones (whiteouts, opaque directories, type changes, implicit parents).
fn tricky_layers() -> Vec<Vec<u8>> {
    use tar::EntryType::{Block, Char, Fifo};
    let long: &'static str = Box::leak(format!("long/{}/file", "d".repeat(120)).into_boxed_str());
    let base = layer(&[
        dir("etc/", 0o755),
        file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        with_pax(
            file("etc/nanos", 0o600, b"ns"),
            "mtime",
            b"1600000000.123456789",
        ),
        with_pax(file("etc/old", 0o644, b"1969"), "mtime", b"-100"),
        file("etc/empty", 0o000, b""),
        dir("usr/", 0o755),
        dir("usr/lib/", 0o755),
        symlink("lib", "usr/lib"),
        owned(file("usr/lib/libfoo.so", 0o755, &[7u8; 3000]), 1000, 1000),
        hardlink("usr/lib/libfoo.so.1", "usr/lib/libfoo.so"),
        file("bin/suid", 0o4755, b"#!/bin/sh\n"),
        file("bin/sgid", 0o2711, b"#!/bin/sh\n"),
        dir("tmp/", 0o1777),
        with_pax(
            owned(dir("data/", 0o750), 1234, 5678),
            "SCHILY.xattr.user.comment",
            b"hello",
        ),
        with_pax(
            file("data/tagged", 0o640, b"x"),
            "SCHILY.xattr.trusted.sneaky",
            b"ignored by both",
        ),
        device(Char, "dev/null", 0o666, (1, 3)),
        device(Block, "dev/loop0", 0o660, (7, 0)),
        device(Fifo, "run/fifo", 0o600, (0, 0)),
        file("implicit/parents/file", 0o644, b"no dir entries above me"),
        symlink("passwd-link", "/etc/passwd"),
        symlink("dangling", "nowhere/at/all"),
        file(long, 0o644, b"long name"),
        file(b"latin1/caf\xe9", 0o644, b"not UTF-8"),
        file(b"latin1/na\xefve", 0o644, b"whited out below"),
        file("gone", 0o644, b"whited out below"),
        file(".wh.gone", 0o644, b""),
        file(".wh.never-there", 0o644, b""),
        file("opq/a", 0o644, b"a"),
        file("opq/.wh..wh..opq", 0o644, b""),
        file("opq/b", 0o644, b"b"),
    ]);
    let middle = layer(&[
        file("etc/.wh.passwd", 0o644, b""),
        file(b"latin1/.wh.na\xefve", 0o644, b""),
        file("usr/lib/.wh..wh..opq", 0o644, b""),
        file("usr/lib/libbar.so", 0o755, b"bar"),
        hardlink("usr/lib/libbar.so.1", "usr/lib/libbar.so"),
        file("data", 0o644, b"a file where a directory was"),
        dir("etc/nanos/", 0o711),
        file("tmp/newfile", 0o644, b"parent copied from below"),
        file(
            "lib/through-lower-symlink",
            0o644,
            b"parent copied from usr/lib",
        ),
        owned(dir("etc/", 0o700), 0, 42),
        file("dev/null", 0o644, b"a file replacing a device"),
    ]);
    let top = layer(&[
        file(".wh.lib", 0o644, b""),
        file("etc/.wh..wh..opq", 0o644, b""),
        file("etc/hostname", 0o644, b"node\n"),
        file("bin/.wh.sgid", 0o644, b""),
        owned(file("bin/.wh.suid", 0o644, b""), 7, 8),
    ]);
    vec![base, middle, top]
}

/// Everything compared about one path of a snapshot directory.
#[derive(Debug, PartialEq)]
struct Seen {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    nlink: u64,
    /// sha256 of a regular file's bytes, or a symlink's target.
    content: String,
    /// Modification time, or "fresh" for a time of the test run (a directory the applier
    /// made without metadata, a whiteout device: both appliers leave "now" there).
    mtime: String,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every path under `root` (the root itself as "."), with what is seen there.
fn tree(root: &Path, started: SystemTime) -> Result<BTreeMap<String, Seen>> {
    let started = started.duration_since(SystemTime::UNIX_EPOCH)?.as_secs() as i64 - 1;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let rel = match path.strip_prefix(root)? {
            p if p.as_os_str().is_empty() => ".".to_string(),
            p => p.display().to_string(),
        };
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "file"
        };
        let content = if ft.is_file() {
            let mut h = Sha256::new();
            let mut f = std::fs::File::open(&path)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            h.update(&buf);
            hex::encode(h.finalize())
        } else if ft.is_symlink() {
            std::fs::read_link(&path)?.display().to_string()
        } else {
            String::new()
        };
        let mut xattrs = BTreeMap::new();
        for key in xattr_names(&path)? {
            xattrs.insert(key.clone(), lget_xattr(&path, &key)?.unwrap_or_default());
        }
        let mtime = if meta.mtime() >= started || rel == "." {
            "fresh".to_string()
        } else {
            format!("{}.{:09}", meta.mtime(), meta.mtime_nsec())
        };
        out.insert(
            rel,
            Seen {
                kind: kind.into(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                rdev: meta.rdev(),
                nlink: if ft.is_dir() { 0 } else { meta.nlink() },
                content,
                mtime,
                xattrs,
            },
        );
        if ft.is_dir() {
            for child in std::fs::read_dir(&path)? {
                stack.push(child?.path());
            }
        }
    }
    Ok(out)
}

/// chain IDs of `diff_ids`, as containerd names committed snapshots.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => blob_digest(format!("{p} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_unpacks_tricky_layers_exactly_as_containerd_does() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let started = SystemTime::now();
    let name = "x.io/apply/tricky:1";
    let plain = tricky_layers();
    let diff_ids: Vec<String> = plain.iter().map(|l| blob_digest(l)).collect();
    // The last layer gzip-compressed, the others plain: both decompression paths.
    let mut blobs: Vec<(String, Vec<u8>)> = plain
        .iter()
        .map(|l| (MEDIA_TYPE_OCI_LAYER.to_string(), l.clone()))
        .collect();
    let last = blobs.len() - 1;
    blobs[last] = (MEDIA_TYPE_OCI_LAYER_GZIP.to_string(), gzip(&plain[last]));
    let image = OciImage {
        name: name.into(),
        config: image_config(&diff_ids, &["/bin/sh"]),
        config_media_type: MEDIA_TYPE_OCI_CONFIG.into(),
        layers: blobs,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(&[image]))?;

    let by_containerd = Node::start_with("apply-ctrd", &["--unpack", "containerd"]).await?;
    let by_agent = Node::start_with("apply-agent", &["--unpack", "agent"]).await?;
    let (code, reports, stderr) = load_json(
        &path,
        &[by_containerd.addr(), by_agent.addr()],
        &["--relay", "off"],
    )?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");

    let chains = chain_ids(&diff_ids);
    let top = chains.last().unwrap();
    let (ours, theirs) = (
        layer_dirs(&by_agent, top)?,
        layer_dirs(&by_containerd, top)?,
    );
    assert_eq!(ours.len(), plain.len());
    assert_eq!(theirs.len(), plain.len());
    for (i, (a, c)) in ours.iter().zip(&theirs).enumerate() {
        let (a, c) = (tree(a, started)?, tree(c, started)?);
        // Spot checks that the layers did what they say, so an equal pair is not two
        // equally empty trees.
        match i {
            0 => {
                assert_eq!(a["usr/lib/libfoo.so"].nlink, 2);
                assert_eq!(a["bin/suid"].mode, 0o4755);
                assert_eq!(a["dev/null"].kind, "char");
                assert_eq!(a["etc/nanos"].mtime, "1600000000.123456789");
                assert_eq!(a["data"].xattrs["user.comment"], b"hello");
                assert!(!a.contains_key("gone") && a.contains_key("opq/a"));
                assert_eq!(
                    a["latin1/caf\u{fffd}"].kind, "file",
                    "a name that is not UTF-8"
                );
            }
            1 => {
                assert_eq!(a["etc/passwd"].kind, "char", "whiteout device");
                assert_eq!(a["latin1/na\u{fffd}ve"].kind, "char", "whiteout not UTF-8");
                assert_eq!(a["usr/lib"].xattrs["trusted.overlay.opaque"], b"y");
                assert_eq!(a["tmp"].mode, 0o1777, "implicit parent copied from below");
                assert_eq!(a["lib"].kind, "dir");
            }
            _ => {
                assert_eq!(a["bin/suid"].uid, 7);
                assert_eq!(a["etc"].xattrs["trusted.overlay.opaque"], b"y");
            }
        }
        let paths: Vec<&String> = a.keys().chain(c.keys()).collect();
        for p in paths {
            assert_eq!(
                a.get(p),
                c.get(p),
                "layer {i}, {p}: agent (left) and containerd (right) differ"
            );
        }
    }
    Ok(())
}

/// A plain-layer image of `entries`, written raw (the tar crate refuses to write some).
fn hostile_image(name: &str, members: &[lade_testkit::hostile::Member]) -> OciImage {
    OciImage::plain(name, vec![lade_testkit::hostile::raw_tar(members)])
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_are_refused_by_the_agent_and_stay_inside_with_containerd() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    use lade_testkit::hostile::Member;
    let outside = tempfile::tempdir()?;
    let out = outside.path().to_str().context("utf-8")?;
    let via: &'static str = Box::leak(format!("{out}/").into_boxed_str());
    let cases: Vec<(&str, Vec<Member>, &str)> = vec![
        (
            "x.io/hostile/dotdot:1",
            vec![Member::file("../../../../../../../../../../../tmp/x", "x")],
            "climbs out of the root",
        ),
        (
            "x.io/hostile/through-symlink:1",
            vec![
                Member::symlink("escape", via),
                Member::file("escape/planted", "x"),
            ],
            "below a symbolic link",
        ),
        (
            "x.io/hostile/hardlink-out:1",
            vec![Member::hardlink("shadow", "../../../../../../etc/shadow")],
            "hard link that climbs out",
        ),
    ];
    let images: Vec<OciImage> = cases
        .iter()
        .map(|(name, members, _)| hostile_image(name, members))
        .collect();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(&images))?;

    let by_agent = Node::start_with("hostile-agent", &["--unpack", "agent"]).await?;
    let (code, reports, stderr) = load_json(&path, &[by_agent.addr()], &["--no-layer-check"])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    let failed = lade_tests::failed_images(&reports[0])?;
    for (name, _, says) in &cases {
        let reason = failed
            .get(*name)
            .map(String::as_str)
            .unwrap_or("(did not fail)");
        assert!(reason.contains(says), "{name}: {reason}");
    }
    assert!(
        by_agent
            .image_names()?
            .iter()
            .all(|n| n.starts_with("sha256:")),
        "a refused image got a name"
    );
    assert_eq!(std::fs::read_dir(outside.path())?.count(), 0);

    // containerd keeps the same entries inside the snapshot (and names the images).
    let by_containerd = Node::start_with("hostile-ctrd", &["--unpack", "containerd"]).await?;
    let (_, reports, stderr) = load_json(&path, &[by_containerd.addr()], &["--no-layer-check"])?;
    assert_eq!(
        std::fs::read_dir(outside.path())?.count(),
        0,
        "{reports:#?}\n{stderr}"
    );
    Ok(())
}
