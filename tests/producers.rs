//! Archives written by the real tools admins use, not by lade's fixtures: `ctr images export`
//! (one platform, or all), `docker save` (Docker 20.10) and `skopeo copy` to an OCI archive.
//! Each is loaded by `lade load` onto a fresh containerd node and run there. Needs
//! containerd, runc, docker.io, skopeo and busybox-static.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use lade_testkit::fixtures::{
    random_layer, write_oci_multiplatform, Compression, ImageFixture, APP_HELLO, APP_IMAGE,
};
use lade_testkit::harness::{daemon_tests_enabled, require_binary};
use lade_testkit::nodes::{DockerNode, Node};
use lade_tests::{docker_save_tar, images, load_json};

const MULTI: &str = "release.daocloud.io/demo/multi:v1";

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("utf-8 path")
}

/// A containerd node holding [`MULTI`] for amd64 and arm64, imported by `ctr` itself.
async fn node_with_multi(dir: &Path) -> Result<Node> {
    let imgs = images()?;
    let arm = ImageFixture::new(
        MULTI,
        vec![imgs[0].layers[0].clone(), random_layer(3, 32 << 10, 1.0)],
        &["/bin/sh"],
    );
    let path = dir.join("multi-src.tar");
    let mut out = BufWriter::new(File::create(&path)?);
    write_oci_multiplatform(
        MULTI,
        &[("amd64", imgs[0].clone()), ("arm64", arm)],
        Compression::Gzip,
        &mut out,
    )?;
    out.into_inner()?.sync_all()?;
    let source = Node::start("ctr-source").await?;
    source.containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--all-platforms",
        path_str(&path)?,
    ])?;
    Ok(source)
}

/// Loads `archive` (plus the `extra` flags) onto a fresh containerd node `node_name`, then runs
/// the app image `name` there as container `id`; returns lade's stderr.
async fn load_and_run(
    archive: &Path,
    node_name: &str,
    extra: &[&str],
    name: &str,
    id: &str,
) -> Result<String> {
    let node = Node::start(node_name).await?;
    let (code, reports, stderr) = load_json(archive, &[node.addr()], extra)?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    run_app(&node, name, id)?;
    Ok(stderr)
}

fn run_app(node: &Node, name: &str, id: &str) -> Result<()> {
    let out = node.run_container(name, id, &["/bin/busybox", "cat", "/app/hello.txt"])?;
    ensure!(
        out.as_bytes() == APP_HELLO,
        "{name} on {}: {out}",
        node.name
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_export_of_one_platform_and_of_all_platforms_load_and_run() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let source = node_with_multi(dir.path()).await?;
    let one = dir.path().join("one-platform.tar");
    let all = dir.path().join("all-platforms.tar");
    // ctr export's default: this platform's content under the whole index.
    source
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "export", path_str(&one)?, MULTI])?;
    source.containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "images",
        "export",
        "--all-platforms",
        path_str(&all)?,
        MULTI,
    ])?;

    let stderr = load_and_run(&one, "ctr-export-one", &[], MULTI, "ctr-one").await?;
    ensure!(
        stderr.contains("its index lists linux/arm64/v8, which the archive does not carry"),
        "{stderr}"
    );

    let stderr = load_and_run(
        &all,
        "ctr-export-all",
        &["--all-platforms"],
        MULTI,
        "ctr-all",
    )
    .await?;
    ensure!(!stderr.contains("does not carry"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_save_of_docker_20_10_loads_into_containerd_and_runs() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let fixture = docker_save_tar(dir.path(), &imgs)?;
    let docker = DockerNode::start("docker-save").await?;
    docker
        .dockerd
        .docker_ok(&["load", "-i", path_str(&fixture)?])?;
    let saved = dir.path().join("saved.tar");
    docker
        .dockerd
        .docker_ok(&["save", "-o", path_str(&saved)?, APP_IMAGE])?;

    load_and_run(&saved, "from-docker-save", &[], APP_IMAGE, "docker-save").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_oci_archive_loads_and_runs() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let fixture = docker_save_tar(dir.path(), &imgs[..1])?;
    let oci = dir.path().join("skopeo-oci.tar");
    let out = Command::new(require_binary("skopeo")?)
        .args(["copy", "--quiet"])
        .arg(format!("docker-archive:{}", path_str(&fixture)?))
        .arg(format!("oci-archive:{}:{APP_IMAGE}", path_str(&oci)?))
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    load_and_run(&oci, "from-skopeo", &[], APP_IMAGE, "skopeo").await?;
    Ok(())
}
