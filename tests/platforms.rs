//! Multi-platform archives on real containerd nodes: each node gets the manifest of its own
//! platform (as its agent reports it), `--platform` picks one for all, `--all-platforms`
//! names the index, and platforms an index lists without carrying them are skipped and said,
//! never "content digest not found". Needs containerd, runc and busybox-static.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lade_testkit::fixtures::{
    random_layer, write_oci_partial_multiplatform, Compression, ImageFixture, WrittenIndex,
    APP_HELLO,
};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{DockerNode, Node};
use lade_tests::{images, load_json, u64_of};

const NAME: &str = "release.daocloud.io/demo/multi:v1";

/// An OCI archive of [`NAME`] for amd64 (the runnable sample app) and arm64 (another top
/// layer over the same base), whose index also lists the architectures of `listed_only`.
fn write_multi(dir: &Path, listed_only: &[&str]) -> Result<(PathBuf, WrittenIndex, u64)> {
    write_multi_named(dir, NAME, listed_only)
}

/// [`write_multi`] with the index annotated `name`.
fn write_multi_named(
    dir: &Path,
    name: &str,
    listed_only: &[&str],
) -> Result<(PathBuf, WrittenIndex, u64)> {
    let imgs = images()?;
    let arm_only = random_layer(11, 64 << 10, 1.0);
    let arm = ImageFixture::new(
        NAME,
        vec![imgs[0].layers[0].clone(), arm_only.clone()],
        &["/bin/sh"],
    );
    let path = dir.join("multi.tar");
    let mut out = BufWriter::new(File::create(&path)?);
    let written = write_oci_partial_multiplatform(
        name,
        &[("amd64", imgs[0].clone()), ("arm64", arm)],
        listed_only,
        Compression::None,
        &mut out,
    )?;
    out.into_inner()?.sync_all()?;
    Ok((path, written, arm_only.len() as u64))
}

/// (media type, digest) the image record `name` points at on `node`.
fn target(node: &Node, name: &str) -> Result<(String, String)> {
    let out = node.containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"])?;
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .with_context(|| format!("no image {name} on {}:\n{out}", node.name))?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    Ok((cols[1].to_string(), cols[2].to_string()))
}

fn manifest_of<'a>(written: &'a WrittenIndex, arch: &str) -> &'a str {
    &written
        .manifests
        .iter()
        .find(|(a, _)| a == arch)
        .expect("written platform")
        .1
}

fn content(node: &Node) -> Result<String> {
    node.containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])
}

