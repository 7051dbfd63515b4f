//! Docker nodes end to end: the real `lade` and `lade-agent --runtime docker` against private
//! dockerds (each on its own private containerd), next to containerd nodes. Needs docker.io,
//! containerd, runc and busybox-static (`scripts/test` installs them); fails when they are
//! missing unless LADE_SKIP_DAEMON_TESTS=1 says to skip.

use std::ffi::{OsStr, OsString};

use anyhow::{ensure, Result};
use lade::bundle::{BlobSource, Bundle};
use lade_proto::InfoRequest;
use lade_testkit::fixtures::{
    blob_digest, image_config, layer_tar, normalize_ref, ArchiveFormat, Compression, Entry,
    ImageFixture, APP_HELLO, APP_IMAGE,
};
use lade_testkit::harness::{daemon_tests_enabled, free_port, Dockerd};
use lade_testkit::nodes::{spawn_agent, DockerNode, Node};
use lade_testkit::runtimes::DockerStore;
use lade_tests::names::{
    APP, APP_RETAGGED, BUSYBOX, BUSYBOX_RETAGGED, RETAG, SIDECAR, SIDECAR_RETAGGED,
};
use lade_tests::{docker_save_tar, gcr_bundle, images, load_archive_form, load_json, u64_of};

/// The hex part of a digest: the file name of a blob in the agent's cache.
fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_and_containerd_nodes_end_with_the_same_names_and_a_rerun_sends_nothing(
) -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle, written) = gcr_bundle(dir.path(), "demo.bundle.tar", &imgs, Compression::Gzip)?;
    let opened = Bundle::open(&bundle)?;
    let unique_bytes = opened.total_bytes();
    let docker = [
        DockerNode::start("docker-1").await?,
        DockerNode::start("docker-2").await?,
    ];
    let containerd = Node::start("ctr-1").await?;
    let agents = vec![docker[0].addr(), docker[1].addr(), containerd.addr()];

    let (code, reports, stderr) = load_json(&bundle, &agents, &RETAG)?;
    ensure!(code == 0, "first load failed: {reports:#?}\n{stderr}");
    let mut expected = vec![
        APP,
        APP_RETAGGED,
        SIDECAR,
        SIDECAR_RETAGGED,
        BUSYBOX,
        BUSYBOX_RETAGGED,
    ];
    expected.sort();
    for (node, report) in docker.iter().zip(&reports) {
        assert_eq!(report["node"], node.name.as_str());
        assert!(
            report["runtime"]
                .as_str()
                .unwrap_or_default()
                .starts_with("docker "),
            "{report}"
        );
        assert_eq!(u64_of(report, "images_loaded"), 3, "{report}");
        assert_eq!(u64_of(report, "bytes_sent"), unique_bytes, "{report}");
        assert_eq!(
            node.docker_image_names()?,
            expected,
            "names on {}",
            node.name
        );
        let id =
            node.dockerd
                .docker_ok(&["image", "inspect", "--format", "{{.Id}}", APP_RETAGGED])?;
        // The summary's digest for the image is the ID Docker shows for it.
        let app_loaded = report["loaded_images"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|i| i["names"].to_string().contains(APP_RETAGGED))
            })
            .cloned()
            .unwrap_or_default();
        assert_eq!(app_loaded["digest"], id.trim(), "{report}");
        if node.dockerd.store() == DockerStore::Containerd {
            // The containerd store's image ID is the manifest digest, as after a pull; the
            // agent wrote into dockerd's containerd and kept nothing in its own cache.
            let app = opened
                .images
                .iter()
                .find(|i| i.names.iter().any(|n| normalize_ref(n) == APP))
                .expect("app image in the bundle");
            assert_eq!(id.trim(), app.manifest);
            assert!(
                !node.cache_dir().join("blobs").exists(),
                "the containerd store needs no blob cache"
            );
            continue;
        }
        // Docker's image ID is the config digest, as kubelet reports it on containerd.
        assert_eq!(id.trim(), imgs[0].config_digest());
        // Layers went into dockerd and out of the cache; manifests and configs stay (small).
        for layer in written.unique_layers() {
            let cached = node
                .cache_dir()
                .join("blobs/sha256")
                .join(hex(&layer.digest));
            assert!(!cached.exists(), "{} still cached", cached.display());
        }
        let config = node
            .cache_dir()
            .join("blobs/sha256")
            .join(hex(&imgs[0].config_digest()));
        assert!(config.exists(), "{} not cached", config.display());
    }
    let names: Vec<String> = containerd
        .image_names()?
        .into_iter()
        .filter(|n| !n.starts_with("sha256:"))
        .collect();
    assert_eq!(names, expected, "names on {}", containerd.name);

    // Loaded images run on Docker, with no network at all.
    let out = docker[0].docker_run(BUSYBOX_RETAGGED, &["/bin/echo", "ok"])?;
    assert_eq!(out.trim(), "ok");
    let out = docker[1].docker_run(APP_RETAGGED, &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);

    // Second run: Docker nodes answer from their cache and from dockerd; nothing is sent.
    let (code, reports, stderr) = load_json(&bundle, &agents, &RETAG)?;
    ensure!(code == 0, "second load failed: {reports:#?}\n{stderr}");
    for report in &reports {
        assert_eq!(u64_of(report, "bytes_sent"), 0, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 3, "{report}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn images_docker_already_holds_cost_no_layer_transfer() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let archive = docker_save_tar(dir.path(), &imgs)?;
    let node = DockerNode::start("preloaded").await?;
    node.dockerd
        .docker_ok(&["load", "-i", &archive.display().to_string()])?;

    let bundle = Bundle::open(&archive)?;
    // A `docker save` archive has no manifests: lade makes them, and only they travel.
    let manifest_bytes: u64 = bundle
        .images
        .iter()
        .map(|i| bundle.blobs[&i.manifest].size)
        .sum();
    let (code, reports, stderr) = load_json(&archive, &[node.addr()], &RETAG)?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(
        u64_of(&reports[0], "bytes_sent"),
        manifest_bytes,
        "{}",
        reports[0]
    );
    assert_eq!(u64_of(&reports[0], "blobs_sent"), 3, "{}", reports[0]);
    let names = node.docker_image_names()?;
    assert!(names.contains(&APP_RETAGGED.to_string()), "{names:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_and_zstd_archives_load_into_docker_and_run() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let imgs = images()?;
    // Docker 20.10 cannot read zstd layers: the agent decompresses them on the way.
    for (i, (format, compression)) in [
        (ArchiveFormat::Oci, Compression::Zstd),
        (ArchiveFormat::Docker25, Compression::Gzip),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir()?;
        let node = DockerNode::start(&format!("dform-{i}")).await?;
        load_archive_form(dir.path(), &imgs, format, compression, &node.addr())?;
        let out = node.docker_run(APP, &["/bin/busybox", "cat", "/app/hello.txt"])?;
        assert_eq!(out.as_bytes(), APP_HELLO, "{format:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_layer_is_refused_and_no_tag_is_created() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle_path, written) =
        gcr_bundle(dir.path(), "bad.bundle.tar", &imgs, Compression::Gzip)?;
    let layer = &written.images[0].layers[1];
    let bundle = Bundle::open(&bundle_path)?;
    let BlobSource::Member { member, offset } = bundle.blobs[&layer.digest].source.clone() else {
        panic!("layers are members");
    };
    let mut bytes = std::fs::read(&bundle_path)?;
    bytes[(offset + layer.size / 2) as usize] ^= 0x55;
    std::fs::write(&bundle_path, bytes)?;

    let node = DockerNode::start("dvictim").await?;
    let (code, reports, stderr) = load_json(&bundle_path, &[node.addr()], &RETAG)?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    // The damaged image fails alone, by name; the two others load.
    assert_eq!(reports[0]["images_loaded"], 2, "{reports:#?}");
    let failed = &reports[0]["failed_images"][0];
    assert_eq!(failed["image"], APP_IMAGE, "{reports:#?}");
    let error = failed["reason"].as_str().unwrap_or_default();
    assert!(error.contains(&member), "{error}");
    assert!(
        error.contains(&format!("layer 2 of {APP_IMAGE}")),
        "{error}"
    );
    // No name of it, and the damaged bytes never became a cached blob.
    let names = node.docker_image_names()?;
    assert!(
        !names.iter().any(|n| n.ends_with("demo/app:v1")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with("demo/sidecar:v1")),
        "{names:?}"
    );
    assert!(!node
        .cache_dir()
        .join("blobs/sha256")
        .join(hex(&layer.digest))
        .exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_dockerd_refuses_is_reported_by_image_and_node_and_leaves_no_tag() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut imgs = images()?;
    // Blobs that match their digests, but a config that lies about the second layer's content:
    // only unpacking finds out.
    let base = imgs[2].layers[0].clone();
    let extra = layer_tar(&[Entry::file("lie.txt", 0o644, "x")]);
    let diff_ids = vec![blob_digest(&base), blob_digest(b"not this layer")];
    let liar = ImageFixture {
        name: "release.daocloud.io/demo/liar:v1".into(),
        layers: vec![base, extra],
        config: image_config(&diff_ids, &["/bin/sh"]),
    };
    let liar_config = liar.config_digest();
    imgs.push(liar);
    let (bundle, _) = gcr_bundle(dir.path(), "liar.bundle.tar", &imgs, Compression::Gzip)?;
    let node = DockerNode::start("drefuse").await?;
    // The coordinator's own layer check would refuse the layer before upload (tests/hostile.rs);
    // here it is off, to see what dockerd does.
    let args: Vec<&str> = RETAG.iter().copied().chain(["--no-layer-check"]).collect();
    let (code, reports, stderr) = load_json(&bundle, &[node.addr()], &args)?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    let report = &reports[0];
    assert_eq!(u64_of(report, "images_loaded"), 3, "{report}");
    let failed = report["failed_images"].as_array().expect("failed_images");
    assert_eq!(failed.len(), 1, "{report}");
    let reason = failed[0]["reason"].as_str().unwrap_or_default();
    // dockerd says "invalid diffID" (graph driver); on the containerd store the agent
    // unpacks, and says what the layer unpacked to and what the config claims.
    assert!(
        reason.contains("release.daocloud.io/demo/liar:v1")
            && (reason.contains(&node.name) || node.dockerd.store() == DockerStore::Containerd)
            && (reason.contains("invalid diffID") || reason.contains("the config says its diffID")),
        "{reason}"
    );
    // The other images got their names; the refused one got none and is not in dockerd.
    let names = node.docker_image_names()?;
    assert!(names.contains(&APP_RETAGGED.to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("liar")), "{names:?}");
    let inspect = node.dockerd.docker(&["image", "inspect", &liar_config]);
    assert!(!inspect.status.success(), "the refused image exists");
    Ok(())
}

/// `--runtime auto` takes containerd when it answers with CRI, else Docker.
#[tokio::test(flavor = "multi_thread")]
async fn auto_picks_containerd_with_cri_and_docker_otherwise() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dockerd = Dockerd::start("dauto").await?;
    let absent = dockerd.dir().join("no-containerd.sock");
    for (containerd, expected) in [
        (dockerd.containerd().socket(), "containerd"),
        (absent, "docker"),
    ] {
        let port = free_port();
        let log = dockerd.dir().join(format!("agent-{expected}.log"));
        let args: Vec<OsString> = vec![
            "--runtime".into(),
            "auto".into(),
            "--containerd-socket".into(),
            containerd.into(),
            "--docker-socket".into(),
            dockerd.socket().into(),
            "--docker-cache-dir".into(),
            dockerd.dir().join("cache").into(),
        ];
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let started = spawn_agent("auto", port, free_port(), &args, &log).await;
        let api = dockerd.docker_ok(&["version", "--format", "{{.Server.APIVersion}}"])?;
        let api: Vec<u32> = api
            .trim()
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        // API 1.46 (dockerd 27) added the containerd address to `docker info`.
        let store_unreported = dockerd.store() == DockerStore::Containerd && api < vec![1, 46];
        if expected == "docker" && store_unreported {
            // Older dockerds do not say where their containerd is: the agent must be told, and
            // refuses to start, saying so, when it cannot reach the one it was given.
            let error = format!("{:#}", started.expect_err("agent started without a store"));
            assert!(error.contains("point --containerd-socket at"), "{error}");
            continue;
        }
        let _agent = started?;
        let mut client =
            lade::load::connect(&format!("127.0.0.1:{port}"), &lade_tests::dial()).await?;
        let info = client.info(InfoRequest {}).await?.into_inner();
        assert_eq!(info.runtime, expected);
    }
    Ok(())
}

/// dockerd keeps layers per chain: a layer it holds on one base is a new layer on another.
/// The first load of such an image judges the layer by its diffID and fails with a reason;
/// the next load sends exactly that layer, and the image loads.
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_docker_holds_on_another_base_is_sent_by_the_next_load() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let shared = layer_tar(&[Entry::file("shared.txt", 0o644, "same bytes on two bases")]);
    let first = ImageFixture::new(
        "release.daocloud.io/demo/first:v1",
        vec![layer_tar(&[Entry::file("one", 0o644, "1")]), shared.clone()],
        &["/bin/sh"],
    );
    let second = ImageFixture::new(
        "release.daocloud.io/demo/second:v1",
        vec![layer_tar(&[Entry::file("two", 0o644, "2")]), shared],
        &["/bin/sh"],
    );
    let (old, _) = gcr_bundle(dir.path(), "old.bundle.tar", &[first], Compression::Gzip)?;
    let (new, written) = gcr_bundle(dir.path(), "new.bundle.tar", &[second], Compression::Gzip)?;
    let node = DockerNode::start("dchain").await?;
    let (code, reports, stderr) = load_json(&old, &[node.addr()], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");

    if node.dockerd.store() == DockerStore::Containerd {
        // The containerd store keeps layer blobs by digest, whatever their base: the shared
        // layer is not sent again, and the second image loads at once.
        let (code, reports, stderr) = load_json(&new, &[node.addr()], &[])?;
        ensure!(code == 0, "{reports:#?}\n{stderr}");
        let shared_layer = &written.images[0].layers[1];
        assert_eq!(u64_of(&reports[0], "blobs_skipped"), 1, "{}", reports[0]);
        assert_eq!(u64_of(&reports[0], "bytes_skipped"), shared_layer.size);
        assert!(node
            .docker_image_names()?
            .contains(&"release.daocloud.io/demo/second:v1".to_string()));
        return Ok(());
    }
    let (code, reports, stderr) = load_json(&new, &[node.addr()], &[])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    let reason = reports[0]["failed_images"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("only on another base"), "{reason}");
    assert!(!node
        .docker_image_names()?
        .iter()
        .any(|n| n.contains("second")));

    let (code, reports, stderr) = load_json(&new, &[node.addr()], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let shared_layer = &written.images[0].layers[1];
    assert_eq!(
        u64_of(&reports[0], "bytes_sent"),
        shared_layer.size,
        "{}",
        reports[0]
    );
    assert!(node
        .docker_image_names()?
        .contains(&"release.daocloud.io/demo/second:v1".to_string()));
    Ok(())
}
