//! Hostile bundles against real nodes: the cases where the node's side matters. Each ends in
//! a named error and leaves the bad image without a name on the node (the reader-level cases
//! are `coordinator/tests/hostile.rs`). Needs containerd, runc and busybox-static (see
//! tests/load.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, ImageSpec, ImportRequest, PutBlobRequest,
};
use lade_testkit::fixtures::{
    blob_digest, image_config, random_layer, ArchiveFormat, Compression, ImageFixture, APP_IMAGE,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST,
};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::hostile::{
    escaping_layer, gzip_bomb, gzip_image, oci_layout, raw_tar, Member, OciImage,
};
use lade_testkit::nodes::{run_lade, Node};
use lade_tests::{dial, gcr_bundle, images, load_json, u64_of, write_images_tar};
use serde_json::json;

/// Names on the node, without the `sha256:` ones some tools add for image IDs.
fn names(node: &Node) -> Result<Vec<String>> {
    Ok(node
        .image_names()?
        .into_iter()
        .filter(|n| !n.starts_with("sha256:"))
        .collect())
}

/// Loads `path` onto `node` with `flags`, expecting `image` to be the one failure while
/// `loaded` images load; returns why it failed.
fn only_failure(
    path: &Path,
    node: &Node,
    flags: &[&str],
    image: &str,
    loaded: u64,
) -> Result<String> {
    let (code, reports, stderr) = load_json(path, &[node.addr()], flags)?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["images_loaded"], loaded, "{reports:#?}");
    let failed = &reports[0]["failed_images"];
    assert_eq!(failed.as_array().map(Vec::len), Some(1), "{reports:#?}");
    assert_eq!(failed[0]["image"], image, "{reports:#?}");
    Ok(failed[0]["reason"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_unpacking_to_another_diff_id_gets_no_name() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // The app image's config claims its own layer has the base layer's diffID. Every digest
    // in the bundle is right, so the upload goes through; only unpacking shows the lie.
    let mut imgs = images()?;
    let true_ids = imgs[0].diff_ids();
    let claimed = vec![true_ids[0].clone(), true_ids[0].clone()];
    imgs[0].config = image_config(&claimed, &["/bin/sh"]);
    let dir = tempfile::tempdir()?;
    let (bundle, written) = gcr_bundle(dir.path(), "diffid.bundle.tar", &imgs, Compression::Gzip)?;
    let layer = &written.images[0].layers[1].digest;

    // For a node whose containerd unpacks, the coordinator's layer check unpacks the layer
    // while it uploads and holds back its last chunk: the node never holds it.
    let node = Node::start_with("diffid-ctrd", &["--unpack", "containerd"]).await?;
    let reason = only_failure(&bundle, &node, &[], APP_IMAGE, 2)?;
    assert!(
        reason.contains(&format!("layer 2 of {APP_IMAGE}"))
            && reason.contains(&format!("unpacks to diffID {}", true_ids[1]))
            && reason.contains(&format!("the image config says {}", true_ids[0])),
        "{reason}"
    );
    let content = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert!(!content.contains(layer.as_str()), "{content}");
    assert!(!names(&node)?.contains(&APP_IMAGE.to_string()));

    // Without that check the node's own unpack finds the lie, and still names nothing; so
    // does an agent that unpacks layers itself, with no check on the coordinator.
    let by_agent = Node::start("diffid").await?;
    for (node, flags) in [(&node, &["--no-layer-check"][..]), (&by_agent, &[][..])] {
        // The other two images load: one bad image fails alone, named in the node's report.
        let reason = only_failure(&bundle, node, flags, APP_IMAGE, 2)?;
        assert!(
            reason.contains(layer)
                && reason.contains(&format!("unpacked to {}", true_ids[1]))
                && reason.contains(&format!("the config says its diffID is {}", true_ids[0])),
            "{reason}"
        );
        let names = names(node)?;
        assert!(!names.contains(&APP_IMAGE.to_string()), "{names:?}");
        // The refused layer's scratch snapshot was removed, not left active.
        let snapshots = node
            .containerd
            .ctr_ok(&["-n", "k8s.io", "snapshots", "ls"])?;
        assert!(!snapshots.contains("extract-"), "{snapshots}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_layer_media_type_is_refused_before_any_node_is_contacted() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let name = "x.io/hostile/wrong-type:1";
    let mut image = OciImage::plain(name, vec![escaping_layer("/nowhere")]);
    image.layers[0].0 = MEDIA_TYPE_OCI_CONFIG.into();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(&[image]))?;
    let node = Node::start("wrong-type").await?;
    let out = run_lade(&[
        "load",
        path.to_str().context("utf-8 path")?,
        "--agent",
        &node.addr(),
        "--progress",
        "none",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(name)
            && stderr.contains(MEDIA_TYPE_OCI_CONFIG)
            && stderr.contains("layer 1"),
        "{stderr}"
    );
    assert_eq!(names(&node)?, Vec::<String>::new());
    let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
    assert!(
        !leases.contains("lade-"),
        "the node was contacted: {leases}"
    );
    Ok(())
}

/// Uploads `bytes` to the agent as a blob of `media_type` under `session`.
async fn put(
    client: &mut lade::load::AgentConn,
    session: &str,
    bytes: &[u8],
    media_type: &str,
) -> Result<Descriptor> {
    let desc = Descriptor {
        digest: blob_digest(bytes),
        size: bytes.len() as u64,
        media_type: media_type.into(),
        diff_id: String::new(),
    };
    let messages = vec![
        PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: session.into(),
                blob: Some(desc.clone()),
                offset: 0,
                unpack: None,
                ..Default::default()
            })),
        },
        PutBlobRequest {
            msg: Some(Msg::Chunk(bytes.to_vec().into())),
        },
    ];
    client.put_blob(tokio_stream::iter(messages)).await?;
    Ok(desc)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_given_a_wrong_layer_media_type_directly_creates_no_name() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // What a coordinator without lade's checks could send: the agent is the last line.
    let node = Node::start("direct-type").await?;
    let mut client = lade::load::connect(&node.addr(), &dial()).await?;
    let session = "hostile-direct";
    let layer = escaping_layer("/nowhere");
    let config = image_config(&[blob_digest(&layer)], &["/bin/sh"]);
    let layer_desc = put(&mut client, session, &layer, MEDIA_TYPE_OCI_CONFIG).await?;
    let config_desc = put(&mut client, session, &config, MEDIA_TYPE_OCI_CONFIG).await?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": config_desc.digest, "size": config_desc.size},
        "layers": [{"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": layer_desc.digest, "size": layer_desc.size}],
    }))?;
    let manifest_desc = put(&mut client, session, &manifest, MEDIA_TYPE_OCI_MANIFEST).await?;
    let name = "x.io/hostile/direct:1";
    let mut events = client
        .import(ImportRequest {
            session: session.into(),
            images: vec![ImageSpec {
                manifest: Some(manifest_desc),
                names: vec![name.into()],
                source: name.into(),
                allow_overwrite: false,
            }],
        })
        .await?
        .into_inner();
    // A failed image is reported by an event; the call itself succeeds for the others.
    let mut failure = None;
    while let Some(event) = events.message().await? {
        if event.phase == lade_proto::ImportPhase::ImageFailed as i32 {
            failure = Some(event.message);
        }
    }
    let failure = failure.expect("a layer typed as a config was imported");
    assert!(
        failure.contains(&layer_desc.digest) && failure.contains("not a layer type"),
        "{failure}"
    );
    assert_eq!(names(&node)?, Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn layer_entries_aiming_outside_the_snapshot_stay_inside_it() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // Three defences, each checked for real: the coordinator's layer check refuses the layer
    // by entry before any node keeps it; with that check off, the agent's own applier refuses
    // it by entry; and containerd's applier (`--unpack containerd`) keeps `..` names and
    // writes through symlinks inside the snapshot.
    let target = tempfile::tempdir()?;
    let target_dir = target.path().to_str().context("utf-8 path")?.to_string();
    let name = "x.io/hostile/escape:1";
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(
        &path,
        oci_layout(&[OciImage::plain(name, vec![escaping_layer(&target_dir)])]),
    )?;
    let nothing_outside = || -> Result<()> {
        let outside: Vec<_> = std::fs::read_dir(target.path())?.collect();
        assert!(
            outside.is_empty(),
            "the layer wrote outside its snapshot: {outside:?}"
        );
        assert!(!Path::new(&target_dir).join("climbed").exists());
        Ok(())
    };
    // The coordinator checks layers for a node whose containerd unpacks them.
    let by_containerd = Node::start_with("escape-ctrd", &["--unpack", "containerd"]).await?;
    let reason = only_failure(&path, &by_containerd, &[], name, 0)?;
    assert!(
        reason.contains("member") && reason.contains("climbs out of the root"),
        "{reason}"
    );
    assert_eq!(names(&by_containerd)?, Vec::<String>::new());

    // An agent that unpacks layers itself refuses it as it writes it.
    let by_agent = Node::start("escape").await?;
    let reason = only_failure(&path, &by_agent, &[], name, 0)?;
    assert!(
        reason.contains("cannot be unpacked") && reason.contains("climbs out of the root"),
        "{reason}"
    );
    nothing_outside()?;
    assert_eq!(names(&by_agent)?, Vec::<String>::new());

    let (code, reports, stderr) = load_json(&path, &[by_containerd.addr()], &["--no-layer-check"])?;
    nothing_outside()?;
    // containerd rewrote the paths into the snapshot, so the image itself is valid.
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert!(names(&by_containerd)?.contains(&name.to_string()));
    Ok(())
}

