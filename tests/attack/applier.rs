//! Attacks on the agent's layer applier through a plain `lade load` (real containerd, the
//! agent unpacking, as the chart deploys it): crafted layers aimed at a scratch directory
//! outside containerd's root. Each test fails with its defence in
//! `agent/src/runtime/containerd/apply.rs` disabled (the unit tests there name which).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use lade_testkit::harness::{daemon_tests_enabled, peak_rss};
use lade_testkit::hostile::{
    long_name_tar, oci_layout, raw_tar, sparse_map_tar, sparse_tar, Member, OciImage,
};
use lade_testkit::nodes::Node;
use lade_tests::load_json;

/// A scratch directory outside every snapshot holding one file, `victim` (0644, "keep").
struct Outside {
    dir: tempfile::TempDir,
}

impl Outside {
    fn new() -> Result<Outside> {
        let dir = tempfile::tempdir()?;
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep")?;
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644))?;
        Ok(Outside { dir })
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().expect("a UTF-8 temp dir")
    }

    fn victim(&self) -> String {
        format!("{}/victim", self.path())
    }

    /// Nothing was added, removed, rewritten or re-moded here.
    fn assert_untouched(&self, context: &str) -> Result<()> {
        let names: Vec<_> = std::fs::read_dir(self.dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(names, ["victim"], "{context}");
        let victim = self.dir.path().join("victim");
        let meta = std::fs::symlink_metadata(&victim)?;
        assert!(meta.is_file(), "{context}: victim is no longer a file");
        assert_eq!(meta.mode() & 0o7777, 0o644, "{context}: victim re-moded");
        assert_eq!(std::fs::read_to_string(&victim)?, "keep", "{context}");
        Ok(())
    }
}