fn check_complete(node: &Node, name: &str) -> Result<()> {
    let out = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    let line = out
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("{name} not checked:\n{out}"))?;
    anyhow::ensure!(line.contains("complete"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_node_gets_the_manifest_of_its_own_platform() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (path, written, _) = write_multi(dir.path(), &[])?;
    let amd = Node::start("plat-amd").await?;
    let arm = Node::start_with("plat-arm", &["--platform", "linux/arm64"]).await?;
    let (code, reports, stderr) = load_json(&path, &[amd.addr(), arm.addr()], &[])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert_eq!(reports[1]["platform"], "linux/arm64", "{reports:#?}");

    let (_, amd_target) = target(&amd, NAME)?;
    let (_, arm_target) = target(&arm, NAME)?;
    assert_eq!(amd_target, manifest_of(&written, "amd64"));
    assert_eq!(arm_target, manifest_of(&written, "arm64"));
    // Each node received its own platform's blobs only.
    assert!(!content(&amd)?.contains(manifest_of(&written, "arm64")));
    assert!(!content(&arm)?.contains(manifest_of(&written, "amd64")));
    assert_ne!(
        u64_of(&reports[0], "bytes_sent"),
        u64_of(&reports[1], "bytes_sent")
    );
    check_complete(&amd, NAME)?;
    let out = amd.run_container(NAME, "plat", &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);

    // --platform picks one platform for every node; moving the name the node already has to
    // another manifest is an overwrite, so it is asked for.
    let (code, reports, stderr) = load_json(
        &path,
        &[amd.addr()],
        &["--platform", "linux/arm64", "--allow-overwrite"],
    )?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert_eq!(target(&amd, NAME)?.1, manifest_of(&written, "arm64"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn platforms_listed_but_not_carried_are_skipped_and_said() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (path, written, _) = write_multi(dir.path(), &["s390x"])?;
    let amd = Node::start("part-amd").await?;
    let s390x = Node::start_with("part-s390x", &["--platform", "linux/s390x"]).await?;
    let (code, reports, stderr) = load_json(&path, &[amd.addr(), s390x.addr()], &[])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "note: {NAME}: its index lists linux/s390x, which the archive does not carry"
        )),
        "{stderr}"
    );
    assert_eq!(reports[0]["ok"], true, "{reports:#?}");
    assert_eq!(target(&amd, NAME)?.1, manifest_of(&written, "amd64"));
    check_complete(&amd, NAME)?;
    // The node whose platform the archive lacks is told so, by image; nothing is named there.
    let failed = &reports[1]["failed_images"][0];
    assert_eq!(failed["image"], NAME, "{reports:#?}");
    assert_eq!(
        failed["reason"],
        "no linux/s390x manifest: the archive carries linux/amd64, linux/arm64/v8 (its index also lists linux/s390x, which the archive does not carry)"
    );
    assert_eq!(s390x.image_names()?, Vec::<String>::new());
    assert!(!stderr.contains("not found"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn all_platforms_name_the_index_and_unpack_the_node_s_own() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (full, written, arm_layer) = write_multi(dir.path(), &[])?;
    let node = Node::start("all-plat").await?;
    let (code, reports, stderr) = load_json(&full, &[node.addr()], &["--all-platforms"])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    let (media_type, digest) = target(&node, NAME)?;
    assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");
    assert_eq!(digest, written.index_digest);
    // Both platforms' content is on the node; its own is unpacked and runs.
    let held = content(&node)?;
    assert!(held.contains(manifest_of(&written, "arm64")), "{held}");
    assert!(u64_of(&reports[0], "bytes_sent") > arm_layer);
    check_complete(&node, NAME)?;
    let out = node.run_container(NAME, "allplat", &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);

    // An index listing a platform the archive lacks: the name points at an index of the
    // carried platforms only, which lade wrote, so nothing it names is missing.
    let sub = dir.path().join("partial");
    std::fs::create_dir(&sub)?;
    let (partial, written, _) = write_multi(&sub, &["s390x"])?;
    let other = Node::start("all-plat-partial").await?;
    let (code, reports, stderr) = load_json(&partial, &[other.addr()], &["--all-platforms"])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    let (media_type, digest) = target(&other, NAME)?;
    assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");
    assert_ne!(digest, written.index_digest);
    let index = other
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "get", &digest])?;
    assert!(index.contains(manifest_of(&written, "arm64")), "{index}");
    assert!(!index.contains("s390x"), "{index}");
    check_complete(&other, NAME)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_docker_node_keeps_its_own_platform_even_with_all_platforms() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (path, _, _) = write_multi(dir.path(), &["s390x"])?;
    let node = DockerNode::start("plat-docker").await?;
    let (code, reports, stderr) = load_json(&path, &[node.addr()], &["--all-platforms"])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert!(
        stderr.contains("Docker keeps one platform per image: loading linux/amd64"),
        "{stderr}"
    );
    // The amd64 variant's config says so (each platform's config names its architecture).
    let arch =
        node.dockerd
            .docker_ok(&["image", "inspect", "--format", "{{.Architecture}}", NAME])?;
    assert_eq!(arch.trim(), "amd64");
    let out = node.docker_run(NAME, &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_platform_image_of_another_platform_loads_with_a_warning() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // The sample images' configs say linux/amd64 and carry no index: like `ctr import`, lade
    // loads them on an arm64 node, but says their containers will not start there.
    let dir = tempfile::tempdir()?;
    let (path, _) = lade_tests::write_images_tar(
        dir.path(),
        &images()?,
        lade_testkit::fixtures::ArchiveFormat::Gcr,
        Compression::Gzip,
    )?;
    let amd = Node::start("warn-amd").await?;
    let arm = Node::start_with("warn-arm", &["--platform", "linux/arm64"]).await?;
    let (code, reports, stderr) = load_json(&path, &[amd.addr(), arm.addr()], &[])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert!(reports[0].get("warnings").is_none(), "{reports:#?}");
    let warnings = reports[1]["warnings"].as_array().context("warnings")?;
    assert_eq!(warnings.len(), images()?.len(), "{reports:#?}");
    for w in warnings {
        let w = w.as_str().unwrap_or_default();
        assert!(
            w.contains("is linux/amd64") && w.contains("this node is linux/arm64"),
            "{w}"
        );
    }
    // The text summary says it too.
    let out = lade_testkit::nodes::run_lade(&[
        "load",
        path.to_str().context("utf-8 path")?,
        "--agent",
        &arm.addr(),
        "--progress",
        "none",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: warn-arm: image ") && text.contains("will not start here"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_by_the_index_digest_names_each_node_s_own_target() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // What `ctr export` writes for an image pulled by digest: the index's own digest is a
    // name of the image, not a claim on other content.
    let tagged = tempfile::tempdir()?;
    let (_, written, _) = write_multi(tagged.path(), &[])?;
    let repo = NAME.rsplit_once(':').context("a tag")?.0;
    let by_index = format!("{repo}@{}", written.index_digest);
    let dir = tempfile::tempdir()?;
    let (path, again, _) = write_multi_named(dir.path(), &by_index, &[])?;
    assert_eq!(again, written, "the name changed the index");

    let all = Node::start("digest-all").await?;
    let own = Node::start("digest-own").await?;
    let (code, _, stderr) = load_json(&path, &[all.addr()], &["--all-platforms"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(target(&all, &by_index)?.1, written.index_digest);
    // A node that gets one platform's manifest has that manifest's digest reference instead.
    let (code, _, stderr) = load_json(&path, &[own.addr()], &[])?;
    assert_eq!(code, 0, "{stderr}");
    let amd64 = manifest_of(&written, "amd64");
    assert_eq!(target(&own, &format!("{repo}@{amd64}"))?.1, amd64);
    assert!(
        target(&own, &by_index).is_err(),
        "the index name names a manifest"
    );
    Ok(())
}
