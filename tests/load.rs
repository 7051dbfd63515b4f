//! `lade load` end to end: the real `lade` and `lade-agent` binaries against private
//! containerd instances, one per simulated node. Needs containerd, runc and busybox-static
//! (`scripts/test` installs them); fails when they are missing unless
//! LADE_SKIP_DAEMON_TESTS=1 says to skip.

use anyhow::{ensure, Context, Result};
use lade::bundle::Bundle;
use lade_testkit::cri;
use lade_testkit::fixtures::{ArchiveFormat, Compression, APP_HELLO};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{run_lade, Node};
use lade_tests::names::{
    APP, APP_RETAGGED, BUSYBOX, BUSYBOX_RETAGGED, RETAG_DEMO, RETAG_LIBRARY, SIDECAR,
    SIDECAR_RETAGGED,
};
use lade_tests::{
    damaged_sample_bundle, gcr_bundle, images, images_and_big, load, load_archive_form, load_json,
    sample_bundle, start_nodes, u64_of,
};
use serde_json::Value;

/// CRI's ImageStatus of `image` on `node`, waiting up to 5 s for the CRI plugin to see a
/// record lade just created.
async fn cri_image_status(node: &Node, image: &str) -> Result<Option<cri::CriImage>> {
    for _ in 0..50 {
        if let Some(seen) = cri::image_status(&node.containerd.socket(), image).await? {
            return Ok(Some(seen));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(None)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_get_every_image_and_retag_then_nothing_is_resent() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle, _) = gcr_bundle(dir.path(), "demo.bundle.tar", &imgs, Compression::Gzip)?;
    let unique_bytes = Bundle::open(&bundle)?.total_bytes();
    let nodes = start_nodes(&["node-a", "node-b", "node-c"]).await?;
    let refs: Vec<&Node> = nodes.iter().collect();

    let retag = ["--retag", RETAG_DEMO, "--retag", RETAG_LIBRARY];
    let (code, reports, stderr) = load(&bundle, &refs, &retag)?;
    ensure!(code == 0, "first load failed: {reports:#?}\n{stderr}");
    let tags = [
        APP,
        APP_RETAGGED,
        SIDECAR,
        SIDECAR_RETAGGED,
        BUSYBOX,
        BUSYBOX_RETAGGED,
    ];
    // Each repository also gets its digest reference, as a registry pull records it.
    let opened = Bundle::open(&bundle)?;
    let manifest_of = |tag: &str| -> String {
        let base = tag.rsplit('/').next().unwrap_or(tag);
        let repo = base.split(':').next().unwrap_or(base);
        opened
            .images
            .iter()
            .find(|i| {
                i.names.iter().any(|n| {
                    lade::reference::Reference::parse(n)
                        .is_ok_and(|r| r.to_string().contains(&format!("/{repo}:")))
                })
            })
            .map(|i| i.manifest.clone())
            .unwrap_or_default()
    };
    let digest_ref = |tag: &str| {
        let repo = &tag[..tag.rfind(':').expect("a tagged name")];
        format!("{repo}@{}", manifest_of(tag))
    };
    let mut expected: Vec<String> = tags
        .iter()
        .flat_map(|t| [t.to_string(), digest_ref(t)])
        .collect();
    expected.sort();
    for (node, report) in nodes.iter().zip(&reports) {
        assert_eq!(report["node"], node.name.as_str());
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 3);
        assert_eq!(u64_of(report, "bytes_sent"), unique_bytes, "{report}");
        // CRI adds a `sha256:<config>` record per image it sees; everything else is lade's.
        let (ids, names): (Vec<String>, Vec<String>) = node
            .all_image_names()?
            .into_iter()
            .partition(|n| n.starts_with("sha256:"));
        assert_eq!(names, expected, "names on {}", node.name);
        // The summary says, per image, the digest its names point at and every name made.
        let loaded = report["loaded_images"].as_array().expect("loaded_images");
        assert_eq!(loaded.len(), 3, "{report}");
        let mut reported: Vec<String> = Vec::new();
        for image in loaded {
            let digest = image["digest"].as_str().unwrap_or_default();
            for name in image["names"].as_array().expect("names") {
                let name = name.as_str().unwrap_or_default();
                if let Some((_, pinned)) = name.split_once('@') {
                    assert_eq!(pinned, digest, "{image}");
                }
                reported.push(name.to_string());
            }
        }
        reported.sort();
        assert_eq!(reported, expected, "loaded_images of {}", node.name);
        let mut configs: Vec<String> = imgs.iter().map(|i| i.config_digest()).collect();
        configs.sort();
        assert_eq!(ids, configs, "CRI image ids on {}", node.name);
        // Where the content came from, per registry, as `ctr pull` records it (for mirrors).
        let content = node.containerd.ctr_ok(&["-n", "k8s.io", "content", "ls"])?;
        let manifest_line = content
            .lines()
            .find(|l| l.contains("containerd.io/gc.ref.content.config") && l.contains("demo/app"))
            .with_context(|| format!("no labelled app manifest on {}:\n{content}", node.name))?;
        assert!(
            manifest_line.contains("containerd.io/distribution.source.10.16.10.111=demo/app")
                && manifest_line
                    .contains("containerd.io/distribution.source.release.daocloud.io=demo/app"),
            "{manifest_line}"
        );
        // The CRI pin label is set where containerd honours it (1.7.3 on) and not on 1.6,
        // which predates it; the report says which. CRI's `pinned` below checks it took.
        let pins = node.containerd.version().honours_cri_pin_label();
        assert_eq!(report["images_pinned"], pins, "{report}");
        let listing = node.containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"])?;
        assert_eq!(
            listing.contains("io.cri-containerd.pinned=pinned"),
            pins,
            "containerd {} on {}: {listing}",
            node.containerd.version(),
            node.name
        );
        // The load's session lease was released: the image records and the load's record of
        // the bundle version (a lade-hold lease, see docs/lifecycle.md) hold everything now.
        let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
        assert!(!leases.contains("lade-load-"), "{}: {leases}", node.name);
        assert!(
            leases.contains("lade-hold.") && leases.contains("lade.io/hold.bundle=demo"),
            "{}: {leases}",
            node.name
        );
        // containerd itself finds all content of every image present.
        let check = node
            .containerd
            .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
        for line in check.lines().skip(1) {
            assert!(line.contains("complete"), "{}: {line}", node.name);
        }
        // What kubelet would see, through the CRI plugin on the same socket.
        let seen = cri_image_status(node, APP_RETAGGED)
            .await?
            .with_context(|| format!("CRI on {} does not know {APP_RETAGGED}", node.name))?;
        assert_eq!(seen.id, imgs[0].config_digest());
        assert!(
            seen.repo_tags.contains(&APP_RETAGGED.to_string()),
            "{:?}",
            seen.repo_tags
        );
        assert_eq!(
            seen.pinned,
            pins,
            "CRI pinned on {} (containerd {})",
            node.name,
            node.containerd.version()
        );
        // A pod pinning the image by digest finds it, and CRI lists the digest reference.
        let pinned_ref = digest_ref(APP_RETAGGED);
        assert!(seen.repo_digests.contains(&pinned_ref), "{seen:?}");
        let by_digest = cri::image_status(&node.containerd.socket(), &pinned_ref)
            .await?
            .with_context(|| format!("CRI on {} does not know {pinned_ref}", node.name))?;
        assert_eq!(by_digest.id, seen.id);
    }

    // A loaded image runs: the app layer's file is there on top of busybox.
    let out = nodes[1].run_container(
        APP_RETAGGED,
        "smoke",
        &["/bin/busybox", "cat", "/app/hello.txt"],
    )?;
    assert_eq!(out.as_bytes(), APP_HELLO);
    let out = nodes[2].run_container(BUSYBOX_RETAGGED, "echo", &["/bin/echo", "ok"])?;
    assert_eq!(out.trim(), "ok");

    // Second run of the same bundle: nothing crosses the network again.
    let (code, reports, stderr) = load(&bundle, &refs, &retag)?;
    ensure!(code == 0, "second load failed: {reports:#?}\n{stderr}");
    for report in &reports {
        assert_eq!(u64_of(report, "bytes_sent"), 0, "{report}");
        assert_eq!(u64_of(report, "blobs_sent"), 0, "{report}");
        assert_eq!(u64_of(report, "bytes_skipped"), unique_bytes, "{report}");
    }
    Ok(())
}