/// A tmpfs of `mib` MiB mounted over `dir` for the life of the guard.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> Result<SmallDisk> {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?;
        anyhow::ensure!(status.success(), "mounting a tmpfs on {}", dir.display());
        Ok(SmallDisk(dir.to_path_buf()))
    }

    /// Bytes in use, as `statfs` counts them.
    fn used(&self) -> Result<u64> {
        let out = Command::new("df")
            .args(["-B1", "--output=used"])
            .arg(&self.0)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("df said {text}"))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_bomb_larger_than_the_disk_fails_cleanly_and_gives_the_space_back() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // Under the expansion limit (256 MiB for any layer), an applier decompresses whatever it
    // is given: the limit on the node is its disk. Here the snapshots live on a 16 MiB disk
    // and the layer holds 64 MiB of zeros in about 70 KiB, with its true diffID. Both
    // appliers, the agent's and containerd's.
    for (unpacker, says) in [
        ("agent", "cannot be unpacked"),
        ("containerd", "Diff.Apply"),
    ] {
        gzip_bomb_fills_the_disk(unpacker, says).await?;
    }
    Ok(())
}

async fn gzip_bomb_fills_the_disk(unpacker: &str, says: &str) -> Result<()> {
    let name = "x.io/hostile/bomb:1";
    let (blob, diff_id) = gzip_bomb(64);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(&[gzip_image(name, blob, &diff_id)]))?;
    let node = Node::start_with(&format!("bomb-{unpacker}"), &["--unpack", unpacker]).await?;
    let snapshots = node
        .containerd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let disk = SmallDisk::mount(&snapshots, 16)?;
    let before = disk.used()?;

    let reason = only_failure(&path, &node, &[], name, 0)?;
    assert!(
        reason.contains(says) && reason.to_lowercase().contains("no space left on device"),
        "{unpacker}: {reason}"
    );
    assert_eq!(names(&node)?, Vec::<String>::new());
    // The half-unpacked snapshot was removed: the node gets its space back once containerd's
    // garbage collector deletes the files of removed snapshots (asynchronous, within seconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while disk.used()? != before && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(disk.used()?, before);
    let active = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "snapshots", "ls"])?;
    assert!(!active.contains("extract-"), "{active}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_bomb_past_the_expansion_limit_is_stopped_and_not_kept() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // 512 MiB of zeros in a few hundred KiB: past the 256 MiB any layer may unpack to.
    // - An agent that unpacks layers itself stops one byte past that limit, commits no
    //   snapshot and deletes the blob.
    // - For a node whose containerd unpacks (`--unpack containerd`), the coordinator checks
    //   the layer instead, stops at the same limit and holds back the upload's last chunk,
    //   so the node never keeps the blob.
    // Either way the image next to it loads.
    for unpacker in ["agent", "containerd"] {
        big_bomb_is_refused(unpacker).await?;
    }
    Ok(())
}

