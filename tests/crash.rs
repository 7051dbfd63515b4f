//! Real crashes in the middle of a load (issue 9): `kill -9` of the agent during an upload and
//! during an import, of containerd during an import, and of the coordinator during a
//! transfer. Afterwards no name may point at missing or un-unpacked content, the load's lease
//! carries its expiry, and a re-run completes, re-sending at most what was in flight.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use lade::bundle::Bundle;
use lade_testkit::fixtures::{random_layer, ArchiveFormat, Compression, ImageFixture};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use lade_tests::{images, load_json, u64_of, write_sample_bundle};

/// A bundle with one big image (so an upload takes long enough to be interrupted) on top of
/// the sample images.
fn big_bundle(dir: &Path) -> Result<PathBuf> {
    let mut imgs = images()?;
    let base = imgs[2].layers[0].clone();
    imgs.push(ImageFixture::new(
        "release.daocloud.io/demo/big:v1",
        vec![
            base,
            random_layer(11, 48 << 20, 0.0),
            random_layer(12, 48 << 20, 0.0),
        ],
        &["/bin/sh"],
    ));
    let (path, _) = write_sample_bundle(
        dir,
        "big.bundle.tar",
        &imgs,
        ArchiveFormat::Gcr,
        Compression::None,
    )?;
    Ok(path)
}

/// Starts `lade load` in the background.
fn spawn_load(bundle: &Path, node: &Node) -> Result<Child> {
    Ok(Command::new(workspace_bin("lade")?)
        .arg("load")
        .arg(bundle)
        .args(["--agent", &node.addr(), "--progress", "none", "-o", "json"])
        .env("LADE_AUTH_TOKEN", TEST_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// A counter of the agent's /metrics (0 when not exported yet).
fn metric(node: &Node, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", node.metrics_port)) else {
        return 0.0;
    };
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `condition` holds (polling every 5 ms), at most 60 s.
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// No name may point at missing content or at layers that were not unpacked.
fn assert_nothing_dangling(node: &Node) -> Result<()> {
    let check = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    for line in check.lines().skip(1) {
        ensure!(line.contains("complete"), "dangling image: {line}");
    }
    // Every name lade made is unpacked: ask the agent what kubelet would find.
    let names: Vec<String> = node
        .image_names()?
        .into_iter()
        .filter(|n| !n.starts_with("sha256:"))
        .collect();
    for name in names {
        let out = node.run_container(&name, "probe", &["/bin/echo", "ok"]);
        ensure!(out.is_ok(), "{name} is named but cannot run: {out:?}");
    }
    Ok(())
}

/// The load's lease is there and will expire on its own.
fn assert_lease_expires(node: &Node) -> Result<()> {
    let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
    let line = leases
        .lines()
        .find(|l| l.contains("lade-load-"))
        .ok_or_else(|| anyhow::anyhow!("no lade lease left: {leases}"))?;
    ensure!(line.contains("containerd.io/gc.expire="), "{line}");
    Ok(())
}

/// Re-runs the load; returns the bytes it sent.
fn rerun(bundle: &Path, node: &Node) -> Result<u64> {
    let (code, reports, stderr) = load_json(bundle, &[node.addr()], &[])?;
    ensure!(code == 0, "re-run failed: {reports:#?}\n{stderr}");
    assert_eq!(u64_of(&reports[0], "images_loaded"), 4);
    Ok(u64_of(&reports[0], "bytes_sent"))
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_upload_then_rerun_resumes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = big_bundle(dir.path())?;
    let total = Bundle::open(&bundle)?.total_bytes();
    let mut node = Node::start("crash-upload").await?;
    let mut load = spawn_load(&bundle, &node)?;
    // Past the first few MiB of the big layers, well before the end.
    wait_for("an upload in progress", || {
        metric(&node, "lade_agent_received_bytes_total") > (16 << 20) as f64
    })?;
    node.kill_agent();
    let status = load.wait()?;
    assert_eq!(status.code(), Some(1), "the node must be reported failed");
    assert_nothing_dangling(&node)?;

    node.start_agent().await?;
    assert_lease_expires(&node)?;
    let sent = rerun(&bundle, &node)?;
    // Only what was not yet on the node crossed again: the finished blobs and the kept part
    // of the interrupted one were skipped.
    assert!(sent < total, "sent {sent} of {total}: nothing was resumed");
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_import_leaves_no_dangling_name() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = big_bundle(dir.path())?;
    let mut node = Node::start("crash-import").await?;
    let mut load = spawn_load(&bundle, &node)?;
    // The first images are imported while the big one still uploads: kill then.
    wait_for("an import in progress", || {
        metric(&node, "lade_agent_layer_unpack_duration_seconds_count") >= 1.0
    })?;
    node.kill_agent();
    assert_eq!(load.wait()?.code(), Some(1));
    assert_nothing_dangling(&node)?;

    node.start_agent().await?;
    rerun(&bundle, &node)?;
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_killed_mid_import_then_rerun_completes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = big_bundle(dir.path())?;
    let mut node = Node::start("crash-containerd").await?;
    let mut load = spawn_load(&bundle, &node)?;
    wait_for("an import in progress", || {
        metric(&node, "lade_agent_layer_unpack_duration_seconds_count") >= 1.0
    })?;
    node.containerd.kill_9();
    assert_eq!(load.wait()?.code(), Some(1));
    node.containerd.restart().await?;
    assert_nothing_dangling(&node)?;

    // The agent reconnects to the restarted containerd by itself.
    rerun(&bundle, &node)?;
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_transfer_then_rerun_resumes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = big_bundle(dir.path())?;
    let total = Bundle::open(&bundle)?.total_bytes();
    let node = Node::start("crash-coordinator").await?;
    let mut load = spawn_load(&bundle, &node)?;
    wait_for("an upload in progress", || {
        metric(&node, "lade_agent_received_bytes_total") > (16 << 20) as f64
    })?;
    load.kill()?;
    load.wait()?;
    // The agent sees the stream end early and keeps what it got for the next attempt.
    wait_for("the upload to end on the agent", || {
        metric(&node, "lade_agent_inflight_uploads") == 0.0
    })?;
    assert_nothing_dangling(&node)?;
    assert_lease_expires(&node)?;

    let sent = rerun(&bundle, &node)?;
    assert!(sent < total, "sent {sent} of {total}: nothing was resumed");
    assert_nothing_dangling(&node)?;
    Ok(())
}