/// The agent unpacks into the snapshotter CRI keeps images in by default (`--snapshotter
/// auto` asks CRI's image filesystem): with CRI on `native`, what lade loads is unpacked there
/// and nothing into overlayfs; an agent told `--snapshotter overlayfs` on that node says in
/// its log that CRI uses another one.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_unpacks_into_the_snapshotter_cri_uses() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle, _) = gcr_bundle(dir.path(), "cri-sn.bundle.tar", &imgs, Compression::Gzip)?;
    let containerd =
        lade_testkit::harness::Containerd::start_with_cri_snapshotter("cri-sn", "native").await?;
    let node = Node::start_on("cri-sn", containerd, &[]).await?;
    let (code, reports, stderr) = load(&bundle, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let snapshots = |sn: &str| -> Result<usize> {
        let out =
            node.containerd
                .ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", sn, "ls"])?;
        Ok(out.lines().skip(1).count())
    };
    ensure!(
        snapshots("native")? > 0,
        "nothing unpacked into CRI's native"
    );
    ensure!(
        snapshots("overlayfs")? == 0,
        "layers unpacked into overlayfs"
    );
    let log = std::fs::read_to_string(node.containerd.dir().join("agent.log"))?;
    ensure!(
        log.contains("unpacking into the snapshotter CRI keeps images in")
            && log.contains("native"),
        "{log}"
    );
    let out = node.run_container_on("native", BUSYBOX, "cri-sn-run", &["/bin/echo", "ok"])?;
    assert_eq!(out.trim(), "ok");
    drop(node);

    let containerd =
        lade_testkit::harness::Containerd::start_with_cri_snapshotter("cri-sn2", "native").await?;
    let told = Node::start_on("cri-sn2", containerd, &["--snapshotter", "overlayfs"]).await?;
    let log = std::fs::read_to_string(told.containerd.dir().join("agent.log"))?;
    ensure!(
        log.contains("differs from the snapshotter CRI keeps images in"),
        "{log}"
    );
    Ok(())
}