async fn big_bomb_is_refused(unpacker: &str) -> Result<()> {
    let bomb_name = "x.io/hostile/big-bomb:1";
    let good_name = "x.io/hostile/fine:1";
    let (blob, diff_id) = gzip_bomb(512);
    let bomb_digest = blob_digest(&blob);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(
        &path,
        oci_layout(&[
            gzip_image(bomb_name, blob, &diff_id),
            OciImage::plain(good_name, vec![raw_tar(&[Member::file("ok", "fine\n")])]),
        ]),
    )?;
    let node = Node::start_with(&format!("big-bomb-{unpacker}"), &["--unpack", unpacker]).await?;
    let reason = only_failure(&path, &node, &[], bomb_name, 1)?;
    assert!(
        reason.contains("decompression bomb")
            && reason.contains(&format!("more than {} bytes", 256u64 << 20))
            && reason.contains(bomb_name),
        "{unpacker}: {reason}"
    );
    assert_eq!(names(&node)?, vec![good_name.to_string()]);
    let content = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert!(!content.contains(&bomb_digest), "{unpacker}: {content}");
    let snapshots = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "snapshots", "ls"])?;
    assert!(!snapshots.contains("extract-"), "{unpacker}: {snapshots}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_room_is_refused_before_anything_is_sent_and_others_load() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // 8 MiB of random bytes unpack to 8 MiB; the cramped node's snapshots live on 4 MiB.
    let name = "x.io/space/big:1";
    let image = ImageFixture::new(name, vec![random_layer(7, 8 << 20, 0.0)], &["/bin/sh"]);
    let dir = tempfile::tempdir()?;
    let (path, _) = write_images_tar(dir.path(), &[image], ArchiveFormat::Gcr, Compression::Gzip)?;
    let roomy = Node::start("roomy").await?;
    let cramped = Node::start("cramped").await?;
    let snapshots = cramped
        .containerd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let _disk = SmallDisk::mount(&snapshots, 4)?;
    let agents = [roomy.addr(), cramped.addr()];

    let (code, reports, stderr) = load_json(&path, &agents, &[])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["ok"], true, "{reports:#?}");
    assert!(names(&roomy)?.contains(&name.to_string()));
    let error = reports[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("node cramped")
            && error.contains("unpacked layers")
            && error.contains(&snapshots.display().to_string())
            && error.contains("which has 4.00 MiB free")
            && error.contains("nothing was sent"),
        "{error}"
    );
    assert_eq!(u64_of(&reports[1], "bytes_sent"), 0, "{reports:#?}");
    let content = cramped
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert_eq!(content.trim(), "", "blobs reached the cramped node");

    // Told to go ahead anyway, the node's disk fills while unpacking: the image fails on that
    // node by name, gets no name there, and the summary says why.
    let (code, reports, stderr) = load_json(&path, &[cramped.addr()], &["--no-space-check"])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    let failed = &reports[0]["failed_images"][0];
    assert_eq!(failed["image"], name, "{reports:#?}");
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.to_lowercase().contains("no space left on device"),
        "{reason}"
    );
    assert_eq!(names(&cramped)?, Vec::<String>::new());
    Ok(())
}