/// Loads `images` (an OCI layout) onto `node` without the coordinator's own layer check, so
/// the agent alone stands between the layers and the node; returns image → failure reason.
fn load(node: &Node, images: &[OciImage]) -> Result<(HashMap<String, String>, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(images))?;
    let (_, reports, stderr) = load_json(Path::new(&path), &[node.addr()], &["--no-layer-check"])?;
    let failed = lade_tests::failed_images(&reports[0])?;
    Ok((failed, format!("{reports:#?}\n{stderr}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_link_to_a_symlink_of_the_layer_reaches_nothing_outside() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let out = Outside::new()?;
    let images = vec![
        // chmod 4777 through the second name of `s -> victim`.
        OciImage::plain(
            "x.io/attack/chmod-via-hardlink:1",
            vec![raw_tar(&[
                Member::symlink("s", &out.victim()),
                Member::hardlink("h", "s").with_mode(0o4777),
            ])],
        ),
        // A file written, and a whiteout made, below the second name of `s -> outside`.
        OciImage::plain(
            "x.io/attack/write-via-hardlink:1",
            vec![raw_tar(&[
                Member::symlink("s", out.path()),
                Member::hardlink("h", "s"),
                Member::file("h/owned", "x"),
            ])],
        ),
        OciImage::plain(
            "x.io/attack/whiteout-via-hardlink:1",
            vec![raw_tar(&[
                Member::symlink("s", out.path()),
                Member::hardlink("h", "s"),
                Member::file("h/.wh.victim", ""),
            ])],
        ),
    ];
    let node = Node::start_with("attack-hardlink", &["--unpack", "agent"]).await?;
    let (failed, report) = load(&node, &images)?;
    out.assert_untouched(&report)?;
    for refused in [
        "x.io/attack/write-via-hardlink:1",
        "x.io/attack/whiteout-via-hardlink:1",
    ] {
        let reason = failed.get(refused).map(String::as_str).unwrap_or("");
        assert!(
            reason.contains("below a symbolic link"),
            "{refused}: {report}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_layers_symlink_on_the_native_snapshotter_leads_nowhere_outside() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let out = Outside::new()?;
    // The native snapshotter copies layer 1 (with its symlinks) into layer 2's directory.
    let images = vec![
        OciImage::plain(
            "x.io/attack/native-write:1",
            vec![
                raw_tar(&[Member::symlink("x", out.path())]),
                raw_tar(&[Member::file("x/owned", "x")]),
            ],
        ),
        OciImage::plain(
            "x.io/attack/native-chmod:1",
            vec![
                raw_tar(&[Member::symlink("v", &out.victim())]),
                raw_tar(&[Member::file("v", "rewritten").with_mode(0o4777)]),
            ],
        ),
        OciImage::plain(
            "x.io/attack/native-whiteout:1",
            vec![
                raw_tar(&[Member::symlink("x", out.path())]),
                raw_tar(&[Member::file("x/.wh.victim", "")]),
            ],
        ),
    ];
    let node = Node::start_with(
        "attack-native",
        &["--unpack", "agent", "--snapshotter", "native"],
    )
    .await?;
    let (_, report) = load(&node, &images)?;
    out.assert_untouched(&report)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_entry_cannot_grow_the_node_past_the_expansion_limit() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // A few KiB of tar that claims 1 GiB: over the agent's floor of 256 MiB for a small layer.
    let bomb = sparse_tar("big", 1 << 30, b"end");
    let images = vec![OciImage::plain("x.io/attack/sparse:1", vec![bomb])];
    let node = Node::start_with("attack-sparse", &["--unpack", "agent"]).await?;
    let (failed, report) = load(&node, &images)?;
    let reason = failed
        .get("x.io/attack/sparse:1")
        .map(String::as_str)
        .unwrap_or("(did not fail)");
    assert!(reason.contains("decompression bomb"), "{report}");
    assert!(
        node.all_image_names()?
            .iter()
            .all(|n| !n.contains("x.io/attack/sparse")),
        "the refused image got a name"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_map_of_thousands_of_regions_is_refused_at_its_header() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // 500 extension blocks, 10,504 regions of 512 bytes over 21 MiB: under the expansion limit,
    // so only the bound on the map itself stops the tar crate's quadratic walk of it.
    let bomb = sparse_map_tar("map", 500);
    let images = vec![OciImage::plain("x.io/attack/sparse-map:1", vec![bomb])];
    let node = Node::start_with("attack-sparse-map", &["--unpack", "agent"]).await?;
    let (failed, report) = load(&node, &images)?;
    let reason = failed
        .get("x.io/attack/sparse-map:1")
        .map(String::as_str)
        .unwrap_or("(did not fail)");
    assert!(
        reason.contains("sparse") && reason.contains("limit") && reason.len() < 2000,
        "{report}"
    );
    assert!(
        node.all_image_names()?
            .iter()
            .all(|n| !n.contains("x.io/attack/sparse-map")),
        "the refused image got a name"
    );
    // A map within the bound is an ordinary sparse file: it loads.
    let fine = vec![OciImage::plain(
        "x.io/attack/sparse-small-map:1",
        vec![sparse_map_tar("map", 8)],
    )];
    let (failed, report) = load(&node, &fine)?;
    assert!(failed.is_empty(), "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_name_of_64_mib_is_refused_unread_and_unquoted() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start_with("attack-long-name", &["--unpack", "agent"]).await?;
    let before = peak_rss(node.agent.pid().context("agent pid")?)?;
    let images = vec![OciImage::plain(
        "x.io/attack/long-name:1",
        vec![long_name_tar(64 << 20)],
    )];
    let (failed, report) = load(&node, &images)?;
    let reason = failed
        .get("x.io/attack/long-name:1")
        .map(String::as_str)
        .unwrap_or("(did not fail)");
    // Refused at its header: named, short, and never held in the agent's memory.
    assert!(
        reason.contains("limit") && reason.len() < 2000,
        "{}",
        &report[..report.len().min(4000)]
    );
    let grown = peak_rss(node.agent.pid().context("agent pid")?)?.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the agent's peak memory grew by {grown} bytes"
    );
    assert!(
        node.all_image_names()?
            .iter()
            .all(|n| !n.contains("x.io/attack/long-name")),
        "the refused image got a name"
    );
    Ok(())
}

/// Every path below `dir` with its type, mode, owner, size, mtime and content hash: what a
/// layer shared by other images must keep.
fn fingerprint(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let m = std::fs::symlink_metadata(&path)?;
            let content = if m.is_file() {
                lade_testkit::fixtures::blob_digest(&std::fs::read(&path)?)
            } else {
                String::new()
            };
            if m.is_dir() {
                stack.push(path.clone());
            }
            out.push(format!(
                "{} {:o} {}:{} {} {} {content}",
                path.strip_prefix(dir)?.display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.len(),
                m.mtime()
            ));
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_on_a_shared_base_leave_the_base_snapshot_as_it_was() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let base = raw_tar(&[
        Member::dir("etc/"),
        Member::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        Member::symlink("etc/link", "passwd"),
    ]);
    let node = Node::start_with("attack-lower", &["--unpack", "agent"]).await?;
    load(
        &node,
        &[OciImage::plain("x.io/attack/base:1", vec![base.clone()])],
    )?;
    let chain = lade_testkit::fixtures::blob_digest(&base);
    let lower = lade_tests::layer_dirs(&node, &chain)?;
    let lower = lower.last().context("the base layer's directory")?;
    let before = fingerprint(lower)?;
    assert!(
        before.iter().any(|l| l.starts_with("etc/passwd ")),
        "{before:?}"
    );

    // Layers on top of that base that reach for its files: a hard link then chmod, a write
    // through its symlink, a chmod of its directory by re-declaring it, a whiteout of it.
    let attacks = [
        raw_tar(&[Member::hardlink("h", "etc/passwd").with_mode(0o4777)]),
        raw_tar(&[Member::file("etc/link", "rewritten").with_mode(0o4777)]),
        raw_tar(&[Member::dir("etc/").with_mode(0o777)]),
        raw_tar(&[Member::file("etc/.wh.passwd", "")]),
        raw_tar(&[Member::file("etc/.wh..wh..opq", "")]),
    ];
    let images: Vec<OciImage> = attacks
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            OciImage::plain(
                &format!("x.io/attack/on-base-{i}:1"),
                vec![base.clone(), layer.clone()],
            )
        })
        .collect();
    let (_, report) = load(&node, &images)?;
    assert_eq!(fingerprint(lower)?, before, "{report}");
    Ok(())
}