/// A CRI runtime handler may name a snapshotter of its own (containerd 1.7 and later, the
/// handler's `snapshotter`). CRI then makes the pod's containers there, and when the image
/// is not unpacked on that snapshotter it unpacks it first from the content store
/// (`WithNewSnapshot` in CRI's container options falls back to `Image.Unpack`, as `ctr run`
/// does). The agent unpacks into `--snapshotter` only, so what it loaded must be whole in the
/// content store for that: containerd itself unpacks each image lade loaded into `native`
/// and runs it. The matrix runs this on every containerd version, and with
/// `discard_unpacked_layers` (where CRI's own pulls drop the blobs after unpacking them).
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_handler_snapshotter_unpacks_what_lade_loaded() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle, _) = gcr_bundle(dir.path(), "handler.bundle.tar", &imgs, Compression::Gzip)?;
    let node = Node::start("handler").await?;
    let (code, reports, stderr) = load(&bundle, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let native = |node: &Node| {
        node.containerd
            .ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", "native", "ls"])
    };
    let before = native(&node)?;
    ensure!(
        before.lines().count() <= 1,
        "the agent unpacked into native, which it was not asked to: {before}"
    );
    let out = node.run_container_on("native", BUSYBOX, "on-native", &["/bin/echo", "ok"])?;
    assert_eq!(out.trim(), "ok");
    // The app's own layer, unpacked there on top of the base.
    let cat = ["/bin/busybox", "cat", "/app/hello.txt"];
    let out = node.run_container_on("native", APP, "app-on-native", &cat)?;
    assert_eq!(out.as_bytes(), APP_HELLO);
    let after = native(&node)?;
    ensure!(
        after.lines().count() > 1,
        "containerd unpacked nothing into native: {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_archive_form_loads_and_runs() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let imgs = images()?;
    let forms = [
        (ArchiveFormat::DockerSave, Compression::None),
        (ArchiveFormat::Oci, Compression::Zstd),
        (ArchiveFormat::Docker25, Compression::Gzip),
        (ArchiveFormat::Gcr, Compression::None),
    ];
    for (i, (format, compression)) in forms.into_iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let node = Node::start(&format!("form-{i}")).await?;
        // A bare images.tar, as `docker save` or `skopeo` leave it.
        let archive = load_archive_form(dir.path(), &imgs, format, compression, &node.addr())?;
        let expected = Bundle::open(&archive)?;
        // Each name points at the manifest lade derived from this very archive.
        let listing = node.containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"])?;
        for image in &expected.images {
            let name = lade::reference::Reference::parse(&image.names[0])?.to_string();
            let line = listing
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .with_context(|| format!("{format:?}: {name} missing:\n{listing}"))?;
            assert!(line.contains(&image.manifest), "{format:?}: {line}");
            // A pod pinning the image by that digest finds it through CRI, which lists the
            // digest reference.
            let pinned = format!(
                "{}@{}",
                lade::reference::Reference::parse(&name)?.repository(),
                image.manifest
            );
            let seen = cri_image_status(&node, &pinned)
                .await?
                .with_context(|| format!("{format:?}: CRI does not know {pinned}"))?;
            assert_eq!(seen.id, image.config, "{format:?}: {pinned}");
            assert!(seen.repo_digests.contains(&pinned), "{format:?}: {seen:?}");
        }
        let out = node.run_container(BUSYBOX, &format!("run-{i}"), &["/bin/echo", "ok"])?;
        assert_eq!(out.trim(), "ok", "{format:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn altered_layer_is_refused_by_name_and_no_image_appears() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The app image's own layer is damaged inside the nested images.tar.
    let (bundle_path, layer_digest, member) = damaged_sample_bundle(dir.path())?;

    let node = Node::start("victim").await?;
    let (code, reports, stderr) = load(&bundle_path, &[&node], &[])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    // The damaged image fails alone, by name; the images that do not use the layer load.
    assert_eq!(reports[0]["error"], Value::Null, "{reports:#?}");
    assert_eq!(reports[0]["images_loaded"], 2, "{reports:#?}");
    let failed = reports[0]["failed_images"]
        .as_array()
        .context("failed_images")?;
    assert_eq!(failed.len(), 1, "{reports:#?}");
    assert_eq!(failed[0]["image"], APP, "{reports:#?}");
    let error = failed[0]["reason"].as_str().unwrap_or_default();
    assert!(error.contains(&member), "{error}");
    assert!(error.contains(&format!("layer 2 of {APP}")), "{error}");
    assert!(error.contains("altered"), "{error}");
    // The session's lease stays, holding the intact uploads for a retry until it expires.
    let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
    assert!(leases.contains("lade-load-"), "{leases}");
    // Nothing half-done is visible: the damaged image has no name, and the damaged blob was
    // never committed.
    let names = node.image_names()?;
    assert!(!names.contains(&APP.to_string()), "{names:?}");
    assert!(names.contains(&SIDECAR.to_string()), "{names:?}");
    assert!(names.contains(&BUSYBOX.to_string()), "{names:?}");
    let content = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert!(!content.contains(&layer_digest), "{content}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_agent_fails_alone_and_is_named() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let mut nodes = start_nodes(&["up-1", "down", "up-2"]).await?;
    nodes[1].agent.kill();
    let down = nodes[1].addr();
    let refs: Vec<&Node> = nodes.iter().collect();

    let (code, reports, stderr) = load(&bundle, &refs, &[])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["ok"], true, "{}", reports[0]);
    assert_eq!(reports[2]["ok"], true, "{}", reports[2]);
    assert_eq!(reports[1]["ok"], false);
    let error = reports[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&down) && error.contains("cannot reach agent"),
        "{error}"
    );
    assert_eq!(reports[1]["error_kind"], "connect", "{}", reports[1]);
    assert_eq!(
        nodes[0]
            .image_names()?
            .iter()
            .filter(|n| !n.starts_with("sha256:"))
            .count(),
        3
    );

    // The human summary says which node to retry and why.
    let mut args = vec![
        "load".to_string(),
        bundle.display().to_string(),
        "--progress".into(),
        "none".into(),
    ];
    for n in &nodes {
        args.extend(["--agent".to_string(), n.addr()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("FAILED") && table.contains(&format!("--agent {down}")),
        "{table}"
    );
    assert!(table.contains("1 of 3 nodes failed"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_holding_half_the_layers_receives_only_the_rest() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    // First only busybox (the base layer all three share), as an older bundle would have it.
    let (small, _) = gcr_bundle(dir.path(), "old.bundle.tar", &imgs[2..], Compression::Gzip)?;
    let (full, _) = gcr_bundle(dir.path(), "new.bundle.tar", &imgs, Compression::Gzip)?;
    let node = Node::start("half").await?;
    let (code, reports, stderr) = load(&small, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");

    let held = Bundle::open(&small)?;
    let all = Bundle::open(&full)?;
    let expected_sent: u64 = all
        .blobs
        .values()
        .filter(|b| !held.blobs.contains_key(&b.digest))
        .map(|b| b.size)
        .sum();
    let already: u64 = all
        .blobs
        .values()
        .filter(|b| held.blobs.contains_key(&b.digest))
        .map(|b| b.size)
        .sum();
    assert!(already > 0 && expected_sent > 0);
    let (code, reports, stderr) = load(&full, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(
        u64_of(&reports[0], "bytes_sent"),
        expected_sent,
        "{}",
        reports[0]
    );
    assert_eq!(
        u64_of(&reports[0], "bytes_skipped"),
        already,
        "{}",
        reports[0]
    );
    assert_eq!(u64_of(&reports[0], "images_loaded"), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_upload_resumes_from_the_bytes_the_node_kept() -> Result<()> {
    use lade_proto::{put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, PutBlobRequest};

    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // A layer of a few MiB, so an upload can stop after its first chunk.
    let imgs = images_and_big(7, &[3 << 20])?;
    let (bundle_path, written) =
        gcr_bundle(dir.path(), "big.bundle.tar", &imgs, Compression::None)?;
    let bundle = Bundle::open(&bundle_path)?;
    let big = written.images[3].layers[1].clone();
    assert!(big.size > 2 * lade_proto::CHUNK_SIZE as u64);
    let node = Node::start("resume").await?;

    // Send the header and one chunk, then hang up, as a coordinator that died would.
    let mut client = lade::load::connect(&node.addr(), &lade_tests::dial()).await?;
    let desc = Descriptor {
        digest: big.digest.clone(),
        size: big.size,
        media_type: big.media_type.clone(),
        ..Default::default()
    };
    let mut reader = bundle.read_blob(&big.digest, 0)?;
    let first = reader
        .next_chunk(lade_proto::CHUNK_SIZE)?
        .expect("a first chunk");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(PutBlobRequest {
        msg: Some(Msg::Header(BlobHeader {
            session: "resume-test".into(),
            blob: Some(desc.clone()),
            offset: 0,
            unpack: None,
            ..Default::default()
        })),
    })
    .await?;
    tx.send(PutBlobRequest {
        msg: Some(Msg::Chunk(first.into())),
    })
    .await?;
    drop(tx);
    let interrupted = client
        .put_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let status = interrupted.expect_err("an incomplete blob must not be accepted");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");

    let have = client
        .have(HaveRequest {
            session: "resume-test".into(),
            blobs: vec![desc],
        })
        .await?
        .into_inner();
    assert!(!have.blobs[0].present);
    assert_eq!(have.blobs[0].offset, lade_proto::CHUNK_SIZE as u64);

    // The next load sends the rest of that blob only, and the image is whole.
    let (code, reports, stderr) = load(&bundle_path, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(
        u64_of(&reports[0], "bytes_skipped"),
        lade_proto::CHUNK_SIZE as u64
    );
    assert_eq!(
        u64_of(&reports[0], "bytes_sent"),
        bundle.total_bytes() - lade_proto::CHUNK_SIZE as u64
    );
    assert_eq!(u64_of(&reports[0], "images_loaded"), 4);
    let check = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    assert!(
        check.lines().skip(1).all(|l| l.contains("complete")),
        "{check}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_comes_up_late_is_retried_and_completes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let mut node = Node::start("late").await?;
    node.agent.kill();
    let agents = [node.addr()];
    let load = std::thread::spawn({
        let bundle = bundle.clone();
        move || load_json(&bundle, &agents, &["--retries", "4"])
    });
    // Down for the first attempt (and maybe the second); up before the retries run out.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.agent.restart().await?;
    let (code, reports, stderr) = load.join().expect("load thread")?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert!(u64_of(&reports[0], "attempts") >= 2, "{}", reports[0]);
    assert!(stderr.contains("retry 1 of 4"), "{stderr}");
    assert_eq!(u64_of(&reports[0], "images_loaded"), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_never_answers_times_out_alone() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let node = Node::start("prompt").await?;
    // Accepts TCP connections (the kernel does, from the backlog) but never speaks HTTP/2.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let silent_addr = silent.local_addr()?.to_string();
    let started = std::time::Instant::now();
    let (code, reports, stderr) = load_json(
        &bundle,
        &[node.addr(), silent_addr.clone()],
        &["--node-timeout", "3s", "--retries", "0"],
    )?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["ok"], true, "{}", reports[0]);
    let error = reports[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&silent_addr) && error.contains("no result within 3s"),
        "{error}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    drop(silent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_is_unpacked_as_soon_as_it_is_stored_and_a_wrong_hint_harms_nothing() -> Result<()>
{
    use lade_proto::{
        put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, PutBlobRequest, UnpackHint,
    };
    use lade_testkit::fixtures::blob_digest;
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle_path, written) = gcr_bundle(
        dir.path(),
        "ahead.bundle.tar",
        &images()?,
        Compression::Gzip,
    )?;
    let bundle = Bundle::open(&bundle_path)?;
    let app = &written.images[0];
    let node = Node::start("ahead").await?;
    let mut client = lade::load::connect(&node.addr(), &lade_tests::dial()).await?;
    let session = "ahead-test";
    let desc = |i: usize| Descriptor {
        digest: app.layers[i].digest.clone(),
        size: app.layers[i].size,
        media_type: app.layers[i].media_type.clone(),
        ..Default::default()
    };
    client
        .have(HaveRequest {
            session: session.into(),
            blobs: vec![desc(0), desc(1)],
        })
        .await?;
    let put = |i: usize, hint: UnpackHint| {
        let mut client = client.clone();
        let bundle = &bundle;
        async move {
            let mut bytes = Vec::new();
            let mut reader = bundle.read_blob(&app.layers[i].digest, 0)?;
            while let Some(c) = reader.next_chunk(lade_proto::CHUNK_SIZE)? {
                bytes.extend_from_slice(&c);
            }
            let msgs = vec![
                PutBlobRequest {
                    msg: Some(Msg::Header(BlobHeader {
                        session: session.into(),
                        blob: Some(desc(i)),
                        offset: 0,
                        unpack: Some(hint),
                        ..Default::default()
                    })),
                },
                PutBlobRequest {
                    msg: Some(Msg::Chunk(bytes.into())),
                },
            ];
            client.put_blob(tokio_stream::iter(msgs)).await?;
            anyhow::Ok(())
        }
    };
    let (d0, d1) = (&app.diff_ids[0], &app.diff_ids[1]);
    let chain1 = blob_digest(format!("{d0} {d1}").as_bytes());
    let snapshots = || {
        node.containerd
            .ctr_ok(&["-n", "k8s.io", "snapshots", "ls"])
            .unwrap_or_default()
    };

    // A hint whose diffID lies: the agent's unpack finds out and commits nothing under it.
    let liar = blob_digest(b"not the base layer");
    put(
        0,
        UnpackHint {
            diff_id: liar.clone(),
            parent_chain_id: String::new(),
        },
    )
    .await?;
    // Right hints: both layers become committed snapshots, named by chain ID, with no Import.
    put(
        1,
        UnpackHint {
            diff_id: d1.clone(),
            parent_chain_id: d0.clone(),
        },
    )
    .await?;
    put(
        0,
        UnpackHint {
            diff_id: d0.clone(),
            parent_chain_id: String::new(),
        },
    )
    .await?;
    let committed = |listed: &str, chain: &str| {
        listed
            .lines()
            .any(|l| l.starts_with(chain) && l.trim_end().ends_with("Committed"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !committed(&snapshots(), d0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listed = snapshots();
    assert!(committed(&listed, d0), "{listed}");
    assert!(!listed.contains(liar.as_str()), "{listed}");
    // The second layer's blob came before its parent was unpacked: it waits a little for the
    // parent, else leaves it to Import. Sent again now that its parent is there, it unpacks on
    // top of it (if it has not already).
    put(
        1,
        UnpackHint {
            diff_id: d1.clone(),
            parent_chain_id: d0.clone(),
        },
    )
    .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !committed(&snapshots(), &chain1) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listed = snapshots();
    assert!(committed(&listed, &chain1), "{listed}");
    // Nothing is named by unpacking ahead.
    assert_eq!(node.image_names()?, Vec::<String>::new());

    // A load afterwards finds what was unpacked ahead and completes.
    let (code, reports, stderr) = load(&bundle_path, &[&node], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let check = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    assert!(
        check.lines().skip(1).all(|l| l.contains("complete")),
        "{check}"
    );
    Ok(())
}
